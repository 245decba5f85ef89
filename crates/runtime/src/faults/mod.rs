//! Fault injection: [`FaultyBackend`] wraps a backend and injects the faults a
//! [`FaultPlan`] names (its documentation says what each fault does).

mod plan;
mod timer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{ticket, Backend, BackendInfo, IoOp, IoRequest, TargetId, TargetInfo, Ticket};
use crate::error::{Error, Result};
use crate::target::Target;

#[cfg(test)]
use plan::DEFAULT_SEED;
pub use plan::{FaultOps, FaultPlan};

use timer::Timer;

/// The length a short request is cut to a multiple of, and the smallest it is cut to.
pub const SHORT_UNIT: usize = 4096;

/// What a [`FaultyBackend`] has done, for reports. Every request is counted once in
/// `requests` and in exactly one of `passed`, `injected_read_errors`,
/// `injected_write_errors`, `injected_enospc` and `injected_short`; `delayed` counts
/// requests of any of these whose completion was held back.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FaultStats {
    /// Requests submitted.
    pub requests: u64,
    /// Requests sent whole to the inner backend (delayed or not).
    pub passed: u64,
    /// Reads failed with EIO.
    pub injected_read_errors: u64,
    /// Writes failed with EIO.
    pub injected_write_errors: u64,
    /// Writes failed with ENOSPC.
    pub injected_enospc: u64,
    /// Requests cut short.
    pub injected_short: u64,
    /// Requests whose completion was delayed by the plan's latency.
    pub delayed: u64,
    /// Bytes of the writes sent to the inner backend: what `enospc_after` is checked
    /// against.
    pub bytes_written: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    passed: AtomicU64,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
    enospc: AtomicU64,
    short: AtomicU64,
    delayed: AtomicU64,
    bytes_written: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A backend that injects faults: it wraps any [`Backend`] and makes some of its requests
/// fail, come up short or complete late, as a [`FaultPlan`] says, so that the engine and
/// `spillway bench` can be run against storage that misbehaves.
///
/// A plan is text like `read_error=0.01,write_error=0.02,short=0.05,enospc_after=1GiB,
/// latency=2ms,latency_p=0.1,seed=7` (see [`FaultPlan`]). Each request draws its fate at
/// submission from a random generator seeded by the plan and the request's number (the
/// order of submission), so a run that submits in the same order injects the same faults.
/// Faults only apply to the requests `ops` names (default: reads and writes); others pass
/// through untouched.
///
/// # The faults
/// - **`read_error=P`, `write_error=P`** (`error=P` sets both): the request fails with EIO
///   and **nothing** is moved: a failed read leaves the caller's memory as it was, a failed
///   write leaves storage as it was (no torn writes). The inner backend never sees it.
/// - **`short=P`**: a request of more than 4096 bytes moves only a prefix of its memory, a
///   random multiple of 4096 bytes from 4096 up to below its length, through the inner
///   backend, and its ticket completes with `Ok(that count)`, as a short read or write by
///   the kernel would report it; the bytes past the prefix are neither read (the caller's
///   memory keeps them) nor written. Requests of 4096 bytes or less are never cut.
/// - **`enospc_after=SIZE`**: the wrapper counts the bytes of the writes it sends to the
///   inner backend (whatever became of them), and a write that would take that count past
///   SIZE fails with ENOSPC and moves nothing; a later, smaller write may still fit. The
///   count is over all targets and never goes down (overwriting a range counts again): a
///   device that fills up and stays full. This is the model rather than "a write ending
///   past offset SIZE fails" because it does not depend on where the caller lays its data
///   out, so it hits a caller that reuses space as surely as one that appends.
/// - **`latency=DURATION`, `latency_p=P`** (default 1): the request's ticket completes
///   DURATION after the inner backend's did (or after submission, for an injected error).
///   Submission never blocks: one timer thread, started only when the plan has latency,
///   holds the delayed completions in a queue ordered by deadline. Dropping the wrapper
///   completes whatever it still holds at once, with the results they were going to have,
///   and joins the thread; an inner request still in flight then completes undelayed.
///
/// Each request draws, in this order, whether it fails with EIO, whether it is cut short,
/// the cut, and whether it is delayed. An EIO wins: the request is not cut and takes no
/// space. Then a write's length, the prefix's if cut, is checked against `enospc_after`.
/// Whatever the inner backend itself returns (its own errors, its own counts) is passed on
/// unchanged.
///
/// No backend of spillway's completes a request with fewer bytes than asked: the io_uring
/// backend resubmits the rest after a short count and fails with [`Error::ShortIo`] only at
/// the end of the file. An `Ok(n)` below the request's length is what `short` probes: a
/// caller that ignores the count and takes the request as done is shown up.
///
/// # Errors
/// Injected errors are those the io_uring backend reports for the same errno: EIO is
/// [`Error::Io`] whose source has `raw_os_error() == Some(libc::EIO)` (its context says the
/// fault was injected), ENOSPC is [`Error::NoSpace`] with the target's path, the request's
/// offset and length. [`FaultyBackend::stats`] counts what was injected.
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    plan: FaultPlan,
    /// The plan injects nothing: requests go straight through.
    quiet: bool,
    name: &'static str,
    counters: Counters,
    /// Paths of the open targets, for ENOSPC errors.
    paths: Mutex<HashMap<TargetId, PathBuf>>,
    /// Present when the plan delays completions.
    timer: Option<Timer>,
}

