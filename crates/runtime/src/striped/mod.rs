//! Striping: [`StripedBackend`], one target made of several (its documentation says how
//! bytes are dealt out, and what happens when a member fails).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{ticket, Backend, BackendInfo, IoRequest, TargetId, TargetInfo, Ticket};
use crate::error::{Error, Result};
use crate::short::{Remaining, MAX_RESUBMITS};
use crate::target::{check_distinct, Target};

mod health;
mod piece;
#[cfg(test)]
mod tests;

use health::{Counters, FailurePolicy};
pub use health::{MemberStats, MEMBER_FAILURE_LIMIT, MEMBER_RETRY_AFTER, MEMBER_RETRY_MAX};
use piece::{Gather, Piece};

/// One member of a striped set: the target and the backend that moves its bytes.
#[derive(Clone, Debug)]
pub struct Member {
    /// The member's file or block device (its `reserve` is set from the set's).
    pub target: Target,
    /// A backend for this member alone.
    pub backend: Arc<dyn Backend>,
}

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

/// Several targets striped into one, like RAID 0, in the runtime instead of in mdadm.
///
/// A [`StripedBackend`] is built from [`Member`]s, each a storage target with a backend of
/// its own (its own rings, queues and threads), so that a slow member does not hold up the
/// others. It opens as one target whose bytes are dealt out in `stripe`-byte units, round
/// robin: unit `u` (bytes `u·stripe .. (u+1)·stripe` of the set) lives on member `u mod n`
/// at offset `(u div n)·stripe`. Members of different speeds can be given weights: a
/// round then deals `w_i` consecutive units to member `i`, so that each member's share of
/// the bytes, and of the time, matches what it can do (RAID 0 with equal shares is bound
/// by `n` times its slowest member). A request is cut at unit boundaries and each piece goes to
/// its member's backend at once; the request completes when every piece has, with the
/// first error if any failed — naming the member's path, so that a member that went away
/// shows as a clear error, never as wrong data.
///
/// A member may complete a piece with fewer bytes than asked (a short count, which the
/// [`Backend`] contract allows): the rest of the piece is then submitted to the same member
/// again, offset and memory advanced ([`crate::short`]), up to [`MAX_PIECE_RESUBMITS`]
/// times. A set request
/// completes with its full length only once every byte of every piece has moved; a piece
/// that comes back with nothing moved, or short once too often, fails the request with
/// [`Error::ShortIo`] naming the member.
///
/// A member whose requests keep failing is taken out of use: once
/// [`StripedBackend::failure_limit`] pieces in a row ([`MEMBER_FAILURE_LIMIT`] unless set)
/// have failed on it with errors that are the member's doing, or at once when an error says
/// it is gone ([`Error::target_gone`]: its backend shut down, ENODEV, ENXIO…). A piece that
/// moves all its bytes resets the count; errors that are not the member's doing do not count
/// either way: no space, a short count (the end of the target), a refused argument. From then
/// on a request touching the member fails at submission, with an [`Error::Storage`] naming
/// the member and why it was taken out of use, without reaching any member — no hanging, no
/// partial data — while requests that touch only the other members go on as before. With
/// round-robin striping every large request touches every member, so in practice the set
/// serves only small ranges lying on healthy members; choosing where data goes is the
/// caller's business (the engine keeps the tensors of a failed write in their own memory).
/// Nothing is retried here: a caller that retries transient errors (the engine does)
/// submits the whole request again, and each attempt that fails on the member counts.
///
/// A member taken out of use for its failures (not one that is gone) is tried again after
/// a cool-down ([`MEMBER_RETRY_AFTER`] unless [`StripedBackend::with_retry_after`] says
/// otherwise), doubled each time it is taken out again, up to [`MEMBER_RETRY_MAX`]: the
/// requests touching it then reach it, the first piece that moves all its bytes puts it
/// back in use, and the next failure takes it out again at once. A drive that went through
/// a bad patch (a controller reset, a cable) comes back instead of shrinking the set for the
/// rest of a days-long run; one that stays bad costs one failed request per cool-down.
///
/// [`StripedBackend::member_stats`] counts the bytes, requests, errors and busy time of
/// each member, and says whether it was taken out of use and why.
///
/// The parts: this file holds the set (its layout over the members, opening, and the
/// `Backend` it is); `health.rs` counts what each member did and decides when it is taken out
/// of use; `piece.rs` carries one request's pieces to their members, through short counts.
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
                m.counters
                    .stats(&m.member.target.path, m.member.backend.info().name)
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
            transfer_mode: first.transfer_mode,
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
