//! The targets a backend has open, and the requests still pending on each (what `flush`
//! and `close` wait for).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use spillway_runtime::{Error, Result, TargetId};

use crate::block_locks::FileIdentity;

/// An open target as the workers see it.
#[derive(Debug)]
pub struct OpenFile {
    /// The id handed to the caller.
    pub id: TargetId,
    /// The file (with O_DIRECT when `direct_io`).
    pub file: File,
    /// Its path, for error messages.
    pub path: PathBuf,
    /// Whether O_DIRECT is in effect.
    pub direct_io: bool,
    /// Alignment of offsets and lengths for direct I/O (1 for buffered I/O).
    pub offset_align: usize,
    /// Alignment of memory addresses for direct I/O (1 for buffered I/O).
    pub mem_align: usize,
    /// The file itself, whose blocks read-modify-writes lock (shared by every target that
    /// opened it).
    pub identity: FileIdentity,
    /// The requests submitted and not yet completed.
    pub pending: Arc<PendingRequests>,
}

/// Requests in progress on one target, by submission number, so that `flush` can wait for
/// exactly those submitted before it (later ones cannot starve it).
#[derive(Debug, Default)]
pub struct PendingRequests {
    state: Mutex<PendingState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct PendingState {
    next: u64,
    pending: BTreeSet<u64>,
}

impl PendingRequests {
    /// Registers a new request; it stays pending until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> PendingGuard {
        let mut state = self.lock();
        let number = state.next;
        state.next += 1;
        state.pending.insert(number);
        PendingGuard {
            requests: self.clone(),
            number,
        }
    }

    /// Blocks until every request submitted before this call has completed.
    pub fn wait_for_earlier(&self) {
        self.wait_before(self.next_number());
    }

    /// The number the next request will get.
    fn next_number(&self) -> u64 {
        self.lock().next
    }

    /// Blocks until every request numbered below `limit` has completed.
    fn wait_before(&self, limit: u64) {
        let mut state = self.lock();
        while state.pending.first().is_some_and(|&first| first < limit) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until no request is pending.
    pub fn wait_for_all(&self) {
        let mut state = self.lock();
        while !state.pending.is_empty() {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn finish(&self, number: u64) {
        self.lock().pending.remove(&number);
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Marks one request as pending until dropped.
#[derive(Debug)]
pub struct PendingGuard {
    requests: Arc<PendingRequests>,
    number: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.requests.finish(self.number);
    }
}

/// The open targets of a backend.
#[derive(Debug, Default)]
pub struct TargetTable {
    inner: Mutex<TableState>,
}

#[derive(Debug, Default)]
struct TableState {
    next_id: u32,
    open: HashMap<TargetId, Arc<OpenFile>>,
}

impl TargetTable {
    /// Adds a target, building it with the id it gets.
    pub fn insert(&self, build: impl FnOnce(TargetId) -> OpenFile) -> Arc<OpenFile> {
        let mut table = self.lock();
        let id = TargetId(table.next_id);
        table.next_id += 1;
        let file = Arc::new(build(id));
        table.open.insert(id, file.clone());
        file
    }

    /// The open target `id`.
    pub fn get(&self, id: TargetId) -> Result<Arc<OpenFile>> {
        self.lock().open.get(&id).cloned().ok_or_else(|| unknown(id))
    }

    /// Removes target `id`; new requests to it fail from now on.
    pub fn remove(&self, id: TargetId) -> Result<Arc<OpenFile>> {
        self.lock().open.remove(&id).ok_or_else(|| unknown(id))
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn unknown(id: TargetId) -> Error {
    Error::invalid(format!(
        "target {} is not open on the io_uring backend (never opened, or already closed)",
        id.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn flush_waits_only_for_earlier_requests() {
        let pending = Arc::new(PendingRequests::default());
        let first = pending.begin();
        let limit = pending.next_number();
        let waiter = {
            let pending = pending.clone();
            std::thread::spawn(move || pending.wait_before(limit))
        };
        std::thread::sleep(Duration::from_millis(20));
        // A later request does not hold the waiter back...
        let _later = pending.begin();
        assert!(!waiter.is_finished());
        // ...but the earlier one does, until it completes.
        drop(first);
        waiter.join().unwrap();
    }

    #[test]
    fn wait_for_all_returns_when_nothing_is_pending() {
        let pending = Arc::new(PendingRequests::default());
        pending.wait_for_all();
        let a = pending.begin();
        let b = pending.begin();
        let waiter = {
            let pending = pending.clone();
            std::thread::spawn(move || pending.wait_for_all())
        };
        drop(b);
        std::thread::sleep(Duration::from_millis(10));
        assert!(!waiter.is_finished());
        drop(a);
        waiter.join().unwrap();
    }
}
