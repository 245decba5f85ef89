//! [`State`]: everything the engine knows, behind its one lock — a composition of parts,
//! each in its own file with its invariants:
//!
//! - [`Env`]: settings and shared resources (device, streams, backend, waiters, the
//!   progress thread's channel, statistics), fixed at start;
//! - [`Tensors`]: the tensors ("entries") and the handles naming them (dedup, counts);
//! - the groups ([`Group`]): the extents tensors are packed into and written in, with
//!   the progress of their write and read-ahead;
//! - [`Writes`]: the open packed group, the write queue and the writes under way;
//! - [`Reads`]: the prefetch queue, the loaded extents and slots, and the reads in flight;
//! - [`Space`]: storage space; [`Staging`]: staging memory;
//! - [`Callbacks`]: source-release callbacks waiting to run.
//!
//! `State`'s own methods are what ties the parts together: this file has the
//! caller-facing operations (offload, prefetch, fetch, release) and what they share;
//! `io.rs` starts writes and prefetches within the budgets and handles their completions.
//!
//! Everything here runs under the engine's one lock, and nothing here blocks: device work
//! is only enqueued, storage I/O only submitted. Completions come back as [`Msg`]s to the
//! engine's progress thread.
//!
//! Life of a tensor:
//! 1. `offload` makes an entry (or, for a key already held, adds a handle to it: dedup).
//!    Small entries join the open packed group; large ones get a direct group of their own.
//! 2. A group is sealed (full, idle for `pack_flush_delay`, or drained) and queued. When
//!    staging memory allows, its storage extent is allocated and the offload stream waits
//!    for the producers and packs it (packed), or just waits for the producers (direct).
//! 3. Once the stream has done so, the writes are submitted; when they complete, the
//!    tensors' own memory is released to the caller (its callbacks run).
//! 4. `fetch` copies from the tensor's own memory while that is still held (forwarding),
//!    from staging if the extent (or, for a lone prefetch request, the tensor's own slot of
//!    it) was prefetched, and otherwise reads storage itself.
//! 5. `release` of the last handle frees everything; a write not yet started is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::device::Event;
use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::memory::DevicePtr;

use super::callbacks::{Callbacks, SourceFreeFn};
use super::env::{Env, Msg};
use super::groups::{Group, LoadState, WriteState};
use super::keys::{Handle, TensorKey};
use super::layout::{self, Region};
use super::pending::PendingIo;
use super::reads::{Reads, SlotState};
use super::space::Space;
use super::staging::Staging;
use super::stats::Stats;
use super::tensors::{Entry, Tensors};
use super::timeline::Track;
use super::verify::DemandCheck;
use super::writes::Writes;

/// Everything the engine knows, behind its lock.
pub(crate) struct State {
    pub(crate) env: Env,
    /// Numbers handles, entries, groups and loads (one sequence for all).
    next_id: u64,
    pub(crate) tensors: Tensors,
    /// The groups, by id.
    pub(crate) groups: HashMap<u64, Group>,
    pub(crate) writes: Writes,
    pub(crate) reads: Reads,
    pub(crate) space: Space,
    pub(crate) staging: Staging,
    pub(crate) callbacks: Callbacks,
}

/// What a fetch has to do after the state was updated under the lock.
pub(crate) enum FetchPlan {
    /// The copy is enqueued; here is its event.
    Done(Arc<dyn Event>),
    /// The group is being read into staging: wait and look again.
    WaitLoad,
    /// Reads were submitted straight into the destination: wait for them (all of them,
    /// even when submitting a later one failed with the error given), resubmitting the
    /// rest of any that comes back short; then check the bytes, when there is a check.
    Read(Vec<PendingIo>, Option<Error>, Option<DemandCheck>),
    /// The bytes must be read straight into the destination, which is not free yet: wait
    /// for its event, then look again.
    WaitDestination(Arc<dyn Event>),
}

