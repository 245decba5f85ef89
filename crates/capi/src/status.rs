//! Status codes: what every function returns, and how the runtime's errors map to them.

use std::ffi::{c_char, c_int};

use spillway::settings::SettingsError;
use spillway_runtime::Error;

/// The call succeeded.
pub const SPILLWAY_OK: c_int = 0;
/// An argument was refused: a NULL pointer, a string that is not UTF-8, an unknown or bad
/// setting, an unknown or released handle, regions of the wrong size, a stream given to a
/// host-memory engine, a struct size from another spillway.h, a trace asked of an engine
/// without its timeline, ...
pub const SPILLWAY_ERROR_INVALID_ARGUMENT: c_int = 1;
/// Something the call needs is missing on this machine (a GPU, libcufile, io_uring, ...).
pub const SPILLWAY_ERROR_UNAVAILABLE: c_int = 2;
/// A storage or operating-system failure: the storage target cannot be opened, an I/O
/// failed or came up short, the storage device refused a request, or the engine stopped.
pub const SPILLWAY_ERROR_IO: c_int = 3;
/// The storage holding the target is full.
pub const SPILLWAY_ERROR_NO_SPACE: c_int = 4;
/// A device or pinned-host allocation failed.
pub const SPILLWAY_ERROR_OUT_OF_MEMORY: c_int = 5;
/// A GPU call failed.
pub const SPILLWAY_ERROR_DEVICE: c_int = 6;
/// A bug in spillway (a panic, caught at the boundary); the message says where. Please
/// report it.
pub const SPILLWAY_ERROR_INTERNAL: c_int = 7;
/// Bytes read back from storage failed their checksum (the `checksums` setting): the
/// storage returned other bytes than were written. The destination holds no valid tensor.
pub const SPILLWAY_ERROR_CORRUPT: c_int = 8;

/// A failed call: its status and message.
#[derive(Debug)]
pub(crate) struct Failure {
    /// One of the `SPILLWAY_ERROR_*` codes.
    pub code: c_int,
    /// What went wrong and what to do.
    pub message: String,
}

impl Failure {
    /// An [`SPILLWAY_ERROR_INVALID_ARGUMENT`] failure.
    pub fn invalid(message: impl Into<String>) -> Self {
        Failure {
            code: SPILLWAY_ERROR_INVALID_ARGUMENT,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument(_) => SPILLWAY_ERROR_INVALID_ARGUMENT,
            Error::Unavailable { .. } => SPILLWAY_ERROR_UNAVAILABLE,
            Error::NoSpace { .. } => SPILLWAY_ERROR_NO_SPACE,
            Error::OutOfMemory { .. } => SPILLWAY_ERROR_OUT_OF_MEMORY,
            Error::Device(_) => SPILLWAY_ERROR_DEVICE,
            Error::Corrupt { .. } => SPILLWAY_ERROR_CORRUPT,
            Error::Io { .. }
            | Error::Target { .. }
            | Error::ShortIo { .. }
            | Error::Storage { .. }
            | Error::Abandoned(_) => SPILLWAY_ERROR_IO,
        };
        let message = match e {
            // The status already says it is an invalid argument.
            Error::InvalidArgument(msg) => msg,
            other => other.to_string(),
        };
        Failure { code, message }
    }
}

impl From<SettingsError> for Failure {
    fn from(e: SettingsError) -> Self {
        Failure::invalid(e.to_string())
    }
}

/// The name of a status code ("SPILLWAY_ERROR_IO"), or "unknown status" for a number that
/// is none. The string is static: do not free it. Never fails.
#[no_mangle]
pub extern "C" fn spillway_status_name(status: c_int) -> *const c_char {
    let name: &'static std::ffi::CStr = match status {
        SPILLWAY_OK => c"SPILLWAY_OK",
        SPILLWAY_ERROR_INVALID_ARGUMENT => c"SPILLWAY_ERROR_INVALID_ARGUMENT",
        SPILLWAY_ERROR_UNAVAILABLE => c"SPILLWAY_ERROR_UNAVAILABLE",
        SPILLWAY_ERROR_IO => c"SPILLWAY_ERROR_IO",
        SPILLWAY_ERROR_NO_SPACE => c"SPILLWAY_ERROR_NO_SPACE",
        SPILLWAY_ERROR_OUT_OF_MEMORY => c"SPILLWAY_ERROR_OUT_OF_MEMORY",
        SPILLWAY_ERROR_DEVICE => c"SPILLWAY_ERROR_DEVICE",
        SPILLWAY_ERROR_INTERNAL => c"SPILLWAY_ERROR_INTERNAL",
        SPILLWAY_ERROR_CORRUPT => c"SPILLWAY_ERROR_CORRUPT",
        _ => c"unknown status",
    };
    name.as_ptr()
}
