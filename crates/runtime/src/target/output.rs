//! Files spillway writes for the user at a path they name (the Chrome trace of the timeline):
//! made the way data files are made, so that a name planted by another user cannot turn the
//! write against a file they chose.
//!
//! - The directory is opened and checked like a data directory (owned by you or root,
//!   writable by others only with the sticky bit), and everything after that is relative to
//!   it.
//! - The bytes go to a new file, made there with `O_CREAT | O_EXCL | O_NOFOLLOW` under a
//!   temporary name and set to mode 0600, whatever the umask; [`PrivateFile::persist`]
//!   renames it to the name asked for. A rename replaces a name and never writes through it,
//!   so a link (or a hard link) at the name leaves the file it leads to untouched.
//! - A name that already exists must be a regular file of yours (it is then replaced). A
//!   symbolic link is refused, whoever owns it, and so is a file of another user, a
//!   directory or a device, before anything is made.
//!
//! Unless persisted, the temporary file is removed when the [`PrivateFile`] is dropped, and
//! the name asked for is left as it was.

use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::openat::{euid, make_private, read_link_at, split, Dir, OpenError};
use super::policy::{describe_uid, Inode, Kind};
use crate::error::{Error, Result};

/// A private file being written for the user (how it is made safe: the documentation of
/// `target/output.rs`).
pub struct PrivateFile {
    /// The new file, under its temporary name.
    file: File,
    /// The directory it is in, held open.
    dir: Dir,
    /// Its temporary name, removed on drop unless persisted.
    temp: CString,
    /// The name asked for.
    name: CString,
    /// The path asked for, for messages.
    path: PathBuf,
    /// "trace file", for messages.
    what: &'static str,
    /// Renamed to `name`: nothing to remove.
    persisted: bool,
}

impl PrivateFile {
    /// Starts writing the file at `path` (`what` says what it is in messages, e.g. "trace
    /// file"): checks the directory and any file already at the name, and makes a new private
    /// file beside it, which [`PrivateFile::persist`] puts in place. A name that is a
    /// symbolic link, another user's file or anything but a regular file is refused with an
    /// [`Error::Io`] that names it and what to do; so is a directory another user could
    /// change.
    pub fn create(path: &Path, what: &'static str) -> Result<PrivateFile> {
        let context = || format!("creating the {what} {}", path.display());
        let refused = |reason: String| {
            Error::io(
                context(),
                std::io::Error::new(ErrorKind::PermissionDenied, reason),
            )
        };
        let from_open = |e: OpenError| match e {
            OpenError::Os(e) => Error::io(context(), e),
            OpenError::Refused(reason) => refused(reason),
        };
        let (dir_path, name) = split(path).map_err(|e| match e {
            OpenError::Refused(_) => refused(format!(
                "{} does not name a file; pass the path of a file to write",
                path.display()
            )),
            e => from_open(e),
        })?;
        let dir = Dir::open(dir_path).map_err(|e| Error::io(context(), e))?;
        dir.check().map_err(from_open)?;
        match dir.stat_at(&name, false) {
            Ok(found) => {
                if let Some(reason) = existing_problem(&dir, &name, path, found, euid()) {
                    return Err(refused(reason));
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(context(), e)),
        }
        let (file, temp) = make_temp(&dir).map_err(from_open)?;
        Ok(PrivateFile {
            file,
            dir,
            temp,
            name,
            path: path.to_path_buf(),
            what,
            persisted: false,
        })
    }

    /// The path being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the file written in place at its path (a rename in its directory), replacing
    /// what is there as a name.
    pub fn persist(mut self) -> Result<()> {
        let context = |e| Error::io(format!("writing the {} {}", self.what, self.path.display()), e);
        self.file.flush().map_err(context)?;
        self.dir.rename_at(&self.temp, &self.name).map_err(context)?;
        self.persisted = true;
        Ok(())
    }
}

impl Write for PrivateFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Made with O_EXCL in a checked directory: the name is still ours.
            let _ = self.dir.unlink_at(&self.temp);
        }
    }
}

impl std::fmt::Debug for PrivateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateFile")
            .field("path", &self.path)
            .field("persisted", &self.persisted)
            .finish()
    }
}

