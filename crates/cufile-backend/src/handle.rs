//! A file registered with cuFile (`cuFileHandleRegister`), deregistered and closed on drop.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use cudarc::cufile::{result, sys};
use spillway_runtime::{Error, Result};

use crate::driver::guarded;
use crate::status::cufile_error_text;

/// An open file and its cuFile handle. The handle is deregistered before the file closes.
pub(crate) struct RegisteredFile {
    handle: sys::CUfileHandle_t,
    file: File,
}

// SAFETY: the cuFile handle is an opaque token for the registered descriptor; the cuFile
// API reference states that all cuFile APIs are thread-safe, and the handle is only
// deregistered in Drop, when no other reference exists.
unsafe impl Send for RegisteredFile {}
// SAFETY: as above; shared use only passes the handle to thread-safe cuFile calls.
unsafe impl Sync for RegisteredFile {}

impl RegisteredFile {
    /// Registers `file` (opened read-write, with O_DIRECT for the GDS path).
    pub fn register(file: File, path: &Path) -> Result<Self> {
        let mut handle = sys::CUfileDescr_t__bindgen_ty_1 {
            handle: std::ptr::null_mut(),
        };
        handle.fd = file.as_raw_fd();
        let descr = sys::CUfileDescr_t {
            type_: sys::CUfileFileHandleType::CU_FILE_HANDLE_TYPE_OPAQUE_FD,
            handle,
            fs_ops: std::ptr::null(),
        };
        let registered = guarded("cuFileHandleRegister", || result::handle_register(&descr))?;
        match registered {
            Ok(handle) => Ok(RegisteredFile { handle, file }),
            Err(e) => Err(Error::Target {
                path: path.to_path_buf(),
                reason: format!(
                    "cuFileHandleRegister failed: {}; {}; cuFile's own log, cufile.log, says more; or use the uring backend",
                    cufile_error_text(&e),
                    registration_hint(&file)
                ),
            }),
        }
    }

    /// The cuFile handle.
    pub fn raw(&self) -> sys::CUfileHandle_t {
        self.handle
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The likeliest reason cuFile refused `file`, from what can be seen of it here.
fn registration_hint(file: &File) -> &'static str {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the struct for an open descriptor and touches nothing else.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) };
    let on_tmpfs = rc == 0 && fs.f_type as libc::c_long == TMPFS_MAGIC;
    let nameless = file.metadata().is_ok_and(|m| m.nlink() == 0);
    if nameless {
        "this is an anonymous file (a directory was given: the file has no name, so nothing is left behind), and cuFile's compatibility mode opens the file again by its name: pass a file path (e.g. DIR/spillway.dat) to use cuFile, or use the uring backend (what auto picks without GPUDirect Storage)"
    } else if on_tmpfs {
        "cuFile cannot register files on tmpfs (there is no block device behind them): put the file on a block-device filesystem such as ext4 or xfs"
    } else if !Path::new("/run/udev/data").is_dir() {
        "cuFile reads the udev properties of the block device (ID_FS_USAGE, ID_FS_TYPE) and this system has no udev database (/run/udev/data): run udevd, or in a container mount it (--volume /run/udev:/run/udev:ro)"
    } else {
        "cuFile needs a regular file or block device on a local filesystem (ext4, xfs) opened with O_DIRECT, or compatibility mode allowed (properties.allow_compat_mode in cufile.json)"
    }
}

impl Drop for RegisteredFile {
    fn drop(&mut self) {
        let handle = self.handle;
        // SAFETY: the handle was registered in `register` and is deregistered only here,
        // once; no I/O uses it any more (every user holds the owning Arc). The file closes
        // afterwards, when the field drops.
        let _ = guarded("cuFileHandleDeregister", || unsafe {
            result::handle_deregister(handle)
        });
    }
}

impl std::fmt::Debug for RegisteredFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RegisteredFile(fd {}, handle {:p})",
            self.file.as_raw_fd(),
            self.handle
        )
    }
}
