//! [`PendingIo`]: one storage request of the engine, in flight until every one of its
//! bytes has moved.
//!
//! A backend's ticket completes with the bytes moved, and the [`Backend`] contract allows
//! fewer than asked (a short read or write, as the kernel may return one). The engine never
//! takes a short count for success: it submits the rest of the request — offset and memory
//! advanced by the count — and does so again after each further short count, up to
//! [`MAX_RESUBMITS`] times. A completion that moves nothing, a count past what was asked, or
//! one short count too many fails the request ([`Error::ShortIo`] for the first and last),
//! and the failure takes the engine's usual path: a failed write keeps its tensors in their
//! own memory, a failed read is an error to the fetch caller.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::backend::{Backend, IoRequest, Ticket};
use crate::error::{Error, Result};

use super::stats::Stats;

/// How many times the rest of one request is submitted again after short counts before the
/// engine gives up on it. Each resubmission has moved at least one byte more, so the bound
/// only stops a backend that keeps moving a little at a time.
pub(crate) const MAX_RESUBMITS: u32 = 64;

/// One request in flight: how far it has got and the ticket of the part in flight.
pub(crate) struct PendingIo {
    progress: Progress,
    ticket: Ticket,
}

/// How far one request has got.
struct Progress {
    /// The part of the request not yet moved: what the ticket in flight is for.
    rest: IoRequest,
    /// Bytes of the request moved before `rest`.
    moved: usize,
    /// Times `rest` was submitted after a short count.
    resubmits: u32,
    /// The target's path, for errors.
    path: Arc<Path>,
}

/// What a completed [`PendingIo`] came to.
pub(crate) enum Settled {
    /// Every byte has moved.
    Done,
    /// A short count: the rest is in flight again.
    Resubmitted(PendingIo),
    /// The request failed.
    Failed(Error),
}

impl PendingIo {
    /// Submits `req` to `backend`.
    ///
    /// # Safety
    /// As for [`Backend::submit`], for as long as the request may be in flight: until
    /// [`PendingIo::settle`] has returned [`Settled::Done`] or [`Settled::Failed`] (or
    /// [`PendingIo::wait`] has returned), since a short count is followed by a submission of
    /// the rest of the same memory.
    pub(crate) unsafe fn submit(backend: &dyn Backend, req: IoRequest, path: Arc<Path>) -> Result<PendingIo> {
        // SAFETY: the caller's promise, passed on.
        let ticket = unsafe { backend.submit(req)? };
        Ok(PendingIo {
            progress: Progress {
                rest: req,
                moved: 0,
                resubmits: 0,
                path,
            },
            ticket,
        })
    }

    /// True once the ticket in flight has completed ([`PendingIo::settle`] will not block).
    pub(crate) fn is_done(&self) -> bool {
        self.ticket.is_done()
    }

    /// Runs `f` when the ticket in flight completes (at once if it has).
    pub(crate) fn on_complete(&self, f: impl FnOnce() + Send + 'static) {
        self.ticket.on_complete(f);
    }

    /// Takes the result of the ticket in flight (waiting for it if need be). After a short
    /// count the rest is submitted again when `retry` is set and the bound allows; without
    /// `retry` (the caller is giving up on the work this request is part of) a short count
    /// fails at once.
    pub(crate) fn settle(self, backend: &dyn Backend, retry: bool) -> Settled {
        let PendingIo { progress: p, ticket } = self;
        let wanted = p.rest.mem.len();
        let n = match ticket.wait() {
            Ok(n) => n,
            Err(e) => return Settled::Failed(e),
        };
        if n == wanted {
            return Settled::Done;
        }
        if n > wanted {
            return Settled::Failed(p.overrun(n));
        }
        tracing::debug!(
            op = p.rest.op.as_str(),
            offset = p.rest.offset,
            asked = wanted,
            moved = n,
            resubmits = p.resubmits,
            "short storage I/O"
        );
        if n == 0 || !retry || p.resubmits >= MAX_RESUBMITS {
            return Settled::Failed(p.short(p.moved + n));
        }
        let next = p.advance(n);
        // SAFETY: `next.rest` is the unmoved tail of the memory `submit` was given, which
        // its caller keeps valid until the request settles as done or failed: it has not.
        match unsafe { backend.submit(next.rest) } {
            Ok(ticket) => Settled::Resubmitted(PendingIo {
                progress: next,
                ticket,
            }),
            Err(e) => Settled::Failed(e),
        }
    }

    /// Blocks until the request is done or failed, submitting the rest after short counts
    /// (each resubmission counted in `requests`) while `retry` is set.
    pub(crate) fn wait(self, backend: &dyn Backend, retry: bool, requests: &AtomicU64) -> Result<()> {
        let mut io = self;
        loop {
            match io.settle(backend, retry) {
                Settled::Done => return Ok(()),
                Settled::Resubmitted(next) => {
                    Stats::add(requests, 1);
                    io = next;
                }
                Settled::Failed(e) => return Err(e),
            }
        }
    }
}

impl Progress {
    /// The progress after `n` more bytes moved (fewer than `rest` has): the rest advanced
    /// past them, to be submitted again.
    fn advance(self, n: usize) -> Progress {
        let len = self.rest.mem.len();
        Progress {
            rest: IoRequest {
                offset: self.rest.offset + n as u64,
                mem: self.rest.mem.slice(n, len - n),
                ..self.rest
            },
            moved: self.moved + n,
            resubmits: self.resubmits + 1,
            path: self.path,
        }
    }

