//! One engine per named target: an exclusive `flock` on the opened descriptor.
//!
//! Two engines that open the same file (or block device) would each allocate from offset 0
//! and hand back each other's bytes. So a named target is locked as it is opened, with
//! `flock(LOCK_EX | LOCK_NB)` on its descriptor, and a target already locked is refused.
//! The lock belongs to the open file description: it conflicts with another `open` of the
//! same file in this process as much as in another one, goes with the descriptor (and its
//! duplicates), and is released when the last of them closes, also when the process dies.
//! Anonymous files need none: no one else can open them.
//!
//! The lock is advisory: it keeps spillway engines (and benches) apart, not a program that
//! writes the file without asking. Which process holds it is read from `/proc/locks`, which
//! lists `flock` locks with the process that took them.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::openat::OpenError;

/// Takes the exclusive lock on the target `path` opened as `file`; refuses, naming the
/// process that holds it where `/proc/locks` tells, when another descriptor holds it. A
/// filesystem that cannot lock (some network filesystems answer `ENOLCK`) is used without
/// the lock, with a warning.
pub(crate) fn lock_target(file: &File, path: &Path) -> Result<(), OpenError> {
    // SAFETY: flock on a descriptor `file` owns, for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Err(OpenError::Refused(in_use(path, holder(file)))),
        Some(libc::EINTR) => lock_target(file, path),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL) => {
            tracing::warn!(
                "{}: the filesystem cannot lock files ({e}); nothing keeps another spillway engine from opening it too, so give each engine its own file",
                path.display()
            );
            Ok(())
        }
        _ => Err(e.into()),
    }
}

/// The refusal of `path`, locked by the process `holder` (`None`: unknown).
pub(crate) fn in_use(path: &Path, holder: Option<u32>) -> String {
    let who = match holder {
        Some(pid) if pid == std::process::id() => format!("process {pid}, this process"),
        Some(pid) => format!("process {pid}"),
        None => "another process".into(),
    };
    format!(
        "{} is in use by another spillway engine ({who}): two engines on one file would overwrite each other's data; give each engine its own file, or use a directory (an anonymous file is made there)",
        path.display()
    )
}

/// The process holding a `flock` lock on `file`, from `/proc/locks`; `None` when it cannot
/// be learned (no `/proc`, the holder in another PID namespace).
fn holder(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// The process of the first `FLOCK` line of `locks` (the text of `/proc/locks`) on the
/// inode `ino` of the filesystem `dev`.
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let inode = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:10011164 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, at, ..] if *at == inode => pid.parse::<u32>().ok().filter(|&p| p > 0),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 fe:00:42 0 EOF\n\
                     2: OFDLCK ADVISORY  WRITE -1 fe:00:42 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 1234 fe:00:41 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 4321 fe:00:42 0 EOF\n";
        let dev = libc::makedev(0xfe, 0);
        assert_eq!(holder_in(locks, dev, 42), Some(4321));
        assert_eq!(holder_in(locks, dev, 43), None);
        assert_eq!(holder_in(locks, libc::makedev(8, 1), 42), None);
        // A holder outside this PID namespace shows as 0.
        assert_eq!(
            holder_in("1: FLOCK  ADVISORY  WRITE 0 fe:00:42 0 EOF\n", dev, 42),
            None
        );
    }

    #[test]
    fn a_second_descriptor_is_refused_naming_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let first = File::options().read(true).write(true).open(&path).unwrap();
        lock_target(&first, &path).unwrap();
        let second = File::options().read(true).write(true).open(&path).unwrap();
        match lock_target(&second, &path) {
            Err(OpenError::Refused(msg)) => {
                let pid = std::process::id();
                assert!(
                    msg.contains(&format!(
                        "in use by another spillway engine (process {pid}, this process)"
                    )),
                    "{msg}"
                );
                assert!(msg.contains("give each engine its own file"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        drop(first);
        lock_target(&second, &path).unwrap();
    }

    #[test]
    fn an_unknown_holder_is_another_process() {
        let msg = in_use(Path::new("/d/f"), None);
        assert!(
            msg.starts_with("/d/f is in use by another spillway engine (another process)"),
            "{msg}"
        );
    }
}
