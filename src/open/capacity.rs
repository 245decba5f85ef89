//! How many bytes the engine may store over its paths, accounted per filesystem.
//!
//! Paths on one filesystem share its space, whatever their number: eight directories on
//! one disk get that disk's space once, not eight times. The engine's capacity maps onto
//! its paths as the striped set lays it out (`shares` in `spillway_runtime::striped`): in
//! rounds of `stripe` × (sum of the stripe weights) bytes, a round counted whole once
//! started, each path holding its weight's stripe units of every round. One path is a set
//! of one, of weight 1, in units of one byte: it holds the capacity itself.
//!
//! - Without `capacity=`, the paths on each filesystem may fill half of its free space
//!   ([`DEFAULT_CAPACITY_FRACTION`]) together, split among them by weight; the set's
//!   capacity is the most whole rounds that every filesystem has room for.
//! - With `capacity=`, a filesystem whose paths' shares pass its free space is refused.
//! - A file that exists already keeps its allocated blocks: they count as available to it
//!   (up to its share, under an explicit capacity), on top of the filesystem's free space.
//! - A memory-backed filesystem (tmpfs, ramfs) takes every byte written to it from the
//!   host's memory: the bytes of all such paths together ([`ram_backed_bytes`]) must leave
//!   the host [`memory_headroom`] of its available memory ([`check_ram`]), and by default they
//!   take at most half of it.
//! - Block devices keep their own rules: they need `capacity=`, which their size bounds
//!   when they open; nothing here counts them.
//!
//! The accounting is pure, over [`PathFacts`] gathered from the system ([`storage_capacity`]
//! does both), so that it can be tried on any made-up set of filesystems.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use spillway_runtime::{Error, Result};

use super::error::{CapacityRefusal, OpenError};
use crate::fs::{memory_headroom, Filesystem, HostMemory};
use crate::size::format_size;

/// Without an explicit capacity, the paths on a filesystem may fill this fraction of its
/// free space (files grow as tensors are written), and the paths on memory-backed
/// filesystems this fraction of the host's available memory.
pub(super) const DEFAULT_CAPACITY_FRACTION: u64 = 2;

/// What the accounting knows of one storage path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PathFacts {
    /// The path, for messages.
    pub path: PathBuf,
    /// Its stripe weight: units of every round it holds (1 for a single path).
    pub weight: u64,
    /// The filesystem holding its file; `None` for a block device (or a path whose
    /// filesystem cannot be told, under an explicit capacity), which is not accounted.
    pub fs: Option<Filesystem>,
    /// Bytes its file holds already (an existing file's allocated blocks): it may use them
    /// without taking any of the filesystem's free space.
    pub held: u64,
}

/// Refuses a host tier (`host_tier` bytes of pinned host memory) larger than the host's
/// available memory less [`memory_headroom`]; nothing to check when `mem` is unknown.
pub(crate) fn check_host_tier(host_tier: u64, mem: Option<HostMemory>) -> Result<()> {
    let Some(mem) = mem else { return Ok(()) };
    let room = mem.available.saturating_sub(memory_headroom(mem.total));
    if host_tier <= room {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "host_tier={host_tier} asks for {} of pinned host memory, but the host has {} available, {} of which \
         stay free for everything else: set host_tier to at most {}",
        bytes(host_tier),
        bytes(mem.available),
        bytes(memory_headroom(mem.total)),
        bytes(room),
    )))
}

/// Bytes of one round: `unit` times the sum of the weights.
fn round_bytes(paths: &[PathFacts], unit: u64) -> u128 {
    u128::from(unit) * paths.iter().map(|p| u128::from(p.weight)).sum::<u128>()
}

/// Rounds a capacity takes (the last one counted whole).
fn rounds(paths: &[PathFacts], unit: u64, capacity: u64) -> u128 {
    u128::from(capacity).div_ceil(round_bytes(paths, unit).max(1))
}

/// Bytes `capacity` puts on the paths of weight `weight` together.
fn share(paths: &[PathFacts], unit: u64, capacity: u64, weight: u64) -> u128 {
    rounds(paths, unit, capacity) * u128::from(unit) * u128::from(weight)
}

/// Saturated to 64 bits.
fn sat(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Paths sharing one filesystem.
struct Group<'a> {
    fs: &'a Filesystem,
    members: Vec<&'a PathFacts>,
    paths: Vec<&'a Path>,
    /// Sum of their weights.
    weight: u64,
    /// Sum of what their files hold.
    held: u64,
}

