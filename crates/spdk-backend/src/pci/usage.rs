//! Who uses an NVMe controller: everything that makes taking it from its driver unsafe now.
//!
//! For a controller the kernel's nvme driver has, [`users`] looks at its namespaces' block
//! devices and their partitions: mounted (matching `/proc/self/mountinfo` by device number
//! and by source path), used as swap (`/proc/swaps`), held by device-mapper or md
//! (`/sys/block/*/holders`), claimed exclusively by anything else in the kernel (an
//! `O_EXCL` open of the block device fails with `EBUSY`; this also sees filesystems mounted
//! in other mount namespaces), and open in a process (`/proc/PID/fd`), as are the
//! controller's character device and the namespaces' generic `/dev/ngXnY` devices. For a
//! controller bound to vfio-pci it looks for processes with its VFIO group
//! (`/dev/vfio/N`) or VFIO device (`/dev/vfio/devices/vfioN`) open.
//!
//! A process that obtained a VFIO device and then closed the group file holds only an
//! anonymous `[vfio-device]` descriptor, which does not name the device, so it is not seen.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::sysfs::{all_digits, list_dir, read_trimmed, NvmeFunction, SysRoots};
use super::PciError;

/// One reason a controller must not be taken from its driver now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A namespace or partition is mounted.
    Mounted {
        /// The block device, e.g. "nvme0n1p1".
        device: String,
        /// Where it is mounted.
        mount_point: PathBuf,
        /// The filesystem type.
        fstype: String,
    },
    /// A namespace or partition is used as swap.
    Swap {
        /// The block device.
        device: String,
    },
    /// A namespace or partition is part of a device-mapper (LVM, crypt, multipath) or md
    /// (RAID) device.
    Held {
        /// The block device.
        device: String,
        /// The holder, e.g. "dm-0 (vg0-root)" or "md127".
        holder: String,
    },
    /// The kernel refuses an exclusive open of a namespace or partition: something claims it
    /// that the other checks do not name.
    Busy {
        /// The block device.
        device: String,
    },
    /// A process has one of the controller's device files open.
    Open {
        /// The process id.
        pid: u32,
        /// The process's command name (`/proc/PID/comm`).
        comm: String,
        /// The device file, e.g. "/dev/nvme0n1".
        path: PathBuf,
    },
    /// Some processes' open files could not be inspected, so they may use the controller.
    Unchecked {
        /// Their process ids.
        pids: Vec<u32>,
        /// Why, e.g. "permission denied".
        reason: String,
    },
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Usage::Mounted {
                device,
                mount_point,
                fstype,
            } => write!(f, "{device} is mounted at {} ({fstype})", mount_point.display()),
            Usage::Swap { device } => write!(f, "{device} is in use as swap"),
            Usage::Held { device, holder } => write!(f, "{device} is held by {holder}"),
            Usage::Busy { device } => write!(
                f,
                "{device} is claimed by the kernel (the exclusive open of /dev/{device} failed with \
                 EBUSY: a filesystem, swap, RAID/LVM/ZFS member, possibly in another mount namespace)"
            ),
            Usage::Open { pid, comm, path } => {
                write!(f, "pid {pid} ({comm}) has {} open", path.display())
            }
            Usage::Unchecked { pids, reason } => {
                let shown: Vec<String> = pids.iter().take(8).map(u32::to_string).collect();
                let more = if pids.len() > 8 { ", ..." } else { "" };
                write!(
                    f,
                    "the open files of {} process(es) (pid {}{more}) cannot be inspected: {reason}; \
                     run as root",
                    pids.len(),
                    shown.join(", ")
                )
            }
        }
    }
}

/// Every reason `function` must not be taken from its driver now; empty when it is free.
/// Our own process's open files are not counted.
pub fn users(roots: &SysRoots, function: &NvmeFunction) -> Result<Vec<Usage>, PciError> {
    let blocks = block_devices(roots, function)?;
    let mut found = Vec::new();
    if !blocks.is_empty() {
        let mountinfo = roots.proc.join("self/mountinfo");
        let mounts = parse_mountinfo(&read_or_empty(&mountinfo, true)?);
        let swaps = parse_swaps(&read_or_empty(&roots.proc.join("swaps"), false)?);
        for block in &blocks {
            let before = found.len();
            for m in &mounts {
                if block.devnum == Some(m.devnum) || is_dev_path(roots, &m.source, &block.name) {
                    found.push(Usage::Mounted {
                        device: block.name.clone(),
                        mount_point: m.mount_point.clone(),
                        fstype: m.fstype.clone(),
                    });
                }
            }
            if swaps.iter().any(|s| is_dev_path(roots, s, &block.name)) {
                found.push(Usage::Swap {
                    device: block.name.clone(),
                });
            }
            for holder in list_dir(&block.sysdir.join("holders"))? {
                found.push(Usage::Held {
                    device: block.name.clone(),
                    holder: describe_holder(roots, &holder),
                });
            }
            if found.len() == before && exclusively_claimed(&roots.dev.join(&block.name)) {
                found.push(Usage::Busy {
                    device: block.name.clone(),
                });
            }
        }
    }
    found.dedup();
    found.extend(open_files(roots, &device_files(roots, function, &blocks)?)?);
    Ok(found)
}

