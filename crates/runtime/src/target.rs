//! Storage targets: a file or block device, opened for direct I/O where the filesystem
//! allows it, with its alignment and size, and errors that say what to do.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Whether to open with `O_DIRECT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectIo {
    /// Use O_DIRECT; fail if the filesystem refuses it.
    Required,
    /// Use O_DIRECT; if the filesystem refuses it, warn and use buffered I/O.
    #[default]
    Preferred,
    /// Buffered I/O through the page cache.
    Off,
}

/// What to open: a path and how.
#[derive(Clone, Debug)]
pub struct Target {
    /// A regular file (created if missing and `create` is set) or a block device.
    pub path: PathBuf,
    /// O_DIRECT policy.
    pub direct: DirectIo,
    /// Create the file if it does not exist.
    pub create: bool,
    /// Reserve at least this many bytes (fallocate) when opening a regular file, so a
    /// full filesystem is reported before any I/O instead of in the middle of it.
    pub reserve: Option<u64>,
}

impl Target {
    /// A file target created if missing, O_DIRECT preferred, nothing reserved.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Target {
            path: path.into(),
            direct: DirectIo::Preferred,
            create: true,
            reserve: None,
        }
    }

    /// Sets the O_DIRECT policy.
    pub fn direct(mut self, direct: DirectIo) -> Self {
        self.direct = direct;
        self
    }

    /// Reserves `bytes` on open.
    pub fn reserve(mut self, bytes: u64) -> Self {
        self.reserve = Some(bytes);
        self
    }
}

/// An opened target.
#[derive(Debug)]
pub struct OpenedTarget {
    /// The open file (with O_DIRECT when `direct_io`).
    pub file: File,
    /// Its path.
    pub path: PathBuf,
    /// Whether O_DIRECT is in effect.
    pub direct_io: bool,
    /// Required alignment of offsets and lengths for direct I/O, in bytes.
    pub offset_align: usize,
    /// Required alignment of memory addresses for direct I/O, in bytes.
    pub mem_align: usize,
    /// Size in bytes after opening (and reserving).
    pub size: u64,
    /// True for a block device.
    pub is_block_device: bool,
    /// A warning for the user (e.g. "O_DIRECT refused, using buffered I/O").
    pub warning: Option<String>,
}

/// The alignment spillway assumes when the kernel does not report one.
pub const DEFAULT_ALIGN: usize = 4096;

/// Opens `target` read-write.
pub fn open_target(target: &Target) -> Result<OpenedTarget> {
    let path = &target.path;
    check_parent(path, target.create)?;
    if path.is_dir() {
        return Err(Error::Target {
            path: path.clone(),
            reason: "it is a directory; pass a file path (e.g. DIR/spillway.dat)".into(),
        });
    }
    let want_direct = target.direct != DirectIo::Off;
    let (file, direct_io, warning) = match open_file(path, target.create, want_direct) {
        Ok(f) => (f, want_direct, None),
        Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
            if target.direct == DirectIo::Required {
                return Err(Error::Target {
                    path: path.clone(),
                    reason: "the filesystem does not support O_DIRECT; choose a path on a filesystem that does (ext4, xfs, a block device) or allow buffered I/O".into(),
                });
            }
            let f = open_file(path, target.create, false).map_err(|e| open_error(path, e))?;
            let w = format!(
                "{}: the filesystem refused O_DIRECT; using buffered I/O (results include the page cache)",
                path.display()
            );
            tracing::warn!("{w}");
            (f, false, Some(w))
        }
        Err(e) => return Err(open_error(path, e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    let is_block_device = meta.file_type().is_block_device();
    let (offset_align, mem_align) = if direct_io {
        dio_alignment(&file, is_block_device)
    } else {
        (1, 1)
    };
    let mut size = if is_block_device {
        block_device_size(&file).map_err(|e| Error::io(format!("size of {}", path.display()), e))?
    } else {
        meta.len()
    };
    if let Some(reserve) = target.reserve {
        if is_block_device {
            if reserve > size {
                return Err(Error::Target {
                    path: path.clone(),
                    reason: format!(
                        "the device holds {size} bytes but {reserve} are needed; use a smaller size"
                    ),
                });
            }
        } else if reserve > 0 {
            reserve_space(&file, path, reserve)?;
            size = size.max(reserve);
        }
    }
    Ok(OpenedTarget {
        file,
        path: path.clone(),
        direct_io,
        offset_align,
        mem_align,
        size,
        is_block_device,
        warning,
    })
}

fn open_file(path: &Path, create: bool, direct: bool) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(create);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path)
}

