//! The [`Backend`] of the userspace NVMe driver: requests on namespace 1 of one controller,
//! run by `threads` worker threads, each with an I/O queue pair of its own (no locks
//! between them on the I/O path).
//!
//! # Memory
//! Each worker stages data through `queue_depth` slots of `chunk_size` bytes in one DMA
//! buffer: page-locked host memory mapped into the controller's IOMMU domain through VFIO
//! *and* registered with the GPU ([`Device::register_host`], `cuMemHostRegister` for CUDA).
//! So GPU memory moves in one copy: the GPU's copy engine writes the slot, and the SSD
//! reads the same memory. Host memory is copied with `memcpy`.
//!
//! A true zero-copy path would let the SSD read GPU memory itself: the GPU memory would
//! have to be exported as a dma-buf and mapped into the IOMMU domain (VFIO's
//! `VFIO_IOMMU_MAP_DMA` takes user virtual addresses only; mapping a dma-buf needs the
//! IOMMUFD interface and peer-to-peer support from the GPU driver). That is future work.
//!
//! # Requests
//! Offsets and lengths may be anything: a request is cut into chunks of whole blocks (see
//! [`plan`]); a write that covers part of a block reads it first. Requests with such a
//! chunk all go to worker 0, which runs one read-modify-write at a time, so two writes
//! sharing a block never lose each other's bytes. Requests whose bytes overlap are not
//! ordered with each other, as with the other backends.
//!
//! # Failure
//! A command that fails completes its request with [`Error::Storage`] carrying the NVMe
//! status. A controller that stops answering (no completion within the command timeout),
//! reports a fatal status or leaves the bus fails every request in flight and every later
//! one, instead of hanging.

pub mod plan;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use spillway_runtime::{
    ticket, Backend, BackendInfo, Device, Error, IoOp, IoRequest, Result, Target, TargetId, TargetInfo,
    Ticket,
};

use crate::controller::{self, Controller, Options};
use crate::pci::{find_nvme, PciAddress, PciError, SysRoots};
use crate::vfio::DmaBuffer;
use worker::{Job, Worker, WorkerParts};

/// Most worker threads (and I/O queue pairs) a backend starts.
pub const MAX_THREADS: usize = 64;

/// How to run the backend. [`SpdkConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct SpdkConfig {
    /// PCI address of the controller, bound to vfio-pci (`spillway nvme bind`).
    pub pci: String,
    /// Its VFIO group file; `None`: found through sysfs.
    pub group: Option<PathBuf>,
    /// Worker threads, each with an I/O queue pair (1..=64).
    pub threads: usize,
    /// Chunks in flight per worker (1..=1023); also its staging slots.
    pub queue_depth: u32,
    /// Bytes per chunk (one NVMe command): a multiple of 4096, capped at the controller's
    /// largest transfer (MDTS).
    pub chunk_size: usize,
    /// How long a command may take before the controller is declared unresponsive.
    pub command_timeout: Duration,
}

