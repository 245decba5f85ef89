//! Property tests of the extent allocator: random alloc / free sequences over 1–3 targets
//! with random capacities and alignments, checked step by step against a simple model (the
//! list of live extents, from which free gaps are computed directly).

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use spillway_runtime::{Extent, ExtentAllocator, OutOfSpace, SpaceUsage, TargetId};

#[derive(Clone, Debug)]
enum Op {
    /// `alloc(len)`.
    Alloc(u64),
    /// `alloc_on(targets[i], len)`.
    AllocOn(usize, u64),
    /// Free a live extent.
    Free(Index),
    /// Try a free that must fail (double, partial, shifted, foreign target).
    BadFree(Index, u8),
}

#[derive(Clone, Debug)]
struct Scenario {
    align: u64,
    /// Capacities as given to `add_target` (not necessarily aligned).
    capacities: Vec<u64>,
    ops: Vec<Op>,
    /// Picks among the remaining live extents when freeing everything at the end.
    final_order: Vec<Index>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    // Alignment exponent, number of targets, and how often frees come (relative to allocs:
    // rare frees fill the targets up, frequent ones keep them mostly empty).
    (0u32..=12, 1usize..=3, 1u32..=8).prop_flat_map(|(exp, n, free_weight)| {
        let align = 1u64 << exp;
        let len = prop_oneof![
            6 => 1..=align * 4,
            4 => 1..=align * 16,
            2 => 1..=align * 70,
            1 => (u64::MAX - 2 * align)..=u64::MAX,
        ];
        let op = prop_oneof![
            4 => len.clone().prop_map(Op::Alloc),
            2 => (0..n, len).prop_map(|(t, l)| Op::AllocOn(t, l)),
            free_weight => any::<Index>().prop_map(Op::Free),
            1 => (any::<Index>(), 0u8..4).prop_map(|(i, k)| Op::BadFree(i, k)),
        ];
        (
            Just(align),
            vec(align..=align * 65 - 1, n),
            vec(op, 1..200),
            vec(any::<Index>(), 1..16),
        )
            .prop_map(|(align, capacities, ops, final_order)| Scenario {
                align,
                capacities,
                ops,
                final_order,
            })
    })
}

/// Target ids that are neither contiguous nor start at 0.
fn target_id(i: usize) -> TargetId {
    TargetId(3 + 7 * i as u32)
}

struct Model {
    align: u64,
    /// (id, aligned capacity), in ascending id order.
    targets: Vec<(TargetId, u64)>,
    live: Vec<Extent>,
}

impl Model {
    fn round_up(&self, len: u64) -> Option<u64> {
        len.checked_add(self.align - 1)
            .map(|l| l / self.align * self.align)
    }

    /// Free gaps of a target as (offset, len), by offset.
    fn gaps(&self, target: TargetId, capacity: u64) -> Vec<(u64, u64)> {
        let mut live: Vec<&Extent> = self.live.iter().filter(|e| e.target == target).collect();
        live.sort_by_key(|e| e.offset);
        let mut gaps = Vec::new();
        let mut pos = 0;
        for e in live {
            if e.offset > pos {
                gaps.push((pos, e.offset - pos));
            }
            pos = e.offset + e.len;
        }
        if capacity > pos {
            gaps.push((pos, capacity - pos));
        }
        gaps
    }

    fn usage_of(&self, target: TargetId, capacity: u64) -> SpaceUsage {
        let gaps = self.gaps(target, capacity);
        let free: u64 = gaps.iter().map(|g| g.1).sum();
        SpaceUsage {
            capacity,
            used: capacity - free,
            free,
            largest_free: gaps.iter().map(|g| g.1).max().unwrap_or(0),
            free_ranges: gaps.len(),
            live_extents: self.live.iter().filter(|e| e.target == target).count(),
        }
    }

    /// Where best fit must put `needed` bytes on a target: the smallest gap that is large
    /// enough, lowest offset among equals.
    fn best_fit(&self, target: TargetId, capacity: u64, needed: u64) -> Option<u64> {
        self.gaps(target, capacity)
            .into_iter()
            .filter(|g| g.1 >= needed)
            .min_by_key(|&(offset, len)| (len, offset))
            .map(|g| g.0)
    }

