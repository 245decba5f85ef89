//! Opening targets so that no other user can see the data: every file is made or opened
//! relative to its directory held open (`openat` on an `O_PATH` descriptor), so the directory
//! checked is the directory used, and every check that matters is made on the opened
//! descriptor itself. The rules are in `policy`.
//!
//! - Anonymous files: the directory is checked, then the file made with `O_TMPFILE`, or
//!   created `O_EXCL | O_NOFOLLOW` and unlinked at once; either way set to mode 0600.
//! - A new named file: the directory is checked, then the file created `O_CREAT | O_EXCL |
//!   O_NOFOLLOW` and set to mode 0600, whatever the umask. A name taken meanwhile is opened
//!   as an existing file, with its checks: a planted file or link is never written.
//! - An existing name: a symbolic link is followed only to a block device, and only when the
//!   link (seen with `fstatat(AT_SYMLINK_NOFOLLOW)` in the directory held open) is yours or
//!   root's and the directory passes its checks, so that no one else can have made or
//!   replaced it; anything else is opened `O_NOFOLLOW`, and a regular file must be yours,
//!   private, in a checked directory.

use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions, Permissions};
use std::io::ErrorKind;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::policy::{
    created_file_problem, directory_problem, existing_file_problem, symlink_owner_problem, symlink_problem,
    Inode, Kind,
};
use super::AnonymousMode;

/// Why a target could not be opened: the system said no, or spillway refused.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// A system call failed.
    Os(std::io::Error),
    /// spillway refused: the reason, naming what is wrong and what to do.
    Refused(String),
}

impl From<std::io::Error> for OpenError {
    fn from(e: std::io::Error) -> Self {
        OpenError::Os(e)
    }
}

impl OpenError {
    /// The OS error number, for a failed system call.
    pub(crate) fn raw_os_error(&self) -> Option<i32> {
        match self {
            OpenError::Os(e) => e.raw_os_error(),
            OpenError::Refused(_) => None,
        }
    }
}

/// The effective user id: the user whose files spillway makes and may use.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A directory held open with `O_PATH` (which needs no read permission): what was checked is
/// where files are made, even if its path is renamed or replaced meanwhile.
pub(crate) struct Dir {
    fd: File,
    pub(crate) path: PathBuf,
}

