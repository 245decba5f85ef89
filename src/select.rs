//! Choosing the device and the backend for a run, from the user's choices and what this
//! machine has. Every refusal says what is missing and what to do instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use spillway_cufile::{CufileBackend, CufileConfig, GdsMode};
use spillway_runtime::{
    Backend, Device, Error, FaultPlan, FaultStats, FaultyBackend, HostDevice, Member, Result, StripedBackend,
    Target,
};
use spillway_spdk::backend::{SpdkBackend, SpdkConfig};
use spillway_spdk::pci::PciAddress;
use spillway_uring::{UringBackend, UringConfig};

use crate::choice::{BackendChoice, MemChoice};
use crate::cuda::{self, CudaDevice};
use crate::rank;

/// Most cuFile worker threads a run starts (requests in flight beyond this queue up).
const MAX_CUFILE_THREADS: usize = 64;

/// Where the data lives for a run.
#[derive(Clone, Debug)]
pub enum Memory {
    /// Host memory.
    Host,
    /// GPU memory of this CUDA device.
    Gpu(Arc<CudaDevice>),
}

impl Memory {
    /// "gpu" or "host", as reports name it.
    pub fn name(&self) -> &'static str {
        match self {
            Memory::Host => "host",
            Memory::Gpu(_) => "gpu",
        }
    }
}

/// What a run needs: a device (for memory and copies), where its buffers live, and a backend.
#[derive(Debug)]
pub struct Setup {
    /// The device that owns the run's memory (the host device for host memory).
    pub device: Arc<dyn Device>,
    /// Host or GPU memory.
    pub memory: Memory,
    /// The backend that moves the bytes.
    pub backend: Arc<dyn Backend>,
    /// Choices made for the user ("no GPU found: using host memory"…).
    pub notes: Vec<String>,
    /// The striped set, when the data is striped over several targets (for its
    /// per-target stats); `backend` is the same object.
    pub striped: Option<Arc<StripedBackend>>,
    /// With fault injection on (the `faults` setting), the [`FaultyBackend`] of each target,
    /// in path order, for their statistics ([`fault_report`]); empty when it is off. One
    /// target's is `backend` itself; a striped set's wrap its members (see
    /// [`setup_striped`]).
    pub faults: Vec<Arc<FaultyBackend>>,
}

/// How to build the backend.
#[derive(Clone, Copy, Debug)]
pub struct Choices {
    /// Backend asked for.
    pub backend: BackendChoice,
    /// Memory asked for.
    pub mem: MemChoice,
    /// GPU ordinal asked for, if any.
    pub gpu: Option<usize>,
    /// io_uring queue depth / requests in flight per thread.
    pub queue_depth: u32,
    /// Rings or worker threads.
    pub threads: usize,
    /// Pinned staging memory per io_uring ring (bytes); `None`: the backend's default.
    pub pinned_bytes: Option<u64>,
    /// The NVMe controller for the spdk backend.
    pub pci: Option<PciAddress>,
}

/// Builds the device and backend for `choices`. When `faults` injects anything
/// ([`FaultPlan::is_none`] is false), the backend is wrapped in a [`FaultyBackend`] following
/// it, kept in [`Setup::faults`], and the notes say so ("fault injection on: PLAN").
pub fn setup(choices: Choices, faults: &FaultPlan) -> Result<Setup> {
    let mut notes = Vec::new();
    if choices.backend == BackendChoice::Cufile {
        spillway_cufile::check_library()?;
    }
    match (choices.backend, choices.pci) {
        (BackendChoice::Spdk, None) => {
            return Err(Error::invalid(
                "--backend spdk needs --pci ADDRESS: the NVMe controller to drive (`spillway nvme list` shows them)",
            ))
        }
        (BackendChoice::Spdk, Some(_)) | (_, None) => {}
        (_, Some(pci)) => {
            return Err(Error::invalid(format!(
                "--pci {pci} names a controller for the userspace NVMe driver: add --backend spdk, or drop --pci"
            )))
        }
    }
    let memory = match choices.mem {
        MemChoice::Host => {
            if let Some(gpu) = choices.gpu {
                return Err(Error::invalid(format!(
                    "--gpu {gpu} applies to GPU memory, but --mem host was given; drop one of them"
                )));
            }
            Memory::Host
        }
        MemChoice::Gpu => Memory::Gpu(CudaDevice::new(choices.gpu.unwrap_or(0))?),
        MemChoice::Auto => match choices.gpu {
            Some(ordinal) => Memory::Gpu(CudaDevice::new(ordinal)?),
            None => {
                let probe = cuda::probe();
                if probe.gpus.is_empty() {
                    let why = match &probe.driver {
                        Ok(_) => "the CUDA driver reports none",
                        Err(_) => "no CUDA driver",
                    };
                    notes.push(format!(
                        "no GPU ({why}): using host memory; `spillway info` says more"
                    ));
                    Memory::Host
                } else {
                    // One process per GPU (torchrun, Slurm, MPI): the local rank's GPU.
                    let ordinal = match rank::detect_from_env()? {
                        Some(r) => {
                            let ordinal = rank::gpu_for(r, probe.gpus.len())?;
                            notes.push(format!("local rank {} ({}): GPU {ordinal}", r.rank, r.source));
                            ordinal
                        }
                        None => 0,
                    };
                    Memory::Gpu(CudaDevice::new(ordinal)?)
                }
            }
        },
    };
    let device: Arc<dyn Device> = match &memory {
        Memory::Host => Arc::new(HostDevice::new()),
        Memory::Gpu(gpu) => gpu.clone(),
    };
    let mut backend = make_backend(choices, &memory, device.clone(), &mut notes)?;
    let mut wrappers = Vec::new();
    if !faults.is_none() {
        let faulty = inject(backend, faults, 0)?;
        notes.push(format!(
            "fault injection on: {faults} (for testing resilience only: requests fail, come up short or complete late on purpose)"
        ));
        backend = faulty.clone();
        wrappers.push(faulty);
    }
    Ok(Setup {
        device,
        memory,
        backend,
        notes,
        striped: None,
        faults: wrappers,
    })
}

