//! Extent allocation: carving storage targets into aligned byte ranges.
//!
//! The engine writes each offloaded tensor (or pack of tensors) to an [`Extent`]: an aligned
//! byte range of one storage target. An [`ExtentAllocator`] hands extents out in the forward
//! pass and takes them back when their tensors are released, so that the next iteration
//! reuses the space. The same allocator also carves a fixed staging arena (added as one
//! pseudo-target) into extents.
//!
//! Placement is **best fit**: the smallest free range that is large enough, the lowest
//! offset among equals. Freed extents merge with free neighbours, so space never stays split
//! once everything around it is free. Every operation is O(log n) in the number of free
//! ranges and live extents of a target (and linear in the number of targets, which is
//! small): free ranges are indexed both by offset (to find neighbours) and by (length,
//! offset) (to find the best fit).
//!
//! Running out of space is an expected outcome, not a failure: [`ExtentAllocator::alloc`]
//! reports it as an [`OutOfSpace`] value, separate from the [`Error`]s that signal a caller
//! bug, so that the engine can keep the tensor in GPU memory instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::backend::TargetId;
use crate::error::{Error, Result};

/// An aligned byte range of one storage target, as handed out by an [`ExtentAllocator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// The target holding the range.
    pub target: TargetId,
    /// Byte offset of the range in the target (a multiple of the allocator's alignment).
    pub offset: u64,
    /// Length in bytes: the length asked for, rounded up to the allocator's alignment.
    pub len: u64,
}

impl Extent {
    /// One past the last byte of the range (`offset + len`, saturating at `u64::MAX`; an
    /// extent from an allocator never saturates).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Space accounting of one target, or totals over all targets of an allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceUsage {
    /// Usable bytes (capacities rounded down to the alignment).
    pub capacity: u64,
    /// Bytes in live extents.
    pub used: u64,
    /// Bytes not in live extents (`capacity - used`).
    pub free: u64,
    /// Length of the largest free range: the largest extent that can be allocated now.
    /// In totals, the largest over all targets (an extent never spans targets).
    pub largest_free: u64,
    /// Number of free ranges (after merging neighbours).
    pub free_ranges: usize,
    /// Number of live extents.
    pub live_extents: usize,
}

impl SpaceUsage {
    /// How split up the free space is: `1 - largest_free / free`, in `[0, 1]`.
    ///
    /// 0.0 means all free space is one range (or there is no free space at all); values near
    /// 1.0 mean the free space is scattered in ranges much smaller than its total, so large
    /// requests fail although many bytes are free. In totals over several targets, the
    /// split between targets counts too (two empty targets of equal size give 0.5), because
    /// no extent can span two targets.
    pub fn fragmentation(&self) -> f64 {
        if self.free == 0 {
            return 0.0;
        }
        (1.0 - self.largest_free as f64 / self.free as f64).clamp(0.0, 1.0)
    }
}

/// No target has a free range large enough for a request.
///
/// This is an expected outcome under memory pressure, not a bug: the caller can keep the
/// data where it is and try again after extents have been freed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "out of extent space {}: {requested} bytes requested (rounded up to a multiple of {align}), {free} bytes free, largest free range {largest_free} bytes; add storage targets, give them a larger capacity, or free space by releasing offloaded tensors",
    scope(.target, *.targets)
)]
#[non_exhaustive]
pub struct OutOfSpace {
    /// The length asked for, before rounding up to the alignment.
    pub requested: u64,
    /// The allocator's alignment.
    pub align: u64,
    /// Free bytes where the request could have gone (one target, or all of them).
    pub free: u64,
    /// The largest free range there: the largest request that would have succeeded.
    pub largest_free: u64,
    /// The target asked for ([`ExtentAllocator::alloc_on`]), or `None` for any target.
    pub target: Option<TargetId>,
    /// How many targets the allocator has.
    pub targets: usize,
}

/// Where an [`OutOfSpace`] happened, for its message.
fn scope(target: &Option<TargetId>, targets: usize) -> String {
    match (target, targets) {
        (Some(t), _) => format!("on target {}", t.0),
        (None, 0) => "(the allocator has no storage targets)".to_string(),
        (None, 1) => "on the only target".to_string(),
        (None, n) => format!("on all {n} targets"),
    }
}

