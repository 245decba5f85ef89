//! The timed loop: `threads` submitters, each keeping `qd` requests in flight and taking
//! completions in whatever order they arrive, with per-request latency in a histogram.
//!
//! A request that completes with fewer bytes than asked (a short count, which the
//! [`Backend`] contract allows and `--faults short=P` injects) is never taken as done: the
//! rest of it — offset and memory advanced by the count — is submitted again in the same
//! slot, up to [`MAX_RESUBMITS`](spillway_runtime::short::MAX_RESUBMITS) times, as the engine
//! does ([`spillway_runtime::short`]). Its latency runs from the first
//! submission to the last completion. A completion moving nothing, one claiming more than
//! was asked, or one short count too many fails the pass.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use spillway_runtime::short::{Judged, Remaining};
use spillway_runtime::{Backend, Error, IoOp, IoRequest, Result, TargetId, Ticket};

use super::buffer::BenchBuffer;
use super::progress::Progress;
use super::workload::Io;

/// What one pass over a list of I/Os measured.
pub struct Timing {
    /// From the first submission to the last completion.
    pub elapsed: Duration,
    /// Per-request latency, nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Bytes moved.
    pub bytes: u64,
    /// Requests completed.
    pub ios: u64,
}

/// How to drive one pass.
pub struct Pass<'a> {
    /// The backend.
    pub backend: &'a dyn Backend,
    /// The target.
    pub target: TargetId,
    /// Read or write.
    pub op: IoOp,
    /// The I/Os, split into `threads` contiguous shares.
    pub ios: &'a [Io],
    /// Memory: I/O at target offset `o` uses buffer offset `o % buffer.len()`.
    pub buffer: &'a BenchBuffer,
    /// Requests in flight per thread.
    pub qd: u32,
    /// Submitting threads.
    pub threads: usize,
    /// The label of the progress bar shown (on stderr) once the pass has run for a
    /// second; `None` for no bar.
    pub progress: Option<&'a str>,
}

/// Runs the pass; the first failed request stops it (requests in flight are still reaped).
pub fn run(pass: &Pass<'_>) -> Result<Timing> {
    let total_bytes: u64 = pass.ios.iter().map(|io| io.len).sum();
    let threads = pass.threads.max(1).min(pass.ios.len().max(1));
    let share = pass.ios.len().div_ceil(threads);
    let done_bytes = AtomicU64::new(0);
    let finished = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let start = Instant::now();

    let results: Vec<Result<(Histogram<u64>, Instant)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pass
            .ios
            .chunks(share.max(1))
            .map(|ios| {
                let (done_bytes, finished, failed) = (&done_bytes, &finished, &failed);
                scope.spawn(move || {
                    let r = submitter(pass, ios, done_bytes, failed).map(|h| (h, Instant::now()));
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    finished.fetch_add(1, Ordering::SeqCst);
                    r
                })
            })
            .collect();
        let count = handles.len();
        Progress::new(pass.progress.is_some(), pass.progress.unwrap_or(""), total_bytes).watch(
            || done_bytes.load(Ordering::Relaxed),
            || finished.load(Ordering::SeqCst) == count,
        );
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Device("a benchmark thread panicked".into())))
            })
            .collect()
    });
    // The pass ends when the last submitter has reaped its last completion (not when the
    // progress watcher notices).
    let mut end = start;
    let mut latency_ns = new_histogram();
    for r in results {
        let (hist, finished_at) = r?;
        end = end.max(finished_at);
        latency_ns
            .add(hist)
            .map_err(|e| Error::invalid(format!("merging latency histograms: {e}")))?;
    }
    let elapsed = end - start;
    Ok(Timing {
        elapsed,
        latency_ns,
        bytes: total_bytes,
        ios: pass.ios.len() as u64,
    })
}

/// Nanoseconds from 1 ns to one hour, 3 significant figures.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

struct InFlight {
    ticket: Ticket,
    /// When the request was first submitted.
    issued: Instant,
    /// The whole request.
    io: Io,
    /// The part of it in flight, and how far it has got through short counts.
    remaining: Remaining,
}

/// The request for `io`: target offset `o` uses buffer offset `o % buffer.len()`.
fn request_of(pass: &Pass<'_>, io: Io) -> IoRequest {
    IoRequest {
        target: pass.target,
        op: pass.op,
        offset: io.offset,
        mem: pass.buffer.region(io.offset % pass.buffer.len(), io.len),
    }
}

