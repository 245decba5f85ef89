//! Reading the caller's arguments: pointers that may be NULL, strings that may not be
//! UTF-8, arrays given as pointer and length. Each refusal names the argument.

use std::ffi::{c_char, CStr};

use crate::status::Failure;

/// The string at `p`, which must be UTF-8; `what` names it in the refusal.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that stays valid and unchanged for `'a`.
pub(crate) unsafe fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    // SAFETY: forwarded contract.
    let bytes = unsafe { bytes(p, what)? };
    std::str::from_utf8(bytes).map_err(|e| {
        Failure::invalid(format!(
            "{what} is not valid UTF-8 ({e}; {:?}): pass UTF-8 text",
            String::from_utf8_lossy(bytes)
        ))
    })
}

/// The bytes of the string at `p` (without its NUL); `what` names it in the refusal.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that stays valid and unchanged for `'a`.
pub(crate) unsafe fn bytes<'a>(p: *const c_char, what: &str) -> Result<&'a [u8], Failure> {
    if p.is_null() {
        return Err(Failure::invalid(format!(
            "{what} is NULL: pass a NUL-terminated string"
        )));
    }
    // SAFETY: `p` is not NULL, so a NUL-terminated string valid for `'a` (the contract).
    Ok(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// The `n` values at `p`; NULL is an empty array when `n` is 0.
///
/// # Safety
/// `p` is NULL or points to `n` initialized values that stay valid and unchanged for `'a`.
pub(crate) unsafe fn array<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::invalid(format!(
            "{what} is NULL but its count is {n}: pass an array of {n}, or a count of 0"
        )));
    }
    if !p.is_aligned() {
        return Err(Failure::invalid(format!(
            "{what} ({p:p}) is misaligned for its type"
        )));
    }
    // SAFETY: `p` is not NULL and aligned; it points to `n` values valid for `'a` (the
    // contract).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The object at `p`; `what` names it in the refusal.
///
/// # Safety
/// `p` is NULL or points to a live object that stays valid for `'a`, not written by
/// anyone else meanwhile.
pub(crate) unsafe fn object<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: forwarded contract.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// The object at `p`, to change; `what` names it in the refusal.
///
/// # Safety
/// `p` is NULL or points to a live object that stays valid for `'a`, used by no one else
/// meanwhile.
pub(crate) unsafe fn object_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: forwarded contract.
    unsafe { p.as_mut() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// Writes `value` to the caller's out-parameter `p`; `what` names it in the refusal.
///
/// # Safety
/// `p` is NULL or valid for a write of a `T`.
pub(crate) unsafe fn put<T>(p: *mut T, value: T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure::invalid(format!(
            "{what} is NULL: pass the address of a variable to store the result in"
        )));
    }
    // SAFETY: `p` is not NULL, so valid for a write (the contract); `write` does not read
    // (or drop) what was there.
    unsafe { p.write(value) };
    Ok(())
}
