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
    #[error("no space left on the storage holding {path} (needed {needed} bytes at offset {offset}): free space or choose a smaller --size / another --path")]
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
}