/// Submits the rest of a request; the ticket completes `slot` on `tx`.
fn submit_part(
    pass: &Pass<'_>,
    remaining: &Remaining,
    slot: usize,
    tx: &mpsc::Sender<(usize, Instant)>,
) -> Result<Ticket> {
    // SAFETY: the buffer outlives the pass: every submitted ticket is waited for before
    // `submitter` returns.
    let ticket = unsafe { pass.backend.submit(remaining.rest())? };
    let tx = tx.clone();
    ticket.on_complete(move || {
        let _ = tx.send((slot, Instant::now()));
    });
    Ok(ticket)
}

/// The error for a request given up after a short count: its last part moved `n` bytes.
fn short_error(op: IoOp, io: Io, remaining: &Remaining, n: usize) -> Error {
    let (asked, resubmits) = (remaining.rest().mem.len() as u64, remaining.resubmits());
    let moved = (remaining.moved() + n) as u64;
    let why = if n == 0 {
        format!("a part of {asked} bytes completed with 0 bytes moved")
    } else {
        format!(
            "still {} bytes short after {resubmits} resubmissions",
            asked - n as u64
        )
    };
    Error::io(
        format!(
            "{} of {} bytes at offset {}: {moved} moved",
            op.as_str(),
            io.len,
            io.offset
        ),
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("short {}: {why}", op.as_str()),
        ),
    )
}

fn submitter(
    pass: &Pass<'_>,
    ios: &[Io],
    done_bytes: &AtomicU64,
    failed: &AtomicBool,
) -> Result<Histogram<u64>> {
    let mut hist = new_histogram();
    let qd = pass.qd.max(1) as usize;
    let (tx, rx) = mpsc::channel::<(usize, Instant)>();
    let mut slots: Vec<Option<InFlight>> = (0..qd).map(|_| None).collect();
    let mut free: VecDeque<usize> = (0..qd).collect();
    let mut next = 0usize;
    let mut in_flight = 0usize;
    let mut first_error: Option<Error> = None;
    loop {
        // Fill every free slot while there is work and nothing has failed.
        while first_error.is_none() && !failed.load(Ordering::Relaxed) && next < ios.len() {
            let Some(slot) = free.pop_front() else { break };
            let io = ios[next];
            next += 1;
            let issued = Instant::now();
            let remaining = Remaining::new(request_of(pass, io));
            match submit_part(pass, &remaining, slot, &tx) {
                Ok(ticket) => {
                    slots[slot] = Some(InFlight {
                        ticket,
                        issued,
                        io,
                        remaining,
                    });
                    in_flight += 1;
                }
                Err(e) => {
                    free.push_back(slot);
                    first_error = Some(e);
                }
            }
        }
        if in_flight == 0 {
            break;
        }
        let (slot, completed) = rx
            .recv()
            .map_err(|_| Error::Abandoned("completion channel closed".into()))?;
        let entry = slots[slot].take().expect("a completion names an occupied slot");
        in_flight -= 1;
        let asked = entry.remaining.rest().mem.len() as u64;
        match entry.ticket.wait().map(|n| (n, entry.remaining.judge(n))) {
            Ok((_, Judged::Done)) => {
                let ns = completed.saturating_duration_since(entry.issued).as_nanos() as u64;
                hist.saturating_record(ns.max(1));
                done_bytes.fetch_add(asked, Ordering::Relaxed);
            }
            Ok((n, judged @ (Judged::Again | Judged::GiveUp))) => {
                done_bytes.fetch_add(n as u64, Ordering::Relaxed);
                if first_error.is_some() || failed.load(Ordering::Relaxed) {
                    // The pass has failed: its rest is not worth moving.
                } else if judged == Judged::GiveUp {
                    first_error = Some(short_error(pass.op, entry.io, &entry.remaining, n));
                } else {
                    let remaining = entry.remaining.advance(n);
                    match submit_part(pass, &remaining, slot, &tx) {
                        Ok(ticket) => {
                            slots[slot] = Some(InFlight {
                                ticket,
                                remaining,
                                ..entry
                            });
                            in_flight += 1;
                            continue;
                        }
                        Err(e) => first_error = Some(e),
                    }
                }
            }
            Ok((n, Judged::Overrun)) => {
                first_error.get_or_insert(Error::invalid(format!(
                    "backend reported {n} bytes for a {asked}-byte request"
                )));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        free.push_back(slot);
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(hist),
    }
}
