//! Storage targets: a file or block device, opened for direct I/O where the filesystem
//! allows it, with its alignment and size, and errors that say what to do.
//!
//! A target may also be an anonymous file in a directory ([`Target::anonymous_in`]): made
//! with `O_TMPFILE` where the filesystem supports it, else created with a unique name, mode
//! 0600 and `O_EXCL`, and unlinked at once, before any data is written. Either way nothing
//! is left behind, not even by a process killed with SIGKILL: the kernel frees the file's
//! space when its last descriptor closes.
//!
//! # Nothing exposed
//!
//! Offloaded activations derive from training data, so no other user may read them. Opening
//! refuses (never just warns), with an [`Error::Target`] that names the file or directory,
//! its owner and mode, and the fix:
//!
//! - a directory that holds the file (the anonymous file's, or a named file's parent) must
//!   be owned by you or root, and writable by group or others only with the sticky bit (as
//!   `/tmp`, `/var/tmp` and `/dev/shm` are): otherwise another user could rename and replace
//!   files in it. A symbolic link to a directory is fine; the directory it leads to is
//!   checked ([`check_directory`]).
//! - files spillway makes are mode 0600 exactly, whatever the umask: anonymous files, and a
//!   missing named file, which is created `O_EXCL | O_NOFOLLOW` (never a file or link another
//!   user planted at the name).
//! - an existing regular file must be yours, with no permission bits for group or others
//!   (`chmod 600`); it is opened `O_NOFOLLOW`. A symbolic link at the name is followed only
//!   to a block device (`/dev/disk/by-id/...` names drives that way), and only when the link
//!   itself is owned by you or root and sits in a directory that passes the directory rule
//!   above: a link another user planted (say `/tmp/spill.bin` → `/dev/sda`) is refused, naming
//!   its owner, before it is followed. Block devices are exempt from the owner and mode rules,
//!   which are the administrator's. Character devices, FIFOs and sockets are refused.
//!
//! Every check that matters is made on what was opened: files are made and opened relative
//! to their directory held open, and the opened file's descriptor is what is examined.
//!
//! # One engine per target
//!
//! A named file or block device is locked as it is opened (`flock(LOCK_EX | LOCK_NB)` on
//! its descriptor), for as long as that descriptor is open: a second engine or bench on the
//! same file, in this process or another, is refused with an [`Error::Target`] naming the
//! process that holds it, instead of both allocating from offset 0 and reading each other's
//! bytes. Anonymous files need no lock. [`check_distinct`] refuses one file given twice
//! (two names of it, or the same name twice) in one set of targets, with its own message.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

mod lock;
mod openat;
mod output;
mod policy;

pub use output::PrivateFile;

use openat::{open_anonymous, open_named, Dir, OpenError};

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
    /// A regular file (created if missing and `create` is set), a block device, or a
    /// directory: with `create` set, an anonymous file is made in it, which has no name and
    /// goes away when closed (see [`Target::anonymous_in`]).
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

    /// An anonymous file in directory `dir`, O_DIRECT preferred, nothing reserved: made
    /// with `O_TMPFILE` where the filesystem supports it, else created with a unique name
    /// (mode 0600, `O_EXCL`) and unlinked right after opening. It has no name while open and
    /// its space is freed when the last descriptor closes, also when the process is killed.
    /// [`anonymous_mode`] tells which of the two a directory gets.
    pub fn anonymous_in(dir: impl Into<PathBuf>) -> Self {
        Target::new(dir)
    }

    /// True when opening makes an anonymous file: `path` is a directory and `create` is set.
    pub fn is_anonymous(&self) -> bool {
        self.create && self.path.is_dir()
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
    /// The open file (with O_DIRECT when `direct_io`); for a named target it holds the
    /// target's lock until it is closed.
    pub file: File,
    /// Its path; for an anonymous file, the directory it was made in.
    pub path: PathBuf,
    /// How the file was made when it is anonymous; `None` for a named file or a device.
    pub anonymous: Option<AnonymousMode>,
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
    /// True when this open created the named file (`O_EXCL`): [`OpenedTarget::discard`]
    /// removes it again when what follows the open fails.
    pub created: bool,
}

