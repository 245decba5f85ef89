//! Strings the library hands out: made here, freed by `spillway_string_free`.

use std::ffi::{c_char, CString};

use crate::args;
use crate::error::guard;
use crate::status::Failure;

/// Stores `text` in `*out` as a string for the caller to free with `spillway_string_free`.
///
/// # Safety
/// `out` is NULL or valid for a write of a pointer.
pub(crate) unsafe fn put_string(out: *mut *mut c_char, text: String, what: &str) -> Result<(), Failure> {
    let text =
        CString::new(text).map_err(|e| Failure::invalid(format!("{what} would hold a NUL byte: {e}")))?;
    // SAFETY: forwarded contract.
    unsafe { args::put(out, text.into_raw(), what) }
}

/// Frees a string the library returned (`spillway_engine_stats_json`, ...); NULL is ignored.
///
/// # Safety
/// `text` is NULL or a string from this library not yet freed.
#[no_mangle]
pub unsafe extern "C" fn spillway_string_free(text: *mut c_char) {
    guard("spillway_string_free", || {
        if !text.is_null() {
            // SAFETY: made by `CString::into_raw` in `put_string`, not yet freed (the
            // contract).
            drop(unsafe { CString::from_raw(text) });
        }
        Ok(())
    });
}

/// The library's version ("0.1.0"). The string is static: do not free it. Never fails.
#[no_mangle]
pub extern "C" fn spillway_version() -> *const c_char {
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}