/// A namespace's or partition's block device.
#[derive(Debug)]
struct BlockDev {
    /// "nvme0n1", "nvme0n1p1".
    name: String,
    /// Its `/sys/block/...` directory.
    sysdir: PathBuf,
    /// Its device number, from `dev`.
    devnum: Option<(u32, u32)>,
}

/// The function's namespaces and their partitions.
fn block_devices(roots: &SysRoots, function: &NvmeFunction) -> Result<Vec<BlockDev>, PciError> {
    let mut blocks = Vec::new();
    for ns in &function.namespaces {
        let sysdir = roots.block_dir(ns);
        let partitions: Vec<String> = list_dir(&sysdir)?
            .into_iter()
            .filter(|name| {
                name.strip_prefix(ns.as_str())
                    .and_then(|r| r.strip_prefix('p'))
                    .is_some_and(all_digits)
            })
            .collect();
        blocks.push(BlockDev {
            name: ns.clone(),
            devnum: read_devnum(&sysdir.join("dev")),
            sysdir: sysdir.clone(),
        });
        for part in partitions {
            let dir = sysdir.join(&part);
            blocks.push(BlockDev {
                name: part,
                devnum: read_devnum(&dir.join("dev")),
                sysdir: dir,
            });
        }
    }
    Ok(blocks)
}

/// The device files through which a process could use the function, as the kernel names
/// them in `/proc/PID/fd` (under `/dev`).
fn device_files(
    roots: &SysRoots,
    function: &NvmeFunction,
    blocks: &[BlockDev],
) -> Result<BTreeSet<String>, PciError> {
    let mut names: BTreeSet<String> = blocks.iter().map(|b| b.name.clone()).collect();
    names.extend(function.controller.iter().cloned());
    names.extend(
        function
            .namespaces
            .iter()
            .filter_map(|ns| ns.strip_prefix("nvme").map(|rest| format!("ng{rest}"))),
    );
    if function.bound_to_vfio() {
        if let Some(group) = function.iommu_group {
            names.insert(format!("vfio/{group}"));
        }
        let cdevs = list_dir(&roots.device_dir(function.address).join("vfio-dev"))?;
        names.extend(cdevs.into_iter().map(|c| format!("vfio/devices/{c}")));
    }
    Ok(names)
}

/// Every other process with one of `names` (relative to /dev) open.
fn open_files(roots: &SysRoots, names: &BTreeSet<String>) -> Result<Vec<Usage>, PciError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let own = std::process::id();
    let mut found = Vec::new();
    let mut hidden = Vec::new();
    let mut hidden_reason = String::new();
    let mut pids: Vec<u32> = list_dir(&roots.proc)?
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids.into_iter().filter(|&p| p != own) {
        let fd_dir = roots.proc.join(pid.to_string()).join("fd");
        let fds = match fs::read_dir(&fd_dir) {
            Ok(fds) => fds,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                hidden.push(pid);
                hidden_reason = e.to_string();
                continue;
            }
            // Exited while we looked, or a kernel thread without a file table.
            Err(_) => continue,
        };
        let mut seen = BTreeSet::new();
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let hit = names.iter().find(|name| is_dev_path(roots, &target, name));
            if let Some(name) = hit {
                if seen.insert(name.clone()) {
                    found.push(Usage::Open {
                        pid,
                        comm: comm(roots, pid),
                        path: Path::new("/dev").join(name),
                    });
                }
            }
        }
    }
    if !hidden.is_empty() {
        found.push(Usage::Unchecked {
            pids: hidden,
            reason: hidden_reason,
        });
    }
    Ok(found)
}

/// `/proc/PID/comm`, or "?" when it cannot be read.
fn comm(roots: &SysRoots, pid: u32) -> String {
    read_trimmed(&roots.proc.join(pid.to_string()).join("comm")).unwrap_or_else(|_| "?".to_string())
}

