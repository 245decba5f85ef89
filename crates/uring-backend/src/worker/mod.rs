//! The worker: one thread driving one ring, its staging buffers and one device stream.
//!
//! Each request is planned into pieces (see [`crate::plan`]). A piece moves through stages:
//!
//! | request | route  | stages                                           |
//! |---------|--------|--------------------------------------------------|
//! | read    | direct | `Read` (into the caller's memory)                |
//! | read    | staged | `Read` (into staging) → `Drain` (to the memory)  |
//! | write   | direct | `Write` (from the caller's memory)               |
//! | write   | staged | `Fill` (from the memory) → `Write`               |
//! | write   | staged, partial block | `Read` → `Fill` (patch) → `Write` |
//!
//! A partial-block write (read-modify-write) starts only once it holds the lock on its
//! block, shared by all the backend's workers (see [`crate::block_locks`]), and keeps it
//! until the piece ends, so two writes of disjoint bytes of one block never both patch the
//! old block. A request whose next piece finds its block locked is passed over (the
//! requests behind it may start) and retried on every turn of the loop; releasing the lock
//! signals the waiting worker's eventfd, so a worker with nothing else to do sleeps until
//! then.
//!
//! `Fill` and `Drain` are a memcpy for host memory and a stream copy plus an event for
//! device memory; the next stage starts only once the event has completed, so the disk
//! never reads a staging buffer before the copy into it is done and a buffer is never
//! reused before the copy out of it is done. Several pieces are in flight at once (up to
//! the queue depth and the number of staging buffers), so the copy of one chunk overlaps
//! the disk I/O of another.
//!
//! The loop takes new commands, reaps completions, polls stream events, issues the I/Os
//! that wait for a ring slot and starts new pieces; then, unless a last look at the inbox
//! finds more commands (see [`crate::wake`] for why none is missed), it blocks:
//! - in `io_uring_enter` waiting for one completion when only I/O is pending or nothing is
//!   (an eventfd poll kept in the ring wakes it when a command arrives; it is multishot
//!   where the kernel supports it, so it is armed once rather than after every wake-up);
//! - in the same call with a short timeout when both I/O and copies are pending;
//! - on the oldest copy's event when only copies are pending.
//!
//! The I/Os the loop pushes to the submission queue go to the kernel together, in that
//! call (or, for requests that arrive while a burst of completions is being handled, every
//! few completions: see [`RESUBMIT_EVERY`]), so a burst of commands costs one system call.

mod copy;
mod errors;
mod piece;
mod request;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types};
use spillway_runtime::{Error, Event, Result, Stream};
use tracing::{debug, warn};

use crate::block_locks::{BlockGuard, BlockLocks};
use crate::ring::Ring;
use crate::wake::WakeSignal;

pub use request::Job;

use piece::PieceTask;
use request::Request;

/// `user_data` of the eventfd poll that wakes the worker.
const WAKE_TOKEN: u64 = u64::MAX;

/// A map keyed by the worker's request and piece ids.
type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Hashes the worker's ids, which are unique counter values chosen by the worker itself (no
/// one else picks them, so there is nothing to defend against): one multiplication, which
/// spreads consecutive ids over both the low bits (the bucket) and the high bits (the
/// control byte) of the hash, instead of a full SipHash per lookup.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed; this keeps other keys correct all the same.
        for &byte in bytes {
            self.write_u64(self.0 ^ u64::from(byte));
        }
    }

    fn write_u64(&mut self, id: u64) {
        // 2^64 divided by the golden ratio (Fibonacci hashing).
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// While handling a batch of completions, the worker looks for new commands (and submits
/// their I/Os) after every this many. Completions come in bursts (one interrupt often
/// reports many), and completing a request lets its caller submit the next one right away:
/// starting those only after the whole burst kept them waiting for it, while looking after
/// every completion costs one `io_uring_enter` (and one device notification) per request.
/// Four keeps batches of a few entries; measured with 4 KiB random I/O at queue depth 32,
/// 1 and 2 were clearly slower, 8 slightly slower.
const RESUBMIT_EVERY: usize = 4;

/// How long the worker waits for a completion before looking at its stream events again,
/// when both are pending.
const COPY_POLL_INTERVAL: Duration = Duration::from_micros(50);

/// How often an I/O failing with EAGAIN or EINTR is retried before its error is reported.
const MAX_RETRIES: u32 = 100;

/// What the backend sends a worker.
enum Command {
    Io(Job),
    Shutdown,
}

/// The backend's side of a worker: where to send requests, how busy it is, and its thread.
/// Dropping it stops the worker and waits for it.
#[derive(Debug)]
pub struct WorkerHandle {
    commands: Sender<Command>,
    wake: Arc<WakeSignal>,
    load: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Starts a worker thread that owns `ring` and copies through `stream`.
    pub fn spawn(
        index: usize,
        ring: Ring,
        stream: Arc<dyn Stream>,
        queue_depth: u32,
        chunk_size: usize,
        block_locks: Arc<BlockLocks>,
    ) -> Result<Self> {
        let (commands, inbox) = mpsc::channel();
        let wake = Arc::new(WakeSignal::new().map_err(|e| Error::io("creating an eventfd", e))?);
        let load = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            ring,
            stream,
            inbox,
            wake: wake.clone(),
            wake_armed: false,
            multishot_wake: true,
            load: load.clone(),
            queue_depth,
            chunk_size,
            block_locks,
            block_guards: IdMap::default(),
            requests: IdMap::default(),
            waiting: VecDeque::new(),
            pieces: IdMap::default(),
            ready: VecDeque::new(),
            copies: VecDeque::new(),
            in_flight: 0,
            next_id: 0,
            shutting_down: false,
            completions: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("spillway-uring-{index}"))
            .spawn(move || worker.run())
            .map_err(|e| Error::io("starting an io_uring worker thread", e))?;
        Ok(WorkerHandle {
            commands,
            wake,
            load,
            thread: Some(thread),
        })
    }

    /// Requests accepted and not yet completed.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    /// Hands a request to the worker; gives it back if the worker has stopped.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        self.load.fetch_add(1, Ordering::Relaxed);
        match self.commands.send(Command::Io(job)) {
            Ok(()) => {
                // A worker that is running takes the command before it next blocks.
                self.wake.notify_if_sleeping();
                Ok(())
            }
            Err(mpsc::SendError(command)) => {
                self.load.fetch_sub(1, Ordering::Relaxed);
                match command {
                    Command::Io(job) => Err(job),
                    Command::Shutdown => unreachable!("only requests are sent here"),
                }
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        // A worker that already stopped has dropped its inbox; nothing to tell it then.
        let _ = self.commands.send(Command::Shutdown);
        self.wake.notify();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("an io_uring worker thread panicked");
            }
        }
    }
}