/// `backend` wrapped in a [`FaultyBackend`] following `plan`, its seed advanced by
/// `member` (the place of the target in a striped set), so that the targets of a set draw
/// different faults.
fn inject(backend: Arc<dyn Backend>, plan: &FaultPlan, member: u64) -> Result<Arc<FaultyBackend>> {
    let plan = FaultPlan {
        seed: plan.seed.wrapping_add(member),
        ..plan.clone()
    };
    Ok(Arc::new(FaultyBackend::new(backend, plan)?))
}

/// One backend as `choices` asks, moving `memory` of `device`.
fn make_backend(
    choices: Choices,
    memory: &Memory,
    device: Arc<dyn Device>,
    notes: &mut Vec<String>,
) -> Result<Arc<dyn Backend>> {
    Ok(match choices.backend {
        BackendChoice::Uring => Arc::new(uring(device.clone(), choices)?),
        BackendChoice::Cufile => Arc::new(cufile(memory, choices)?),
        BackendChoice::Spdk => Arc::new(spdk(device.clone(), choices)?),
        BackendChoice::Auto => match memory {
            Memory::Host => Arc::new(uring(device.clone(), choices)?),
            Memory::Gpu(_) => match spillway_cufile::probe().gds_mode {
                Some(mode @ (GdsMode::NvidiaFs | GdsMode::P2pDma)) => {
                    notes.push(format!(
                        "auto: cuFile runs true GPUDirect Storage ({})",
                        mode.as_str()
                    ));
                    Arc::new(cufile(memory, choices)?)
                }
                other => {
                    let why = match other {
                        Some(GdsMode::Compat) => "cuFile would run in compat mode (no nvidia-fs or P2PDMA)",
                        _ => "cuFile is unavailable",
                    };
                    notes.push(format!("auto: using uring ({why})"));
                    Arc::new(uring(device.clone(), choices)?)
                }
            },
        },
    })
}