/// Why the existing `name` in `dir` (`path`, seen as `found` without following a link) may
/// not be replaced by a file of the user `euid`; `None` when it may: a regular file of theirs.
fn existing_problem(dir: &Dir, name: &CString, path: &Path, found: Inode, euid: u32) -> Option<String> {
    let p = path.display();
    match found.kind {
        Kind::Regular if found.uid == euid => None,
        Kind::Regular => Some(format!(
            "{p} exists and is owned by {}, not by you ({}): spillway replaces only a file of yours; pass another path",
            describe_uid(found.uid),
            describe_uid(euid)
        )),
        Kind::Symlink => {
            let to = read_link_at(dir, name).map_or(String::new(), |l| format!(" to {}", l.display()));
            Some(format!(
                "{p} is a symbolic link{to} (owned by {}): spillway does not write through links, since a link another user made would have it overwrite the file they chose; remove the link or pass another path",
                describe_uid(found.uid)
            ))
        }
        Kind::Directory => Some(format!("{p} is a directory; pass the path of a file to write")),
        Kind::BlockDevice => Some(format!("{p} is a block device; pass the path of a regular file to write")),
        Kind::Other(what) => Some(format!("{p} is a {what}; pass the path of a regular file to write")),
    }
}

/// Makes a new file with a unique temporary name in `dir`: `O_CREAT | O_EXCL | O_NOFOLLOW`,
/// then mode 0600 exactly (removed again when the filesystem cannot keep that).
fn make_temp(dir: &Dir) -> std::result::Result<(File, CString), OpenError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const ATTEMPTS: usize = 64;
    for _ in 0..ATTEMPTS {
        let name = format!(
            ".spillway-{}-{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let name = CString::new(name).expect("no NUL in the name");
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let file = match dir.open_at(&name, flags) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        };
        if let Err(e) = make_private(&file) {
            let _ = dir.unlink_at(&name);
            return Err(e);
        }
        return Ok((file, name));
    }
    Err(std::io::Error::new(
        ErrorKind::AlreadyExists,
        format!(
            "{ATTEMPTS} new file names in a row were taken in {}; remove stale .spillway-*.tmp files",
            dir.path.display()
        ),
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn write(path: &Path, bytes: &[u8]) -> Result<()> {
        let mut f = PrivateFile::create(path, "trace file")?;
        f.write_all(bytes).unwrap();
        f.persist()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_file_is_made_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        write(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(entries(dir.path()), ["trace.json"], "no temporary file left");
    }

    #[test]
    fn an_existing_file_of_yours_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        std::fs::write(&path, b"an older, longer trace").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        // A hard link to it keeps the old bytes: the name was replaced, nothing written through.
        let other = dir.path().join("other");
        std::fs::hard_link(&path, &other).unwrap();
        write(&path, b"[]").unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"{}");
        assert_eq!(std::fs::read(&path).unwrap(), b"[]");
    }

    #[test]
    fn a_symlink_at_the_name_is_refused_and_its_file_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"precious").unwrap();
        let link = dir.path().join("trace.json");
        symlink(&victim, &link).unwrap();
        let err = write(&link, b"{}").unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "creating the trace file {}: {} is a symbolic link to {}",
                link.display(),
                link.display(),
                victim.display()
            )) && err.contains("remove the link or pass another path"),
            "{err}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(entries(dir.path()), ["trace.json", "victim.txt"], "nothing made");
        // Dangling: nothing is made where it points.
        let dangling = dir.path().join("dangling.json");
        symlink(dir.path().join("made"), &dangling).unwrap();
        assert!(write(&dangling, b"{}").is_err());
        assert!(!dir.path().join("made").exists());
    }

    #[test]
    fn other_kinds_and_other_users_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(dir.path(), b"{}").unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let err = write(Path::new("/dev/null"), b"{}").unwrap_err().to_string();
        assert!(err.contains("is a character device"), "{err}");
        if euid() == 0 {
            let theirs = dir.path().join("theirs.json");
            std::fs::write(&theirs, b"theirs").unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let err = write(&theirs, b"{}").unwrap_err().to_string();
            assert!(err.contains("owned by uid 65534"), "{err}");
            assert_eq!(std::fs::read(&theirs).unwrap(), b"theirs");
        }
    }

    #[test]
    fn a_directory_others_can_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = write(&open.join("trace.json"), b"{}").unwrap_err().to_string();
        assert!(err.contains("without the sticky bit"), "{err}");
        assert!(entries(&open).is_empty());
        let err = write(&dir.path().join("missing").join("t.json"), b"{}")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("creating the trace file"), "{err}");
    }

    #[test]
    fn a_file_not_persisted_leaves_the_name_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.json");
        std::fs::write(&path, b"old").unwrap();
        let mut f = PrivateFile::create(&path, "trace file").unwrap();
        f.write_all(b"new").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["trace.json"]);
    }
}