    /// The target `alloc` must choose: most free space among those where `needed` fits,
    /// lowest id among equals.
    fn choose_target(&self, needed: u64) -> Option<(TargetId, u64)> {
        let mut best: Option<(TargetId, u64, u64)> = None;
        for &(id, cap) in &self.targets {
            let u = self.usage_of(id, cap);
            let better = match best {
                None => true,
                Some(b) => u.free > b.2,
            };
            if u.largest_free >= needed && better {
                best = Some((id, cap, u.free));
            }
        }
        best.map(|(id, cap, _)| (id, cap))
    }
}

/// Everything that must hold between any two operations.
fn check_invariants(a: &ExtentAllocator, m: &Model) -> Result<(), TestCaseError> {
    for e in &m.live {
        prop_assert_eq!(e.offset % m.align, 0, "misaligned offset {:?}", e);
        prop_assert_eq!(e.len % m.align, 0, "misaligned length {:?}", e);
        prop_assert!(e.len > 0);
        let cap = m.targets.iter().find(|t| t.0 == e.target).unwrap().1;
        prop_assert!(e.offset.checked_add(e.len).is_some_and(|end| end <= cap));
    }
    let mut sorted = m.live.clone();
    sorted.sort_by_key(|e| (e.target, e.offset));
    for w in sorted.windows(2) {
        if w[0].target == w[1].target {
            prop_assert!(w[0].end() <= w[1].offset, "overlap: {:?}", w);
        }
    }

    let mut total = SpaceUsage::default();
    for &(id, cap) in &m.targets {
        let got = a.target_usage(id).unwrap();
        let want = m.usage_of(id, cap);
        prop_assert_eq!(got, want, "target {:?}", id);
        prop_assert_eq!(got.used + got.free, got.capacity);
        let f = got.fragmentation();
        prop_assert!((0.0..=1.0).contains(&f), "fragmentation {}", f);
        total.capacity += want.capacity;
        total.used += want.used;
        total.free += want.free;
        total.largest_free = total.largest_free.max(want.largest_free);
        total.free_ranges += want.free_ranges;
        total.live_extents += want.live_extents;
    }
    let got = a.usage();
    prop_assert_eq!(got, total);
    prop_assert_eq!(got.used + got.free, got.capacity);
    prop_assert!((0.0..=1.0).contains(&got.fragmentation()));
    Ok(())
}

/// Checks an out-of-space answer: nowhere eligible had a gap of the rounded length.
fn check_out_of_space(
    err: &OutOfSpace,
    m: &Model,
    len: u64,
    eligible: &[(TargetId, u64)],
) -> Result<(), TestCaseError> {
    let needed = m.round_up(len);
    let usages: Vec<SpaceUsage> = eligible.iter().map(|&(id, c)| m.usage_of(id, c)).collect();
    let largest = usages.iter().map(|u| u.largest_free).max().unwrap_or(0);
    prop_assert!(
        needed.is_none_or(|n| n > largest),
        "OutOfSpace for {} bytes although a {}-byte gap exists",
        len,
        largest
    );
    prop_assert_eq!(err.requested, len);
    prop_assert_eq!(err.largest_free, largest);
    prop_assert_eq!(err.free, usages.iter().map(|u| u.free).sum::<u64>());
    prop_assert!(err.to_string().contains(&len.to_string()));
    Ok(())
}