/// The free ranges of one target, indexed by offset and by (length, offset).
#[derive(Debug, Default)]
struct FreeRanges {
    /// offset → length.
    by_offset: BTreeMap<u64, u64>,
    /// (length, offset), ordered so that the first entry at or after (n, 0) is the best fit
    /// for n bytes.
    by_len: BTreeSet<(u64, u64)>,
    /// Sum of all lengths.
    bytes: u64,
}

impl FreeRanges {
    fn insert(&mut self, offset: u64, len: u64) {
        self.by_offset.insert(offset, len);
        self.by_len.insert((len, offset));
        self.bytes += len;
    }

    fn remove(&mut self, offset: u64, len: u64) {
        self.by_offset.remove(&offset);
        self.by_len.remove(&(len, offset));
        self.bytes -= len;
    }

    fn largest(&self) -> u64 {
        self.by_len.last().map_or(0, |&(len, _)| len)
    }

    /// Takes `len` bytes from the front of the best-fitting free range; returns their offset.
    fn take(&mut self, len: u64) -> Option<u64> {
        let &(range_len, offset) = self.by_len.range((len, 0)..).next()?;
        self.remove(offset, range_len);
        if range_len > len {
            self.insert(offset + len, range_len - len);
        }
        Some(offset)
    }

    /// Returns `[offset, offset + len)` (not free, inside the target) to the free ranges,
    /// merged with the free ranges just before and just after it.
    fn release(&mut self, offset: u64, len: u64) {
        let mut start = offset;
        let mut end = offset + len;
        if let Some((&prev, &prev_len)) = self.by_offset.range(..offset).next_back() {
            if prev + prev_len == offset {
                self.remove(prev, prev_len);
                start = prev;
            }
        }
        if let Some(&next_len) = self.by_offset.get(&end) {
            self.remove(end, next_len);
            end += next_len;
        }
        self.insert(start, end - start);
    }
}

/// One target's space.
#[derive(Debug)]
struct TargetSpace {
    /// Usable bytes (a multiple of the alignment).
    capacity: u64,
    free: FreeRanges,
    /// Live extents: offset → length.
    live: HashMap<u64, u64>,
}

impl TargetSpace {
    fn usage(&self) -> SpaceUsage {
        SpaceUsage {
            capacity: self.capacity,
            used: self.capacity - self.free.bytes,
            free: self.free.bytes,
            largest_free: self.free.largest(),
            free_ranges: self.free.by_offset.len(),
            live_extents: self.live.len(),
        }
    }
}

/// Hands out aligned [`Extent`]s of one or more storage targets and takes them back.
///
/// Requests are rounded up to the alignment; offsets are multiples of it. Within a target,
/// placement is best fit; across targets, [`ExtentAllocator::alloc`] picks the target with
/// the most free space among those with a free range large enough, spreading load over them.
///
/// The allocating calls return `Result<Result<Extent, OutOfSpace>>`: the outer error is an
/// [`Error::InvalidArgument`] for a request that can never be right (zero length, unknown
/// target) and propagates with `?`; the inner one is the expected [`OutOfSpace`], which the
/// caller handles (for the engine: keep the tensor in GPU memory).
///
/// No input makes it panic; lengths and capacities up to `u64::MAX` are handled.
#[derive(Debug)]
pub struct ExtentAllocator {
    align: u64,
    targets: BTreeMap<TargetId, TargetSpace>,
    /// Sum of the targets' capacities (kept ≤ `u64::MAX` by [`ExtentAllocator::add_target`]).
    capacity: u64,
}

impl ExtentAllocator {
    /// An allocator with no targets whose extents are aligned to `align` bytes (offsets and
    /// lengths are multiples of it).
    ///
    /// `align` must be a power of two (1 allows any offset and length); otherwise this
    /// returns [`Error::InvalidArgument`].
    pub fn new(align: u64) -> Result<Self> {
        if !align.is_power_of_two() {
            return Err(Error::invalid(format!(
                "extent alignment must be a power of two (1, 512, 4096…), not {align}"
            )));
        }
        Ok(ExtentAllocator {
            align,
            targets: BTreeMap::new(),
            capacity: 0,
        })
    }

    /// The alignment of offsets and lengths, in bytes.
    pub fn align(&self) -> u64 {
        self.align
    }

