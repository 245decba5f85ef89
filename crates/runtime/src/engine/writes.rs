//! [`Writes`]: the write pipeline — the packed group taking tensors, the queue of groups
//! sealed for writing, and the writes under way.
//!
//! Invariants:
//! - `open` names the one group in [`WriteState::Open`](super::groups::WriteState::Open),
//!   if any; `last_offload` is when a tensor last joined a group (the open one is sealed
//!   after `pack_flush_delay` without one).
//! - `queue` holds, in the order sealed, every group in
//!   [`WriteState::Queued`](super::groups::WriteState::Queued); it may also name groups
//!   since emptied or dropped, which go when they reach its head.
//! - `inflight` counts the groups between extent allocation and the end of their write
//!   (`Preparing`, `Writing`), and `direct` the bytes of those among them written straight
//!   from the tensors' memory; a direct write starts only within
//!   [`EngineConfig::direct_write_bytes`](super::EngineConfig::direct_write_bytes), unless
//!   none is under way.
//! - `staging_wait_since` is set while the head of the queue waits for staging memory.
//! - `device_full` says the last write to end failed with ENOSPC: the warning is given
//!   once per episode of a full device.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The write pipeline's queue and what it has under way.
pub(crate) struct Writes {
    /// The packed group taking tensors.
    pub(crate) open: Option<u64>,
    last_offload: Instant,
    /// Groups sealed, waiting for staging memory or write bandwidth.
    pub(crate) queue: VecDeque<u64>,
    /// Groups between allocation and write completion.
    inflight: usize,
    /// Bytes of the direct writes among them.
    direct: u64,
    /// When packing started waiting for staging memory.
    staging_wait_since: Option<Instant>,
    /// The last write to end failed with ENOSPC (the warning is given once).
    device_full: bool,
}

impl Writes {
    /// Nothing queued or under way.
    pub(crate) fn new() -> Self {
        Writes {
            open: None,
            last_offload: Instant::now(),
            queue: VecDeque::new(),
            inflight: 0,
            direct: 0,
            staging_wait_since: None,
            device_full: false,
        }
    }

    /// True when no group takes tensors, none is queued and no write is under way.
    pub(crate) fn idle(&self) -> bool {
        self.open.is_none() && self.queue.is_empty() && self.inflight == 0
    }

    /// A tensor joined a group now.
    pub(crate) fn offloaded(&mut self, now: Instant) {
        self.last_offload = now;
    }

    /// True when a group is open and no tensor joined it for `delay`.
    pub(crate) fn flush_due(&self, delay: Duration) -> bool {
        self.open.is_some() && self.last_offload.elapsed() >= delay
    }

    /// True when a direct write of `len` bytes must wait for those under way (beyond
    /// `limit` bytes in flight).
    pub(crate) fn direct_over(&self, len: u64, limit: u64) -> bool {
        self.direct > 0 && self.direct + len > limit
    }

    /// The head of the queue waits for staging memory (from now, if not already).
    pub(crate) fn wait_for_staging(&mut self) {
        self.staging_wait_since.get_or_insert_with(Instant::now);
    }

    /// The wait for staging memory is over: since when it lasted, if there was one.
    pub(crate) fn staging_waited(&mut self) -> Option<Instant> {
        self.staging_wait_since.take()
    }

    /// A group's write starts (`direct`: `len` bytes from the tensors' own memory).
    pub(crate) fn started(&mut self, direct: bool, len: u64) {
        self.inflight += 1;
        if direct {
            self.direct += len;
        }
    }

    /// A group's write has ended (as started).
    pub(crate) fn ended(&mut self, direct: bool, len: u64) {
        self.inflight -= 1;
        if direct {
            self.direct -= len;
        }
    }

    /// A write failed with ENOSPC: true when the device was already known to be full.
    pub(crate) fn device_full_again(&mut self) -> bool {
        std::mem::replace(&mut self.device_full, true)
    }

    /// A write reached storage: the device is not full.
    pub(crate) fn device_has_room(&mut self) {
        self.device_full = false;
    }
}
