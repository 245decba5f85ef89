//! One I/O thread: it owns an I/O queue pair, its staging memory and a device stream, and
//! runs requests through them with up to `queue_depth` chunks in flight. Nothing here is
//! shared with other threads but the job channel and the load counter.
//!
//! A chunk goes through these stages in its staging slot:
//! - read: NVMe read of its window → copy of its bytes to the caller's memory (a memcpy,
//!   or an asynchronous host→device copy on the stream) → done;
//! - write: copy of the caller's bytes into the slot (memcpy, or device→host on the
//!   stream) → NVMe write of the window → done;
//! - write of a partial window: NVMe read of the window first, then as a write. Only one
//!   such chunk is in flight at a time, and the backend sends every request that has one
//!   to the same worker, so two writes that share a block never interleave their
//!   read-modify-writes.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use spillway_runtime::{Completer, Error, Event, HostRegistration, IoOp, IoRequest, MemRef, Result, Stream};

use super::plan::{self, Chunk};
use crate::controller;
use crate::io_queue::{IoQueue, Watchdog};
use crate::vfio::DmaBuffer;

/// Work for a worker.
pub(crate) enum Job {
    /// One request.
    Io { req: IoRequest, completer: Completer },
    /// Completes once every earlier job of this worker has; with `flush`, after an NVMe
    /// Flush command too.
    Barrier { flush: bool, completer: Completer },
}

/// What a worker is built from.
pub(crate) struct WorkerParts {
    pub queue: IoQueue,
    pub staging: DmaBuffer,
    /// Keeps `staging` registered with the device (for its copy engines); dropped first.
    pub registration: HostRegistration,
    pub stream: Arc<dyn Stream>,
    pub slots: usize,
    pub chunk_size: usize,
    pub block_size: usize,
    /// Names the controller in errors.
    pub target: String,
    pub load: Arc<AtomicUsize>,
}

enum Stage {
    /// Reading the window of a partial write.
    RmwRead {
        cid: u16,
    },
    /// The caller's bytes are being copied into the slot.
    CopyIn(Box<dyn Event>),
    Write {
        cid: u16,
    },
    Read {
        cid: u16,
    },
    /// The slot's bytes are being copied to the caller's memory.
    CopyOut(Box<dyn Event>),
}

struct Slot {
    job: u64,
    chunk: Chunk,
    stage: Stage,
}

struct Active {
    req: IoRequest,
    completer: Completer,
    chunks: Vec<Chunk>,
    /// The next chunk to start.
    next: usize,
    /// Chunks in slots.
    running: usize,
    error: Option<Error>,
}

enum Queued {
    Io(u64),
    Barrier { flush: bool, completer: Completer },
}

pub(crate) struct Worker {
    // Field order is drop order: the registration goes before the memory it covers.
    _registration: HostRegistration,
    queue: IoQueue,
    staging: DmaBuffer,
    stream: Arc<dyn Stream>,
    slots: Vec<Option<Slot>>,
    /// The slot of each command identifier in flight.
    by_cid: Vec<usize>,
    chunk_size: usize,
    block_size: usize,
    target: String,
    load: Arc<AtomicUsize>,
    jobs: HashMap<u64, Active>,
    order: VecDeque<Queued>,
    next_id: u64,
    /// A partial write's read-modify-write is in flight.
    rmw_busy: bool,
    /// The controller failed: every request fails with this message.
    failed: Option<String>,
}

impl Worker {
    pub(crate) fn new(p: WorkerParts) -> Self {
        let cids = p.queue.max_in_flight();
        Worker {
            _registration: p.registration,
            queue: p.queue,
            staging: p.staging,
            stream: p.stream,
            slots: (0..p.slots).map(|_| None).collect(),
            by_cid: vec![usize::MAX; cids],
            chunk_size: p.chunk_size,
            block_size: p.block_size,
            target: p.target,
            load: p.load,
            jobs: HashMap::new(),
            order: VecDeque::new(),
            next_id: 0,
            rmw_busy: false,
            failed: None,
        }
    }