    /// Adds a target whose bytes `[0, capacity)` are free to allocate. The capacity is
    /// rounded down to the alignment.
    ///
    /// Errors ([`Error::InvalidArgument`]): the target is already present, its capacity is
    /// smaller than the alignment, or the allocator's total capacity would exceed
    /// `u64::MAX`.
    pub fn add_target(&mut self, target: TargetId, capacity: u64) -> Result<()> {
        if self.targets.contains_key(&target) {
            return Err(Error::invalid(format!(
                "target {} is already managed by this extent allocator",
                target.0
            )));
        }
        let capacity_aligned = capacity & !(self.align - 1);
        if capacity_aligned == 0 {
            return Err(Error::invalid(format!(
                "target {} has capacity {capacity} bytes, less than the {}-byte extent alignment",
                target.0, self.align
            )));
        }
        let total = self.capacity.checked_add(capacity_aligned).ok_or_else(|| {
            Error::invalid(format!(
                "adding target {} ({capacity_aligned} bytes) would take the total capacity past {} bytes",
                target.0,
                u64::MAX
            ))
        })?;
        let mut free = FreeRanges::default();
        free.insert(0, capacity_aligned);
        self.targets.insert(
            target,
            TargetSpace {
                capacity: capacity_aligned,
                free,
                live: HashMap::new(),
            },
        );
        self.capacity = total;
        Ok(())
    }

    /// Allocates an extent of at least `len` bytes (rounded up to the alignment) on the
    /// target with the most free space among those where it fits, best fit within it (ties
    /// between targets go to the lowest id).
    ///
    /// `Err` ([`Error::InvalidArgument`]) when `len` is 0; `Ok(Err(OutOfSpace))` when no
    /// target has a free range of the rounded length (including when there are no targets).
    pub fn alloc(&mut self, len: u64) -> Result<Result<Extent, OutOfSpace>> {
        check_len(len)?;
        let Some(needed) = self.round_up(len) else {
            return Ok(Err(self.out_of_space(len, None)));
        };
        let mut best: Option<(TargetId, &mut TargetSpace)> = None;
        for (&id, space) in self.targets.iter_mut() {
            let better = match &best {
                None => true,
                Some((_, b)) => space.free.bytes > b.free.bytes,
            };
            if better && space.free.largest() >= needed {
                best = Some((id, space));
            }
        }
        match best.and_then(|(id, space)| take(id, space, needed)) {
            Some(extent) => Ok(Ok(extent)),
            None => Ok(Err(self.out_of_space(len, None))),
        }
    }

    /// Allocates an extent of at least `len` bytes (rounded up to the alignment) on
    /// `target`, best fit.
    ///
    /// `Err` ([`Error::InvalidArgument`]) when `len` is 0 or the target is unknown;
    /// `Ok(Err(OutOfSpace))` when the target has no free range of the rounded length.
    pub fn alloc_on(&mut self, target: TargetId, len: u64) -> Result<Result<Extent, OutOfSpace>> {
        check_len(len)?;
        let needed = self.round_up(len);
        let space = self.targets.get_mut(&target).ok_or_else(|| {
            Error::invalid(format!(
                "cannot allocate on target {}: this extent allocator does not manage it",
                target.0
            ))
        })?;
        match needed.and_then(|needed| take(target, space, needed)) {
            Some(extent) => Ok(Ok(extent)),
            None => Ok(Err(self.out_of_space(len, Some(target)))),
        }
    }

    /// Returns a live extent's space. The extent must be exactly one this allocator handed
    /// out and has not taken back since.
    ///
    /// Errors ([`Error::InvalidArgument`], leaving the allocator unchanged): the target is
    /// unknown, no live extent starts at the offset (a double free, or a foreign extent), or
    /// the live extent there has another length (a partial free).
    pub fn free(&mut self, extent: Extent) -> Result<()> {
        let space = self.targets.get_mut(&extent.target).ok_or_else(|| {
            Error::invalid(format!(
                "cannot free {extent:?}: this extent allocator does not manage target {}",
                extent.target.0
            ))
        })?;
        match space.live.get(&extent.offset) {
            None => Err(Error::invalid(format!(
                "cannot free {extent:?}: no live extent starts there (freed twice, or not allocated by this allocator)"
            ))),
            Some(&len) if len != extent.len => Err(Error::invalid(format!(
                "cannot free {extent:?}: the live extent at offset {} is {len} bytes long; free whole extents exactly as allocated",
                extent.offset
            ))),
            Some(_) => {
                space.live.remove(&extent.offset);
                space.free.release(extent.offset, extent.len);
                Ok(())
            }
        }
    }

