//! [`Tensors`]: the table of offloaded tensors ("entries", one per key) and the handles
//! that name them.
//!
//! Invariants:
//! - Every handle names a live entry. An entry's `handles` counts the handles naming it
//!   and `unfetched` those of them not fetched yet; both change only here
//!   ([`Tensors::add_handle`], [`Tensors::mark_fetched`], [`Tensors::remove_handle`]).
//! - An entry with no handle left stays only while its group's write is under way (the
//!   write reads its memory; the write's end forgets it).
//! - With dedup on, `by_key` names, for a key, the entry with that key that handles still
//!   name; a key leaves it with its entry's last handle.
//! - Once an entry's `source_held` is false it stays false: the engine never reads the
//!   tensor's own memory again, and its `callbacks` are empty (handed to
//!   [`Callbacks`](super::callbacks::Callbacks)).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::checksum::Sums;
use crate::device::Event;
use crate::error::{Error, Result};

use super::callbacks::SourceFreeFn;
use super::keys::{Handle, TensorKey};
use super::layout::{self, Region, Segment};

/// One offload's claim on an entry.
pub(crate) struct HandleRec {
    pub(crate) entry: u64,
    pub(crate) fetched: bool,
    /// The load of its group its prefetch request is attached to (0: none).
    pub(crate) attached_load: u64,
    /// When it was last fetched (a [`Reads`](super::reads::Reads) sequence number):
    /// prefetch requests made before that were overtaken and are dropped.
    pub(crate) fetched_at: u64,
    /// The slot read ahead for its lone prefetch request (0: none), until it is fetched or
    /// released.
    pub(crate) slot: u64,
}

/// One stored tensor (one key), shared by its handles.
pub(crate) struct Entry {
    pub(crate) key: TensorKey,
    pub(crate) len: u64,
    /// The tensor's own memory, read until the write is done.
    pub(crate) regions: Vec<Region>,
    /// The producer's event: the memory is ready once it completes.
    pub(crate) ready: Option<Arc<dyn Event>>,
    /// Live handles.
    pub(crate) handles: usize,
    /// Live handles not yet fetched.
    pub(crate) unfetched: usize,
    /// The group it is written in; `None` when kept resident (no storage copy).
    pub(crate) group: Option<u64>,
    /// Where its bytes are inside the group's extent (set when the group is laid out).
    pub(crate) segments: Vec<Segment>,
    /// Whether the engine may still read `regions`.
    pub(crate) source_held: bool,
    /// The last engine copy out of `regions` (a forwarded fetch). Kept after the source is
    /// let go, until it completes: the memory is free only then.
    pub(crate) source_fence: Option<Arc<dyn Event>>,
    pub(crate) callbacks: Vec<SourceFreeFn>,
    pub(crate) offloaded_at: Instant,
    /// The checksums of its bytes, once its write has been prepared (`checksums` on).
    pub(crate) sums: Option<Sums>,
}

impl Entry {
    /// A tensor of `key` in `regions` (empty ones left out), ready once `ready` completes,
    /// with no handle yet and in no group.
    pub(crate) fn new(
        key: TensorKey,
        regions: &[Region],
        ready: Option<Arc<dyn Event>>,
        now: Instant,
    ) -> Self {
        let len = layout::total_len(regions);
        Entry {
            key,
            len,
            regions: regions.iter().copied().filter(|r| r.len > 0).collect(),
            ready,
            handles: 0,
            unfetched: 0,
            group: None,
            segments: Vec::new(),
            source_held: len > 0,
            source_fence: None,
            callbacks: Vec::new(),
            offloaded_at: now,
            sums: None,
        }
    }

    /// Bytes the tensor takes in an extent, laid out on its own with `alignment`.
    pub(crate) fn planned(&self, alignment: u64) -> u64 {
        layout::place(&self.regions, 0, alignment).1
    }

    /// The engine no longer reads the tensor's own memory: returns its callbacks, and the
    /// copy out of it that may still be running (they are due once that completes).
    pub(crate) fn let_go(&mut self) -> (Vec<SourceFreeFn>, Option<Arc<dyn Event>>) {
        self.source_held = false;
        self.ready = None;
        (std::mem::take(&mut self.callbacks), self.source_fence.clone())
    }

    /// "a 1048576-byte tensor (storage 7, version 0)".
    pub(crate) fn describe(&self) -> String {
        format!(
            "a {}-byte tensor (storage {}, version {})",
            self.len, self.key.storage, self.key.version
        )
    }
}

/// The entries and the handles naming them.
#[derive(Default)]
pub(crate) struct Tensors {
    pub(crate) entries: HashMap<u64, Entry>,
    handles: HashMap<u64, HandleRec>,
    by_key: HashMap<TensorKey, u64>,
}

