//! Who may see offload data: the rules, as pure functions of an inode's kind, owner and mode,
//! and the refusals they give (each names the file or directory, its owner and mode, and the
//! fix). The system calls that feed them are in `openat`.
//!
//! Offloaded activations derive from training data, so no other user may read them:
//!
//! - a directory holding offload files must not let another user rename or replace the files
//!   in it: owned by you or root, and writable by group or others only with the sticky bit
//!   (as `/tmp`, `/var/tmp` and `/dev/shm` are);
//! - an existing regular file must be yours, with no permission bits for group or others;
//! - a symbolic link at a target's name is followed only to a block device (the usual way to
//!   name a drive is a link such as `/dev/disk/by-id/nvme-…`), and only when the link is
//!   owned by you or root and its directory passes the directory rule (so that no one else
//!   made it, or can replace it); block devices are exempt from the owner and mode rules,
//!   which the administrator manages;
//! - a file spillway creates must end up private (mode 0600), whatever the umask, or the
//!   filesystem does not keep Unix permissions and is refused.

use std::path::Path;

/// The sticky bit of a directory: only a file's owner (or the directory's, or root) may
/// rename or remove it.
pub(crate) const STICKY: u32 = 0o1000;

/// What an inode is, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A block device.
    BlockDevice,
    /// A symbolic link (seen without following it).
    Symlink,
    /// Anything else: a character device, a FIFO, a socket.
    Other(&'static str),
}

/// The facts about an inode that the rules read: its kind, owner and mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Inode {
    /// What it is.
    pub kind: Kind,
    /// Its owner's user id.
    pub uid: u32,
    /// Its permission bits, with set-id and sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
}

impl Inode {
    /// From `st_mode` (file type and permission bits) and `st_uid`.
    pub(crate) fn new(st_mode: u32, uid: u32) -> Inode {
        let kind = match st_mode & libc::S_IFMT {
            libc::S_IFREG => Kind::Regular,
            libc::S_IFDIR => Kind::Directory,
            libc::S_IFBLK => Kind::BlockDevice,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFCHR => Kind::Other("character device"),
            libc::S_IFIFO => Kind::Other("FIFO"),
            libc::S_IFSOCK => Kind::Other("socket"),
            _ => Kind::Other("file of unknown type"),
        };
        Inode {
            kind,
            uid,
            mode: st_mode & 0o7777,
        }
    }
}

/// Why `dir` may not hold offload files of the user `euid`; `None` when it may: it is a
/// directory owned by `euid` or root, and writable by group or others only with the sticky
/// bit. (A root-owned directory that only root can write to is fine too: nobody but root can
/// replace files in it.)
pub(crate) fn directory_problem(dir: &Path, st: Inode, euid: u32) -> Option<String> {
    let d = dir.display();
    if st.kind != Kind::Directory {
        return Some(format!("{d} is not a directory"));
    }
    if st.uid != euid && st.uid != 0 {
        return Some(format!(
            "directory {d} (mode {:04o}) is owned by {}, not by you ({}) or root: its owner can rename and replace the files in it, so the offloaded activations (derived from training data) could end up readable by them; use a directory you own (mkdir -m 700 DIR), or one like /tmp or /dev/shm",
            st.mode,
            describe_uid(st.uid),
            describe_uid(euid)
        ));
    }
    if st.mode & 0o022 != 0 && st.mode & STICKY == 0 {
        return Some(format!(
            "directory {d} (owner {}, mode {:04o}) is writable by {} without the sticky bit: another user could rename and replace the files in it, so the offloaded activations (derived from training data) could end up readable by them; run chmod go-w {d} (or chmod +t {d}), or use a directory you own (mkdir -m 700 DIR)",
            describe_uid(st.uid),
            st.mode,
            who(st.mode & 0o022)
        ));
    }
    None
}