impl Group<'_> {
    /// Bytes its paths may have: the free space and what their files hold.
    fn available(&self) -> u64 {
        self.fs.free.saturating_add(self.held)
    }
}

/// The accounted paths, by filesystem (in the order first given).
fn groups(paths: &[PathFacts]) -> Vec<Group<'_>> {
    let mut order: Vec<Group<'_>> = Vec::new();
    let mut index: BTreeMap<u64, usize> = BTreeMap::new();
    for p in paths {
        let Some(fs) = &p.fs else { continue };
        let i = *index.entry(fs.id).or_insert_with(|| {
            order.push(Group {
                fs,
                members: Vec::new(),
                paths: Vec::new(),
                weight: 0,
                held: 0,
            });
            order.len() - 1
        });
        let g = &mut order[i];
        g.members.push(p);
        g.paths.push(&p.path);
        g.weight += p.weight;
        g.held = g.held.saturating_add(p.held);
    }
    order
}

/// The paths on memory-backed filesystems, all together (they share the host's memory).
struct RamPaths<'a> {
    members: Vec<&'a PathFacts>,
    paths: Vec<&'a Path>,
    weight: u64,
    held: u64,
}

fn ram_paths(paths: &[PathFacts]) -> RamPaths<'_> {
    let on_ram: Vec<&PathFacts> = paths
        .iter()
        .filter(|p| p.fs.as_ref().is_some_and(|f| f.ram_backed))
        .collect();
    RamPaths {
        paths: on_ram.iter().map(|p| p.path.as_path()).collect(),
        members: on_ram.clone(),
        weight: on_ram.iter().map(|p| p.weight).sum(),
        held: on_ram.iter().fold(0u64, |s, p| s.saturating_add(p.held)),
    }
}

/// Of what the files of `members` hold already, the part a `capacity` has them use: each
/// file's blocks up to its share (a file holding more than its share keeps the rest, which
/// no other path can use).
fn held_credit(paths: &[PathFacts], unit: u64, capacity: u64, members: &[&PathFacts]) -> u64 {
    members.iter().fold(0u64, |sum, p| {
        let used = sat(share(paths, unit, capacity, p.weight)).min(p.held);
        sum.saturating_add(used)
    })
}

/// Bytes of host memory the paths on memory-backed filesystems may hold besides
/// `extra_ram`: the available memory, with what their files hold already, less the
/// headroom and `extra_ram`.
fn ram_room(mem: HostMemory, held: u64, extra_ram: u64) -> u64 {
    mem.available
        .saturating_add(held)
        .saturating_sub(memory_headroom(mem.total))
        .saturating_sub(extra_ram)
}

/// Bytes of a `capacity` over `paths` that are host memory: the shares of the paths on
/// tmpfs or ramfs (every byte written there is RAM), in `unit`-byte stripe units (1 for a
/// single path).
pub(crate) fn ram_backed_bytes(paths: &[PathFacts], unit: u64, capacity: u64) -> u64 {
    let ram = ram_paths(paths);
    sat(share(paths, unit, capacity, ram.weight))
}

/// Refuses a `capacity` whose memory-backed bytes ([`ram_backed_bytes`]), with `extra_ram`
/// bytes of other host memory the engine takes (pinned buffers, a host-memory tier), pass
/// the host's available memory less [`memory_headroom`]:
/// `ram_backed + extra_ram ≤ MemAvailable + held − headroom`, where `held` is what those
/// paths' files hold already, up to their shares (memory they have taken before). Nothing
/// to check without memory-backed paths, or when `mem` is unknown.
pub(crate) fn check_ram(
    paths: &[PathFacts],
    unit: u64,
    capacity: u64,
    extra_ram: u64,
    mem: Option<HostMemory>,
) -> std::result::Result<(), CapacityRefusal> {
    let ram_bytes = ram_backed_bytes(paths, unit, capacity);
    let (Some(mem), true) = (mem, ram_bytes > 0) else {
        return Ok(());
    };
    let ram = ram_paths(paths);
    let held = held_credit(paths, unit, capacity, &ram.members);
    if ram_bytes <= ram_room(mem, held, extra_ram) {
        return Ok(());
    }
    Err(CapacityRefusal::Memory {
        capacity,
        paths: owned(&ram.paths),
        wanted: ram_bytes,
        available: mem.available,
        held,
        headroom: memory_headroom(mem.total),
        extra_ram,
        largest: largest_capacity(paths, unit, extra_ram, Some(mem)),
    })
}

