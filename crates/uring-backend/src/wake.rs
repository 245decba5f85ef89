//! [`WakeSignal`]: an eventfd that wakes a worker blocked in `io_uring_enter` when a new
//! command arrives. The worker keeps a poll on it in its ring, so one wait covers both
//! completions and new work.
//!
//! Writing the eventfd is a system call (and wakes the worker's ring), so a submitter only
//! writes it when the worker may be blocked: the worker raises a "sleeping" flag before it
//! looks at its inbox one last time and blocks, and a submitter that has queued a command
//! looks at the flag. Both sides put a sequentially consistent fence between their store
//! (the flag; the command in the channel) and their load (the channel; the flag), the
//! classic store-buffering pattern: in the single total order of the two fences, whichever
//! comes second sees the other side's store. So either the worker's last look finds the
//! command, or the submitter finds the flag raised and writes the eventfd (which stays
//! readable until the worker clears it, so a write just before the worker blocks still
//! wakes it). No command is left waiting behind a blocked worker.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};

/// A counter the submitting side bumps and the worker clears, and the flag that says
/// whether bumping it is needed.
#[derive(Debug)]
pub struct WakeSignal {
    fd: OwnedFd,
    /// Raised by the worker from just before its last look at the inbox until it is back
    /// from blocking.
    sleeping: AtomicBool,
}

impl WakeSignal {
    /// A new, unsignalled eventfd (non-blocking, close-on-exec).
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(WakeSignal {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
        })
    }

    /// Worker side: announces that the worker is about to block. Call it before the last
    /// look at the inbox; if that look finds nothing, blocking is safe: a command queued
    /// after it is followed by [`notify_if_sleeping`](Self::notify_if_sleeping) writing
    /// the eventfd.
    pub fn prepare_to_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
        // Orders the store above before the inbox is read (see the module documentation).
        fence(Ordering::SeqCst);
    }

    /// Worker side: the worker is running again (it did not block, or is back from it).
    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// Submitter side, after queueing a command: wakes the worker if it may be blocked.
    /// A stale "sleeping" seen just as the worker wakes costs a spurious wake-up, never a
    /// lost one.
    pub fn notify_if_sleeping(&self) {
        // Orders the command queued before this call before the flag is read (see the
        // module documentation).
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.notify();
        }
    }

    /// Wakes the worker (makes the eventfd readable), whether it sleeps or not.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter (EAGAIN)
        // means the worker is already signalled, so the result can be ignored.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter after a wake-up.
    pub fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd; EAGAIN (not
        // signalled) is harmless.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }

    /// Whether the signal was set; clears it.
    #[cfg(test)]
    pub fn take(&self) -> bool {
        let mut value: u64 = 0;
        // SAFETY: as in `clear`.
        let read = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        read == 8 && value > 0
    }

    /// The descriptor, for the worker's poll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sleeping_worker_is_signalled() {
        let wake = WakeSignal::new().unwrap();
        wake.notify_if_sleeping();
        assert!(!wake.take(), "a running worker needs no signal");
        wake.prepare_to_sleep();
        wake.notify_if_sleeping();
        assert!(wake.take(), "a worker about to block must be signalled");
        wake.awake();
        wake.notify_if_sleeping();
        assert!(!wake.take());
        wake.notify();
        assert!(wake.take(), "`notify` signals unconditionally");
    }
}