impl State {
    /// The state of an engine that has stored nothing yet.
    pub(crate) fn new(env: Env, space: Space, staging: Staging) -> Self {
        State {
            env,
            next_id: 0,
            tensors: Tensors::default(),
            groups: HashMap::new(),
            writes: Writes::new(),
            reads: Reads::default(),
            space,
            staging,
            callbacks: Callbacks::default(),
        }
    }

    pub(crate) fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Registers an offload; returns its handle.
    pub(crate) fn offload(
        &mut self,
        key: TensorKey,
        regions: &[Region],
        ready: Option<Arc<dyn Event>>,
        on_source_free: Option<SourceFreeFn>,
    ) -> Result<Handle> {
        let len = layout::total_len(regions);
        let now = Instant::now();
        let stats = self.env.stats.clone();
        Stats::add(&stats.c.offloads, 1);
        Stats::add(&stats.c.offload_bytes, len);
        if self.env.cfg.dedup {
            if let Some(eid) = self.tensors.find_same(key, regions)? {
                if let Some(cb) = on_source_free {
                    let e = self.tensors.entries.get_mut(&eid).expect("found live");
                    if e.source_held {
                        e.callbacks.push(cb);
                    } else if let Some(fence) = e.source_fence.clone() {
                        // A forwarded copy may still read the memory: freed with it.
                        self.callbacks.after_fence(vec![cb], fence);
                    } else {
                        self.callbacks.due(cb);
                    }
                }
                Stats::add(&stats.c.dedup_hits, 1);
                Stats::add(&stats.c.dedup_bytes, len);
                return Ok(self.new_handle(eid));
            }
        }
        let eid = self.id();
        let mut entry = Entry::new(key, regions, ready, now);
        match on_source_free {
            Some(cb) if entry.source_held => entry.callbacks.push(cb),
            Some(cb) => self.callbacks.due(cb),
            None => {}
        }
        let cfg = &self.env.cfg;
        let (alignment, pack_threshold, pack, pack_extent_bytes) =
            (cfg.alignment, cfg.pack_threshold, cfg.pack, cfg.pack_extent_bytes);
        let planned = entry.planned(alignment);
        if len > 0 {
            // Without packing, every tensor is written straight from its own memory. The
            // threshold applies to the tensor's aligned footprint, so a packed extent never
            // outgrows pack_extent_bytes (and so the staging memory).
            let gid = if planned >= pack_threshold || !pack {
                let gid = self.new_group(false, WriteState::Queued);
                self.writes.queue.push_back(gid);
                gid
            } else {
                // A tensor that would overflow the open extent goes to the next one.
                if let Some(gid) = self.writes.open {
                    let g = &self.groups[&gid];
                    if !g.entries.is_empty() && g.planned + planned > pack_extent_bytes {
                        self.seal_open();
                    }
                }
                match self.writes.open {
                    Some(gid) => gid,
                    None => {
                        let gid = self.new_group(true, WriteState::Open);
                        self.writes.open = Some(gid);
                        let _ = self.env.tx.send(Msg::Wake);
                        gid
                    }
                }
            };
            let g = self.groups.get_mut(&gid).expect("just made");
            g.add(eid, planned);
            entry.group = Some(gid);
            if matches!(g.write, WriteState::Open) && g.planned >= pack_extent_bytes {
                self.seal_open();
            }
        }
        self.tensors.insert(eid, entry, self.env.cfg.dedup);
        self.writes.offloaded(now);
        Ok(self.new_handle(eid))
    }

    fn new_handle(&mut self, eid: u64) -> Handle {
        let h = self.id();
        self.tensors.add_handle(h, eid)
    }

    fn new_group(&mut self, staged: bool, write: WriteState) -> u64 {
        let gid = self.id();
        self.groups.insert(gid, Group::new(staged, write));
        gid
    }

    /// Closes the open packed group and queues its write.
    pub(crate) fn seal_open(&mut self) {
        if let Some(gid) = self.writes.open.take() {
            if let Some(g) = self.groups.get_mut(&gid) {
                g.write = WriteState::Queued;
                self.writes.queue.push_back(gid);
            }
        }
    }

