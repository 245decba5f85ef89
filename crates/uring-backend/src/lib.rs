//! spillway's io_uring backend: O_DIRECT I/O on any file or block device.
//!
//! [`UringBackend`] runs `threads` rings, each driven by one worker thread that owns the
//! ring, its staging buffers and a device stream. A request is split into pieces the
//! kernel accepts (see [`plan`]):
//!
//! - host memory whose address, offset and length meet the target's alignment goes straight
//!   between the caller's memory and the file, in chunks of `chunk_size`, up to
//!   `queue_depth` I/Os in flight;
//! - device memory (and misaligned host memory) is staged through pinned host buffers that
//!   are registered with io_uring (`ReadFixed` / `WriteFixed`); device memory is copied by
//!   the device's stream, and the copy of one chunk overlaps the disk I/O of another;
//! - a partial first or last block is read, patched and written back for writes
//!   (read-modify-write), and read whole with only the wanted bytes copied for reads.
//!
//! # Threads
//! [`Backend::submit`] hands the request to the least loaded worker over a channel (and
//! bumps an eventfd the worker polls in its ring) and returns the ticket at once. The
//! worker issues the copies and I/Os, reaps completions and polls its stream's events;
//! when idle it sleeps in `io_uring_enter`. [`Backend::flush`] waits for the requests
//! submitted to the target before it, then calls `fdatasync`; [`Backend::close`] waits for
//! all of the target's requests. Dropping the backend abandons requests that have not
//! started (their tickets fail with [`Error::Abandoned`]), waits for every I/O and copy in
//! flight, and joins the workers.
//!
//! # Concurrent requests
//! Requests whose byte ranges do not overlap never disturb each other, whichever workers
//! run them. Two writes may still share a block (one ends and the other starts inside it):
//! each rewrites the whole block, so the read-modify-writes of one block are serialized
//! across all the backend's workers by a lock on the block, taken before the block is read
//! and released once it is written back. Aligned pieces take no lock. A read of part of a
//! block takes none either: a concurrent read-modify-write of the block's other bytes
//! writes back exactly the bytes the read wants.
//!
//! Requests whose byte ranges overlap are not ordered with each other: of two overlapping
//! writes in flight at once either may land last, and a read that overlaps a write in
//! flight may see the old bytes, the new ones or a mix. Wait for a request's ticket before
//! submitting one that overlaps it.
//!
//! # Caveats
//! - A write whose end is not aligned extends a file to the end of its last block (the
//!   bytes past the request are zeros).
//! - A read past the end of the target fails with [`Error::ShortIo`].

#![warn(missing_docs)]

mod block_locks;
pub mod config;
pub mod plan;
mod ring;
mod staging;
mod targets;
mod wake;
mod worker;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use spillway_runtime::{
    open_target, ticket, Backend, BackendInfo, Device, Error, IoRequest, MemRef, Result, Target, TargetId,
    TargetInfo, Ticket,
};

pub use config::UringConfig;

use block_locks::{BlockLocks, FileIdentity};
use ring::Ring;
use targets::{OpenFile, TargetTable};
use worker::{Job, WorkerHandle};

/// Is io_uring usable on this kernel? Creates and drops a tiny ring; the error says why
/// not (e.g. disabled by sysctl or a seccomp profile). Used by `spillway info`.
pub fn probe() -> std::result::Result<(), String> {
    ring::probe()
}

/// The io_uring backend. See the [crate documentation](crate).
pub struct UringBackend {
    device: Arc<dyn Device>,
    config: UringConfig,
    staging_buffers: usize,
    /// Alignment every staging buffer's address meets.
    staging_alignment: usize,
    /// Why the staging buffers are not registered with io_uring, if they are not.
    fixed_buffers_error: Option<String>,
    targets: TargetTable,
    workers: Vec<WorkerHandle>,
    next_worker: AtomicUsize,
}

impl UringBackend {
    /// Starts the rings and their worker threads, with staging buffers from `device`.
    ///
    /// Fails with [`Error::Unavailable`] (`what: "io_uring"`) when the kernel refuses
    /// io_uring (ENOSYS: too old or not built in; EPERM: disabled by the
    /// `kernel.io_uring_disabled` sysctl or a seccomp profile), with a reason that says so.
    pub fn new(device: Arc<dyn Device>, config: UringConfig) -> Result<Self> {
        config.validate()?;
        let staging_buffers = config.staging_buffers_per_ring();
        let mut workers = Vec::with_capacity(config.threads);
        let mut staging_alignment = usize::MAX;
        let mut fixed_buffers_error = None;
        let block_locks = Arc::new(BlockLocks::default());
        for index in 0..config.threads {
            let ring = Ring::new(
                config.queue_depth,
                device.as_ref(),
                staging_buffers,
                config.chunk_size,
            )?;
            staging_alignment = staging_alignment.min(ring.staging.address_alignment());
            if fixed_buffers_error.is_none() {
                fixed_buffers_error = ring.fixed_buffers_error.clone();
            }
            let stream = device.create_stream()?;
            workers.push(WorkerHandle::spawn(
                index,
                ring,
                stream,
                config.queue_depth,
                config.chunk_size,
                block_locks.clone(),
            )?);
        }
        tracing::debug!(
            rings = config.threads,
            queue_depth = config.queue_depth,
            chunk_size = config.chunk_size,
            staging_buffers,
            "io_uring backend started"
        );
        Ok(UringBackend {
            device,
            config,
            staging_buffers,
            staging_alignment,
            fixed_buffers_error,
            targets: TargetTable::default(),
            workers,
            next_worker: AtomicUsize::new(0),
        })
    }

