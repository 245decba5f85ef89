//! The errors a piece reports, naming the path, the operation and the offsets.

use std::io;

use spillway_runtime::Error;

use super::piece::Stage;
use super::Worker;

impl Worker {
    /// The error for a failed read or write (`errno` from its completion): no space, or
    /// an I/O error naming the path, the operation, its offset and the request it is part of.
    pub(super) fn io_error(&self, pid: u64, errno: i32) -> Error {
        let task = self.pieces[&pid];
        let request = &self.requests[&task.request];
        let job = &request.job;
        let file = &job.file;
        if errno == libc::ENOSPC || errno == libc::EDQUOT {
            return Error::NoSpace {
                path: file.path.clone(),
                offset: job.offset,
                needed: job.mem.len() as u64,
            };
        }
        let what = match task.stage {
            Stage::Read => "read",
            _ => "write",
        };
        let hint = if errno == libc::EINVAL && file.direct_io {
            format!(
                " (direct I/O needs offsets and lengths aligned to {} bytes and memory to {})",
                file.offset_align, file.mem_align
            )
        } else {
            String::new()
        };
        Error::io(
            format!(
                "io_uring {what} of {} bytes at offset {} of {} (part of a {} of {} bytes at offset {}){hint}",
                task.piece.io_len - task.done,
                task.piece.file_offset + task.done as u64,
                file.path.display(),
                job.op.as_str(),
                job.mem.len(),
                job.offset,
            ),
            io::Error::from_raw_os_error(errno),
        )
    }

    /// The request's bytes stopped at the end of the file inside this piece.
    pub(super) fn short_io_error(&self, pid: u64, op: &'static str) -> Error {
        let task = self.pieces[&pid];
        let job = &self.requests[&task.request].job;
        let piece = task.piece;
        let done_in_piece = task.done.saturating_sub(piece.skip).min(piece.len);
        Error::ShortIo {
            op,
            path: job.file.path.clone(),
            offset: job.offset,
            done: (piece.mem_offset + done_in_piece) as u64,
            wanted: job.mem.len() as u64,
        }
    }
}