impl Dir {
    /// Opens the directory at `path`, following symbolic links (a linked directory is fine:
    /// what counts is the directory it leads to).
    pub(crate) fn open(path: &Path) -> std::io::Result<Dir> {
        let fd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(path)?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Refuses a directory that others could rename or replace files in (see
    /// [`directory_problem`]).
    pub(crate) fn check(&self) -> Result<(), OpenError> {
        let meta = self.fd.metadata()?;
        let st = Inode::new(meta.mode(), meta.uid());
        match directory_problem(&self.path, st, euid()) {
            Some(reason) => Err(OpenError::Refused(reason)),
            None => Ok(()),
        }
    }

    /// Refuses a directory on a filesystem of the kernel's own (procfs, sysfs, …): its
    /// files are views of processes and devices, never storage (`/proc/self/mem` would
    /// have the engine write into its own memory).
    pub(crate) fn check_storage(&self) -> Result<(), OpenError> {
        // SAFETY: `statfs` is plain old data that the kernel fills.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open (O_PATH descriptors are accepted by fstatfs) and
        // `st` is writable.
        if unsafe { libc::fstatfs(self.fd.as_raw_fd(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // The magic numbers are 32 bits; `f_type` is signed and wider on some targets.
        let magic = st.f_type as u64 & 0xffff_ffff;
        match pseudo_filesystem(magic) {
            Some(name) => Err(OpenError::Refused(format!(
                "{} is on {name}, a filesystem of the kernel's own (views of processes, devices or settings), not storage: \
                 pass a directory, a regular file or a block device on a real filesystem",
                self.path.display()
            ))),
            None => Ok(()),
        }
    }

    /// `fstatat` of `name` in the directory; a symbolic link itself unless `follow`.
    pub(crate) fn stat_at(&self, name: &CStr, follow: bool) -> std::io::Result<Inode> {
        let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
        // SAFETY: `stat` is plain old data that the kernel fills.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open, `name` is NUL-terminated and `st` is writable.
        let rc = unsafe { libc::fstatat(self.fd.as_raw_fd(), name.as_ptr(), &mut st, flags) };
        if rc == 0 {
            Ok(Inode::new(st.st_mode, st.st_uid))
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// `openat(dir, name, flags | O_CLOEXEC, 0600)`.
    pub(crate) fn open_at(&self, name: &CStr, flags: libc::c_int) -> std::io::Result<File> {
        let mode: libc::c_uint = 0o600;
        // SAFETY: the descriptor is open and `name` is NUL-terminated; the mode is read only
        // with O_CREAT or O_TMPFILE.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// `unlinkat(dir, name, 0)`.
    pub(crate) fn unlink_at(&self, name: &CStr) -> std::io::Result<()> {
        // SAFETY: the descriptor is open and `name` is NUL-terminated.
        let rc = unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// `renameat(dir, from, dir, to)`: `to` is replaced as a name, whatever it is (a link
    /// there is replaced, never followed).
    pub(crate) fn rename_at(&self, from: &CStr, to: &CStr) -> std::io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: the descriptor is open and both names are NUL-terminated.
        let rc = unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// `O_DIRECT` when `direct`.
fn direct_flag(direct: bool) -> libc::c_int {
    if direct {
        libc::O_DIRECT
    } else {
        0
    }
}

/// Turns on `O_DIRECT` on an open file (`fcntl(F_SETFL)`); a filesystem without it answers
/// `EINVAL`, as `open` would.
fn set_direct(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an open descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL on an open descriptor, with its own flags plus O_DIRECT.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets a file spillway has just made to mode 0600 exactly (the umask may have taken bits
/// from the 0600 it was made with, never added any), and refuses it when the filesystem
/// leaves bits for group or others (one without Unix permissions).
pub(crate) fn make_private(file: &File) -> Result<(), OpenError> {
    let mut mode = file.metadata()?.mode();
    if mode & 0o7777 != 0o600 {
        // A filesystem that cannot store the mode may refuse; the check below decides.
        let _ = file.set_permissions(Permissions::from_mode(0o600));
        mode = file.metadata()?.mode();
    }
    match created_file_problem(mode) {
        Some(reason) => Err(OpenError::Refused(reason)),
        None => Ok(()),
    }
}

/// The directory and the last component of the named target `path`.
pub(crate) fn split(path: &Path) -> Result<(&Path, CString), OpenError> {
    let name = path.file_name().ok_or_else(|| {
        OpenError::Refused("the path does not name a file; pass a file, a block device or a directory".into())
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = CString::new(name.as_bytes())
        .map_err(|_| OpenError::Refused("the path contains a NUL byte".into()))?;
    Ok((dir, name))
}

/// The name of the kernel's pseudo filesystem whose `statfs` magic is `magic`
/// (`<linux/magic.h>`); `None` for any other.
fn pseudo_filesystem(magic: u64) -> Option<&'static str> {
    Some(match magic {
        0x9fa0 => "procfs",
        0x6265_6572 => "sysfs",
        0x6462_6720 => "debugfs",
        0x7472_6163 => "tracefs",
        0x7363_6673 => "securityfs",
        0x0027_e0eb => "cgroupfs",
        0x6367_7270 => "cgroup2",
        0x6265_6570 => "configfs",
        0xcafe_4a11 => "bpffs",
        0x4249_4e4d => "binfmt_misc",
        0x6e73_6673 => "nsfs",
        0xde5e_81e4 => "efivarfs",
        _ => return None,
    })
}

/// Opens the named target `path` (a regular file or a block device, not a directory)
/// read-write, creating a private file when it is missing and `create` is set; true with it
/// when this call created it.
pub(crate) fn open_named(path: &Path, create: bool, direct: bool) -> Result<(File, bool), OpenError> {
    let (dir_path, name) = split(path)?;
    let dir = match Dir::open(dir_path) {
        Ok(dir) => dir,
        Err(e) if create && e.kind() == ErrorKind::NotFound => {
            return Err(OpenError::Refused(format!(
                "directory {} does not exist; create it first or pass a path in an existing directory",
                dir_path.display()
            )))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(OpenError::Refused(format!(
                "{} is not a directory; pass a path in a directory",
                dir_path.display()
            )))
        }
        Err(e) => return Err(e.into()),
    };
    dir.check_storage()?;
    if create {
        match dir.stat_at(&name, false) {
            Err(e) if e.kind() == ErrorKind::NotFound => match create_named(&dir, &name, direct) {
                // Made by someone else meanwhile: opened with all the checks below.
                Err(OpenError::Os(e)) if e.kind() == ErrorKind::AlreadyExists => {}
                made => return made.map(|f| (f, true)),
            },
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
    }
    open_existing(&dir, &name, path, direct).map(|f| (f, false))
}

/// Creates `name` in the checked `dir`: `O_EXCL | O_NOFOLLOW` (never an existing file, never
/// through a link), then mode 0600 whatever the umask, then `O_DIRECT` when `direct`. A file
/// that cannot be used is removed again.
fn create_named(dir: &Dir, name: &CStr, direct: bool) -> Result<File, OpenError> {
    dir.check()?;
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    let file = dir.open_at(name, flags)?;
    let usable = make_private(&file).and_then(|()| {
        if direct {
            set_direct(&file)?;
        }
        Ok(())
    });
    if let Err(e) = usable {
        // O_EXCL made this name ours, and the checked directory lets no one else rename it.
        let _ = dir.unlink_at(name);
        return Err(e);
    }
    Ok(file)
}

/// Opens the existing `name` in `dir` (`path` for messages): a symbolic link only to a block
/// device, anything else with `O_NOFOLLOW`; what was opened is checked on its descriptor.
fn open_existing(dir: &Dir, name: &CStr, path: &Path, direct: bool) -> Result<File, OpenError> {
    let found = dir.stat_at(name, false)?;
    let follow = match found.kind {
        Kind::Symlink => {
            let link = read_link_at(dir, name).ok();
            // Whose link it is, and where, before anything is followed: a link another user
            // made (or could replace) would choose the device written to.
            if let Some(reason) = symlink_owner_problem(path, link.as_deref(), found, euid()) {
                return Err(OpenError::Refused(reason));
            }
            dir.check()?;
            let points_to = dir.stat_at(name, true).ok().map(|st| st.kind);
            if let Some(reason) = symlink_problem(path, link.as_deref(), points_to) {
                return Err(OpenError::Refused(reason));
            }
            true
        }
        Kind::Regular | Kind::BlockDevice => false,
        // Refused before opening: opening a device or FIFO may itself do something.
        _ => return Err(refusal(path, found)),
    };
    let flags = libc::O_RDWR | direct_flag(direct) | if follow { 0 } else { libc::O_NOFOLLOW };
    let file = match dir.open_at(name, flags) {
        Ok(file) => file,
        // A link put there since the look above.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(OpenError::Refused(
                symlink_problem(path, None, None).unwrap_or_default(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    let opened = Inode::new(meta.mode(), meta.uid());
    match opened.kind {
        Kind::BlockDevice => Ok(file),
        Kind::Regular if !follow => {
            dir.check()?;
            match existing_file_problem(path, opened, euid()) {
                Some(reason) => Err(OpenError::Refused(reason)),
                None => Ok(file),
            }
        }
        // The link changed since it was looked at: treated as a link to a non-device.
        Kind::Regular => Err(OpenError::Refused(
            symlink_problem(path, None, Some(Kind::Regular)).unwrap_or_default(),
        )),
        _ => Err(refusal(path, opened)),
    }
}

/// What the symbolic link `name` in `dir` points at (`readlinkat`), for messages.
pub(crate) fn read_link_at(dir: &Dir, name: &CStr) -> std::io::Result<PathBuf> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the descriptor is open, `name` is NUL-terminated and `buf` is writable for
    // its length.
    let n = unsafe {
        libc::readlinkat(
            dir.fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

/// The refusal of an existing target that is not a file spillway may use.
fn refusal(path: &Path, st: Inode) -> OpenError {
    OpenError::Refused(
        existing_file_problem(path, st, euid())
            .unwrap_or_else(|| format!("{} cannot be used as a target", path.display())),
    )
}

/// Makes an anonymous file in the directory `dir_path`, after checking the directory:
/// `O_TMPFILE` when `try_tmpfile` is set and the filesystem supports it, else a uniquely
/// named file unlinked at once. Mode 0600 either way.
pub(crate) fn open_anonymous(
    dir_path: &Path,
    direct: bool,
    try_tmpfile: bool,
) -> Result<(File, AnonymousMode), OpenError> {
    let dir = Dir::open(dir_path)?;
    dir.check_storage()?;
    dir.check()?;
    if try_tmpfile {
        match open_tmpfile(&dir, direct) {
            Ok(f) => return Ok((f, AnonymousMode::Tmpfile)),
            Err(OpenError::Os(e)) if !tmpfile_refused(&e) => return Err(e.into()),
            Err(OpenError::Os(e)) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                // EINVAL is also how a filesystem refuses O_DIRECT: when O_TMPFILE alone
                // works, that is what it meant (the file just made has no name to clean up).
                if open_tmpfile(&dir, false).is_ok() {
                    return Err(e.into());
                }
            }
            Err(OpenError::Os(_)) => {}
            Err(refused) => return Err(refused),
        }
    }
    open_unlinked_at_once(&dir, direct).map(|f| (f, AnonymousMode::UnlinkedAtOnce))
}

/// `openat(dir, ".", O_TMPFILE | O_RDWR [| O_DIRECT], 0600)`, then mode 0600 exactly.
fn open_tmpfile(dir: &Dir, direct: bool) -> Result<File, OpenError> {
    let file = dir.open_at(c".", libc::O_TMPFILE | libc::O_RDWR | direct_flag(direct))?;
    make_private(&file)?;
    Ok(file)
}

/// The errors of a filesystem (or kernel) without `O_TMPFILE` support.
fn tmpfile_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
    )
}

/// Creates a uniquely named file in `dir` (mode 0600, `O_EXCL | O_NOFOLLOW`) and unlinks it
/// before anything else, so that only the descriptor refers to it; then mode 0600 exactly,
/// and `O_DIRECT` when `direct`.
fn open_unlinked_at_once(dir: &Dir, direct: bool) -> Result<File, OpenError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const ATTEMPTS: usize = 64;
    for _ in 0..ATTEMPTS {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            ".spillway-{}-{}-{nanos:08x}.anon",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cname = CString::new(name.as_str()).expect("no NUL in the name");
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let file = match dir.open_at(&cname, flags) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        };
        if let Err(e) = dir.unlink_at(&cname) {
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "created {} but could not unlink it ({e}); remove it by hand",
                    dir.path.join(&name).display()
                ),
            )
            .into());
        }
        make_private(&file)?;
        if direct {
            set_direct(&file)?;
        }
        return Ok(file);
    }
    Err(std::io::Error::new(
        ErrorKind::AlreadyExists,
        format!("{ATTEMPTS} new file names in a row were taken; remove stale .spillway-*.anon files"),
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::super::{check_directory, open_target, DirectIo, Target};
    use super::*;
    use std::os::unix::fs::symlink;

    fn is_root() -> bool {
        euid() == 0
    }

    const NOBODY: u32 = 65534;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::chown(path, Some(uid), None).unwrap();
    }

    /// A subdirectory `name` of `parent` with exactly `mode`.
    fn subdir(parent: &Path, name: &str, mode: u32) -> PathBuf {
        let d = parent.join(name);
        std::fs::create_dir(&d).unwrap();
        chmod(&d, mode);
        d
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn open_err(target: &Target) -> String {
        match open_target(target) {
            Ok(t) => panic!("{} opened: {t:?}", target.path.display()),
            Err(e) => e.to_string(),
        }
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    #[test]
    fn a_symlink_at_a_named_file_is_refused_and_nothing_made_where_it_points() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = subdir(dir.path(), "elsewhere", 0o700);
        let victim = elsewhere.join("victim");
        let link = dir.path().join("spill.dat");
        symlink(&victim, &link).unwrap();
        // Dangling: following it (as plain O_CREAT would) creates the file it names.
        for create in [true, false] {
            let err = open_err(&Target {
                create,
                ..Target::new(&link).direct(DirectIo::Off)
            });
            assert!(
                err.contains("is a symbolic link") && err.contains("victim"),
                "{err}"
            );
            assert!(err.contains("spill.dat"), "{err}");
            assert!(!victim.exists(), "nothing made where the link points");
        }
        // Pointing at a private file of ours: still not followed.
        std::fs::write(&victim, b"secret").unwrap();
        chmod(&victim, 0o600);
        let err = open_err(&Target::new(&link));
        assert!(err.contains("is a symbolic link"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
        // A link to a character device is no block device either.
        let null = dir.path().join("null");
        symlink("/dev/null", &null).unwrap();
        let err = open_err(&Target::new(&null).direct(DirectIo::Off));
        assert!(err.contains("is a symbolic link to /dev/null"), "{err}");
    }

    /// A block device of this machine, if it has one (only ever linked to here, never
    /// opened: every open below is refused before following the link).
    fn some_block_device() -> Option<PathBuf> {
        use std::os::unix::fs::FileTypeExt;
        let mut found: Vec<PathBuf> = std::fs::read_dir("/dev")
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
            .map(|e| e.path())
            .collect();
        found.sort();
        found.into_iter().next()
    }

    /// Places to link to: a block device when there is one (what a link is followed to), a
    /// character device and a name that does not exist.
    fn link_destinations(dir: &Path) -> Vec<PathBuf> {
        let mut to: Vec<PathBuf> = some_block_device().into_iter().collect();
        to.push(PathBuf::from("/dev/loop-control"));
        to.push(dir.join("victim"));
        to
    }

    #[test]
    fn a_link_another_user_owns_is_refused_naming_its_owner_before_it_is_followed() {
        if !is_root() {
            eprintln!(
                "a_link_another_user_owns_is_refused_naming_its_owner_before_it_is_followed: lchown needs root; not run"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // Like /tmp: root's, sticky and world-writable, which the directory rule allows.
        let tmp = subdir(dir.path(), "tmp", 0o1777);
        chown(&tmp, 0);
        for (i, to) in link_destinations(dir.path()).iter().enumerate() {
            let link = tmp.join(format!("spill-{i}.bin"));
            symlink(to, &link).unwrap();
            std::os::unix::fs::lchown(&link, Some(NOBODY), Some(NOBODY)).unwrap();
            for create in [true, false] {
                let err = open_err(&Target {
                    create,
                    ..Target::new(&link).direct(DirectIo::Off)
                });
                assert!(
                    err.contains(&format!(
                        "{} is a symbolic link to {} owned by uid 65534",
                        link.display(),
                        to.display()
                    )) && err.contains("not by you (uid 0"),
                    "{err}"
                );
                assert!(err.contains("ln -s DEVICE"), "{err}");
            }
        }
        assert!(
            !dir.path().join("victim").exists(),
            "nothing made where a link points"
        );
    }

    #[test]
    fn a_link_in_a_directory_others_can_change_is_refused_before_it_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let open = subdir(dir.path(), "open", 0o777);
        for (i, to) in link_destinations(dir.path()).iter().enumerate() {
            let link = open.join(format!("spill-{i}.bin"));
            symlink(to, &link).unwrap();
            let err = open_err(&Target::new(&link).direct(DirectIo::Off));
            assert!(
                err.contains(&format!("directory {}", open.display()))
                    && err.contains("without the sticky bit"),
                "{err}"
            );
        }
        assert!(
            !dir.path().join("victim").exists(),
            "nothing made where a link points"
        );
    }

    #[test]
    fn a_link_planted_between_the_look_and_the_create_is_not_followed() {
        // The create itself is O_EXCL | O_NOFOLLOW: a name taken meanwhile (here, before the
        // call) goes through the checks of an existing name.
        let dir = tempfile::tempdir().unwrap();
        let d = Dir::open(dir.path()).unwrap();
        let victim = dir.path().join("victim");
        symlink(&victim, dir.path().join("x")).unwrap();
        match create_named(&d, c"x", false) {
            Err(OpenError::Os(e)) => assert_eq!(e.kind(), ErrorKind::AlreadyExists),
            other => panic!("{other:?}"),
        }
        assert!(!victim.exists());
    }

    /// Runs the test `name` (of this module) alone in a child process of the test binary,
    /// with `SPILLWAY_TEST_CHILD` set: the umask is the process's, and other tests run in
    /// threads of this one.
    fn in_child_process(name: &str) {
        let module = module_path!().split_once("::").map_or("", |(_, m)| m);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                &format!("{module}::{name}"),
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env("SPILLWAY_TEST_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran the test: {text}");
    }

    #[test]
    fn new_files_are_0600_whatever_the_umask() {
        if std::env::var_os("SPILLWAY_TEST_CHILD").is_none() {
            return in_child_process("new_files_are_0600_whatever_the_umask");
        }
        let dir = tempfile::tempdir().unwrap();
        for umask in [0o000, 0o022, 0o277] {
            // SAFETY: umask has no preconditions; this process runs this test alone.
            let old = unsafe { libc::umask(umask) };
            let named = dir.path().join(format!("named-{umask:o}"));
            let t = open_target(&Target::new(&named).direct(DirectIo::Off));
            let anon = open_target(&Target::anonymous_in(dir.path()).direct(DirectIo::Off));
            let fallback = open_anonymous(dir.path(), false, false);
            // SAFETY: as above; the old mask comes back.
            unsafe { libc::umask(old) };
            drop(t.unwrap());
            assert_eq!(mode_of(&named), 0o600, "named file, umask {umask:03o}");
            let anon = anon.unwrap();
            assert_eq!(
                anon.file.metadata().unwrap().mode() & 0o7777,
                0o600,
                "umask {umask:03o}"
            );
            let (fallback, _) = fallback.unwrap();
            assert_eq!(
                fallback.metadata().unwrap().mode() & 0o7777,
                0o600,
                "umask {umask:03o}"
            );
        }
    }

    #[test]
    fn an_existing_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.dat");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o666] {
            chmod(&path, mode);
            let err = open_err(&Target::new(&path).direct(DirectIo::Off));
            assert!(
                err.contains(&format!("has mode {mode:04o}")) && err.contains("chmod 600"),
                "{err}"
            );
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
        chmod(&path, 0o600);
        let t = open_target(&Target::new(&path).direct(DirectIo::Off)).unwrap();
        assert_eq!(t.size, 4096);
        drop(t);
        let t = open_target(&Target {
            create: false,
            ..Target::new(&path)
        })
        .unwrap();
        assert_eq!(t.size, 4096);
    }

    #[test]
    fn an_existing_file_of_another_user_is_refused() {
        if !is_root() {
            eprintln!(
                "an_existing_file_of_another_user_is_refused: the ownership part needs root (chown); not run"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.dat");
        std::fs::write(&path, b"theirs").unwrap();
        chmod(&path, 0o600);
        chown(&path, NOBODY);
        let err = open_err(&Target::new(&path).direct(DirectIo::Off));
        assert!(
            err.contains("owned by uid 65534") && err.contains("not by you (uid 0"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
    }

    #[test]
    fn other_kinds_of_file_are_refused_before_opening() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is NUL-terminated.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open_err(&Target::new(&fifo));
        assert!(err.contains("is a FIFO"), "{err}");
        let err = open_err(&Target::new("/dev/null"));
        assert!(err.contains("is a character device"), "{err}");
    }

    #[test]
    fn a_directory_others_can_write_without_the_sticky_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o777, 0o770, 0o703] {
            let open = subdir(dir.path(), &format!("open-{mode:o}"), mode);
            let err = open_err(&Target::anonymous_in(&open));
            assert!(
                err.contains(&format!("directory {} (owner uid {}", open.display(), euid())),
                "{err}"
            );
            assert!(
                err.contains(&format!("mode {mode:04o}")) && err.contains("without the sticky bit"),
                "{err}"
            );
            assert!(err.contains("chmod go-w"), "{err}");
            let err = anonymous_mode_err(&open);
            assert!(err.contains("without the sticky bit"), "{err}");
            // A named file in it, new or existing.
            let err = open_err(&Target::new(open.join("spill.dat")));
            assert!(err.contains("without the sticky bit"), "{err}");
            assert!(entries(&open).is_empty(), "nothing made in it");
            std::fs::write(open.join("old.dat"), b"").unwrap();
            chmod(&open.join("old.dat"), 0o600);
            let err = open_err(&Target::new(open.join("old.dat")));
            assert!(err.contains("without the sticky bit"), "{err}");
            let err = check_directory(&open).unwrap_err().to_string();
            assert!(err.contains("without the sticky bit"), "{err}");
        }
    }

    fn anonymous_mode_err(dir: &Path) -> String {
        super::super::anonymous_mode(dir).unwrap_err().to_string()
    }

    #[test]
    fn a_sticky_directory_of_root_or_yours_is_allowed() {
        // As root (CI), this is a root-owned 1777 directory like /tmp; otherwise one of ours.
        let dir = tempfile::tempdir().unwrap();
        let sticky = subdir(dir.path(), "sticky", 0o1777);
        if is_root() {
            chown(&sticky, 0);
        }
        check_directory(&sticky).unwrap();
        let t = open_target(&Target::anonymous_in(&sticky).direct(DirectIo::Off)).unwrap();
        assert!(t.anonymous.is_some());
        let named = sticky.join("spill.dat");
        drop(open_target(&Target::new(&named).direct(DirectIo::Off)).unwrap());
        assert_eq!(mode_of(&named), 0o600);
        drop(open_target(&Target::new(&named).direct(DirectIo::Off)).unwrap());
        for private in [0o700, 0o755, 0o2750] {
            let d = subdir(dir.path(), &format!("mine-{private:o}"), private);
            check_directory(&d).unwrap();
        }
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !is_root() {
            eprintln!(
                "a_directory_of_another_user_is_refused: the ownership part needs root (chown); not run"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o755, 0o1777] {
            let theirs = subdir(dir.path(), &format!("theirs-{mode:o}"), mode);
            chown(&theirs, NOBODY);
            let err = open_err(&Target::anonymous_in(&theirs));
            assert!(
                err.contains(&format!("directory {}", theirs.display()))
                    && err.contains("owned by uid 65534")
                    && err.contains(&format!("mode {mode:04o}")),
                "{err}"
            );
            let err = open_err(&Target::new(theirs.join("spill.dat")));
            assert!(err.contains("owned by uid 65534"), "{err}");
            assert!(entries(&theirs).is_empty(), "nothing made in it");
        }
    }

    #[test]
    fn a_symlinked_directory_is_judged_by_the_directory_it_leads_to() {
        let dir = tempfile::tempdir().unwrap();
        let real = subdir(dir.path(), "real", 0o700);
        let link = dir.path().join("link");
        symlink(&real, &link).unwrap();
        let t = open_target(&Target::anonymous_in(&link).direct(DirectIo::Off)).unwrap();
        assert!(t.anonymous.is_some());
        drop(open_target(&Target::new(link.join("spill.dat")).direct(DirectIo::Off)).unwrap());
        assert_eq!(mode_of(&real.join("spill.dat")), 0o600);

        let open = subdir(dir.path(), "open", 0o777);
        let open_link = dir.path().join("open-link");
        symlink(&open, &open_link).unwrap();
        let err = open_err(&Target::anonymous_in(&open_link));
        assert!(err.contains("without the sticky bit"), "{err}");
    }

    #[test]
    fn check_directory_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        check_directory(dir.path()).unwrap();
        let err = check_directory(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing") && err.contains("does not exist"), "{err}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let err = check_directory(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
