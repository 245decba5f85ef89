//! cuFile status codes and I/O return values, turned into the runtime's errors.
//!
//! `cuFileRead`/`cuFileWrite` return the bytes moved, `-1` with `errno` set for filesystem
//! errors, or the negated value of a `CUfileOpError` (all above `CUFILEOP_BASE_ERR` = 5000)
//! for cuFile's own errors (cufile.h, `IS_CUFILE_ERR`). A negative value of 5000 or less
//! other than -1 is read as a negated errno. Codes are converted to cudarc's
//! [`sys::CUfileOpError`] through a table, never transmuted, so an unknown code from a newer
//! library is reported by number instead of being undefined behaviour.

use std::path::Path;

use cudarc::cufile::result::CufileError;
use cudarc::cufile::sys;
use cudarc::cufile::sys::CUfileOpError as E;
use spillway_runtime::{Error, IoOp};

/// `CUFILEOP_BASE_ERR` in cufile.h.
pub(crate) const CUFILEOP_BASE_ERR: u32 = 5000;

/// Every status code of the CUDA 13.0 bindings with its text from cufile.h.
const TABLE: &[(E, &str)] = &[
    (E::CU_FILE_SUCCESS, "success"),
    (
        E::CU_FILE_DRIVER_NOT_INITIALIZED,
        "nvidia-fs driver is not loaded; set properties.allow_compat_mode to true in cufile.json to enable compatibility mode",
    ),
    (E::CU_FILE_DRIVER_INVALID_PROPS, "invalid property"),
    (E::CU_FILE_DRIVER_UNSUPPORTED_LIMIT, "property range error"),
    (E::CU_FILE_DRIVER_VERSION_MISMATCH, "nvidia-fs driver version mismatch"),
    (E::CU_FILE_DRIVER_VERSION_READ_ERROR, "nvidia-fs driver version read error"),
    (E::CU_FILE_DRIVER_CLOSING, "driver shutdown in progress"),
    (E::CU_FILE_PLATFORM_NOT_SUPPORTED, "GPUDirect Storage not supported on this platform"),
    (E::CU_FILE_IO_NOT_SUPPORTED, "GPUDirect Storage not supported on this file"),
    (E::CU_FILE_DEVICE_NOT_SUPPORTED, "GPUDirect Storage not supported on this GPU"),
    (E::CU_FILE_NVFS_DRIVER_ERROR, "nvidia-fs driver ioctl error"),
    (E::CU_FILE_CUDA_DRIVER_ERROR, "CUDA driver API error"),
    (E::CU_FILE_CUDA_POINTER_INVALID, "invalid device pointer"),
    (E::CU_FILE_CUDA_MEMORY_TYPE_INVALID, "invalid pointer memory type"),
    (E::CU_FILE_CUDA_POINTER_RANGE_ERROR, "pointer range exceeds the allocated address range"),
    (E::CU_FILE_CUDA_CONTEXT_MISMATCH, "CUDA context mismatch"),
    (E::CU_FILE_INVALID_MAPPING_SIZE, "access beyond the maximum pinned size"),
    (E::CU_FILE_INVALID_MAPPING_RANGE, "access beyond the mapped size"),
    (E::CU_FILE_INVALID_FILE_TYPE, "unsupported file type"),
    (E::CU_FILE_INVALID_FILE_OPEN_FLAG, "unsupported file open flags"),
    (E::CU_FILE_DIO_NOT_SET, "the file descriptor does not have O_DIRECT set"),
    (E::CU_FILE_INVALID_VALUE, "invalid arguments"),
    (E::CU_FILE_MEMORY_ALREADY_REGISTERED, "device pointer already registered"),
    (E::CU_FILE_MEMORY_NOT_REGISTERED, "device pointer lookup failure"),
    (E::CU_FILE_PERMISSION_DENIED, "driver or file access error"),
    (E::CU_FILE_DRIVER_ALREADY_OPEN, "driver is already open"),
    (E::CU_FILE_HANDLE_NOT_REGISTERED, "file descriptor is not registered"),
    (E::CU_FILE_HANDLE_ALREADY_REGISTERED, "file descriptor is already registered"),
    (E::CU_FILE_DEVICE_NOT_FOUND, "GPU device not found"),
    (E::CU_FILE_INTERNAL_ERROR, "internal error"),
    (E::CU_FILE_GETNEWFD_FAILED, "failed to obtain a new file descriptor"),
    (E::CU_FILE_NVFS_SETUP_ERROR, "nvidia-fs driver initialization error"),
    (E::CU_FILE_IO_DISABLED, "GPUDirect Storage disabled by configuration on this file"),
    (E::CU_FILE_BATCH_SUBMIT_FAILED, "failed to submit a batch operation"),
    (E::CU_FILE_GPU_MEMORY_PINNING_FAILED, "failed to allocate pinned GPU memory"),
    (E::CU_FILE_BATCH_FULL, "queue full for batch operation"),
    (E::CU_FILE_ASYNC_NOT_SUPPORTED, "cuFile stream operation not supported"),
    (E::CU_FILE_INTERNAL_BATCH_SETUP_ERROR, "batch setup internal error"),
    (E::CU_FILE_INTERNAL_BATCH_SUBMIT_ERROR, "batch submit internal error"),
    (E::CU_FILE_INTERNAL_BATCH_GETSTATUS_ERROR, "batch get-status internal error"),
    (E::CU_FILE_INTERNAL_BATCH_CANCEL_ERROR, "batch cancel internal error"),
    (E::CU_FILE_NOMEM_ERROR, "cuFile is out of memory"),
    (E::CU_FILE_IO_ERROR, "cuFile I/O error"),
    (E::CU_FILE_INTERNAL_BUF_REGISTER_ERROR, "buffer registration error"),
    (E::CU_FILE_HASH_OPR_ERROR, "hash operation error"),
    (E::CU_FILE_INVALID_CONTEXT_ERROR, "invalid CUDA context"),
    (E::CU_FILE_NVFS_INTERNAL_DRIVER_ERROR, "nvidia-fs internal driver error"),
    (E::CU_FILE_BATCH_NOCOMPAT_ERROR, "compatibility mode is off"),
    (E::CU_FILE_IO_MAX_ERROR, "GPUDirect Storage max error"),
];