impl FaultyBackend {
    /// Wraps `inner`, injecting the faults of `plan`. Fails when the plan is inconsistent
    /// ([`FaultPlan::check`]) or when the timer thread a plan with latency needs cannot
    /// start.
    pub fn new(inner: Arc<dyn Backend>, plan: FaultPlan) -> Result<FaultyBackend> {
        plan.check().map_err(|e| Error::invalid(format!("faults: {e}")))?;
        let timer = if !plan.latency.is_zero() && plan.latency_p > 0.0 {
            Some(Timer::start()?)
        } else {
            None
        };
        Ok(FaultyBackend {
            name: wrapped_name(inner.info().name),
            inner,
            quiet: plan.is_none(),
            plan,
            counters: Counters::default(),
            paths: Mutex::new(HashMap::new()),
            timer,
        })
    }

    /// The plan it follows.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The backend it wraps.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    /// What it has injected so far (a snapshot; requests may be in flight).
    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            requests: get(&c.requests),
            passed: get(&c.passed),
            injected_read_errors: get(&c.read_errors),
            injected_write_errors: get(&c.write_errors),
            injected_enospc: get(&c.enospc),
            injected_short: get(&c.short),
            delayed: get(&c.delayed),
            bytes_written: get(&c.bytes_written),
        }
    }

    fn path(&self, target: TargetId) -> PathBuf {
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&target)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(format!("<target {}>", target.0)))
    }

    /// A ticket completing with `result` now, or `delay` from now.
    fn finish(&self, result: Result<usize>, delay: Option<Duration>) -> Ticket {
        match (delay, &self.timer) {
            (Some(d), Some(timer)) => {
                let (t, done) = ticket();
                timer.shared.schedule(Instant::now() + d, done, result);
                t
            }
            _ => Ticket::ready(result),
        }
    }
}

/// `"<inner>+faults"`, made `'static` once per inner name (there are a handful).
fn wrapped_name(inner: &'static str) -> &'static str {
    static NAMES: Mutex<Vec<(&'static str, &'static str)>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, name)) = names.iter().find(|(i, _)| *i == inner) {
        return name;
    }
    let name: &'static str = Box::leak(format!("{inner}+faults").into_boxed_str());
    names.push((inner, name));
    name
}

/// The random numbers of one request: SplitMix64 from the seed and the request's number.
struct Draws(u64);

