//! The engine's bookkeeping: handles, tensors ("entries"), the extents they are grouped
//! into ("groups"), and what the caller-facing operations do to them. The I/O side —
//! starting writes and prefetches, completions, staging memory — is in `io.rs`.
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
//!    from staging if the extent was prefetched, and otherwise reads storage itself.
//! 5. `release` of the last handle frees everything; a write not yet started is dropped.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, TargetId};
use crate::checksum::{Plan, Sums};
use crate::device::{Device, Event, PendingChecksums, Stream};
use crate::error::{Error, Result};
use crate::extents::{Extent, ExtentAllocator};
use crate::memory::DeviceBuffer;

use super::config::EngineConfig;
use super::layout::{self, Region, Segment};
use super::pending::PendingIo;
use super::stats::Stats;
use super::timeline::{Timeline, Track};
use super::verify::DemandCheck;
use super::waiter::Waiter;
use super::{Handle, TensorKey};

/// Called once the engine no longer reads a tensor's own memory.
pub(crate) type SourceFreeFn = Box<dyn FnOnce() + Send>;

/// Messages to the progress thread.
pub(crate) enum Msg {
    /// A write of the group completed.
    WriteIo(u64),
    /// A prefetch read of the group completed.
    ReadIo(u64),
    /// The offload stream has packed the group (or its producers are done): submit writes.
    Prepared(u64, Result<()>),
    /// The checksums of a prefetched extent's bytes have been computed: check them.
    Verified(u64, Result<()>),
    /// A fence event completed: deferred frees may proceed.
    Fence,
    /// A packed extent was opened: the progress thread must time its flush.
    Wake,
    /// Stop the progress thread.
    Shutdown,
}

/// One offload's claim on an entry.
pub(crate) struct HandleRec {
    pub(crate) entry: u64,
    pub(crate) fetched: bool,
    /// The load of its group its prefetch request is attached to (0: none).
    pub(crate) attached_load: u64,
    /// When it was last fetched (a [`State::seq`] value): prefetch requests made before
    /// that were overtaken and are dropped.
    pub(crate) fetched_at: u64,
}

/// One `prefetch` call, waiting in the prefetch queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PrefetchRequest {
    pub(crate) handle: u64,
    pub(crate) group: u64,
    /// When it was made (a [`State::seq`] value).
    pub(crate) at: u64,
}

/// One stored tensor (one key), shared by its handles.
pub(crate) struct Entry {
    pub(crate) key: TensorKey,
    pub(crate) len: u64,
    /// The tensor's own memory, read until the write is done.
    pub(crate) regions: Vec<Region>,
    /// The producer's event: the memory is ready once it completes.
    pub(crate) ready: Option<Arc<dyn Event>>,
    /// Live handles.
    pub(crate) handles: usize,
    /// Live handles not yet fetched.
    pub(crate) unfetched: usize,
    /// The group it is written in; `None` when kept resident (no storage copy).
    pub(crate) group: Option<u64>,
    /// Where its bytes are inside the group's extent (set when the group is laid out).
    pub(crate) segments: Vec<Segment>,
    /// Whether the engine may still read `regions`.
    pub(crate) source_held: bool,
    /// The last engine copy out of `regions` (a forwarded fetch). Kept after the source is
    /// let go, until it completes: the memory is free only then.
    pub(crate) source_fence: Option<Arc<dyn Event>>,
    pub(crate) callbacks: Vec<SourceFreeFn>,
    pub(crate) offloaded_at: Instant,
    /// The checksums of its bytes, once its write has been prepared (`checksums` on).
    pub(crate) sums: Option<Sums>,
}

/// Write progress of a group.
#[derive(Debug)]
pub(crate) enum WriteState {
    /// Packed group still taking tensors.
    Open,
    /// Sealed, waiting for staging memory or write bandwidth.
    Queued,
    /// Extent allocated; the offload stream is packing it / waiting for its producers.
    Preparing,
    /// Writes submitted.
    Writing,
    /// On storage.
    Done,
}

/// Read-ahead progress of a group.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LoadState {
    Idle,
    /// Being read into `staging`.
    Loading(Extent),
    /// In `staging`, waiting for its tensors to be fetched.
    Loaded(Extent),
}