    /// The configuration the backend runs with.
    pub fn config(&self) -> &UringConfig {
        &self.config
    }

    /// The least loaded worker; ties go round robin.
    fn pick_worker(&self) -> &WorkerHandle {
        let start = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let count = self.workers.len();
        (0..count)
            .map(|i| &self.workers[(start + i) % count])
            .min_by_key(|worker| worker.load())
            .expect("a backend has at least one worker")
    }

    /// Checks that the backend's chunks and staging buffers can serve a target with these
    /// alignments.
    fn check_alignment(&self, path: &std::path::Path, offset_align: usize, mem_align: usize) -> Result<()> {
        let chunk = self.config.chunk_size;
        let fits = |align: usize| align.is_power_of_two() && align <= chunk && chunk.is_multiple_of(align);
        if !fits(offset_align) || !fits(mem_align) || mem_align > self.staging_alignment {
            return Err(Error::Target {
                path: path.to_path_buf(),
                reason: format!(
                    "direct I/O there needs offsets aligned to {offset_align} bytes and memory to {mem_align}, which the io_uring chunk size ({chunk} bytes) or its staging buffers (aligned to {}) do not meet; use a chunk size that is a multiple of {}",
                    self.staging_alignment,
                    offset_align.max(mem_align)
                ),
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("config", &self.config)
            .field("staging_buffers", &self.staging_buffers)
            .field("fixed_buffers", &self.fixed_buffers_error.is_none())
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Backend for UringBackend {
    fn info(&self) -> BackendInfo {
        let mib = |bytes: usize| format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64);
        let fixed = match &self.fixed_buffers_error {
            None => "registered".to_string(),
            Some(reason) => format!("not registered: {reason}"),
        };
        BackendInfo {
            name: "uring",
            host_staging: true,
            transfer_mode: None,
            details: vec![
                ("queue_depth".into(), self.config.queue_depth.to_string()),
                ("rings".into(), self.config.threads.to_string()),
                ("chunk_size".into(), self.config.chunk_size.to_string()),
                (
                    "staging_buffers_per_ring".into(),
                    self.staging_buffers.to_string(),
                ),
                (
                    "staging_memory_per_ring".into(),
                    mib(self.staging_buffers * self.config.chunk_size),
                ),
                ("staging_buffers_io_uring".into(), fixed),
                ("device".into(), self.device.info().name),
            ],
        }
    }

    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        let opened = open_target(target)?;
        if let Err(e) = self.check_alignment(&opened.path, opened.offset_align, opened.mem_align) {
            opened.discard();
            return Err(e);
        }
        let identity = FileIdentity::of(&opened.file)
            .map_err(|e| Error::io(format!("stat {}", opened.path.display()), e))?;
        let info = TargetInfo {
            direct_io: opened.direct_io,
            offset_align: opened.offset_align,
            size: opened.size,
            warning: opened.warning.clone(),
        };
        let file = self.targets.insert(|id| OpenFile {
            id,
            file: opened.file,
            path: opened.path,
            direct_io: opened.direct_io,
            offset_align: opened.offset_align,
            mem_align: opened.mem_align,
            identity,
            pending: Default::default(),
            opened_len: info.size,
            written_end: Default::default(),
        });
        tracing::debug!(
            target = file.id.0,
            path = %file.path.display(),
            direct_io = file.direct_io,
            offset_align = file.offset_align,
            mem_align = file.mem_align,
            "target opened"
        );
        Ok((file.id, info))
    }

    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        let file = self.targets.get(req.target)?;
        let len = req.mem.len();
        if len == 0 {
            return Err(Error::invalid(format!(
                "empty {} at offset {} of {}",
                req.op.as_str(),
                req.offset,
                file.path.display()
            )));
        }
        let end = req.offset.checked_add(len as u64);
        if end.is_none_or(|end| end > i64::MAX as u64) {
            return Err(Error::invalid(format!(
                "{} of {len} bytes at offset {} of {} goes past the largest file offset",
                req.op.as_str(),
                req.offset,
                file.path.display()
            )));
        }
        let mem = match req.mem {
            // The host device's memory is host memory: no staging copy needed.
            MemRef::Device { ptr, len } if self.device.host_addressable() => MemRef::Host {
                ptr: ptr as *mut u8,
                len,
            },
            mem => mem,
        };
        let (ticket, completer) = ticket();
        let pending = file.pending.begin();
        let job = Job {
            op: req.op,
            offset: req.offset,
            mem,
            file,
            completer,
            pending,
        };
        match self.pick_worker().submit(job) {
            Ok(()) => Ok(ticket),
            Err(job) => {
                drop(job);
                Err(Error::Abandoned(
                    "the io_uring worker has stopped; recreate the backend".into(),
                ))
            }
        }
    }

    fn flush(&self, target: TargetId) -> Result<()> {
        let file = self.targets.get(target)?;
        file.pending.wait_for_earlier();
        file.file
            .sync_data()
            .map_err(|e| Error::io(format!("fdatasync of {}", file.path.display()), e))
    }

    fn close(&self, target: TargetId) -> Result<()> {
        let file = self.targets.remove(target)?;
        file.pending.wait_for_all();
        tracing::debug!(target = target.0, path = %file.path.display(), "target closed");
        // The workers release their references before a request stops being pending, so
        // this is normally the last one and the descriptor closes here.
        drop(file);
        Ok(())
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // Each handle stops its worker (requests not started are abandoned, I/O in flight
        // is reaped) and joins its thread.
        self.workers.clear();
    }
}