/// Like [`setup`], with the data striped over `paths` in `stripe`-byte units (`weights`
/// units per round for each path; empty: one each): each path gets
/// a backend of its own (its own rings or workers, so a slow one does not hold up the rest)
/// and the returned target path names the set. One path is no set: its backend is used
/// directly.
///
/// With fault injection on, each path's backend is wrapped on its own, not the set: the
/// i-th path's [`FaultyBackend`] follows `faults` with its seed plus i, so the targets do
/// not fail in lockstep, one target of the set can fail while the others work (as a failing
/// drive of a real set would), and `enospc_after` counts what each target was sent.
pub fn setup_striped(
    choices: Choices,
    faults: &FaultPlan,
    paths: &[PathBuf],
    stripe: u64,
    weights: &[u32],
) -> Result<(Setup, PathBuf)> {
    check_path_count(paths.len())?;
    check_host_memory(&choices, paths.len(), &[], crate::fs::host_memory())?;
    let mut setup = setup(choices, faults)?;
    match paths {
        [] => Err(Error::invalid("no storage path given")),
        [one] => Ok((setup, one.clone())),
        many => {
            if choices.backend == BackendChoice::Spdk {
                return Err(Error::invalid(
                    "the spdk backend drives one NVMe controller; striping over several storage paths takes files or block devices (the uring or cufile backend)",
                ));
            }
            let mut members = vec![Member {
                target: Target::new(&many[0]),
                backend: setup.backend.clone(),
            }];
            for (i, path) in many.iter().enumerate().skip(1) {
                let mut notes = Vec::new();
                let mut backend = make_backend(choices, &setup.memory, setup.device.clone(), &mut notes)?;
                if !faults.is_none() {
                    let faulty = inject(backend, faults, i as u64)?;
                    backend = faulty.clone();
                    setup.faults.push(faulty);
                }
                members.push(Member {
                    target: Target::new(path),
                    backend,
                });
            }
            let refs: Vec<&Path> = many.iter().map(PathBuf::as_path).collect();
            let name = StripedBackend::set_name(&refs);
            let striped = Arc::new(if weights.is_empty() {
                StripedBackend::new(name.clone(), members, stripe)?
            } else {
                StripedBackend::weighted(name.clone(), members, stripe, weights)?
            });
            setup.backend = striped.clone();
            setup.striped = Some(striped);
            setup.notes.push(format!(
                "striped over {} targets in {} units",
                many.len(),
                crate::size::format_size(stripe)
            ));
            if !faults.is_none() {
                setup.notes.push(format!(
                    "fault injection: each of the {} targets injects on its own (seeds {} to {}, in path order)",
                    many.len(),
                    faults.seed,
                    faults.seed.wrapping_add(many.len() as u64 - 1)
                ));
            }
            Ok((setup, name))
        }
    }
}

fn uring(device: Arc<dyn Device>, choices: Choices) -> Result<UringBackend> {
    let mut config = UringConfig {
        queue_depth: choices.queue_depth,
        threads: choices.threads,
        ..UringConfig::default()
    };
    if let Some(pinned) = choices.pinned_bytes {
        let chunk = config.chunk_size as u64;
        if pinned < chunk || pinned % chunk != 0 {
            return Err(Error::invalid(format!(
                "pinned_bytes={pinned} must be a whole number of the {chunk}-byte staging chunks (at least one)"
            )));
        }
        config.staging_buffers = (pinned / chunk) as usize;
    }
    UringBackend::new(device, config)
}

fn spdk(device: Arc<dyn Device>, choices: Choices) -> Result<SpdkBackend> {
    let pci = choices.pci.expect("checked in setup");
    if choices.pinned_bytes.is_some() {
        return Err(Error::invalid(
            "pinned_bytes sizes the io_uring backend's staging; the spdk backend stages through queue_depth slots of 1 MiB per thread: leave pinned_bytes at \"auto\"",
        ));
    }
    let config = SpdkConfig {
        threads: choices.threads,
        queue_depth: choices.queue_depth,
        ..SpdkConfig::new(pci.to_string())
    };
    SpdkBackend::new(device, config)
}

fn cufile(memory: &Memory, choices: Choices) -> Result<CufileBackend> {
    match memory {
        Memory::Gpu(gpu) => {
            // cuFileRead/Write block their thread: one worker per request in flight.
            let in_flight = choices.queue_depth as usize * choices.threads.max(1);
            let config = CufileConfig {
                threads: in_flight.clamp(1, MAX_CUFILE_THREADS),
                ..CufileConfig::default()
            };
            CufileBackend::new(gpu.context().clone(), config)
        }
        Memory::Host => Err(Error::invalid(
            "the cufile backend moves GPU memory, but host memory was chosen (or no GPU was found): choose a GPU as the device on a machine with an NVIDIA GPU, or the uring backend",
        )),
    }
}

/// Bytes of the kernel's rings one io_uring ring of `queue_depth` maps: its submission
/// entries (64 bytes), completion entries (two per submission slot, 16 bytes) and index
/// array (4 bytes), for the power of two the ring is rounded up to.
fn ring_bytes(queue_depth: u32) -> u64 {
    let entries = u64::from(queue_depth.saturating_add(1)).next_power_of_two();
    entries * (64 + 2 * 16 + 4)
}

