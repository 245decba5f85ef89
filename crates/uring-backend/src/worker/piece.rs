//! The stages of a piece: starting it, issuing its reads and writes, handling their
//! completions (retries, short counts, end of file) and finishing it.

use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types};
use spillway_runtime::{Error, IoOp, MemRef, Result};
use tracing::trace;

use super::request::abandoned;
use super::{Worker, MAX_RETRIES};
use crate::plan::{Piece, Route};
use crate::staging::BufferIndex;

/// Where a piece is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stage {
    /// Reading the file (into the caller's memory or a staging buffer).
    Read,
    /// Copying the caller's bytes into the staging buffer.
    Fill,
    /// Writing the file (from the caller's memory or a staging buffer).
    Write,
    /// Copying the staging buffer's bytes out to the caller's memory.
    Drain,
}

/// A piece being worked on.
#[derive(Clone, Copy, Debug)]
pub(super) struct PieceTask {
    pub(super) request: u64,
    pub(super) piece: Piece,
    pub(super) buffer: Option<BufferIndex>,
    pub(super) stage: Stage,
    /// Bytes the current `Read` or `Write` stage has moved so far.
    pub(super) done: usize,
    pub(super) retries: u32,
}

impl Worker {
    /// True when one more I/O may go to the ring without exceeding the queue depth.
    fn ring_has_room(&self) -> bool {
        self.in_flight < self.queue_depth
    }

    /// Starts pieces of waiting requests, in order, while slots and buffers last. A request
    /// whose next piece must wait for its block lock is passed over until the lock is free.
    pub(super) fn start_pieces(&mut self) {
        let mut index = 0;
        while let Some(&id) = self.waiting.get(index) {
            let direct_has_room = self.ring_has_room() && self.ready.is_empty();
            let Some(request) = self.requests.get_mut(&id) else {
                self.waiting.remove(index);
                continue;
            };
            if request.failure.is_some() || request.next_piece == request.plan.len() {
                self.waiting.remove(index);
                continue;
            }
            let piece = request.plan.piece(request.next_piece);
            let op = request.job.op;
            let buffer = match piece.route {
                Route::Direct if direct_has_room => None,
                Route::Direct => break,
                Route::Staged => match self.ring.staging.acquire() {
                    Some(buffer) => Some(buffer),
                    None => break,
                },
            };
            // Read-modify-write: no other piece may rewrite the block until this one has.
            let block_guard = if op == IoOp::Write && piece.is_partial() {
                let Some(guard) = request.lock_block(&self.block_locks, &self.wake, piece) else {
                    if let Some(buffer) = buffer {
                        self.ring.staging.release(buffer);
                    }
                    index += 1;
                    continue;
                };
                Some(guard)
            } else {
                None
            };
            request.next_piece += 1;
            request.active_pieces += 1;
            let stage = match (op, piece.route) {
                (IoOp::Read, _) => Stage::Read,
                (IoOp::Write, Route::Direct) => Stage::Write,
                // Read-modify-write: the block's other bytes come from the file.
                (IoOp::Write, Route::Staged) if piece.is_partial() => Stage::Read,
                (IoOp::Write, Route::Staged) => Stage::Fill,
            };
            let pid = self.new_id();
            trace!(pid, ?piece, ?stage, "piece started");
            self.pieces.insert(
                pid,
                PieceTask {
                    request: id,
                    piece,
                    buffer,
                    stage,
                    done: 0,
                    retries: 0,
                },
            );
            if let Some(guard) = block_guard {
                self.block_guards.insert(pid, guard);
            }
            match stage {
                Stage::Fill => self.begin_fill(pid),
                _ => self.issue_io(pid),
            }
        }
    }

    /// Submits the piece's current `Read` or `Write` (its remainder, after a short one), or
    /// queues it until a ring slot frees up.
    pub(super) fn issue_io(&mut self, pid: u64) {
        if self.stop_if_needed(pid) {
            return;
        }
        if self.ring_has_room() {
            self.push_io(pid);
        } else {
            self.ready.push_back(pid);
        }
    }