    /// The whole request: its first offset and its length.
    fn whole(&self) -> (u64, u64) {
        let moved = self.moved as u64;
        (self.rest.offset - moved, moved + self.rest.mem.len() as u64)
    }

    /// The error for a request given up after moving `moved` of its bytes.
    fn short(&self, moved: usize) -> Error {
        let (offset, wanted) = self.whole();
        Error::ShortIo {
            op: self.rest.op.as_str(),
            path: self.path.to_path_buf(),
            offset,
            done: moved as u64,
            wanted,
        }
    }

    /// The error for a completion claiming `n` bytes of a `rest` that has fewer.
    fn overrun(&self, n: usize) -> Error {
        let (offset, wanted) = self.whole();
        Error::io(
            format!(
                "{} of {wanted} bytes at offset {offset} of {}",
                self.rest.op.as_str(),
                self.path.display()
            ),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the backend reported {n} bytes moved for a request of {}",
                    self.rest.mem.len()
                ),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ticket, BackendInfo, IoOp, TargetId, TargetInfo};
    use crate::memory::MemRef;
    use crate::target::Target;
    use std::sync::Mutex;

    /// Completes each request at once with the next count of a script (the full length once
    /// the script runs out), recording the requests it saw.
    #[derive(Debug, Default)]
    struct Scripted {
        counts: Mutex<Vec<Result<usize, String>>>,
        seen: Mutex<Vec<(u64, u64, usize)>>,
    }

    impl Scripted {
        fn new(counts: Vec<Result<usize, String>>) -> Scripted {
            Scripted {
                counts: Mutex::new(counts.into_iter().rev().collect()),
                seen: Mutex::default(),
            }
        }
    }

    impl Backend for Scripted {
        fn info(&self) -> BackendInfo {
            BackendInfo {
                name: "scripted",
                host_staging: false,
                gds_mode: None,
                details: Vec::new(),
            }
        }
        fn open(&self, _: &Target) -> Result<(TargetId, TargetInfo)> {
            Err(Error::invalid("not used"))
        }
        unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
            let len = req.mem.len();
            self.seen.lock().unwrap().push((req.offset, req.mem.addr(), len));
            let next = self.counts.lock().unwrap().pop().unwrap_or(Ok(len));
            let (t, c) = ticket();
            c.complete(next.map_err(Error::invalid));
            Ok(t)
        }
        fn flush(&self, _: TargetId) -> Result<()> {
            Ok(())
        }
        fn close(&self, _: TargetId) -> Result<()> {
            Ok(())
        }
    }

    const BASE: u64 = 0x10_0000;

    fn run(b: &Scripted, len: usize, retry: bool) -> Result<()> {
        let req = IoRequest {
            target: TargetId(1),
            op: IoOp::Write,
            offset: 1000,
            mem: MemRef::Device { ptr: BASE, len },
        };
        // SAFETY: the scripted backend never touches memory.
        let io = unsafe { PendingIo::submit(b, req, Arc::from(Path::new("/t"))) }.unwrap();
        io.wait(b, retry, &AtomicU64::new(0))
    }

    #[test]
    fn the_rest_is_resubmitted_with_offset_and_memory_advanced() {
        let b = Scripted::new(vec![Ok(100), Ok(50)]);
        run(&b, 400, true).unwrap();
        assert_eq!(
            *b.seen.lock().unwrap(),
            vec![
                (1000, BASE, 400),
                (1100, BASE + 100, 300),
                (1150, BASE + 150, 250)
            ]
        );
    }

    #[test]
    fn no_progress_fails_with_short_io_naming_the_whole_request() {
        let b = Scripted::new(vec![Ok(100), Ok(0)]);
        match run(&b, 400, true).unwrap_err() {
            Error::ShortIo {
                op,
                path,
                offset,
                done,
                wanted,
            } => assert_eq!(
                (op, path.to_str(), offset, done, wanted),
                ("write", Some("/t"), 1000, 100, 400)
            ),
            other => panic!("not ShortIo: {other}"),
        }
    }

    #[test]
    fn the_bound_without_retry_and_overruns_fail() {
        let b = Scripted::new(vec![Ok(1); MAX_RESUBMITS as usize + 1]);
        let e = run(&b, 400, true).unwrap_err();
        assert!(
            matches!(e, Error::ShortIo { done, .. } if done == u64::from(MAX_RESUBMITS) + 1),
            "{e}"
        );
        assert_eq!(b.seen.lock().unwrap().len(), MAX_RESUBMITS as usize + 1);

        let b = Scripted::new(vec![Ok(100)]);
        assert!(matches!(
            run(&b, 400, false),
            Err(Error::ShortIo { done: 100, .. })
        ));
        assert_eq!(b.seen.lock().unwrap().len(), 1, "nothing resubmitted");

        let b = Scripted::new(vec![Ok(500)]);
        let e = run(&b, 400, true).unwrap_err().to_string();
        assert!(e.contains("reported 500 bytes moved for a request of 400"), "{e}");

        let b = Scripted::new(vec![Ok(100), Err("gone".into())]);
        assert!(matches!(run(&b, 400, true), Err(Error::InvalidArgument(_))));
    }
}