/// Host memory the backends of `choices` allocate for one storage path, up front: for
/// io_uring, each ring's pinned staging buffers ([`UringConfig::staging_buffers_per_ring`]
/// of the 1 MiB chunk: `pinned_bytes`, or `queue_depth` × 1 MiB up to 64 MiB) and its
/// rings; for the userspace NVMe driver, `queue_depth` DMA slots of 1 MiB per queue pair;
/// nothing for cuFile (its workers stage nothing in host memory). `threads` of them.
pub fn backend_host_bytes(choices: &Choices) -> u64 {
    let threads = choices.threads as u64;
    let per_thread = match choices.backend {
        BackendChoice::Cufile => 0,
        BackendChoice::Spdk => u64::from(choices.queue_depth).saturating_mul(1 << 20),
        BackendChoice::Uring | BackendChoice::Auto => {
            let config = UringConfig {
                queue_depth: choices.queue_depth,
                threads: choices.threads,
                ..UringConfig::default()
            };
            let chunk = config.chunk_size as u64;
            let buffers = match choices.pinned_bytes {
                Some(pinned) => pinned / chunk.max(1),
                None => config.staging_buffers_per_ring() as u64,
            };
            buffers
                .saturating_mul(chunk)
                .saturating_add(ring_bytes(choices.queue_depth))
        }
    };
    per_thread.saturating_mul(threads)
}

/// Refuses a configuration whose host memory the host cannot give, before any of it is
/// allocated: the backends of `paths` storage paths ([`backend_host_bytes`] each) and the
/// `others` (a setting's name and the host memory it takes: `staging_bytes` with host
/// memory, `host_tier`) together must fit the host's available memory (`MemAvailable`)
/// less a headroom for everything else (a tenth of the host's memory, at most 4 GiB).
/// The refusal names each setting and its bytes. Nothing is checked when `mem` is unknown.
///
/// Pinned memory here is not locked with `mlock`: the io_uring backend registers its
/// staging buffers with the kernel, which counts them against `RLIMIT_MEMLOCK` (unless the
/// process has `CAP_IPC_LOCK`), and a ring whose registration the limit refuses still works
/// with plain reads and writes (the backend's report says so). So the locked-memory limit
/// bounds nothing that could fail here, and only the host's memory is checked.
pub fn check_host_memory(
    choices: &Choices,
    paths: usize,
    others: &[(&str, u64)],
    mem: Option<crate::fs::HostMemory>,
) -> Result<()> {
    let Some(mem) = mem else { return Ok(()) };
    let rings = backend_host_bytes(choices).saturating_mul(paths as u64);
    let need = others
        .iter()
        .fold(rings, |sum, (_, bytes)| sum.saturating_add(*bytes));
    let headroom = crate::fs::memory_headroom(mem.total);
    let room = mem.available.saturating_sub(headroom);
    if need <= room {
        return Ok(());
    }
    let size = crate::size::format_size;
    let per_path = backend_host_bytes(choices);
    let per_thread = per_path / (choices.threads.max(1) as u64);
    let mut items = vec![format!(
        "{} for the storage backends (threads={} × {} per ring or queue pair (queue_depth={}, pinned_bytes={}) × {paths} path{})",
        size(rings),
        choices.threads,
        size(per_thread),
        choices.queue_depth,
        choices.pinned_bytes.map_or_else(|| "auto".to_string(), size),
        if paths == 1 { "" } else { "s" },
    )];
    items.extend(
        others
            .iter()
            .filter(|(_, bytes)| *bytes > 0)
            .map(|(name, bytes)| format!("{} for {name}={bytes}", size(*bytes))),
    );
    Err(Error::invalid(format!(
        "these settings need {} of host memory ({}), but the host has {} available, {} of which stay free for everything else: \
         lower threads, queue_depth or pinned_bytes, use fewer storage paths, or lower the other settings named",
        size(need),
        items.join("; "),
        size(mem.available),
        size(headroom),
    )))
}

/// Refuses more than [`MAX_PATHS`](crate::settings::MAX_PATHS) storage paths: each gets
/// backends of its own (rings, threads, pinned memory).
pub fn check_path_count(paths: usize) -> Result<()> {
    let max = crate::settings::MAX_PATHS;
    if paths > max {
        return Err(Error::invalid(format!(
            "{paths} storage paths given: at most {max} (each gets rings, threads and pinned memory of its own); stripe over fewer paths"
        )));
    }
    Ok(())
}

/// What fault injection did, for reports: the bench's `faults` and the engine's
/// `stats()["faults"]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultReport {
    /// The plan, as the `faults` setting takes it (with the seed of the first target).
    pub plan: String,
    /// What was injected, over every target.
    pub stats: FaultStats,
    /// With several targets (a striped set): each one's plan and what it injected, in path
    /// order. Left out of the JSON for one target.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberFaults>,
}

/// What fault injection did on one target of a striped set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemberFaults {
    /// The target.
    pub path: String,
    /// Its plan (the set's, with its own seed).
    pub plan: String,
    /// What it injected.
    pub stats: FaultStats,
}