    /// Submits queued I/Os while the ring has room.
    pub(super) fn issue_ready(&mut self) {
        while self.ring_has_room() {
            let Some(pid) = self.ready.pop_front() else { break };
            if !self.stop_if_needed(pid) {
                self.push_io(pid);
            }
        }
    }

    /// Builds the piece's read or write and pushes it to the submission queue.
    fn push_io(&mut self, pid: u64) {
        let Some(&task) = self.pieces.get(&pid) else {
            return;
        };
        let Some(request) = self.requests.get(&task.request) else {
            return;
        };
        let piece = task.piece;
        let len = (piece.io_len - task.done) as u32;
        let offset = piece.file_offset + task.done as u64;
        let fd = types::Fd(request.job.file.file.as_raw_fd());
        let fixed = self.ring.fixed_buffers;
        let entry: squeue::Entry = match (task.buffer, task.stage) {
            (Some(buffer), Stage::Read) => {
                let ptr = self.ring.staging.ptr(buffer).wrapping_add(task.done);
                if fixed {
                    opcode::ReadFixed::new(fd, ptr, len, buffer)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Read::new(fd, ptr, len).offset(offset).build()
                }
            }
            (Some(buffer), Stage::Write) => {
                let ptr = self.ring.staging.ptr(buffer).wrapping_add(task.done);
                if fixed {
                    opcode::WriteFixed::new(fd, ptr, len, buffer)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Write::new(fd, ptr, len).offset(offset).build()
                }
            }
            (None, Stage::Read) => {
                let ptr = host_address(request.job.mem, piece.mem_offset + task.done);
                opcode::Read::new(fd, ptr, len).offset(offset).build()
            }
            (None, Stage::Write) => {
                let ptr = host_address(request.job.mem, piece.mem_offset + task.done);
                opcode::Write::new(fd, ptr, len).offset(offset).build()
            }
            (_, stage) => {
                let error = Error::invalid(format!("internal: piece in stage {stage:?} has no I/O to issue"));
                self.finish_piece(pid, Err(error));
                return;
            }
        };
        let entry = entry.user_data(pid);
        if self.push(&entry) {
            self.in_flight += 1;
        } else {
            self.ready.push_front(pid);
        }
    }

    /// Handles the completion of a piece's read or write: retries EAGAIN / EINTR, reads or
    /// writes the rest after a short count, treats the end of the file as zeros (for
    /// read-modify-write) or as a short read (for reads), and moves the piece on.
    pub(super) fn on_io_result(&mut self, pid: u64, result: i32) {
        let Some(task) = self.pieces.get_mut(&pid) else {
            return;
        };
        if result < 0 {
            let errno = -result;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && task.retries < MAX_RETRIES {
                task.retries += 1;
                self.issue_io(pid);
            } else {
                let error = self.io_error(pid, errno);
                self.finish_piece(pid, Err(error));
            }
            return;
        }
        let moved = result as usize;
        task.done += moved;
        let task = *task;
        let Some(request) = self.requests.get(&task.request) else {
            return;
        };
        let op = request.job.op;
        let align = request.job.file.offset_align;
        let piece = task.piece;
        match task.stage {
            Stage::Read => {
                // A read for a read-modify-write wants the whole block; one for a read
                // only the bytes up to the request's last.
                let wanted = match op {
                    IoOp::Read => piece.needed_for_read(),
                    IoOp::Write => piece.io_len,
                };
                let at_end_of_file = moved == 0 || task.done % align != 0;
                if task.done >= wanted {
                    self.after_read(pid);
                } else if !at_end_of_file {
                    // Short read in the middle of the file: read the rest.
                    self.issue_io(pid);
                } else if op == IoOp::Write {
                    // The block extends past the end of the file: the rest reads as zeros.
                    self.after_read(pid);
                } else {
                    let error = self.short_io_error(pid, "read");
                    self.finish_piece(pid, Err(error));
                }
            }
            Stage::Write => {
                if task.done >= piece.io_len {
                    self.finish_piece(pid, Ok(()));
                } else if moved > 0 {
                    self.issue_io(pid);
                } else {
                    let error = self.short_io_error(pid, "write");
                    self.finish_piece(pid, Err(error));
                }
            }
            stage => {
                let error =
                    Error::invalid(format!("internal: I/O completion for a piece in stage {stage:?}"));
                self.finish_piece(pid, Err(error));
            }
        }
    }