/// One worker thread's state: its ring, its stream and the requests and pieces it works on.
struct Worker {
    // The ring first: it must be dropped (cancelling the wake-up poll) before the eventfd
    // and after every I/O has been reaped.
    ring: Ring,
    stream: Arc<dyn Stream>,
    inbox: Receiver<Command>,
    wake: Arc<WakeSignal>,
    /// Whether the eventfd poll is in the ring.
    wake_armed: bool,
    /// Whether the eventfd poll is multishot (stays armed, and the eventfd need not be
    /// cleared: each write triggers it). Turned off for good when the kernel refuses it
    /// (before Linux 5.13); a one-shot poll is re-armed after each wake-up and the
    /// eventfd cleared.
    multishot_wake: bool,
    load: Arc<AtomicUsize>,
    queue_depth: u32,
    chunk_size: usize,
    /// The backend's block locks, shared with the other workers.
    block_locks: Arc<BlockLocks>,
    /// The block locks held by this worker's read-modify-write pieces, by piece id. A guard
    /// is dropped (releasing its block) when its piece finishes, or with the worker.
    block_guards: IdMap<BlockGuard>,
    requests: IdMap<Request>,
    /// Requests with pieces not yet started, oldest first (a request whose next piece waits
    /// for a block lock may be passed by later ones).
    waiting: VecDeque<u64>,
    pieces: IdMap<PieceTask>,
    /// Pieces whose next I/O waits for a ring slot, oldest first.
    ready: VecDeque<u64>,
    /// Stream copies in flight, in stream order (so they complete in this order).
    copies: VecDeque<(u64, Box<dyn Event>)>,
    /// I/Os pushed to the ring and not yet reaped (the wake-up poll excluded).
    in_flight: u32,
    next_id: u64,
    shutting_down: bool,
    /// Scratch space for reaped completions: `user_data`, result and flags.
    completions: Vec<(u64, i32, u32)>,
}

impl Worker {
    /// The event loop; returns once shutdown was asked for and everything in flight is done.
    fn run(mut self) {
        debug!(
            fixed_buffers = self.ring.fixed_buffers,
            staging_buffers = self.ring.staging.count(),
            "io_uring worker started"
        );
        loop {
            self.take_commands();
            self.reap_completions();
            self.poll_copies();
            self.issue_ready();
            self.start_pieces();
            if self.shutting_down && self.is_drained() {
                break;
            }
            self.wait();
        }
        debug_assert!(
            self.ring.staging.all_free(),
            "a staging buffer was not given back"
        );
        debug_assert!(self.block_guards.is_empty(), "a block lock was not released");
        debug!("io_uring worker stopped");
    }

    /// True when nothing is left to complete: no request, no I/O, no copy.
    fn is_drained(&self) -> bool {
        self.requests.is_empty() && self.in_flight == 0 && self.copies.is_empty()
    }

