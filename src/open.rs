//! Opening an offload engine: storage paths, a capacity and resolved settings in; a running
//! [`Engine`] with its device and backend out. A directory gets an anonymous file (on tmpfs
//! or ramfs several), several paths are striped over, and with
//! `backend="spdk"` the path is an NVMe controller's PCI address. [`EngineBuilder`] is the
//! one way an engine is opened: [`open_engine`] (the Python package, the C ABI) and
//! `spillway bench --workload tensors` both go through it, so that the bench measures the
//! engine users run.
//!
//! The [`OpenedEngine`] also keeps track of its callers' handles, so that every binding
//! offers the same calls ([`OpenedEngine::offload`], [`OpenedEngine::fetch`], …) with the
//! same meaning.

mod builder;
mod capacity;
mod error;
mod handles;
mod ops;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use spillway_runtime::engine::Engine;
use spillway_runtime::{
    Device, Error, FaultyBackend, HostTierBackend, HostTierStats, MemberStats, Result, StripedBackend,
};

use crate::cuda::CudaDevice;
use crate::rank::{self, LocalRank};
use crate::select::{self, Memory};
use crate::settings::Resolved;

pub use builder::{DirectIoProbe, EngineBuilder, PreparedEngine};
pub use error::{CapacityRefusal, OpenError};
use handles::Handles;

/// A running engine with what it runs on, and the handles its caller holds.
pub struct OpenedEngine {
    /// The engine.
    pub engine: Engine,
    /// The device that owns the engine's memory (the host device for host memory).
    pub device: Arc<dyn Device>,
    /// Host or GPU memory.
    pub memory: Memory,
    /// What the engine was opened on, for reports.
    pub info: EngineInfo,
    /// The striped set, when the engine stores over several paths (for its members' stats).
    striped: Option<Arc<StripedBackend>>,
    /// With the `faults` setting on, the fault-injecting backend of each path (for their
    /// stats); empty when it is off.
    faults: Vec<Arc<FaultyBackend>>,
    /// The pinned host-memory tier in front of storage (the `host_tier` setting).
    host_tier: Option<Arc<HostTierBackend>>,
    /// The live handles.
    handles: Mutex<Handles>,
}

/// What an engine was opened on: the facts a binding reports.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    /// The storage target: a file or block device, the directory of an anonymous file, a
    /// controller's PCI address, or the name of a striped set.
    pub path: PathBuf,
    /// True when the data lives in an anonymous file (one that never has a name).
    pub anonymous: bool,
    /// Bytes the engine may store.
    pub capacity: u64,
    /// "cuda:N" or "host".
    pub device: String,
    /// The backend moving the bytes ("uring", "cufile", …).
    pub backend: String,
    /// Choices made for the caller ("no GPU: using host memory", …).
    pub notes: Vec<String>,
    /// The settings the engine was opened with.
    pub settings: Resolved,
}

impl OpenedEngine {
    /// The engine's statistics ([`Engine::stats`]) as a JSON object, with `members`: what
    /// each path of a striped set moved ([`MemberStats`]; empty for one path), and, only
    /// while the `faults` setting injects faults, `faults`: the plan and what was injected
    /// so far ([`select::FaultReport`]: `plan`, `stats`, and for a striped set `members`,
    /// each path's own). Without fault injection there is no `faults` key, so that every
    /// other top-level key but `latency` and `members` is a counter (as the C ABI's
    /// `spillway_stats` mirrors them).
    pub fn stats_json(&self) -> serde_json::Value {
        let mut json = serde_json::to_value(self.engine.stats()).unwrap_or_default();
        let members = self.member_stats();
        let paths: Vec<PathBuf> = members.iter().map(|m| m.path.clone()).collect();
        let faults = select::fault_report(&self.faults, &paths, &[]);
        if let serde_json::Value::Object(map) = &mut json {
            map.insert(
                "members".into(),
                serde_json::to_value(members).unwrap_or_default(),
            );
            if let Some(faults) = faults {
                map.insert("faults".into(), serde_json::to_value(faults).unwrap_or_default());
            }
            if let Some(tier) = self.host_tier_stats() {
                map.insert("host_tier".into(), serde_json::to_value(tier).unwrap_or_default());
            }
        }
        json
    }

    /// With the `faults` setting on, the plan and what was injected so far; `None` when it
    /// is off.
    pub fn fault_report(&self) -> Option<select::FaultReport> {
        let paths: Vec<PathBuf> = self.member_stats().into_iter().map(|m| m.path).collect();
        select::fault_report(&self.faults, &paths, &[])
    }

    /// What each path of a striped set has moved, in the order given; empty for one path.
    pub fn member_stats(&self) -> Vec<MemberStats> {
        self.striped
            .as_ref()
            .map(|s| s.member_stats())
            .unwrap_or_default()
    }

    /// What the host tier holds and has moved; `None` without one.
    pub fn host_tier_stats(&self) -> Option<HostTierStats> {
        self.host_tier.as_ref().map(|t| t.stats())
    }

    /// With the `faults` setting on, the fault-injecting backend of each path, in path
    /// order (for [`select::fault_context`]); empty when it is off.
    pub fn faults(&self) -> &[Arc<FaultyBackend>] {
        &self.faults
    }