    /// Space accounting totalled over all targets (`largest_free` is the largest over them).
    pub fn usage(&self) -> SpaceUsage {
        self.targets
            .values()
            .map(TargetSpace::usage)
            .fold(SpaceUsage::default(), |acc, u| SpaceUsage {
                capacity: acc.capacity + u.capacity,
                used: acc.used + u.used,
                free: acc.free + u.free,
                largest_free: acc.largest_free.max(u.largest_free),
                free_ranges: acc.free_ranges + u.free_ranges,
                live_extents: acc.live_extents + u.live_extents,
            })
    }

    /// Space accounting of one target, or `None` if the allocator does not manage it.
    pub fn target_usage(&self, target: TargetId) -> Option<SpaceUsage> {
        self.targets.get(&target).map(TargetSpace::usage)
    }

    /// `len` rounded up to the alignment, or `None` if that passes `u64::MAX` (such a
    /// request can never fit).
    fn round_up(&self, len: u64) -> Option<u64> {
        len.checked_add(self.align - 1).map(|l| l & !(self.align - 1))
    }

    fn out_of_space(&self, requested: u64, target: Option<TargetId>) -> OutOfSpace {
        let usage = match target {
            Some(t) => self.target_usage(t).unwrap_or_default(),
            None => self.usage(),
        };
        OutOfSpace {
            requested,
            align: self.align,
            free: usage.free,
            largest_free: usage.largest_free,
            target,
            targets: self.targets.len(),
        }
    }
}

fn check_len(len: u64) -> Result<()> {
    if len == 0 {
        return Err(Error::invalid(
            "cannot allocate an empty extent: the length must be at least 1 byte",
        ));
    }
    Ok(())
}