/// One extent on storage and the tensors in it.
pub(crate) struct Group {
    /// Written from staging after a pack; otherwise straight from the tensor's memory.
    pub(crate) staged: bool,
    pub(crate) entries: Vec<u64>,
    /// Bytes the group takes if laid out now.
    pub(crate) planned: u64,
    pub(crate) write: WriteState,
    /// Staging used by the write.
    pub(crate) write_staging: Option<Extent>,
    pub(crate) extent: Option<Extent>,
    pub(crate) len: u64,
    /// Entries with live handles (counted from layout on).
    pub(crate) live: usize,
    pub(crate) load: LoadState,
    /// Prefetch requests attached to the current load and not yet fetched: the loaded
    /// copy goes when they are all served (or released).
    pub(crate) pending: usize,
    /// Identifies the current load (unique per load), for [`HandleRec::attached_load`].
    pub(crate) load_epoch: u64,
    /// The group's storage requests in flight: its writes, or the read of its load.
    pub(crate) ios: Vec<PendingIo>,
    /// The first failure among the group's writes (a submission, or a completion while
    /// others were in flight): acted on once none is in flight any more.
    pub(crate) io_error: Option<Error>,
    pub(crate) io_started: Instant,
    /// The last delivery out of the loaded staging copy.
    pub(crate) fence: Option<Arc<dyn Event>>,
    /// Checksums being computed: of the tensors' memory while the write is prepared, or of
    /// the loaded bytes before the load counts as done.
    pub(crate) checksums: Option<PendingSums>,
}

/// Checksums queued on a stream for some of a group's tensors.
pub(crate) struct PendingSums {
    pub(crate) pending: PendingChecksums,
    pub(crate) plan: Plan,
    /// The tensors, in the order they were added to `plan`.
    pub(crate) entries: Vec<u64>,
}

impl Group {
    pub(crate) fn new(staged: bool, write: WriteState) -> Self {
        Group {
            staged,
            entries: Vec::new(),
            planned: 0,
            write,
            write_staging: None,
            extent: None,
            len: 0,
            live: 0,
            load: LoadState::Idle,
            pending: 0,
            load_epoch: 0,
            ios: Vec::new(),
            io_error: None,
            io_started: Instant::now(),
            fence: None,
            checksums: None,
        }
    }

    /// True while the write has not been started (and so can still be dropped).
    pub(crate) fn write_pending(&self) -> bool {
        matches!(self.write, WriteState::Open | WriteState::Queued)
    }
}

