//! The I/O side of the engine's state: starting writes and prefetches within the staging
//! budget, handling their completions, and the staging memory itself.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::{IoOp, IoRequest};
use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::memory::MemRef;

use super::layout;
use super::pending::{PendingIo, Settled};
use super::state::{LoadState, Msg, State, WriteState};
use super::stats::{Op, Stats};
use super::timeline::Track;

impl State {
    /// Starts whatever the budgets now allow. Called after every change.
    pub(crate) fn pump(&mut self) {
        self.free_fenced();
        self.start_writes();
        self.start_prefetches();
    }

    /// True when nothing written or read is outstanding (and nothing is queued to write).
    pub(crate) fn idle(&self) -> bool {
        self.open.is_none()
            && self.write_queue.is_empty()
            && self.writes_inflight == 0
            && self.loads_inflight == 0
            && self.demand_reads_inflight == 0
    }

    fn start_writes(&mut self) {
        while let Some(&gid) = self.write_queue.front() {
            let Some(g) = self.groups.get(&gid) else {
                self.write_queue.pop_front();
                continue;
            };
            if g.entries.is_empty() {
                self.groups.remove(&gid);
                self.write_queue.pop_front();
                continue;
            }
            let (len, staged) = (g.planned, g.staged);
            if !staged && self.direct_inflight > 0 && self.direct_inflight + len > self.cfg.direct_write_bytes
            {
                break;
            }
            let staging = if staged {
                match self.staging_alloc(len, true) {
                    Some(s) => Some(s),
                    None => {
                        self.staging_wait_since.get_or_insert_with(Instant::now);
                        break;
                    }
                }
            } else {
                None
            };
            self.write_queue.pop_front();
            let extent = match self.storage.alloc(len) {
                Ok(Ok(extent)) => {
                    self.storage_full = false;
                    extent
                }
                Ok(Err(full)) => {
                    // Said once per episode of full storage, not once per extent.
                    if !std::mem::replace(&mut self.storage_full, true) {
                        tracing::warn!("{full}; tensors stay in GPU memory until space is freed");
                    }
                    if let Some(s) = staging {
                        self.staging_free(s);
                    }
                    self.keep_resident(gid, true);
                    continue;
                }
                Err(e) => {
                    tracing::error!("allocating an extent: {e}");
                    if let Some(s) = staging {
                        self.staging_free(s);
                    }
                    self.keep_resident(gid, false);
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
        if let Some(since) = self.staging_wait_since.take() {
            Stats::add(&self.stats.c.staging_wait_ns, since.elapsed().as_nanos() as u64);
        }
        let align = self.cfg.alignment;
        let mut at = 0;
        let mut pieces = Vec::new();
        let mut ready = Vec::new();
        let members = self.groups[&gid].entries.clone();
        for eid in &members {
            let e = self.entries.get_mut(eid).expect("group members are live");
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
        self.writes_inflight += 1;
        let counter = if staging.is_some() {
            &self.stats.c.packed_tensors
        } else {
            self.direct_inflight += at;
            &self.stats.c.direct_tensors
        };
        Stats::add(counter, members.len() as u64);
        if staging.is_none() && ready.is_empty() && !self.cfg.checksums {
            // Written straight from memory that is ready now: no device work to wait for.
            self.on_prepared(gid, Ok(()));
            return Ok(());
        }
        for ev in &ready {
            self.offload_stream.wait_event(ev.as_ref())?;
        }
        self.queue_write_sums(gid)?;
        if let Some(s) = staging {
            let base = self.staging_buf.ptr() + s.offset;
            // SAFETY: the staging extent is the group's until its write completes; the
            // tensors' memory is held until then too (the offload contract), and the stream
            // waited above for their producers.
            unsafe {
                self.device
                    .pack(self.offload_stream.as_ref(), base, at, &pieces)?
            };
        }
        let ev: Arc<dyn super::super::device::Event> = Arc::from(self.offload_stream.record()?);
        let tx = self.tx.clone();
        self.offload_waiter.after(ev, move |r| {
            let _ = tx.send(Msg::Prepared(gid, r));
        });
        Ok(())
    }

    /// The offload stream has packed the group / its producers are done: submit the writes.
    pub(crate) fn on_prepared(&mut self, gid: u64, outcome: Result<()>) {
        let Some(g) = self.groups.get(&gid) else { return };
        if g.staged {
            self.timeline
                .record(Track::Pack, "pack", g.io_started, Instant::now(), g.len);
        }
        let submitted = outcome
            .and_then(|()| self.store_sums(gid))
            .and_then(|()| self.submit_writes(gid));
        if let Err(e) = submitted {
            self.write_failed(gid, e, "writing an extent failed to start");
        }
    }

    fn submit_writes(&mut self, gid: u64) -> Result<()> {
        let _span = tracing::debug_span!("submit_writes", group = gid).entered();
        let g = &self.groups[&gid];
        let extent = g.extent.expect("prepared groups have an extent");
        let mut reqs = Vec::new();
        if let Some(s) = g.write_staging {
            reqs.push((extent.offset, self.staging_buf.ptr() + s.offset, g.len));
        } else {
            for eid in &g.entries {
                let e = &self.entries[eid];
                for (r, s) in e.regions.iter().zip(&e.segments) {
                    reqs.push((extent.offset + s.at, r.ptr, r.len));
                }
            }
        }
        let path = self.path(extent.target);
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
                    self.backend.as_ref(),
                    req,
                    path.clone(),
                    self.stats.clone(),
                    self.cfg.io_retries,
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
            self.notify_on_complete(io, gid, IoOp::Write);
        }
        let g = self.groups.get_mut(&gid).expect("live");
        g.ios = ios;
        // The writes in flight finish before the failure is acted on.
        g.io_error = failed;
        g.write = WriteState::Writing;
        g.io_started = Instant::now();
        Ok(())
    }

    /// Has the progress thread told (a [`Msg::WriteIo`] or [`Msg::ReadIo`] for `gid`) when
    /// `io` completes.
    fn notify_on_complete(&self, io: &PendingIo, gid: u64, op: IoOp) {
        let tx = self.tx.clone();
        io.on_complete(move || {
            let _ = tx.send(match op {
                IoOp::Write => Msg::WriteIo(gid),
                IoOp::Read => Msg::ReadIo(gid),
            });
        });
    }

    /// Settles the completed requests among `ios` (`op` is their direction): a short one
    /// has its rest submitted again while `retry` is set. Returns those still in flight and
    /// the first failure.
    fn settle_completed(
        &mut self,
        gid: u64,
        op: IoOp,
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
            match io.settle(self.backend.as_ref(), retry && failed.is_none()) {
                Settled::Done => {}
                Settled::Resubmitted(io) => {
                    self.notify_on_complete(&io, gid, op);
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
        let (in_flight, failed) = self.settle_completed(gid, IoOp::Write, ios, retry);
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
        Stats::add(&self.stats.c.write_errors, 1);
        if matches!(e, Error::NoSpace { .. }) {
            Stats::add(&self.stats.c.no_space_errors, 1);
            // Said once per episode of a full device, not once per extent.
            if std::mem::replace(&mut self.device_full, true) {
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
        self.writes_inflight -= 1;
        if let Some(s) = g.write_staging.take() {
            self.staging_free(s);
        } else {
            self.direct_inflight -= self.groups[&gid].len;
        }
        if let Err(e) = outcome {
            self.keep_resident(gid, matches!(e, Error::NoSpace { .. }));
            return;
        }
        self.device_full = false;
        let g = self.groups.get_mut(&gid).expect("live");
        g.write = WriteState::Done;
        let len = g.len;
        Stats::add(&self.stats.c.extents_written, 1);
        Stats::add(&self.stats.c.bytes_written, len);
        Stats::add(&self.stats.c.write_ns, took.as_nanos() as u64);
        self.stats.record(Op::Write, took);
        self.timeline
            .record(Track::Write, "write", Instant::now() - took, Instant::now(), len);
        for eid in g.entries.clone() {
            let mut e = self.entries.remove(&eid).expect("group members are live");
            self.stats.record(Op::Offload, e.offloaded_at.elapsed());
            self.release_source(&mut e);
            if e.handles > 0 {
                self.entries.insert(eid, e);
            }
        }
        let g = self.groups.get_mut(&gid).expect("live");
        g.entries.retain(|eid| self.entries.contains_key(eid));
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
            let Some(e) = self.entries.get_mut(&eid) else {
                continue;
            };
            e.group = None;
            e.segments.clear();
            if out_of_space {
                Stats::add(&self.stats.c.resident_tensors, 1);
                Stats::add(&self.stats.c.resident_bytes, e.len);
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
        if self.prefetch_held + len > self.cfg.prefetch_bytes {
            return Ok(false);
        }
        let Some(staging) = self.staging_alloc(len, false) else {
            return Ok(false);
        };
        self.submit_load(gid, staging).map(|()| true).inspect_err(|e| {
            tracing::warn!("prefetch failed to start (fetch reads on demand): {e}");
            self.staging_free(staging);
            Stats::add(&self.stats.c.read_errors, 1);
        })
    }

    /// Serves the prefetch queue in order: a request whose extent is loading or loaded is
    /// attached to that load; otherwise its extent is read, while the prefetch budget and
    /// staging memory allow, if the request starts a scan through it
    /// ([`State::starts_a_scan`]). Requests overtaken by their fetch are dropped, and so
    /// are lone ones: their fetch reads the tensor's own bytes, not the whole extent.
    fn start_prefetches(&mut self) {
        while let Some(&req) = self.prefetch_queue.front() {
            let live = match (self.handles.get(&req.handle), self.groups.get(&req.group)) {
                (Some(rec), Some(g)) => rec.fetched_at < req.at && g.live > 0,
                _ => false,
            };
            if !live {
                self.prefetch_queue.pop_front();
                continue;
            }
            if matches!(self.groups[&req.group].load, LoadState::Idle) {
                if !self.starts_a_scan(req.group, self.handles[&req.handle].entry) {
                    self.prefetch_queue.pop_front(); // its fetch counts as a demand read
                    continue;
                }
                match self.start_load_now(req.group) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) => {
                        self.prefetch_queue.pop_front();
                        continue;
                    }
                }
            }
            self.attach(req.handle, req.group);
            self.prefetch_queue.pop_front();
        }
    }

    /// True when a request for tensor `eid` looks like the start of a scan through its
    /// extent `gid`: the tensor is the first or the last there still waiting to be fetched,
    /// itself counted (tensors are requested in the order they were offloaded, or in
    /// reverse). Anything else (a deduplicated tensor needed again, a random access) is a
    /// lone request, for which reading the whole extent would read it many times over.
    fn starts_a_scan(&self, gid: u64, eid: u64) -> bool {
        let mut waiting = self.groups[&gid]
            .entries
            .iter()
            .filter(|&&e| e == eid || self.entries.get(&e).is_some_and(|e| e.unfetched > 0));
        waiting.next() == Some(&eid) || waiting.next_back() == Some(&eid)
    }

    fn submit_load(&mut self, gid: u64, staging: Extent) -> Result<()> {
        let _span = tracing::debug_span!("prefetch", group = gid).entered();
        let g = &self.groups[&gid];
        let extent = g.extent.expect("written groups have an extent");
        let req = IoRequest {
            target: extent.target,
            op: IoOp::Read,
            offset: extent.offset,
            mem: MemRef::Device {
                ptr: self.staging_buf.ptr() + staging.offset,
                len: g.len as usize,
            },
        };
        // A tensor written straight from its memory ends where its bytes end, off the
        // alignment; past it, at the end of a target that grows as written, there is nothing
        // to read. Only the bytes of the tensors still in the group must come.
        let needed = g
            .entries
            .iter()
            .filter_map(|eid| self.entries.get(eid))
            .filter_map(|e| e.segments.last().map(|s| s.at + s.len))
            .max()
            .unwrap_or(g.len);
        let path = self.path(extent.target);
        // SAFETY: the staging extent belongs to this load until its read has settled.
        let io = unsafe {
            PendingIo::submit_needing(
                self.backend.as_ref(),
                req,
                needed as usize,
                path,
                self.stats.clone(),
                self.cfg.io_retries,
            )?
        };
        self.notify_on_complete(&io, gid, IoOp::Read);
        let len = g.len;
        let epoch = self.id();
        let g = self.groups.get_mut(&gid).expect("live");
        g.ios = vec![io];
        g.load = LoadState::Loading(staging);
        g.load_epoch = epoch;
        g.pending = 0;
        g.io_started = Instant::now();
        self.prefetch_held += len;
        self.loads_inflight += 1;
        Stats::add(&self.stats.c.prefetched_extents, 1);
        Ok(())
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
        let (in_flight, failed) = self.settle_completed(gid, IoOp::Read, ios, true);
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

    /// The checksums of a loaded group's bytes are computed (`outcome`: whether the device
    /// got there): compare them, and end the load.
    pub(crate) fn on_verified(&mut self, gid: u64, outcome: Result<()>) {
        let Some(g) = self.groups.get(&gid) else { return };
        let (LoadState::Loading(staging), true) = (g.load, g.checksums.is_some()) else {
            return;
        };
        let outcome = outcome.and_then(|()| self.check_load(gid));
        self.end_load(gid, staging, outcome);
    }

    /// The load has ended with `outcome`: loaded, or after a failure left for fetches to
    /// read on demand.
    fn end_load(&mut self, gid: u64, staging: Extent, outcome: Result<()>) {
        let g = self.groups.get_mut(&gid).expect("live");
        g.checksums = None; // not taken when the device failed to compute them
        let took = g.io_started.elapsed();
        self.loads_inflight -= 1;
        let len = g.len;
        match outcome {
            Ok(()) => {
                Stats::add(&self.stats.c.bytes_read, len);
                Stats::add(&self.stats.c.read_ns, took.as_nanos() as u64);
                self.stats.record(Op::Read, took);
                self.timeline.record(
                    Track::Read,
                    "prefetch",
                    Instant::now() - took,
                    Instant::now(),
                    len,
                );
                g.load = LoadState::Loaded(staging);
                let pending = g.pending;
                self.loaded.push_back(gid);
                if pending == 0 {
                    self.unload(gid); // every request for it was released meanwhile
                }
            }
            Err(e) => {
                tracing::warn!("prefetch read failed (fetch will read on demand): {e}");
                Stats::add(&self.stats.c.read_errors, 1);
                g.load = LoadState::Idle;
                self.prefetch_held -= len;
                self.staging_free(staging);
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
        self.prefetch_held -= g.len;
        self.loaded.retain(|&x| x != gid);
        match fence {
            Some(f) if !f.query().unwrap_or(true) => {
                let tx = self.tx.clone();
                self.fetch_waiter.after(f.clone(), move |_| {
                    let _ = tx.send(Msg::Fence);
                });
                self.fenced_staging.push((staging, f));
            }
            _ => self.staging_free(staging),
        }
    }

    /// Allocates staging memory; a write may evict loaded extents to get it.
    fn staging_alloc(&mut self, len: u64, may_evict: bool) -> Option<Extent> {
        loop {
            if let Ok(Ok(s)) = self.staging.alloc(len) {
                self.staging_used += s.len;
                self.stats.staging_in_use(self.staging_used);
                return Some(s);
            }
            if !may_evict {
                return None;
            }
            let victim = self.loaded.front().copied()?;
            Stats::add(&self.stats.c.prefetch_evictions, 1);
            self.unload(victim);
            self.free_fenced();
        }
    }

    pub(crate) fn staging_free(&mut self, s: Extent) {
        match self.staging.free(s) {
            Ok(()) => self.staging_used -= s.len,
            Err(e) => tracing::error!("freeing staging {s:?}: {e}"),
        }
    }

    /// Frees staging and releases sources whose fences have completed.
    fn free_fenced(&mut self) {
        if self.fenced_staging.is_empty() && self.fenced_sources.is_empty() {
            return;
        }
        let done = |f: &Arc<dyn super::super::device::Event>| f.query().unwrap_or(true);
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fenced_staging)
            .into_iter()
            .partition(|(_, f)| done(f));
        self.fenced_staging = waiting;
        for (s, _) in ready {
            self.staging_free(s);
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fenced_sources)
            .into_iter()
            .partition(|(_, f)| done(f));
        self.fenced_sources = waiting;
        for (callbacks, _) in ready {
            self.due_callbacks.extend(callbacks);
        }
    }
}

/// The error every operation returns once the engine has shut down.
pub(crate) fn stopped() -> Error {
    Error::Abandoned("the engine has shut down".into())
}