impl SpdkConfig {
    /// The defaults for controller `pci`: one worker, [`spillway_runtime::DEFAULT_QUEUE_DEPTH`]
    /// chunks in flight, 1 MiB chunks, a 10 s command timeout.
    pub fn new(pci: impl Into<String>) -> Self {
        SpdkConfig {
            pci: pci.into(),
            group: None,
            threads: 1,
            queue_depth: spillway_runtime::DEFAULT_QUEUE_DEPTH,
            chunk_size: 1 << 20,
            command_timeout: controller::COMMAND_TIMEOUT,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(1..=MAX_THREADS).contains(&self.threads) {
            return Err(Error::invalid(format!(
                "spdk threads must be 1..={MAX_THREADS}, not {}",
                self.threads
            )));
        }
        if !(1..=1023).contains(&self.queue_depth) {
            return Err(Error::invalid(format!(
                "spdk queue depth must be 1..=1023, not {}",
                self.queue_depth
            )));
        }
        if self.chunk_size < 4096 || !self.chunk_size.is_multiple_of(4096) {
            return Err(Error::invalid(format!(
                "spdk chunk size must be a non-zero multiple of 4096 bytes, not {}",
                self.chunk_size
            )));
        }
        Ok(())
    }
}

struct WorkerHandle {
    tx: Option<Sender<Job>>,
    load: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// The userspace NVMe backend. See the [module documentation](self).
pub struct SpdkBackend {
    config: SpdkConfig,
    /// What errors and reports call the controller.
    target_name: String,
    model: String,
    serial: String,
    block_size: usize,
    capacity: u64,
    registered_with: String,
    workers: Vec<WorkerHandle>,
    next_worker: AtomicUsize,
    targets: Mutex<Vec<TargetId>>,
}

impl SpdkBackend {
    /// Opens the controller, creates one I/O queue pair and staging buffer per worker
    /// (registered with `device`), and starts the workers.
    pub fn new(device: Arc<dyn Device>, mut config: SpdkConfig) -> Result<Self> {
        config.validate()?;
        let target_name = format!("NVMe controller {}", config.pci);
        let storage = |e: controller::Error| Error::Storage {
            target: target_name.clone(),
            source: Box::new(e),
        };
        let group = match &config.group {
            Some(g) => g.clone(),
            None => group_path(&config.pci)?,
        };
        let options = Options {
            io_queues: config.threads as u16,
            command_timeout: config.command_timeout,
        };
        let ctrl = Controller::open_with(&config.pci, &group, options).map_err(storage)?;
        let ns = ctrl.namespace();
        let block_size = ns.block_size() as usize;
        let max_chunk = (ctrl.max_command_bytes().min(usize::MAX as u64) as usize) / 4096 * 4096;
        config.chunk_size = config.chunk_size.min(max_chunk).max(block_size);
        if usize::from(ctrl.io_queues_granted()) < config.threads {
            return Err(Error::invalid(format!(
                "{target_name} granted {} I/O queue pairs, fewer than the {} threads asked for; use fewer threads",
                ctrl.io_queues_granted(),
                config.threads
            )));
        }
        let device_name = device.info().name;
        // Built before the workers, so that a failure part way drops it, which joins the
        // workers already started.
        let mut backend = SpdkBackend {
            target_name: target_name.clone(),
            model: ctrl.info().model.clone(),
            serial: ctrl.info().serial.clone(),
            block_size,
            capacity: ctrl.namespace().capacity_bytes(),
            registered_with: device_name,
            config: config.clone(),
            workers: Vec::with_capacity(config.threads),
            next_worker: AtomicUsize::new(0),
            targets: Mutex::new(Vec::new()),
        };
        for index in 0..config.threads {
            let queue = ctrl.create_io_queue(config.queue_depth + 1).map_err(storage)?;
            let slots = (config.queue_depth as usize).min(queue.max_in_flight());
            let staging =
                DmaBuffer::new(ctrl.container(), slots * config.chunk_size).map_err(|e| storage(e.into()))?;
            // SAFETY: the registration is dropped before the staging buffer (the worker's
            // field order), so the memory stays valid while registered.
            let registration = unsafe { device.register_host(staging.as_ptr(), staging.len())? };
            let load = Arc::new(AtomicUsize::new(0));
            let worker = Worker::new(WorkerParts {
                queue,
                staging,
                registration,
                stream: device.create_stream()?,
                slots,
                chunk_size: config.chunk_size,
                block_size,
                target: target_name.clone(),
                load: load.clone(),
            });
            let (tx, rx) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("spillway-nvme-{index}"))
                .spawn(move || worker.run(rx))
                .map_err(|e| Error::io("starting an NVMe worker thread", e))?;
            backend.workers.push(WorkerHandle {
                tx: Some(tx),
                load,
                thread: Some(thread),
            });
        }
        tracing::debug!(
            controller = %config.pci,
            threads = config.threads,
            queue_depth = config.queue_depth,
            chunk_size = config.chunk_size,
            "userspace NVMe backend started"
        );
        Ok(backend)
    }

