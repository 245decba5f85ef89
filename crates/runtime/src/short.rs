//! Short counts: a [`Backend`](crate::Backend)'s ticket completes with the bytes moved,
//! and the contract allows fewer than asked (as the kernel may return). Whoever submits
//! never takes a short count for success: it submits the rest of the request again —
//! offset and memory advanced by the count — and does so after each further short count,
//! up to [`MAX_RESUBMITS`] times. A completion that moves nothing, one claiming more than
//! was asked, or one short count too many fails the request.
//!
//! [`Remaining`] is one request's way through this, and [`Remaining::judge`] says what a
//! completion means. The engine's requests (`engine/pending.rs`), the pieces of a striped
//! set (`striped/piece.rs`) and the bench's passes each wait in their own way (blocking,
//! completion callbacks, a channel) and share it.

use std::path::Path;

use crate::backend::IoRequest;
use crate::error::Error;

/// How many times the rest of one request is submitted again after short counts before it
/// fails. Each resubmission follows a count of at least one byte, so the bound only stops a
/// backend that keeps moving a little at a time.
pub const MAX_RESUBMITS: u32 = 64;

/// One request on its way through short counts: the part not yet moved, and how far the
/// request has got.
#[derive(Clone, Copy, Debug)]
pub struct Remaining {
    rest: IoRequest,
    moved: usize,
    resubmits: u32,
}

/// What a completion of [`Remaining::rest`] means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judged {
    /// Every byte wanted has moved.
    Done,
    /// Short, but it moved something and the bound allows another submission: submit
    /// [`Remaining::advance`]'s rest.
    Again,
    /// Short, and it moved nothing or was short once too often: the request fails
    /// ([`Remaining::short_error`]).
    GiveUp,
    /// The backend claimed more bytes than were asked: the request fails.
    Overrun,
}

impl Remaining {
    /// A request not yet submitted.
    pub fn new(req: IoRequest) -> Remaining {
        Remaining {
            rest: req,
            moved: 0,
            resubmits: 0,
        }
    }

    /// The part of the request not yet moved: what to submit (or what is in flight).
    pub fn rest(&self) -> IoRequest {
        self.rest
    }

    /// Bytes of the request moved before [`Remaining::rest`].
    pub fn moved(&self) -> usize {
        self.moved
    }

    /// Times the rest was submitted again after a short count.
    pub fn resubmits(&self) -> u32 {
        self.resubmits
    }

    /// The whole request: its first offset and its length.
    pub fn whole(&self) -> (u64, u64) {
        let moved = self.moved as u64;
        (self.rest.offset - moved, moved + self.rest.mem.len() as u64)
    }

    /// What a completion moving `n` bytes of the rest means, every byte of the request
    /// being wanted.
    pub fn judge(&self, n: usize) -> Judged {
        self.judge_needing(n, self.whole().1 as usize)
    }

    /// What a completion moving `n` bytes of the rest means, when the first `needed`
    /// bytes of the whole request are enough (a read of an extent whose tail is padding
    /// never written).
    pub fn judge_needing(&self, n: usize, needed: usize) -> Judged {
        let wanted = self.rest.mem.len();
        if n > wanted {
            Judged::Overrun
        } else if n == wanted || (n > 0 && self.moved + n >= needed) {
            Judged::Done
        } else if n == 0 || self.resubmits >= MAX_RESUBMITS {
            Judged::GiveUp
        } else {
            Judged::Again
        }
    }

    /// The request after `n` more bytes moved (fewer than the rest has): the rest advanced
    /// past them, to be submitted again.
    pub fn advance(self, n: usize) -> Remaining {
        let len = self.rest.mem.len();
        debug_assert!(n < len, "advance({n}) past a rest of {len} bytes");
        Remaining {
            rest: IoRequest {
                offset: self.rest.offset + n as u64,
                mem: self.rest.mem.slice(n, len - n),
                ..self.rest
            },
            moved: self.moved + n,
            resubmits: self.resubmits + 1,
        }
    }

    /// The error for the request given up after a last completion of `n` bytes, naming
    /// the target's `path`.
    pub fn short_error(&self, n: usize, path: &Path) -> Error {
        let (offset, wanted) = self.whole();
        Error::ShortIo {
            op: self.rest.op.as_str(),
            path: path.to_path_buf(),
            offset,
            done: (self.moved + n) as u64,
            wanted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{IoOp, TargetId};
    use crate::memory::MemRef;

    fn request(len: usize) -> IoRequest {
        IoRequest {
            target: TargetId(0),
            op: IoOp::Read,
            offset: 4096,
            // Device memory: an address the test never dereferences.
            mem: MemRef::Device { ptr: 0x10000, len },
        }
    }

    #[test]
    fn a_short_count_advances_offset_and_memory_and_counts_the_resubmission() {
        let r = Remaining::new(request(100));
        assert_eq!(r.judge(30), Judged::Again);
        let r = r.advance(30);
        let rest = r.rest();
        assert_eq!(
            (rest.offset, rest.mem.len(), r.moved(), r.resubmits()),
            (4126, 70, 30, 1)
        );
        assert_eq!(r.whole(), (4096, 100));
        assert_eq!(r.judge(69), Judged::Again);
        assert_eq!(r.judge(70), Judged::Done);
    }

    #[test]
    fn nothing_moved_an_overrun_or_too_many_resubmissions_give_up() {
        let mut r = Remaining::new(request(100));
        assert_eq!(r.judge(0), Judged::GiveUp);
        assert_eq!(r.judge(101), Judged::Overrun);
        for _ in 0..MAX_RESUBMITS {
            assert_eq!(r.judge(1), Judged::Again);
            r = r.advance(1);
        }
        assert_eq!(r.judge(1), Judged::GiveUp);
        match r.short_error(1, Path::new("/x")) {
            Error::ShortIo {
                offset, done, wanted, ..
            } => assert_eq!((offset, done, wanted), (4096, u64::from(MAX_RESUBMITS) + 1, 100)),
            other => panic!("not a short count: {other}"),
        }
    }

    #[test]
    fn a_short_count_that_moved_the_needed_bytes_is_done() {
        let r = Remaining::new(request(100));
        assert_eq!(r.judge_needing(60, 60), Judged::Done);
        assert_eq!(r.judge_needing(59, 60), Judged::Again);
        // After a short count, `needed` still counts from the start of the request.
        let r = r.advance(50);
        assert_eq!(r.judge_needing(9, 60), Judged::Again);
        assert_eq!(r.judge_needing(10, 60), Judged::Done);
    }
}
