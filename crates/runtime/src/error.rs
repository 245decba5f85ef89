//! The one error type of the runtime and its backends.

use std::path::PathBuf;

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong below the engine. Each variant says what failed and, where
/// there is one, what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed a value the runtime cannot use (zero size, misaligned region…).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the runtime was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The storage target could not be opened or created.
    #[error("cannot open storage target {path}: {reason}")]
    Target {
        /// The target's path.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },

    /// The filesystem or device holding a target is full.
    #[error("no space left on the storage holding {path} (needed {needed} bytes at offset {offset}): free space there, or ask for less space or choose another storage path")]
    NoSpace {
        /// The target's path.
        path: PathBuf,
        /// Where the failing I/O started.
        offset: u64,
        /// How many bytes it wanted.
        needed: u64,
    },

    /// An I/O moved fewer bytes than asked (e.g. a read past the end of the target).
    #[error("short {op} on {path}: {done} of {wanted} bytes at offset {offset}")]
    ShortIo {
        /// "read" or "write".
        op: &'static str,
        /// The target's path.
        path: PathBuf,
        /// Where the I/O started.
        offset: u64,
        /// Bytes moved.
        done: u64,
        /// Bytes asked for.
        wanted: u64,
    },

    /// A GPU / device call failed.
    #[error("device error: {0}")]
    Device(String),

    /// A device allocation failed.
    #[error("out of {kind} memory allocating {bytes} bytes")]
    OutOfMemory {
        /// "device" or "pinned host".
        kind: &'static str,
        /// The size asked for.
        bytes: usize,
    },

    /// A feature is not available on this machine (no GPU, no libcufile, no io_uring…).
    #[error("{what} is unavailable: {reason}")]
    Unavailable {
        /// The missing feature.
        what: String,
        /// Why, and what to do.
        reason: String,
    },

    /// A storage device that spillway drives itself (the userspace NVMe driver) failed or
    /// refused a request.
    #[error("{target}: {source}")]
    Storage {
        /// The device, e.g. "NVMe controller 0000:01:00.0".
        target: String,
        /// The driver's error, with what to do.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Bytes read back from storage are not the bytes written there: their checksum
    /// differs. Nothing was handed out as the tensor.
    #[error(
        "checksum mismatch: {what} read from {path} (stored at offset {offset}) differs from what was written \
         (crc32c {expected:#010x} written, {found:#010x} read); the storage returned corrupt data: check the device \
         (dmesg, `nvme smart-log`, `smartctl -a`) and its cabling"
    )]
    Corrupt {
        /// What was read, e.g. "bytes 32768..65536 of a 1048576-byte tensor".
        what: String,
        /// The target's path.
        path: PathBuf,
        /// Where the tensor's extent starts on the target.
        offset: u64,
        /// The CRC-32C written.
        expected: u32,
        /// The CRC-32C of the bytes read.
        found: u32,
    },

    /// A backend was shut down while requests were pending, or a ticket lost its backend.
    #[error("request abandoned: {0}")]
    Abandoned(String),
}