    /// A fresh id for a request or a piece (piece ids are the I/Os' `user_data`).
    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Takes every command waiting in the inbox, without blocking. Returns true when that
    /// gave the loop something new to do (a command, or the start of the shutdown).
    fn take_commands(&mut self) -> bool {
        let mut taken = false;
        loop {
            match self.inbox.try_recv() {
                Ok(Command::Io(job)) => self.accept(job),
                Ok(Command::Shutdown) => self.begin_shutdown(),
                Err(TryRecvError::Disconnected) => {
                    taken |= !self.shutting_down;
                    self.begin_shutdown();
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
            taken = true;
        }
        taken
    }

    /// Handles every completion in the completion queue, starting the requests that arrive
    /// meanwhile.
    fn reap_completions(&mut self) {
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(
            self.ring
                .uring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
        );
        for (index, (user_data, result, flags)) in completions.drain(..).enumerate() {
            // Completing a request runs its caller's callback, which often submits the next
            // request at once; start those every few completions instead of after the
            // whole batch, so they do not wait for it (see `RESUBMIT_EVERY`).
            if index % RESUBMIT_EVERY == RESUBMIT_EVERY - 1 && self.take_commands() {
                self.issue_ready();
                self.start_pieces();
                self.submit_queued();
            }
            if user_data == WAKE_TOKEN {
                self.on_wake(result, flags);
            } else if self.pieces.contains_key(&user_data) {
                self.in_flight -= 1;
                self.on_io_result(user_data, result);
            } else {
                warn!(user_data, result, "io_uring completion for an unknown operation");
            }
        }
        self.completions = completions;
    }

    /// Hands the kernel the entries in the submission queue, if any, without waiting.
    fn submit_queued(&mut self) {
        if !self.ring.uring.submission().is_empty() {
            if let Err(e) = self.ring.uring.submit() {
                debug!("io_uring submit failed: {e}");
            }
        }
    }

    /// Handles a completion of the eventfd poll.
    fn on_wake(&mut self, result: i32, flags: u32) {
        if self.multishot_wake && result == -libc::EINVAL {
            debug!("multishot poll unsupported; re-arming a one-shot poll after each wake-up");
            self.multishot_wake = false;
            self.wake_armed = false;
        } else if !self.multishot_wake {
            self.wake.clear();
            self.wake_armed = false;
        } else if !cqueue::more(flags) {
            // The kernel ended the multishot poll (e.g. the completion queue overflowed).
            self.wake_armed = false;
        }
    }

    /// Pushes an entry, submitting first if the submission queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: every buffer an entry names stays valid until its completion is reaped:
            // staging buffers belong to the ring; caller memory is guaranteed by the contract
            // of `Backend::submit` (the ticket completes only after the last completion); the
            // descriptor is kept open by the request's `Arc<OpenFile>`; the wake-up poll names
            // the eventfd, which outlives the ring.
            if unsafe { self.ring.uring.submission().push(entry) }.is_ok() {
                return true;
            }
            if let Err(e) = self.ring.uring.submit() {
                debug!("io_uring submit failed while the queue was full: {e}");
            }
        }
        false
    }

    /// Submits what is queued and blocks until there may be something to do.
    fn wait(&mut self) {
        if !self.wake_armed {
            let poll = opcode::PollAdd::new(types::Fd(self.wake.raw_fd()), libc::POLLIN as u32)
                .multi(self.multishot_wake)
                .build()
                .user_data(WAKE_TOKEN);
            self.wake_armed = self.push(&poll);
        }
        self.wake.prepare_to_sleep();
        if self.take_commands() {
            // New work arrived since the loop looked: start it and hand the kernel its
            // I/Os at once, rather than block.
            self.wake.awake();
            self.start_pieces();
            self.submit_queued();
            return;
        }
        let copies_pending = !self.copies.is_empty();
        let io_pending = self.in_flight > 0;
        let result = if copies_pending && !io_pending {
            let submitted = self.ring.uring.submit().map(drop);
            if let Some((_, event)) = self.copies.front() {
                // An error shows up again in `poll_copies`, which handles it.
                let _ = event.synchronize();
            }
            submitted
        } else if copies_pending || !self.wake_armed {
            self.wait_with_timeout(COPY_POLL_INTERVAL)
        } else {
            self.ring.uring.submit_and_wait(1).map(drop)
        };
        self.wake.awake();
        if let Err(e) = result {
            match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {}
                _ => {
                    warn!("io_uring_enter failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Submits, then waits at most `timeout` for one completion.
    fn wait_with_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        if self.ring.timed_wait {
            let timespec = types::Timespec::from(timeout);
            let args = types::SubmitArgs::new().timespec(&timespec);
            self.ring.uring.submitter().submit_with_args(1, &args).map(drop)
        } else {
            let submitted = self.ring.uring.submit().map(drop);
            std::thread::sleep(timeout);
            submitted
        }
    }
}

impl Drop for Worker {
    /// After a normal shutdown nothing is in flight here. If the loop ended early (a bug
    /// that panicked), wait until the kernel and the stream are done with every buffer
    /// before the staging memory is freed and the tickets are abandoned.
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if let Err(e) = self.ring.uring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    warn!("io_uring_enter failed while draining a stopped worker: {e}");
                    break;
                }
            }
            for cqe in self.ring.uring.completion() {
                if cqe.user_data() != WAKE_TOKEN {
                    self.in_flight = self.in_flight.saturating_sub(1);
                }
            }
        }
        for (_, event) in self.copies.drain(..) {
            let _ = event.synchronize();
        }
    }
}
