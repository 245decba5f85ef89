//! Checksums of stored tensors (the `checksums` setting; see [`crate::checksum`]):
//! computed on the offload stream from each tensor's own memory while its write is
//! prepared, and checked on the bytes read back — a prefetched extent or slot in staging
//! before the load counts as done, a demand read in the caller's buffer before the fetch
//! returns.
//!
//! Invariant: a tensor's `sums` are those of the bytes its write took from its memory;
//! bytes read back that differ from them are an [`Error::Corrupt`], never delivered.

use std::path::Path;
use std::sync::Arc;

use crate::checksum::{Plan, Sums, BLOCK};
use crate::device::{Device, PendingChecksums, Stream};
use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::memory::DevicePtr;

use super::env::Env;
use super::layout::{self, Region};
use super::stats::Stats;
use super::tensors::{Entry, Tensors};

/// Checksums queued on a stream for some of a group's tensors.
pub(crate) struct PendingSums {
    pending: PendingChecksums,
    plan: Plan,
    /// The tensors, in the order they were added to `plan`.
    entries: Vec<u64>,
}

impl PendingSums {
    /// Queues on the offload stream the checksums of the tensors `entries`, read from their
    /// own memory (after the stream has waited for their producers).
    pub(crate) fn of_sources(env: &Env, tensors: &Tensors, entries: Vec<u64>) -> Result<PendingSums> {
        let mut plan = Plan::new();
        for eid in &entries {
            plan.add(tensors.entries[eid].regions.iter().map(|r| (r.ptr, r.len)));
        }
        // SAFETY: the tensors' memory is held, unwritten, until the group's write completes
        // (the offload contract), which is after the stream has passed this work.
        let pending = unsafe { env.device.crc32c(env.offload_stream.as_ref(), plan.pieces())? };
        Ok(PendingSums {
            pending,
            plan,
            entries,
        })
    }

    /// Queues on the fetch stream the checksums of the tensors among `members` that have
    /// sums, as they lie in a loaded copy at `base` of their extent from its offset
    /// `origin` on (0 for a whole extent, a slot's start for a slot); `None` when there is
    /// nothing to check.
    pub(crate) fn of_loaded(
        env: &Env,
        tensors: &Tensors,
        members: &[u64],
        base: DevicePtr,
        origin: u64,
    ) -> Result<Option<PendingSums>> {
        let mut plan = Plan::new();
        let mut entries = Vec::new();
        for eid in members {
            let Some(e) = tensors.entries.get(eid) else {
                continue;
            };
            if e.sums.is_none() {
                continue;
            }
            plan.add(e.segments.iter().map(|s| (base + (s.at - origin), s.len)));
            entries.push(*eid);
        }
        if entries.is_empty() {
            return Ok(None);
        }
        // SAFETY: the staging extent is the load's (or the slot's) until the load ends, which
        // is after the progress thread has been told that the stream passed this work.
        let pending = unsafe { env.device.crc32c(env.fetch_stream.as_ref(), plan.pieces())? };
        Ok(Some(PendingSums {
            pending,
            plan,
            entries,
        }))
    }

    /// Gives the tensors the checksums computed (the stream has passed them).
    pub(crate) fn store(self, tensors: &mut Tensors) -> Result<()> {
        let sums = fold(&self.plan, &self.pending.wait()?)?;
        for (eid, sums) in self.entries.into_iter().zip(sums) {
            if let Some(e) = tensors.entries.get_mut(&eid) {
                e.sums = Some(sums);
            }
        }
        Ok(())
    }

    /// Compares the checksums computed of a loaded copy of `extent` with those written:
    /// the first tensor that differs fails the load (counted in `checksum_errors`).
    pub(crate) fn check(self, env: &Env, tensors: &Tensors, extent: Extent) -> Result<()> {
        let found = fold(&self.plan, &self.pending.wait()?)?;
        for (eid, found) in self.entries.iter().zip(found) {
            let Some(e) = tensors.entries.get(eid) else {
                continue;
            };
            let Some(expected) = &e.sums else { continue };
            Stats::add(&env.stats.c.verified_bytes, e.len);
            if let Some(m) = expected.first_mismatch(&found) {
                Stats::add(&env.stats.c.checksum_errors, 1);
                return Err(corrupt(
                    &e.describe(),
                    m,
                    &env.path(extent.target),
                    extent.offset,
                    e.len,
                ));
            }
        }
        Ok(())
    }
}

/// The check of one demand read, made after its reads have settled (without the lock).
pub(crate) struct DemandCheck {
    device: Arc<dyn Device>,
    stream: Arc<dyn Stream>,
    stats: Arc<Stats>,
    expected: Sums,
    /// For the error: the tensor's description, its target and where its extent starts.
    tensor: String,
    path: Arc<Path>,
    offset: u64,
}

impl DemandCheck {
    /// The check a demand read of tensor `e` (in `extent`) needs, if any.
    pub(crate) fn of(env: &Env, e: &Entry, extent: Extent) -> Option<DemandCheck> {
        let expected = e.sums.clone()?;
        Some(DemandCheck {
            device: env.device.clone(),
            stream: env.fetch_stream.clone(),
            stats: env.stats.clone(),
            expected,
            tensor: e.describe(),
            path: env.path(extent.target),
            offset: extent.offset,
        })
    }

    /// Checks the bytes now in `dst` (the fetch's destination, just read) against the
    /// checksums written, on the fetch stream; waits for the device.
    pub(crate) fn run(self, dst: &[Region]) -> Result<()> {
        let mut plan = Plan::new();
        plan.add(dst.iter().map(|r| (r.ptr, r.len)));
        // SAFETY: `dst` is the caller's until the fetch returns (Engine::fetch's contract),
        // its reads have settled, and this waits for the device before returning.
        let pending = unsafe { self.device.crc32c(self.stream.as_ref(), plan.pieces())? };
        let found = fold_one(&plan, pending.wait()?)?;
        let len = layout::total_len(dst);
        Stats::add(&self.stats.c.verified_bytes, len);
        match self.expected.first_mismatch(&found) {
            None => Ok(()),
            Some(m) => {
                Stats::add(&self.stats.c.checksum_errors, 1);
                Err(corrupt(&self.tensor, m, &self.path, self.offset, len))
            }
        }
    }
}

/// The sums of each tensor of `plan`, from the CRCs of its pieces.
fn fold(plan: &Plan, crcs: &[u32]) -> Result<Vec<Sums>> {
    plan.fold(crcs).ok_or_else(|| {
        Error::Device(format!(
            "the device returned {} checksums for {} pieces",
            crcs.len(),
            plan.pieces().len()
        ))
    })
}

/// The sums of the one tensor of `plan`.
fn fold_one(plan: &Plan, crcs: Vec<u32>) -> Result<Sums> {
    fold(plan, &crcs)?
        .pop()
        .ok_or_else(|| Error::Device("checksums asked for no tensor".into()))
}

/// The error for a tensor whose bytes read back differ from those written.
fn corrupt(tensor: &str, m: crate::checksum::Mismatch, path: &Path, offset: u64, len: u64) -> Error {
    let start = m.block * BLOCK;
    let end = (start + BLOCK).min(len);
    Error::Corrupt {
        what: format!("bytes {start}..{end} of {tensor}"),
        path: path.to_path_buf(),
        offset,
        expected: m.expected,
        found: m.found,
    }
}
