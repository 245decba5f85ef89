//! How the runtime's errors reach Python: bad arguments as `ValueError`, bytes read back
//! that fail their checksum as `spillway.CorruptDataError`, everything else as
//! `spillway.SpillwayError` (a `RuntimeError`), each with the runtime's message.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::{create_exception, PyErr};
use spillway_runtime::Error;

create_exception!(
    _native,
    SpillwayError,
    PyRuntimeError,
    "An engine, device or storage failure (the message says which and what to do)."
);

create_exception!(
    _native,
    CorruptDataError,
    SpillwayError,
    "Bytes read back from storage failed their checksum (the `checksums` setting): the storage \
     returned other bytes than were written, and the destination holds no valid tensor."
);

/// Converts a runtime error to the Python exception that fits it.
pub fn to_py(e: Error) -> PyErr {
    match e {
        Error::InvalidArgument(msg) => PyValueError::new_err(msg),
        e @ Error::Corrupt { .. } => CorruptDataError::new_err(e.to_string()),
        other => SpillwayError::new_err(other.to_string()),
    }
}

/// `ValueError(msg)`.
pub fn invalid(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}
