//! [`Group`]: one extent on storage and the tensors written in it, with the progress of
//! its write ([`WriteState`]) and of its read-ahead ([`LoadState`]).
//!
//! Invariants of a group:
//! - `entries` lists its tensors in the order they were laid out; each names the group as
//!   its `group`. Until the write starts (`Open`, `Queued`) tensors may leave it, and
//!   `planned` is the bytes of those left, each aligned on its own.
//! - From `Preparing` on it owns its `extent` of storage (until it is freed or given up
//!   on), `len` is the bytes laid out in it and `live` counts its tensors that handles
//!   still name. `write_staging` is its staging memory while a packed write is prepared or
//!   under way, and `None` otherwise.
//! - It is loaded (`Loading`, `Loaded`) only once its write is `Done`; the load owns the
//!   staging extent it names. `pending` counts the handles attached to the current load
//!   (`load_epoch`), and `fence` is the last delivery out of the loaded copy.
//! - `ios` holds its storage requests in flight: its writes while `Writing`, the read of
//!   its load while `Loading`; nothing otherwise.
//! - `slot_reads` counts the slot reads in flight on its extent
//!   ([`Reads`](super::reads::Reads)); like a load, they keep the group (and so its extent)
//!   from being freed until they settle.

use std::sync::Arc;
use std::time::Instant;

use crate::device::Event;
use crate::error::Error;
use crate::extents::Extent;

use super::pending::PendingIo;
use super::verify::PendingSums;

/// Write progress of a group.
#[derive(Debug)]
pub(crate) enum WriteState {
    /// Packed group still taking tensors.
    Open,
    /// Sealed, waiting for staging memory or write bandwidth.
    Queued,
    /// Extent allocated; the offload stream is packing it / waiting for its producers.
    Preparing,
    /// Writes submitted.
    Writing,
    /// On storage.
    Done,
}

/// Read-ahead progress of a group.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LoadState {
    Idle,
    /// Being read into `staging`.
    Loading(Extent),
    /// In `staging`, waiting for its tensors to be fetched.
    Loaded(Extent),
}

/// One extent on storage and the tensors in it.
pub(crate) struct Group {
    /// Written from staging after a pack; otherwise straight from the tensor's memory.
    pub(crate) staged: bool,
    pub(crate) entries: Vec<u64>,
    /// Bytes the group takes if laid out now.
    pub(crate) planned: u64,
    pub(crate) write: WriteState,
    /// Staging used by the write.
    pub(crate) write_staging: Option<Extent>,
    pub(crate) extent: Option<Extent>,
    pub(crate) len: u64,
    /// Entries with live handles (counted from layout on).
    pub(crate) live: usize,
    pub(crate) load: LoadState,
    /// Prefetch requests attached to the current load and not yet fetched: the loaded
    /// copy goes when they are all served (or released).
    pub(crate) pending: usize,
    /// Identifies the current load (unique per load), for
    /// [`HandleRec::attached_load`](super::tensors::HandleRec::attached_load).
    pub(crate) load_epoch: u64,
    /// The group's storage requests in flight: its writes, or the read of its load.
    pub(crate) ios: Vec<PendingIo>,
    /// Slot reads in flight on its extent.
    pub(crate) slot_reads: usize,
    /// The first failure among the group's writes (a submission, or a completion while
    /// others were in flight): acted on once none is in flight any more.
    pub(crate) io_error: Option<Error>,
    pub(crate) io_started: Instant,
    /// The last delivery out of the loaded staging copy.
    pub(crate) fence: Option<Arc<dyn Event>>,
    /// Checksums being computed: of the tensors' memory while the write is prepared, or of
    /// the loaded bytes before the load counts as done.
    pub(crate) checksums: Option<PendingSums>,
}

impl Group {
    pub(crate) fn new(staged: bool, write: WriteState) -> Self {
        Group {
            staged,
            entries: Vec::new(),
            planned: 0,
            write,
            write_staging: None,
            extent: None,
            len: 0,
            live: 0,
            load: LoadState::Idle,
            pending: 0,
            load_epoch: 0,
            ios: Vec::new(),
            slot_reads: 0,
            io_error: None,
            io_started: Instant::now(),
            fence: None,
            checksums: None,
        }
    }

    /// True while the write has not been started (and so can still be dropped).
    pub(crate) fn write_pending(&self) -> bool {
        matches!(self.write, WriteState::Open | WriteState::Queued)
    }

    /// Adds a tensor taking `planned` bytes.
    pub(crate) fn add(&mut self, eid: u64, planned: u64) {
        self.entries.push(eid);
        self.planned += planned;
    }

    /// Takes out a tensor taking `planned` bytes, before the write has started.
    pub(crate) fn remove(&mut self, eid: u64, planned: u64) {
        self.entries.retain(|&x| x != eid);
        self.planned -= planned;
    }
}
