//! [`Reads`]: reading back — the prefetch queue, the extents loaded into staging, and the
//! reads in flight.
//!
//! Invariants:
//! - `queue` holds the prefetch requests not yet served, in the order made; `seq` orders
//!   them against fetches: a request made before its handle's last fetch
//!   ([`HandleRec::fetched_at`](super::tensors::HandleRec::fetched_at)) was overtaken.
//! - `held` is the bytes of the groups loading or loaded, within
//!   [`EngineConfig::prefetch_bytes`](super::EngineConfig::prefetch_bytes);
//!   `loads_inflight` counts those loading, and `loaded` lists those loaded, oldest first
//!   (the order in which a write may evict them).
//! - `demand_inflight` counts the fetches whose reads straight from storage are in flight
//!   (submitted under the lock, waited for outside it).

use std::collections::VecDeque;

/// One `prefetch` call, waiting in the prefetch queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrefetchRequest {
    pub(crate) handle: u64,
    pub(crate) group: u64,
    /// When it was made (a [`Reads`] sequence number).
    pub(crate) at: u64,
}

/// The prefetch queue, the loaded extents and the reads in flight.
#[derive(Default)]
pub(crate) struct Reads {
    /// Prefetch requests waiting to be served, in the order made.
    pub(crate) queue: VecDeque<PrefetchRequest>,
    /// Orders prefetch requests against fetches.
    seq: u64,
    /// Loaded groups, oldest first (eviction order).
    loaded: VecDeque<u64>,
    /// Bytes of staging held by loads.
    held: u64,
    loads_inflight: usize,
    demand_inflight: usize,
}

impl Reads {
    /// True when no read is in flight.
    pub(crate) fn idle(&self) -> bool {
        self.loads_inflight == 0 && self.demand_inflight == 0
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
            self.loaded.push_back(gid);
        } else {
            self.held -= len;
        }
    }

    /// The loaded copy of `gid` (`len` bytes) was dropped.
    pub(crate) fn unloaded(&mut self, gid: u64, len: u64) {
        self.held -= len;
        self.loaded.retain(|&x| x != gid);
    }

    /// The group loaded longest ago, if any: the first a write evicts.
    pub(crate) fn oldest_loaded(&self) -> Option<u64> {
        self.loaded.front().copied()
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
