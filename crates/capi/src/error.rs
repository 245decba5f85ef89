//! The last failure's message, per thread, and the guard every entry point runs its body
//! in: it turns errors and panics into a status and a message.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::status::{Failure, SPILLWAY_ERROR_INTERNAL, SPILLWAY_OK};

thread_local! {
    /// The message of the last failure on this thread.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Records `message` as this thread's last failure.
fn set_last_error(message: String) {
    // A message cannot hold NUL bytes in C: they are shown as "\0".
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // During the thread's teardown there is no one left to read it.
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = Some(message));
}

/// Runs the body of the entry point `function`: its result as a status, with the message
/// of a failure (prefixed with the function's name) kept for [`spillway_last_error`]. A
/// panic is caught and reported as [`SPILLWAY_ERROR_INTERNAL`].
pub(crate) fn guard(function: &str, body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SPILLWAY_OK,
        Ok(Err(failure)) => {
            set_last_error(format!("{function}: {}", failure.message));
            failure.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_string());
            set_last_error(format!(
                "{function}: internal error (a bug in spillway, please report it): {what}"
            ));
            SPILLWAY_ERROR_INTERNAL
        }
    }
}

/// The message of the last failed call on the calling thread: what went wrong and what to
/// do; an empty string when no call on this thread has failed. The string belongs to the
/// library and stays valid until the next failing spillway call on this thread: copy it to
/// keep it, never free it. Never fails.
#[no_mangle]
pub extern "C" fn spillway_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|last| last.borrow().as_ref().map(|m| m.as_ptr()))
        .ok()
        .flatten()
        .unwrap_or(c"".as_ptr())
}