/// Refuses a `capacity` that puts more on the paths of some filesystem than it has
/// available (its free space, and what their files hold already).
pub(crate) fn check_filesystems(
    paths: &[PathFacts],
    unit: u64,
    capacity: u64,
) -> std::result::Result<(), CapacityRefusal> {
    for g in groups(paths) {
        let ask = share(paths, unit, capacity, g.weight);
        let held = held_credit(paths, unit, capacity, &g.members);
        let available = g.fs.free.saturating_add(held);
        if ask <= u128::from(available) {
            continue;
        }
        return Err(CapacityRefusal::Filesystem {
            capacity,
            mount: g.fs.mount.clone(),
            ram_backed: g.fs.ram_backed,
            paths: owned(&g.paths),
            wanted: sat(ask),
            available,
            held,
            largest: largest_capacity(paths, unit, 0, None),
        });
    }
    Ok(())
}

/// The largest capacity that passes [`check_filesystems`] and, with `mem`, [`check_ram`]
/// (whole rounds; 0 when not even one fits), counting what the files hold whole (so that
/// a file holding more than its share can make it a little high).
fn largest_capacity(paths: &[PathFacts], unit: u64, extra_ram: u64, mem: Option<HostMemory>) -> u64 {
    let round = round_bytes(paths, unit).max(1);
    let mut most = u128::from(u64::MAX) / round;
    for g in groups(paths) {
        most = most.min(u128::from(g.available()) / (u128::from(unit) * u128::from(g.weight)));
    }
    let ram = ram_paths(paths);
    if let (Some(mem), true) = (mem, ram.weight > 0) {
        most = most.min(
            u128::from(ram_room(mem, ram.held, extra_ram)) / (u128::from(unit) * u128::from(ram.weight)),
        );
    }
    sat(most * round)
}

/// The capacity without `capacity=`: the most whole rounds for which the paths on each
/// filesystem take at most half of what it has available, and the paths on memory-backed
/// filesystems at most half of the host's available memory (less `extra_ram`, with what
/// their files hold) and never past [`check_ram`]'s limit.
pub(crate) fn default_capacity(
    paths: &[PathFacts],
    unit: u64,
    extra_ram: u64,
    mem: Option<HostMemory>,
) -> Result<u64> {
    let round = round_bytes(paths, unit).max(1);
    let unit = u128::from(unit);
    // The offsets of the set must fit 64 bits.
    let mut most = u128::from(u64::MAX) / round;
    let mut bounded = false;
    for g in groups(paths) {
        bounded = true;
        let half = g.available() / DEFAULT_CAPACITY_FRACTION;
        let fits = u128::from(half) / (unit * u128::from(g.weight));
        if fits == 0 {
            return Err(Error::invalid(format!(
                "without capacity=, {} may use half of the {} available on the filesystem at {}, \
                 which is less than one stripe unit for each weight of theirs ({} bytes); free \
                 space there, or pass capacity=",
                list(&g.paths),
                bytes(g.available()),
                g.fs.mount.display(),
                unit * u128::from(g.weight),
            )));
        }
        most = most.min(fits);
    }
    let ram = ram_paths(paths);
    if ram.weight > 0 {
        let Some(mem) = mem else {
            return Err(Error::invalid(format!(
                "cannot read /proc/meminfo to tell how much of the host's memory {} may take (they \
                 are on a memory-backed filesystem, whose space is RAM): pass capacity=",
                list(&ram.paths)
            )));
        };
        let usable = mem.available.saturating_add(ram.held).saturating_sub(extra_ram);
        let room = (usable / DEFAULT_CAPACITY_FRACTION).min(ram_room(mem, ram.held, extra_ram));
        let fits = u128::from(room) / (unit * u128::from(ram.weight));
        if fits == 0 {
            return Err(Error::invalid(format!(
                "without capacity=, {} (on a memory-backed filesystem: tmpfs space is RAM) may take \
                 {} of the host's memory, less than one stripe unit for each weight of theirs; free \
                 memory, or put the paths on a disk",
                list(&ram.paths),
                bytes(room),
            )));
        }
        most = most.min(fits);
    }
    if !bounded {
        return Err(Error::invalid(
            "cannot tell how much space the storage paths have: pass capacity= (bytes the engine may use)",
        ));
    }
    Ok(sat(most * round))
}

