//! [`WakeSignal`]: an eventfd that wakes a worker blocked in `io_uring_enter` when a new
//! command arrives. The worker keeps a poll on it in its ring, so one wait covers both
//! completions and new work.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A counter the submitting side bumps and the worker clears.
#[derive(Debug)]
pub struct WakeSignal {
    fd: OwnedFd,
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
        })
    }

    /// Wakes the worker (makes the eventfd readable).
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
