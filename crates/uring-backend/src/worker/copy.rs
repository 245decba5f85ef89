//! Copies between the caller's memory and staging buffers: a memcpy for host memory, a
//! stream copy and an event for device memory.

use spillway_runtime::{Error, MemRef, Result};
use tracing::warn;

use super::piece::Stage;
use super::Worker;
use crate::plan::Piece;

impl Worker {
    /// The piece, the request's memory and where the piece's bytes sit in its staging
    /// buffer. A piece without a buffer or a request (which would be a bug) ends here.
    fn copy_endpoints(&mut self, pid: u64) -> Option<(Piece, MemRef, *mut u8)> {
        let task = *self.pieces.get(&pid)?;
        let mem = self.requests.get(&task.request).map(|r| r.job.mem);
        match (mem, task.buffer) {
            (Some(mem), Some(buffer)) => {
                let staging = self.ring.staging.ptr(buffer).wrapping_add(task.piece.skip);
                Some((task.piece, mem, staging))
            }
            _ => {
                let error = Error::invalid("internal: a copy for a piece without a staging buffer");
                self.finish_piece(pid, Err(error));
                None
            }
        }
    }

    /// Copies the request's bytes into the piece's staging buffer, then writes it.
    pub(super) fn begin_fill(&mut self, pid: u64) {
        let Some((piece, mem, staging)) = self.copy_endpoints(pid) else {
            return;
        };
        match mem {
            MemRef::Host { ptr, .. } => {
                // SAFETY: the source lies inside the caller's region (the plan keeps
                // `mem_offset + len` within it; the region is valid until the ticket
                // completes); the destination lies inside the staging buffer (`skip + len
                // <= io_len <= chunk size`), which nothing else uses now.
                unsafe { std::ptr::copy_nonoverlapping(ptr.add(piece.mem_offset), staging, piece.len) };
                self.set_stage(pid, Stage::Write);
                self.issue_io(pid);
            }
            MemRef::Device { ptr, .. } => {
                // SAFETY: as above; both regions stay valid until the copy's event completes,
                // which the piece waits for before its buffer is used or released.
                let enqueued = unsafe {
                    self.stream
                        .copy_d2h(staging, ptr + piece.mem_offset as u64, piece.len)
                };
                self.after_enqueue(pid, Stage::Fill, enqueued);
            }
        }
    }

    /// Copies the piece's bytes from its staging buffer out to the request's memory.
    pub(super) fn begin_drain(&mut self, pid: u64) {
        let Some((piece, mem, staging)) = self.copy_endpoints(pid) else {
            return;
        };
        match mem {
            MemRef::Host { ptr, .. } => {
                // SAFETY: as in `begin_fill`, with the directions swapped.
                unsafe { std::ptr::copy_nonoverlapping(staging, ptr.add(piece.mem_offset), piece.len) };
                self.finish_piece(pid, Ok(()));
            }
            MemRef::Device { ptr, .. } => {
                // SAFETY: as in `begin_fill`.
                let enqueued = unsafe {
                    self.stream
                        .copy_h2d(ptr + piece.mem_offset as u64, staging, piece.len)
                };
                self.after_enqueue(pid, Stage::Drain, enqueued);
            }
        }
    }

    /// Records an event after an enqueued copy and waits for it; on failure, makes sure the
    /// stream no longer touches the buffer before the piece fails.
    fn after_enqueue(&mut self, pid: u64, stage: Stage, enqueued: Result<()>) {
        let event = enqueued.and_then(|()| self.stream.record());
        match event {
            Ok(event) => {
                self.set_stage(pid, stage);
                self.copies.push_back((pid, event));
            }
            Err(error) => {
                if let Err(sync_error) = self.stream.synchronize() {
                    warn!("stream synchronize after a failed copy failed too: {sync_error}");
                }
                self.finish_piece(pid, Err(error));
            }
        }
    }

    /// Moves on the pieces whose copies have completed (events complete in stream order).
    pub(super) fn poll_copies(&mut self) {
        while let Some((pid, event)) = self.copies.front() {
            let pid = *pid;
            match event.query() {
                Ok(false) => break,
                Ok(true) => {
                    self.copies.pop_front();
                    self.after_copy(pid);
                }
                Err(error) => {
                    self.copies.pop_front();
                    if let Err(sync_error) = self.stream.synchronize() {
                        warn!("stream synchronize after a failed event failed too: {sync_error}");
                    }
                    self.finish_piece(pid, Err(error));
                }
            }
        }
    }

    /// A copy has completed: a filled buffer goes on to its write, a drained piece is done.
    fn after_copy(&mut self, pid: u64) {
        let Some(task) = self.pieces.get(&pid) else { return };
        match task.stage {
            Stage::Fill => {
                if !self.stop_if_needed(pid) {
                    self.set_stage(pid, Stage::Write);
                    self.issue_io(pid);
                }
            }
            _ => self.finish_piece(pid, Ok(())),
        }
    }
}
