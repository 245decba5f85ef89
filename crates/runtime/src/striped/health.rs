//! A member's health: what it has done (bytes, requests, errors, busy time), and whether it
//! is in use, resting after its failures (then tried again), or gone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::IoOp;
use crate::error::Error;

/// What one member has done, for reports.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct MemberStats {
    /// The member's path.
    pub path: PathBuf,
    /// Its backend's name.
    pub backend: String,
    /// Bytes written to it (moved, as its completions counted them).
    pub bytes_written: u64,
    /// Bytes read from it (moved, as its completions counted them).
    pub bytes_read: u64,
    /// Pieces of requests submitted to it (the rest of a piece submitted again after a
    /// short count counts again).
    pub requests: u64,
    /// Of those, the ones that failed (including one given up after a short count).
    pub errors: u64,
    /// Seconds during which it had at least one piece in flight.
    pub busy_seconds: f64,
    /// Whether it is out of use now (requests touching it fail at once).
    pub failed: bool,
    /// Why it was last taken out of use (kept after it is back in use).
    pub failure: Option<String>,
    /// Times it was taken out of use.
    pub times_taken_out: u32,
    /// Seconds until it is tried again, while out of use for its failures; `None` when in
    /// use or gone for good.
    pub retry_in_seconds: Option<f64>,
}

#[derive(Default)]
pub(super) struct Counters {
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicUsize,
    busy: Mutex<Busy>,
    /// Pieces in a row that failed with an error of the member's doing.
    failures_in_a_row: AtomicU32,
    /// Whether the member is out of use, and why; see [`OutOfUse`].
    out: Mutex<OutOfUse>,
    /// Set while `out` holds a cool-down or says gone: the fast path of every request
    /// (the lock is taken only when it is set).
    taken_out: AtomicBool,
}

/// A member's standing: in use, out of use until a time (then tried again), or gone.
#[derive(Default)]
struct OutOfUse {
    /// Why it was last taken out of use.
    why: Option<String>,
    /// It is gone: never tried again.
    gone: bool,
    /// Out of use until then; requests reach it again after (`None`: in use, or gone).
    until: Option<Instant>,
    /// Times taken out of use.
    times: u32,
}

impl OutOfUse {
    /// Whether requests must not reach the member now: gone, or resting.
    pub(super) fn refuses(&self) -> bool {
        self.gone || self.until.is_some_and(|t| Instant::now() < t)
    }
}

#[derive(Default)]
struct Busy {
    since: Option<Instant>,
    total: f64,
}

impl Counters {
    pub(super) fn started(&self) {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            busy.since.get_or_insert_with(Instant::now);
        }
    }

    /// A submission ended, having moved `moved` bytes; `failed` counts it as an error.
    pub(super) fn ended(&self, op: IoOp, moved: usize, failed: bool) {
        let bytes = match op {
            IoOp::Read => &self.bytes_read,
            IoOp::Write => &self.bytes_written,
        };
        bytes.fetch_add(moved as u64, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            // Another piece may have started since: only close a period nobody reopened.
            if self.in_flight.load(Ordering::Acquire) == 0 {
                if let Some(since) = busy.since.take() {
                    busy.total += since.elapsed().as_secs_f64();
                }
            }
        }
    }

    /// What the member at `path`, with the backend called `backend`, has done so far.
    pub(super) fn stats(&self, path: &Path, backend: &str) -> MemberStats {
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        MemberStats {
            path: path.to_path_buf(),
            backend: backend.to_string(),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            busy_seconds: self.busy_seconds(),
            failed: out.refuses(),
            failure: out.why.clone(),
            times_taken_out: out.times,
            retry_in_seconds: out
                .until
                .map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64()),
        }
    }

    fn busy_seconds(&self) -> f64 {
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.total + busy.since.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    /// A piece moved all its bytes: the member works (and is back in use if it was out).
    pub(super) fn succeeded(&self, path: &Path) {
        // Out of use only after failures in a row, which no success has reset since.
        if self.failures_in_a_row.swap(0, Ordering::Relaxed) == 0 {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if out.until.take().is_some() {
            self.taken_out.store(false, Ordering::Release);
            tracing::warn!("striped set member {} is back in use", path.display());
        }
    }

    /// A piece on the member at `path` failed with `e`: takes the member out of use when `e`
    /// says it is gone (for good), or when it makes `limit` failures of its doing in a row
    /// (until a cool-down, doubled each time, has passed).
    pub(super) fn failed_with(&self, e: &Error, policy: FailurePolicy, path: &Path) {
        let FailurePolicy { limit, retry_after } = policy;
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if out.gone {
            return;
        }
        if e.target_gone() {
            out.gone = true;
            out.until = None;
            out.why = Some(format!("it is gone: {e}"));
        } else if against_member(e) {
            let in_a_row = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
            if in_a_row < limit || out.until.is_some_and(|t| Instant::now() < t) {
                return; // below the limit, or out of use already (a piece in flight)
            }
            let cool = retry_after
                .saturating_mul(1 << out.times.min(16))
                .min(MEMBER_RETRY_MAX.max(retry_after));
            out.until = Some(Instant::now() + cool);
            out.why = Some(format!(
                "{in_a_row} requests in a row failed on it, the last with: {e}; tried again after {:.0} s",
                cool.as_secs_f64()
            ));
        } else {
            return;
        }
        out.times += 1;
        self.taken_out.store(true, Ordering::Release);
        tracing::error!(
            "striped set member {} taken out of use: {}",
            path.display(),
            out.why.as_deref().unwrap_or("")
        );
    }

    /// Why requests must not reach the member now; `None` when they may (in use, or its
    /// cool-down has passed: they try it again).
    pub(super) fn refusal(&self) -> Option<String> {
        if !self.taken_out.load(Ordering::Acquire) {
            return None;
        }
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.refuses().then(|| out.why.clone().unwrap_or_default())
    }
}

/// Whether a failed piece counts against its member: not when the storage is full, the
/// range ends past the target (a short count), or the request or memory was refused.
pub(super) fn against_member(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => !matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG | libc::EINVAL)
        ),
        Error::Storage { .. } | Error::Abandoned(_) | Error::Target { .. } => true,
        Error::NoSpace { .. }
        | Error::Corrupt { .. }
        | Error::ShortIo { .. }
        | Error::InvalidArgument(_)
        | Error::OutOfMemory { .. }
        | Error::Device(_)
        | Error::Unavailable { .. } => false,
    }
}

/// How many pieces in a row may fail on a member, with errors of its doing, before it is
/// taken out of use (unless [`StripedBackend::with_failure_limit`](super::StripedBackend::with_failure_limit) says otherwise): twice
/// what one small request makes when the engine retries it three times, so that a member
/// failing now and then stays in use.
pub const MEMBER_FAILURE_LIMIT: u32 = 8;

/// How long a member taken out of use for its failures rests before requests reach it
/// again (unless [`StripedBackend::with_retry_after`](super::StripedBackend::with_retry_after) says otherwise); doubled each time it
/// is taken out again.
pub const MEMBER_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The longest a member rests between tries: 10 minutes.
pub const MEMBER_RETRY_MAX: Duration = Duration::from_secs(600);

/// When a member is taken out of use for its failures, and how long it rests.
#[derive(Clone, Copy, Debug)]
pub(super) struct FailurePolicy {
    /// Failed pieces in a row that take a member out of use.
    pub(super) limit: u32,
    /// Its first cool-down (doubled each time it is taken out again).
    pub(super) retry_after: Duration,
}
