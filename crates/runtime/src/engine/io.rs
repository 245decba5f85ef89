//! The I/O side of [`State`]'s coordination: starting writes and prefetches (of whole
//! extents, and of slots for lone requests) within the budgets (staging memory, direct
//! write bytes, prefetch bytes), and handling their completions.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{IoOp, IoRequest};
use crate::device::Event;
use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::memory::MemRef;

use super::env::Msg;
use super::groups::{LoadState, WriteState};
use super::layout;
use super::pending::{PendingIo, Settled};
use super::reads::{Held, Slot, SlotState};
use super::space::NoExtent;
use super::state::State;
use super::stats::{Op, Stats};
use super::timeline::Track;
use super::verify::PendingSums;

impl State {
    /// Starts whatever the budgets now allow. Called after every change.
    pub(crate) fn pump(&mut self) {
        self.free_fenced();
        self.start_writes();
        self.start_prefetches();
    }

    /// True when nothing written or read is outstanding (and nothing is queued to write).
    pub(crate) fn idle(&self) -> bool {
        self.writes.idle() && self.reads.idle()
    }

    fn start_writes(&mut self) {
        while let Some(&gid) = self.writes.queue.front() {
            let Some(g) = self.groups.get(&gid) else {
                self.writes.queue.pop_front();
                continue;
            };
            if g.entries.is_empty() {
                self.groups.remove(&gid);
                self.writes.queue.pop_front();
                continue;
            }
            let (len, staged) = (g.planned, g.staged);
            if !staged && self.writes.direct_over(len, self.env.cfg.direct_write_bytes) {
                break;
            }
            let staging = if staged {
                match self.staging_alloc(len, true) {
                    Some(s) => Some(s),
                    None => {
                        self.writes.wait_for_staging();
                        break;
                    }
                }
            } else {
                None
            };
            self.writes.queue.pop_front();
            let extent = match self.space.alloc(len) {
                Ok(extent) => extent,
                Err(why) => {
                    if let Some(s) = staging {
                        self.staging.free(s);
                    }
                    self.keep_resident(gid, matches!(why, NoExtent::Full));
                    continue;
                }
            };
            if let Err(e) = self.prepare(gid, extent, staging) {
                self.write_failed(gid, e, "preparing a write failed");
            }
        }
    }

    /// Lays the group out in its extent and enqueues the pack (or the wait for producers).
    fn prepare(&mut self, gid: u64, extent: Extent, staging: Option<Extent>) -> Result<()> {
        let span = tracing::debug_span!(
            "prepare",
            group = gid,
            len = extent.len,
            staged = staging.is_some()
        );
        let _enter = span.enter();
        let start = Instant::now();
        let stats = self.env.stats.clone();
        if let Some(since) = self.writes.staging_waited() {
            Stats::add(&stats.c.staging_wait_ns, since.elapsed().as_nanos() as u64);
        }
        let align = self.env.cfg.alignment;
        let mut at = 0;
        let mut pieces = Vec::new();
        let mut ready = Vec::new();
        let members = self.groups[&gid].entries.clone();
        for eid in &members {
            let e = self.tensors.entries.get_mut(eid).expect("group members are live");
            let (segments, next) = layout::place(&e.regions, at, align);
            pieces.extend(layout::pack_pieces(&e.regions, &segments));
            e.segments = segments;
            at = next;
            ready.extend(e.ready.clone());
        }
        // From here on the group owns its extent and staging: a failure below is undone by
        // the caller through finish_write.
        {
            let g = self.groups.get_mut(&gid).expect("live");
            g.extent = Some(extent);
            g.write_staging = staging;
            g.len = at;
            g.live = members.len();
            g.write = WriteState::Preparing;
            g.io_started = start;
        }
        self.writes.started(staging.is_none(), at);
        let counter = if staging.is_some() {
            &stats.c.packed_tensors
        } else {
            &stats.c.direct_tensors
        };
        Stats::add(counter, members.len() as u64);
        if staging.is_none() && ready.is_empty() && !self.env.cfg.checksums {
            // Written straight from memory that is ready now: no device work to wait for.
            self.on_prepared(gid, Ok(()));
            return Ok(());
        }
        for ev in &ready {
            self.env.offload_stream.wait_event(ev.as_ref())?;
        }
        self.queue_write_sums(gid)?;
        if let Some(s) = staging {
            let base = self.staging.ptr(s);
            // SAFETY: the staging extent is the group's until its write completes; the
            // tensors' memory is held until then too (the offload contract), and the stream
            // waited above for their producers.
            unsafe {
                self.env
                    .device
                    .pack(self.env.offload_stream.as_ref(), base, at, &pieces)?
            };
        }
        let ev: Arc<dyn Event> = Arc::from(self.env.offload_stream.record()?);
        self.env
            .tell_after(&self.env.offload_waiter, ev, move |r| Msg::Prepared(gid, r));
        Ok(())
    }

