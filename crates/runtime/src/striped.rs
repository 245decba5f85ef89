//! Striping: one target made of several, like RAID 0, in the runtime instead of in mdadm.
//!
//! A [`StripedBackend`] is built from [`Member`]s, each a storage target with a backend of
//! its own (its own rings, queues and threads), so that a slow member does not hold up the
//! others. It opens as one target whose bytes are dealt out in `stripe`-byte units, round
//! robin: unit `u` (bytes `u·stripe .. (u+1)·stripe` of the set) lives on member `u mod n`
//! at offset `(u div n)·stripe`. Members of different speeds can be given weights: a
//! round then deals `w_i` consecutive units to member `i`, so that each member's share of
//! the bytes, and of the time, matches what it can do (RAID 0 with equal shares is bound
//! by `n` times its slowest member). A request is cut at unit boundaries and each piece goes to
//! its member's backend at once; the request completes when every piece has, with the
//! first error if any failed — naming the member's path, so that a member that went away
//! shows as a clear error, never as wrong data.
//!
//! A member may complete a piece with fewer bytes than asked (a short count, which the
//! [`Backend`] contract allows): the rest of the piece is then submitted to the same member
//! again, offset and memory advanced ([`crate::short`]), up to [`MAX_PIECE_RESUBMITS`]
//! times. A set request
//! completes with its full length only once every byte of every piece has moved; a piece
//! that comes back with nothing moved, or short once too often, fails the request with
//! [`Error::ShortIo`] naming the member.
//!
//! A member whose requests keep failing is taken out of use: once
//! [`StripedBackend::failure_limit`] pieces in a row ([`MEMBER_FAILURE_LIMIT`] unless set)
//! have failed on it with errors that are the member's doing, or at once when an error says
//! it is gone ([`Error::target_gone`]: its backend shut down, ENODEV, ENXIO…). A piece that
//! moves all its bytes resets the count; errors that are not the member's doing do not count
//! either way: no space, a short count (the end of the target), a refused argument. From then
//! on a request touching the member fails at submission, with an [`Error::Storage`] naming
//! the member and why it was taken out of use, without reaching any member — no hanging, no
//! partial data — while requests that touch only the other members go on as before. With
//! round-robin striping every large request touches every member, so in practice the set
//! serves only small ranges lying on healthy members; choosing where data goes is the
//! caller's business (the engine keeps the tensors of a failed write in their own memory).
//! Nothing is retried here: a caller that retries transient errors (the engine does)
//! submits the whole request again, and each attempt that fails on the member counts.
//!
//! A member taken out of use for its failures (not one that is gone) is tried again after
//! a cool-down ([`MEMBER_RETRY_AFTER`] unless [`StripedBackend::with_retry_after`] says
//! otherwise), doubled each time it is taken out again, up to [`MEMBER_RETRY_MAX`]: the
//! requests touching it then reach it, the first piece that moves all its bytes puts it
//! back in use, and the next failure takes it out again at once. A drive that went through
//! a bad patch (a controller reset, a cable) comes back instead of shrinking the set for the
//! rest of a days-long run; one that stays bad costs one failed request per cool-down.
//!
//! [`StripedBackend::member_stats`] counts the bytes, requests, errors and busy time of
//! each member, and says whether it was taken out of use and why.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::backend::{
    ticket, Backend, BackendInfo, Completer, IoOp, IoRequest, TargetId, TargetInfo, Ticket,
};
use crate::error::{Error, Result};
use crate::short::{Judged, Remaining, MAX_RESUBMITS};
use crate::target::{check_distinct, Target};

/// One member of a striped set: the target and the backend that moves its bytes.
#[derive(Clone, Debug)]
pub struct Member {
    /// The member's file or block device (its `reserve` is set from the set's).
    pub target: Target,
    /// A backend for this member alone.
    pub backend: Arc<dyn Backend>,
}

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
struct Counters {
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
    fn refuses(&self) -> bool {
        self.gone || self.until.is_some_and(|t| Instant::now() < t)
    }
}

#[derive(Default)]
struct Busy {
    since: Option<Instant>,
    total: f64,
}

