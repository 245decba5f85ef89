//! Which bytes of which target the host tier holds: its slots, indexed by target and offset,
//! in the order they were written. Pure bookkeeping: no memory is touched here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::backend::TargetId;
use crate::device::Event;
use crate::extents::Extent;

/// Where a slot's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// The device is copying the bytes into the arena.
    Copying,
    /// In the arena only.
    Dirty,
    /// In the arena, being written to storage.
    Spilling,
    /// In the arena and on storage: may be dropped from the arena at any time.
    Clean,
}

/// The bytes of one write, held in the arena.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) target: TargetId,
    /// Where the write went on the target.
    pub(crate) offset: u64,
    /// The write's length.
    pub(crate) len: u64,
    /// Bytes of the target this slot answers reads for: `len` rounded up to the tier's
    /// alignment (the rest is padding, which no other write starts inside).
    pub(crate) cover: u64,
    /// Where the bytes are in the arena.
    pub(crate) arena: Extent,
    pub(crate) state: SlotState,
    /// Device copies and storage writes using the arena bytes now: the arena space is
    /// reused only once none is.
    pub(crate) busy: u32,
    /// Overwritten or discarded: no longer answers reads; its arena space goes when it is
    /// no longer busy.
    pub(crate) dead: bool,
    /// While `Copying`: completes once the bytes are in the arena.
    pub(crate) copied: Option<Arc<dyn Event>>,
}

impl Slot {
    pub(crate) fn end(&self) -> u64 {
        self.offset + self.cover
    }
}

/// The slots, live and dead-but-busy.
#[derive(Debug, Default)]
pub(crate) struct SlotIndex {
    slots: HashMap<u64, Slot>,
    /// Live slots by target, then by offset.
    live: HashMap<TargetId, BTreeMap<u64, u64>>,
    /// Slot ids in the order written (dead ones are skipped when met).
    order: VecDeque<u64>,
    next_id: u64,
}

impl SlotIndex {
    pub(crate) fn get(&self, id: u64) -> Option<&Slot> {
        self.slots.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut Slot> {
        self.slots.get_mut(&id)
    }

    /// Adds a live slot; its range must not overlap another live slot's (kill those first).
    pub(crate) fn insert(&mut self, slot: Slot) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.live.entry(slot.target).or_default().insert(slot.offset, id);
        self.order.push_back(id);
        self.slots.insert(id, slot);
        id
    }

    /// Live slots whose cover meets `[start, end)` on `target`, by offset.
    pub(crate) fn overlapping(&self, target: TargetId, start: u64, end: u64) -> Vec<u64> {
        let Some(map) = self.live.get(&target) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // The slot starting at or before `start` may reach into the range.
        if let Some((_, &id)) = map.range(..=start).next_back() {
            if self.slots[&id].end() > start {
                out.push(id);
            }
        }
        for (_, &id) in map.range(start.saturating_add(1)..end) {
            out.push(id);
        }
        out
    }

    /// Live slots of `target`.
    pub(crate) fn of_target(&self, target: TargetId) -> Vec<u64> {
        self.live
            .get(&target)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }

    /// Takes a live slot out of the index. Returns the slot when it is not busy (the caller
    /// frees its arena space); a busy one stays, dead, until [`SlotIndex::unbusy`].
    pub(crate) fn kill(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.get_mut(&id)?;
        if !slot.dead {
            slot.dead = true;
            if let Some(map) = self.live.get_mut(&slot.target) {
                map.remove(&slot.offset);
                if map.is_empty() {
                    self.live.remove(&slot.target);
                }
            }
        }
        if slot.busy == 0 {
            return self.slots.remove(&id);
        }
        None
    }

    /// One use of the slot's arena bytes ended. Returns the slot when it is dead and no
    /// longer busy (the caller frees its arena space).
    pub(crate) fn unbusy(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.get_mut(&id)?;
        slot.busy = slot.busy.saturating_sub(1);
        if slot.dead && slot.busy == 0 {
            return self.slots.remove(&id);
        }
        None
    }