    /// The piece's `Read` stage is complete.
    fn after_read(&mut self, pid: u64) {
        if self.stop_if_needed(pid) {
            return;
        }
        let Some(&task) = self.pieces.get(&pid) else {
            return;
        };
        let Some(op) = self.requests.get(&task.request).map(|r| r.job.op) else {
            return;
        };
        match (op, task.buffer) {
            (IoOp::Read, None) => self.finish_piece(pid, Ok(())),
            (IoOp::Read, Some(_)) => self.begin_drain(pid),
            (IoOp::Write, Some(buffer)) => {
                // Read-modify-write: zero what lies past the end of the file.
                let valid = task.done.min(task.piece.io_len);
                let buf = self.ring.staging.ptr(buffer);
                // SAFETY: the staging buffer holds at least `io_len` bytes (a piece never
                // exceeds the chunk size) and no I/O or copy on it is in flight.
                unsafe { std::ptr::write_bytes(buf.add(valid), 0, task.piece.io_len - valid) };
                self.begin_fill(pid);
            }
            (IoOp::Write, None) => {
                let error = Error::invalid("internal: a direct write piece was read".to_string());
                self.finish_piece(pid, Err(error));
            }
        }
    }

    /// Moves the piece to `stage`, with nothing moved yet.
    pub(super) fn set_stage(&mut self, pid: u64, stage: Stage) {
        if let Some(task) = self.pieces.get_mut(&pid) {
            task.stage = stage;
            task.done = 0;
            task.retries = 0;
        }
    }

    /// Ends the piece before its next step when its request has failed (another piece's
    /// error) or the worker is shutting down. Returns true when it did.
    pub(super) fn stop_if_needed(&mut self, pid: u64) -> bool {
        let Some(task) = self.pieces.get(&pid) else {
            return true;
        };
        let failed = self
            .requests
            .get(&task.request)
            .is_none_or(|request| request.failure.is_some());
        if failed {
            self.finish_piece(pid, Ok(()));
            true
        } else if self.shutting_down {
            self.finish_piece(pid, Err(abandoned()));
            true
        } else {
            false
        }
    }

    /// Ends the piece: gives its staging buffer and its block lock back, records its error
    /// on its request, and completes the request when this was its last piece.
    pub(super) fn finish_piece(&mut self, pid: u64, result: Result<()>) {
        let Some(task) = self.pieces.remove(&pid) else {
            return;
        };
        // No I/O of the piece is in flight any more: the block may be rewritten by others.
        drop(self.block_guards.remove(&pid));
        if let Some(buffer) = task.buffer {
            self.ring.staging.release(buffer);
        }
        let Some(request) = self.requests.get_mut(&task.request) else {
            return;
        };
        request.active_pieces -= 1;
        if let Err(error) = result {
            trace!(pid, %error, "piece failed");
            request.record_failure(error);
        }
        self.complete_if_finished(task.request);
    }
}

/// The host address `offset` bytes into `mem` (host memory: only direct pieces, which the
/// plan gives host memory alone, ask for it).
fn host_address(mem: MemRef, offset: usize) -> *mut u8 {
    match mem {
        MemRef::Host { ptr, .. } => ptr.wrapping_add(offset),
        MemRef::Device { ptr, .. } => (ptr + offset as u64) as *mut u8,
    }
}
