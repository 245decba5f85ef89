//! The [`Backend`] trait: a way of moving extents between memory (device or host) and
//! storage targets, with asynchronous completion through [`Ticket`]s.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::memory::MemRef;
use crate::target::Target;

/// Requests in flight per submitting thread when nothing says otherwise: the one default
/// of the `queue_depth` setting and of every backend's configuration.
pub const DEFAULT_QUEUE_DEPTH: u32 = 16;

/// Identifies a target opened on a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(pub u32);

/// Direction of an I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Storage → memory.
    Read,
    /// Memory → storage.
    Write,
}

impl IoOp {
    /// "read" or "write".
    pub fn as_str(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
        }
    }
}

/// One extent I/O.
#[derive(Clone, Copy, Debug)]
pub struct IoRequest {
    /// The target, as returned by [`Backend::open`].
    pub target: TargetId,
    /// Direction.
    pub op: IoOp,
    /// Byte offset in the target (any value; unaligned ones cost a bounce).
    pub offset: u64,
    /// The memory (any length ≥ 1 and any address; unaligned ones cost a bounce).
    pub mem: MemRef,
}

/// What a backend does with the bytes, for reports (bench output, `spillway info`).
#[derive(Clone, Debug)]
pub struct BackendInfo {
    /// "uring" or "cufile".
    pub name: &'static str,
    /// Whether device memory goes through host memory on its way to storage.
    pub host_staging: bool,
    /// Which of its data paths the backend runs, for a backend that has several
    /// (cuFile: "gds-nvfs", "gds-p2pdma" or "compat"); `None` for the others.
    pub transfer_mode: Option<&'static str>,
    /// Free-form details (queue depth, threads, versions…).
    pub details: Vec<(String, String)>,
}

/// What [`Backend::open`] found about a target.
#[derive(Clone, Debug)]
pub struct TargetInfo {
    /// Whether O_DIRECT is in effect.
    pub direct_io: bool,
    /// Offset / length alignment for direct I/O.
    pub offset_align: usize,
    /// Size in bytes at open.
    pub size: u64,
    /// A warning for the user, if any (e.g. buffered fallback).
    pub warning: Option<String>,
}

/// A storage backend: opens targets and moves extents between them and memory.
///
/// Requests complete asynchronously: [`Backend::submit`] returns at once with a [`Ticket`].
pub trait Backend: Send + Sync + fmt::Debug {
    /// What the backend is and how it moves data.
    fn info(&self) -> BackendInfo;

    /// Opens (creating if asked) a target for I/O.
    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)>;

    /// Starts one I/O. The returned ticket completes with the bytes moved.
    ///
    /// # Safety
    /// The memory in `req.mem` must stay valid (and, for reads, not be accessed) until the
    /// ticket has completed.
    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket>;

    /// Tells the backend that bytes `[offset, offset + len)` of `target` are no longer
    /// needed: a cache in front of storage may drop them instead of writing them out. A hint:
    /// the default does nothing, and the bytes may still read back as they were.
    fn discard(&self, target: TargetId, offset: u64, len: u64) {
        let _ = (target, offset, len);
    }

    /// Makes completed writes to the target durable (fdatasync).
    fn flush(&self, target: TargetId) -> Result<()>;

    /// Closes a target. Requests still pending on it complete first.
    fn close(&self, target: TargetId) -> Result<()>;

    /// Runs one I/O to completion. Convenience over [`Backend::submit`] + [`Ticket::wait`].
    ///
    /// # Safety
    /// As for [`Backend::submit`] (trivially met: the call returns after completion).
    unsafe fn run(&self, req: IoRequest) -> Result<usize> {
        // SAFETY: forwarded; we wait for completion before returning.
        unsafe { self.submit(req)? }.wait()
    }
}

#[derive(Default)]
struct Slot {
    result: Option<Result<usize>>,
    waker: Option<Box<dyn FnOnce() + Send>>,
    /// Threads blocked on the condition variable: completion notifies only when there are
    /// any (a notify is a system call, and most tickets are never waited on while pending).
    sleepers: usize,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    cv: Condvar,
}

/// The waiting side of one request.
pub struct Ticket {
    shared: Arc<Shared>,
}

/// The completing side of one request: the backend calls [`Completer::complete`] once.
/// Dropping it without completing completes the ticket with [`Error::Abandoned`].
pub struct Completer {
    shared: Option<Arc<Shared>>,
}