/// The cudarc enum value for a status code, if the bindings know it.
pub(crate) fn op_error(code: u32) -> Option<E> {
    TABLE.iter().find(|(e, _)| *e as u32 == code).map(|(e, _)| *e)
}

/// "CU_FILE_IO_NOT_SUPPORTED (GPUDirect Storage not supported on this file)", or the bare
/// number for a code the bindings do not know.
pub(crate) fn code_text(code: u32) -> String {
    match TABLE.iter().find(|(e, _)| *e as u32 == code) {
        Some((e, text)) => format!("{e:?} ({text})"),
        None => format!("cuFile status {code} (unknown to these bindings)"),
    }
}

/// Text for an error of cudarc's `result` layer.
pub(crate) fn cufile_error_text(e: &CufileError) -> String {
    match e {
        CufileError::Cufile(op) => code_text(*op as u32),
        CufileError::IO(io) => io.to_string(),
    }
}

/// Text for a `CUfileError_t` returned by a `sys` call (status plus the CUDA driver result).
pub(crate) fn status_text(status: &sys::CUfileError) -> String {
    let mut text = code_text(status.err as u32);
    if status.err == E::CU_FILE_CUDA_DRIVER_ERROR {
        text.push_str(&format!(", CUDA driver result {:?}", status.cu_err));
    }
    text
}

/// What one `cuFileRead`/`cuFileWrite` call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoReturn {
    /// This many bytes moved (0 at end of file for a read).
    Bytes(usize),
    /// A filesystem error.
    Errno(i32),
    /// A cuFile status code (above [`CUFILEOP_BASE_ERR`]).
    Cufile(u32),
}

/// Classifies a return value; `errno` is the thread's errno read right after the call.
pub(crate) fn classify(ret: isize, errno: i32) -> IoReturn {
    if ret >= 0 {
        return IoReturn::Bytes(ret as usize);
    }
    if ret == -1 {
        return IoReturn::Errno(if errno > 0 { errno } else { libc::EIO });
    }
    let code = ret.unsigned_abs();
    if code > CUFILEOP_BASE_ERR as usize {
        IoReturn::Cufile(u32::try_from(code).unwrap_or(u32::MAX))
    } else {
        IoReturn::Errno(code as i32)
    }
}

/// Where a failing I/O was.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IoPlace<'a> {
    /// Direction.
    pub op: IoOp,
    /// The target's path.
    pub path: &'a Path,
    /// File offset of the failing call.
    pub offset: u64,
    /// Bytes that call wanted.
    pub len: usize,
    /// Whether the memory was host memory.
    pub host: bool,
}

impl IoPlace<'_> {
    fn call(&self) -> String {
        let f = match self.op {
            IoOp::Read => "cuFileRead",
            IoOp::Write => "cuFileWrite",
        };
        format!(
            "{f} of {} bytes at offset {} of {}",
            self.len,
            self.offset,
            self.path.display()
        )
    }
}

