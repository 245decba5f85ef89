//! [`PendingIo`]: one storage request of the engine, in flight until every one of its
//! bytes has moved.
//!
//! A short count (fewer bytes than asked) has the rest of the request submitted again, as
//! [`crate::short`] says, up to [`MAX_RESUBMITS`](crate::short::MAX_RESUBMITS) times. A completion that moves nothing, a
//! count past what was asked, or one short count too many fails the request
//! ([`Error::ShortIo`] for the first and last), and the failure takes the engine's usual
//! path: a failed write keeps its tensors in their own memory, a failed read is an error to
//! the fetch caller.
//!
//! An error that may be transient ([`Error::is_transient`]: EIO, EAGAIN, EINTR, ETIMEDOUT),
//! whether the ticket completes with it or the submission is refused with it, has the part
//! of the request not yet moved submitted again, up to the engine's
//! [`io_retries`](super::EngineConfig::io_retries) times per request, each retry counted
//! (`write_retries`, `read_retries`). Any other error, or one more transient error, fails the
//! request with an error naming the request's target, offset and length and how often it was
//! retried. Retries follow at once: nothing here may block, and a transient fault of a device
//! is the kind its own driver has already waited on.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::backend::{Backend, IoOp, IoRequest, Ticket};
use crate::error::{Error, Result};
use crate::short::{Judged, Remaining};

use super::stats::Stats;

/// One request in flight: how far it has got and the ticket of the part in flight.
pub(crate) struct PendingIo {
    progress: Progress,
    ticket: Ticket,
}

/// How far one request has got.
struct Progress {
    /// The part of the request not yet moved (what the ticket in flight is for), and how
    /// far the request has got through short counts.
    remaining: Remaining,
    /// Bytes of the request that must move: a short count that gets this far is done.
    needed: usize,
    /// Times `rest` was submitted again after a transient error.
    retries: u32,
    /// The most `retries` may reach.
    max_retries: u32,
    /// The target's path, for errors.
    path: Arc<Path>,
    /// Where submissions and retries are counted.
    stats: Arc<Stats>,
}

/// What a completed [`PendingIo`] came to.
pub(crate) enum Settled {
    /// Every byte has moved.
    Done,
    /// A short count or a transient error: the rest is in flight again.
    Resubmitted(PendingIo),
    /// The request failed.
    Failed(Error),
}

impl PendingIo {
    /// Submits `req` to `backend`, counting it in `stats` (`writes` or `reads`); a refusal
    /// that may be transient is retried at once, at most `max_retries` times over the life of
    /// the request. The error of a request given up names its target (`path`) and offset.
    ///
    /// # Safety
    /// As for [`Backend::submit`], for as long as the request may be in flight: until
    /// [`PendingIo::settle`] has returned [`Settled::Done`] or [`Settled::Failed`] (or
    /// [`PendingIo::wait`] has returned), since a short count or a transient error is
    /// followed by a submission of the rest of the same memory.
    pub(crate) unsafe fn submit(
        backend: &dyn Backend,
        req: IoRequest,
        path: Arc<Path>,
        stats: Arc<Stats>,
        max_retries: u32,
    ) -> Result<PendingIo> {
        let needed = req.mem.len();
        // SAFETY: forwarded contract.
        unsafe { Self::submit_needing(backend, req, needed, path, stats, max_retries) }
    }