/// The engine's capacity over `paths` (in `unit`-byte stripe units; 1 for a single path):
/// `capacity` once checked against every filesystem and the host's memory, or the default
/// without it. `extra_ram` is other host memory the engine takes (see [`check_ram`]).
pub(crate) fn settle(
    paths: &[PathFacts],
    unit: u64,
    capacity: Option<u64>,
    extra_ram: u64,
    mem: Option<HostMemory>,
) -> std::result::Result<u64, OpenError> {
    let capacity = match capacity {
        Some(c) => {
            check_filesystems(paths, unit, c)?;
            c
        }
        None => default_capacity(paths, unit, extra_ram, mem)?,
    };
    check_ram(paths, unit, capacity, extra_ram, mem)?;
    Ok(capacity)
}

/// The facts of the storage `files` (each with whether it is a directory for an anonymous
/// file), with stripe `weights` (empty: 1 each). Without `capacity`, a path whose
/// filesystem cannot be told is refused; with it, such a path is not accounted (opening it
/// says what is wrong).
fn gather(files: &[(PathBuf, bool)], weights: &[u32], capacity: Option<u64>) -> Result<Vec<PathFacts>> {
    use std::os::unix::fs::FileTypeExt;
    let mut facts = Vec::with_capacity(files.len());
    for (i, (file, anonymous)) in files.iter().enumerate() {
        let weight = weights.get(i).map_or(1, |&w| u64::from(w.max(1)));
        let meta = std::fs::metadata(file).ok();
        if meta.as_ref().is_some_and(|m| m.file_type().is_block_device()) {
            facts.push(PathFacts {
                path: file.clone(),
                weight,
                fs: None,
                held: 0,
            });
            continue;
        }
        // The filesystem of the directory (an anonymous file's), of the file when it
        // exists, else of the directory it will be made in.
        let at = if *anonymous || meta.is_some() {
            file.as_path()
        } else {
            file.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        };
        let fs = crate::fs::filesystem(at);
        if fs.is_none() && capacity.is_none() {
            return Err(Error::invalid(format!(
                "cannot tell how much space {} has: pass capacity= (bytes the engine may use)",
                at.display()
            )));
        }
        facts.push(PathFacts {
            path: file.clone(),
            weight,
            fs,
            held: if *anonymous {
                0
            } else {
                crate::fs::allocated_bytes(file)
            },
        });
    }
    Ok(facts)
}

/// The engine's capacity over storage `files` (each with whether it is a directory for an
/// anonymous file), striped in `unit`-byte units with `weights` (a single path: unit 1, no
/// weights): [`settle`] over the facts of the system. `extra_ram` is the host memory the
/// engine takes besides its storage (a host-memory tier): it counts against the host's
/// memory together with the storage on tmpfs or ramfs ([`check_ram`]).
pub(super) fn storage_capacity(
    files: &[(PathBuf, bool)],
    weights: &[u32],
    unit: u64,
    capacity: Option<u64>,
    extra_ram: u64,
) -> std::result::Result<u64, OpenError> {
    let facts = gather(files, weights, capacity)?;
    let on_ram = facts.iter().any(|p| p.fs.as_ref().is_some_and(|f| f.ram_backed));
    let mem = if on_ram { crate::fs::host_memory() } else { None };
    settle(&facts, unit, capacity, extra_ram, mem)
}

/// `n bytes (size)`.
pub(super) fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} bytes")
    } else {
        format!("{n} bytes ({})", format_size(n))
    }
}

/// The paths, comma-separated.
pub(super) fn list<P: AsRef<Path>>(paths: &[P]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.as_ref().display().to_string()).collect();
    shown.join(", ")
}