    /// The configuration in effect (the chunk size capped at MDTS).
    pub fn config(&self) -> &SpdkConfig {
        &self.config
    }

    /// Namespace 1's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn send(&self, worker: usize, job: Job) -> Result<()> {
        let w = &self.workers[worker];
        w.load.fetch_add(1, Ordering::Relaxed);
        let tx = w.tx.as_ref().expect("senders live until drop");
        tx.send(job).map_err(|_| {
            w.load.fetch_sub(1, Ordering::Relaxed);
            Error::Abandoned(format!("the worker of {} has stopped", self.target_name))
        })
    }

    /// The least loaded worker; ties go round robin.
    fn pick_worker(&self) -> usize {
        let start = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let count = self.workers.len();
        (0..count)
            .map(|i| (start + i) % count)
            .min_by_key(|&i| self.workers[i].load.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Sends a barrier to every worker and waits for all of them.
    fn barrier(&self, flush: bool) -> Result<()> {
        let tickets = (0..self.workers.len())
            .map(|i| {
                let (t, completer) = ticket();
                self.send(i, Job::Barrier { flush, completer }).map(|()| t)
            })
            .collect::<Result<Vec<Ticket>>>()?;
        for t in tickets {
            t.wait()?;
        }
        Ok(())
    }

    fn check_target(&self, id: TargetId) -> Result<()> {
        if self
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
        {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "target {} is not open on {}",
                id.0, self.target_name
            )))
        }
    }
}

impl std::fmt::Debug for SpdkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdkBackend")
            .field("config", &self.config)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Backend for SpdkBackend {
    fn info(&self) -> BackendInfo {
        let c = &self.config;
        BackendInfo {
            name: "spdk",
            host_staging: true,
            transfer_mode: None,
            details: vec![
                (
                    "controller".into(),
                    format!("{} ({}, serial {})", c.pci, self.model, self.serial),
                ),
                (
                    "namespace 1".into(),
                    format!("{} bytes, {}-byte blocks", self.capacity, self.block_size),
                ),
                ("queue pairs".into(), c.threads.to_string()),
                ("queue depth".into(), c.queue_depth.to_string()),
                ("chunk".into(), format!("{} bytes", c.chunk_size)),
                (
                    "staging".into(),
                    format!("VFIO-mapped, registered with {}", self.registered_with),
                ),
            ],
        }
    }

    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        if !names_controller(&target.path, &self.config.pci) {
            return Err(Error::Target {
                path: target.path.clone(),
                reason: format!(
                    "the spdk backend drives {} only: name it by its PCI address ({}) as the target",
                    self.target_name, self.config.pci
                ),
            });
        }
        if let Some(reserve) = target.reserve {
            if reserve > self.capacity {
                return Err(Error::Target {
                    path: target.path.clone(),
                    reason: format!(
                        "namespace 1 holds {} bytes, {reserve} were asked for: ask for less (a smaller size, or fewer or smaller tensors)",
                        self.capacity
                    ),
                });
            }
        }
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let id = TargetId(targets.iter().map(|t| t.0 + 1).max().unwrap_or(0));
        targets.push(id);
        Ok((
            id,
            TargetInfo {
                direct_io: true,
                offset_align: self.block_size,
                size: self.capacity,
                warning: None,
            },
        ))
    }

    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        self.check_target(req.target)?;
        let len = req.mem.len() as u64;
        let end = req.offset.checked_add(len).filter(|&e| e <= self.capacity);
        if end.is_none() {
            return Err(Error::ShortIo {
                op: req.op.as_str(),
                path: PathBuf::from(&self.config.pci),
                offset: req.offset,
                done: 0,
                wanted: len,
            });
        }
        if len == 0 {
            return Ok(Ticket::ready(Ok(0)));
        }
        let bs = self.block_size as u64;
        let partial_write =
            req.op == IoOp::Write && (!req.offset.is_multiple_of(bs) || !len.is_multiple_of(bs));
        let worker = if partial_write { 0 } else { self.pick_worker() };
        let (t, completer) = ticket();
        self.send(worker, Job::Io { req, completer })?;
        Ok(t)
    }

    fn flush(&self, target: TargetId) -> Result<()> {
        self.check_target(target)?;
        self.barrier(true)
    }

    fn close(&self, target: TargetId) -> Result<()> {
        self.check_target(target)?;
        self.barrier(false)?;
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&t| t != target);
        Ok(())
    }
}