    /// Queues a read-ahead of the handle's extent. Requests are served in the order made:
    /// when the queue reaches one, its extent is read into staging (or, already there, kept)
    /// until the handle is fetched; for a lone request, only the tensor's slot of it.
    pub(crate) fn prefetch(&mut self, h: Handle) -> Result<()> {
        let e = self.tensors.entry_by_handle(h)?;
        if e.source_held {
            return Ok(()); // a fetch will be forwarded from the tensor's own memory
        }
        let Some(gid) = e.group else { return Ok(()) };
        let g = &self.groups[&gid];
        if !matches!(g.write, WriteState::Done) || g.len > self.env.cfg.prefetch_bytes {
            return Ok(()); // too large to read ahead: fetch reads it straight into place
        }
        self.reads.request(h.0, gid);
        Ok(())
    }

    /// Ties the handle's prefetch request to the group's current load.
    pub(crate) fn attach(&mut self, h: u64, gid: u64) {
        let (Some(g), Some(rec)) = (self.groups.get_mut(&gid), self.tensors.handle_mut(h)) else {
            return;
        };
        if rec.attached_load != g.load_epoch {
            rec.attached_load = g.load_epoch;
            g.pending += 1;
        }
    }

    /// The handle no longer waits on the group's loaded copy (fetched or released); the
    /// copy goes when nothing attached to it is left.
    fn detach(&mut self, h: Handle, gid: u64) {
        let (Some(g), Some(rec)) = (self.groups.get_mut(&gid), self.tensors.handle_mut(h.0)) else {
            return;
        };
        if rec.attached_load == 0 || rec.attached_load != g.load_epoch {
            return;
        }
        rec.attached_load = 0;
        g.pending = g.pending.saturating_sub(1);
        if g.pending == 0 && matches!(g.load, LoadState::Loaded(_)) {
            self.unload(gid);
        }
    }