fn check_parent(path: &Path, create: bool) -> Result<()> {
    if !create || path.exists() {
        return Ok(());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    if !parent.exists() {
        return Err(Error::Target {
            path: path.to_path_buf(),
            reason: format!(
                "directory {} does not exist; create it first or pass a path in an existing directory",
                parent.display()
            ),
        });
    }
    Ok(())
}

fn open_error(path: &Path, e: std::io::Error) -> Error {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let reason = match (e.kind(), e.raw_os_error()) {
        (ErrorKind::PermissionDenied, _) => format!(
            "permission denied ({e}); you need write permission on {} (or on the file): choose a writable directory or fix its permissions",
            parent.display()
        ),
        (_, Some(libc::EROFS)) => "the filesystem is read-only; choose a path on a writable filesystem".into(),
        (_, Some(libc::ENOSPC)) => "no space left on the device; free space or choose another path".into(),
        (ErrorKind::NotFound, _) => format!("{e}; check that the path exists (block devices are not created)"),
        _ => e.to_string(),
    };
    Error::Target {
        path: path.to_path_buf(),
        reason,
    }
}

fn reserve_space(file: &File, path: &Path, bytes: u64) -> Result<()> {
    // SAFETY: fd is open for writing for the duration of the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(Error::NoSpace {
            path: path.to_path_buf(),
            offset: 0,
            needed: bytes,
        }),
        // Filesystems without fallocate: extend the file instead (sparse).
        libc::EOPNOTSUPP | libc::EINVAL => file
            .set_len(bytes.max(file.metadata().map(|m| m.len()).unwrap_or(0)))
            .map_err(|e| Error::io(format!("extending {} to {bytes} bytes", path.display()), e)),
        rc => Err(Error::io(
            format!("reserving {bytes} bytes in {}", path.display()),
            std::io::Error::from_raw_os_error(rc),
        )),
    }
}

/// (offset alignment, memory alignment) for direct I/O, from statx(STATX_DIOALIGN) or the
/// block device's logical sector size; [`DEFAULT_ALIGN`] when neither answers.
fn dio_alignment(file: &File, is_block_device: bool) -> (usize, usize) {
    if is_block_device {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut sector) };
        if rc == 0 && sector > 0 {
            return (sector as usize, sector as usize);
        }
        return (DEFAULT_ALIGN, DEFAULT_ALIGN);
    }
    // SAFETY: statx on an open fd with an empty path and AT_EMPTY_PATH; the struct is
    // plain old data that the kernel fills.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
        (
            stx.stx_dio_offset_align as usize,
            stx.stx_dio_mem_align.max(1) as usize,
        )
    } else {
        (DEFAULT_ALIGN, DEFAULT_ALIGN)
    }
}

const STATX_DIOALIGN: u32 = 0x2000;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn block_device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if rc == 0 {
        Ok(size)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_a_new_file_with_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        let t = open_target(&Target::new(dir.path().join("a.dat")).reserve(1 << 20)).unwrap();
        assert!(t.size >= 1 << 20);
        assert!(t.offset_align.is_power_of_two());
    }

    #[test]
    fn missing_directory_is_named() {
        let err = open_target(&Target::new("/nonexistent-spillway-dir/x.dat")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent-spillway-dir") && msg.contains("does not exist"),
            "{msg}"
        );
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_target(&Target::new(dir.path())).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
    }
}