    /// Live slots in the order written, oldest first, that `pick` accepts, up to `limit`.
    pub(crate) fn oldest(&mut self, limit: usize, mut pick: impl FnMut(&Slot) -> bool) -> Vec<u64> {
        // Drop ids of slots gone from the front, so the queue does not grow without bound.
        while let Some(&id) = self.order.front() {
            if self.slots.get(&id).is_some_and(|s| !s.dead) {
                break;
            }
            self.order.pop_front();
        }
        let mut out = Vec::new();
        for &id in &self.order {
            if out.len() >= limit {
                break;
            }
            if let Some(s) = self.slots.get(&id) {
                if !s.dead && pick(s) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// True when a dead slot still being written to storage overlaps `[start, end)` on
    /// `target`: a newer write of those bytes must not reach storage before it.
    pub(crate) fn dead_spill_overlaps(&self, target: TargetId, start: u64, end: u64) -> bool {
        self.slots.values().any(|s| {
            s.dead
                && s.state == SlotState::Spilling
                && s.target == target
                && s.offset < end
                && s.end() > start
        })
    }

    /// True while any slot of `target`, live or dead, is held.
    pub(crate) fn has_target(&self, target: TargetId) -> bool {
        self.slots.values().any(|s| s.target == target)
    }

    /// Number of slots held (live and dead).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(offset: u64, len: u64, cover: u64) -> Slot {
        Slot {
            target: TargetId(1),
            offset,
            len,
            cover,
            arena: Extent {
                target: TargetId(0),
                offset: 0,
                len: cover,
            },
            state: SlotState::Dirty,
            busy: 0,
            dead: false,
            copied: None,
        }
    }

    #[test]
    fn overlapping_finds_the_slot_reaching_into_the_range_and_those_inside() {
        let mut ix = SlotIndex::default();
        let a = ix.insert(slot(0, 100, 4096));
        let b = ix.insert(slot(4096, 8192, 8192));
        let c = ix.insert(slot(16384, 10, 4096));
        assert_eq!(ix.overlapping(TargetId(1), 50, 60), vec![a]);
        assert_eq!(ix.overlapping(TargetId(1), 4000, 4097), vec![a, b]);
        assert_eq!(ix.overlapping(TargetId(1), 12288, 16384), Vec::<u64>::new());
        assert_eq!(ix.overlapping(TargetId(1), 0, 1 << 20), vec![a, b, c]);
        assert!(ix.overlapping(TargetId(2), 0, 1 << 20).is_empty());
    }

    #[test]
    fn a_busy_slot_killed_stays_until_its_last_use_ends() {
        let mut ix = SlotIndex::default();
        let a = ix.insert(slot(0, 100, 4096));
        ix.get_mut(a).unwrap().busy = 2;
        assert!(ix.kill(a).is_none());
        assert!(
            ix.overlapping(TargetId(1), 0, 10).is_empty(),
            "dead slots answer no reads"
        );
        assert!(ix.unbusy(a).is_none());
        assert!(ix.unbusy(a).is_some());
        assert_eq!(ix.len(), 0);
    }

    #[test]
    fn oldest_skips_dead_slots_and_keeps_write_order() {
        let mut ix = SlotIndex::default();
        let a = ix.insert(slot(0, 1, 4096));
        let b = ix.insert(slot(4096, 1, 4096));
        let c = ix.insert(slot(8192, 1, 4096));
        ix.kill(a);
        assert_eq!(ix.oldest(8, |_| true), vec![b, c]);
        assert_eq!(ix.oldest(1, |_| true), vec![b]);
        ix.get_mut(b).unwrap().state = SlotState::Clean;
        assert_eq!(ix.oldest(8, |s| s.state == SlotState::Dirty), vec![c]);
    }

    #[test]
    fn a_dead_slot_being_spilled_holds_back_newer_writes_of_its_bytes() {
        let mut ix = SlotIndex::default();
        let a = ix.insert(slot(0, 100, 4096));
        {
            let s = ix.get_mut(a).unwrap();
            s.state = SlotState::Spilling;
            s.busy = 1;
        }
        assert!(
            !ix.dead_spill_overlaps(TargetId(1), 0, 4096),
            "a live spill is no obstacle"
        );
        ix.kill(a);
        assert!(ix.dead_spill_overlaps(TargetId(1), 0, 4096));
        assert!(!ix.dead_spill_overlaps(TargetId(1), 4096, 8192));
        ix.unbusy(a);
        assert!(!ix.dead_spill_overlaps(TargetId(1), 0, 4096));
    }
}