/// Why the existing target `path` (seen through its open descriptor, or without following a
/// link) may not hold offload data of the user `euid`; `None` when it may: a block device, or
/// a regular file owned by `euid` without permission bits for group or others.
pub(crate) fn existing_file_problem(path: &Path, st: Inode, euid: u32) -> Option<String> {
    let p = path.display();
    match st.kind {
        // Drives are the administrator's to grant (the disk group, udev rules).
        Kind::BlockDevice => None,
        Kind::Regular if st.uid != euid => Some(format!(
            "{p} is owned by {}, not by you ({}): its owner could read the offloaded activations (derived from training data); pass a new file name (spillway creates it with mode 0600), or a directory to get an anonymous file that no one else can open",
            describe_uid(st.uid),
            describe_uid(euid)
        )),
        Kind::Regular if st.mode & 0o077 != 0 => Some(format!(
            "{p} has mode {:04o}: {} may {} it, and it would hold offloaded activations (derived from training data); run chmod 600 {p}, or pass a directory to get an anonymous file that no one else can open",
            st.mode,
            who(st.mode & 0o077),
            access(st.mode & 0o077)
        )),
        Kind::Regular => None,
        Kind::Symlink => symlink_problem(path, None, None),
        Kind::Directory => Some(format!("{p} is a directory")),
        Kind::Other(what) => Some(format!(
            "{p} is a {what}; pass a regular file, a block device, or a directory (for an anonymous file)"
        )),
    }
}

/// Why the symbolic link at `path` (pointing at `link`, to an inode of kind `points_to`;
/// `None` when nothing can be reached through it) is not followed; `None` when it is: only
/// links to block devices are, since `/dev/disk/by-id/…` is how drives are named. A link
/// planted at a file's name by another user would send the offload data wherever they chose.
pub(crate) fn symlink_problem(path: &Path, link: Option<&Path>, points_to: Option<Kind>) -> Option<String> {
    if points_to == Some(Kind::BlockDevice) {
        return None;
    }
    let to = link.map_or(String::new(), |l| format!(" to {}", l.display()));
    Some(format!(
        "{} is a symbolic link{to}: spillway does not follow links to files, since a link planted by another user would send the offloaded activations (derived from training data) where they choose; pass the real path of a file you own, or a directory to get an anonymous file (links to block devices, such as /dev/disk/by-id/..., are followed)",
        path.display()
    ))
}

/// Why the symbolic link at `path` (pointing at `to`), seen without following it as `link`,
/// may not be followed by the user `euid`; `None` when it may: it is owned by `euid` or root.
/// Checked before the link is followed, together with its directory (which must pass
/// [`directory_problem`], so that no one else can replace the link afterwards). Links are
/// followed only to block devices ([`symlink_problem`]), so a link another user planted at a
/// name (in `/tmp`, say) would have spillway write the offload data over whatever drive
/// they chose.
pub(crate) fn symlink_owner_problem(
    path: &Path,
    to: Option<&Path>,
    link: Inode,
    euid: u32,
) -> Option<String> {
    if link.uid == euid || link.uid == 0 {
        return None;
    }
    let p = path.display();
    let to = to.map_or(String::new(), |l| format!(" to {}", l.display()));
    Some(format!(
        "{p} is a symbolic link{to} owned by {}, not by you ({}) or root: a link another user made could send the offloaded activations (derived from training data), and the writes that overwrite a device, wherever they choose, so spillway follows a link only when you or root own it; pass the device's real path (e.g. /dev/nvme0n1), or remove the link and make your own (ln -s DEVICE {p})",
        describe_uid(link.uid),
        describe_uid(euid)
    ))
}

/// Why a file spillway has just created, and set to mode 0600, is not private; `None` when it
/// is (no permission bits for group or others).
pub(crate) fn created_file_problem(mode: u32) -> Option<String> {
    (mode & 0o077 != 0).then(|| {
        format!(
            "the new file has mode {:04o} even after chmod 600: the filesystem does not keep Unix permissions, so other users could read the offloaded activations (derived from training data); choose a filesystem that does (ext4, xfs, tmpfs), or mount this one so that only you can read its files (e.g. umask=077)",
            mode & 0o7777
        )
    })
}

/// "its group", "others" or "its group and others", for the group and other bits in `bits`.
fn who(bits: u32) -> &'static str {
    match (bits & 0o070 != 0, bits & 0o007 != 0) {
        (true, true) => "its group and others",
        (true, false) => "its group",
        _ => "others",
    }
}