    /// Plans the fetch of `h` into `dst`. `dst_free` is the event after which nothing
    /// else uses `dst`: copies on the fetch stream wait for it, and reads straight from
    /// storage start only once it has completed.
    pub(crate) fn fetch(
        &mut self,
        h: Handle,
        dst: &[Region],
        dst_free: Option<&Arc<dyn Event>>,
    ) -> Result<FetchPlan> {
        let eid = self.tensors.entry_of(h)?;
        let (len, source_held, group) = {
            let e = &self.tensors.entries[&eid];
            (e.len, e.source_held, e.group)
        };
        let want = layout::total_len(dst);
        if want != len {
            return Err(Error::invalid(format!(
                "fetch destination holds {want} bytes but the tensor has {len}: pass regions totalling exactly the offloaded size"
            )));
        }
        if let Some(ev) = dst_free {
            self.env.fetch_stream.wait_event(ev.as_ref())?;
        }
        let stats = self.env.stats.clone();
        if len == 0 {
            // Nothing to move; counted as served from the tensor's (empty) memory.
            let ev: Arc<dyn Event> = Arc::from(self.env.fetch_stream.record()?);
            self.after_fetch(h, eid);
            Stats::add(&stats.c.forwarded_fetches, 1);
            return Ok(FetchPlan::Done(ev));
        }
        if source_held {
            let ev = self.forward(eid, dst)?;
            self.after_fetch(h, eid);
            Stats::add(&stats.c.forwarded_fetches, 1);
            Stats::add(&stats.c.forwarded_bytes, len);
            return Ok(FetchPlan::Done(ev));
        }
        let gid = group.expect("a tensor not held in its own memory is on storage");
        let load = self.groups[&gid].load;
        let slot = self.tensors.handle(h.0).map_or(0, |rec| rec.slot);
        match load {
            LoadState::Loaded(staging) => {
                let ev = self.unpack(eid, gid, staging, dst)?;
                self.after_fetch(h, eid);
                Stats::add(&stats.c.prefetch_hits, 1);
                Ok(FetchPlan::Done(ev))
            }
            // The tensor's own bytes, read ahead for its lone prefetch request.
            _ if slot != 0 => match self.reads.slots[&slot].state {
                SlotState::Loading => Ok(FetchPlan::WaitLoad),
                SlotState::Loaded => {
                    let ev = self.unpack_slot(eid, slot, dst)?;
                    self.after_fetch(h, eid);
                    Stats::add(&stats.c.prefetch_hits, 1);
                    Ok(FetchPlan::Done(ev))
                }
            },
            LoadState::Loading(_) => Ok(FetchPlan::WaitLoad),
            LoadState::Idle => {
                if let Some(ev) = dst_free {
                    if !ev.query()? {
                        return Ok(FetchPlan::WaitDestination(ev.clone()));
                    }
                }
                let (ios, failed) = self.demand_read(eid, gid, dst);
                if ios.is_empty() {
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                let check = self.groups[&gid]
                    .extent
                    .and_then(|extent| DemandCheck::of(&self.env, &self.tensors.entries[&eid], extent));
                self.reads.demand_started();
                self.after_fetch(h, eid);
                Stats::add(&stats.c.demand_reads, 1);
                Ok(FetchPlan::Read(ios, failed, check))
            }
        }
    }

    /// Copies a tensor from its own memory to `dst` on the fetch stream.
    fn forward(&mut self, eid: u64, dst: &[Region]) -> Result<Arc<dyn Event>> {
        let _span = tracing::trace_span!("forward", entry = eid).entered();
        let start = Instant::now();
        let env = &self.env;
        let e = &self.tensors.entries[&eid];
        if let Some(ready) = &e.ready {
            env.fetch_stream.wait_event(ready.as_ref())?;
        }
        for step in layout::copy_plan(&layout::segments_of(&e.regions), dst) {
            // SAFETY: the source is held (the caller keeps it until the engine lets go) and
            // the destination is the caller's, valid until the returned event completes
            // (Engine::fetch's contract).
            unsafe { env.fetch_stream.copy_d2d(step.dst, step.src, step.len as usize)? };
        }
        let ev: Arc<dyn Event> = Arc::from(env.fetch_stream.record()?);
        let len = e.len;
        self.tensors.entries.get_mut(&eid).expect("live").source_fence = Some(ev.clone());
        self.env
            .timeline
            .record(Track::Deliver, "forward", start, Instant::now(), len);
        Ok(ev)
    }

    /// Copies a tensor out of its group's loaded staging copy to `dst`.
    fn unpack(&mut self, eid: u64, gid: u64, staging: Extent, dst: &[Region]) -> Result<Arc<dyn Event>> {
        let _span = tracing::trace_span!("unpack", entry = eid, group = gid).entered();
        let base = self.staging.ptr(staging);
        let len = self.groups[&gid].len;
        // SAFETY: the loaded copy stays allocated until the fence recorded here completes
        // (unload frees it after its `fence`).
        let ev = unsafe { self.copy_out(eid, base, 0, len, dst)? };
        self.groups.get_mut(&gid).expect("live").fence = Some(ev.clone());
        Ok(ev)
    }

    /// Copies a tensor out of the slot `sid` read ahead for it to `dst`.
    fn unpack_slot(&mut self, eid: u64, sid: u64, dst: &[Region]) -> Result<Arc<dyn Event>> {
        let _span = tracing::trace_span!("unpack_slot", entry = eid, slot = sid).entered();
        let slot = &self.reads.slots[&sid];
        let (base, start, len) = (self.staging.ptr(slot.staging), slot.start, slot.len);
        // SAFETY: the slot's staging stays allocated until the fence recorded here completes
        // (drop_slot frees it after its `fence`).
        let ev = unsafe { self.copy_out(eid, base, start, len, dst)? };
        self.reads.slots.get_mut(&sid).expect("live").fence = Some(ev.clone());
        Ok(ev)
    }

    /// Copies tensor `eid` to `dst` on the fetch stream, out of a staging copy at `base` of
    /// `len` bytes of its extent from offset `origin` on; returns the copy's event.
    ///
    /// # Safety
    /// The staging copy must cover the tensor's segments and stay allocated, unwritten,
    /// until the returned event completes.
    unsafe fn copy_out(
        &self,
        eid: u64,
        base: DevicePtr,
        origin: u64,
        len: u64,
        dst: &[Region],
    ) -> Result<Arc<dyn Event>> {
        let start = Instant::now();
        let env = &self.env;
        let e = &self.tensors.entries[&eid];
        let plan = layout::copy_plan(&e.segments, dst);
        if plan.len() <= 4 {
            for step in &plan {
                // SAFETY: the staging copy is kept as the caller promises; dst is the
                // caller's (Engine::fetch's contract).
                unsafe {
                    env.fetch_stream
                        .copy_d2d(step.dst, base + (step.src - origin), step.len as usize)?
                };
            }
        } else {
            let pieces: Vec<_> = plan
                .iter()
                .map(|s| crate::pack::PackPiece {
                    mem: s.dst,
                    offset: s.src - origin,
                    len: s.len,
                })
                .collect();
            // SAFETY: as above.
            unsafe { env.device.unpack(env.fetch_stream.as_ref(), base, len, &pieces)? };
        }
        let ev: Arc<dyn Event> = Arc::from(env.fetch_stream.record()?);
        env.timeline
            .record(Track::Deliver, "unpack", start, Instant::now(), e.len);
        Ok(ev)
    }

    /// Submits the reads of a tensor from storage straight into `dst`. Stops at the first
    /// submission that fails; the reads already submitted must still be waited for.
    fn demand_read(&mut self, eid: u64, gid: u64, dst: &[Region]) -> (Vec<PendingIo>, Option<Error>) {
        let _span = tracing::debug_span!("demand_read", group = gid).entered();
        let env = &self.env;
        let e = &self.tensors.entries[&eid];
        let g = &self.groups[&gid];
        let extent = g.extent.expect("a written group has an extent");
        let path = env.path(extent.target);
        let mut ios = Vec::new();
        // Each step straight into place, large ones cut into pieces the backend's threads
        // share.
        let pieces = layout::copy_plan(&e.segments, dst).into_iter().flat_map(|step| {
            let offset = extent.offset + step.src;
            layout::cut_at_multiples(offset, step.len, env.cfg.io_split_unit())
                .into_iter()
                .map(move |(skip, len)| (offset + skip, step.dst + skip, len))
        });
        for (offset, ptr, len) in pieces {
            let req = crate::backend::IoRequest {
                target: extent.target,
                op: crate::backend::IoOp::Read,
                offset,
                mem: crate::memory::MemRef::Device {
                    ptr,
                    len: len as usize,
                },
            };
            // SAFETY: dst is the caller's and stays valid until fetch returns, which waits
            // for these reads to settle (Engine::fetch's contract).
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
                Err(e) => return (ios, Some(e)),
            }
            Stats::add(&env.stats.c.bytes_read, len);
        }
        (ios, None)
    }

