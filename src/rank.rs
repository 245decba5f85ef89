//! Where this process sits in a multi-GPU job. HPC sites run one process per GPU under
//! torchrun, Slurm or MPI; each launcher tells a process its rank on the node through an
//! environment variable, and spillway reads it instead of asking for scripts around it:
//! the rank picks the process's GPU and, optionally, its own storage paths.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use spillway_runtime::{Error, Result};

/// The variables that carry the local rank, in the order they are looked at, with the
/// launcher that sets each.
pub const LOCAL_RANK_VARS: [(&str, &str); 3] = [
    ("LOCAL_RANK", "torchrun"),
    ("SLURM_LOCALID", "Slurm"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI"),
];

/// This process's rank among the processes of its job on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalRank {
    /// The rank, from 0.
    pub rank: usize,
    /// The variable it came from.
    pub source: &'static str,
}

/// The local rank, from the first of [`LOCAL_RANK_VARS`] that is set; `None` outside a
/// multi-process launch. Fails on a value that is not a number, and when two variables are
/// set to different ranks (a launcher inside another, or a stale variable), naming both.
pub fn detect(env: impl Fn(&str) -> Option<String>) -> Result<Option<LocalRank>> {
    let mut found: Option<(LocalRank, String)> = None;
    for (var, launcher) in LOCAL_RANK_VARS {
        let Some(value) = env(var) else { continue };
        let rank: usize = value.trim().parse().map_err(|_| {
            Error::invalid(format!(
                "{var}={value:?} (set by {launcher}) is not a local rank: expected a number from 0"
            ))
        })?;
        match &found {
            None => found = Some((LocalRank { rank, source: var }, value)),
            Some((first, first_value)) if first.rank != rank => {
                return Err(Error::invalid(format!(
                    "{}={first_value} and {var}={value} disagree about this process's local rank: unset the stale one",
                    first.source
                )))
            }
            Some(_) => {}
        }
    }
    Ok(found.map(|(r, _)| r))
}

/// The local rank from this process's environment.
pub fn detect_from_env() -> Result<Option<LocalRank>> {
    detect(|var| std::env::var(var).ok())
}

/// The GPU ordinal for `rank` when `visible` GPUs are visible to the process: the only one
/// when the launcher gave each process one GPU (CUDA_VISIBLE_DEVICES), else the rank's own.
/// Fails when there are fewer GPUs than ranks would need.
pub fn gpu_for(rank: LocalRank, visible: usize) -> Result<usize> {
    match visible {
        0 => Err(Error::Unavailable {
            what: "a GPU".into(),
            reason: format!("{}={} but no GPU is visible to this process", rank.source, rank.rank),
        }),
        1 => Ok(0),
        n if rank.rank < n => Ok(rank.rank),
        n => Err(Error::invalid(format!(
            "{}={} but only {n} GPUs are visible: start at most {n} processes per node, or give each its GPU with CUDA_VISIBLE_DEVICES",
            rank.source, rank.rank
        ))),
    }
}

/// Storage paths per local rank, written `RANK=PATH[,PATH...]` separated by `;`, e.g.
/// `0=/nvme0/spill;1=/nvme1/spill` (GPU i → the drive on its PCIe switch). Several paths
/// for one rank are striped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RankPaths(BTreeMap<usize, Vec<PathBuf>>);

impl RankPaths {
    /// Parses the `RANK=PATH[,PATH...];...` form; `what` names the setting in errors.
    pub fn parse(text: &str, what: &str) -> Result<RankPaths> {
        let mut map = BTreeMap::new();
        for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |why: &str| {
                Error::invalid(format!(
                    "{what}: {entry:?} {why}; write RANK=PATH[,PATH...] entries separated by ';', e.g. 0=/nvme0/spill;1=/nvme1/spill"
                ))
            };
            let (rank, paths) = entry.split_once('=').ok_or_else(|| bad("has no '='"))?;
            let rank: usize = rank
                .trim()
                .parse()
                .map_err(|_| bad("does not start with a rank number"))?;
            let paths: Vec<PathBuf> = paths
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect();
            if paths.is_empty() {
                return Err(bad("names no path"));
            }
            if map.insert(rank, paths).is_some() {
                return Err(bad("repeats a rank"));
            }
        }
        Ok(RankPaths(map))
    }

    /// The paths of `rank`, if the list has them.
    pub fn get(&self, rank: usize) -> Option<&[PathBuf]> {
        self.0.get(&rank).map(Vec::as_slice)
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The storage paths of this process: its rank's entry when the list has entries and
    /// the process has a local rank, else `given`. Also says which were chosen, for the
    /// caller's notes. A rank missing from a non-empty list is refused: every process of a
    /// job must know its drives.
    pub fn choose(
        &self,
        given: &[PathBuf],
        rank: Option<LocalRank>,
    ) -> Result<(Vec<PathBuf>, Option<String>)> {
        let Some(rank) = rank.filter(|_| !self.is_empty()) else {
            return Ok((given.to_vec(), None));
        };
        match self.get(rank.rank) {
            Some(paths) => {
                let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                Ok((
                    paths.to_vec(),
                    Some(format!(
                        "local rank {} ({}): storage {} from rank_paths",
                        rank.rank,
                        rank.source,
                        shown.join(", ")
                    )),
                ))
            }
            None => Err(Error::invalid(format!(
                "rank_paths has no entry for local rank {} ({}={}): add \"{}=PATH\" to it",
                rank.rank, rank.source, rank.rank, rank.rank
            ))),
        }
    }
}