impl Draws {
    fn new(seed: u64, index: u64) -> Draws {
        let mut d = Draws(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        d.next();
        d
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    fn hit(&mut self, p: f64) -> bool {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        u < p
    }
}

impl fmt::Debug for FaultyBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyBackend")
            .field("inner", &self.inner)
            .field("plan", &self.plan.to_string())
            .finish()
    }
}

impl Backend for FaultyBackend {
    /// The inner backend's info, named `"<inner>+faults"`, with the plan in the details.
    fn info(&self) -> BackendInfo {
        let mut info = self.inner.info();
        info.name = self.name;
        info.details.push(("faults".into(), self.plan.to_string()));
        info
    }

    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        let (id, info) = self.inner.open(target)?;
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, target.path.clone());
        Ok((id, info))
    }

    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        let index = self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let write = req.op == IoOp::Write;
        let len = req.mem.len();
        if self.quiet || !self.plan.ops.covers(write) {
            bump(&self.counters.passed);
            if write {
                self.counters
                    .bytes_written
                    .fetch_add(len as u64, Ordering::Relaxed);
            }
            // SAFETY: the request is forwarded unchanged; our caller keeps its memory valid
            // (and, for a read, untouched) until the ticket completes, and the ticket we
            // return is the inner backend's own.
            return unsafe { self.inner.submit(req) };
        }
        let plan = &self.plan;
        // Every request draws the same numbers in the same order, whichever faults hit.
        let mut draws = Draws::new(plan.seed, index);
        let error = draws.hit(if write { plan.write_error } else { plan.read_error });
        let short = draws.hit(plan.short);
        let cut = draws.next();
        let delay = (draws.hit(plan.latency_p) && self.timer.is_some()).then_some(plan.latency);
        if delay.is_some() {
            bump(&self.counters.delayed);
        }

        if error {
            bump(if write {
                &self.counters.write_errors
            } else {
                &self.counters.read_errors
            });
            let err = Error::io(
                format!(
                    "injected fault: {} of {len} bytes at offset {} of {}",
                    req.op.as_str(),
                    req.offset,
                    self.path(req.target).display()
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            );
            return Ok(self.finish(Err(err), delay));
        }

        let take = if short && len > SHORT_UNIT {
            // 1 ..= (len - 1) / 4096 units: at least one, and fewer bytes than asked for.
            let units = (len - 1) / SHORT_UNIT;
            (1 + (cut % units as u64) as usize) * SHORT_UNIT
        } else {
            len
        };

        if write {
            let limit = plan.enospc_after.unwrap_or(u64::MAX);
            let room =
                self.counters
                    .bytes_written
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                        used.checked_add(take as u64).filter(|&n| n <= limit)
                    });
            if room.is_err() {
                bump(&self.counters.enospc);
                let err = Error::NoSpace {
                    path: self.path(req.target),
                    offset: req.offset,
                    needed: len as u64,
                };
                return Ok(self.finish(Err(err), delay));
            }
        }

        bump(if take < len {
            &self.counters.short
        } else {
            &self.counters.passed
        });
        let forwarded = IoRequest {
            mem: req.mem.slice(0, take),
            ..req
        };
        // SAFETY: `forwarded` is the caller's request or a prefix of its memory. The ticket
        // we return completes only once the inner ticket has (directly, or from its
        // completion callback through the timer), so the caller keeps the memory valid and
        // untouched for as long as the inner backend may use it, as its contract with us
        // requires.
        let inner = unsafe { self.inner.submit(forwarded) }?;
        let Some(d) = delay else {
            return Ok(inner);
        };
        let (outer, done) = ticket();
        let timer = self
            .timer
            .as_ref()
            .expect("a delay is drawn only with a timer")
            .shared
            .clone();
        inner.then(move |result| timer.schedule(Instant::now() + d, done, result));
        Ok(outer)
    }

    fn flush(&self, target: TargetId) -> Result<()> {
        self.inner.flush(target)
    }

    fn close(&self, target: TargetId) -> Result<()> {
        self.inner.close(target)?;
        self.paths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&target);
        Ok(())
    }
}