/// How an anonymous file was made (see [`Target::anonymous_in`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnonymousMode {
    /// `O_TMPFILE`: the file never has a name.
    Tmpfile,
    /// The filesystem refused `O_TMPFILE`: the file was created with a unique name, mode
    /// 0600 and `O_EXCL`, and unlinked right after opening, before any data was written.
    UnlinkedAtOnce,
}

impl AnonymousMode {
    /// "tmpfile" or "unlinked-at-once".
    pub fn as_str(self) -> &'static str {
        match self {
            AnonymousMode::Tmpfile => "tmpfile",
            AnonymousMode::UnlinkedAtOnce => "unlinked-at-once",
        }
    }

    /// A sentence for people: what the mode means.
    pub fn describe(self) -> &'static str {
        match self {
            AnonymousMode::Tmpfile => "O_TMPFILE (the file never has a name)",
            AnonymousMode::UnlinkedAtOnce => {
                "created 0600 with O_EXCL and unlinked at once (the filesystem refuses O_TMPFILE)"
            }
        }
    }
}

impl std::fmt::Display for AnonymousMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which mode an anonymous file in `dir` gets: makes one (without O_DIRECT) and closes it,
/// which leaves nothing behind. A directory that fails [`check_directory`] is refused.
pub fn anonymous_mode(dir: &Path) -> Result<AnonymousMode> {
    if !dir.is_dir() {
        return Err(Error::Target {
            path: dir.to_path_buf(),
            reason: "not a directory; anonymous files are made in a directory, so pass one".into(),
        });
    }
    open_anonymous(dir, false, true)
        .map(|(_, mode)| mode)
        .map_err(|e| target_error(dir, true, e))
}

/// Checks that `dir` may hold offload files: it is a directory (a symbolic link to one is
/// judged by the directory it leads to), owned by you or root, and writable by group or
/// others only with the sticky bit (like `/tmp`), so that no other user can rename or replace
/// the files in it. An [`Error::Target`] names the directory, its owner and mode, and the fix.
/// [`open_target`] makes the same check before making or opening a file in a directory.
pub fn check_directory(dir: &Path) -> Result<()> {
    let opened = Dir::open(dir).map_err(|e| {
        let reason = match (e.kind(), e.raw_os_error()) {
            (ErrorKind::NotFound, _) => {
                "the directory does not exist; create it first (mkdir -m 700 DIR) or pass an existing one"
                    .into()
            }
            (_, Some(libc::ENOTDIR)) => {
                "not a directory; anonymous files are made in a directory, so pass one".into()
            }
            _ => return target_error(dir, true, OpenError::Os(e)),
        };
        Error::Target {
            path: dir.to_path_buf(),
            reason,
        }
    })?;
    opened.check().map_err(|e| target_error(dir, true, e))
}

/// What a target path stands for, to tell two names of one file from two files.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    /// An existing file, by its filesystem and inode.
    File { dev: u64, ino: u64 },
    /// A block device, by its device number (any node that names it is the same disk).
    BlockDevice { rdev: u64 },
    /// A file not made yet: its directory's real path and its name.
    Missing(PathBuf),
}