    /// [`PendingIo::submit`] of a request of which only the first `needed` bytes matter:
    /// a short count that has moved them is done. For a read of a whole extent whose last
    /// bytes are alignment padding that was never written (past the end of the target).
    ///
    /// # Safety
    /// As for [`PendingIo::submit`].
    pub(crate) unsafe fn submit_needing(
        backend: &dyn Backend,
        req: IoRequest,
        needed: usize,
        path: Arc<Path>,
        stats: Arc<Stats>,
        max_retries: u32,
    ) -> Result<PendingIo> {
        let progress = Progress {
            needed: needed.min(req.mem.len()),
            remaining: Remaining::new(req),
            retries: 0,
            max_retries,
            path,
            stats,
        };
        // SAFETY: the caller's promise, passed on.
        unsafe { progress.start(backend) }
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
    /// count the rest is submitted again when `retry` is set and the bound allows, and after
    /// a transient error likewise within the retry budget; without `retry` (the caller is
    /// giving up on the work this request is part of) a short count or an error fails at
    /// once.
    pub(crate) fn settle(self, backend: &dyn Backend, retry: bool) -> Settled {
        let PendingIo { progress: p, ticket } = self;
        let rest = p.remaining.rest();
        let n = match ticket.wait() {
            Ok(n) => n,
            Err(e) if retry && p.may_retry(&e) => {
                let p = p.retried(&e);
                // SAFETY: the rest is the unmoved part of the memory `submit` was given,
                // which its caller keeps valid until the request settles as done or failed:
                // it has not.
                return match unsafe { p.start(backend) } {
                    Ok(io) => Settled::Resubmitted(io),
                    Err(e) => Settled::Failed(e),
                };
            }
            Err(e) => return Settled::Failed(p.give_up(e)),
        };
        let judged = p.remaining.judge_needing(n, p.needed);
        match judged {
            Judged::Done => return Settled::Done,
            Judged::Overrun => return Settled::Failed(p.overrun(n)),
            Judged::Again | Judged::GiveUp => {}
        }
        tracing::debug!(
            op = rest.op.as_str(),
            offset = rest.offset,
            asked = rest.mem.len(),
            moved = n,
            resubmits = p.remaining.resubmits(),
            "short storage I/O"
        );
        if judged == Judged::GiveUp || !retry {
            return Settled::Failed(p.remaining.short_error(n, &p.path));
        }
        // SAFETY: `rest` advanced is the unmoved tail of the memory `submit` was given,
        // which its caller keeps valid until the request settles as done or failed: it has
        // not.
        match unsafe { p.advance(n).start(backend) } {
            Ok(io) => Settled::Resubmitted(io),
            Err(e) => Settled::Failed(e),
        }
    }

    /// Blocks until the request is done or failed, submitting the rest after short counts
    /// and transient errors while `retry` is set.
    pub(crate) fn wait(self, backend: &dyn Backend, retry: bool) -> Result<()> {
        let mut io = self;
        loop {
            match io.settle(backend, retry) {
                Settled::Done => return Ok(()),
                Settled::Resubmitted(next) => io = next,
                Settled::Failed(e) => return Err(e),
            }
        }
    }
}

impl Progress {
    /// Submits `rest`, counting the request. A refusal that may be transient is retried at
    /// once within the budget; any other, or one too many, gives the request up.
    ///
    /// # Safety
    /// As for [`PendingIo::submit`].
    unsafe fn start(mut self, backend: &dyn Backend) -> Result<PendingIo> {
        loop {
            // SAFETY: the caller's promise, passed on.
            match unsafe { backend.submit(self.remaining.rest()) } {
                Ok(ticket) => {
                    Stats::add(self.requests(), 1);
                    return Ok(PendingIo {
                        progress: self,
                        ticket,
                    });
                }
                Err(e) if self.may_retry(&e) => self = self.retried(&e),
                Err(e) => return Err(self.give_up(e)),
            }
        }
    }

    /// The counter of requests in this direction.
    fn requests(&self) -> &AtomicU64 {
        match self.remaining.rest().op {
            IoOp::Write => &self.stats.c.writes,
            IoOp::Read => &self.stats.c.reads,
        }
    }

    /// Whether `e` may go away on its own and the budget has a retry left.
    fn may_retry(&self, e: &Error) -> bool {
        self.retries < self.max_retries && e.is_transient()
    }

    /// The progress with one more retry, counted, after `e`.
    fn retried(self, e: &Error) -> Progress {
        let rest = self.remaining.rest();
        let counter = match rest.op {
            IoOp::Write => &self.stats.c.write_retries,
            IoOp::Read => &self.stats.c.read_retries,
        };
        Stats::add(counter, 1);
        tracing::debug!(
            op = rest.op.as_str(),
            offset = rest.offset,
            len = rest.mem.len(),
            retry = self.retries + 1,
            max = self.max_retries,
            "retrying a storage request after a transient error: {e}"
        );
        Progress {
            retries: self.retries + 1,
            ..self
        }
    }

    /// The progress after `n` more bytes moved (fewer than the rest has): the rest
    /// advanced past them, to be submitted again.
    fn advance(self, n: usize) -> Progress {
        Progress {
            remaining: self.remaining.advance(n),
            ..self
        }
    }

    /// What the request was, for errors: "read of N bytes at offset O of PATH", and how
    /// often it was retried.
    fn describe(&self) -> String {
        let (offset, wanted) = self.remaining.whole();
        let retried = match self.retries {
            0 => String::new(),
            1 => ", given up after 1 retry".to_string(),
            n => format!(", given up after {n} retries"),
        };
        format!(
            "{} of {wanted} bytes at offset {offset} of {}{retried}",
            self.remaining.rest().op.as_str(),
            self.path.display()
        )
    }