/// Takes `len` (aligned) bytes from `space`, best fit, and records the live extent; `None`
/// if no free range is that large.
fn take(target: TargetId, space: &mut TargetSpace, len: u64) -> Option<Extent> {
    let offset = space.free.take(len)?;
    space.live.insert(offset, len);
    Some(Extent { target, offset, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: TargetId = TargetId(0);
    const B: TargetId = TargetId(1);
    const C: TargetId = TargetId(2);

    fn alloc_with(targets: &[(TargetId, u64)], align: u64) -> ExtentAllocator {
        let mut a = ExtentAllocator::new(align).unwrap();
        for &(t, cap) in targets {
            a.add_target(t, cap).unwrap();
        }
        a
    }

    fn ok(r: Result<Result<Extent, OutOfSpace>>) -> Extent {
        r.unwrap().unwrap()
    }

    fn oos(r: Result<Result<Extent, OutOfSpace>>) -> OutOfSpace {
        r.unwrap().unwrap_err()
    }

    fn invalid_msg(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(e @ Error::InvalidArgument(_)) => e.to_string(),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn new_rejects_non_power_of_two_alignment() {
        for bad in [0, 3, 6, 4095, u64::MAX] {
            let msg = invalid_msg(ExtentAllocator::new(bad));
            assert!(msg.contains(&bad.to_string()), "{msg}");
            assert!(msg.contains("power of two"), "{msg}");
        }
        for good in [1, 2, 512, 4096, 1 << 63] {
            assert_eq!(ExtentAllocator::new(good).unwrap().align(), good);
        }
    }

    #[test]
    fn add_target_rounds_capacity_down() {
        let a = alloc_with(&[(A, 10_000)], 4096);
        let u = a.target_usage(A).unwrap();
        assert_eq!(u.capacity, 8192);
        assert_eq!(u.free, 8192);
        assert_eq!(u.largest_free, 8192);
        assert_eq!(u.free_ranges, 1);
        assert_eq!(u.live_extents, 0);
        assert_eq!(a.target_usage(B), None);
    }

    #[test]
    fn add_target_rejects_duplicate() {
        let mut a = alloc_with(&[(A, 4096)], 4096);
        let msg = invalid_msg(a.add_target(A, 8192));
        assert!(msg.contains("already"), "{msg}");
        assert_eq!(a.usage().capacity, 4096);
    }

    #[test]
    fn add_target_rejects_capacity_below_alignment() {
        let mut a = ExtentAllocator::new(4096).unwrap();
        let msg = invalid_msg(a.add_target(A, 4095));
        assert!(msg.contains("4095") && msg.contains("4096"), "{msg}");
        invalid_msg(a.add_target(A, 0));
        assert_eq!(a.usage(), SpaceUsage::default());
    }

    #[test]
    fn add_target_rejects_total_capacity_overflow() {
        let mut a = alloc_with(&[(A, u64::MAX)], 1);
        invalid_msg(a.add_target(B, 1));
        assert_eq!(a.usage().capacity, u64::MAX);
        assert_eq!(a.target_usage(B), None);
    }

    #[test]
    fn alloc_rounds_length_up_and_packs_from_offset_zero() {
        let mut a = alloc_with(&[(A, 1 << 20)], 4096);
        let e1 = ok(a.alloc(1));
        let e2 = ok(a.alloc(4097));
        assert_eq!(
            e1,
            Extent {
                target: A,
                offset: 0,
                len: 4096
            }
        );
        assert_eq!((e2.offset, e2.len, e2.end()), (4096, 8192, 12288));
        let u = a.usage();
        assert_eq!((u.used, u.free, u.live_extents), (12288, (1 << 20) - 12288, 2));
    }

    #[test]
    fn zero_length_is_invalid() {
        let mut a = alloc_with(&[(A, 4096)], 512);
        assert!(invalid_msg(a.alloc(0)).contains("empty"));
        assert!(invalid_msg(a.alloc_on(A, 0)).contains("empty"));
        assert_eq!(a.usage().used, 0);
    }

    #[test]
    fn alloc_on_unknown_target_is_invalid() {
        let mut a = alloc_with(&[(A, 4096)], 512);
        let msg = invalid_msg(a.alloc_on(B, 512));
        assert!(msg.contains("target 1"), "{msg}");
    }

    #[test]
    fn best_fit_takes_smallest_range_then_lowest_offset() {
        let mut a = alloc_with(&[(A, 100)], 1);
        // Carve free ranges of 10 @0, 5 @20, 5 @40, 30 @70 (separated by live extents).
        let e: Vec<Extent> = [10, 10, 5, 15, 5, 25, 30]
            .iter()
            .map(|&n| ok(a.alloc(n)))
            .collect();
        for i in [0, 2, 4, 6] {
            a.free(e[i]).unwrap();
        }
        assert_eq!(a.usage().free_ranges, 4);
        assert_eq!(ok(a.alloc(4)).offset, 20);
        assert_eq!(ok(a.alloc(5)).offset, 40);
        assert_eq!(ok(a.alloc(6)).offset, 0);
        assert_eq!(ok(a.alloc(11)).offset, 70);
    }

    #[test]
    fn freed_space_is_reused_before_untouched_space() {
        // Untouched space is the tail after the highest extent ever handed out: on a file
        // that grows as it is written (or on tmpfs, where every written byte is memory),
        // reusing freed ranges first keeps the bytes in use from creeping up.
        let mut a = alloc_with(&[(A, 1 << 20)], 4096);
        let first = ok(a.alloc(8192));
        let second = ok(a.alloc(8192));
        a.free(first).unwrap();
        let again = ok(a.alloc(8192));
        assert_eq!(
            again.offset, first.offset,
            "lands in the freed range, not past {second:?}"
        );
        // A freed range larger than the request is split: its parts are used before the tail.
        a.free(again).unwrap();
        assert_eq!(ok(a.alloc(4096)).offset, 0);
        assert_eq!(ok(a.alloc(4096)).offset, 4096);
        assert_eq!(
            ok(a.alloc(4096)).offset,
            second.end(),
            "only now past the second extent"
        );
    }

    #[test]
    fn free_coalesces_with_both_neighbours() {
        let mut a = alloc_with(&[(A, 4 * 4096)], 4096);
        let e: Vec<Extent> = (0..4).map(|_| ok(a.alloc(4096))).collect();
        a.free(e[0]).unwrap();
        a.free(e[2]).unwrap();
        assert_eq!(a.usage().free_ranges, 2);
        a.free(e[1]).unwrap();
        let u = a.usage();
        assert_eq!((u.free_ranges, u.largest_free), (1, 3 * 4096));
        a.free(e[3]).unwrap();
        let u = a.usage();
        assert_eq!((u.free_ranges, u.largest_free, u.used), (1, 4 * 4096, 0));
        assert_eq!(u.fragmentation(), 0.0);
    }

    #[test]
    fn alloc_spreads_over_targets_by_free_space() {
        let mut a = alloc_with(&[(A, 8192), (B, 8192), (C, 4096)], 4096);
        // Ties go to the lowest id, then to whichever has more free space.
        assert_eq!(ok(a.alloc(4096)).target, A);
        assert_eq!(ok(a.alloc(4096)).target, B);
        assert_eq!(ok(a.alloc(4096)).target, A);
        assert_eq!(ok(a.alloc(4096)).target, B);
        assert_eq!(ok(a.alloc(4096)).target, C);
        assert!(a.alloc(1).unwrap().is_err());
    }

    #[test]
    fn alloc_skips_targets_where_the_request_does_not_fit() {
        let mut a = alloc_with(&[(A, 3 * 4096), (B, 2 * 4096)], 4096);
        // Leave A with 2 free pages that are not adjacent.
        let a0 = ok(a.alloc_on(A, 4096));
        let _a1 = ok(a.alloc_on(A, 4096));
        ok(a.alloc_on(A, 4096));
        a.free(a0).unwrap();
        let b0 = ok(a.alloc_on(B, 4096));
        a.free(b0).unwrap();
        let a2 = Extent {
            target: A,
            offset: 2 * 4096,
            len: 4096,
        };
        a.free(a2).unwrap();
        // A and B both have 8192 free, but only B in one range.
        assert_eq!(a.target_usage(A).unwrap().largest_free, 4096);
        let e = ok(a.alloc(8192));
        assert_eq!((e.target, e.offset), (B, 0));
        let err = oos(a.alloc_on(A, 8192));
        assert_eq!((err.free, err.largest_free, err.target), (8192, 4096, Some(A)));
    }

    #[test]
    fn double_free_is_rejected_and_changes_nothing() {
        let mut a = alloc_with(&[(A, 8192)], 4096);
        let e = ok(a.alloc(4096));
        let _keep = ok(a.alloc(4096));
        a.free(e).unwrap();
        let before = a.usage();
        let msg = invalid_msg(a.free(e));
        assert!(msg.contains("freed twice"), "{msg}");
        assert_eq!(a.usage(), before);
    }

    #[test]
    fn partial_free_is_rejected_and_changes_nothing() {
        let mut a = alloc_with(&[(A, 4 * 4096)], 4096);
        let e = ok(a.alloc(2 * 4096));
        let before = a.usage();
        let shorter = Extent { len: 4096, ..e };
        let msg = invalid_msg(a.free(shorter));
        assert!(msg.contains("8192 bytes long"), "{msg}");
        let tail = Extent {
            offset: 4096,
            len: 4096,
            ..e
        };
        invalid_msg(a.free(tail));
        assert_eq!(a.usage(), before);
        a.free(e).unwrap();
    }

    #[test]
    fn foreign_extents_are_rejected_and_change_nothing() {
        let mut a = alloc_with(&[(A, 4 * 4096)], 4096);
        let mut other = alloc_with(&[(A, 4 * 4096), (B, 4096)], 4096);
        let _mine = ok(a.alloc(4096));
        let theirs = ok(other.alloc_on(A, 8192));
        let before = a.usage();
        // Same target id, but no live extent there in `a`.
        let moved = Extent {
            offset: 8192,
            ..theirs
        };
        invalid_msg(a.free(moved));
        // A target `a` does not manage.
        let on_b = ok(other.alloc_on(B, 1));
        let msg = invalid_msg(a.free(on_b));
        assert!(msg.contains("target 1"), "{msg}");
        // Offsets and lengths near u64::MAX.
        invalid_msg(a.free(Extent {
            target: A,
            offset: u64::MAX,
            len: u64::MAX,
        }));
        assert_eq!(a.usage(), before);
    }

    #[test]
    fn out_of_space_says_what_happened_and_what_to_do() {
        let mut a = alloc_with(&[(A, 4 * 4096), (B, 4096)], 4096);
        let err = oos(a.alloc(5 * 4096 + 1));
        assert_eq!(err.requested, 5 * 4096 + 1);
        assert_eq!((err.free, err.largest_free), (5 * 4096, 4 * 4096));
        assert_eq!((err.target, err.targets, err.align), (None, 2, 4096));
        let msg = err.to_string();
        for needle in [
            "20481 bytes requested",
            "20480 bytes free",
            "largest free range 16384 bytes",
            "on all 2 targets",
            "add storage targets",
            "larger capacity",
            "free space",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        }
        let msg = oos(a.alloc_on(B, 8192)).to_string();
        assert!(msg.contains("on target 1"), "{msg}");
        // Nothing changed.
        assert_eq!(a.usage().used, 0);
    }

    #[test]
    fn out_of_space_without_targets() {
        let mut a = ExtentAllocator::new(1).unwrap();
        let err = oos(a.alloc(1));
        assert_eq!((err.free, err.largest_free, err.targets), (0, 0, 0));
        assert!(err.to_string().contains("no storage targets"), "{err}");
    }

    #[test]
    fn huge_lengths_do_not_overflow() {
        let mut a = alloc_with(&[(A, 1 << 40)], 1 << 12);
        for len in [u64::MAX, u64::MAX - 4095, (1 << 40) + 1, 1 << 63] {
            let err = oos(a.alloc(len));
            assert_eq!(err.requested, len);
            oos(a.alloc_on(A, len));
        }
        // The whole target, then nothing.
        let e = ok(a.alloc(1 << 40));
        assert_eq!((e.offset, e.len), (0, 1 << 40));
        oos(a.alloc(1));
        a.free(e).unwrap();

        let mut a = alloc_with(&[(A, u64::MAX)], 1);
        let e = ok(a.alloc(u64::MAX));
        assert_eq!((e.offset, e.len, e.end()), (0, u64::MAX, u64::MAX));
        assert_eq!(a.usage().free, 0);
        assert_eq!(a.usage().fragmentation(), 0.0);
        a.free(e).unwrap();
        let e1 = ok(a.alloc(u64::MAX - 1));
        let e2 = ok(a.alloc(1));
        assert_eq!(e2.offset, u64::MAX - 1);
        a.free(e2).unwrap();
        a.free(e1).unwrap();
        assert_eq!(a.usage().largest_free, u64::MAX);

        let mut a = alloc_with(&[(A, u64::MAX)], 1 << 63);
        assert_eq!(a.usage().capacity, 1 << 63);
        oos(a.alloc((1 << 63) + 1));
        assert_eq!(ok(a.alloc(1)).len, 1 << 63);
    }

    #[test]
    fn fragmentation_is_share_of_free_space_outside_the_largest_range() {
        let u = |free, largest_free| SpaceUsage {
            free,
            largest_free,
            ..SpaceUsage::default()
        };
        assert_eq!(u(0, 0).fragmentation(), 0.0);
        assert_eq!(u(100, 100).fragmentation(), 0.0);
        assert_eq!(u(100, 25).fragmentation(), 0.75);
        // Never outside [0, 1], even for inconsistent hand-built values.
        assert_eq!(u(10, 20).fragmentation(), 0.0);

        let a = alloc_with(&[(A, 4096), (B, 4096)], 4096);
        assert_eq!(a.usage().fragmentation(), 0.5);
        assert_eq!(a.target_usage(A).unwrap().fragmentation(), 0.0);
    }

    #[test]
    fn many_live_extents() {
        const N: u64 = 100_000;
        let mut a = alloc_with(&[(A, N * 4096), (B, N * 4096)], 4096);
        let mut live: Vec<Extent> = (0..2 * N).map(|i| ok(a.alloc(1 + i % 4096))).collect();
        assert_eq!(a.usage().live_extents, 2 * N as usize);
        assert_eq!(a.usage().free, 0);
        // Allocation alternates between A and B. Free every other extent of each target,
        // reuse the holes, then free everything in a scrambled order.
        let holes = |i: &usize| i % 4 < 2;
        for i in (0..live.len()).filter(holes) {
            a.free(live[i]).unwrap();
        }
        assert_eq!(a.usage().free_ranges, N as usize);
        assert_eq!(a.usage().largest_free, 4096);
        for i in (0..live.len()).filter(holes) {
            live[i] = ok(a.alloc(4096));
        }
        assert_eq!(a.usage().free, 0);
        let n = live.len();
        for i in 0..n {
            a.free(live[(i * 7919) % n]).unwrap();
        }
        let u = a.usage();
        assert_eq!((u.used, u.free_ranges, u.live_extents), (0, 2, 0));
    }
}