impl Identity {
    /// What `path` names now, following links; `None` for a directory (each open of it
    /// makes another anonymous file) and for a path that cannot be looked at.
    fn of(path: &Path) -> Option<Identity> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => None,
            Ok(m) if m.file_type().is_block_device() => Some(Identity::BlockDevice { rdev: m.rdev() }),
            Ok(m) => Some(Identity::File {
                dev: m.dev(),
                ino: m.ino(),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let name = path.file_name()?;
                let dir = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                Some(Identity::Missing(dir.canonicalize().ok()?.join(name)))
            }
            Err(_) => None,
        }
    }

    /// How the two paths are the same, for the refusal.
    fn describe(&self) -> String {
        match self {
            Identity::File { dev, ino } => {
                format!("device {}:{}, inode {ino}", libc::major(*dev), libc::minor(*dev))
            }
            Identity::BlockDevice { rdev } => {
                format!("block device {}:{}", libc::major(*rdev), libc::minor(*rdev))
            }
            Identity::Missing(path) => format!("both name {}", path.display()),
        }
    }
}

/// Refuses a set of targets (the members of a striped set, or an engine's targets) that
/// holds one file twice: the same path given twice, two names of one file (`DIR/./f`, a
/// link, a linked directory, a hard link), or two device nodes of one block device. Each
/// would use the file from offset 0, so every piece written would overwrite another and
/// nothing would read back right. The [`Error::Target`] names both paths. Directories are
/// fine (each gets an anonymous file of its own), and so are paths that cannot be looked at
/// now (opening them says why).
///
/// It looks at the paths as they are, before anything is opened; the lock each named
/// target takes as it is opened (see [`open_target`]) refuses a file that became the same
/// as another member meanwhile.
pub fn check_distinct(paths: &[&Path]) -> Result<()> {
    let mut seen: Vec<(&Path, Identity)> = Vec::new();
    for &path in paths {
        let Some(id) = Identity::of(path) else {
            continue;
        };
        if let Some((first, _)) = seen.iter().find(|(_, other)| *other == id) {
            return Err(Error::Target {
                path: path.to_path_buf(),
                reason: same_file(first, path, &id),
            });
        }
        seen.push((path, id));
    }
    Ok(())
}

/// The refusal of `second`, the same file as `first`.
fn same_file(first: &Path, second: &Path, id: &Identity) -> String {
    let (a, b) = (first.display(), second.display());
    let twice = if first.as_os_str() == second.as_os_str() {
        format!("{a} is listed twice, the same file both times")
    } else {
        format!("{b} and {a} are the same file ({})", id.describe())
    };
    format!(
        "{twice}: a set of targets that holds one file twice would write its pieces over each other, so nothing would read back right; list each file once"
    )
}

/// The alignment spillway assumes when the kernel does not report one.
pub const DEFAULT_ALIGN: usize = 4096;

/// Opens `target` read-write; a directory with `create` set gets an anonymous file. Files
/// and directories that would let another user read the data are refused (see the module
/// documentation). A named file or block device is locked for as long as the returned
/// descriptor is open, and refused when another descriptor holds its lock (see "One engine
/// per target" in the module documentation).
pub fn open_target(target: &Target) -> Result<OpenedTarget> {
    let path = &target.path;
    let anonymous = path.is_dir();
    check_trailing_slash(path)?;
    if anonymous && !target.create {
        return Err(Error::Target {
            path: path.clone(),
            reason: "it is a directory; pass a file path (e.g. DIR/spillway.dat), or allow creating a file to get an anonymous one in it".into(),
        });
    }
    let want_direct = target.direct != DirectIo::Off;
    let open = |direct: bool| -> std::result::Result<(File, Option<AnonymousMode>, bool), OpenError> {
        if anonymous {
            open_anonymous(path, direct, true).map(|(f, mode)| (f, Some(mode), false))
        } else {
            open_named(path, target.create, direct).map(|(f, created)| (f, None, created))
        }
    };
    let ((file, anonymous_mode, created), direct_io, warning) = match open(want_direct) {
        Ok(f) => (f, want_direct, None),
        Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
            if target.direct == DirectIo::Required {
                return Err(Error::Target {
                    path: path.clone(),
                    reason: "the filesystem does not support O_DIRECT; choose a path on a filesystem that does (ext4, xfs, a block device) or allow buffered I/O".into(),
                });
            }
            let f = open(false).map_err(|e| target_error(path, anonymous, e))?;
            let w = format!(
                "{}: the filesystem refused O_DIRECT; using buffered I/O (results include the page cache)",
                path.display()
            );
            tracing::warn!("{w}");
            (f, false, Some(w))
        }
        Err(e) => return Err(target_error(path, anonymous, e)),
    };
    finish_open(target, file, anonymous_mode, direct_io, warning, created)
}