    /// With checksums on, queues on the offload stream the checksums of the group's
    /// tensors, read from their own memory (after the stream has waited for their
    /// producers). [`State::store_sums`] takes them once the stream has passed them.
    fn queue_write_sums(&mut self, gid: u64) -> Result<()> {
        if !self.env.cfg.checksums {
            return Ok(());
        }
        let entries = self.groups[&gid].entries.clone();
        let sums = PendingSums::of_sources(&self.env, &self.tensors, entries)?;
        self.groups.get_mut(&gid).expect("live").checksums = Some(sums);
        Ok(())
    }

    /// The offload stream has packed the group / its producers are done: store the
    /// tensors' checksums (if any) and submit the writes.
    pub(crate) fn on_prepared(&mut self, gid: u64, outcome: Result<()>) {
        let Some(g) = self.groups.get(&gid) else { return };
        if g.staged {
            self.env
                .timeline
                .record(Track::Pack, "pack", g.io_started, Instant::now(), g.len);
        }
        let submitted = outcome
            .and_then(|()| self.store_sums(gid))
            .and_then(|()| self.submit_writes(gid));
        if let Err(e) = submitted {
            self.write_failed(gid, e, "writing an extent failed to start");
        }
    }

    /// Gives the group's tensors the checksums queued by [`State::queue_write_sums`]; the
    /// stream has passed them.
    fn store_sums(&mut self, gid: u64) -> Result<()> {
        let Some(p) = self.groups.get_mut(&gid).and_then(|g| g.checksums.take()) else {
            return Ok(());
        };
        p.store(&mut self.tensors)
    }

