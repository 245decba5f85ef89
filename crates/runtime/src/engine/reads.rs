//! [`Reads`]: reading back — the prefetch queue, the extents loaded into staging, the
//! slots (one tensor's bytes read ahead for a lone request), and the reads in flight.
//!
//! Invariants:
//! - `queue` holds the prefetch requests not yet served, in the order made; `seq` orders
//!   them against fetches: a request made before its handle's last fetch
//!   ([`HandleRec::fetched_at`](super::tensors::HandleRec::fetched_at)) was overtaken.
//! - `held` is the bytes of the groups loading or loaded plus those of the slots, within
//!   [`EngineConfig::prefetch_bytes`](super::EngineConfig::prefetch_bytes);
//!   `loads_inflight` counts the groups loading, and `loaded` lists the groups and slots
//!   loaded, oldest first (the order in which a write may evict them).
//! - `slots` holds every slot whose staging is allocated, by id. A slot belongs to one
//!   handle, which names it in
//!   [`HandleRec::slot`](super::tensors::HandleRec::slot), until that handle is fetched or
//!   released: the handle keeps its entry, and so its group's extent, alive. A slot whose
//!   handle let go of it while its read was in flight is `orphaned`: it stays (with its
//!   staging) until the read settles, then goes. `slots_inflight` counts the slots
//!   `Loading`, orphaned or not; each also counts in its group's
//!   [`Group::slot_reads`](super::groups::Group::slot_reads).
//! - `demand_inflight` counts the fetches whose reads straight from storage are in flight
//!   (submitted under the lock, waited for outside it).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::device::Event;
use crate::extents::Extent;

use super::pending::PendingIo;
use super::verify::PendingSums;

/// One `prefetch` call, waiting in the prefetch queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrefetchRequest {
    pub(crate) handle: u64,
    pub(crate) group: u64,
    /// When it was made (a [`Reads`] sequence number).
    pub(crate) at: u64,
}

/// Something read ahead into staging and loaded there, which a write may evict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// A group's whole extent.
    Group(u64),
    /// A slot, by id.
    Slot(u64),
}

/// Read-ahead progress of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// Its read (or the check of its bytes) is in flight.
    Loading,
    /// Its bytes are in staging, waiting for the handle's fetch.
    Loaded,
}

/// A lone prefetch request served by reading ahead only its tensor's bytes: the aligned
/// range of the group's extent that covers the tensor's segments.
pub(crate) struct Slot {
    /// The handle it was read for.
    pub(crate) handle: u64,
    pub(crate) entry: u64,
    pub(crate) group: u64,
    /// Where the range starts in the group's extent (aligned).
    pub(crate) start: u64,
    /// Bytes of the range (aligned), counted in `held`.
    pub(crate) len: u64,
    /// Where the range lies in staging.
    pub(crate) staging: Extent,
    pub(crate) state: SlotState,
    /// Its read while it is in flight.
    pub(crate) ios: Vec<PendingIo>,
    pub(crate) started: Instant,
    /// Checksums of its bytes being computed (`checksums` on) before it counts as loaded.
    pub(crate) checksums: Option<PendingSums>,
    /// Its handle no longer wants it (fetched or released while it was loading): it goes
    /// once its read settles.
    pub(crate) orphaned: bool,
    /// The copy out of it to the fetch's destination, once made: its staging is free only
    /// once that completes.
    pub(crate) fence: Option<Arc<dyn Event>>,
}

/// The prefetch queue, the loaded extents and slots, and the reads in flight.
#[derive(Default)]
pub(crate) struct Reads {
    /// Prefetch requests waiting to be served, in the order made.
    pub(crate) queue: VecDeque<PrefetchRequest>,
    /// Orders prefetch requests against fetches.
    seq: u64,
    /// Loaded groups and slots, oldest first (eviction order).
    loaded: VecDeque<Held>,
    /// Bytes of staging held by loads and slots.
    held: u64,
    loads_inflight: usize,
    /// Slots with staging, by id.
    pub(crate) slots: HashMap<u64, Slot>,
    slots_inflight: usize,
    demand_inflight: usize,
}