/// What [`open_target`] does once the file is open: lock it, learn its alignment and size,
/// reserve its space. A named file this open created is removed again when any of that
/// fails, so that a refused or failed open leaves nothing behind.
fn finish_open(
    target: &Target,
    file: File,
    anonymous_mode: Option<AnonymousMode>,
    direct_io: bool,
    warning: Option<String>,
    created: bool,
) -> Result<OpenedTarget> {
    let path = &target.path;
    let result = (|| {
        if anonymous_mode.is_none() {
            lock::lock_target(&file, path).map_err(|e| target_error(path, false, e))?;
        }
        opened_target(target, &file, direct_io)
    })();
    match result {
        Ok((offset_align, mem_align, size, is_block_device)) => Ok(OpenedTarget {
            file,
            path: path.clone(),
            anonymous: anonymous_mode,
            direct_io,
            offset_align,
            mem_align,
            size,
            is_block_device,
            warning,
            created,
        }),
        Err(e) => {
            if created {
                remove_created(path, &file);
            }
            Err(e)
        }
    }
}

/// Removes the file at `path` that an open created, when the name still refers to the
/// file open as `file` (the same device and inode): never another file put there since.
fn remove_created(path: &Path, file: &File) {
    use std::os::unix::fs::MetadataExt;
    let (Ok(named), Ok(opened)) = (std::fs::symlink_metadata(path), file.metadata()) else {
        return;
    };
    if named.dev() == opened.dev() && named.ino() == opened.ino() {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("removing {}, made by a failed open: {e}", path.display());
        }
    }
}

/// Refuses a path that ends in '/' but is no existing directory: the slash says a
/// directory was meant (for an anonymous file), and making a file of that name instead
/// would leave one where none was asked for.
pub fn check_trailing_slash(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > 1 && bytes.ends_with(b"/") && !path.is_dir() {
        let bare = std::ffi::OsStr::from_bytes(bytes.trim_ascii_end().strip_suffix(b"/").unwrap_or(bytes));
        let why = if std::fs::symlink_metadata(bare).is_ok() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return Err(Error::Target {
            path: path.to_path_buf(),
            reason: format!(
                "a path ending in '/' names a directory, and this directory {why}: create it (the engine then keeps an anonymous file in it), or drop the trailing slash to name a file"
            ),
        });
    }
    Ok(())
}

/// Checks `path` as a storage path before anything is opened or accounted: a path ending
/// in '/' must be an existing directory ([`check_trailing_slash`]); the directory holding
/// it (or the directory itself) must not be on a filesystem of the kernel's own (procfs,
/// sysfs, …); and an existing path must be a directory, a regular file or a block device
/// (not a character device, FIFO or socket). [`open_target`] makes the same checks on
/// what it opens; this gives the same refusal to callers that look at the path first.
pub fn check_storage_path(path: &Path) -> Result<()> {
    check_trailing_slash(path)?;
    let dir = if path.is_dir() {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    if let Ok(d) = Dir::open(dir) {
        d.check_storage().map_err(|e| target_error(path, false, e))?;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let t = meta.file_type();
        if t.is_char_device() || t.is_fifo() || t.is_socket() {
            return Err(Error::Target {
                path: path.to_path_buf(),
                reason: format!(
                    "it is {}, not a regular file, directory or block device usable for storage: pass a directory, a file or a block device",
                    file_kind(&t)
                ),
            });
        }
    }
    Ok(())
}

/// What a file is, for messages: "a regular file", "a directory", "a character device", …
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// The alignments, size and kind of the opened `file`, its space reserved as `target`
/// asks.
fn opened_target(target: &Target, file: &File, direct_io: bool) -> Result<(usize, usize, u64, bool)> {
    let path = &target.path;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    let is_block_device = meta.file_type().is_block_device();
    let (offset_align, mem_align) = if direct_io {
        dio_alignment(file, is_block_device)
    } else {
        (1, 1)
    };
    let mut size = if is_block_device {
        block_device_size(file).map_err(|e| Error::io(format!("size of {}", path.display()), e))?
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
            reserve_space(file, path, reserve)?;
            size = size.max(reserve);
        }
    }
    Ok((offset_align, mem_align, size, is_block_device))
}

