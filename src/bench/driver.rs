//! The timed loop: `threads` submitters, each keeping `qd` requests in flight and taking
//! completions in whatever order they arrive, with per-request latency in a histogram.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use spillway_runtime::{Backend, Error, IoOp, IoRequest, Result, TargetId, Ticket};

use super::buffer::BenchBuffer;
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
    /// Show a progress bar (on stderr) once the pass has run for a second.
    pub progress: bool,
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
        watch_progress(pass.progress, total_bytes, &done_bytes, || {
            finished.load(Ordering::SeqCst) == count
        });
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
    issued: Instant,
    len: u64,
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
    let buf_len = pass.buffer.len();

    loop {
        // Fill every free slot while there is work and nothing has failed.
        while first_error.is_none() && !failed.load(Ordering::Relaxed) && next < ios.len() {
            let Some(slot) = free.pop_front() else { break };
            let io = ios[next];
            next += 1;
            let req = IoRequest {
                target: pass.target,
                op: pass.op,
                offset: io.offset,
                mem: pass.buffer.region(io.offset % buf_len, io.len),
            };
            let issued = Instant::now();
            // SAFETY: the buffer outlives the pass: every submitted ticket is waited for
            // below before this function returns.
            match unsafe { pass.backend.submit(req) } {
                Ok(ticket) => {
                    let tx = tx.clone();
                    ticket.on_complete(move || {
                        let _ = tx.send((slot, Instant::now()));
                    });
                    slots[slot] = Some(InFlight {
                        ticket,
                        issued,
                        len: io.len,
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
        free.push_back(slot);
        match entry.ticket.wait() {
            Ok(n) if n as u64 == entry.len => {
                let ns = completed.saturating_duration_since(entry.issued).as_nanos() as u64;
                hist.saturating_record(ns.max(1));
                done_bytes.fetch_add(entry.len, Ordering::Relaxed);
            }
            Ok(n) => {
                first_error.get_or_insert(Error::invalid(format!(
                    "backend reported {n} bytes for a {}-byte request",
                    entry.len
                )));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(hist),
    }
}

/// Updates a progress bar until `done()`; the bar stays hidden for the first second so
/// short runs print nothing.
fn watch_progress(enabled: bool, total: u64, done_bytes: &AtomicU64, done: impl Fn() -> bool) {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    let start = Instant::now();
    let mut shown = false;
    while !done() {
        std::thread::sleep(Duration::from_millis(50));
        if enabled && !shown && start.elapsed() > Duration::from_secs(1) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.set_position(done_bytes.load(Ordering::Relaxed));
    }
    bar.finish_and_clear();
}