/// The runtime error for a failed call (`ret` was not [`IoReturn::Bytes`]).
pub(crate) fn io_error(ret: IoReturn, place: IoPlace<'_>) -> Error {
    match ret {
        IoReturn::Bytes(n) => Error::ShortIo {
            op: place.op.as_str(),
            path: place.path.to_path_buf(),
            offset: place.offset,
            done: n as u64,
            wanted: place.len as u64,
        },
        IoReturn::Errno(e) if e == libc::ENOSPC || e == libc::EDQUOT => Error::NoSpace {
            path: place.path.to_path_buf(),
            offset: place.offset,
            needed: place.len as u64,
        },
        IoReturn::Errno(e) => Error::io(
            format!("{} (cuFile's own log, cufile.log, may say more)", place.call()),
            std::io::Error::from_raw_os_error(e),
        ),
        IoReturn::Cufile(code) => {
            let mut msg = format!("{} failed: {}", place.call(), code_text(code));
            if let Some(hint) = hint(code, place.host) {
                msg.push_str("; ");
                msg.push_str(hint);
            }
            msg.push_str(" (cuFile's own log, cufile.log, may say more)");
            Error::Device(msg)
        }
    }
}

fn hint(code: u32, host: bool) -> Option<&'static str> {
    let op = op_error(code)?;
    if host
        && matches!(
            op,
            E::CU_FILE_CUDA_MEMORY_TYPE_INVALID | E::CU_FILE_CUDA_POINTER_INVALID | E::CU_FILE_INVALID_VALUE
        )
    {
        return Some("this libcufile did not accept host memory: use the uring backend for host memory");
    }
    match op {
        E::CU_FILE_CUDA_POINTER_INVALID | E::CU_FILE_CUDA_MEMORY_TYPE_INVALID => {
            Some("the address is not device memory of the backend's GPU")
        }
        E::CU_FILE_CUDA_CONTEXT_MISMATCH | E::CU_FILE_INVALID_CONTEXT_ERROR => {
            Some("the memory belongs to another GPU or context than the one the backend was created with")
        }
        E::CU_FILE_CUDA_POINTER_RANGE_ERROR => Some("the region runs past the end of its allocation"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn place(op: IoOp) -> IoPlace<'static> {
        static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        IoPlace {
            op,
            path: P.get_or_init(|| PathBuf::from("/data/x.dat")),
            offset: 8192,
            len: 4096,
            host: false,
        }
    }

    #[test]
    fn every_code_round_trips_through_the_table() {
        for code in (CUFILEOP_BASE_ERR + 1)..=(CUFILEOP_BASE_ERR + 50) {
            if let Some(e) = op_error(code) {
                assert_eq!(e as u32, code);
                assert!(code_text(code).starts_with("CU_FILE_"), "{}", code_text(code));
            }
        }
        assert_eq!(op_error(5008), Some(E::CU_FILE_IO_NOT_SUPPORTED));
        assert!(op_error(5021).is_none() && op_error(9999).is_none());
        assert!(code_text(9999).contains("9999"));
    }

    #[test]
    fn return_values_are_classified() {
        assert_eq!(classify(4096, 0), IoReturn::Bytes(4096));
        assert_eq!(classify(0, 0), IoReturn::Bytes(0));
        assert_eq!(classify(-1, libc::ENOSPC), IoReturn::Errno(libc::ENOSPC));
        assert_eq!(classify(-1, 0), IoReturn::Errno(libc::EIO));
        assert_eq!(classify(-5008, 0), IoReturn::Cufile(5008));
        assert_eq!(
            classify(-(libc::EINVAL as isize), 0),
            IoReturn::Errno(libc::EINVAL)
        );
    }

    #[test]
    fn enospc_is_no_space_and_cufile_codes_are_named() {
        let e = io_error(IoReturn::Errno(libc::ENOSPC), place(IoOp::Write));
        assert!(
            matches!(
                e,
                Error::NoSpace {
                    offset: 8192,
                    needed: 4096,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = io_error(IoReturn::Errno(libc::EIO), place(IoOp::Read));
        let msg = e.to_string();
        assert!(
            msg.contains("cuFileRead of 4096 bytes at offset 8192 of /data/x.dat"),
            "{msg}"
        );
        let e = io_error(IoReturn::Cufile(5015), place(IoOp::Write));
        let msg = e.to_string();
        assert!(
            msg.contains("CU_FILE_CUDA_CONTEXT_MISMATCH") && msg.contains("another GPU"),
            "{msg}"
        );
        let mut host = place(IoOp::Read);
        host.host = true;
        let msg = io_error(IoReturn::Cufile(5013), host).to_string();
        assert!(msg.contains("the uring backend"), "{msg}");
    }
}