impl OpenedTarget {
    /// Closes the target after a failure that follows its open (a backend that cannot use
    /// it): a named file this open created is removed, as [`open_target`] does when it
    /// fails itself.
    pub fn discard(self) {
        if self.created {
            remove_created(&self.path, &self.file);
        }
    }

    /// The file opened again without the `O_TMPFILE` and `O_NOFOLLOW` flags, for libraries
    /// that refuse a descriptor carrying them (cuFile's `cuFileHandleRegister` answers
    /// "unsupported file open flags"). Such a file is reopened through `/proc/self/fd`,
    /// which gives a new descriptor on the same file (the same inode: no path is looked up
    /// again, and a nameless file stays nameless); any other is kept as it is. `O_DIRECT` is
    /// kept when in effect. A named target's lock (see [`open_target`]) passes to the new
    /// descriptor: the first is closed, then the new one locked, so another engine that
    /// takes the lock in between makes this one refuse, as it would have at the open.
    pub fn without_refused_flags(self) -> Result<OpenedTarget> {
        // SAFETY: F_GETFL on a descriptor this value owns.
        let flags = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETFL) };
        let tmpfile = self.anonymous == Some(AnonymousMode::Tmpfile);
        if !tmpfile && (flags < 0 || flags & libc::O_NOFOLLOW == 0) {
            return Ok(self);
        }
        let link = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if self.direct_io {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(&link).map_err(|e| {
            Error::io(
                format!(
                    "reopening {} through {link} (without O_TMPFILE and O_NOFOLLOW, for a library that refuses them; is /proc mounted?)",
                    self.path.display()
                ),
                e,
            )
        })?;
        // The lock is the first descriptor's: closing it lets go, and the new one takes it
        // (a lock cannot move between descriptors, and the old one would refuse the new).
        let mut reopened = self;
        drop(std::mem::replace(&mut reopened.file, file));
        if reopened.anonymous.is_none() {
            lock::lock_target(&reopened.file, &reopened.path)
                .map_err(|e| target_error(&reopened.path, false, e))?;
        }
        Ok(reopened)
    }
}

/// The error for a failed or refused open of `path` (the directory itself when `anonymous`).
fn target_error(path: &Path, anonymous: bool, e: OpenError) -> Error {
    match e {
        OpenError::Os(e) => open_error(path, anonymous, e),
        OpenError::Refused(reason) => Error::Target {
            path: path.to_path_buf(),
            reason,
        },
    }
}