/// The paths, owned.
fn owned(paths: &[&Path]) -> Vec<PathBuf> {
    paths.iter().map(|p| p.to_path_buf()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn fs(id: u64, mount: &str, free: u64, ram_backed: bool) -> Filesystem {
        Filesystem {
            id,
            mount: PathBuf::from(mount),
            free,
            ram_backed,
        }
    }

    fn on(path: &str, fs: &Filesystem) -> PathFacts {
        PathFacts {
            path: PathBuf::from(path),
            weight: 1,
            fs: Some(fs.clone()),
            held: 0,
        }
    }

    fn weighted(mut p: PathFacts, weight: u64) -> PathFacts {
        p.weight = weight;
        p
    }

    fn mem(available: u64, total: u64) -> Option<HostMemory> {
        Some(HostMemory { available, total })
    }

    #[test]
    fn a_host_tier_past_the_available_memory_less_headroom_is_refused_naming_the_setting() {
        // 100 GiB available of 128: 4 GiB headroom leaves 96.
        assert!(check_host_tier(96 * GIB, mem(100 * GIB, 128 * GIB)).is_ok());
        let err = check_host_tier(97 * GIB, mem(100 * GIB, 128 * GIB))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("host_tier=") && err.contains("at most 103079215104 bytes"),
            "{err}"
        );
        assert!(
            check_host_tier(u64::MAX, None).is_ok(),
            "unknown memory: nothing to check"
        );
    }

    /// Bytes `capacity` puts on each filesystem (by id), as the striped set reserves them.
    fn per_fs(paths: &[PathFacts], unit: u64, capacity: u64) -> BTreeMap<u64, u128> {
        let mut sums = BTreeMap::new();
        for p in paths {
            if let Some(f) = &p.fs {
                *sums.entry(f.id).or_default() += share(paths, unit, capacity, p.weight);
            }
        }
        sums
    }

    #[test]
    fn eight_paths_on_one_tmpfs_share_half_of_it_once() {
        let shm = fs(1, "/dev/shm", 16 * GIB, true);
        let paths: Vec<PathFacts> = "abcdefgh"
            .chars()
            .map(|c| on(&format!("/dev/shm/{c}"), &shm))
            .collect();
        let c = default_capacity(&paths, MIB, 0, mem(64 * GIB, 64 * GIB)).unwrap();
        assert_eq!(c, 8 * GIB, "half of the tmpfs, not 8 times half of it");
        assert_eq!(per_fs(&paths, MIB, c)[&1], u128::from(8 * GIB));
        assert_eq!(ram_backed_bytes(&paths, MIB, c), 8 * GIB);
        settle(&paths, MIB, None, 0, mem(64 * GIB, 64 * GIB)).unwrap();
    }

    #[test]
    fn the_default_gives_no_filesystem_more_than_half_of_it() {
        let (a, b, c) = (
            fs(1, "/a", 10 * GIB, false),
            fs(2, "/b", 100 * GIB + 12345, false),
            fs(3, "/c", 3 * GIB + 7, false),
        );
        let sets: Vec<Vec<PathFacts>> = vec![
            vec![on("/a/1", &a), on("/a/2", &a), on("/b/1", &b)],
            vec![
                weighted(on("/a/1", &a), 3),
                on("/b/1", &b),
                weighted(on("/b/2", &b), 2),
            ],
            vec![
                on("/c/1", &c),
                weighted(on("/b/1", &b), 5),
                on("/a/1", &a),
                on("/c/2", &c),
            ],
            vec![on("/c/1", &c)],
        ];
        let facts = [a, b, c];
        for paths in &sets {
            for unit in [4096, MIB, 3 * MIB] {
                let cap = default_capacity(paths, unit, 0, None).unwrap();
                let round = sat(round_bytes(paths, unit));
                assert_eq!(cap % round, 0, "whole rounds");
                let used = per_fs(paths, unit, cap);
                for f in &facts {
                    if let Some(&u) = used.get(&f.id) {
                        assert!(
                            u <= u128::from(f.free / 2),
                            "{} gets {u} of {}",
                            f.mount.display(),
                            f.free
                        );
                    }
                }
                // One more round would pass half of some filesystem: the default is the most.
                let more = per_fs(paths, unit, cap + round);
                assert!(
                    facts
                        .iter()
                        .any(|f| more.get(&f.id).is_some_and(|&u| u > u128::from(f.free / 2))),
                    "{paths:?} unit {unit}: {cap} is not the most"
                );
                check_filesystems(paths, unit, cap).unwrap();
            }
        }
        // Two paths on one filesystem and one on a larger one: the shared one bounds it.
        let cap = default_capacity(&sets[0], MIB, 0, None).unwrap();
        assert_eq!(cap, 3 * (5 * GIB / 2));
    }

    #[test]
    fn one_path_gets_half_of_its_free_space_and_of_what_its_file_holds() {
        let disk = fs(1, "/mnt/nvme", 10 * GIB + 1, false);
        assert_eq!(
            default_capacity(&[on("/mnt/nvme/x", &disk)], 1, 0, None).unwrap(),
            5 * GIB
        );
        let mut held = on("/mnt/nvme/spill.bin", &disk);
        held.held = 4 * GIB;
        assert_eq!(default_capacity(&[held], 1, 0, None).unwrap(), 7 * GIB);
    }

    #[test]
    fn tmpfs_takes_at_most_half_of_the_available_memory_by_default() {
        let shm = fs(1, "/dev/shm", 100 * GIB, true);
        let paths = [on("/dev/shm/a", &shm), on("/dev/shm/b", &shm)];
        let c = default_capacity(&paths, MIB, 0, mem(8 * GIB, 16 * GIB)).unwrap();
        assert_eq!(c, 4 * GIB);
        // Little memory available: the headroom bounds it below half.
        let c = default_capacity(&paths, MIB, 0, mem(6 * GIB, 64 * GIB)).unwrap();
        assert_eq!(c, 2 * GIB, "6 GiB available less 4 GiB of headroom");
        // Other host memory the engine takes comes off first.
        let c = default_capacity(&paths, MIB, 2 * GIB, mem(8 * GIB, 16 * GIB)).unwrap();
        assert_eq!(c, 3 * GIB);
        check_ram(&paths, MIB, c, 2 * GIB, mem(8 * GIB, 16 * GIB)).unwrap();
        // ramfs has no size: memory alone bounds it.
        let ramfs = fs(2, "/mnt/ram", u64::MAX, true);
        let c = default_capacity(&[on("/mnt/ram/a", &ramfs)], 1, 0, mem(8 * GIB, 16 * GIB)).unwrap();
        assert_eq!(c, 4 * GIB);
        let e = default_capacity(&[on("/mnt/ram/a", &ramfs)], 1, 0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/proc/meminfo") && e.contains("pass capacity="), "{e}");
        let e = default_capacity(&paths, MIB, 0, mem(4 * GIB, 64 * GIB))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tmpfs space is RAM") && e.contains("/dev/shm/a, /dev/shm/b"),
            "{e}"
        );
    }

    #[test]
    fn the_memory_headroom_is_a_tenth_at_most_4_gib() {
        assert_eq!(memory_headroom(16 * GIB), 16 * GIB / 10);
        assert_eq!(memory_headroom(40 * GIB), 4 * GIB);
        assert_eq!(memory_headroom(2048 * GIB), 4 * GIB);
    }

    #[test]
    fn a_capacity_on_tmpfs_past_the_available_memory_is_refused() {
        let shm = fs(1, "/dev/shm", 100 * GIB, true);
        let disk = fs(2, "/mnt/nvme", 1000 * GIB, false);
        let paths = [on("/dev/shm/a", &shm), on("/mnt/nvme/b", &disk)];
        // 16 GiB of memory: 1.6 GiB of headroom, 6.4 GiB of 8 GiB available for tmpfs.
        let m = mem(8 * GIB, 16 * GIB);
        assert_eq!(
            ram_backed_bytes(&paths, MIB, 12 * GIB),
            6 * GIB,
            "half is on the disk"
        );
        settle(&paths, MIB, Some(12 * GIB), 0, m).unwrap();
        let e = settle(&paths, MIB, Some(14 * GIB), 0, m).unwrap_err().to_string();
        for want in [
            "capacity=15032385536",
            "7516192768 bytes (7 GiB) on /dev/shm/a",
            "tmpfs space is RAM",
            "8589934592 bytes (8 GiB) of memory available",
            "1717986918 bytes (1.60 GiB) of which stay free",
            "pass a smaller capacity=",
            "put the paths on a disk",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
        assert!(!e.contains("/mnt/nvme/b"), "only the tmpfs paths: {e}");
        // The extra host memory counts with the tmpfs bytes.
        check_ram(&paths, MIB, 12 * GIB, 0, m).unwrap();
        let e = check_ram(&paths, MIB, 12 * GIB, GIB, m).unwrap_err().to_string();
        assert!(
            e.contains("1073741824 bytes (1 GiB) go to the engine's host memory"),
            "{e}"
        );
        // What the tmpfs files hold already is memory they have.
        let mut holding = paths.clone();
        holding[0].held = GIB;
        check_ram(&holding, MIB, 14 * GIB, 0, m).unwrap();
        // Without tmpfs, or without knowing the memory, nothing to check.
        check_ram(&paths[1..], MIB, 500 * GIB, 0, m).unwrap();
        check_ram(&paths, MIB, 14 * GIB, 0, None).unwrap();
    }

    #[test]
    fn a_capacity_past_a_filesystems_free_space_is_refused_naming_it() {
        let small = fs(7, "/mnt/small", GIB, false);
        let big = fs(8, "/mnt/big", 100 * GIB, false);
        let paths = [
            on("/mnt/small/a", &small),
            on("/mnt/small/b", &small),
            on("/mnt/big/c", &big),
        ];
        check_filesystems(&paths, MIB, 1536 * MIB).unwrap();
        let e = check_filesystems(&paths, MIB, 3 * GIB).unwrap_err().to_string();
        for want in [
            "capacity=3221225472",
            "asks 2147483648 bytes (2 GiB) of the filesystem at /mnt/small for /mnt/small/a, /mnt/small/b",
            "which has 1073741824 bytes (1 GiB) available",
            "at most 1610612736 bytes (1.50 GiB) with these paths",
            "move some of the paths to another filesystem",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
        // What their files hold already counts as theirs.
        let mut holding = paths.clone();
        holding[0].held = 512 * MIB;
        holding[1].held = 512 * MIB;
        check_filesystems(&holding, MIB, 3 * GIB).unwrap();
        let e = check_filesystems(&holding, MIB, 4 * GIB).unwrap_err().to_string();
        assert!(
            e.contains("free space and the 1073741824 bytes (1 GiB) their files hold already"),
            "{e}"
        );
        // A file holding more than its share keeps the rest: no other path can use it.
        let mut one_holds = paths.clone();
        one_holds[0].held = 2 * GIB;
        check_filesystems(&one_holds, MIB, 3 * GIB).unwrap();
        // 4.5 GiB: 1.5 GiB on each path, 3 GiB on the small filesystem, which has 1 GiB free
        // and 1.5 GiB of the 2 GiB the first file holds (its share), not all 2 GiB of it.
        let e = check_filesystems(&one_holds, MIB, 4608 * MIB)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("asks 3221225472 bytes (3 GiB) of the filesystem at /mnt/small"),
            "{e}"
        );
        assert!(
            e.contains("free space and the 1610612736 bytes (1.50 GiB) their files hold already"),
            "{e}"
        );
        // A share on tmpfs says what its space is.
        let shm = fs(9, "/dev/shm", GIB, true);
        let e = check_filesystems(&[on("/dev/shm/a", &shm)], 1, 2 * GIB)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/shm (a memory-backed filesystem: its space is RAM)"),
            "{e}"
        );
    }

    #[test]
    fn block_devices_are_not_accounted() {
        let disk = fs(1, "/mnt/nvme", 10 * GIB, false);
        let block = PathFacts {
            path: PathBuf::from("/dev/nvme1n1"),
            weight: 1,
            fs: None,
            held: 0,
        };
        let paths = [block.clone(), on("/mnt/nvme/a", &disk)];
        // Half of 20 GiB lands on the file: it fits; the device's size is checked at open.
        settle(&paths, MIB, Some(20 * GIB), 0, None).unwrap();
        assert!(settle(&paths, MIB, Some(22 * GIB), 0, None).is_err());
        assert_eq!(
            settle(std::slice::from_ref(&block), 1, Some(u64::MAX), 0, None).unwrap(),
            u64::MAX
        );
        let e = default_capacity(&[block], 1, 0, None).unwrap_err().to_string();
        assert!(e.contains("pass capacity="), "{e}");
    }

    #[test]
    fn a_filesystem_too_small_for_one_round_says_so() {
        let tiny = fs(1, "/mnt/tiny", 3 * MIB, false);
        let paths = [on("/mnt/tiny/a", &tiny), on("/mnt/tiny/b", &tiny)];
        let e = default_capacity(&paths, MIB, 0, None).unwrap_err().to_string();
        assert!(
            e.contains("/mnt/tiny/a, /mnt/tiny/b may use half of the 3145728 bytes (3 MiB) available on the filesystem at /mnt/tiny"),
            "{e}"
        );
        assert_eq!(default_capacity(&paths[..1], MIB, 0, None).unwrap(), MIB);
    }
}