impl Error {
    /// An [`Error::Io`] from the last OS error, with context.
    pub fn last_os(context: impl Into<String>) -> Self {
        Error::Io {
            context: context.into(),
            source: std::io::Error::last_os_error(),
        }
    }

    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Whether the same request may succeed if made again: an OS error EIO, EAGAIN,
    /// EINTR or ETIMEDOUT (or an [`std::io::Error`] without an errno whose kind is
    /// `Interrupted`, `WouldBlock` or `TimedOut`), directly in [`Error::Io`] or anywhere in
    /// the source chain of an [`Error::Storage`].
    ///
    /// Nothing else is: not ENOSPC ([`Error::NoSpace`]), EINVAL, EBADF or any other errno,
    /// not a short count ([`Error::ShortIo`]: the end of the target, or a backend that keeps
    /// moving nothing), not a target that is gone ([`Error::target_gone`]), not a refusal
    /// of the caller's arguments. The userspace NVMe driver's own timeout is not either: it
    /// takes the controller out of service, so that the same request would fail again.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Io { source, .. } => transient_io(source),
            Error::Storage { source, .. } => {
                let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
                while let Some(e) = next {
                    if e.downcast_ref::<std::io::Error>().is_some_and(transient_io) {
                        return true;
                    }
                    next = e.source();
                }
                false
            }
            _ => false,
        }
    }

    /// Whether the error says the storage target itself is gone: its backend was shut down
    /// ([`Error::Abandoned`]), or the OS says the device is (ENODEV, ENXIO, ENOMEDIUM,
    /// ESTALE, ESHUTDOWN). Such a target fails every later request too.
    pub fn target_gone(&self) -> bool {
        match self {
            Error::Abandoned(_) => true,
            Error::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENODEV | libc::ENXIO | libc::ENOMEDIUM | libc::ESTALE | libc::ESHUTDOWN)
            ),
            _ => false,
        }
    }
}

/// EIO, EAGAIN, EINTR, ETIMEDOUT; without an errno, an interrupted, would-block or timed-out
/// kind.
fn transient_io(e: &std::io::Error) -> bool {
    match e.raw_os_error() {
        Some(code) => matches!(code, libc::EIO | libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT),
        None => matches!(
            e.kind(),
            std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> Error {
        Error::io("an I/O", std::io::Error::from_raw_os_error(code))
    }

    #[test]
    fn transient_errors_are_told_from_lasting_ones() {
        for code in [libc::EIO, libc::EAGAIN, libc::EINTR, libc::ETIMEDOUT] {
            assert!(os(code).is_transient(), "errno {code}");
            assert!(!os(code).target_gone(), "errno {code}");
        }
        for code in [libc::ENOSPC, libc::EINVAL, libc::EBADF, libc::ENODEV, libc::EROFS] {
            assert!(!os(code).is_transient(), "errno {code}");
        }
        let timed_out = Error::io(
            "a wait",
            std::io::Error::new(std::io::ErrorKind::TimedOut, "late"),
        );
        assert!(timed_out.is_transient());
        let other = Error::io("a wait", std::io::Error::other("odd"));
        assert!(!other.is_transient());
        let no_space = Error::NoSpace {
            path: "/t".into(),
            offset: 0,
            needed: 1,
        };
        let short = Error::ShortIo {
            op: "read",
            path: "/t".into(),
            offset: 0,
            done: 0,
            wanted: 1,
        };
        for e in [
            no_space,
            short,
            Error::invalid("bad"),
            Error::Abandoned("gone".into()),
        ] {
            assert!(!e.is_transient(), "{e}");
        }
    }

    #[test]
    fn storage_errors_are_transient_by_their_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("command failed")]
        struct Wrapped(#[source] std::io::Error);
        let storage = |source: Box<dyn std::error::Error + Send + Sync>| Error::Storage {
            target: "NVMe controller 0000:01:00.0".into(),
            source,
        };
        assert!(storage(Box::new(Wrapped(std::io::Error::from_raw_os_error(libc::EIO)))).is_transient());
        assert!(!storage("the controller failed earlier".into()).is_transient());
        assert!(!storage(Box::new(Wrapped(std::io::Error::from_raw_os_error(libc::EINVAL)))).is_transient());
    }

    #[test]
    fn a_target_that_is_gone_says_so() {
        for code in [
            libc::ENODEV,
            libc::ENXIO,
            libc::ENOMEDIUM,
            libc::ESTALE,
            libc::ESHUTDOWN,
        ] {
            assert!(os(code).target_gone(), "errno {code}");
        }
        assert!(Error::Abandoned("the backend stopped".into()).target_gone());
        assert!(!os(libc::EIO).target_gone());
        assert!(!os(libc::ENOSPC).target_gone());
    }
}