/// The error for a failed open of `path` (the directory itself when `anonymous`).
fn open_error(path: &Path, anonymous: bool, e: std::io::Error) -> Error {
    let parent = if anonymous {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    let reason = match (e.kind(), e.raw_os_error()) {
        (ErrorKind::PermissionDenied, _) if anonymous => format!(
            "permission denied ({e}); you need write permission on {} to make an anonymous file in it: choose a writable directory or fix its permissions",
            parent.display()
        ),
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
    if bytes > i64::MAX as u64 {
        return Err(Error::invalid(format!(
            "cannot reserve {bytes} bytes in {}: a file holds at most {} bytes (2^63 - 1)",
            path.display(),
            i64::MAX
        )));
    }
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
    fn a_file_this_open_created_is_removed_when_its_reservation_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.bin");
        // More than any filesystem here has free.
        let err = open_target(&Target::new(&path).reserve(1 << 62)).unwrap_err();
        assert!(matches!(err, Error::NoSpace { .. }), "{err}");
        assert!(!path.exists(), "the file made by the failed open is left behind");
        // A file that was there before stays, whatever happens to the open.
        std::fs::write(&path, b"mine").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let err = open_target(&Target::new(&path).reserve(1 << 62)).unwrap_err();
        assert!(matches!(err, Error::NoSpace { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
        // Past what a file offset can hold: refused, and nothing left.
        let big = dir.path().join("c.bin");
        let err = open_target(&Target::new(&big).reserve(u64::MAX))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a file holds at most 9223372036854775807 bytes"),
            "{err}"
        );
        assert!(!big.exists());
    }

    #[test]
    fn a_missing_path_with_a_trailing_slash_is_not_made_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = format!("{}/nonexist/", dir.path().display());
        let err = open_target(&Target::new(&missing)).unwrap_err().to_string();
        assert!(
            err.contains("this directory does not exist: create it")
                && err.contains("drop the trailing slash"),
            "{err}"
        );
        assert!(entries(dir.path()).is_empty(), "nothing made");
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let err = open_target(&Target::new(format!("{}/", file.display())))
            .unwrap_err()
            .to_string();
        assert!(err.contains("this directory is not a directory"), "{err}");
        assert_eq!(
            check_storage_path(Path::new(&missing)).unwrap_err().to_string(),
            { open_target(&Target::new(&missing)).unwrap_err().to_string() }
        );
        // An existing directory with a slash is a directory target as always.
        let t = open_target(&Target::new(format!("{}/", dir.path().display()))).unwrap();
        assert!(t.anonymous.is_some());
    }

    #[test]
    fn the_kernels_own_filesystems_are_refused_before_opening() {
        for (path, fs) in [
            ("/proc/self/mem", "procfs"),
            ("/proc", "procfs"),
            ("/proc/", "procfs"),
            ("/sys/kernel/spillway.bin", "sysfs"),
        ] {
            if !Path::new(path).parent().unwrap_or(Path::new("/")).exists() {
                continue;
            }
            let err = open_target(&Target::new(path)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("is on {fs}")) && err.contains("not storage"),
                "{path}: {err}"
            );
            let err = check_storage_path(Path::new(path)).unwrap_err().to_string();
            assert!(err.contains(&format!("is on {fs}")), "{path}: {err}");
        }
        let err = check_storage_path(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a character device, not a regular file"), "{err}");
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
    fn a_directory_is_refused_without_create() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target {
            create: false,
            ..Target::new(dir.path())
        };
        let err = open_target(&target).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    /// Writes a pattern at offset 0 and reads it back through `t`, with buffers and lengths
    /// aligned for O_DIRECT.
    fn round_trip(t: &OpenedTarget) {
        use std::os::unix::fs::FileExt;
        let align = t.offset_align.max(t.mem_align).max(DEFAULT_ALIGN);
        let len = 4 * align;
        let layout = std::alloc::Layout::from_size_align(len, align).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `ptr` is a fresh allocation of `len` bytes, freed at the end of this
        // function and used through this slice only.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        t.file.write_all_at(buf, 0).unwrap();
        buf.fill(0);
        t.file.read_exact_at(buf, 0).unwrap();
        let ok = buf.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8);
        // SAFETY: allocated above with this layout, and `buf` is not used again.
        unsafe { std::alloc::dealloc(ptr, layout) };
        assert!(ok, "the data read back differs from the data written");
    }

    #[test]
    fn an_anonymous_target_leaves_nothing_in_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::anonymous_in(dir.path()).reserve(1 << 20);
        assert!(target.is_anonymous());
        let t = open_target(&target).unwrap();
        assert!(t.anonymous.is_some());
        assert_eq!(t.path, dir.path());
        assert!(t.size >= 1 << 20);
        assert!(t.offset_align.is_power_of_two());
        assert!(entries(dir.path()).is_empty(), "nothing named while open");
        round_trip(&t);
        drop(t);
        assert!(entries(dir.path()).is_empty(), "nothing left after closing");
    }

    #[test]
    fn files_reopened_without_refused_flags_are_the_same_files() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        for direct in [DirectIo::Preferred, DirectIo::Off] {
            let t = open_target(&Target::anonymous_in(dir.path()).direct(direct)).unwrap();
            let first = t.file.try_clone().unwrap();
            let (mode, was_direct) = (t.anonymous, t.direct_io);
            let t = t.without_refused_flags().unwrap();
            assert_eq!((t.anonymous, t.direct_io), (mode, was_direct));
            // SAFETY: F_GETFL on a descriptor this test owns.
            let flags = unsafe { libc::fcntl(t.file.as_raw_fd(), libc::F_GETFL) };
            assert_ne!(
                flags & libc::O_TMPFILE,
                libc::O_TMPFILE,
                "no O_TMPFILE: {flags:#x}"
            );
            assert_eq!(flags & libc::O_DIRECT != 0, was_direct);
            let (a, b) = (first.metadata().unwrap(), t.file.metadata().unwrap());
            assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "the same file");
            assert_eq!(b.nlink(), 0, "still nameless");
            assert!(entries(dir.path()).is_empty());
            drop(first);
            round_trip(&t);
        }
        // A named file (opened O_NOFOLLOW) is reopened: the same file, without the flag.
        let named = open_target(&Target::new(dir.path().join("named")).direct(DirectIo::Off)).unwrap();
        // SAFETY: F_GETFL on a descriptor this test owns.
        let flags = unsafe { libc::fcntl(named.file.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NOFOLLOW, 0, "opened O_NOFOLLOW: {flags:#x}");
        let ino = named.file.metadata().unwrap().ino();
        let named = named.without_refused_flags().unwrap();
        // SAFETY: as above.
        let flags = unsafe { libc::fcntl(named.file.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NOFOLLOW, 0, "{flags:#x}");
        assert_eq!(named.file.metadata().unwrap().ino(), ino);
        round_trip(&named);
    }

    fn open_err(target: &Target) -> String {
        match open_target(target) {
            Ok(t) => panic!("{} opened: {t:?}", target.path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_named_target_is_refused_while_another_descriptor_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("same.bin");
        let target = Target::new(&path).direct(DirectIo::Off).reserve(1 << 20);
        let first = open_target(&target).unwrap();
        let err = open_err(&target);
        let pid = std::process::id();
        assert!(
            err.contains(&format!(
                "{} is in use by another spillway engine (process {pid}, this process)",
                path.display()
            )),
            "{err}"
        );
        assert!(
            err.contains("give each engine its own file, or use a directory"),
            "{err}"
        );
        // Another name of the same file is the same file.
        let err = open_err(&Target::new(dir.path().join(".").join("same.bin")));
        assert!(err.contains("in use by another spillway engine"), "{err}");
        // Anonymous files in the same directory take no lock.
        let a = open_target(&Target::anonymous_in(dir.path()).direct(DirectIo::Off)).unwrap();
        let b = open_target(&Target::anonymous_in(dir.path()).direct(DirectIo::Off)).unwrap();
        // Closed: free again.
        drop(first);
        drop(open_target(&target).unwrap());
        drop((a, b));
    }

    #[test]
    fn the_lock_passes_to_the_descriptor_reopened_without_refused_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("named");
        let target = Target::new(&path).direct(DirectIo::Off);
        // The reopen does not refuse itself, and the new descriptor holds the lock.
        let t = open_target(&target).unwrap().without_refused_flags().unwrap();
        let err = open_err(&target);
        assert!(err.contains("in use by another spillway engine"), "{err}");
        round_trip(&t);
        drop(t);
        drop(open_target(&target).unwrap());
    }

    #[test]
    fn one_file_twice_in_a_set_is_refused_naming_both_paths() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.bin");
        let other = dir.path().join("y.bin");
        let dotted = dir.path().join(".").join("x.bin");
        let linked_dir = dir.path().join("linked");
        symlink(dir.path(), &linked_dir).unwrap();
        let via_link = linked_dir.join("x.bin");
        let refused = |paths: &[&Path]| match check_distinct(paths) {
            Ok(()) => panic!("{paths:?} passed"),
            Err(e) => e.to_string(),
        };
        // Before the file exists (nothing opened yet), and after.
        for exists in [false, true] {
            if exists {
                std::fs::write(&f, b"").unwrap();
            }
            let err = refused(&[&f, &f]);
            assert!(
                err.contains(&format!(
                    "{} is listed twice, the same file both times",
                    f.display()
                )) && err.contains("list each file once"),
                "{err}"
            );
            for second in [&dotted, &via_link] {
                let err = refused(&[&f, &other, second]);
                assert!(
                    err.contains(&format!(
                        "{} and {} are the same file",
                        second.display(),
                        f.display()
                    )),
                    "{err}"
                );
                assert!(err.contains("list each file once"), "{err}");
            }
        }
        // A hard link is the same file too.
        let hard = dir.path().join("hard.bin");
        std::fs::hard_link(&f, &hard).unwrap();
        let err = refused(&[&hard, &f]);
        assert!(err.contains("are the same file (device "), "{err}");
        // Distinct files, and one directory twice (an anonymous file each), are fine.
        check_distinct(&[&f, &other]).unwrap();
        check_distinct(&[dir.path(), dir.path()]).unwrap();
    }

    #[test]
    fn a_buffered_anonymous_target_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let t = open_target(&Target::anonymous_in(dir.path()).direct(DirectIo::Off)).unwrap();
        assert!(!t.direct_io);
        round_trip(&t);
        drop(t);
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn the_fallback_unlinks_at_once() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [false, true] {
            let (file, mode) = match open_anonymous(dir.path(), direct, false) {
                Ok(x) => x,
                // A filesystem without O_DIRECT: the buffered pass covers the rest.
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => continue,
                Err(e) => panic!("{e:?}"),
            };
            assert_eq!(mode, AnonymousMode::UnlinkedAtOnce);
            assert!(entries(dir.path()).is_empty(), "unlinked before returning");
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let meta = file.metadata().unwrap();
            assert_eq!(meta.nlink(), 0, "no name refers to it");
            assert_eq!(meta.permissions().mode() & 0o077, 0, "mode 0600");
            let t = OpenedTarget {
                file,
                path: dir.path().to_path_buf(),
                anonymous: Some(mode),
                direct_io: direct,
                offset_align: DEFAULT_ALIGN,
                mem_align: DEFAULT_ALIGN,
                size: 0,
                is_block_device: false,
                warning: None,
                created: false,
            };
            round_trip(&t);
        }
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn the_mode_probe_answers_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mode = anonymous_mode(dir.path()).unwrap();
        // tmpfs, ext4, xfs and btrfs all support O_TMPFILE.
        assert!(
            matches!(mode, AnonymousMode::Tmpfile | AnonymousMode::UnlinkedAtOnce),
            "{mode}"
        );
        assert!(entries(dir.path()).is_empty());
        let t = open_target(&Target::anonymous_in(dir.path())).unwrap();
        assert_eq!(t.anonymous, Some(mode), "open_target makes the probed kind");

        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = anonymous_mode(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return; // root ignores permission bits
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        let err = open_target(&Target::anonymous_in(&locked))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("permission denied") && err.contains("locked"),
            "{err}"
        );
        assert!(anonymous_mode(&locked).is_err());
    }
}