    /// Marks the handle fetched; drops a write nobody will read back.
    fn after_fetch(&mut self, h: Handle, eid: u64) {
        let stats = self.env.stats.clone();
        let at = self.reads.fetched();
        // Its prefetch requests still queued are overtaken.
        self.tensors.mark_fetched(h, at);
        let e = &self.tensors.entries[&eid];
        Stats::add(&stats.c.fetches, 1);
        Stats::add(&stats.c.fetch_bytes, e.len);
        if let Some(gid) = e.group {
            self.detach(h, gid);
        }
        self.drop_slot(h.0);
        // Every handle has read it from the tensor's own memory: a write that has not
        // started is no longer needed. The memory stays with the engine until release.
        let e = &self.tensors.entries[&eid];
        if e.unfetched == 0 && e.source_held {
            if let Some(gid) = e.group {
                if self.groups[&gid].write_pending() {
                    self.remove_from_group(eid, gid);
                    let e = self.tensors.entries.get_mut(&eid).expect("live");
                    e.group = None;
                    Stats::add(&stats.c.cancelled_tensors, 1);
                    Stats::add(&stats.c.cancelled_bytes, e.len);
                }
            }
        }
    }

    /// Takes an entry out of a group whose write has not started.
    fn remove_from_group(&mut self, eid: u64, gid: u64) {
        let planned = self.tensors.entries[&eid].planned(self.env.cfg.alignment);
        let g = self.groups.get_mut(&gid).expect("live");
        g.remove(eid, planned);
        if g.entries.is_empty() {
            if self.writes.open == Some(gid) {
                self.writes.open = None;
            }
            // A queued group is dropped when it reaches the head of the write queue.
            if matches!(g.write, WriteState::Open) {
                self.groups.remove(&gid);
            }
        }
    }