/// Everything the engine knows, behind its lock.
pub(crate) struct State {
    pub(crate) cfg: EngineConfig,
    pub(crate) device: Arc<dyn Device>,
    pub(crate) backend: Arc<dyn Backend>,
    /// The path of each storage target, for errors.
    pub(crate) paths: HashMap<TargetId, Arc<Path>>,
    pub(crate) offload_stream: Arc<dyn Stream>,
    pub(crate) fetch_stream: Arc<dyn Stream>,
    pub(crate) offload_waiter: Waiter,
    pub(crate) fetch_waiter: Waiter,
    pub(crate) tx: Sender<Msg>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) timeline: Arc<Timeline>,
    pub(crate) next_id: u64,
    pub(crate) handles: HashMap<u64, HandleRec>,
    pub(crate) entries: HashMap<u64, Entry>,
    pub(crate) by_key: HashMap<TensorKey, u64>,
    pub(crate) groups: HashMap<u64, Group>,
    pub(crate) open: Option<u64>,
    pub(crate) last_offload: Instant,
    pub(crate) write_queue: VecDeque<u64>,
    pub(crate) prefetch_queue: VecDeque<PrefetchRequest>,
    /// Orders prefetch requests against fetches.
    pub(crate) seq: u64,
    /// Loaded groups, oldest first (eviction order).
    pub(crate) loaded: VecDeque<u64>,
    pub(crate) storage: ExtentAllocator,
    pub(crate) staging: ExtentAllocator,
    pub(crate) staging_buf: DeviceBuffer,
    pub(crate) staging_used: u64,
    /// Staging extents to free once their fence completes.
    pub(crate) fenced_staging: Vec<(Extent, Arc<dyn Event>)>,
    /// Source releases waiting for their fence.
    pub(crate) fenced_sources: Vec<(Vec<SourceFreeFn>, Arc<dyn Event>)>,
    /// Callbacks to run once the lock is released.
    pub(crate) due_callbacks: Vec<SourceFreeFn>,
    pub(crate) direct_inflight: u64,
    pub(crate) prefetch_held: u64,
    /// Groups between allocation and write completion.
    pub(crate) writes_inflight: usize,
    pub(crate) loads_inflight: usize,
    pub(crate) demand_reads_inflight: usize,
    /// When packing started waiting for staging memory.
    pub(crate) staging_wait_since: Option<Instant>,
    /// Storage was found full at the last allocation (the warning is given once).
    pub(crate) storage_full: bool,
    /// The last write to end failed with ENOSPC (the warning is given once).
    pub(crate) device_full: bool,
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
        Stats::add(&self.stats.c.offloads, 1);
        Stats::add(&self.stats.c.offload_bytes, len);
        if self.cfg.dedup {
            if let Some(&eid) = self.by_key.get(&key) {
                let e = self.entries.get_mut(&eid).expect("by_key names live entries");
                let same = e.len == len
                    && e.regions
                        .iter()
                        .copied()
                        .eq(regions.iter().copied().filter(|r| r.len > 0));
                if !same {
                    return Err(Error::invalid(format!(
                        "storage {} version {} was offloaded before with other memory ({} bytes in {} regions, now {len} \
                         bytes in {}): offload a storage whole under its key, and give it a new version when its \
                         contents change",
                        key.storage,
                        key.version,
                        e.len,
                        e.regions.len(),
                        regions.len()
                    )));
                }
                e.handles += 1;
                e.unfetched += 1;
                if let Some(cb) = on_source_free {
                    if e.source_held {
                        e.callbacks.push(cb);
                    } else if let Some(fence) = e.source_fence.clone() {
                        // A forwarded copy may still read the memory: freed with it.
                        self.fenced_sources.push((vec![cb], fence));
                    } else {
                        self.due_callbacks.push(cb);
                    }
                }
                Stats::add(&self.stats.c.dedup_hits, 1);
                Stats::add(&self.stats.c.dedup_bytes, len);
                return Ok(self.new_handle(eid));
            }
        }
        let eid = self.id();
        let mut entry = Entry {
            key,
            len,
            regions: regions.iter().copied().filter(|r| r.len > 0).collect(),
            ready,
            handles: 1,
            unfetched: 1,
            group: None,
            segments: Vec::new(),
            source_held: len > 0,
            source_fence: None,
            callbacks: Vec::new(),
            offloaded_at: now,
            sums: None,
        };
        match on_source_free {
            Some(cb) if entry.source_held => entry.callbacks.push(cb),
            Some(cb) => self.due_callbacks.push(cb),
            None => {}
        }
        let planned = layout::place(&entry.regions, 0, self.cfg.alignment).1;
        if len > 0 {
            // Without packing, every tensor is written straight from its own memory. The
            // threshold applies to the tensor's aligned footprint, so a packed extent never
            // outgrows pack_extent_bytes (and so the staging memory).
            let gid = if planned >= self.cfg.pack_threshold || !self.cfg.pack {
                let gid = self.new_group(false, WriteState::Queued);
                self.write_queue.push_back(gid);
                gid
            } else {
                // A tensor that would overflow the open extent goes to the next one.
                if let Some(gid) = self.open {
                    let g = &self.groups[&gid];
                    if !g.entries.is_empty() && g.planned + planned > self.cfg.pack_extent_bytes {
                        self.seal_open();
                    }
                }
                match self.open {
                    Some(gid) => gid,
                    None => {
                        let gid = self.new_group(true, WriteState::Open);
                        self.open = Some(gid);
                        let _ = self.tx.send(Msg::Wake);
                        gid
                    }
                }
            };
            let g = self.groups.get_mut(&gid).expect("just made");
            g.entries.push(eid);
            g.planned += planned;
            entry.group = Some(gid);
            if matches!(g.write, WriteState::Open) && g.planned >= self.cfg.pack_extent_bytes {
                self.seal_open();
            }
        }
        self.entries.insert(eid, entry);
        if self.cfg.dedup {
            self.by_key.insert(key, eid);
        }
        self.last_offload = now;
        Ok(self.new_handle(eid))
    }

    fn new_handle(&mut self, eid: u64) -> Handle {
        let h = self.id();
        self.handles.insert(
            h,
            HandleRec {
                entry: eid,
                fetched: false,
                attached_load: 0,
                fetched_at: 0,
            },
        );
        Handle(h)
    }

    fn new_group(&mut self, staged: bool, write: WriteState) -> u64 {
        let gid = self.id();
        self.groups.insert(gid, Group::new(staged, write));
        gid
    }

    /// Closes the open packed group and queues its write.
    pub(crate) fn seal_open(&mut self) {
        if let Some(gid) = self.open.take() {
            if let Some(g) = self.groups.get_mut(&gid) {
                g.write = WriteState::Queued;
                self.write_queue.push_back(gid);
            }
        }
    }

    pub(crate) fn entry_of(&self, h: Handle) -> Result<u64> {
        self.handles.get(&h.0).map(|r| r.entry).ok_or_else(|| unknown(h))
    }

    /// Queues a read-ahead of the handle's extent. Requests are served in the order made:
    /// when the queue reaches one, its extent is read into staging (or, already there, kept)
    /// until the handle is fetched.
    pub(crate) fn prefetch(&mut self, h: Handle) -> Result<()> {
        let eid = self.entry_of(h)?;
        let e = &self.entries[&eid];
        if e.source_held {
            return Ok(()); // a fetch will be forwarded from the tensor's own memory
        }
        let Some(gid) = e.group else { return Ok(()) };
        let g = &self.groups[&gid];
        if !matches!(g.write, WriteState::Done) || g.len > self.cfg.prefetch_bytes {
            return Ok(()); // too large to read ahead: fetch reads it straight into place
        }
        self.seq += 1;
        self.prefetch_queue.push_back(PrefetchRequest {
            handle: h.0,
            group: gid,
            at: self.seq,
        });
        Ok(())
    }

    /// Ties the handle's prefetch request to the group's current load.
    pub(crate) fn attach(&mut self, h: u64, gid: u64) {
        let (Some(g), Some(rec)) = (self.groups.get_mut(&gid), self.handles.get_mut(&h)) else {
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
        let (Some(g), Some(rec)) = (self.groups.get_mut(&gid), self.handles.get_mut(&h.0)) else {
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
        let eid = self.entry_of(h)?;
        let (len, source_held, group) = {
            let e = &self.entries[&eid];
            (e.len, e.source_held, e.group)
        };
        let want = layout::total_len(dst);
        if want != len {
            return Err(Error::invalid(format!(
                "fetch destination holds {want} bytes but the tensor has {len}: pass regions totalling exactly the offloaded size"
            )));
        }
        if let Some(ev) = dst_free {
            self.fetch_stream.wait_event(ev.as_ref())?;
        }
        if len == 0 {
            // Nothing to move; counted as served from the tensor's (empty) memory.
            let ev: Arc<dyn Event> = Arc::from(self.fetch_stream.record()?);
            self.after_fetch(h, eid);
            Stats::add(&self.stats.c.forwarded_fetches, 1);
            return Ok(FetchPlan::Done(ev));
        }
        if source_held {
            let ev = self.forward(eid, dst)?;
            self.after_fetch(h, eid);
            Stats::add(&self.stats.c.forwarded_fetches, 1);
            Stats::add(&self.stats.c.forwarded_bytes, len);
            return Ok(FetchPlan::Done(ev));
        }
        let gid = group.expect("a tensor not held in its own memory is on storage");
        let load = self.groups[&gid].load;
        match load {
            LoadState::Loaded(staging) => {
                let ev = self.unpack(eid, gid, staging, dst)?;
                self.after_fetch(h, eid);
                Stats::add(&self.stats.c.prefetch_hits, 1);
                Ok(FetchPlan::Done(ev))
            }
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
                let check = self.demand_check(eid, gid);
                self.demand_reads_inflight += 1;
                self.after_fetch(h, eid);
                Stats::add(&self.stats.c.demand_reads, 1);
                Ok(FetchPlan::Read(ios, failed, check))
            }
        }
    }

    /// Copies a tensor from its own memory to `dst` on the fetch stream.
    fn forward(&mut self, eid: u64, dst: &[Region]) -> Result<Arc<dyn Event>> {
        let _span = tracing::trace_span!("forward", entry = eid).entered();
        let start = Instant::now();
        let e = &self.entries[&eid];
        if let Some(ready) = &e.ready {
            self.fetch_stream.wait_event(ready.as_ref())?;
        }
        for step in layout::copy_plan(&layout::segments_of(&e.regions), dst) {
            // SAFETY: the source is held (the caller keeps it until the engine lets go) and
            // the destination is the caller's, valid until the returned event completes
            // (Engine::fetch's contract).
            unsafe {
                self.fetch_stream
                    .copy_d2d(step.dst, step.src, step.len as usize)?
            };
        }
        let ev: Arc<dyn Event> = Arc::from(self.fetch_stream.record()?);
        let len = e.len;
        self.entries.get_mut(&eid).expect("live").source_fence = Some(ev.clone());
        self.timeline
            .record(Track::Deliver, "forward", start, Instant::now(), len);
        Ok(ev)
    }

    /// Copies a tensor out of its group's loaded staging copy to `dst`.
    fn unpack(&mut self, eid: u64, gid: u64, staging: Extent, dst: &[Region]) -> Result<Arc<dyn Event>> {
        let _span = tracing::trace_span!("unpack", entry = eid, group = gid).entered();
        let start = Instant::now();
        let e = &self.entries[&eid];
        let base = self.staging_buf.ptr() + staging.offset;
        let plan = layout::copy_plan(&e.segments, dst);
        if plan.len() <= 4 {
            for step in &plan {
                // SAFETY: the staging copy stays allocated until the fence recorded below
                // completes; dst is the caller's (Engine::fetch's contract).
                unsafe {
                    self.fetch_stream
                        .copy_d2d(step.dst, base + step.src, step.len as usize)?
                };
            }
        } else {
            let pieces: Vec<_> = plan
                .iter()
                .map(|s| crate::pack::PackPiece {
                    mem: s.dst,
                    offset: s.src,
                    len: s.len,
                })
                .collect();
            let g = &self.groups[&gid];
            // SAFETY: as above.
            unsafe {
                self.device
                    .unpack(self.fetch_stream.as_ref(), base, g.len, &pieces)?
            };
        }
        let ev: Arc<dyn Event> = Arc::from(self.fetch_stream.record()?);
        self.groups.get_mut(&gid).expect("live").fence = Some(ev.clone());
        self.timeline
            .record(Track::Deliver, "unpack", start, Instant::now(), e.len);
        Ok(ev)
    }

    /// Submits the reads of a tensor from storage straight into `dst`. Stops at the first
    /// submission that fails; the reads already submitted must still be waited for.
    fn demand_read(&mut self, eid: u64, gid: u64, dst: &[Region]) -> (Vec<PendingIo>, Option<Error>) {
        let _span = tracing::debug_span!("demand_read", group = gid).entered();
        let e = &self.entries[&eid];
        let g = &self.groups[&gid];
        let extent = g.extent.expect("a written group has an extent");
        let path = self.path(extent.target);
        let mut ios = Vec::new();
        for step in layout::copy_plan(&e.segments, dst) {
            let req = crate::backend::IoRequest {
                target: extent.target,
                op: crate::backend::IoOp::Read,
                offset: extent.offset + step.src,
                mem: crate::memory::MemRef::Device {
                    ptr: step.dst,
                    len: step.len as usize,
                },
            };
            // SAFETY: dst is the caller's and stays valid until fetch returns, which waits
            // for these reads to settle (Engine::fetch's contract).
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
                Err(e) => return (ios, Some(e)),
            }
            Stats::add(&self.stats.c.bytes_read, step.len);
        }
        (ios, None)
    }

    /// The path of a storage target, for errors.
    pub(crate) fn path(&self, target: TargetId) -> Arc<Path> {
        self.paths
            .get(&target)
            .cloned()
            .unwrap_or_else(|| Arc::from(Path::new(&format!("<target {}>", target.0))))
    }

    /// Marks the handle fetched; drops a write nobody will read back.
    fn after_fetch(&mut self, h: Handle, eid: u64) {
        let first = match self.handles.get_mut(&h.0) {
            Some(rec) if !rec.fetched => {
                rec.fetched = true;
                true
            }
            _ => false,
        };
        let e = self.entries.get_mut(&eid).expect("live");
        Stats::add(&self.stats.c.fetches, 1);
        Stats::add(&self.stats.c.fetch_bytes, e.len);
        if first {
            e.unfetched -= 1;
        }
        if let Some(gid) = e.group {
            self.detach(h, gid);
        }
        self.seq += 1;
        if let Some(rec) = self.handles.get_mut(&h.0) {
            rec.fetched_at = self.seq; // its prefetch requests still queued are overtaken
        }
        // Every handle has read it from the tensor's own memory: a write that has not
        // started is no longer needed. The memory stays with the engine until release.
        let e = &self.entries[&eid];
        if e.unfetched == 0 && e.source_held {
            if let Some(gid) = e.group {
                if self.groups[&gid].write_pending() {
                    self.remove_from_group(eid, gid);
                    let e = self.entries.get_mut(&eid).expect("live");
                    e.group = None;
                    Stats::add(&self.stats.c.cancelled_tensors, 1);
                    Stats::add(&self.stats.c.cancelled_bytes, e.len);
                }
            }
        }
    }

    /// Takes an entry out of a group whose write has not started.
    fn remove_from_group(&mut self, eid: u64, gid: u64) {
        let planned = layout::place(&self.entries[&eid].regions, 0, self.cfg.alignment).1;
        let g = self.groups.get_mut(&gid).expect("live");
        g.entries.retain(|&x| x != eid);
        g.planned -= planned;
        if g.entries.is_empty() {
            if self.open == Some(gid) {
                self.open = None;
            }
            // A queued group is dropped when it reaches the head of the write queue.
            if matches!(g.write, WriteState::Open) {
                self.groups.remove(&gid);
            }
        }
    }

    /// Drops one handle.
    pub(crate) fn release(&mut self, h: Handle) -> Result<()> {
        let eid = self.entry_of(h)?;
        if let Some(gid) = self.entries[&eid].group {
            self.detach(h, gid); // a released handle no longer waits on a loaded copy
        }
        let rec = self.handles.remove(&h.0).ok_or_else(|| unknown(h))?;
        let e = self
            .entries
            .get_mut(&rec.entry)
            .expect("handles name live entries");
        e.handles -= 1;
        if !rec.fetched {
            e.unfetched -= 1;
        }
        if e.handles == 0 {
            self.drop_entry(rec.entry);
        }
        Ok(())
    }

    fn drop_entry(&mut self, eid: u64) {
        let (key, group) = {
            let e = &self.entries[&eid];
            (e.key, e.group)
        };
        if self.by_key.get(&key) == Some(&eid) {
            self.by_key.remove(&key);
        }
        match group {
            Some(gid) if self.groups[&gid].write_pending() => {
                self.remove_from_group(eid, gid);
                Stats::add(&self.stats.c.cancelled_tensors, 1);
                Stats::add(&self.stats.c.cancelled_bytes, self.entries[&eid].len);
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
        if let Some(mut e) = self.entries.remove(&eid) {
            if e.source_held {
                self.release_source(&mut e);
            }
        }
    }

    /// The engine no longer needs the tensor's own memory.
    pub(crate) fn release_source(&mut self, e: &mut Entry) {
        e.source_held = false;
        e.ready = None;
        let callbacks = std::mem::take(&mut e.callbacks);
        match e.source_fence.clone() {
            Some(fence) if !fence.query().unwrap_or(true) => {
                let tx = self.tx.clone();
                self.fetch_waiter.after(fence.clone(), move |_| {
                    let _ = tx.send(Msg::Fence);
                });
                self.fenced_sources.push((callbacks, fence));
            }
            _ => self.due_callbacks.extend(callbacks),
        }
    }

    /// Gives an extent's storage space back, telling the backend its bytes are not needed
    /// (a host tier in front of storage then drops them instead of writing them out).
    pub(crate) fn free_storage(&mut self, extent: Extent) {
        if let Err(e) = self.storage.free(extent) {
            tracing::error!("freeing extent {extent:?}: {e}");
        }
        self.backend.discard(extent.target, extent.offset, extent.len);
    }

    /// Frees a group's storage (and staging) once no live tensor is in it.
    pub(crate) fn maybe_free_group(&mut self, gid: u64) {
        let g = &self.groups[&gid];
        if g.live > 0 || !matches!(g.write, WriteState::Done) {
            return;
        }
        if matches!(g.load, LoadState::Loading(_)) {
            return; // freed when the read completes
        }
        self.unload(gid);
        let g = self.groups.remove(&gid).expect("live");
        if let Some(extent) = g.extent {
            self.free_storage(extent);
        }
    }
}

fn unknown(h: Handle) -> Error {
    Error::invalid(format!(
        "unknown handle {}: it was never returned by this engine's offload, or it was already released",
        h.0
    ))
}
