//! Requests: accepting a job, shutting down, and completing the caller's ticket.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use spillway_runtime::{Completer, Error, IoOp, MemRef, Result};
use tracing::{debug, debug_span, trace, Span};

use super::Worker;
use crate::block_locks::{BlockGuard, BlockKey, BlockLocks};
use crate::plan::{Piece, Plan, PlanInput};
use crate::targets::{OpenFile, PendingGuard};
use crate::wake::WakeSignal;

/// One I/O request handed to a worker.
pub struct Job {
    /// Read or write.
    pub op: IoOp,
    /// Byte offset in the target.
    pub offset: u64,
    /// The caller's memory.
    pub mem: MemRef,
    /// The target; keeps its descriptor open while the request runs.
    pub file: Arc<OpenFile>,
    /// Completes the caller's ticket.
    pub completer: Completer,
    /// Keeps the request visible to `flush` and `close` until it completes.
    pub pending: PendingGuard,
}

impl Job {
    /// Completes the request. The target is released first and the pending mark last, so
    /// a `flush` or `close` waiting on this request wakes with the ticket complete and (for
    /// `close`) the descriptor no longer used by the worker.
    fn complete(self, result: Result<usize>) {
        let Job {
            file,
            completer,
            pending,
            ..
        } = self;
        drop(file);
        completer.complete(result);
        drop(pending);
    }
}

/// A request being worked on.
pub(super) struct Request {
    pub(super) job: Job,
    pub(super) plan: Plan,
    /// Index of the next piece to start.
    pub(super) next_piece: usize,
    /// Pieces started and not finished.
    pub(super) active_pieces: usize,
    /// The first error; once set, no new piece or stage starts.
    pub(super) failure: Option<Error>,
    pub(super) span: Span,
    pub(super) started: Instant,
    /// Since when the next piece has been waiting for its block lock, if it is.
    pub(super) lock_wait_since: Option<Instant>,
}

impl Request {
    /// Keeps the first error (for several reads past the end, the smallest byte count).
    pub(super) fn record_failure(&mut self, error: Error) {
        match (&mut self.failure, error) {
            (None, error) => self.failure = Some(error),
            // Several pieces past the end of the file: report the bytes before the first.
            (Some(Error::ShortIo { done, .. }), Error::ShortIo { done: other, .. }) => {
                *done = (*done).min(other);
            }
            (Some(_), _) => {}
        }
    }

    /// Takes the lock on the block of `piece`, a read-modify-write that is the request's next
    /// piece; `None` when another piece holds it (`waiter` is then signalled once it is
    /// released).
    pub(super) fn lock_block(
        &mut self,
        locks: &Arc<BlockLocks>,
        waiter: &Arc<WakeSignal>,
        piece: Piece,
    ) -> Option<BlockGuard> {
        let key = BlockKey {
            file: self.job.file.identity,
            offset: piece.file_offset,
        };
        let block = piece.file_offset;
        match locks.try_lock(key, waiter) {
            Some(guard) => {
                if let Some(since) = self.lock_wait_since.take() {
                    let waited_us = since.elapsed().as_micros() as u64;
                    trace!(parent: &self.span, block, waited_us, "block lock taken");
                }
                Some(guard)
            }
            None => {
                if self.lock_wait_since.is_none() {
                    self.lock_wait_since = Some(Instant::now());
                    trace!(parent: &self.span, block, "waiting for a block lock");
                }
                None
            }
        }
    }

    /// True when no piece is active and none will start.
    fn is_finished(&self) -> bool {
        self.active_pieces == 0 && (self.failure.is_some() || self.next_piece == self.plan.len())
    }
}

impl Worker {
    /// Plans a new request and queues it for its pieces to start.
    pub(super) fn accept(&mut self, job: Job) {
        if self.shutting_down {
            self.load.fetch_sub(1, Ordering::Relaxed);
            job.complete(Err(abandoned()));
            return;
        }
        let plan = Plan::new(PlanInput {
            offset: job.offset,
            len: job.mem.len(),
            mem_addr: job.mem.addr(),
            kernel_accessible: !job.mem.is_device(),
            offset_align: job.file.offset_align,
            mem_align: job.file.mem_align,
            chunk_size: self.chunk_size,
        });
        let span = debug_span!(
            "uring_request",
            op = job.op.as_str(),
            target = job.file.id.0,
            offset = job.offset,
            len = job.mem.len(),
            memory = if job.mem.is_device() { "device" } else { "host" },
        );
        debug!(parent: &span, pieces = plan.len(), middle = ?plan.middle_route(), "request accepted");
        let id = self.new_id();
        self.requests.insert(
            id,
            Request {
                job,
                plan,
                next_piece: 0,
                active_pieces: 0,
                failure: None,
                span,
                started: Instant::now(),
                lock_wait_since: None,
            },
        );
        self.waiting.push_back(id);
    }

    /// Stops starting work: requests not started yet are abandoned, pieces in progress stop
    /// after their current I/O or copy.
    pub(super) fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        let waiting: Vec<u64> = self.waiting.drain(..).collect();
        for id in waiting {
            if let Some(request) = self.requests.get_mut(&id) {
                request.record_failure(abandoned());
            }
            self.complete_if_finished(id);
        }
    }

    /// Completes the request's ticket if it is finished.
    pub(super) fn complete_if_finished(&mut self, id: u64) {
        if !self.requests.get(&id).is_some_and(Request::is_finished) {
            return;
        }
        let Some(request) = self.requests.remove(&id) else {
            return;
        };
        self.load.fetch_sub(1, Ordering::Relaxed);
        let Request {
            job,
            failure,
            span,
            started,
            ..
        } = request;
        let elapsed_us = started.elapsed().as_micros() as u64;
        let result = match failure {
            // A read that came back short from a file now shorter than the read: say that
            // the file was truncated underneath, rather than only that the read was short.
            Some(short @ Error::ShortIo { .. }) if job.op == IoOp::Read => {
                let error = job
                    .file
                    .check_unchanged(job.offset, job.mem.len() as u64)
                    .err()
                    .unwrap_or(short);
                debug!(parent: &span, elapsed_us, %error, "request failed");
                Err(error)
            }
            Some(error) => {
                debug!(parent: &span, elapsed_us, %error, "request failed");
                Err(error)
            }
            None => {
                let checked = match job.op {
                    IoOp::Read => job.file.check_unchanged(job.offset, job.mem.len() as u64),
                    IoOp::Write => {
                        job.file.wrote(job.offset, job.mem.len() as u64);
                        Ok(())
                    }
                };
                match checked {
                    Ok(()) => {
                        debug!(parent: &span, elapsed_us, "request completed");
                        Ok(job.mem.len())
                    }
                    Err(error) => {
                        debug!(parent: &span, elapsed_us, %error, "request read a changed file");
                        Err(error)
                    }
                }
            }
        };
        job.complete(result);
    }
}

/// The error of requests cut short by a shutdown.
pub(super) fn abandoned() -> Error {
    Error::Abandoned("the io_uring backend was shut down before the request ran".into())
}
