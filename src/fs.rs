//! Facts about the filesystems storage targets live on, and about the host's memory (which
//! a memory-backed filesystem, tmpfs or ramfs, takes its bytes from).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `f_type` of tmpfs (`TMPFS_MAGIC` in `<linux/magic.h>`).
const TMPFS_MAGIC: u64 = 0x0102_1994;
/// `f_type` of ramfs (`RAMFS_MAGIC` in `<linux/magic.h>`).
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Bytes an unprivileged user may still allocate on the filesystem holding `dir`, or
/// `None` when it cannot be asked.
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; all-zero is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The filesystem holding a path: what tells it apart from others, and what limits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filesystem {
    /// Its device number (`st_dev`): paths with the same one share the filesystem's space.
    pub id: u64,
    /// Where it is mounted: the highest directory above the path on the same device.
    pub mount: PathBuf,
    /// Bytes an unprivileged user may still allocate on it; `u64::MAX` for ramfs, which has
    /// no size (only the host's memory bounds it).
    pub free: u64,
    /// Whether its bytes are the host's memory (tmpfs, ramfs).
    pub ram_backed: bool,
}

/// The filesystem holding `path` (an existing file or directory), or `None` when it cannot
/// be asked.
pub fn filesystem(path: &Path) -> Option<Filesystem> {
    use std::os::unix::ffi::OsStrExt;
    let id = std::fs::metadata(path).ok()?.dev();
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is plain data; all-zero is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // The magic numbers are 32 bits; `f_type` is signed and wider on some targets.
    let kind = st.f_type as u64 & 0xffff_ffff;
    let free = if kind == RAMFS_MAGIC {
        u64::MAX
    } else {
        free_space(path)?
    };
    Some(Filesystem {
        id,
        mount: mount_point(path, id),
        free,
        ram_backed: kind == TMPFS_MAGIC || kind == RAMFS_MAGIC,
    })
}

/// The highest directory at or above `path` on device `id` (the path itself, made
/// absolute, when it cannot be resolved).
fn mount_point(path: &Path, id: u64) -> PathBuf {
    let Ok(mut at) = std::fs::canonicalize(path) else {
        return std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    };
    while let Some(parent) = at.parent() {
        if std::fs::metadata(parent).map_or(true, |m| m.dev() != id) {
            break;
        }
        at = parent.to_path_buf();
    }
    at
}

/// Bytes the regular file at `path` has allocated (its blocks, reserved or written); 0
/// when it does not exist or is no regular file.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file())
        .map_or(0, |m| m.blocks().saturating_mul(512))
}

/// The host memory kept free for everything spillway does not account for: a tenth of
/// the host's memory…
const HEADROOM_FRACTION: u64 = 10;
/// …but never more than this.
pub const HEADROOM_MAX: u64 = 4 << 30;

/// The host memory of `total` that spillway leaves to everything else when it checks a
/// configuration (pinned memory, the host tier, storage on tmpfs) against the host's.
pub fn memory_headroom(total: u64) -> u64 {
    (total / HEADROOM_FRACTION).min(HEADROOM_MAX)
}

/// The host's memory, as `/proc/meminfo` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMemory {
    /// Bytes that can be given to new uses without swapping (`MemAvailable`).
    pub available: u64,
    /// All of the host's memory (`MemTotal`).
    pub total: u64,
}

/// The host's memory, or `None` when `/proc/meminfo` cannot be read.
pub fn host_memory() -> Option<HostMemory> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemAvailable` and `MemTotal` of a `/proc/meminfo` text (in kB there).
fn parse_meminfo(text: &str) -> Option<HostMemory> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb.saturating_mul(1024))
        })
    };
    Some(HostMemory {
        available: field("MemAvailable")?,
        total: field("MemTotal")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_gives_available_and_total_bytes() {
        let text = "MemTotal:       24683784 kB\nMemFree:        22396812 kB\nMemAvailable:   24169408 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some(HostMemory {
                available: 24169408 * 1024,
                total: 24683784 * 1024
            })
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None, "no MemAvailable");
        assert!(host_memory().is_some_and(|m| m.available <= m.total && m.total > 0));
    }

    #[test]
    fn a_directory_and_a_file_in_it_are_on_one_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, vec![1u8; 8192]).unwrap();
        let (d, f) = (filesystem(dir.path()).unwrap(), filesystem(&file).unwrap());
        assert_eq!((d.id, &d.mount), (f.id, &f.mount));
        assert!(dir.path().canonicalize().unwrap().starts_with(&d.mount));
        assert!(allocated_bytes(&file) >= 8192);
        assert_eq!(allocated_bytes(dir.path()), 0, "no regular file");
        assert_eq!(allocated_bytes(&dir.path().join("missing")), 0);
        assert!(filesystem(&dir.path().join("missing")).is_none());
    }

    #[test]
    fn dev_shm_is_ram_backed() {
        let Some(shm) = filesystem(Path::new("/dev/shm")) else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        assert!(shm.ram_backed, "{shm:?}");
        assert_eq!(shm.mount, Path::new("/dev/shm"));
    }
}