impl Tensors {
    /// The entry a handle names.
    pub(crate) fn entry_of(&self, h: Handle) -> Result<u64> {
        self.handles.get(&h.0).map(|r| r.entry).ok_or_else(|| unknown(h))
    }

    /// The entry a handle names, itself.
    pub(crate) fn entry_by_handle(&self, h: Handle) -> Result<&Entry> {
        Ok(&self.entries[&self.entry_of(h)?])
    }

    /// A live handle's record.
    pub(crate) fn handle(&self, h: u64) -> Option<&HandleRec> {
        self.handles.get(&h)
    }

    /// A live handle's record, to change.
    pub(crate) fn handle_mut(&mut self, h: u64) -> Option<&mut HandleRec> {
        self.handles.get_mut(&h)
    }

    /// Live handles.
    pub(crate) fn live_handles(&self) -> usize {
        self.handles.len()
    }

    /// The entry already holding `key` (with dedup on), if any, when it holds the same
    /// memory; an error when it holds other memory.
    pub(crate) fn find_same(&self, key: TensorKey, regions: &[Region]) -> Result<Option<u64>> {
        let Some(&eid) = self.by_key.get(&key) else {
            return Ok(None);
        };
        let e = &self.entries[&eid];
        let len = layout::total_len(regions);
        let same = e.len == len
            && e.regions
                .iter()
                .copied()
                .eq(regions.iter().copied().filter(|r| r.len > 0));
        if !same {
            return Err(Error::invalid(format!(
                "storage {} version {} was offloaded before with other memory ({} bytes in {} regions, now {len} \
                 bytes in {}): offload a storage whole under its key, and give it a new version when its \
                 contents change",
                key.storage,
                key.version,
                e.len,
                e.regions.len(),
                regions.len()
            )));
        }
        Ok(Some(eid))
    }

    /// Adds a new entry, found by its key from now on when `dedup` is on.
    pub(crate) fn insert(&mut self, eid: u64, entry: Entry, dedup: bool) {
        let key = entry.key;
        self.entries.insert(eid, entry);
        if dedup {
            self.by_key.insert(key, eid);
        }
    }

    /// Adds handle `h` naming entry `eid`.
    pub(crate) fn add_handle(&mut self, h: u64, eid: u64) -> Handle {
        let e = self.entries.get_mut(&eid).expect("handles name live entries");
        e.handles += 1;
        e.unfetched += 1;
        self.handles.insert(
            h,
            HandleRec {
                entry: eid,
                fetched: false,
                attached_load: 0,
                fetched_at: 0,
                slot: 0,
            },
        );
        Handle(h)
    }

    /// Marks the handle fetched, at `at` (a [`Reads`](super::reads::Reads) sequence
    /// number): its prefetch requests made before are overtaken.
    pub(crate) fn mark_fetched(&mut self, h: Handle, at: u64) {
        let Some(rec) = self.handles.get_mut(&h.0) else {
            return;
        };
        rec.fetched_at = at;
        if !rec.fetched {
            rec.fetched = true;
            self.entries
                .get_mut(&rec.entry)
                .expect("handles name live entries")
                .unfetched -= 1;
        }
    }

    /// Drops a handle. Returns its entry when that was its last handle (the entry stays,
    /// no longer found by its key).
    pub(crate) fn remove_handle(&mut self, h: Handle) -> Result<Option<u64>> {
        let rec = self.handles.remove(&h.0).ok_or_else(|| unknown(h))?;
        let e = self
            .entries
            .get_mut(&rec.entry)
            .expect("handles name live entries");
        e.handles -= 1;
        if !rec.fetched {
            e.unfetched -= 1;
        }
        if e.handles > 0 {
            return Ok(None);
        }
        let key = e.key;
        if self.by_key.get(&key) == Some(&rec.entry) {
            self.by_key.remove(&key);
        }
        Ok(Some(rec.entry))
    }

    /// Every callback still waiting on a held source, taken: the engine is going away.
    pub(crate) fn take_callbacks(&mut self) -> Vec<SourceFreeFn> {
        let mut all = Vec::new();
        for e in self.entries.values_mut() {
            all.extend(std::mem::take(&mut e.callbacks));
        }
        all
    }

    /// True when, among the entries of `members` (a group's, in order) still waiting to be
    /// fetched, with `eid` itself counted, `eid` is the first or the last.
    pub(crate) fn first_or_last_waiting(&self, members: &[u64], eid: u64) -> bool {
        let mut waiting = members
            .iter()
            .filter(|&&e| e == eid || self.entries.get(&e).is_some_and(|e| e.unfetched > 0));
        waiting.next() == Some(&eid) || waiting.next_back() == Some(&eid)
    }
}

fn unknown(h: Handle) -> Error {
    Error::invalid(format!(
        "unknown handle {}: it was never returned by this engine's offload, or it was already released",
        h.0
    ))
}