/// A holder's name, with the device-mapper name when it has one: "dm-0 (vg0-root)".
fn describe_holder(roots: &SysRoots, holder: &str) -> String {
    match read_trimmed(&roots.block_dir(holder).join("dm/name")) {
        Ok(dm) if !dm.is_empty() => format!("{holder} ({dm})"),
        _ => holder.to_string(),
    }
}

/// True when `path` names `/dev/NAME` (as processes see it, or under `roots.dev`).
fn is_dev_path(roots: &SysRoots, path: &Path, name: &str) -> bool {
    path == Path::new("/dev").join(name) || path == roots.dev.join(name)
}

/// True when `path` is a block device that refuses an exclusive open with `EBUSY`. The
/// open is read-only and closed at once.
fn exclusively_claimed(path: &Path) -> bool {
    let is_block = fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
    if !is_block {
        return false;
    }
    let open = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK)
        .open(path);
    matches!(open, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

/// A `MAJOR:MINOR` device number file; `None` when absent or malformed.
fn read_devnum(path: &Path) -> Option<(u32, u32)> {
    parse_devnum(&fs::read_to_string(path).ok()?)
}

/// `"259:1"` as (259, 1).
fn parse_devnum(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The file at `path`; empty when it does not exist and `required` is false.
fn read_or_empty(path: &Path, required: bool) -> Result<String, PciError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(String::new()),
        Err(e) => Err(PciError::sysfs("reading", path, e)),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MountEntry {
    /// The mounted device's number (for btrfs and other multi-device filesystems, an
    /// anonymous one).
    pub devnum: (u32, u32),
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The filesystem type.
    pub fstype: String,
    /// The mount source, e.g. "/dev/nvme0n1p1".
    pub source: PathBuf,
}

/// Parses `/proc/PID/mountinfo`; malformed lines are skipped.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            Some(MountEntry {
                devnum: parse_devnum(fields.get(2)?)?,
                mount_point: unescape(fields.get(4)?),
                fstype: fields.get(separator + 1)?.to_string(),
                source: unescape(fields.get(separator + 2)?),
            })
        })
        .collect()
}