impl std::fmt::Display for RankPaths {
    /// The `RANK=PATH[,PATH...];...` form [`RankPaths::parse`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: Vec<String> = self
            .0
            .iter()
            .map(|(rank, paths)| {
                let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                format!("{rank}={}", paths.join(","))
            })
            .collect();
        f.write_str(&entries.join(";"))
    }
}

/// The name `rank` uses for a storage file named `path` when every rank of a job was given
/// the same one: the rank goes before the extension (`/nvme/spill.bin` → `/nvme/spill.rank1.bin`,
/// `/nvme/spill` → `/nvme/spill.rank1`), so the ranks' files sit side by side and never
/// overwrite each other.
pub fn namespaced(path: &Path, rank: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.rank{rank}.{}", ext.to_string_lossy()),
        None => format!("{stem}.rank{rank}"),
    };
    path.with_file_name(name)
}

/// What a storage path names, as far as choosing a rank's own storage goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// A directory: its anonymous file is the process's own.
    Directory,
    /// A block device.
    BlockDevice,
    /// A file, or nothing yet (a file to be made).
    File,
}

impl PathKind {
    /// What `path` names now.
    pub fn of(path: &Path) -> PathKind {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => PathKind::Directory,
            Ok(m) if m.file_type().is_block_device() => PathKind::BlockDevice,
            _ => PathKind::File,
        }
    }
}

/// The path `rank` stores in instead of the shared `path`: `None` for a directory (its
/// anonymous file is the process's own) and, on rank 0, for a block device; a rank-named
/// file for a file path. Other ranks are refused a shared block device.
pub fn own_path(path: &Path, kind: PathKind, rank: LocalRank) -> Result<Option<PathBuf>> {
    match kind {
        PathKind::Directory => Ok(None),
        PathKind::BlockDevice if rank.rank == 0 => Ok(None),
        PathKind::BlockDevice => Err(Error::invalid(format!(
            "local rank {} ({}={}) was given block device {}, which rank 0 writes: give each rank a device of its own with rank_paths (e.g. SPILLWAY_RANK_PATHS=\"0=/dev/nvme0n1;1=/dev/nvme1n1\"), or a directory",
            rank.rank,
            rank.source,
            rank.rank,
            path.display()
        ))),
        PathKind::File => Ok(Some(namespaced(path, rank.rank))),
    }
}