    /// Runs jobs until the channel closes and every job taken has completed.
    pub(crate) fn run(mut self, rx: Receiver<Job>) {
        let _span = tracing::debug_span!("spdk_worker", queue = self.queue.qid()).entered();
        let mut open = true;
        let mut dog: Option<Watchdog> = None;
        loop {
            if self.order.is_empty() && self.busy_slots() == 0 {
                if !open {
                    return;
                }
                // Idle: sleep until there is work (a polled driver spins only while busy).
                match rx.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(job) => self.accept(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            let started = self.start_chunks();
            let progressed = self.poll_copies() | self.poll_queue();
            self.finish_jobs();
            if started || progressed || self.queue.in_flight() == 0 {
                dog = None;
            } else {
                let watch = dog.get_or_insert_with(|| self.queue.watchdog());
                if let Err(e) = self.queue.check_stalled(watch) {
                    self.fail_all(e);
                    dog = None;
                }
            }
        }
    }

    fn busy_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    fn storage_error(&self, e: controller::Error) -> Error {
        Error::Storage {
            target: self.target.clone(),
            source: Box::new(e),
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Io { req, completer } => {
                if let Some(why) = &self.failed {
                    self.done(completer, Err(failed_error(&self.target, why)));
                    return;
                }
                let (offset, len) = (req.offset, req.mem.len());
                let id = self.next_id;
                self.next_id += 1;
                let chunks = plan::chunks(offset, len, self.block_size, self.chunk_size);
                tracing::trace!(
                    id,
                    op = req.op.as_str(),
                    offset,
                    len,
                    chunks = chunks.len(),
                    "request"
                );
                self.jobs.insert(
                    id,
                    Active {
                        req,
                        completer,
                        chunks,
                        next: 0,
                        running: 0,
                        error: None,
                    },
                );
                self.order.push_back(Queued::Io(id));
            }
            Job::Barrier { flush, completer } => self.order.push_back(Queued::Barrier { flush, completer }),
        }
    }

    /// Starts chunks in request order while slots are free; a barrier waits for everything
    /// before it. Returns whether anything started.
    fn start_chunks(&mut self) -> bool {
        let mut started = false;
        let mut index = 0;
        while index < self.order.len() {
            let id = match &self.order[index] {
                Queued::Barrier { .. } => {
                    if index == 0 && self.busy_slots() == 0 {
                        let Some(Queued::Barrier { flush, completer }) = self.order.pop_front() else {
                            unreachable!("checked above")
                        };
                        let result = self.barrier(flush);
                        self.done(completer, result);
                        started = true;
                        continue;
                    }
                    return started;
                }
                Queued::Io(id) => *id,
            };
            index += 1;
            loop {
                let Some(slot) = self.slots.iter().position(Option::is_none) else {
                    return started;
                };
                let job = self.jobs.get_mut(&id).expect("queued jobs are active");
                if job.error.is_some() || job.next == job.chunks.len() {
                    break;
                }
                let chunk = job.chunks[job.next];
                let (op, mem) = (job.req.op, job.req.mem);
                if op == IoOp::Write && chunk.is_partial() {
                    if self.rmw_busy {
                        // Later chunks wait too: requests start in order.
                        return started;
                    }
                    self.rmw_busy = true;
                }
                job.next += 1;
                job.running += 1;
                started = true;
                let stage = match op {
                    IoOp::Read => self.submit(false, slot, &chunk).map(|cid| Stage::Read { cid }),
                    IoOp::Write if chunk.is_partial() => {
                        self.submit(false, slot, &chunk).map(|cid| Stage::RmwRead { cid })
                    }
                    IoOp::Write => self.copy_in(slot, &chunk, mem),
                };
                self.advance(slot, id, chunk, stage);
            }
        }
        started
    }

    /// Puts the chunk's next stage in its slot, or ends the chunk: `Ok(None)` means done.
    fn advance(&mut self, slot: usize, job: u64, chunk: Chunk, stage: Result<Stage>) {
        let stage = match stage {
            Ok(Stage::CopyIn(event)) if event.query().unwrap_or(false) => {
                // A host copy (or a device copy already done): go straight on.
                self.submit(true, slot, &chunk).map(|cid| Stage::Write { cid })
            }
            other => other,
        };
        match stage {
            Ok(stage) => {
                if let Stage::RmwRead { cid } | Stage::Write { cid } | Stage::Read { cid } = stage {
                    self.by_cid[usize::from(cid)] = slot;
                }
                self.slots[slot] = Some(Slot { job, chunk, stage });
            }
            Err(e) => self.end_chunk(job, &chunk, Err(e)),
        }
    }

    fn end_chunk(&mut self, job: u64, chunk: &Chunk, result: Result<()>) {
        let active = self.jobs.get_mut(&job).expect("a chunk's job is active");
        if active.req.op == IoOp::Write && chunk.is_partial() {
            self.rmw_busy = false;
        }
        active.running -= 1;
        if let Err(e) = result {
            active.error.get_or_insert(e);
        }
    }

    fn slot_range(&self, slot: usize, chunk: &Chunk) -> Range<usize> {
        let start = slot * self.chunk_size;
        start..start + chunk.window
    }

    /// The slot's bytes that hold the chunk's data.
    fn data_ptr(&self, slot: usize, chunk: &Chunk) -> *mut u8 {
        // SAFETY: `slot * chunk_size + head + len <= slots * chunk_size`, the staging
        // buffer's length (a chunk's window is at most `chunk_size`).
        unsafe { self.staging.as_ptr().add(slot * self.chunk_size + chunk.head) }
    }

    fn submit(&mut self, write: bool, slot: usize, chunk: &Chunk) -> Result<u16> {
        let range = self.slot_range(slot, chunk);
        // SAFETY: the slot's range belongs to this chunk alone until its completion is
        // reaped (the slot stays taken), and the staging buffer outlives the queue (both
        // are this worker's, and the worker reaps every command before it returns).
        let submitted = unsafe {
            if write {
                self.queue.submit_write(chunk.lba, &self.staging, range)
            } else {
                self.queue.submit_read(chunk.lba, &mut self.staging, range)
            }
        };
        submitted.map_err(|e| self.storage_error(e))
    }

    /// Copies the chunk's bytes from the caller's memory into its slot.
    fn copy_in(&mut self, slot: usize, chunk: &Chunk, mem: MemRef) -> Result<Stage> {
        let dst = self.data_ptr(slot, chunk);
        match mem {
            MemRef::Host { ptr, .. } => {
                // SAFETY: the request's memory is valid for its length until its ticket
                // completes (Backend::submit); the slot is this chunk's alone.
                unsafe { std::ptr::copy_nonoverlapping(ptr.add(chunk.mem_offset), dst, chunk.len) };
                Ok(Stage::CopyIn(Box::new(Done)))
            }
            MemRef::Device { ptr, .. } => {
                // SAFETY: as above; the copy completes before the slot is reused (the
                // chunk waits for its event).
                unsafe {
                    self.stream
                        .copy_d2h(dst, ptr + chunk.mem_offset as u64, chunk.len)?
                };
                Ok(Stage::CopyIn(self.stream.record()?))
            }
        }
    }

    /// Copies the chunk's bytes from its slot to the caller's memory; `None` when done.
    fn copy_out(&mut self, slot: usize, chunk: &Chunk, mem: MemRef) -> Result<Option<Stage>> {
        let src = self.data_ptr(slot, chunk);
        match mem {
            MemRef::Host { ptr, .. } => {
                // SAFETY: as in `copy_in`, in the other direction.
                unsafe { std::ptr::copy_nonoverlapping(src, ptr.add(chunk.mem_offset), chunk.len) };
                Ok(None)
            }
            MemRef::Device { ptr, .. } => {
                // SAFETY: as in `copy_in`.
                unsafe {
                    self.stream
                        .copy_h2d(ptr + chunk.mem_offset as u64, src, chunk.len)?
                };
                Ok(Some(Stage::CopyOut(self.stream.record()?)))
            }
        }
    }

    /// Moves chunks whose copies have finished to their next stage.
    fn poll_copies(&mut self) -> bool {
        let mut progressed = false;
        for slot in 0..self.slots.len() {
            let ready = match self.slots[slot].as_ref().map(|s| &s.stage) {
                Some(Stage::CopyIn(e) | Stage::CopyOut(e)) => e.query(),
                _ => continue,
            };
            let ready = match ready {
                Ok(false) => continue,
                Ok(true) => Ok(()),
                Err(e) => Err(e),
            };
            progressed = true;
            let s = self.slots[slot].take().expect("matched above");
            match (s.stage, ready) {
                (Stage::CopyIn(_), Ok(())) => {
                    let next = self.submit(true, slot, &s.chunk).map(|cid| Stage::Write { cid });
                    self.advance(slot, s.job, s.chunk, next);
                }
                (_, result) => self.end_chunk(s.job, &s.chunk, result),
            }
        }
        progressed
    }

    /// Reaps NVMe completions and moves their chunks on.
    fn poll_queue(&mut self) -> bool {
        let completions = match self.queue.poll_completions(self.by_cid.len()) {
            Ok(c) => c,
            Err(e) => {
                self.fail_all(e);
                return true;
            }
        };
        let progressed = !completions.is_empty();
        for (cid, result) in completions {
            let slot = std::mem::replace(&mut self.by_cid[usize::from(cid)], usize::MAX);
            let Some(s) = self.slots.get_mut(slot).and_then(Option::take) else {
                tracing::warn!(cid, "completion for a command this worker does not know");
                continue;
            };
            if let Err(e) = result {
                let e = self.storage_error(e);
                self.end_chunk(s.job, &s.chunk, Err(e));
                continue;
            }
            let mem = self.jobs[&s.job].req.mem;
            match s.stage {
                Stage::RmwRead { .. } => {
                    let next = self.copy_in(slot, &s.chunk, mem);
                    self.advance(slot, s.job, s.chunk, next);
                }
                Stage::Read { .. } => match self.copy_out(slot, &s.chunk, mem) {
                    Ok(Some(stage)) => self.advance(slot, s.job, s.chunk, Ok(stage)),
                    Ok(None) => self.end_chunk(s.job, &s.chunk, Ok(())),
                    Err(e) => self.end_chunk(s.job, &s.chunk, Err(e)),
                },
                Stage::Write { .. } => self.end_chunk(s.job, &s.chunk, Ok(())),
                Stage::CopyIn(_) | Stage::CopyOut(_) => unreachable!("copies have no command"),
            }
        }
        progressed
    }

    /// Completes the requests all of whose chunks have ended.
    fn finish_jobs(&mut self) {
        let finished: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.running == 0 && (j.error.is_some() || j.next == j.chunks.len()))
            .map(|(&id, _)| id)
            .collect();
        for id in finished {
            let job = self.jobs.remove(&id).expect("listed above");
            self.order.retain(|q| !matches!(q, Queued::Io(i) if *i == id));
            let result = match job.error {
                Some(e) => Err(e),
                None => Ok(job.req.mem.len()),
            };
            tracing::trace!(id, ok = result.is_ok(), "request done");
            self.done(job.completer, result);
        }
    }

    fn barrier(&mut self, flush: bool) -> Result<usize> {
        if let Some(why) = &self.failed {
            return Err(failed_error(&self.target, why));
        }
        if flush {
            self.queue.flush().map_err(|e| self.storage_error(e))?;
        }
        Ok(0)
    }

    /// The controller failed: every chunk in flight and every request fails.
    fn fail_all(&mut self, e: controller::Error) {
        let why = e.to_string();
        tracing::error!(target = %self.target, error = %why, "controller failed");
        for slot in 0..self.slots.len() {
            if let Some(s) = self.slots[slot].take() {
                if let Stage::CopyIn(event) | Stage::CopyOut(event) = &s.stage {
                    // The caller's memory is in use until the copy ends.
                    let _ = event.synchronize();
                }
                self.end_chunk(s.job, &s.chunk, Err(failed_error(&self.target, &why)));
            }
        }
        self.by_cid.fill(usize::MAX);
        self.rmw_busy = false;
        for job in self.jobs.values_mut() {
            job.error.get_or_insert_with(|| failed_error(&self.target, &why));
        }
        self.failed = Some(why);
    }

    fn done(&self, completer: Completer, result: Result<usize>) {
        self.load.fetch_sub(1, Ordering::Relaxed);
        completer.complete(result);
    }
}

fn failed_error(target: &str, why: &str) -> Error {
    Error::Storage {
        target: target.to_owned(),
        source: why.to_owned().into(),
    }
}

/// An event that has already happened (a host copy).
#[derive(Debug)]
struct Done;

impl Event for Done {
    fn query(&self) -> Result<bool> {
        Ok(true)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