impl Drop for SpdkBackend {
    fn drop(&mut self) {
        // Closing the channels lets each worker finish its jobs and return; its queue is
        // deleted, and the last one shuts the controller down.
        for w in &mut self.workers {
            w.tx = None;
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Whether a target path names controller `pci` ("0000:01:00.0", or the same with the
/// domain left out).
fn names_controller(path: &Path, pci: &str) -> bool {
    let name = path.to_string_lossy();
    let full = |s: &str| {
        if s.len() == 7 {
            format!("0000:{s}")
        } else {
            s.to_owned()
        }
    };
    full(&name).eq_ignore_ascii_case(&full(pci))
}

/// `/dev/vfio/<group>` of the NVMe controller at `pci`, which must be bound to vfio-pci.
fn group_path(pci: &str) -> Result<PathBuf> {
    let unavailable = |reason: String| Error::Unavailable {
        what: format!("NVMe controller {pci}"),
        reason,
    };
    let roots = SysRoots::default();
    let address: PciAddress = pci.parse().map_err(|e: PciError| Error::invalid(e.to_string()))?;
    let function = find_nvme(&roots, address).map_err(|e| unavailable(e.to_string()))?;
    if !function.bound_to_vfio() {
        let driver = function.driver.as_deref().unwrap_or("no driver");
        return Err(unavailable(format!(
            "it is bound to {driver}, not vfio-pci; hand it to the userspace driver with `spillway nvme bind {address}` (as root; this takes it away from the kernel)"
        )));
    }
    function.vfio_group_path(&roots).ok_or_else(|| {
        unavailable("it has no IOMMU group: turn the IOMMU on (intel_iommu=on or amd_iommu=on)".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_the_controller_with_or_without_domain() {
        assert!(names_controller(Path::new("0000:00:04.0"), "0000:00:04.0"));
        assert!(names_controller(Path::new("00:04.0"), "0000:00:04.0"));
        assert!(names_controller(Path::new("0000:00:04.0"), "00:04.0"));
        assert!(names_controller(Path::new("0000:0A:00.0"), "0000:0a:00.0"));
        assert!(!names_controller(Path::new("/tmp/file"), "0000:00:04.0"));
        assert!(!names_controller(Path::new("0000:00:05.0"), "0000:00:04.0"));
    }

    #[test]
    fn bad_configurations_are_refused_with_the_setting_named() {
        let mut c = SpdkConfig::new("0000:00:04.0");
        c.threads = 0;
        assert!(c.validate().unwrap_err().to_string().contains("threads"));
        let mut c = SpdkConfig::new("0000:00:04.0");
        c.queue_depth = 5000;
        assert!(c.validate().unwrap_err().to_string().contains("queue depth"));
        let mut c = SpdkConfig::new("0000:00:04.0");
        c.chunk_size = 1000;
        assert!(c.validate().unwrap_err().to_string().contains("chunk size"));
        assert!(SpdkConfig::new("0000:00:04.0").validate().is_ok());
    }

    #[test]
    fn a_missing_controller_is_a_clear_error() {
        let e = SpdkBackend::new(
            Arc::new(spillway_runtime::HostDevice::new()),
            SpdkConfig::new("0000:99:1f.7"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("0000:99:1f.7") && e.contains("spillway nvme list"),
            "{e}"
        );
    }
}