/// Makes each of `paths` that every rank was given alike `rank`'s own ([`own_path`]), and
/// says which changed, for the caller's notes.
pub fn make_own(paths: &mut [PathBuf], rank: LocalRank) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    for path in paths {
        if let Some(own) = own_path(path, PathKind::of(path), rank)? {
            notes.push(format!(
                "local rank {} ({}): file {} is this rank's own",
                rank.rank,
                rank.source,
                own.display()
            ));
            *path = own;
        }
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn each_launcher_s_variable_gives_the_rank() {
        assert_eq!(detect(env(&[])).unwrap(), None);
        for (var, _) in LOCAL_RANK_VARS {
            let r = detect(env(&[(var, "3")])).unwrap().unwrap();
            assert_eq!((r.rank, r.source), (3, var));
        }
        // Agreeing variables are fine (Slurm running torchrun sets both).
        let r = detect(env(&[("LOCAL_RANK", "1"), ("SLURM_LOCALID", "1")]))
            .unwrap()
            .unwrap();
        assert_eq!(r.source, "LOCAL_RANK");
    }

    #[test]
    fn bad_and_conflicting_ranks_are_refused_by_name() {
        let e = detect(env(&[("SLURM_LOCALID", "x")])).unwrap_err().to_string();
        assert!(e.contains("SLURM_LOCALID=\"x\"") && e.contains("Slurm"), "{e}");
        let e = detect(env(&[("LOCAL_RANK", "0"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("LOCAL_RANK=0") && e.contains("OMPI_COMM_WORLD_LOCAL_RANK=1"),
            "{e}"
        );
    }

    #[test]
    fn the_gpu_follows_the_rank_unless_the_launcher_gave_one() {
        let r = |rank| LocalRank {
            rank,
            source: "LOCAL_RANK",
        };
        assert_eq!(gpu_for(r(1), 8).unwrap(), 1);
        assert_eq!(gpu_for(r(5), 1).unwrap(), 0);
        assert!(gpu_for(r(2), 2).unwrap_err().to_string().contains("only 2 GPUs"));
        assert!(gpu_for(r(0), 0).is_err());
    }

    #[test]
    fn a_shared_file_name_gets_the_rank_before_its_extension() {
        let n = |p: &str, r| namespaced(std::path::Path::new(p), r);
        assert_eq!(n("/nvme/spill.bin", 1), PathBuf::from("/nvme/spill.rank1.bin"));
        assert_eq!(n("/nvme/spill", 0), PathBuf::from("/nvme/spill.rank0"));
        assert_eq!(n("spill.tar.gz", 3), PathBuf::from("spill.tar.rank3.gz"));
        assert_eq!(n("/nvme/.hidden", 2), PathBuf::from("/nvme/.hidden.rank2"));
    }

    #[test]
    fn rank_paths_parse_and_refuse_with_the_setting_named() {
        let p = RankPaths::parse(" 0=/nvme0/a ; 1=/nvme1/a,/nvme2/a ", "rank_paths").unwrap();
        assert_eq!(p.get(0).unwrap(), [PathBuf::from("/nvme0/a")]);
        assert_eq!(p.get(1).unwrap().len(), 2);
        assert!(p.get(2).is_none());
        assert!(RankPaths::parse("", "rank_paths").unwrap().is_empty());
        assert_eq!(p.to_string(), "0=/nvme0/a;1=/nvme1/a,/nvme2/a");
        for bad in ["0/nvme", "x=/a", "0=", "0=/a;0=/b"] {
            let e = RankPaths::parse(bad, "rank_paths").unwrap_err().to_string();
            assert!(e.contains("rank_paths") && e.contains("RANK=PATH"), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod choose_tests {
    use super::*;

    #[test]
    fn a_shared_block_device_is_left_to_rank_0() {
        let dev = PathBuf::from("/dev/nvme0n1");
        let rank = |rank| LocalRank {
            rank,
            source: "SLURM_LOCALID",
        };
        let e = own_path(&dev, PathKind::BlockDevice, rank(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SLURM_LOCALID=1") && e.contains("/dev/nvme0n1") && e.contains("rank_paths"),
            "{e}"
        );
        assert_eq!(own_path(&dev, PathKind::BlockDevice, rank(0)).unwrap(), None);
        assert_eq!(own_path(&dev, PathKind::Directory, rank(1)).unwrap(), None);
        assert_eq!(PathKind::of(std::path::Path::new("/")), PathKind::Directory);
        assert_eq!(
            PathKind::of(std::path::Path::new("/no/such/file")),
            PathKind::File
        );
    }

    #[test]
    fn a_rank_takes_its_own_paths_and_a_missing_one_is_refused() {
        let list = RankPaths::parse("0=/nvme0;1=/nvme1,/nvme2", "rank_paths").unwrap();
        let given = [PathBuf::from("/given")];
        let rank = |rank| {
            Some(LocalRank {
                rank,
                source: "LOCAL_RANK",
            })
        };
        let (paths, note) = list.choose(&given, rank(1)).unwrap();
        assert_eq!(paths, [PathBuf::from("/nvme1"), PathBuf::from("/nvme2")]);
        assert!(note.unwrap().contains("local rank 1 (LOCAL_RANK)"));
        assert_eq!(list.choose(&given, None).unwrap().0, given);
        assert_eq!(RankPaths::default().choose(&given, rank(3)).unwrap().0, given);
        let e = list.choose(&given, rank(2)).unwrap_err().to_string();
        assert!(
            e.contains("no entry for local rank 2") && e.contains("2=PATH"),
            "{e}"
        );
    }
}
