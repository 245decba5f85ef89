//! The tensors workload's plan: tensor sizes and their places in the arena, and the order
//! of offload calls (every tensor once, in arena order, with duplicate calls mixed in),
//! all derived from the seed.

use spillway_runtime::pattern::splitmix64;

/// Alignment of every tensor in the arena, as a framework's caching allocator gives.
pub const ARENA_ALIGN: u64 = 512;

/// One tensor: `len` bytes at `offset` in the arena (and in the destination arena).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    /// Byte offset in the arena, a multiple of [`ARENA_ALIGN`].
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The whole workload.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The distinct tensors, in arena order.
    pub tensors: Vec<Tensor>,
    /// Offload calls in forward order: each names a tensor by its index. Every tensor
    /// appears once in order; a duplicate call names a tensor offloaded before it.
    pub calls: Vec<usize>,
    /// Bytes the arena spans (alignment gaps included).
    pub arena_len: u64,
}

/// Uniform random numbers from a splitmix64 sequence.
struct Rng(u64);

impl Rng {
    /// A value in `[0, n)` (n ≥ 1), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        self.0 = splitmix64(self.0);
        ((self.0 as u128 * n as u128) >> 64) as u64
    }
}

impl Plan {
    /// `tensors` tensors of sizes uniform in `[min_size, max_size]` laid out back to back at
    /// [`ARENA_ALIGN`]ed offsets, and `duplicates` extra calls, each placed at a random
    /// point of the forward order and naming a random tensor offloaded before that point.
    pub fn new(tensors: usize, duplicates: usize, min_size: u64, max_size: u64, seed: u64) -> Plan {
        let mut rng = Rng(seed ^ 0x7e45_0125_0ff1_0ad5);
        let span = max_size - min_size;
        let mut at = 0u64;
        let tensors: Vec<Tensor> = (0..tensors)
            .map(|_| {
                let len = min_size + rng.below(span + 1);
                let t = Tensor { offset: at, len };
                at = (at + len).next_multiple_of(ARENA_ALIGN);
                t
            })
            .collect();
        let n = tensors.len() as u64;
        // (after how many tensors, which tensor): a duplicate placed after the first `k`
        // tensors names one of them.
        let mut dups: Vec<(u64, u64)> = (0..duplicates)
            .map(|_| {
                let k = 1 + rng.below(n);
                (k, rng.below(k))
            })
            .collect();
        dups.sort_unstable();
        let mut calls = Vec::with_capacity(tensors.len() + duplicates);
        let mut next_dup = dups.iter().peekable();
        for i in 0..n {
            calls.push(i as usize);
            while let Some(&&(k, which)) = next_dup.peek() {
                if k != i + 1 {
                    break;
                }
                calls.push(which as usize);
                next_dup.next();
            }
        }
        Plan {
            tensors,
            calls,
            arena_len: at.max(ARENA_ALIGN),
        }
    }

    /// Bytes of the distinct tensors.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// Bytes named by all offload calls (duplicates counted each time).
    pub fn call_bytes(&self) -> u64 {
        self.calls.iter().map(|&i| self.tensors[i].len).sum()
    }

    /// Storage the engine gets: twice what the tensors take written one by one, each
    /// rounded up to `alignment` (every call's tensor when `dedup` is off, each distinct
    /// tensor once when it is on), plus two packed extents of slack; so that nothing is
    /// kept in memory for want of space, whether packing is on or off.
    pub fn storage_capacity(&self, alignment: u64, pack_extent: u64, dedup: bool) -> u64 {
        let aligned = |t: &Tensor| t.len.next_multiple_of(alignment);
        let stored = if dedup {
            self.tensors
                .iter()
                .fold(0u64, |sum, t| sum.saturating_add(aligned(t)))
        } else {
            self.calls
                .iter()
                .fold(0u64, |sum, &i| sum.saturating_add(aligned(&self.tensors[i])))
        };
        stored
            .saturating_mul(2)
            .saturating_add(2 * pack_extent.next_multiple_of(alignment))
    }

    /// How many calls name each tensor.
    pub fn calls_per_tensor(&self) -> Vec<u32> {
        let mut n = vec![0u32; self.tensors.len()];
        for &i in &self.calls {
            n[i] += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_aligned_in_range_and_disjoint() {
        let p = Plan::new(1000, 0, 4096, 256 << 10, 1);
        assert_eq!(p.tensors.len(), 1000);
        assert_eq!(p.calls, (0..1000).collect::<Vec<_>>());
        let mut end = 0;
        for t in &p.tensors {
            assert_eq!(t.offset % ARENA_ALIGN, 0);
            assert!((4096..=256 << 10).contains(&t.len));
            assert!(t.offset >= end);
            end = t.offset + t.len;
        }
        assert!(p.arena_len >= end);
        assert_eq!(p.tensor_bytes(), p.call_bytes());
        // Sizes spread over the range.
        assert!(p.tensors.iter().any(|t| t.len < 64 << 10));
        assert!(p.tensors.iter().any(|t| t.len > 192 << 10));
    }

    #[test]
    fn duplicates_name_tensors_already_offloaded() {
        let p = Plan::new(300, 300, 1, 10_000, 7);
        assert_eq!(p.calls.len(), 600);
        let mut seen = vec![false; 300];
        let mut next_new = 0;
        for &i in &p.calls {
            if seen[i] {
                continue; // a duplicate of a tensor offloaded before
            }
            assert_eq!(i, next_new, "every tensor first appears in arena order");
            seen[i] = true;
            next_new += 1;
        }
        assert_eq!(next_new, 300);
        assert_eq!(
            p.calls_per_tensor().iter().map(|&n| n as usize).sum::<usize>(),
            600
        );
        assert!(p.call_bytes() > p.tensor_bytes());
    }

    #[test]
    fn the_seed_decides_and_equal_sizes_work() {
        let a = Plan::new(50, 10, 100, 200, 3);
        let b = Plan::new(50, 10, 100, 200, 3);
        assert_eq!((a.tensors.clone(), a.calls.clone()), (b.tensors, b.calls));
        assert_ne!(a.tensors, Plan::new(50, 10, 100, 200, 4).tensors);
        let same = Plan::new(5, 0, 4096, 4096, 0);
        assert!(same.tensors.iter().all(|t| t.len == 4096));
        assert_eq!(same.tensors[1].offset, 4096);
        let odd = Plan::new(3, 0, 1, 1, 0);
        assert_eq!(odd.tensors[2].offset, 1024);
    }

    #[test]
    fn capacity_holds_every_tensor_written_alone() {
        let p = Plan::new(10, 5, 1, 5000, 2);
        let alone: u64 = p
            .calls
            .iter()
            .map(|&i| p.tensors[i].len.div_ceil(4096) * 4096)
            .sum();
        assert!(p.storage_capacity(4096, 16 << 20, false) >= 2 * alone);
        let once: u64 = p.tensors.iter().map(|t| t.len.div_ceil(4096) * 4096).sum();
        assert!(p.storage_capacity(4096, 16 << 20, true) >= 2 * once);
        assert!(p.storage_capacity(4096, 16 << 20, true) < p.storage_capacity(4096, 16 << 20, false));
    }
}