impl Counters {
    fn started(&self) {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            busy.since.get_or_insert_with(Instant::now);
        }
    }

    /// A submission ended, having moved `moved` bytes; `failed` counts it as an error.
    fn ended(&self, op: IoOp, moved: usize, failed: bool) {
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

    fn busy_seconds(&self) -> f64 {
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.total + busy.since.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    /// A piece moved all its bytes: the member works (and is back in use if it was out).
    fn succeeded(&self, path: &Path) {
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
    fn failed_with(&self, e: &Error, policy: FailurePolicy, path: &Path) {
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
    fn refusal(&self) -> Option<String> {
        if !self.taken_out.load(Ordering::Acquire) {
            return None;
        }
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.refuses().then(|| out.why.clone().unwrap_or_default())
    }
}

/// Whether a failed piece counts against its member: not when the storage is full, the
/// range ends past the target (a short count), or the request or memory was refused.
fn against_member(e: &Error) -> bool {
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
/// taken out of use (unless [`StripedBackend::with_failure_limit`] says otherwise): twice
/// what one small request makes when the engine retries it three times, so that a member
/// failing now and then stays in use.
pub const MEMBER_FAILURE_LIMIT: u32 = 8;

/// How long a member taken out of use for its failures rests before requests reach it
/// again (unless [`StripedBackend::with_retry_after`] says otherwise); doubled each time it
/// is taken out again.
pub const MEMBER_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The longest a member rests between tries: 10 minutes.
pub const MEMBER_RETRY_MAX: Duration = Duration::from_secs(600);

struct MemberState {
    member: Member,
    /// Shared with the completion callbacks of the member's pieces.
    counters: Arc<Counters>,
    /// The member's path, for the errors of its pieces.
    path: Arc<Path>,
}

/// One open set: the member targets, in member order.
#[derive(Clone, Debug)]
struct OpenSet {
    id: TargetId,
    members: Vec<TargetId>,
}

/// Several targets striped into one. See the [module documentation](self).
pub struct StripedBackend {
    name: PathBuf,
    stripe: u64,
    /// Units per round of each member, and the first unit of each member in a round.
    weights: Vec<u64>,
    round_start: Vec<u64>,
    /// Units per round: the sum of the weights.
    round: u64,
    /// Bytes per round: `round` units of `stripe` bytes. Checked to fit 64 bits when the
    /// set is made, so that every offset of the set, and each member's share of one, can be
    /// computed without overflow.
    round_bytes: u64,
    members: Vec<MemberState>,
    open: Mutex<Vec<OpenSet>>,
    next_id: AtomicUsize,
    /// When a member is taken out of use, and for how long.
    policy: FailurePolicy,
}

/// When a member is taken out of use for its failures, and how long it rests.
#[derive(Clone, Copy, Debug)]
struct FailurePolicy {
    /// Failed pieces in a row that take a member out of use.
    limit: u32,
    /// Its first cool-down (doubled each time it is taken out again).
    retry_after: Duration,
}

impl StripedBackend {
    /// A set called `name` (the path its target is opened by) over `members`, dealt out in
    /// `stripe`-byte units. `stripe` must be a positive multiple of 4096, and a round of
    /// units (`stripe` times the number of members) must fit 64 bits; at least two members
    /// are needed (one member is no set: use its backend directly).
    pub fn new(name: impl Into<PathBuf>, members: Vec<Member>, stripe: u64) -> Result<Self> {
        let weights = vec![1; members.len()];
        Self::weighted(name, members, stripe, &weights)
    }

    /// Like [`StripedBackend::new`], with member `i` taking `weights[i]` consecutive units of
    /// every round (e.g. its throughput in GB/s, rounded): one weight per member, each at
    /// least 1, and `stripe` times the sum of the weights (a round's bytes) must fit 64
    /// bits.
    pub fn weighted(
        name: impl Into<PathBuf>,
        members: Vec<Member>,
        stripe: u64,
        weights: &[u32],
    ) -> Result<Self> {
        if weights.len() != members.len() || weights.contains(&0) {
            return Err(Error::invalid(format!(
                "stripe_weights {weights:?} must give each of the {} targets a weight of at least 1",
                members.len()
            )));
        }
        if members.len() < 2 {
            return Err(Error::invalid(format!(
                "striping needs at least two targets, {} given",
                members.len()
            )));
        }
        if stripe == 0 || !stripe.is_multiple_of(4096) {
            return Err(Error::invalid(format!(
                "stripe_bytes must be a positive multiple of 4096, not {stripe}"
            )));
        }
        // A round's bytes must fit 64 bits, or the set's offsets cannot be computed.
        let round_bytes = weights
            .iter()
            .try_fold(0u64, |sum, &w| sum.checked_add(u64::from(w)))
            .and_then(|round| round.checked_mul(stripe))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "stripe_bytes {stripe} times the sum of the stripe weights {weights:?} passes 2^64 bytes, \
                     so the offsets of the striped set cannot be computed: choose a smaller stripe_bytes \
                     (1MiB suits most drives) or smaller stripe_weights"
                ))
            })?;
        let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
        let round_start = weights
            .iter()
            .scan(0, |start, w| {
                let this = *start;
                *start += w;
                Some(this)
            })
            .collect();
        Ok(StripedBackend {
            name: name.into(),
            stripe,
            round: round_bytes / stripe,
            round_bytes,
            weights,
            round_start,
            members: members
                .into_iter()
                .map(|member| MemberState {
                    path: Arc::from(member.target.path.as_path()),
                    member,
                    counters: Arc::default(),
                })
                .collect(),
            open: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(0),
            policy: FailurePolicy {
                limit: MEMBER_FAILURE_LIMIT,
                retry_after: MEMBER_RETRY_AFTER,
            },
        })
    }

    /// The set with a member taken out of use after `limit` (at least 1) failed pieces in a
    /// row instead of [`MEMBER_FAILURE_LIMIT`].
    pub fn with_failure_limit(mut self, limit: u32) -> Self {
        self.policy.limit = limit.max(1);
        self
    }

    /// Failed pieces in a row that take a member out of use.
    pub fn failure_limit(&self) -> u32 {
        self.policy.limit
    }

    /// The set with members out of use for their failures tried again after `cool_down`
    /// (doubled each time, up to [`MEMBER_RETRY_MAX`] or `cool_down` if longer) instead of
    /// [`MEMBER_RETRY_AFTER`].
    pub fn with_retry_after(mut self, cool_down: Duration) -> Self {
        self.policy.retry_after = cool_down;
        self
    }

    /// The name a set is opened by: its members' paths joined by commas.
    pub fn set_name(paths: &[&Path]) -> PathBuf {
        let joined: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        PathBuf::from(joined.join(","))
    }

    /// Bytes per stripe unit.
    pub fn stripe(&self) -> u64 {
        self.stripe
    }

    /// What each member has done so far.
    pub fn member_stats(&self) -> Vec<MemberStats> {
        self.members
            .iter()
            .map(|m| {
                let c = &m.counters;
                let out = c.out.lock().unwrap_or_else(|e| e.into_inner());
                MemberStats {
                    path: m.member.target.path.clone(),
                    backend: m.member.backend.info().name.to_string(),
                    bytes_written: c.bytes_written.load(Ordering::Relaxed),
                    bytes_read: c.bytes_read.load(Ordering::Relaxed),
                    requests: c.requests.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                    busy_seconds: c.busy_seconds(),
                    failed: out.refuses(),
                    failure: out.why.clone(),
                    times_taken_out: out.times,
                    retry_in_seconds: out
                        .until
                        .map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64()),
                }
            })
            .collect()
    }

    fn set(&self, id: TargetId) -> Result<OpenSet> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter().find(|s| s.id == id).cloned().ok_or_else(|| {
            Error::invalid(format!(
                "target {} is not open on the striped set {}",
                id.0,
                self.name.display()
            ))
        })
    }

    /// The error of a request touching member `index`, taken out of use for `why`.
    fn member_failed(&self, index: usize, why: &str) -> Error {
        Error::Storage {
            target: format!(
                "{} (member {index} of the striped set {})",
                self.members[index].path.display(),
                self.name.display()
            ),
            source: format!("taken out of use, so requests touching it fail at once: {why}").into(),
        }
    }

    /// The first member taken out of use among `members`, as an error.
    fn check_members(&self, members: impl IntoIterator<Item = usize>) -> Result<()> {
        for m in members {
            if let Some(why) = self.members[m].counters.refusal() {
                return Err(self.member_failed(m, &why));
            }
        }
        Ok(())
    }

    /// What each member reserves for a set of `reserve` bytes: its weight's units of every
    /// round, in whole rounds (rounded up). Refused when a share would pass 2^64 bytes.
    fn shares(&self, reserve: u64) -> Result<Vec<u64>> {
        let rounds = reserve.div_ceil(self.round_bytes);
        self.weights
            .iter()
            // A member's units of a round are part of the round: `w * stripe` fits.
            .map(|&w| rounds.checked_mul(w * self.stripe))
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| {
                Error::invalid(format!(
                    "a capacity of {reserve} bytes is too large for the striped set {}: in whole rounds of \
                     {} bytes, a member's share passes 2^64 bytes; ask for a smaller capacity",
                    self.name.display(),
                    self.round_bytes
                ))
            })
    }

    /// Where byte `offset` of the set lives: (member index, offset in the member, bytes
    /// left in its stripe unit). The offset in the member is at most `offset`, so nothing
    /// here overflows, whatever `offset` is.
    fn locate(&self, offset: u64) -> (usize, u64, u64) {
        let unit = offset / self.stripe;
        let within = offset % self.stripe;
        let (round, at) = (unit / self.round, unit % self.round);
        // The member whose units of the round include `at` (the last one starting at or
        // before it).
        let member = self.round_start.partition_point(|&start| start <= at) - 1;
        let member_unit = round * self.weights[member] + (at - self.round_start[member]);
        (member, member_unit * self.stripe + within, self.stripe - within)
    }
}