/// "read", "write" or "read and write", for the group and other bits in `bits`.
fn access(bits: u32) -> &'static str {
    match (bits & 0o044 != 0, bits & 0o022 != 0) {
        (true, true) => "read and write",
        (false, true) => "write",
        _ => "read",
    }
}

/// "uid 65534 (nobody)", or "uid 1234" when the user has no name.
pub(crate) fn describe_uid(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

/// The login name of `uid`, from the password database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: `passwd` is plain old data that getpwuid_r fills.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the strings go into `buf`, of the length
    // given.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success `pw_name` points at a NUL-terminated string inside `buf`, alive here.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 1000;
    const OTHER: u32 = 65534;

    fn dir(uid: u32, mode: u32) -> Inode {
        Inode {
            kind: Kind::Directory,
            uid,
            mode,
        }
    }

    fn file(kind: Kind, uid: u32, mode: u32) -> Inode {
        Inode { kind, uid, mode }
    }

    #[test]
    fn inodes_are_read_from_st_mode() {
        let st = Inode::new(libc::S_IFDIR | 0o1777, 0);
        assert_eq!(st, dir(0, 0o1777));
        assert_eq!(Inode::new(libc::S_IFBLK | 0o660, 0).kind, Kind::BlockDevice);
        assert_eq!(Inode::new(libc::S_IFLNK | 0o777, 0).kind, Kind::Symlink);
        assert_eq!(Inode::new(libc::S_IFREG | 0o600, 0).kind, Kind::Regular);
        assert_eq!(Inode::new(libc::S_IFIFO | 0o600, 0).kind, Kind::Other("FIFO"));
    }

    #[test]
    fn directories_only_you_or_root_can_change_are_allowed() {
        let d = Path::new("/d");
        for (st, euid) in [
            (dir(ME, 0o700), ME),
            (dir(ME, 0o755), ME),
            (dir(ME, 0o1777), ME), // sticky: others cannot touch your files
            (dir(0, 0o1777), ME),  // /tmp, /var/tmp, /dev/shm
            (dir(0, 0o755), ME),   // only root can change it (e.g. a mount point)
            (dir(0, 0o700), 0),    // root's own
            (dir(ME, 0o3770), ME), // group-writable but sticky
        ] {
            assert_eq!(directory_problem(d, st, euid), None, "{st:?} for uid {euid}");
        }
    }

    #[test]
    fn directories_others_can_change_are_refused() {
        let d = Path::new("/shared/d");
        let refused = |st: Inode, euid: u32| directory_problem(d, st, euid).expect("refused");

        let msg = refused(dir(ME, 0o777), ME);
        assert!(
            msg.contains("/shared/d") && msg.contains("0777") && msg.contains("sticky"),
            "{msg}"
        );
        assert!(msg.contains("chmod go-w /shared/d"), "{msg}");
        assert!(msg.contains("uid 1000"), "names the owner: {msg}");
        let msg = refused(dir(0, 0o777), ME);
        assert!(
            msg.contains("its group and others") && msg.contains("uid 0"),
            "{msg}"
        );
        let msg = refused(dir(ME, 0o770), ME);
        assert!(msg.contains("writable by its group"), "{msg}");
        let msg = refused(dir(ME, 0o757), ME);
        assert!(msg.contains("writable by others"), "{msg}");

        // Owned by someone else: its owner may rename anything, sticky or not.
        for mode in [0o700, 0o755, 0o1777] {
            let msg = refused(dir(OTHER, mode), ME);
            assert!(
                msg.contains("uid 65534") && msg.contains("not by you (uid 1000"),
                "{msg}"
            );
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(directory_problem(d, dir(OTHER, mode), 0).is_some(), "root too");
        }
        assert!(refused(file(Kind::Regular, ME, 0o700), ME).contains("not a directory"));
    }

    #[test]
    fn existing_files_must_be_yours_and_private() {
        let p = Path::new("/d/spill.dat");
        assert_eq!(existing_file_problem(p, file(Kind::Regular, ME, 0o600), ME), None);
        assert_eq!(existing_file_problem(p, file(Kind::Regular, ME, 0o400), ME), None);
        assert_eq!(existing_file_problem(p, file(Kind::Regular, 0, 0o600), 0), None);

        let msg = existing_file_problem(p, file(Kind::Regular, ME, 0o644), ME).unwrap();
        assert!(
            msg.contains("mode 0644") && msg.contains("chmod 600 /d/spill.dat"),
            "{msg}"
        );
        assert!(msg.contains("its group and others may read it"), "{msg}");
        let msg = existing_file_problem(p, file(Kind::Regular, ME, 0o620), ME).unwrap();
        assert!(msg.contains("its group may write it"), "{msg}");
        let msg = existing_file_problem(p, file(Kind::Regular, ME, 0o606), ME).unwrap();
        assert!(msg.contains("others may read and write it"), "{msg}");

        let msg = existing_file_problem(p, file(Kind::Regular, OTHER, 0o600), ME).unwrap();
        assert!(
            msg.contains("owned by uid 65534") && msg.contains("not by you (uid 1000"),
            "{msg}"
        );
        assert!(
            existing_file_problem(p, file(Kind::Regular, OTHER, 0o600), 0).is_some(),
            "root too"
        );

        let msg = existing_file_problem(p, file(Kind::Other("FIFO"), ME, 0o600), ME).unwrap();
        assert!(msg.contains("is a FIFO"), "{msg}");
    }

    #[test]
    fn block_devices_are_exempt_from_owner_and_mode() {
        let p = Path::new("/dev/nvme0n1");
        for (uid, mode) in [(0, 0o660), (0, 0o666), (OTHER, 0o644)] {
            let st = file(Kind::BlockDevice, uid, mode);
            assert_eq!(existing_file_problem(p, st, ME), None, "{st:?}");
        }
    }

    #[test]
    fn symlinks_are_followed_to_block_devices_only() {
        let p = Path::new("/dev/disk/by-id/nvme-x");
        let to = Some(Path::new("../../nvme0n1"));
        assert_eq!(symlink_problem(p, to, Some(Kind::BlockDevice)), None);
        for points_to in [
            Some(Kind::Regular),
            Some(Kind::Directory),
            Some(Kind::Other("character device")),
            None, // dangling: following it would create a file where the link says
        ] {
            let msg = symlink_problem(p, to, points_to).expect("refused");
            assert!(
                msg.contains("/dev/disk/by-id/nvme-x is a symbolic link to ../../nvme0n1"),
                "{msg}"
            );
            assert!(msg.contains("real path"), "{msg}");
        }
    }

    #[test]
    fn symlinks_are_followed_only_when_you_or_root_own_them() {
        let p = Path::new("/tmp/spill.bin");
        let to = Some(Path::new("/dev/loop0"));
        let link = |uid| file(Kind::Symlink, uid, 0o777);
        assert_eq!(symlink_owner_problem(p, to, link(ME), ME), None);
        assert_eq!(
            symlink_owner_problem(p, to, link(0), ME),
            None,
            "root's, like /dev/disk/by-id"
        );
        assert_eq!(symlink_owner_problem(p, to, link(0), 0), None);
        for euid in [ME, 0] {
            let msg = symlink_owner_problem(p, to, link(OTHER), euid).expect("refused");
            assert!(
                msg.contains("/tmp/spill.bin is a symbolic link to /dev/loop0 owned by uid 65534"),
                "{msg}"
            );
            assert!(msg.contains(&format!("not by you (uid {euid}")), "{msg}");
            assert!(
                msg.contains("real path") && msg.contains("ln -s DEVICE /tmp/spill.bin"),
                "{msg}"
            );
        }
    }

    #[test]
    fn created_files_must_be_private() {
        assert_eq!(created_file_problem(libc::S_IFREG | 0o600), None);
        assert_eq!(created_file_problem(0o700), None);
        let msg = created_file_problem(libc::S_IFREG | 0o755).unwrap();
        assert!(
            msg.contains("0755") && msg.contains("does not keep Unix permissions"),
            "{msg}"
        );
    }

    #[test]
    fn users_are_named_where_they_have_names() {
        assert_eq!(describe_uid(0), "uid 0 (root)");
        assert!(describe_uid(4_000_000_000).starts_with("uid 4000000000"));
    }
}