    fn submit_writes(&mut self, gid: u64) -> Result<()> {
        let _span = tracing::debug_span!("submit_writes", group = gid).entered();
        let env = &self.env;
        let g = &self.groups[&gid];
        let extent = g.extent.expect("prepared groups have an extent");
        let mut reqs = Vec::new();
        if let Some(s) = g.write_staging {
            reqs.push((extent.offset, self.staging.ptr(s), g.len));
        } else {
            for eid in &g.entries {
                let e = &self.tensors.entries[eid];
                for (r, s) in e.regions.iter().zip(&e.segments) {
                    reqs.push((extent.offset + s.at, r.ptr, r.len));
                }
            }
        }
        // Large ones cut into pieces the backend's threads share.
        let reqs: Vec<(u64, u64, u64)> = reqs
            .into_iter()
            .flat_map(|(offset, ptr, len)| {
                layout::cut_at_multiples(offset, len, env.cfg.io_split_unit())
                    .into_iter()
                    .map(move |(skip, n)| (offset + skip, ptr + skip, n))
            })
            .collect();
        let path = env.path(extent.target);
        let mut ios = Vec::with_capacity(reqs.len());
        let mut failed = None;
        for (offset, ptr, len) in reqs {
            let req = IoRequest {
                target: extent.target,
                op: IoOp::Write,
                offset,
                mem: MemRef::Device {
                    ptr,
                    len: len as usize,
                },
            };
            // SAFETY: the memory (staging or the held tensor) stays untouched until the
            // writes settle: the group keeps both until its write completion.
            let submitted = unsafe {
                PendingIo::submit(
                    env.backend.as_ref(),
                    req,
                    path.clone(),
                    env.stats.clone(),
                    env.cfg.io_retries,
                )
            };
            match submitted {
                Ok(io) => ios.push(io),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if ios.is_empty() {
            // Nothing in flight: the caller gives up on the group at once.
            return Err(failed.unwrap_or_else(|| Error::invalid("an extent with nothing to write")));
        }
        for io in &ios {
            env.notify_on_complete(io, gid, IoOp::Write);
        }
        let g = self.groups.get_mut(&gid).expect("live");
        g.ios = ios;
        // The writes in flight finish before the failure is acted on.
        g.io_error = failed;
        g.write = WriteState::Writing;
        g.io_started = Instant::now();
        Ok(())
    }

    /// Settles the completed requests among `ios`: a short one has its rest submitted
    /// again while `retry` is set, the progress thread to be told `notice()` when that
    /// completes. Returns those still in flight and the first failure.
    fn settle_completed(
        &mut self,
        notice: impl Fn() -> Msg + Clone + Send + 'static,
        ios: Vec<PendingIo>,
        retry: bool,
    ) -> (Vec<PendingIo>, Option<Error>) {
        let mut in_flight = Vec::with_capacity(ios.len());
        let mut failed = None;
        for io in ios {
            if !io.is_done() {
                in_flight.push(io);
                continue;
            }
            match io.settle(self.env.backend.as_ref(), retry && failed.is_none()) {
                Settled::Done => {}
                Settled::Resubmitted(io) => {
                    self.env.tell_on_complete(&io, notice.clone());
                    in_flight.push(io);
                }
                Settled::Failed(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        (in_flight, failed)
    }

    /// A write of the group completed: a short one has its rest written; once every write
    /// has settled, the group is on storage (or, after a failure, kept in memory).
    pub(crate) fn on_write_io(&mut self, gid: u64) {
        let _span = tracing::trace_span!("write_done", group = gid).entered();
        let Some(g) = self.groups.get_mut(&gid) else {
            return;
        };
        if !matches!(g.write, WriteState::Writing) || g.ios.is_empty() {
            return; // a late notice of a write already settled
        }
        let ios = std::mem::take(&mut g.ios);
        let retry = g.io_error.is_none();
        let (in_flight, failed) = self.settle_completed(move || Msg::WriteIo(gid), ios, retry);
        let g = self.groups.get_mut(&gid).expect("live");
        g.ios = in_flight;
        if let Some(e) = failed {
            g.io_error.get_or_insert(e);
        }
        if !g.ios.is_empty() {
            return;
        }
        match g.io_error.take() {
            Some(e) => self.write_failed(gid, e, "writing an extent failed"),
            None => self.finish_write(gid, Ok(())),
        }
    }

    /// Gives up the group's write after `e` (`doing` says at which step): counted in
    /// `write_errors` (and `no_space_errors` for ENOSPC), its tensors kept in their own
    /// memory and its extent and staging given back.
    fn write_failed(&mut self, gid: u64, e: Error, doing: &str) {
        let stats = &self.env.stats;
        Stats::add(&stats.c.write_errors, 1);
        if matches!(e, Error::NoSpace { .. }) {
            Stats::add(&stats.c.no_space_errors, 1);
            // Said once per episode of a full device, not once per extent.
            if self.writes.device_full_again() {
                tracing::debug!("{doing}: {e}");
            } else {
                tracing::warn!("{doing}: {e}; tensors stay in GPU memory while the storage is full");
            }
        } else {
            tracing::error!("{doing}, keeping its tensors in GPU memory: {e}");
        }
        self.finish_write(gid, Err(e));
    }

    /// The group's write has ended: on storage, or after a failure (`outcome`, already
    /// counted) kept in memory (counted as resident when the storage was full).
    fn finish_write(&mut self, gid: u64, outcome: Result<()>) {
        let g = self.groups.get_mut(&gid).expect("live");
        let took = g.io_started.elapsed();
        let staging = g.write_staging.take();
        self.writes.ended(staging.is_none(), g.len);
        if let Some(s) = staging {
            self.staging.free(s);
        }
        if let Err(e) = outcome {
            self.keep_resident(gid, matches!(e, Error::NoSpace { .. }));
            return;
        }
        self.writes.device_has_room();
        let g = self.groups.get_mut(&gid).expect("live");
        g.write = WriteState::Done;
        let len = g.len;
        let stats = self.env.stats.clone();
        Stats::add(&stats.c.extents_written, 1);
        Stats::add(&stats.c.bytes_written, len);
        Stats::add(&stats.c.write_ns, took.as_nanos() as u64);
        stats.record(Op::Write, took);
        self.env
            .timeline
            .record(Track::Write, "write", Instant::now() - took, Instant::now(), len);
        for eid in g.entries.clone() {
            let mut e = self.tensors.entries.remove(&eid).expect("group members are live");
            stats.record(Op::Offload, e.offloaded_at.elapsed());
            self.release_source(&mut e);
            if e.handles > 0 {
                self.tensors.entries.insert(eid, e);
            }
        }
        let g = self.groups.get_mut(&gid).expect("live");
        g.entries.retain(|eid| self.tensors.entries.contains_key(eid));
        self.maybe_free_group(gid);
    }

    /// Gives up storing the group: its tensors stay in their own memory (resident, counted
    /// as such when `out_of_space`), and its extent, if it had one, is free again.
    fn keep_resident(&mut self, gid: u64, out_of_space: bool) {
        let Some(g) = self.groups.remove(&gid) else { return };
        if let Some(extent) = g.extent {
            self.free_storage(extent);
        }
        for eid in g.entries {
            let Some(e) = self.tensors.entries.get_mut(&eid) else {
                continue;
            };
            e.group = None;
            e.segments.clear();
            if out_of_space {
                Stats::add(&self.env.stats.c.resident_tensors, 1);
                Stats::add(&self.env.stats.c.resident_bytes, e.len);
            }
            if e.handles == 0 {
                self.forget_entry(eid);
            }
        }
    }

    /// Starts loading `gid` into staging if the prefetch budget and staging memory allow
    /// it now: `Ok(true)` when it is loading, `Ok(false)` when there is no room yet. A
    /// read that fails to start is counted, cleaned up and returned.
    pub(crate) fn start_load_now(&mut self, gid: u64) -> Result<bool> {
        let len = self.groups[&gid].len;
        if !self.reads.fits(len, self.env.cfg.prefetch_bytes) {
            return Ok(false);
        }
        let Some(staging) = self.staging_alloc(len, false) else {
            return Ok(false);
        };
        self.submit_load(gid, staging).map(|()| true).inspect_err(|e| {
            tracing::warn!("prefetch failed to start (fetch reads on demand): {e}");
            self.staging.free(staging);
            Stats::add(&self.env.stats.c.read_errors, 1);
        })
    }

    /// Serves the prefetch queue in order: a request whose extent is loading or loaded is
    /// attached to that load; otherwise, while the prefetch budget and staging memory
    /// allow, its extent is read if the request starts a scan through it
    /// ([`State::scan_from`]), and for a lone request only its tensor's bytes are read
    /// ahead, into a slot ([`State::start_slot_now`]). Requests overtaken by their fetch are
    /// dropped.
    fn start_prefetches(&mut self) {
        while let Some(&req) = self.reads.queue.front() {
            let live = match (self.tensors.handle(req.handle), self.groups.get(&req.group)) {
                (Some(rec), Some(g)) => rec.fetched_at < req.at && g.live > 0,
                _ => false,
            };
            if !live {
                self.reads.queue.pop_front();
                continue;
            }
            if matches!(self.groups[&req.group].load, LoadState::Idle) {
                let eid = self.tensors.handle(req.handle).expect("live").entry;
                let Some(scan) = self.scan_from(req.group, eid) else {
                    match self.start_slot_now(req.handle, eid, req.group) {
                        Ok(false) => break,
                        // Read ahead, or (failed to start) left for its fetch to read.
                        Ok(true) | Err(_) => {
                            self.reads.queue.pop_front();
                            continue;
                        }
                    }
                };
                match self.start_load_now(req.group) {
                    // The rest of the scan waits on this load too: a fetch of the tensor
                    // that started it must not end the load before the others are served.
                    Ok(true) => {
                        for h in scan {
                            self.attach(h, req.group);
                        }
                    }
                    Ok(false) => break,
                    Err(_) => {
                        self.reads.queue.pop_front();
                        continue;
                    }
                }
            }
            self.attach(req.handle, req.group);
            self.reads.queue.pop_front();
        }
    }

    /// Whether the request at the front of the prefetch queue, for tensor `eid`, looks
    /// like the start of a scan through its extent `gid`, and if so the handles of the
    /// rest of that scan already queued (which then wait on the extent's load). A scan
    /// starts where the tensor is the first or the last there still waiting to be
    /// fetched, itself counted (tensors are requested in the order they were offloaded,
    /// or in reverse), and, where the queue shows what comes next (a caller that asks for
    /// many tensors ahead, as the tensors bench does), the requests for this extent among
    /// the next ones ([`State::coming_for`]) ask for at least half its bytes. Anything
    /// else (a deduplicated tensor wanted again, a random access, also where its tensor
    /// happens to be the first or last of its extent) is a lone request (`None`), for
    /// which reading the whole extent would read most of it for nothing.
    fn scan_from(&self, gid: u64, eid: u64) -> Option<Vec<u64>> {
        let g = &self.groups[&gid];
        if !self.tensors.first_or_last_waiting(&g.entries, eid) {
            return None;
        }
        if self.reads.queue.len() < 2 {
            return Some(Vec::new());
        }
        let coming = self.coming_for(gid);
        let mut wanted: HashSet<u64> = HashSet::from([eid]);
        wanted.extend(
            coming
                .iter()
                .filter_map(|&h| self.tensors.handle(h).map(|rec| rec.entry)),
        );
        let bytes: u64 = wanted
            .iter()
            .filter_map(|e| self.tensors.entries.get(e))
            .map(|e| e.len)
            .sum();
        (bytes.saturating_mul(2) >= g.len).then_some(coming)
    }

    /// The handles of the live requests for group `gid` among those queued behind the
    /// front one, as far as twice the group's tensors: the rest of a scan through it.
    fn coming_for(&self, gid: u64) -> Vec<u64> {
        let window = 2 * self.groups.get(&gid).map_or(0, |g| g.entries.len());
        self.reads
            .queue
            .iter()
            .skip(1)
            .take(window)
            .filter(|r| r.group == gid)
            .filter(|r| {
                self.tensors
                    .handle(r.handle)
                    .is_some_and(|rec| rec.fetched_at < r.at)
            })
            .map(|r| r.handle)
            .collect()
    }

    /// Serves the lone prefetch request of handle `h` (tensor `eid` in group `gid`) by
    /// reading ahead only the tensor's bytes into a slot, if the prefetch budget and
    /// staging memory allow it now: `Ok(true)` when the request is served (the slot is
    /// loading, the handle has one already, or its range is over the budget and left to
    /// the fetch), `Ok(false)` when there is no room yet. A read that fails to start is
    /// counted, cleaned up and returned; the fetch then reads on demand.
    fn start_slot_now(&mut self, h: u64, eid: u64, gid: u64) -> Result<bool> {
        if self.tensors.handle(h).is_none_or(|rec| rec.slot != 0) {
            return Ok(true);
        }
        let align = self.env.cfg.alignment;
        let e = &self.tensors.entries[&eid];
        let (Some(first), Some(last)) = (e.segments.first(), e.segments.last()) else {
            return Ok(true);
        };
        let start = first.at - first.at % align;
        let end = last.at + last.len;
        let len = end.div_ceil(align) * align - start;
        if len > self.env.cfg.prefetch_bytes {
            return Ok(true); // too large to read ahead: the fetch reads it into place
        }
        if !self.reads.fits(len, self.env.cfg.prefetch_bytes) {
            return Ok(false);
        }
        let Some(staging) = self.staging_alloc(len, false) else {
            return Ok(false);
        };
        let slot = Slot {
            handle: h,
            entry: eid,
            group: gid,
            start,
            len,
            staging,
            state: SlotState::Loading,
            ios: Vec::new(),
            started: Instant::now(),
            checksums: None,
            orphaned: false,
            fence: None,
        };
        self.submit_slot(slot, end - start)
            .map(|()| true)
            .inspect_err(|e| {
                tracing::warn!("a tensor's read-ahead failed to start (fetch reads on demand): {e}");
                self.staging.free(staging);
                Stats::add(&self.env.stats.c.read_errors, 1);
            })
    }

    /// Submits the read of `slot`: its range of its group's extent into its staging, of
    /// which the first `needed` bytes must come (the tensor's; past them, at the end of a
    /// target that grows as written, there may be nothing to read).
    fn submit_slot(&mut self, mut slot: Slot, needed: u64) -> Result<()> {
        let sid = self.id();
        let (h, gid) = (slot.handle, slot.group);
        let _span = tracing::debug_span!(
            "prefetch_slot",
            slot = sid,
            handle = h,
            group = gid,
            len = slot.len
        )
        .entered();
        let extent = self.groups[&gid].extent.expect("written groups have an extent");
        // SAFETY: the staging extent belongs to the slot until its read has settled: a
        // slot dropped while loading is only orphaned, and freed once the read settles.
        let io = unsafe { self.submit_read_ahead(extent, slot.start, slot.staging, slot.len, needed)? };
        self.env.tell_on_complete(&io, move || Msg::SlotIo(sid));
        slot.ios = vec![io];
        slot.started = Instant::now();
        self.reads.slot_started(sid, slot);
        self.tensors.handle_mut(h).expect("live").slot = sid;
        self.groups.get_mut(&gid).expect("live").slot_reads += 1;
        Stats::add(&self.env.stats.c.prefetched_slots, 1);
        Ok(())
    }

    /// A slot's read completed: a short one has its rest read; once it has settled, its
    /// bytes are checked (checksums on) and the slot is loaded (or, after a failure,
    /// dropped for the fetch to read on demand).
    pub(crate) fn on_slot_io(&mut self, sid: u64) {
        let _span = tracing::trace_span!("prefetch_slot_done", slot = sid).entered();
        let Some(slot) = self.reads.slots.get_mut(&sid) else {
            return;
        };
        if slot.state != SlotState::Loading || slot.ios.is_empty() {
            return; // a late notice of a read already settled
        }
        let ios = std::mem::take(&mut slot.ios);
        let (in_flight, failed) = self.settle_completed(move || Msg::SlotIo(sid), ios, true);
        if !in_flight.is_empty() {
            self.reads.slots.get_mut(&sid).expect("kept while loading").ios = in_flight;
            return;
        }
        let outcome = match failed
            .map_or(Ok(()), Err)
            .and_then(|()| self.queue_slot_check(sid))
        {
            Ok(true) => return,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        self.end_slot(sid, outcome);
    }

    /// With checksums on, queues on the fetch stream the checksum of a slot's tensor as it
    /// lies in the slot, and has the progress thread told ([`Msg::SlotVerified`]) when it
    /// is computed. False when there is nothing to check (or nobody wants the bytes).
    fn queue_slot_check(&mut self, sid: u64) -> Result<bool> {
        if !self.env.cfg.checksums {
            return Ok(false);
        }
        let slot = &self.reads.slots[&sid];
        if slot.orphaned {
            return Ok(false);
        }
        let base = self.staging.ptr(slot.staging);
        let members = [slot.entry];
        let Some(sums) = PendingSums::of_loaded(&self.env, &self.tensors, &members, base, slot.start)? else {
            return Ok(false);
        };
        let ev: Arc<dyn Event> = Arc::from(self.env.fetch_stream.record()?);
        self.reads.slots.get_mut(&sid).expect("live").checksums = Some(sums);
        self.env
            .tell_after(&self.env.fetch_waiter, ev, move |r| Msg::SlotVerified(sid, r));
        Ok(true)
    }

    /// The checksum of a slot's bytes is computed (`outcome`: whether the device got
    /// there): compare it with the one written, and end the slot's read.
    pub(crate) fn on_slot_verified(&mut self, sid: u64, outcome: Result<()>) {
        let Some(slot) = self.reads.slots.get_mut(&sid) else {
            return;
        };
        if slot.state != SlotState::Loading || slot.checksums.is_none() {
            return;
        }
        let sums = slot.checksums.take().expect("checked above");
        let gid = slot.group;
        let outcome = outcome.and_then(|()| {
            let extent = self.groups[&gid].extent.expect("a slot's group was written");
            sums.check(&self.env, &self.tensors, extent)
        });
        self.end_slot(sid, outcome);
    }

    /// A slot's read has ended with `outcome`: loaded if its handle still wants it;
    /// otherwise, or after a failure (counted; the fetch reads on demand), its staging goes.
    fn end_slot(&mut self, sid: u64, outcome: Result<()>) {
        let (gid, len, took) = {
            let slot = self.reads.slots.get_mut(&sid).expect("a slot loading is kept");
            slot.checksums = None; // not taken when the device failed to compute them
            (slot.group, slot.len, slot.started.elapsed())
        };
        let stats = self.env.stats.clone();
        match &outcome {
            Ok(()) => self.env.record_read_ahead("prefetch slot", len, took),
            Err(e) => {
                tracing::warn!("a tensor's read-ahead failed (fetch will read on demand): {e}");
                Stats::add(&stats.c.read_errors, 1);
            }
        }
        if let Some(slot) = self.reads.slot_ended(sid, outcome.is_ok()) {
            if let Some(rec) = self.tensors.handle_mut(slot.handle) {
                if rec.slot == sid {
                    rec.slot = 0;
                }
            }
            self.staging.free(slot.staging);
        }
        if let Some(g) = self.groups.get_mut(&gid) {
            g.slot_reads -= 1;
            self.maybe_free_group(gid);
        }
    }

    /// Handle `h` no longer wants its slot, if it has one (fetched, released, or the slot
    /// evicted): a loaded slot's staging is freed once the last copy out of it completes;
    /// one still loading goes once its read settles.
    pub(crate) fn drop_slot(&mut self, h: u64) {
        let sid = self.tensors.handle(h).map_or(0, |rec| rec.slot);
        if sid != 0 {
            self.evict_slot(sid);
        }
    }

    /// Slot `sid` goes (see [`State::drop_slot`]); its handle no longer names it.
    fn evict_slot(&mut self, sid: u64) {
        let Some(slot) = self.reads.slots.get(&sid) else {
            return;
        };
        if let Some(rec) = self.tensors.handle_mut(slot.handle) {
            if rec.slot == sid {
                rec.slot = 0;
            }
        }
        if let Some(slot) = self.reads.slot_dropped(sid) {
            self.free_staging_after(slot.staging, slot.fence);
        }
    }

    fn submit_load(&mut self, gid: u64, staging: Extent) -> Result<()> {
        let _span = tracing::debug_span!("prefetch", group = gid).entered();
        let g = &self.groups[&gid];
        let extent = g.extent.expect("written groups have an extent");
        // A tensor written straight from its memory ends where its bytes end, off the
        // alignment; past it, at the end of a target that grows as written, there is nothing
        // to read. Only the bytes of the tensors still in the group must come.
        let needed = g
            .entries
            .iter()
            .filter_map(|eid| self.tensors.entries.get(eid))
            .filter_map(|e| e.segments.last().map(|s| s.at + s.len))
            .max()
            .unwrap_or(g.len);
        let len = g.len;
        // SAFETY: the staging extent belongs to this load until its read has settled.
        let io = unsafe { self.submit_read_ahead(extent, 0, staging, len, needed)? };
        self.env.notify_on_complete(&io, gid, IoOp::Read);
        let epoch = self.id();
        let g = self.groups.get_mut(&gid).expect("live");
        g.ios = vec![io];
        g.load = LoadState::Loading(staging);
        g.load_epoch = epoch;
        g.pending = 0;
        g.io_started = Instant::now();
        self.reads.load_started(len);
        Stats::add(&self.env.stats.c.prefetched_extents, 1);
        Ok(())
    }

    /// Submits the read ahead of `len` bytes of `extent` from `from` on into `staging`, of
    /// which the first `needed` must come (past them, at the end of a target that grows as
    /// written, there may be nothing to read).
    ///
    /// # Safety
    /// `staging` must stay allocated to this read, untouched, until it has settled.
    unsafe fn submit_read_ahead(
        &self,
        extent: Extent,
        from: u64,
        staging: Extent,
        len: u64,
        needed: u64,
    ) -> Result<PendingIo> {
        let env = &self.env;
        let req = IoRequest {
            target: extent.target,
            op: IoOp::Read,
            offset: extent.offset + from,
            mem: MemRef::Device {
                ptr: self.staging.ptr(staging),
                len: len as usize,
            },
        };
        // SAFETY: the caller keeps the staging memory for the read until it settles.
        unsafe {
            PendingIo::submit_needing(
                env.backend.as_ref(),
                req,
                needed as usize,
                env.path(extent.target),
                env.stats.clone(),
                env.cfg.io_retries,
            )
        }
    }

    /// A prefetch read completed: a short one has its rest read; once it has settled, the
    /// extent is loaded (or, after a failure, left for fetches to read on demand).
    pub(crate) fn on_read_io(&mut self, gid: u64) {
        let _span = tracing::trace_span!("prefetch_done", group = gid).entered();
        let Some(g) = self.groups.get_mut(&gid) else {
            return;
        };
        let LoadState::Loading(staging) = g.load else {
            return;
        };
        if g.ios.is_empty() {
            return; // a late notice of a read already settled
        }
        let ios = std::mem::take(&mut g.ios);
        let (in_flight, failed) = self.settle_completed(move || Msg::ReadIo(gid), ios, true);
        let g = self.groups.get_mut(&gid).expect("live");
        if !in_flight.is_empty() {
            g.ios = in_flight;
            return;
        }
        self.finish_load(gid, staging, failed.map_or(Ok(()), Err));
    }

    /// The read of a load has settled with `outcome`: the load ends, or, with checksums
    /// on, its bytes are checked first ([`State::on_verified`] ends it).
    fn finish_load(&mut self, gid: u64, staging: Extent, outcome: Result<()>) {
        let outcome = match outcome.and_then(|()| self.queue_load_check(gid, staging)) {
            Ok(true) => return,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        self.end_load(gid, staging, outcome);
    }

    /// With checksums on, queues on the fetch stream the checksums of a loaded group's
    /// tensors as they lie in `staging`, and has the progress thread told
    /// ([`Msg::Verified`]) when they are computed. False when there is nothing to check.
    fn queue_load_check(&mut self, gid: u64, staging: Extent) -> Result<bool> {
        if !self.env.cfg.checksums {
            return Ok(false);
        }
        let base = self.staging.ptr(staging);
        let members = &self.groups[&gid].entries;
        let Some(sums) = PendingSums::of_loaded(&self.env, &self.tensors, members, base, 0)? else {
            return Ok(false);
        };
        let ev: Arc<dyn Event> = Arc::from(self.env.fetch_stream.record()?);
        self.groups.get_mut(&gid).expect("live").checksums = Some(sums);
        self.env
            .tell_after(&self.env.fetch_waiter, ev, move |r| Msg::Verified(gid, r));
        Ok(true)
    }

    /// The checksums of a loaded group's bytes are computed (`outcome`: whether the device
    /// got there): compare them with those written, and end the load. The first tensor
    /// that differs fails the load (counted in `checksum_errors`).
    pub(crate) fn on_verified(&mut self, gid: u64, outcome: Result<()>) {
        let Some(g) = self.groups.get_mut(&gid) else {
            return;
        };
        let (LoadState::Loading(staging), true) = (g.load, g.checksums.is_some()) else {
            return;
        };
        let outcome = outcome.and_then(|()| {
            let sums = g.checksums.take().expect("checked above");
            let extent = g.extent.expect("a loaded group was written");
            sums.check(&self.env, &self.tensors, extent)
        });
        self.end_load(gid, staging, outcome);
    }

    /// The load has ended with `outcome`: loaded, or after a failure left for fetches to
    /// read on demand.
    fn end_load(&mut self, gid: u64, staging: Extent, outcome: Result<()>) {
        let g = self.groups.get_mut(&gid).expect("live");
        g.checksums = None; // not taken when the device failed to compute them
        let took = g.io_started.elapsed();
        let len = g.len;
        let ok = outcome.is_ok();
        self.reads.load_ended(gid, len, ok);
        match outcome {
            Ok(()) => {
                self.env.record_read_ahead("prefetch", len, took);
                g.load = LoadState::Loaded(staging);
                if g.pending == 0 {
                    self.unload(gid); // every request for it was released meanwhile
                }
            }
            Err(e) => {
                tracing::warn!("prefetch read failed (fetch will read on demand): {e}");
                Stats::add(&self.env.stats.c.read_errors, 1);
                g.load = LoadState::Idle;
                self.staging.free(staging);
            }
        }
        self.maybe_free_group(gid);
    }

    /// Drops a group's loaded staging copy (after the deliveries out of it).
    pub(crate) fn unload(&mut self, gid: u64) {
        let Some(g) = self.groups.get_mut(&gid) else {
            return;
        };
        let LoadState::Loaded(staging) = g.load else {
            return;
        };
        g.load = LoadState::Idle;
        g.pending = 0;
        let fence = g.fence.take();
        self.reads.unloaded(gid, g.len);
        self.free_staging_after(staging, fence);
    }

    /// Frees a staging extent read ahead, once `fence` (the last copy out of it) completes.
    fn free_staging_after(&mut self, staging: Extent, fence: Option<Arc<dyn Event>>) {
        match fence {
            Some(f) if !f.query().unwrap_or(true) => {
                self.env
                    .tell_after(&self.env.fetch_waiter, f.clone(), |_| Msg::Fence);
                self.staging.free_after(staging, f);
            }
            _ => self.staging.free(staging),
        }
    }

    /// Allocates staging memory; a write may evict loaded extents and slots to get it.
    fn staging_alloc(&mut self, len: u64, may_evict: bool) -> Option<Extent> {
        loop {
            if let Some(s) = self.staging.try_alloc(len, &self.env.stats) {
                return Some(s);
            }
            if !may_evict {
                return None;
            }
            let victim = self.reads.oldest_loaded()?;
            Stats::add(&self.env.stats.c.prefetch_evictions, 1);
            match victim {
                Held::Group(gid) => self.unload(gid),
                Held::Slot(sid) => self.evict_slot(sid), // its fetch reads on demand
            }
            self.free_fenced();
        }
    }

    /// Frees staging and releases sources whose fences have completed.
    fn free_fenced(&mut self) {
        if self.staging.none_fenced() && self.callbacks.none_fenced() {
            return;
        }
        self.staging.free_fenced();
        self.callbacks.free_fenced();
    }
}

/// The error every operation returns once the engine has shut down.
pub(crate) fn stopped() -> Error {
    Error::Abandoned("the engine has shut down".into())
}