    /// The GPU whose memory the engine moves; `None` for host memory.
    pub fn gpu(&self) -> Option<&Arc<CudaDevice>> {
        match &self.memory {
            Memory::Gpu(gpu) => Some(gpu),
            Memory::Host => None,
        }
    }
}

impl std::fmt::Debug for OpenedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedEngine")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Sets up the device, backend and storage target for `paths` and starts the engine.
///
/// One path is a directory (the engine keeps its data in a new anonymous file there), a
/// file (created if missing, kept afterwards) or a block device; several are striped over
/// in `settings.stripe_bytes` units. `capacity` is the most bytes the engine may store: a
/// size reserved up front, or, when `None`, half of the filesystem's free space, used as
/// needed (a block device needs one). Paths on one filesystem share its space: by default
/// they take half of its free space together, and a `capacity` that asks more of a
/// filesystem than it has free is refused. On tmpfs or ramfs the space is the host's
/// memory: by default at most half of the available memory is taken, and a `capacity`
/// leaving less than a headroom of it (a tenth of the host's memory, at most 4 GiB) is
/// refused.
///
/// Under a multi-process launcher (a local rank in the environment, see [`rank`]), the
/// rank's entry in `settings.rank_paths` replaces `paths`; without one, a file path is
/// made the rank's own ([`rank::namespaced`]) and a block device is left to rank 0.
///
/// This is [`EngineBuilder::open`] with the local rank of the environment.
pub fn open_engine(paths: &[PathBuf], capacity: Option<u64>, settings: &Resolved) -> Result<OpenedEngine> {
    open_for_rank(paths, capacity, settings, rank::detect_from_env()?)
}

/// [`open_engine`] for local rank `rank` (`None`: no launcher).
fn open_for_rank(
    paths: &[PathBuf],
    capacity: Option<u64>,
    settings: &Resolved,
    rank: Option<LocalRank>,
) -> Result<OpenedEngine> {
    EngineBuilder::new(paths, capacity, settings).rank(rank).open()
}

/// The most bytes `capacity` may be: file offsets are signed 64-bit numbers.
pub const MAX_CAPACITY: u64 = i64::MAX as u64;

/// Refuses a `capacity` past [`MAX_CAPACITY`], with the message every binding gives.
pub fn check_capacity(capacity: u64) -> Result<()> {
    if capacity > MAX_CAPACITY {
        return Err(Error::invalid(format!(
            "capacity={capacity} is too large: at most {MAX_CAPACITY} bytes (2^63 - 1, the largest file offset); pass the bytes the engine may store, or none for half of the free space"
        )));
    }
    Ok(())
}

/// Everything about the resources an engine on `paths` paths needs that can be checked
/// before anything is allocated: the number of paths, `capacity`, the `host_tier` and the
/// host memory of the backends (pinned staging per ring, per path), `staging_bytes` (with
/// host memory) and `host_tier` together ([`select::check_host_memory`]).
fn check_resources(paths: usize, capacity: Option<u64>, settings: &Resolved) -> Result<()> {
    select::check_path_count(paths)?;
    if let Some(c) = capacity {
        check_capacity(c)?;
    }
    let mem = crate::fs::host_memory();
    if settings.host_tier > 0 {
        capacity::check_host_tier(settings.host_tier, mem)?;
    }
    let staging = if settings.choices.mem == crate::choice::MemChoice::Host {
        settings.engine.staging_bytes
    } else {
        0
    };
    select::check_host_memory(
        &settings.choices,
        paths.max(1),
        &[("staging_bytes", staging), ("host_tier", settings.host_tier)],
        mem,
    )
}

/// The capacity of the engine over storage `files` (each with whether it is a directory
/// for an anonymous file), striped in `unit`-byte units with `weights` (one path: unit 1,
/// no weights): `capacity` checked against the space of each filesystem and, for paths on
/// tmpfs or ramfs, the host's memory; or, without it, half the free space of each
/// filesystem, split among its paths (see [`capacity`]).
fn storage_capacity(
    files: &[(PathBuf, bool)],
    weights: &[u32],
    unit: u64,
    capacity: Option<u64>,
    host_tier: u64,
) -> std::result::Result<u64, OpenError> {
    // The host tier's pinned memory counts, with storage on tmpfs or ramfs, against the
    // host's memory.
    capacity::storage_capacity(files, weights, unit, capacity, host_tier)
}

/// Files spread over on a filesystem that takes one file's writes one at a time (tmpfs and
/// ramfs: one inode's pages are added under one lock), when `spread_files` is 0.
pub const SPREAD_FILES_RAM: u32 = 8;

/// How many anonymous files directory `dir` is spread over, and why: `setting` when not 0,
/// else [`SPREAD_FILES_RAM`] on a memory-backed filesystem and 1 elsewhere.
pub(crate) fn spread_files(dir: &Path, setting: u32) -> (u32, &'static str) {
    if setting > 0 {
        return (setting, "the spread_files setting");
    }
    match crate::fs::filesystem(dir) {
        Some(fs) if fs.ram_backed => (
            SPREAD_FILES_RAM,
            "a memory-backed filesystem takes one file's writes one at a time; set spread_files to choose",
        ),
        _ => (1, "one file"),
    }
}