impl Reads {
    /// True when no read is in flight.
    pub(crate) fn idle(&self) -> bool {
        self.loads_inflight == 0 && self.slots_inflight == 0 && self.demand_inflight == 0
    }

    /// Queues a prefetch request of handle `h` for group `gid`.
    pub(crate) fn request(&mut self, h: u64, gid: u64) {
        self.seq += 1;
        self.queue.push_back(PrefetchRequest {
            handle: h,
            group: gid,
            at: self.seq,
        });
    }

    /// A fetch happens now: its sequence number (the requests made before are overtaken).
    pub(crate) fn fetched(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// True when a load of `len` more bytes stays within `budget`.
    pub(crate) fn fits(&self, len: u64, budget: u64) -> bool {
        self.held + len <= budget
    }

    /// A load of `len` bytes was started.
    pub(crate) fn load_started(&mut self, len: u64) {
        self.held += len;
        self.loads_inflight += 1;
    }

    /// The load of `gid` (`len` bytes) has ended: loaded when `ok`, and otherwise given up
    /// (its bytes no longer held).
    pub(crate) fn load_ended(&mut self, gid: u64, len: u64, ok: bool) {
        self.loads_inflight -= 1;
        if ok {
            self.loaded.push_back(Held::Group(gid));
        } else {
            self.held -= len;
        }
    }

    /// The loaded copy of `gid` (`len` bytes) was dropped.
    pub(crate) fn unloaded(&mut self, gid: u64, len: u64) {
        self.held -= len;
        self.loaded.retain(|&x| x != Held::Group(gid));
    }

    /// The group or slot loaded longest ago, if any: the first a write evicts.
    pub(crate) fn oldest_loaded(&self) -> Option<Held> {
        self.loaded.front().copied()
    }

    /// The read of slot `sid` was submitted: its bytes are held from now on.
    pub(crate) fn slot_started(&mut self, sid: u64, slot: Slot) {
        self.held += slot.len;
        self.slots_inflight += 1;
        self.slots.insert(sid, slot);
    }

    /// The read of slot `sid` has settled (and its bytes were checked): loaded when `ok`
    /// and still wanted, and otherwise taken out (its bytes no longer held) and returned,
    /// for its staging to be freed.
    pub(crate) fn slot_ended(&mut self, sid: u64, ok: bool) -> Option<Slot> {
        self.slots_inflight -= 1;
        let slot = self.slots.get_mut(&sid).expect("a slot loading is kept");
        if ok && !slot.orphaned {
            slot.state = SlotState::Loaded;
            self.loaded.push_back(Held::Slot(sid));
            return None;
        }
        let slot = self.slots.remove(&sid).expect("just found");
        self.held -= slot.len;
        Some(slot)
    }

    /// Slot `sid`'s handle no longer wants it. A loaded slot is taken out (its bytes no
    /// longer held) and returned, for its staging to be freed; one still loading is
    /// orphaned, and goes when its read settles.
    pub(crate) fn slot_dropped(&mut self, sid: u64) -> Option<Slot> {
        let slot = self.slots.get_mut(&sid)?;
        if slot.state == SlotState::Loading {
            slot.orphaned = true;
            return None;
        }
        let slot = self.slots.remove(&sid).expect("just found");
        self.held -= slot.len;
        self.loaded.retain(|&x| x != Held::Slot(sid));
        Some(slot)
    }

    /// A fetch's reads straight from storage were submitted.
    pub(crate) fn demand_started(&mut self) {
        self.demand_inflight += 1;
    }

    /// A fetch's reads straight from storage have settled.
    pub(crate) fn demand_ended(&mut self) {
        self.demand_inflight -= 1;
    }
}
