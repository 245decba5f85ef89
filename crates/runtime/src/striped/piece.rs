//! One request's pieces on their members: each carried through short counts
//! ([`crate::short`]), the request completed when the last one ends.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::backend::{Backend, Completer};
use crate::error::{Error, Result};
use crate::short::{Judged, Remaining};

use super::health::{Counters, FailurePolicy};

/// Collects the pieces of one request and completes it when the last one ends: with the
/// request's length only when every piece moved all its bytes.
pub(super) struct Gather {
    pub(super) remaining: AtomicUsize,
    pub(super) first_error: Mutex<Option<Error>>,
    pub(super) completer: Mutex<Option<Completer>>,
    pub(super) len: usize,
}

impl Gather {
    /// One piece ended: all its bytes moved (`Ok`) or it failed.
    pub(super) fn piece_done(&self, result: Result<()>) {
        if let Err(e) = result {
            self.fail(e);
        }
        self.pieces_done(1);
    }

    /// Records a failure of the request (the first one is reported).
    pub(super) fn fail(&self, e: Error) {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }

    /// True once a piece has failed: the request will fail, whatever the others do.
    pub(super) fn failed(&self) -> bool {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub(super) fn pieces_done(&self, count: usize) {
        if count > 0 && self.remaining.fetch_sub(count, Ordering::AcqRel) == count {
            let error = self.first_error.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(c) = self.completer.lock().unwrap_or_else(|e| e.into_inner()).take() {
                c.complete(match error {
                    Some(e) => Err(e),
                    None => Ok(self.len),
                });
            }
        }
    }
}

/// One piece of a set request on its member, until every byte of it has moved.
pub(super) struct Piece {
    /// The member's backend: weak, so that a completion callback never holds the last
    /// reference to the backend whose thread runs it.
    pub(super) backend: Weak<dyn Backend>,
    pub(super) counters: Arc<Counters>,
    pub(super) path: Arc<Path>,
    pub(super) gather: Arc<Gather>,
    /// The part of the piece not yet moved (on the member's target), and how far the
    /// piece has got through short counts.
    pub(super) remaining: Remaining,
    /// When the member is taken out of use.
    pub(super) policy: FailurePolicy,
}

impl Piece {
    /// Submits `rest` to the member; its completion is handled by [`Piece::ended`]. A
    /// submission refused at once is counted and returned.
    ///
    /// # Safety
    /// The memory of `rest` must stay valid (and, for a read, untouched) until the set
    /// request's ticket completes, which happens only after this piece has ended.
    pub(super) unsafe fn start(self) -> Result<()> {
        let rest = self.remaining.rest();
        let (counters, op) = (self.counters.clone(), rest.op);
        counters.started();
        let submitted = match self.backend.upgrade() {
            // SAFETY: the caller's promise, passed on.
            Some(backend) => unsafe { backend.submit(rest) },
            None => Err(Error::Abandoned(format!(
                "the striped set was dropped with a request on {} in flight",
                self.path.display()
            ))),
        };
        match submitted {
            Ok(ticket) => {
                ticket.then(move |result| self.ended(result));
                Ok(())
            }
            Err(e) => {
                counters.failed_with(&e, self.policy, &self.path);
                counters.ended(op, 0, true);
                Err(e)
            }
        }
    }

    /// The member completed `rest` with `result`: the piece is done, failed, or (after a
    /// short count) its rest is submitted again.
    pub(super) fn ended(self, result: Result<usize>) {
        let rest = self.remaining.rest();
        let (counters, gather, op) = (self.counters.clone(), self.gather.clone(), rest.op);
        let wanted = rest.mem.len();
        let n = match result {
            Ok(n) if n <= wanted => n,
            Ok(n) => {
                let e = self.overrun(n);
                counters.failed_with(&e, self.policy, &self.path);
                counters.ended(op, 0, true);
                return gather.piece_done(Err(e));
            }
            Err(e) => {
                counters.failed_with(&e, self.policy, &self.path);
                counters.ended(op, 0, true);
                return gather.piece_done(Err(e));
            }
        };
        let judged = self.remaining.judge(n);
        if judged == Judged::Done {
            counters.succeeded(&self.path);
            counters.ended(op, n, false);
            return gather.piece_done(Ok(()));
        }
        tracing::debug!(
            member = %self.path.display(),
            op = op.as_str(),
            offset = rest.offset,
            asked = wanted,
            moved = n,
            resubmits = self.remaining.resubmits(),
            "short piece"
        );
        if judged != Judged::Again || gather.failed() {
            counters.ended(op, n, true);
            return gather.piece_done(Err(self.remaining.short_error(n, &self.path)));
        }
        // The rest is in flight before this submission ends: the member stays busy.
        // SAFETY: the rest is part of the piece's memory, which the caller of the set's
        // submit keeps valid until the set ticket completes, after this piece has ended.
        let started = unsafe { self.advance(n).start() };
        counters.ended(op, n, false);
        if let Err(e) = started {
            gather.piece_done(Err(e));
        }
    }

    /// The piece after `n` more bytes moved (fewer than the rest has).
    pub(super) fn advance(self, n: usize) -> Piece {
        Piece {
            remaining: self.remaining.advance(n),
            ..self
        }
    }

    /// The error for a completion claiming `n` bytes of a `rest` that has fewer.
    pub(super) fn overrun(&self, n: usize) -> Error {
        let rest = self.remaining.rest();
        Error::io(
            format!(
                "{} of {} bytes at offset {} of {}",
                rest.op.as_str(),
                rest.mem.len(),
                rest.offset,
                self.path.display()
            ),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the member reported {n} bytes moved"),
            ),
        )
    }
}