impl fmt::Debug for StripedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripedBackend")
            .field("name", &self.name)
            .field("stripe", &self.stripe)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// How many times the rest of a piece is submitted again to its member after short counts
/// before the request fails: the bound of [`crate::short`].
pub const MAX_PIECE_RESUBMITS: u32 = MAX_RESUBMITS;

/// Collects the pieces of one request and completes it when the last one ends: with the
/// request's length only when every piece moved all its bytes.
struct Gather {
    remaining: AtomicUsize,
    first_error: Mutex<Option<Error>>,
    completer: Mutex<Option<Completer>>,
    len: usize,
}

impl Gather {
    /// One piece ended: all its bytes moved (`Ok`) or it failed.
    fn piece_done(&self, result: Result<()>) {
        if let Err(e) = result {
            self.fail(e);
        }
        self.pieces_done(1);
    }

    /// Records a failure of the request (the first one is reported).
    fn fail(&self, e: Error) {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
    }

    /// True once a piece has failed: the request will fail, whatever the others do.
    fn failed(&self) -> bool {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn pieces_done(&self, count: usize) {
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
struct Piece {
    /// The member's backend: weak, so that a completion callback never holds the last
    /// reference to the backend whose thread runs it.
    backend: Weak<dyn Backend>,
    counters: Arc<Counters>,
    path: Arc<Path>,
    gather: Arc<Gather>,
    /// The part of the piece not yet moved (on the member's target), and how far the
    /// piece has got through short counts.
    remaining: Remaining,
    /// When the member is taken out of use.
    policy: FailurePolicy,
}

impl Piece {
    /// Submits `rest` to the member; its completion is handled by [`Piece::ended`]. A
    /// submission refused at once is counted and returned.
    ///
    /// # Safety
    /// The memory of `rest` must stay valid (and, for a read, untouched) until the set
    /// request's ticket completes, which happens only after this piece has ended.
    unsafe fn start(self) -> Result<()> {
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
    fn ended(self, result: Result<usize>) {
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
    fn advance(self, n: usize) -> Piece {
        Piece {
            remaining: self.remaining.advance(n),
            ..self
        }
    }

    /// The error for a completion claiming `n` bytes of a `rest` that has fewer.
    fn overrun(&self, n: usize) -> Error {
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

impl Backend for StripedBackend {
    fn info(&self) -> BackendInfo {
        let first = self.members[0].member.backend.info();
        let mut details = vec![
            ("stripe".to_string(), format!("{} bytes", self.stripe)),
            ("members".to_string(), self.members.len().to_string()),
            ("weights".to_string(), format!("{:?}", self.weights)),
        ];
        for (i, m) in self.members.iter().enumerate() {
            details.push((
                format!("member {i}"),
                format!(
                    "{} ({})",
                    m.member.target.path.display(),
                    m.member.backend.info().name
                ),
            ));
        }
        BackendInfo {
            name: first.name,
            host_staging: first.host_staging,
            gds_mode: first.gds_mode,
            details,
        }
    }

    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        if target.path != self.name {
            return Err(Error::Target {
                path: target.path.clone(),
                reason: format!("this striped set opens as {}", self.name.display()),
            });
        }
        // Each member holds its weight's units of every round: its share of the
        // reservation, in whole rounds.
        let shares = target.reserve.map(|r| self.shares(r)).transpose()?;
        // One file twice would have every piece written over another's.
        let paths: Vec<&Path> = self
            .members
            .iter()
            .map(|m| m.member.target.path.as_path())
            .collect();
        check_distinct(&paths)?;
        let mut opened: Vec<(TargetId, TargetInfo)> = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let mut t = m.member.target.clone();
            t.reserve = shares.as_ref().map(|s| s[i]).or(t.reserve);
            t.direct = target.direct;
            match m.member.backend.open(&t) {
                Ok(x) => opened.push(x),
                Err(e) => {
                    for (done, (id, _)) in self.members.iter().zip(&opened) {
                        let _ = done.member.backend.close(*id);
                    }
                    // A file an earlier member just made may be this one under another
                    // name (its lock refused it): say so rather than "in use".
                    return Err(check_distinct(&paths[..=i]).err().unwrap_or(e));
                }
            }
        }
        // Whole rounds that every member has room for, and that offsets of 64 bits reach.
        let rounds = opened
            .iter()
            .zip(&self.weights)
            .map(|((_, i), w)| i.size / (w * self.stripe))
            .min()
            .unwrap_or(0)
            .min(u64::MAX / self.round_bytes);
        let info = TargetInfo {
            direct_io: opened.iter().all(|(_, i)| i.direct_io),
            offset_align: opened.iter().map(|(_, i)| i.offset_align).max().unwrap_or(1),
            size: rounds * self.round_bytes,
            warning: {
                let w: Vec<String> = opened.iter().filter_map(|(_, i)| i.warning.clone()).collect();
                (!w.is_empty()).then(|| w.join("; "))
            },
        };
        if !self.stripe.is_multiple_of(info.offset_align as u64) {
            for (m, (id, _)) in self.members.iter().zip(&opened) {
                let _ = m.member.backend.close(*id);
            }
            return Err(Error::invalid(format!(
                "stripe_bytes {} is not a multiple of the {}-byte alignment a member needs",
                self.stripe, info.offset_align
            )));
        }
        let id = TargetId(self.next_id.fetch_add(1, Ordering::Relaxed) as u32);
        self.open.lock().unwrap_or_else(|e| e.into_inner()).push(OpenSet {
            id,
            members: opened.into_iter().map(|(id, _)| id).collect(),
        });
        Ok((id, info))
    }

    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        let set = self.set(req.target)?;
        let len = req.mem.len();
        if req.offset.checked_add(len as u64).is_none() {
            return Err(Error::invalid(format!(
                "a {} of {len} bytes at offset {} of the striped set {} ends past 2^64 bytes",
                req.op.as_str(),
                req.offset,
                self.name.display()
            )));
        }
        let mut pieces = Vec::new();
        let (mut at, mut offset) = (0usize, req.offset);
        while at < len {
            let (member, member_offset, room) = self.locate(offset);
            let take = (room.min((len - at) as u64)) as usize;
            pieces.push((member, member_offset, at, take));
            at += take;
            offset += take as u64;
        }
        if pieces.is_empty() {
            return Ok(Ticket::ready(Ok(0)));
        }
        // A member taken out of use fails the request before any piece is submitted.
        self.check_members(pieces.iter().map(|&(member, ..)| member))?;
        let (t, completer) = ticket();
        let gather = Arc::new(Gather {
            remaining: AtomicUsize::new(pieces.len()),
            first_error: Mutex::new(None),
            completer: Mutex::new(Some(completer)),
            len,
        });
        let count = pieces.len();
        for (i, &(member, member_offset, at, take)) in pieces.iter().enumerate() {
            let state = &self.members[member];
            let piece = Piece {
                backend: Arc::downgrade(&state.member.backend),
                counters: state.counters.clone(),
                path: state.path.clone(),
                gather: gather.clone(),
                remaining: Remaining::new(IoRequest {
                    target: set.members[member],
                    op: req.op,
                    offset: member_offset,
                    mem: req.mem.slice(at, take),
                }),
                policy: self.policy,
            };
            // SAFETY: the piece's memory is part of the caller's, which stays valid until
            // the caller's ticket completes — after every piece has ended.
            if let Err(e) = unsafe { piece.start() } {
                gather.fail(e);
                // This piece and the ones not submitted will never complete: the
                // request ends when those already in flight have.
                gather.pieces_done(count - i);
                break;
            }
        }
        Ok(t)
    }

    /// Flushes every member in use; a member taken out of use fails the flush (after the
    /// others are flushed): what was written to it is not known to be durable.
    fn flush(&self, target: TargetId) -> Result<()> {
        let set = self.set(target)?;
        for (m, id) in self.members.iter().zip(&set.members) {
            if m.counters.refusal().is_none() {
                m.member.backend.flush(*id).inspect_err(|e| {
                    m.counters.failed_with(e, self.policy, &m.path);
                })?;
            }
        }
        self.check_members(0..self.members.len())
    }

    fn close(&self, target: TargetId) -> Result<()> {
        let set = self.set(target)?;
        let mut first = Ok(());
        for (m, id) in self.members.iter().zip(&set.members) {
            let closed = m.member.backend.close(*id);
            if first.is_ok() {
                first = closed;
            }
        }
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| s.id != target);
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostDevice, MemBackend, MemRef};
    use proptest::prelude::*;

    const STRIPE: u64 = 4096;

    fn set(n: usize) -> (StripedBackend, Vec<Arc<MemBackend>>) {
        weighted_set(&vec![1; n])
    }

    /// A set over memory backends, one per weight, named "/m0", "/m1", ….
    fn weighted_set(weights: &[u32]) -> (StripedBackend, Vec<Arc<MemBackend>>) {
        let mems: Vec<Arc<MemBackend>> = weights
            .iter()
            .map(|_| Arc::new(MemBackend::new(Arc::new(HostDevice::new())).unwrap()))
            .collect();
        let members = mems
            .iter()
            .enumerate()
            .map(|(i, m)| Member {
                target: Target::new(format!("/m{i}")),
                backend: m.clone() as Arc<dyn Backend>,
            })
            .collect();
        let set = StripedBackend::weighted("set", members, STRIPE, weights).unwrap();
        (set, mems)
    }

    fn io(b: &StripedBackend, id: TargetId, op: IoOp, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let req = IoRequest {
            target: id,
            op,
            offset,
            mem: MemRef::Host {
                ptr: buf.as_mut_ptr(),
                len: buf.len(),
            },
        };
        // SAFETY: the buffer outlives the wait.
        unsafe { b.submit(req) }?.wait()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn units_are_dealt_round_robin_to_the_members() {
        let (b, mems) = set(3);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        let mut data = pattern(6 * STRIPE as usize, 7);
        assert_eq!(io(&b, id, IoOp::Write, 0, &mut data).unwrap(), data.len());
        for unit in 0..6u64 {
            let (m, off) = ((unit % 3) as usize, (unit / 3) * STRIPE);
            let got = mems[m].contents(TargetId(1), off, STRIPE as usize);
            let want = &data[(unit * STRIPE) as usize..((unit + 1) * STRIPE) as usize];
            assert_eq!(got, want, "unit {unit}");
        }
        let stats = b.member_stats();
        assert!(stats
            .iter()
            .all(|s| s.bytes_written == 2 * STRIPE && s.requests == 2));
        assert_eq!(stats[1].path, PathBuf::from("/m1"));
    }

    #[test]
    fn weights_deal_consecutive_units_per_round() {
        let (b, mems) = weighted_set(&[1, 3]);
        // Weights 1 and 3: units 0 | 1 2 3 | 4 | 5 6 7 ...
        let expect = [(0, 0), (1, 0), (1, 1), (1, 2), (0, 1), (1, 3), (1, 4), (1, 5)];
        for (unit, &(m, mu)) in expect.iter().enumerate() {
            let (member, offset, room) = b.locate(unit as u64 * STRIPE + 10);
            assert_eq!(
                (member, offset, room),
                (m, mu * STRIPE + 10, STRIPE - 10),
                "unit {unit}"
            );
        }
        let (id, _) = b.open(&Target::new("set")).unwrap();
        let mut data = pattern(8 * STRIPE as usize, 3);
        io(&b, id, IoOp::Write, 0, &mut data).unwrap();
        let stats = b.member_stats();
        assert_eq!(
            (stats[0].bytes_written, stats[1].bytes_written),
            (2 * STRIPE, 6 * STRIPE)
        );
        let members = vec![
            Member {
                target: Target::new("/a"),
                backend: mems[0].clone() as Arc<dyn Backend>,
            };
            2
        ];
        assert!(StripedBackend::weighted("s", members.clone(), STRIPE, &[1, 0]).is_err());
        assert!(StripedBackend::weighted("s", members, STRIPE, &[1]).is_err());
    }

    proptest! {
        #[test]
        fn weighted_ranges_round_trip(offset in 0u64..100_000, len in 1usize..60_000, w0 in 1u32..4, w1 in 1u32..4) {
            let (b, _) = weighted_set(&[w0, w1]);
            let (id, _) = b.open(&Target::new("set")).unwrap();
            let mut data = pattern(len, offset as u8);
            prop_assert_eq!(io(&b, id, IoOp::Write, offset, &mut data).unwrap(), len);
            let mut back = vec![0u8; len];
            prop_assert_eq!(io(&b, id, IoOp::Read, offset, &mut back).unwrap(), len);
            prop_assert_eq!(&back, &data);
        }

        #[test]
        fn any_range_round_trips(offset in 0u64..100_000, len in 1usize..60_000, n in 2usize..5) {
            let (b, _) = set(n);
            let (id, _) = b.open(&Target::new("set")).unwrap();
            let mut data = pattern(len, offset as u8);
            prop_assert_eq!(io(&b, id, IoOp::Write, offset, &mut data).unwrap(), len);
            let mut back = vec![0u8; len];
            prop_assert_eq!(io(&b, id, IoOp::Read, offset, &mut back).unwrap(), len);
            prop_assert_eq!(&back, &data);
            let moved: u64 = b.member_stats().iter().map(|s| s.bytes_written).sum();
            prop_assert_eq!(moved, len as u64);
        }
    }

    #[test]
    fn a_failing_member_fails_the_request_after_the_other_pieces_end() {
        let (b, mems) = set(2);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        mems[1].faults().delay_us.store(0, Ordering::Relaxed);
        mems[1].faults().writes_left.store(0, Ordering::Relaxed);
        mems[0].faults().delay_us.store(20_000, Ordering::Relaxed);
        let mut data = pattern(4 * STRIPE as usize, 1);
        let started = Instant::now();
        assert!(io(&b, id, IoOp::Write, 0, &mut data).is_err());
        // Member 0's pieces (slow) had ended before the request reported the failure.
        assert!(started.elapsed().as_millis() >= 20);
        let stats = b.member_stats();
        assert_eq!(stats[0].bytes_written, 2 * STRIPE);
        assert_eq!(stats[1].errors, 2);
    }

    #[test]
    fn a_refused_submission_ends_the_request_once_pieces_in_flight_are_done() {
        let (b, mems) = set(2);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        mems[1].faults().submits_left.store(0, Ordering::Relaxed);
        let mut data = pattern(4 * STRIPE as usize, 2);
        let err = io(&b, id, IoOp::Write, 0, &mut data).unwrap_err();
        assert!(err.to_string().contains("injected submission failure"), "{err}");
    }

    #[test]
    fn a_member_failing_again_and_again_is_taken_out_of_use_and_fails_requests_at_once() {
        let (b, mems) = set(3);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        let s = STRIPE as usize;
        // Units 0 and 2 (members 0 and 2) hold data before member 1 starts failing.
        let mut data = pattern(3 * s, 5);
        io(&b, id, IoOp::Write, 0, &mut data).unwrap();
        mems[1].faults().writes_left.store(0, Ordering::Relaxed);
        let mut unit1 = pattern(s, 6);
        for attempt in 1..=MEMBER_FAILURE_LIMIT {
            let e = io(&b, id, IoOp::Write, STRIPE, &mut unit1).unwrap_err();
            assert!(e.is_transient(), "attempt {attempt}: the member's own EIO: {e}");
            assert_eq!(
                b.member_stats()[1].failed,
                attempt == MEMBER_FAILURE_LIMIT,
                "attempt {attempt}"
            );
        }
        let stats = b.member_stats();
        let why = stats[1].failure.clone().unwrap();
        assert!(why.contains("8 requests in a row failed on it"), "{why}");
        assert!(stats.iter().enumerate().all(|(i, s)| s.failed == (i == 1)));
        let requests = stats[1].requests;

        // Touching member 1: refused at once, naming it; nothing reaches any member.
        let mut back = vec![0u8; 3 * s];
        for (op, offset, len) in [
            (IoOp::Write, STRIPE, s),
            (IoOp::Read, 0, 3 * s),
            (IoOp::Read, STRIPE + 10, 1),
        ] {
            let e = io(&b, id, op, offset, &mut back[..len]).unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with("/m1 (member 1 of the striped set set): taken out of use"),
                "{text}"
            );
            assert!(!e.is_transient(), "{e}");
        }
        assert!(b.flush(id).unwrap_err().to_string().contains("/m1"));
        let after = b.member_stats();
        assert_eq!(
            after[1].requests, requests,
            "fail fast: member 1 saw nothing more"
        );
        assert_eq!(
            (after[0].requests, after[2].requests),
            (stats[0].requests, stats[2].requests)
        );

        // What the other members hold is still served.
        for unit in [0, 2] {
            let mut got = vec![0u8; s];
            io(&b, id, IoOp::Read, unit as u64 * STRIPE, &mut got).unwrap();
            assert_eq!(got, data[unit * s..(unit + 1) * s], "unit {unit}");
        }
    }

    #[test]
    fn a_success_resets_the_count_and_errors_not_of_the_members_doing_do_not_count() {
        let (b, mems) = set(2);
        let b = b.with_failure_limit(3);
        assert_eq!(b.failure_limit(), 3);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        let mut unit = pattern(STRIPE as usize, 1);
        for _ in 0..3 {
            mems[1].faults().writes_left.store(0, Ordering::Relaxed);
            for _ in 0..2 {
                assert!(io(&b, id, IoOp::Write, STRIPE, &mut unit).is_err());
            }
            mems[1].faults().writes_left.store(u64::MAX, Ordering::Relaxed);
            io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap();
        }
        // Reads past what member 1 holds: short counts, the end of its target.
        let mut far = vec![0u8; STRIPE as usize];
        for _ in 0..5 {
            assert!(matches!(
                io(&b, id, IoOp::Read, 101 * STRIPE, &mut far),
                Err(Error::ShortIo { .. })
            ));
        }
        let stats = b.member_stats();
        assert!(!stats[1].failed, "{stats:?}");
        assert_eq!(stats[1].errors, 6 + 5);
    }

    #[test]
    fn a_member_out_of_use_is_tried_again_after_its_cool_down_and_comes_back_once_it_works() {
        let (b, mems) = set(2);
        let cool = std::time::Duration::from_millis(60);
        let b = b.with_failure_limit(2).with_retry_after(cool);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        let mut unit = pattern(STRIPE as usize, 4);
        mems[1].faults().writes_left.store(0, Ordering::Relaxed);
        for _ in 0..2 {
            assert!(io(&b, id, IoOp::Write, STRIPE, &mut unit)
                .unwrap_err()
                .is_transient());
        }
        let s = b.member_stats()[1].clone();
        assert!(s.failed && s.times_taken_out == 1, "{s:?}");
        assert!(s.retry_in_seconds.unwrap() <= cool.as_secs_f64(), "{s:?}");
        let requests = s.requests;
        let e = io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap_err();
        assert!(e.to_string().contains("taken out of use"), "{e}");
        assert_eq!(
            b.member_stats()[1].requests,
            requests,
            "resting: nothing reached it"
        );

        // Rested, still failing: the request reaches it, fails, and it rests twice as long.
        std::thread::sleep(cool + std::time::Duration::from_millis(20));
        let e = io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap_err();
        assert!(e.is_transient(), "it was tried: {e}");
        let s = b.member_stats()[1].clone();
        assert!(s.failed && s.times_taken_out == 2, "{s:?}");
        assert!(s.retry_in_seconds.unwrap() > cool.as_secs_f64(), "doubled: {s:?}");
        assert!(
            s.failure.as_deref().unwrap().contains("tried again after"),
            "{s:?}"
        );

        // Rested again and working: back in use.
        mems[1].faults().writes_left.store(u64::MAX, Ordering::Relaxed);
        std::thread::sleep(2 * cool + std::time::Duration::from_millis(20));
        io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap();
        let s = b.member_stats()[1].clone();
        assert!(
            !s.failed && s.retry_in_seconds.is_none() && s.times_taken_out == 2,
            "{s:?}"
        );
        let mut back = vec![0u8; STRIPE as usize];
        io(&b, id, IoOp::Read, STRIPE, &mut back).unwrap();
        assert_eq!(back, unit);
    }

    #[test]
    fn a_gone_member_is_never_tried_again() {
        let (b, mems) = set(2);
        let b = b.with_retry_after(std::time::Duration::from_millis(1));
        let (id, _) = b.open(&Target::new("set")).unwrap();
        mems[1].faults().submits_left.store(0, Ordering::Relaxed);
        let mut unit = pattern(STRIPE as usize, 2);
        assert!(io(&b, id, IoOp::Write, STRIPE, &mut unit).is_err());
        mems[1].faults().submits_left.store(u64::MAX, Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let e = io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap_err();
        assert!(e.to_string().contains("fail at once: it is gone"), "{e}");
        let s = b.member_stats()[1].clone();
        assert!(s.failed && s.retry_in_seconds.is_none(), "{s:?}");
    }

    #[test]
    fn a_member_that_is_gone_is_taken_out_of_use_at_once() {
        let (b, mems) = set(2);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        mems[1].faults().submits_left.store(0, Ordering::Relaxed);
        let mut data = pattern(2 * STRIPE as usize, 3);
        let e = io(&b, id, IoOp::Write, 0, &mut data).unwrap_err();
        assert!(e.to_string().contains("injected submission failure"), "{e}");
        let stats = b.member_stats();
        assert!(stats[1].failed && !stats[0].failed, "{stats:?}");
        assert!(stats[1].failure.as_deref().unwrap().starts_with("it is gone"));
        let e = io(&b, id, IoOp::Write, 0, &mut data).unwrap_err();
        assert!(e.to_string().contains("taken out of use"), "{e}");
        // Member 0 alone still works.
        io(&b, id, IoOp::Write, 0, &mut data[..STRIPE as usize]).unwrap();
    }

    #[test]
    fn bad_sets_are_refused_with_the_reason() {
        let (b, _) = set(2);
        assert!(matches!(b.open(&Target::new("other")), Err(Error::Target { .. })));
        let one = vec![Member {
            target: Target::new("/a"),
            backend: Arc::new(MemBackend::new(Arc::new(HostDevice::new())).unwrap()),
        }];
        assert!(StripedBackend::new("s", one.clone(), STRIPE)
            .unwrap_err()
            .to_string()
            .contains("at least two"));
        let two = [one.clone(), one].concat();
        assert!(StripedBackend::new("s", two, 1000)
            .unwrap_err()
            .to_string()
            .contains("stripe_bytes"));
        let (b, _) = set(2);
        let mut buf = [0u8; 10];
        assert!(io(&b, TargetId(9), IoOp::Read, 0, &mut buf).is_err());
    }

    /// Records the reservation each member target is opened with.
    #[derive(Debug)]
    struct Recording {
        inner: MemBackend,
        reserved: Mutex<Vec<Option<u64>>>,
    }

    impl Backend for Recording {
        fn info(&self) -> BackendInfo {
            self.inner.info()
        }
        fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
            self.reserved.lock().unwrap().push(target.reserve);
            self.inner.open(target)
        }
        unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
            // SAFETY: forwarded contract.
            unsafe { self.inner.submit(req) }
        }
        fn flush(&self, target: TargetId) -> Result<()> {
            self.inner.flush(target)
        }
        fn close(&self, target: TargetId) -> Result<()> {
            self.inner.close(target)
        }
    }

    #[test]
    fn the_reservation_is_shared_out_in_whole_units() {
        let rec: Vec<Arc<Recording>> = (0..3)
            .map(|_| {
                Arc::new(Recording {
                    inner: MemBackend::new(Arc::new(HostDevice::new())).unwrap(),
                    reserved: Mutex::new(Vec::new()),
                })
            })
            .collect();
        let members = rec
            .iter()
            .enumerate()
            .map(|(i, r)| Member {
                target: Target::new(format!("/m{i}")),
                backend: r.clone() as Arc<dyn Backend>,
            })
            .collect();
        let b = StripedBackend::new("set", members, STRIPE).unwrap();
        // 10 units over 3 members: 4 units each (rounded up), so every unit fits.
        let (id, _) = b.open(&Target::new("set").reserve(10 * STRIPE - 100)).unwrap();
        for r in &rec {
            assert_eq!(*r.reserved.lock().unwrap(), vec![Some(4 * STRIPE)]);
        }
        b.close(id).unwrap();
        assert!(b.flush(id).is_err(), "a closed set is gone");
    }

    /// `n` members over memory backends, named "/m0", "/m1", ….
    fn mem_members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                target: Target::new(format!("/m{i}")),
                backend: Arc::new(MemBackend::new(Arc::new(HostDevice::new())).unwrap()),
            })
            .collect()
    }

    #[test]
    fn a_round_past_two_to_the_64_bytes_is_refused_when_the_set_is_made() {
        for (stripe, weights) in [
            (1u64 << 63, vec![1u32, 1]),
            (u64::MAX - 4095, vec![1, 1]),
            (1 << 62, vec![1, 3]),
            (1 << 32, vec![u32::MAX, u32::MAX]),
        ] {
            let e = StripedBackend::weighted("s", mem_members(weights.len()), stripe, &weights).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, Error::InvalidArgument(_)), "{text}");
            assert!(
                text.contains(&format!("stripe_bytes {stripe} times"))
                    && text.contains(&format!("{weights:?}"))
                    && text.contains("smaller stripe_bytes"),
                "{text}"
            );
        }
        let e = StripedBackend::new("s", mem_members(2), 1 << 63).unwrap_err();
        assert!(e.to_string().contains("[1, 1]"), "{e}");
        // Just under: three units of 2^62 bytes make a round.
        StripedBackend::weighted("s", mem_members(2), 1 << 62, &[1, 2]).unwrap();
    }

    #[test]
    fn offsets_near_the_end_of_a_huge_set_are_computed_without_overflow() {
        let b = StripedBackend::weighted("set", mem_members(2), 1 << 62, &[1, 2]).unwrap();
        // Unit 3 is the first of round 1, on member 0, whose second unit it is.
        assert_eq!(b.locate(u64::MAX), (0, (1 << 63) - 1, 1));
        assert_eq!(b.locate(3 << 62), (0, 1 << 62, 1 << 62));
        assert_eq!(b.locate((2 << 62) + 5), (1, (1 << 62) + 5, (1 << 62) - 5));
        // A reservation whose whole rounds pass 2^64 bytes on a member is refused.
        for reserve in [u64::MAX, (3 << 62) + 1] {
            let e = b.open(&Target::new("set").reserve(reserve)).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("capacity of {reserve} bytes is too large")),
                "{e}"
            );
        }
        let (id, _) = b.open(&Target::new("set").reserve(3 << 62)).unwrap();
        // A request running past 2^64 bytes is refused before any member sees it.
        let mut buf = vec![0u8; 4096];
        for offset in [u64::MAX, u64::MAX - 4094] {
            let e = io(&b, id, IoOp::Read, offset, &mut buf).unwrap_err();
            assert!(e.to_string().contains("ends past 2^64 bytes"), "{e}");
        }
        assert!(b.member_stats().iter().all(|s| s.requests == 0));
    }

    /// A memory backend whose targets say they hold `size` bytes.
    #[derive(Debug)]
    struct Huge {
        inner: MemBackend,
        size: u64,
    }

    impl Backend for Huge {
        fn info(&self) -> BackendInfo {
            self.inner.info()
        }
        fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
            let (id, info) = self.inner.open(target)?;
            Ok((
                id,
                TargetInfo {
                    size: self.size,
                    ..info
                },
            ))
        }
        unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
            // SAFETY: forwarded contract.
            unsafe { self.inner.submit(req) }
        }
        fn flush(&self, target: TargetId) -> Result<()> {
            self.inner.flush(target)
        }
        fn close(&self, target: TargetId) -> Result<()> {
            self.inner.close(target)
        }
    }

    #[test]
    fn a_set_of_huge_members_is_as_large_as_64_bit_offsets_reach() {
        let members = (0..2)
            .map(|i| Member {
                target: Target::new(format!("/m{i}")),
                backend: Arc::new(Huge {
                    inner: MemBackend::new(Arc::new(HostDevice::new())).unwrap(),
                    size: u64::MAX,
                }),
            })
            .collect();
        let b = StripedBackend::new("set", members, STRIPE).unwrap();
        let (_, info) = b.open(&Target::new("set")).unwrap();
        let round = 2 * STRIPE;
        assert_eq!(info.size, u64::MAX / round * round);
        let (member, offset, room) = b.locate(info.size - 1);
        assert_eq!((member, room), (1, 1));
        assert_eq!(offset, info.size / 2 - 1);
    }
}