/// The swap areas (device or file paths) in `/proc/swaps`.
pub(crate) fn parse_swaps(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter(|line| !line.starts_with("Filename"))
        .filter_map(|line| line.split_whitespace().next())
        .map(unescape)
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for space, `\011` tab, `\012` newline, `\134`
/// backslash) in a procfs path field.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d[0] <= b'3' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeTree;
    use super::super::sysfs::find_nvme;
    use super::*;

    const ADDR: &str = "0000:01:00.0";

    /// A controller the nvme driver has: nvme0 with namespace nvme0n1 (259:0) and its
    /// partitions nvme0n1p1 (259:1) and nvme0n1p2 (259:2).
    fn kernel_controller() -> FakeTree {
        let t = FakeTree::new();
        t.function(ADDR, Some("nvme"), Some(3), true);
        t.namespaces(ADDR, "nvme0", &["nvme0n1"]);
        t.block("nvme0n1", "259:0");
        t.block("nvme0n1/nvme0n1p1", "259:1");
        t.block("nvme0n1/nvme0n1p2", "259:2");
        t
    }

    fn users_of(t: &FakeTree) -> Vec<Usage> {
        let f = find_nvme(&t.roots, ADDR.parse().unwrap()).unwrap();
        users(&t.roots, &f).unwrap()
    }

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 259:1 / /mnt/my\\040data rw shared:5 master:2 - xfs /dev/nvme0n1p1 rw\n\
                    41 22 0:45 /sub /srv/tab\\011back\\134slash rw - btrfs /dev/nvme0n1p2 rw\n\
                    garbage line\n\
                    42 22 0:46 / /x rw - tmpfs\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].devnum, (259, 1));
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/my data"));
        assert_eq!(m[1].fstype, "xfs");
        assert_eq!(m[1].source, PathBuf::from("/dev/nvme0n1p1"));
        assert_eq!(m[2].mount_point, PathBuf::from("/srv/tab\tback\\slash"));
        assert_eq!((m[2].devnum, m[2].fstype.as_str()), ((0, 45), "btrfs"));
        // A backslash not followed by three octal digits stays as it is.
        assert_eq!(unescape("a\\9b\\04"), PathBuf::from("a\\9b\\04"));
    }

    #[test]
    fn parses_swaps() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/nvme0n1p2                          partition\t8388604\t\t0\t\t-2\n\
                    /swap\\040file                           file\t\t1048572\t\t0\t\t-3\n";
        assert_eq!(
            parse_swaps(text),
            [PathBuf::from("/dev/nvme0n1p2"), PathBuf::from("/swap file")]
        );
        assert!(parse_swaps("Filename\tType\tSize\tUsed\tPriority\n").is_empty());
    }

    #[test]
    fn free_controller_has_no_users_and_our_own_fds_do_not_count() {
        let t = kernel_controller();
        t.open(std::process::id(), "spillway", 3, "/dev/nvme0n1");
        t.open(77, "bash", 0, "/dev/pts/0");
        t.open(78, "cat", 3, "/dev/nvme0n10");
        assert_eq!(users_of(&t), Vec::new());
    }

    #[test]
    fn finds_mounted_namespace_by_device_number() {
        let t = kernel_controller();
        t.append(
            "proc/self/mountinfo",
            "50 22 259:0 / /data rw - ext4 /dev/disk/by-label/x rw\n",
        );
        let u = users_of(&t);
        assert_eq!(u.len(), 1, "{u:?}");
        assert_eq!(u[0].to_string(), "nvme0n1 is mounted at /data (ext4)");
    }

    #[test]
    fn finds_mounted_partition_by_source_with_escaped_mount_point() {
        let t = kernel_controller();
        // btrfs reports an anonymous device number; the source still names the partition.
        t.append(
            "proc/self/mountinfo",
            "51 22 0:47 / /mnt/big\\040disk rw - btrfs /dev/nvme0n1p1 rw\n",
        );
        let u = users_of(&t);
        assert_eq!(
            u,
            [Usage::Mounted {
                device: "nvme0n1p1".into(),
                mount_point: "/mnt/big disk".into(),
                fstype: "btrfs".into()
            }]
        );
    }

    #[test]
    fn finds_swap_and_device_mapper_holders() {
        let t = kernel_controller();
        t.append("proc/swaps", "/dev/nvme0n1p2 partition 8388604 0 -2\n");
        t.write("sys/block/nvme0n1/nvme0n1p1/holders/dm-0", "");
        t.write("sys/block/dm-0/dm/name", "vg0-root\n");
        t.write("sys/block/nvme0n1/holders/md127", "");
        let shown: Vec<String> = users_of(&t).iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "nvme0n1 is held by md127",
                "nvme0n1p1 is held by dm-0 (vg0-root)",
                "nvme0n1p2 is in use as swap",
            ]
        );
    }

    #[test]
    fn finds_processes_with_block_generic_and_controller_devices_open() {
        let t = kernel_controller();
        t.open(1234, "postgres", 7, "/dev/nvme0n1p1");
        t.open(1234, "postgres", 8, "/dev/nvme0n1p1");
        t.open(1300, "nvme", 3, "/dev/nvme0");
        t.open(1400, "fio", 5, "/dev/ng0n1");
        let shown: Vec<String> = users_of(&t).iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "pid 1234 (postgres) has /dev/nvme0n1p1 open",
                "pid 1300 (nvme) has /dev/nvme0 open",
                "pid 1400 (fio) has /dev/ng0n1 open",
            ]
        );
    }

    #[test]
    fn finds_processes_with_the_vfio_group_or_device_open() {
        let t = FakeTree::new();
        t.function(ADDR, Some("vfio-pci"), Some(3), false);
        t.write(
            &format!("sys/bus/pci/devices/{ADDR}/vfio-dev/vfio0/dev"),
            "511:0\n",
        );
        t.open(2000, "qemu", 20, "/dev/vfio/3");
        t.open(2001, "spdk_tgt", 9, "/dev/vfio/devices/vfio0");
        t.open(2002, "other", 9, "/dev/vfio/30");
        let shown: Vec<String> = users_of(&t).iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "pid 2000 (qemu) has /dev/vfio/3 open",
                "pid 2001 (spdk_tgt) has /dev/vfio/devices/vfio0 open",
            ]
        );
    }

    #[test]
    fn describes_unchecked_processes() {
        let u = Usage::Unchecked {
            pids: (1..=10).collect(),
            reason: "Permission denied (os error 13)".into(),
        };
        let text = u.to_string();
        assert!(
            text.contains("10 process(es) (pid 1, 2, 3, 4, 5, 6, 7, 8, ...)"),
            "{text}"
        );
        assert!(text.ends_with("run as root"), "{text}");
    }
}
