//! The targets a backend has open, and the requests still pending on each (what `flush`
//! and `close` wait for).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The file's size when it was opened (and reserved): bytes it held for this backend.
    pub opened_len: u64,
    /// The end of the furthest write this backend completed on it: below it, bytes were
    /// written here, and a hole means the file was changed underneath.
    pub written_end: AtomicU64,
}

impl OpenFile {
    /// Records a completed write of `len` bytes at `offset` (see [`OpenFile::written_end`]).
    pub fn wrote(&self, offset: u64, len: u64) {
        self.written_end
            .fetch_max(offset.saturating_add(len), Ordering::Relaxed);
    }

    /// Checks, after a read of `len` bytes at `offset` came back, that the file was not
    /// changed underneath the backend so that the read returned bytes that were never
    /// written there. For a regular file: a read that ends within what the file held for
    /// this backend (its size at open, or the end of its furthest write) must end within
    /// its size now (else it was truncated and those bytes are lost); and a read that ends
    /// within the furthest write must find data at its first and its last byte
    /// (`lseek(SEEK_DATA)`): a file truncated below the read's end and grown again, by
    /// `truncate` or `ftruncate`, is a hole from the cut to where it grew, and reads back
    /// zeros where its data was; bytes written are never a hole. Neither fires on a file
    /// only this backend changes, nor on a read of a file that was never that long (a short
    /// read, as before).
    ///
    /// One `fstat` and two `lseek`s per read request, each a lookup at one offset: on
    /// tmpfs a `SEEK_HOLE` from the read's start would walk every page up to the end of the
    /// file under the inode's lock, which slowed reads of a large file to a crawl. No path
    /// lookup: the descriptor keeps the file itself, so a file renamed or replaced at its
    /// path reads as it did. Bytes overwritten in place by another program are not seen
    /// here; the engine's `checksums` setting catches those.
    pub fn check_unchanged(&self, offset: u64, len: u64) -> Result<()> {
        let Ok(meta) = self.file.metadata() else {
            return Ok(());
        };
        if !meta.file_type().is_file() || len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let changed = |what: String| {
            Err(Error::Target {
                path: self.path.clone(),
                reason: format!(
                    "the file changed underneath spillway: {what}, so the bytes read there (offset {offset}, {len} bytes) are not \
                     the ones written; the data stored there is lost. Nothing else may write to, truncate or resize a storage file \
                     while an engine or bench uses it"
                ),
            })
        };
        let written_end = self.written_end.load(Ordering::Relaxed);
        if meta.len() < end && end <= self.opened_len.max(written_end) {
            return changed(format!(
                "it is now {} bytes long, but the read ends at byte {end} (it was truncated)",
                meta.len()
            ));
        }
        if end > written_end {
            return Ok(());
        }
        for at in [offset, end - 1] {
            if let Some(data) = self.next_data(at) {
                if data != at {
                    return changed(format!(
                        "byte {at} lies in a hole, never written or lost (it was truncated and grown again)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Where the first data at or after `at` starts (`lseek(SEEK_DATA)`): `at` itself when
    /// it holds data, past the end of the file when only a hole follows; None when the
    /// filesystem cannot say.
    fn next_data(&self, at: u64) -> Option<u64> {
        use std::os::unix::io::AsRawFd;
        let start = libc::off_t::try_from(at).ok()?;
        // SAFETY: lseek on a descriptor this value owns; the I/O uses explicit offsets, so
        // the file position it moves is never read.
        let found = unsafe { libc::lseek(self.file.as_raw_fd(), start, libc::SEEK_DATA) };
        if found >= 0 {
            return Some(found as u64);
        }
        // ENXIO: no data at or after `at` (a hole up to the end of the file).
        (std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)).then_some(u64::MAX)
    }
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