fn run(s: Scenario) -> Result<(), TestCaseError> {
    let mut a = ExtentAllocator::new(s.align).unwrap();
    let mut m = Model {
        align: s.align,
        targets: Vec::new(),
        live: Vec::new(),
    };
    for (i, &cap) in s.capacities.iter().enumerate() {
        a.add_target(target_id(i), cap).unwrap();
        m.targets.push((target_id(i), cap / s.align * s.align));
    }
    check_invariants(&a, &m)?;

    for op in s.ops {
        match op {
            Op::Alloc(len) => match a.alloc(len).unwrap() {
                Ok(e) => {
                    let needed = m.round_up(len);
                    prop_assert_eq!(Some(e.len), needed);
                    let (id, cap) = m.choose_target(e.len).unwrap();
                    prop_assert_eq!(e.target, id, "alloc chose the wrong target");
                    prop_assert_eq!(Some(e.offset), m.best_fit(id, cap, e.len));
                    m.live.push(e);
                }
                Err(err) => check_out_of_space(&err, &m, len, &m.targets)?,
            },
            Op::AllocOn(t, len) => {
                let (id, cap) = m.targets[t];
                match a.alloc_on(id, len).unwrap() {
                    Ok(e) => {
                        prop_assert_eq!(Some(e.len), m.round_up(len));
                        prop_assert_eq!(e.target, id);
                        prop_assert_eq!(Some(e.offset), m.best_fit(id, cap, e.len));
                        m.live.push(e);
                    }
                    Err(err) => {
                        prop_assert_eq!(err.target, Some(id));
                        check_out_of_space(&err, &m, len, &[(id, cap)])?;
                    }
                }
            }
            Op::Free(i) => {
                if !m.live.is_empty() {
                    let e = m.live.swap_remove(i.index(m.live.len()));
                    a.free(e).unwrap();
                }
            }
            Op::BadFree(i, kind) => {
                let before = a.usage();
                let bad = match (m.live.is_empty(), kind) {
                    (true, _) | (false, 3) => Extent {
                        target: TargetId(u32::MAX),
                        offset: 0,
                        len: s.align,
                    },
                    (false, 0) => {
                        // Double free.
                        let e = m.live.swap_remove(i.index(m.live.len()));
                        a.free(e).unwrap();
                        e
                    }
                    (false, 1) => {
                        // Partial (or over-long) free.
                        let e = m.live[i.index(m.live.len())];
                        let len = if e.len > s.align {
                            e.len - s.align
                        } else {
                            e.len + s.align
                        };
                        Extent { len, ..e }
                    }
                    (false, _) => {
                        // Shifted into the middle or the next extent.
                        let e = m.live[i.index(m.live.len())];
                        Extent {
                            offset: e.offset + s.align,
                            ..e
                        }
                    }
                };
                if m.live.contains(&bad) {
                    // A shift landed exactly on another live extent: a valid free.
                    a.free(bad).unwrap();
                    m.live.retain(|e| *e != bad);
                } else {
                    let after_valid_free = a.usage();
                    prop_assert!(a.free(bad).is_err(), "bad free of {:?} accepted", bad);
                    prop_assert_eq!(a.usage(), after_valid_free);
                    if kind != 0 {
                        prop_assert_eq!(a.usage(), before);
                    }
                }
            }
        }
        check_invariants(&a, &m)?;
    }

    // Free everything: all space comes back, one range per target.
    let mut k = 0;
    while !m.live.is_empty() {
        let pick = s.final_order[k % s.final_order.len()].index(m.live.len());
        a.free(m.live.swap_remove(pick)).unwrap();
        k += 1;
    }
    check_invariants(&a, &m)?;
    for &(id, cap) in &m.targets {
        let u = a.target_usage(id).unwrap();
        prop_assert_eq!((u.free, u.free_ranges, u.live_extents), (cap, 1, 0));
        prop_assert_eq!(u.fragmentation(), 0.0);
    }
    let u = a.usage();
    prop_assert_eq!(u.free, u.capacity);
    prop_assert_eq!(u.free_ranges, m.targets.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_alloc_free_sequences_match_the_model(s in scenario()) {
        run(s)?;
    }
}

/// Fills targets with random small requests until nothing fits, then checks that the
/// leftover gaps are all smaller than the request that failed.
#[test]
fn fill_until_out_of_space_leaves_only_smaller_gaps() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(100));
    let strategy = (0u32..=6, vec(1u64..=4096, 1..=3), vec(1u64..=256, 1..64));
    runner
        .run(&strategy, |(exp, capacities, lens)| {
            let align = 1u64 << exp;
            let mut a = ExtentAllocator::new(align).unwrap();
            let mut targets = 0;
            for (i, &cap) in capacities.iter().enumerate() {
                match a.add_target(target_id(i), cap) {
                    Ok(()) => targets += 1,
                    Err(_) => prop_assert!(cap < align),
                }
            }
            let mut live = Vec::new();
            for &len in lens.iter().cycle().take(100_000) {
                match a.alloc(len).unwrap() {
                    Ok(e) => live.push(e),
                    Err(err) => {
                        let needed = len.div_ceil(align) * align;
                        prop_assert!(err.largest_free < needed);
                        prop_assert_eq!(err.largest_free, a.usage().largest_free);
                        break;
                    }
                }
            }
            let u = a.usage();
            prop_assert_eq!(u.live_extents, live.len());
            prop_assert_eq!(u.used, live.iter().map(|e| e.len).sum::<u64>());
            for e in live {
                a.free(e).unwrap();
            }
            let u = a.usage();
            prop_assert_eq!((u.used, u.free_ranges), (0, targets));
            prop_assert_eq!(u.free, u.capacity);
            Ok(())
        })
        .unwrap();
}