/// What each of `faults` has injected so far (in path order).
pub fn fault_stats(faults: &[Arc<FaultyBackend>]) -> Vec<FaultStats> {
    faults.iter().map(|f| f.stats()).collect()
}

/// The report of `faults` (a [`Setup::faults`]): what they injected since the snapshot
/// `before` ([`fault_stats`]; empty: since they were made). `paths` names the targets of a
/// striped set in order (from [`StripedBackend::member_stats`]). `None` when fault
/// injection is off.
pub fn fault_report(
    faults: &[Arc<FaultyBackend>],
    paths: &[PathBuf],
    before: &[FaultStats],
) -> Option<FaultReport> {
    let first = faults.first()?;
    let zero = FaultStats::default();
    let now: Vec<FaultStats> = faults
        .iter()
        .enumerate()
        .map(|(i, f)| stats_since(&f.stats(), before.get(i).unwrap_or(&zero)))
        .collect();
    let mut stats = FaultStats::default();
    for s in &now {
        add_stats(&mut stats, s);
    }
    let members = if faults.len() > 1 {
        faults
            .iter()
            .zip(now)
            .enumerate()
            .map(|(i, (f, stats))| MemberFaults {
                path: paths
                    .get(i)
                    .map_or_else(|| format!("<target {i}>"), |p| p.display().to_string()),
                plan: f.plan().to_string(),
                stats,
            })
            .collect()
    } else {
        Vec::new()
    };
    Some(FaultReport {
        plan: first.plan().to_string(),
        stats,
        members,
    })
}

/// `after - before`, counter by counter.
fn stats_since(after: &FaultStats, before: &FaultStats) -> FaultStats {
    let mut d = after.clone();
    d.requests = d.requests.saturating_sub(before.requests);
    d.passed = d.passed.saturating_sub(before.passed);
    d.injected_read_errors = d.injected_read_errors.saturating_sub(before.injected_read_errors);
    d.injected_write_errors = d
        .injected_write_errors
        .saturating_sub(before.injected_write_errors);
    d.injected_enospc = d.injected_enospc.saturating_sub(before.injected_enospc);
    d.injected_short = d.injected_short.saturating_sub(before.injected_short);
    d.delayed = d.delayed.saturating_sub(before.delayed);
    d.bytes_written = d.bytes_written.saturating_sub(before.bytes_written);
    d
}

/// Adds `s` into `total`, counter by counter.
fn add_stats(total: &mut FaultStats, s: &FaultStats) {
    total.requests += s.requests;
    total.passed += s.passed;
    total.injected_read_errors += s.injected_read_errors;
    total.injected_write_errors += s.injected_write_errors;
    total.injected_enospc += s.injected_enospc;
    total.injected_short += s.injected_short;
    total.delayed += s.delayed;
    total.bytes_written += s.bytes_written;
}

/// "3 write errors, 1 short count of 40 requests": what `s` counts, the faults left out
/// when none of their kind was injected.
pub fn fault_summary(s: &FaultStats) -> String {
    let mut items = Vec::new();
    for (n, one, many) in [
        (s.injected_read_errors, "read error", "read errors"),
        (s.injected_write_errors, "write error", "write errors"),
        (s.injected_enospc, "ENOSPC", "ENOSPC"),
        (s.injected_short, "short count", "short counts"),
        (s.delayed, "delayed completion", "delayed completions"),
    ] {
        if n > 0 {
            items.push(format!("{n} {}", if n == 1 { one } else { many }));
        }
    }
    if items.is_empty() {
        items.push("nothing".into());
    }
    format!("{} injected into {} requests", items.join(", "), s.requests)
}

/// `e`, saying that it came while `what` ran with fault injection on, the plan and what had
/// been injected so far: an injected fault must never pass for a real one, nor go unnoticed.
/// `e` is returned as it is when fault injection is off (`faults` empty).
pub fn fault_context(e: Error, what: &str, faults: &[Arc<FaultyBackend>]) -> Error {
    let Some(report) = fault_report(faults, &[], &[]) else {
        return e;
    };
    let prefix = format!(
        "{what} failed with fault injection on (faults={}; so far {})",
        report.plan,
        fault_summary(&report.stats)
    );
    match e {
        Error::Io { context, source } => Error::Io {
            context: format!("{prefix}: {context}"),
            source,
        },
        Error::InvalidArgument(msg) => Error::InvalidArgument(format!("{prefix}: {msg}")),
        Error::Device(msg) => Error::Device(format!("{prefix}: {msg}")),
        other => Error::Storage {
            target: prefix,
            source: Box::new(other),
        },
    }
}