/// A new (ticket, completer) pair.
pub fn ticket() -> (Ticket, Completer) {
    let shared = Arc::new(Shared::default());
    (
        Ticket {
            shared: shared.clone(),
        },
        Completer { shared: Some(shared) },
    )
}

impl Ticket {
    /// A ticket that is already complete.
    pub fn ready(result: Result<usize>) -> Ticket {
        let (t, c) = ticket();
        c.complete(result);
        t
    }

    /// True once the request has completed.
    pub fn is_done(&self) -> bool {
        self.lock().result.is_some()
    }

    /// Blocks until the request completes; returns the bytes moved.
    pub fn wait(self) -> Result<usize> {
        let mut slot = self.lock();
        while slot.result.is_none() {
            slot.sleepers += 1;
            slot = self.shared.cv.wait(slot).unwrap_or_else(|e| e.into_inner());
            slot.sleepers -= 1;
        }
        slot.result.take().expect("checked above")
    }

    /// Waits at most `timeout`; gives the ticket back if it has not completed.
    pub fn wait_timeout(self, timeout: Duration) -> std::result::Result<Result<usize>, Ticket> {
        let done = {
            let mut slot = self.lock();
            slot.sleepers += 1;
            let (mut slot, _) = self
                .shared
                .cv
                .wait_timeout_while(slot, timeout, |s| s.result.is_none())
                .unwrap_or_else(|e| e.into_inner());
            slot.sleepers -= 1;
            slot.result.is_some()
        };
        if done {
            Ok(self.wait())
        } else {
            Err(self)
        }
    }

    /// Runs `f` when the request completes (at once if it already has). One waker per
    /// ticket; a later call replaces an earlier one.
    pub fn on_complete(&self, f: impl FnOnce() + Send + 'static) {
        let mut slot = self.lock();
        if slot.result.is_some() {
            drop(slot);
            f();
        } else {
            slot.waker = Some(Box::new(f));
        }
    }

    /// Runs `f` with the request's result when it completes (at once if it already has),
    /// consuming the ticket: for combining requests without a thread waiting on each.
    pub fn then(self, f: impl FnOnce(Result<usize>) + Send + 'static) {
        let shared = self.shared.clone();
        // The waker runs after the result is stored and outside the slot's lock, so the
        // ticket rebuilt inside it can take the result.
        self.on_complete(move || f(Ticket { shared }.wait()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.shared.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ticket(done: {})", self.is_done())
    }
}

impl Completer {
    /// Completes the request. Wakes the waiter and runs its waker, if any.
    pub fn complete(mut self, result: Result<usize>) {
        if let Some(shared) = self.shared.take() {
            let (waker, sleepers) = {
                let mut slot = shared.slot.lock().unwrap_or_else(|e| e.into_inner());
                slot.result = Some(result);
                (slot.waker.take(), slot.sleepers)
            };
            // Sleepers register under the lock before they block, so none can be missed.
            if sleepers > 0 {
                shared.cv.notify_all();
            }
            if let Some(w) = waker {
                w();
            }
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if self.shared.is_some() {
            let me = Completer {
                shared: self.shared.take(),
            };
            me.complete(Err(Error::Abandoned(
                "the backend dropped the request without completing it".into(),
            )));
        }
    }
}

impl fmt::Debug for Completer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Completer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn completion_wakes_the_waiter_and_the_waker() {
        let (t, c) = ticket();
        let woken = Arc::new(AtomicBool::new(false));
        let w = woken.clone();
        t.on_complete(move || w.store(true, Ordering::SeqCst));
        assert!(!t.is_done());
        let h = std::thread::spawn(move || c.complete(Ok(7)));
        assert_eq!(t.wait().unwrap(), 7);
        h.join().unwrap();
        assert!(woken.load(Ordering::SeqCst));
    }

    #[test]
    fn a_dropped_completer_abandons_the_ticket() {
        let (t, c) = ticket();
        drop(c);
        assert!(matches!(t.wait(), Err(Error::Abandoned(_))));
    }

    #[test]
    fn wait_timeout_returns_the_ticket() {
        let (t, c) = ticket();
        let t = t.wait_timeout(Duration::from_millis(5)).unwrap_err();
        c.complete(Ok(1));
        assert_eq!(t.wait_timeout(Duration::from_secs(1)).unwrap().unwrap(), 1);
    }
}
