//! Choosing the device and the backend for a run, from the user's choices and what this
//! machine has. Every refusal says what is missing and what to do instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use spillway_cufile::{CufileBackend, CufileConfig};
use spillway_runtime::{Backend, Device, Error, GdsMode, HostDevice, Member, Result, StripedBackend, Target};
use spillway_spdk::backend::{SpdkBackend, SpdkConfig};
use spillway_spdk::pci::PciAddress;
use spillway_uring::{UringBackend, UringConfig};

use crate::cli::{BackendChoice, MemChoice};
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

impl Choices {
    /// The choices `spillway bench` flags make (either workload).
    pub fn from_bench(args: &crate::cli::BenchArgs) -> Self {
        Choices {
            backend: args.backend,
            mem: args.mem,
            gpu: args.gpu,
            queue_depth: args.qd,
            threads: args.threads,
            pinned_bytes: args.pinned,
            pci: args.pci,
        }
    }
}

/// Builds the device and backend for `choices`.
pub fn setup(choices: Choices) -> Result<Setup> {
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
                        Ok(_) => "the CUDA driver reports no GPU".to_string(),
                        Err(e) => e.clone(),
                    };
                    notes.push(format!("no GPU ({why}): using host memory"));
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
    let backend = make_backend(choices, &memory, device.clone(), &mut notes)?;
    Ok(Setup {
        device,
        memory,
        backend,
        notes,
        striped: None,
    })
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
pub fn setup_striped(
    choices: Choices,
    paths: &[PathBuf],
    stripe: u64,
    weights: &[u32],
) -> Result<(Setup, PathBuf)> {
    let mut setup = setup(choices)?;
    match paths {
        [] => Err(Error::invalid("no storage path given")),
        [one] => Ok((setup, one.clone())),
        many => {
            if choices.backend == BackendChoice::Spdk {
                return Err(Error::invalid(
                    "--backend spdk drives the one controller of --pci; striping over several paths takes files or block devices",
                ));
            }
            let mut members = vec![Member {
                target: Target::new(&many[0]),
                backend: setup.backend.clone(),
            }];
            for path in &many[1..] {
                let mut notes = Vec::new();
                members.push(Member {
                    target: Target::new(path),
                    backend: make_backend(choices, &setup.memory, setup.device.clone(), &mut notes)?,
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
                "--pinned {pinned} must be a whole number of the {chunk}-byte staging chunks (at least one)"
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
            "--pinned sizes the io_uring backend's staging; the spdk backend stages through --qd slots of 1 MiB per thread: drop --pinned",
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
            "--backend cufile moves GPU memory, but host memory was chosen (or no GPU was found); use --mem gpu on a machine with an NVIDIA GPU, or --backend uring",
        )),
    }
}