    /// Drops one handle.
    pub(crate) fn release(&mut self, h: Handle) -> Result<()> {
        let eid = self.tensors.entry_of(h)?;
        if let Some(gid) = self.tensors.entries[&eid].group {
            self.detach(h, gid); // a released handle no longer waits on a loaded copy
        }
        self.drop_slot(h.0);
        if let Some(eid) = self.tensors.remove_handle(h)? {
            self.drop_entry(eid);
        }
        Ok(())
    }

    /// The last handle of an entry is gone.
    fn drop_entry(&mut self, eid: u64) {
        let group = self.tensors.entries[&eid].group;
        match group {
            Some(gid) if self.groups[&gid].write_pending() => {
                self.remove_from_group(eid, gid);
                Stats::add(&self.env.stats.c.cancelled_tensors, 1);
                Stats::add(&self.env.stats.c.cancelled_bytes, self.tensors.entries[&eid].len);
                self.forget_entry(eid);
            }
            Some(gid) => {
                let g = self.groups.get_mut(&gid).expect("live");
                g.live -= 1;
                let write_done = matches!(g.write, WriteState::Done);
                if write_done {
                    self.forget_entry(eid);
                    self.maybe_free_group(gid);
                }
                // Otherwise the write completion forgets it (its memory is still being read).
            }
            None => self.forget_entry(eid),
        }
    }

    /// Removes an entry, handing its memory back to the caller once no engine copy reads it.
    pub(crate) fn forget_entry(&mut self, eid: u64) {
        if let Some(mut e) = self.tensors.entries.remove(&eid) {
            if e.source_held {
                self.release_source(&mut e);
            }
        }
    }

    /// The engine no longer needs the tensor's own memory.
    pub(crate) fn release_source(&mut self, e: &mut Entry) {
        let (callbacks, fence) = e.let_go();
        match fence {
            Some(fence) if !fence.query().unwrap_or(true) => {
                self.env
                    .tell_after(&self.env.fetch_waiter, fence.clone(), |_| Msg::Fence);
                self.callbacks.after_fence(callbacks, fence);
            }
            _ => self.callbacks.all_due(callbacks),
        }
    }

    /// Gives an extent's storage space back, telling the backend its bytes are not needed
    /// (a host tier in front of storage then drops them instead of writing them out).
    pub(crate) fn free_storage(&mut self, extent: Extent) {
        self.space.free(extent, self.env.backend.as_ref());
    }

    /// Frees a group's storage (and staging) once no live tensor is in it.
    pub(crate) fn maybe_free_group(&mut self, gid: u64) {
        let g = &self.groups[&gid];
        if g.live > 0 || !matches!(g.write, WriteState::Done) {
            return;
        }
        if matches!(g.load, LoadState::Loading(_)) || g.slot_reads > 0 {
            return; // freed when the reads complete
        }
        self.unload(gid);
        let g = self.groups.remove(&gid).expect("live");
        if let Some(extent) = g.extent {
            self.free_storage(extent);
        }
    }

    /// Every source-release callback not run yet, taken: the engine is going away, and
    /// nothing reads any tensor's memory any more.
    pub(crate) fn take_all_callbacks(&mut self) -> Vec<SourceFreeFn> {
        let mut due = self.callbacks.take_all();
        due.extend(self.tensors.take_callbacks());
        due
    }
}
