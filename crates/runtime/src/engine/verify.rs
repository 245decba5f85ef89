//! Checksums of stored tensors (the `checksums` setting; see [`crate::checksum`]):
//! computed on the offload stream from each tensor's own memory while its write is
//! prepared, and checked on the bytes read back — a prefetched extent in staging before
//! the load counts as done, a demand read in the caller's buffer before the fetch returns.

use std::path::Path;
use std::sync::Arc;

use crate::checksum::{Plan, Sums, BLOCK};
use crate::device::{Device, Stream};
use crate::error::{Error, Result};
use crate::extents::Extent;

use super::layout::{self, Region};
use super::state::{Msg, PendingSums, State};
use super::stats::Stats;

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

impl State {
    /// With checksums on, queues on the offload stream the checksums of the group's
    /// tensors, read from their own memory (after the stream has waited for their
    /// producers). [`State::store_sums`] takes them once the stream has passed them.
    pub(crate) fn queue_write_sums(&mut self, gid: u64) -> Result<()> {
        if !self.cfg.checksums {
            return Ok(());
        }
        let entries = self.groups[&gid].entries.clone();
        let mut plan = Plan::new();
        for eid in &entries {
            plan.add(self.entries[eid].regions.iter().map(|r| (r.ptr, r.len)));
        }
        // SAFETY: the tensors' memory is held, unwritten, until the group's write completes
        // (the offload contract), which is after the stream has passed this work.
        let pending = unsafe { self.device.crc32c(self.offload_stream.as_ref(), plan.pieces())? };
        self.groups.get_mut(&gid).expect("live").checksums = Some(PendingSums {
            pending,
            plan,
            entries,
        });
        Ok(())
    }

    /// Gives the group's tensors the checksums queued by [`State::queue_write_sums`]; the
    /// stream has passed them.
    pub(crate) fn store_sums(&mut self, gid: u64) -> Result<()> {
        let Some(p) = self.groups.get_mut(&gid).and_then(|g| g.checksums.take()) else {
            return Ok(());
        };
        let sums = fold(&p.plan, &p.pending.wait()?)?;
        for (eid, sums) in p.entries.into_iter().zip(sums) {
            if let Some(e) = self.entries.get_mut(&eid) {
                e.sums = Some(sums);
            }
        }
        Ok(())
    }

    /// With checksums on, queues on the fetch stream the checksums of a loaded group's
    /// tensors as they lie in `staging`, and has the progress thread told
    /// ([`Msg::Verified`]) when they are computed. False when there is nothing to check.
    pub(crate) fn queue_load_check(&mut self, gid: u64, staging: Extent) -> Result<bool> {
        if !self.cfg.checksums {
            return Ok(false);
        }
        let base = self.staging_buf.ptr() + staging.offset;
        let mut plan = Plan::new();
        let mut entries = Vec::new();
        for eid in &self.groups[&gid].entries {
            let Some(e) = self.entries.get(eid) else { continue };
            if e.sums.is_none() {
                continue;
            }
            plan.add(e.segments.iter().map(|s| (base + s.at, s.len)));
            entries.push(*eid);
        }
        if entries.is_empty() {
            return Ok(false);
        }
        // SAFETY: the staging extent is the load's until the load ends, which is after the
        // progress thread has been told that the stream passed this work.
        let pending = unsafe { self.device.crc32c(self.fetch_stream.as_ref(), plan.pieces())? };
        let ev: Arc<dyn crate::device::Event> = Arc::from(self.fetch_stream.record()?);
        self.groups.get_mut(&gid).expect("live").checksums = Some(PendingSums {
            pending,
            plan,
            entries,
        });
        let tx = self.tx.clone();
        self.fetch_waiter.after(ev, move |r| {
            let _ = tx.send(Msg::Verified(gid, r));
        });
        Ok(true)
    }

    /// Compares the checksums of a loaded group's bytes with those written: the first
    /// tensor that differs fails the load (counted in `checksum_errors`).
    pub(crate) fn check_load(&mut self, gid: u64) -> Result<()> {
        let Some(p) = self.groups.get_mut(&gid).and_then(|g| g.checksums.take()) else {
            return Ok(());
        };
        let found = fold(&p.plan, &p.pending.wait()?)?;
        let extent = self.groups[&gid].extent.expect("a loaded group was written");
        for (eid, found) in p.entries.iter().zip(found) {
            let Some(e) = self.entries.get(eid) else { continue };
            let Some(expected) = &e.sums else { continue };
            Stats::add(&self.stats.c.verified_bytes, e.len);
            if let Some(m) = expected.first_mismatch(&found) {
                Stats::add(&self.stats.c.checksum_errors, 1);
                return Err(corrupt(
                    &describe(e),
                    m,
                    &self.path(extent.target),
                    extent.offset,
                    e.len,
                ));
            }
        }
        Ok(())
    }

    /// The check a demand read of `eid` (in group `gid`) needs, if any.
    pub(crate) fn demand_check(&self, eid: u64, gid: u64) -> Option<DemandCheck> {
        let e = &self.entries[&eid];
        let expected = e.sums.clone()?;
        let extent = self.groups[&gid].extent?;
        Some(DemandCheck {
            device: self.device.clone(),
            stream: self.fetch_stream.clone(),
            stats: self.stats.clone(),
            expected,
            tensor: describe(e),
            path: self.path(extent.target),
            offset: extent.offset,
        })
    }
}

/// "a 1048576-byte tensor (storage 7, version 0)".
fn describe(e: &super::state::Entry) -> String {
    format!(
        "a {}-byte tensor (storage {}, version {})",
        e.len, e.key.storage, e.key.version
    )
}