    /// The error of a request given up after `e`, naming the request where `e` may not:
    /// the same kind of error, its message led by [`Progress::describe`]. Errors that name
    /// the target and offset already (no space, a short count) are kept as they are.
    fn give_up(&self, e: Error) -> Error {
        let what = self.describe();
        match e {
            Error::Io { context, source } => Error::Io {
                context: format!("{what}: {context}"),
                source,
            },
            Error::Storage { target, source } => Error::Storage {
                target,
                source: Box::new(Located { what, source }),
            },
            Error::Abandoned(msg) => Error::Abandoned(format!("{what}: {msg}")),
            Error::InvalidArgument(msg) => Error::InvalidArgument(format!("{what}: {msg}")),
            Error::Device(msg) => Error::Device(format!("{what}: {msg}")),
            other => other,
        }
    }

    /// The error for a completion claiming `n` bytes of a `rest` that has fewer.
    fn overrun(&self, n: usize) -> Error {
        Error::io(
            self.describe(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the backend reported {n} bytes moved for a request of {}",
                    self.remaining.rest().mem.len()
                ),
            ),
        )
    }
}

/// A storage driver's error with the request it failed: "WHAT: SOURCE".
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
struct Located {
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ticket, BackendInfo, IoOp, TargetId, TargetInfo};
    use crate::memory::MemRef;
    use crate::short::MAX_RESUBMITS;
    use crate::target::Target;
    use std::sync::Mutex;

    /// Completes each request at once with the next count of a script (the full length once
    /// the script runs out), recording the requests it saw.
    #[derive(Debug, Default)]
    struct Scripted {
        counts: Mutex<Vec<Outcome>>,
        seen: Mutex<Vec<(u64, u64, usize)>>,
    }

    /// What the scripted backend does with one request.
    #[derive(Debug)]
    enum Outcome {
        /// Completes with this count.
        Moved(usize),
        /// Completes with `Error::InvalidArgument`.
        Invalid,
        /// Completes with EIO.
        Eio,
        /// Refuses the submission with EAGAIN.
        Refused,
    }
    use Outcome::{Eio, Invalid, Moved, Refused};

    impl Scripted {
        fn new(counts: Vec<Outcome>) -> Scripted {
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
                transfer_mode: None,
                details: Vec::new(),
            }
        }
        fn open(&self, _: &Target) -> Result<(TargetId, TargetInfo)> {
            Err(Error::invalid("not used"))
        }
        unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
            let len = req.mem.len();
            self.seen.lock().unwrap().push((req.offset, req.mem.addr(), len));
            let next = self.counts.lock().unwrap().pop().unwrap_or(Moved(len));
            let result = match next {
                Moved(n) => Ok(n),
                Invalid => Err(Error::invalid("gone")),
                Eio => Err(eio()),
                Refused => {
                    return Err(Error::io(
                        "submitting",
                        std::io::Error::from_raw_os_error(libc::EAGAIN),
                    ))
                }
            };
            let (t, c) = ticket();
            c.complete(result);
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
        run_with(b, len, retry, 3, &Arc::new(Stats::new(0)))
    }

    fn run_with(b: &Scripted, len: usize, retry: bool, retries: u32, stats: &Arc<Stats>) -> Result<()> {
        let req = IoRequest {
            target: TargetId(1),
            op: IoOp::Write,
            offset: 1000,
            mem: MemRef::Device { ptr: BASE, len },
        };
        // SAFETY: the scripted backend never touches memory.
        let io = unsafe { PendingIo::submit(b, req, Arc::from(Path::new("/t")), stats.clone(), retries) }?;
        io.wait(b, retry)
    }

    fn eio() -> Error {
        Error::io("injected", std::io::Error::from_raw_os_error(libc::EIO))
    }

    #[test]
    fn the_rest_is_resubmitted_with_offset_and_memory_advanced() {
        let b = Scripted::new(vec![Moved(100), Moved(50)]);
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
        let b = Scripted::new(vec![Moved(100), Moved(0)]);
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
    fn a_short_read_that_moved_the_needed_bytes_is_done() {
        let read = |b: &Scripted| {
            let req = IoRequest {
                target: TargetId(1),
                op: IoOp::Read,
                offset: 1000,
                mem: MemRef::Device { ptr: BASE, len: 400 },
            };
            let stats = Arc::new(Stats::new(0));
            // SAFETY: the scripted backend never touches memory.
            let io = unsafe { PendingIo::submit_needing(b, req, 300, Arc::from(Path::new("/t")), stats, 3) }?;
            io.wait(b, true)
        };
        let b = Scripted::new(vec![Moved(300)]);
        read(&b).unwrap();
        assert_eq!(b.seen.lock().unwrap().len(), 1, "nothing resubmitted");

        let b = Scripted::new(vec![Moved(299), Moved(0)]);
        assert!(matches!(read(&b), Err(Error::ShortIo { done: 299, .. })));
    }

    #[test]
    fn the_bound_without_retry_and_overruns_fail() {
        let b = Scripted::new((0..=MAX_RESUBMITS).map(|_| Moved(1)).collect());
        let e = run(&b, 400, true).unwrap_err();
        assert!(
            matches!(e, Error::ShortIo { done, .. } if done == u64::from(MAX_RESUBMITS) + 1),
            "{e}"
        );
        assert_eq!(b.seen.lock().unwrap().len(), MAX_RESUBMITS as usize + 1);

        let b = Scripted::new(vec![Moved(100)]);
        assert!(matches!(
            run(&b, 400, false),
            Err(Error::ShortIo { done: 100, .. })
        ));
        assert_eq!(b.seen.lock().unwrap().len(), 1, "nothing resubmitted");

        let b = Scripted::new(vec![Moved(500)]);
        let e = run(&b, 400, true).unwrap_err().to_string();
        assert!(e.contains("reported 500 bytes moved for a request of 400"), "{e}");

        let b = Scripted::new(vec![Moved(100), Invalid]);
        let e = run(&b, 400, true).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("write of 400 bytes at offset 1000 of /t")),
            "{e}"
        );
    }

    #[test]
    fn transient_errors_are_retried_within_the_budget_and_counted() {
        // EIO on completion and EAGAIN at submission, then success: three retries.
        let b = Scripted::new(vec![Moved(100), Eio, Refused, Eio]);
        let stats = Arc::new(Stats::new(0));
        run_with(&b, 400, true, 3, &stats).unwrap();
        assert_eq!(
            *b.seen.lock().unwrap(),
            vec![
                (1000, BASE, 400),
                (1100, BASE + 100, 300),
                (1100, BASE + 100, 300),
                (1100, BASE + 100, 300),
                (1100, BASE + 100, 300)
            ],
            "the rest is retried, not the whole"
        );
        let c = stats.snapshot().counters;
        assert_eq!((c.writes, c.write_retries, c.read_retries), (4, 3, 0), "{c:?}");

        // One transient error more than the budget: the error names the request.
        let b = Scripted::new(vec![Eio, Eio, Eio]);
        let stats = Arc::new(Stats::new(0));
        let e = run_with(&b, 400, true, 2, &stats).unwrap_err();
        assert!(e.is_transient(), "the errno is kept: {e}");
        let text = e.to_string();
        assert!(
            text.contains("write of 400 bytes at offset 1000 of /t, given up after 2 retries"),
            "{text}"
        );
        assert_eq!(stats.snapshot().counters.write_retries, 2);
        assert_eq!(b.seen.lock().unwrap().len(), 3);

        // No budget, or the caller giving up: no retry.
        for (retries, retry) in [(0, true), (3, false)] {
            let b = Scripted::new(vec![Eio]);
            assert!(run_with(&b, 400, retry, retries, &Arc::new(Stats::new(0))).is_err());
            assert_eq!(b.seen.lock().unwrap().len(), 1);
        }
    }

    #[test]
    fn lasting_errors_are_not_retried() {
        let b = Scripted::new(vec![Invalid]);
        let stats = Arc::new(Stats::new(0));
        assert!(run_with(&b, 400, true, 3, &stats).is_err());
        assert_eq!(b.seen.lock().unwrap().len(), 1);
        assert_eq!(stats.snapshot().counters.write_retries, 0);
        // A count of zero is no transient error either.
        let b = Scripted::new(vec![Moved(0)]);
        assert!(matches!(
            run_with(&b, 400, true, 3, &stats),
            Err(Error::ShortIo { done: 0, .. })
        ));
        assert_eq!(b.seen.lock().unwrap().len(), 1);
    }
}
