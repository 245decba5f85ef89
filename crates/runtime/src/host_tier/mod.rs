//! The host tier: [`HostTierBackend`], a bounded arena of pinned host memory in front of a
//! storage backend (its documentation says how it fills, spills and reads back).

mod index;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

use serde::Serialize;

use crate::backend::{
    ticket, Backend, BackendInfo, Completer, IoOp, IoRequest, TargetId, TargetInfo, Ticket,
};
use crate::device::{Device, Event, Stream};
use crate::engine::{Timeline, Track};
use crate::error::{Error, Result};
use crate::extents::{Extent, ExtentAllocator};
use crate::memory::{MemRef, PinnedBuffer};
use crate::target::Target;

use index::{Slot, SlotIndex, SlotState};

/// How large the host tier is and when it spills.
#[derive(Clone, Debug)]
pub struct HostTierConfig {
    /// Bytes of pinned host memory in the arena.
    pub bytes: u64,
    /// Alignment of the writes it takes (the engine's `alignment`); a power of two ≥ 512.
    pub align: u64,
    /// Fraction of the arena holding bytes not yet on storage above which spilling starts.
    pub spill_at: f64,
    /// Most bytes being spilled at once.
    pub spill_inflight_bytes: u64,
}

impl Default for HostTierConfig {
    fn default() -> Self {
        HostTierConfig {
            bytes: 0,
            align: 4096,
            spill_at: 0.5,
            spill_inflight_bytes: 256 << 20,
        }
    }
}

/// What the host tier has done, for reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HostTierStats {
    /// Bytes of the arena.
    pub capacity: u64,
    /// Bytes of the arena in use now (live slots and those still being used).
    pub used: u64,
    /// Of those, bytes not yet on storage (including copies under way).
    pub dirty: u64,
    /// Bytes written into the arena (device → host copies).
    pub bytes_in: u64,
    /// Time the device copies into the arena took, summed (ns).
    pub copy_in_ns: u64,
    /// Writes that waited for room in the arena, and how long they waited in all (ns).
    pub waited_writes: u64,
    /// See `waited_writes`.
    pub wait_ns: u64,
    /// Bytes written straight to storage (host memory, or larger than the arena).
    pub bytes_through: u64,
    /// Bytes written from the arena to storage.
    pub bytes_spilled: u64,
    /// Time spills took, summed (ns).
    pub spill_ns: u64,
    /// Spills that failed (tried again later).
    pub spill_errors: u64,
    /// Bytes dropped from the arena to make room (they were on storage).
    pub bytes_evicted: u64,
    /// Bytes dropped because the caller discarded or overwrote them.
    pub bytes_discarded: u64,
    /// Bytes read out of the arena.
    pub bytes_read_arena: u64,
    /// Time the device copies out of the arena took, summed (ns).
    pub copy_out_ns: u64,
    /// Bytes read from storage through the tier (not in the arena).
    pub bytes_read_storage: u64,
}

#[derive(Default)]
struct Counters {
    bytes_in: AtomicU64,
    copy_in_ns: AtomicU64,
    waited_writes: AtomicU64,
    wait_ns: AtomicU64,
    bytes_through: AtomicU64,
    bytes_spilled: AtomicU64,
    spill_ns: AtomicU64,
    spill_errors: AtomicU64,
    bytes_evicted: AtomicU64,
    bytes_discarded: AtomicU64,
    bytes_read_arena: AtomicU64,
    copy_out_ns: AtomicU64,
    bytes_read_storage: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A write waiting for room in the arena.
struct WaitingWrite {
    req: IoRequest,
    done: Completer,
    /// When it started waiting (when `waited`).
    since: Instant,
    waited: bool,
}

/// Why the last spill failed.
struct SpillFailure {
    message: String,
    /// The storage was full: writes that cannot get room fail as [`Error::NoSpace`], which
    /// the engine answers by keeping their tensors in GPU memory.
    no_space: bool,
}

impl SpillFailure {
    fn of(e: &Error) -> Self {
        SpillFailure {
            message: e.to_string(),
            no_space: matches!(e, Error::NoSpace { .. }),
        }
    }
}

/// Everything under the tier's lock.
struct TierState {
    arena_space: ExtentAllocator,
    slots: SlotIndex,
    waiting: std::collections::VecDeque<WaitingWrite>,
    /// Bytes (arena lengths) of live slots not yet on storage.
    dirty: u64,
    /// Bytes being spilled now.
    spilling: u64,
    /// Device copies, spills and storage reads under way.
    in_flight: usize,
    /// The last spill failure not followed by a successful spill.
    spill_failure: Option<SpillFailure>,
    /// Targets being flushed: spill everything dirty, whatever the fill.
    flushing: usize,
    /// Dropping: nothing more is spilled.
    closing: bool,
    /// Storage tickets whose continuations are attached once the lock is released (one
    /// that completed already would run its continuation at once, which takes the lock).
    deferred: Vec<(Ticket, AfterIo)>,
    /// Paths of open targets, for messages.
    paths: std::collections::HashMap<TargetId, std::path::PathBuf>,
}

type Continuation = Box<dyn FnOnce(Result<()>) + Send>;

/// What runs once a storage request of the tier's completes.
type AfterIo = Box<dyn FnOnce(Result<usize>) + Send>;

/// The shared part: what completions on other threads reach.
struct Core {
    inner: Arc<dyn Backend>,
    config: HostTierConfig,
    arena: PinnedBuffer,
    in_stream: Arc<dyn Stream>,
    out_stream: Arc<dyn Stream>,
    in_events: Mutex<mpsc::Sender<(Arc<dyn Event>, Continuation)>>,
    out_events: Mutex<mpsc::Sender<(Arc<dyn Event>, Continuation)>>,
    state: Mutex<TierState>,
    changed: Condvar,
    counters: Counters,
    /// Where its copies and spills are recorded, once given ([`HostTierBackend::record_on`]).
    timeline: std::sync::OnceLock<Arc<Timeline>>,
}

/// A storage backend with a pinned host-memory tier in front: a bounded arena of pinned host memory.
///
/// [`HostTierBackend`] wraps any [`Backend`]. A write of device memory is taken into the
/// arena by one device copy (the GPU's copy engine reading the tensor, writing pinned host
/// memory) and completes as soon as that copy has: at the speed of the host link, not of
/// the storage, so the engine gives the tensor's memory back that much sooner. In the
/// background the arena is *spilled* to the inner backend, oldest bytes first, once more
/// than [`HostTierConfig::spill_at`] of it holds bytes not yet on storage; spilled bytes stay
/// in the arena (clean) until their space is wanted. A read is answered from the arena
/// where it holds the bytes (one device copy back) and from the inner backend for the rest.
///
/// When the arena is full, a write waits, inside the tier, for spills to make room (the
/// caller's ticket completes later); one larger than the whole arena goes straight to
/// storage. If spilling fails for good while writes wait, they fail with its error (the
/// engine then keeps those tensors in GPU memory): nothing hangs.
///
/// The caller tells the tier which bytes it no longer needs with [`Backend::discard`] (the
/// engine does when it frees an extent), so released tensors are never spilled.
///
/// # Alignment
/// Writes must start at multiples of [`HostTierConfig::align`], and the bytes from a
/// write's end to the next multiple are padding that no other write starts inside: the
/// engine lays its extents out that way (its `alignment` setting), and the tier then
/// answers reads of the padding from the arena too, so that reading a whole extent back
/// needs no storage access. Host-memory writes (`MemRef::Host`) pass through to storage.
pub struct HostTierBackend {
    core: Arc<Core>,
}

/// Starts a thread that waits for events in the order sent and runs each continuation.
fn event_thread(name: &str) -> Result<mpsc::Sender<(Arc<dyn Event>, Continuation)>> {
    let (tx, rx) = mpsc::channel::<(Arc<dyn Event>, Continuation)>();
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for (event, then) in rx {
                then(event.synchronize());
            }
        })
        .map_err(|e| Error::io(format!("starting the {name} thread"), e))?;
    Ok(tx)
}

impl HostTierBackend {
    /// Puts an arena of `config.bytes` pinned host memory of `device` in front of `inner`.
    pub fn new(inner: Arc<dyn Backend>, device: Arc<dyn Device>, config: HostTierConfig) -> Result<Self> {
        if config.bytes == 0 {
            return Err(Error::invalid("the host tier needs a size above 0 (host_tier)"));
        }
        if !config.align.is_power_of_two() || config.align < 512 {
            return Err(Error::invalid(format!(
                "the host tier's alignment must be a power of two of at least 512 bytes, not {}",
                config.align
            )));
        }
        if !(config.spill_at >= 0.0 && config.spill_at <= 1.0) {
            return Err(Error::invalid(format!(
                "the host tier's spill threshold must be a fraction between 0 and 1, not {}",
                config.spill_at
            )));
        }
        let len = usize::try_from(config.bytes).map_err(|_| {
            Error::invalid(format!(
                "host_tier of {} bytes does not fit this machine's addresses",
                config.bytes
            ))
        })?;
        let mut arena_space = ExtentAllocator::new(config.align)?;
        arena_space.add_target(TargetId(0), config.bytes)?;
        let arena = device.alloc_pinned(len).map_err(|e| match e {
            Error::OutOfMemory { .. } => Error::invalid(format!(
                "the host tier could not get {} bytes of pinned host memory ({e}): lower host_tier",
                config.bytes
            )),
            other => other,
        })?;
        let in_stream = device.create_stream()?;
        let out_stream = device.create_stream()?;
        let in_tx = event_thread("spillway-tier-in")?;
        let out_tx = event_thread("spillway-tier-out")?;
        let core = Arc::new(Core {
            inner,
            config,
            arena,
            in_stream,
            out_stream,
            in_events: Mutex::new(in_tx),
            out_events: Mutex::new(out_tx),
            state: Mutex::new(TierState {
                arena_space,
                slots: SlotIndex::default(),
                waiting: Default::default(),
                dirty: 0,
                spilling: 0,
                in_flight: 0,
                spill_failure: None,
                flushing: 0,
                closing: false,
                deferred: Vec::new(),
                paths: Default::default(),
            }),
            changed: Condvar::new(),
            counters: Counters::default(),
            timeline: std::sync::OnceLock::new(),
        });
        Ok(HostTierBackend { core })
    }

    /// The arena's size and what the tier has moved so far.
    pub fn stats(&self) -> HostTierStats {
        let c = &self.core.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let st = self.core.lock();
        HostTierStats {
            capacity: self.core.config.bytes,
            used: st.arena_space.usage().used,
            dirty: st.dirty,
            bytes_in: get(&c.bytes_in),
            copy_in_ns: get(&c.copy_in_ns),
            waited_writes: get(&c.waited_writes),
            wait_ns: get(&c.wait_ns),
            bytes_through: get(&c.bytes_through),
            bytes_spilled: get(&c.bytes_spilled),
            spill_ns: get(&c.spill_ns),
            spill_errors: get(&c.spill_errors),
            bytes_evicted: get(&c.bytes_evicted),
            bytes_discarded: get(&c.bytes_discarded),
            bytes_read_arena: get(&c.bytes_read_arena),
            copy_out_ns: get(&c.copy_out_ns),
            bytes_read_storage: get(&c.bytes_read_storage),
        }
    }

    /// The settings it runs with.
    pub fn config(&self) -> &HostTierConfig {
        &self.core.config
    }

    /// Records the tier's copies in and out and its spills on `timeline` (the engine's, so
    /// that one trace shows every tier). Set once; later calls are ignored.
    pub fn record_on(&self, timeline: Arc<Timeline>) {
        let _ = self.core.timeline.set(timeline);
    }
}

impl Core {
    fn record(&self, track: Track, name: &'static str, start: Instant, bytes: u64) {
        if let Some(t) = self.timeline.get() {
            t.record(track, name, start, Instant::now(), bytes);
        }
    }

    fn lock(&self) -> MutexGuard<'_, TierState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases the lock, wakes the waiters and attaches the deferred continuations.
    fn unlock(&self, mut st: MutexGuard<'_, TierState>) {
        let deferred = std::mem::take(&mut st.deferred);
        drop(st);
        self.changed.notify_all();
        for (t, then) in deferred {
            t.then(then);
        }
    }

    /// [`Core::unlock`], then waits for the next change.
    fn wait<'a>(&'a self, mut st: MutexGuard<'a, TierState>) -> MutexGuard<'a, TierState> {
        if st.deferred.is_empty() {
            return self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let deferred = std::mem::take(&mut st.deferred);
        drop(st);
        self.changed.notify_all();
        for (t, then) in deferred {
            t.then(then);
        }
        self.lock()
    }

    fn arena_ptr(&self, e: &Extent) -> *mut u8 {
        // Arena extents lie inside the arena: the address stays in it.
        self.arena.as_ptr().wrapping_add(e.offset as usize)
    }

    fn send(
        queue: &Mutex<mpsc::Sender<(Arc<dyn Event>, Continuation)>>,
        ev: Arc<dyn Event>,
        then: Continuation,
    ) {
        let tx = queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(mpsc::SendError((ev, then))) = tx.send((ev, then)) {
            // The thread is gone (only while dropping): wait here instead.
            then(ev.synchronize());
        }
    }

    /// Frees the arena space of a slot no longer used.
    fn free_slot(st: &mut TierState, slot: Slot) {
        if matches!(
            slot.state,
            SlotState::Copying | SlotState::Dirty | SlotState::Spilling
        ) && !slot.dead
        {
            st.dirty = st.dirty.saturating_sub(slot.arena.len);
        }
        free_arena(st, slot.arena);
    }

    /// Drops the live slots meeting `[start, end)` of `target` (overwritten or discarded).
    fn drop_range(&self, st: &mut TierState, target: TargetId, start: u64, end: u64) {
        for id in st.slots.overlapping(target, start, end) {
            let Some(s) = st.slots.get(id) else { continue };
            let (len, state) = (s.arena.len, s.state);
            if matches!(state, SlotState::Copying | SlotState::Dirty | SlotState::Spilling) {
                st.dirty = st.dirty.saturating_sub(len);
            }
            add(&self.counters.bytes_discarded, len);
            if let Some(slot) = st.slots.kill(id) {
                free_arena(st, slot.arena);
            }
        }
    }

    /// Makes room for `len` bytes by dropping clean slots, oldest first. True when the
    /// arena then has a free range that large.
    fn evict_for(&self, st: &mut TierState, len: u64) -> bool {
        loop {
            if st.arena_space.usage().largest_free >= len {
                return true;
            }
            let victims = st.slots.oldest(1, |s| s.state == SlotState::Clean && s.busy == 0);
            let Some(&id) = victims.first() else {
                return false;
            };
            let (target, offset, cover) = {
                let s = st.slots.get(id).expect("picked live");
                (s.target, s.offset, s.cover)
            };
            add(&self.counters.bytes_evicted, cover);
            if let Some(slot) = st.slots.kill(id) {
                free_arena(st, slot.arena);
            }
            tracing::trace!(target = target.0, offset, "host tier: evicted a clean slot");
        }
    }

    /// Takes a device-memory write into the arena if there is room; gives it back if not.
    fn try_take(self: &Arc<Self>, st: &mut TierState, w: WaitingWrite) -> Option<WaitingWrite> {
        let MemRef::Device { ptr, len } = w.req.mem else {
            unreachable!("only device writes wait for the arena")
        };
        let cover = round_up(len as u64, self.config.align);
        if !self.evict_for(st, cover) {
            return Some(w);
        }
        let arena = match st.arena_space.alloc(cover) {
            Ok(Ok(e)) => e,
            _ => return Some(w),
        };
        let dst = self.arena_ptr(&arena);
        let started = Instant::now();
        // SAFETY: the arena range is the new slot's alone; the caller keeps the source valid
        // until the ticket completes (the Backend contract), which is after the copy.
        let queued = unsafe { self.in_stream.copy_d2h(dst, ptr, len) }
            .and_then(|()| self.in_stream.record())
            .map(Arc::<dyn Event>::from);
        let ev = match queued {
            Ok(ev) => ev,
            Err(e) => {
                let _ = st.arena_space.free(arena);
                w.done.complete(Err(e));
                return None;
            }
        };
        let id = st.slots.insert(Slot {
            target: w.req.target,
            offset: w.req.offset,
            len: len as u64,
            cover,
            arena,
            state: SlotState::Copying,
            busy: 1,
            dead: false,
            copied: Some(ev.clone()),
        });
        st.dirty += cover;
        st.in_flight += 1;
        if w.waited {
            add(&self.counters.wait_ns, w.since.elapsed().as_nanos() as u64);
        }
        let core = self.clone();
        let done = w.done;
        Core::send(
            &self.in_events,
            ev,
            Box::new(move |r| core.on_copied_in(id, len as u64, started, r, done)),
        );
        None
    }

    fn on_copied_in(self: &Arc<Self>, id: u64, len: u64, started: Instant, r: Result<()>, done: Completer) {
        let mut st = self.lock();
        st.in_flight -= 1;
        let failed = r.is_err();
        if let Some(s) = st.slots.get_mut(id) {
            s.copied = None;
            if s.state == SlotState::Copying {
                s.state = SlotState::Dirty;
            }
        }
        if failed {
            // Nothing usable is in the arena: drop the slot (the caller sees the error).
            if let Some(s) = st.slots.get(id) {
                if !s.dead {
                    let (t, o, c) = (s.target, s.offset, s.cover);
                    self.drop_range(&mut st, t, o, o + c);
                }
            }
        }
        if let Some(slot) = st.slots.unbusy(id) {
            Core::free_slot(&mut st, slot);
        }
        if !failed {
            add(&self.counters.bytes_in, len);
            add(&self.counters.copy_in_ns, started.elapsed().as_nanos() as u64);
            self.record(Track::TierIn, "copy in", started, len);
        }
        self.pump(&mut st);
        self.unlock(st);
        done.complete(r.map(|()| len as usize));
    }

    /// Starts the spills the fill calls for, then the waiting writes that now fit.
    fn pump(self: &Arc<Self>, st: &mut TierState) {
        self.start_spills(st);
        while let Some(w) = st.waiting.pop_front() {
            if let Some(w) = self.try_take(st, w) {
                st.waiting.push_front(w);
                break;
            }
        }
        if !st.waiting.is_empty() && st.in_flight == 0 {
            // Nothing under way will free space or call back: spill again, or give up.
            self.start_spills(st);
            if st.in_flight == 0 {
                self.fail_waiting(st);
            }
        }
    }

    /// Writes waiting for room that cannot get it (nothing left to spill, or spilling
    /// fails) fail with the reason.
    fn fail_waiting(&self, st: &mut TierState) {
        let reason = match &st.spill_failure {
            Some(f) => format!(
                "the host tier is full and writing it to storage failed: {}",
                f.message
            ),
            None => "the host tier is full of bytes that cannot be spilled (all in use)".to_string(),
        };
        let no_space = st.spill_failure.as_ref().is_some_and(|f| f.no_space);
        while let Some(w) = st.waiting.pop_front() {
            let path = st.paths.get(&w.req.target).cloned().unwrap_or_default();
            let err = if no_space {
                Error::NoSpace {
                    path,
                    offset: w.req.offset,
                    needed: w.req.mem.len() as u64,
                }
            } else {
                Error::io(reason.clone(), std::io::Error::other("host tier full"))
            };
            w.done.complete(Err(err));
        }
    }

    fn start_spills(self: &Arc<Self>, st: &mut TierState) {
        let threshold = (self.config.spill_at * self.config.bytes as f64) as u64;
        let pressed = !st.waiting.is_empty() || st.flushing > 0 || st.dirty > threshold;
        if !pressed || st.closing {
            return;
        }
        while st.spilling < self.config.spill_inflight_bytes {
            let candidates = st
                .slots
                .oldest(64, |s| s.state == SlotState::Dirty && s.busy == 0);
            let mut started = 0;
            for id in candidates {
                if st.spilling >= self.config.spill_inflight_bytes {
                    break;
                }
                let (target, offset, end) = {
                    let s = st.slots.get(id).expect("live");
                    (s.target, s.offset, s.end())
                };
                if st.slots.dead_spill_overlaps(target, offset, end) {
                    continue;
                }
                if self.spill(st, id) {
                    started += 1;
                }
            }
            if started == 0 {
                break;
            }
            let more = !st.waiting.is_empty() || st.flushing > 0 || st.dirty > threshold;
            if !more {
                break;
            }
        }
    }

    /// Starts writing one dirty slot to storage. False if it could not be submitted.
    fn spill(self: &Arc<Self>, st: &mut TierState, id: u64) -> bool {
        let s = st.slots.get(id).expect("live");
        let req = IoRequest {
            target: s.target,
            op: IoOp::Write,
            offset: s.offset,
            mem: MemRef::Host {
                ptr: self.arena.as_ptr().wrapping_add(s.arena.offset as usize),
                len: s.len as usize,
            },
        };
        let cover = s.arena.len;
        // SAFETY: the slot is marked busy until the ticket completes, so its arena bytes are
        // neither freed nor reused before.
        let submitted = unsafe { self.inner.submit(req) };
        match submitted {
            Ok(t) => {
                let s = st.slots.get_mut(id).expect("live");
                s.state = SlotState::Spilling;
                s.busy += 1;
                st.spilling += cover;
                st.in_flight += 1;
                let core = self.clone();
                let started = Instant::now();
                let len = req.mem.len();
                st.deferred
                    .push((t, Box::new(move |r| core.on_spilled(id, cover, len, started, r))));
                true
            }
            Err(e) => {
                add(&self.counters.spill_errors, 1);
                st.spill_failure = Some(SpillFailure::of(&e));
                false
            }
        }
    }

    fn on_spilled(self: &Arc<Self>, id: u64, cover: u64, len: usize, started: Instant, r: Result<usize>) {
        let mut st = self.lock();
        st.in_flight -= 1;
        st.spilling -= cover;
        let ok = match r {
            Ok(n) if n == len => true,
            Ok(n) => {
                st.spill_failure = Some(SpillFailure {
                    message: format!("a spill wrote {n} of {len} bytes"),
                    no_space: false,
                });
                false
            }
            Err(e) => {
                st.spill_failure = Some(SpillFailure::of(&e));
                false
            }
        };
        if ok {
            st.spill_failure = None;
            add(&self.counters.bytes_spilled, len as u64);
            add(&self.counters.spill_ns, started.elapsed().as_nanos() as u64);
            self.record(Track::TierSpill, "spill", started, len as u64);
        } else {
            add(&self.counters.spill_errors, 1);
        }
        if let Some(s) = st.slots.get_mut(id) {
            if s.dead {
                s.state = if ok { SlotState::Clean } else { SlotState::Dirty };
            } else if ok {
                s.state = SlotState::Clean;
                st.dirty = st.dirty.saturating_sub(cover);
            } else {
                s.state = SlotState::Dirty;
            }
        }
        if let Some(slot) = st.slots.unbusy(id) {
            free_arena(&mut st, slot.arena);
        }
        if ok {
            self.pump(&mut st);
        } else if !st.waiting.is_empty() && st.in_flight == 0 {
            // Spilling fails: writes waiting for room would wait for ever.
            self.fail_waiting(&mut st);
        }
        self.unlock(st);
    }

    /// A read: the parts the arena holds are copied out of it, the rest read from storage.
    fn read(self: &Arc<Self>, req: IoRequest) -> Result<Ticket> {
        let len = req.mem.len() as u64;
        let start = req.offset;
        let end = start.checked_add(len).ok_or_else(|| {
            Error::invalid(format!("a read of {len} bytes at offset {start} runs past 2^64"))
        })?;
        let mut st = self.lock();
        let mut from_arena = Vec::new(); // (slot id, arena ptr, dst delta, bytes)
        let mut gaps = Vec::new(); // (offset, dst delta, bytes)
        let mut at = start;
        for id in st.slots.overlapping(req.target, start, end) {
            let s = st.slots.get(id).expect("live");
            let (a, b) = (s.offset.max(start), s.end().min(end));
            if a > at {
                gaps.push((at, at - start, a - at));
            }
            let src = self.arena_ptr(&s.arena).wrapping_add((a - s.offset) as usize);
            from_arena.push((id, src, a - start, b - a));
            at = b;
        }
        if at < end {
            gaps.push((at, at - start, end - at));
        }
        let parts = usize::from(!from_arena.is_empty()) + gaps.len();
        let (outer, done) = ticket();
        let join = Arc::new(Join::new(parts, len, done));
        // Storage reads for the gaps.
        for &(offset, delta, n) in &gaps {
            let sub = IoRequest {
                target: req.target,
                op: IoOp::Read,
                offset,
                mem: sub_mem(req.mem, delta, n),
            };
            // SAFETY: forwarded: the caller keeps its memory valid until the outer ticket
            // completes, which is after this one.
            match unsafe { self.inner.submit(sub) } {
                Ok(t) => {
                    st.in_flight += 1;
                    add(&self.counters.bytes_read_storage, n);
                    let (core, join) = (self.clone(), join.clone());
                    st.deferred.push((
                        t,
                        Box::new(move |r| {
                            core.lock().in_flight -= 1;
                            core.changed.notify_all();
                            join.part(r.map(|got| Piece {
                                at: delta,
                                got: got as u64,
                                wanted: n,
                            }));
                        }),
                    ));
                }
                Err(e) => join.part(Err(e)),
            }
        }
        if from_arena.is_empty() {
            self.unlock(st);
            return Ok(outer);
        }
        // Copies out of the arena, after any copy into it still under way.
        let started = Instant::now();
        let mut queued = Ok(());
        for &(id, src, delta, n) in &from_arena {
            let s = st.slots.get_mut(id).expect("live");
            s.busy += 1;
            if let Some(ev) = &s.copied {
                queued = queued.and_then(|()| self.out_stream.wait_event(ev.as_ref()));
            }
            if let MemRef::Device { ptr, .. } = req.mem {
                // SAFETY: the slot is busy until the copy's event completes; the caller's
                // memory is valid until the ticket completes.
                queued =
                    queued.and_then(|()| unsafe { self.out_stream.copy_h2d(ptr + delta, src, n as usize) });
            }
        }
        let ev = queued
            .and_then(|()| self.out_stream.record())
            .map(Arc::<dyn Event>::from);
        st.in_flight += 1;
        self.unlock(st);
        let ids: Vec<u64> = from_arena.iter().map(|p| p.0).collect();
        let bytes: u64 = from_arena.iter().map(|p| p.3).sum();
        let host_copies: Vec<(usize, usize, u64)> = match req.mem {
            MemRef::Host { ptr, .. } => from_arena
                .iter()
                .map(|&(_, src, delta, n)| (src as usize, ptr as usize + delta as usize, n))
                .collect(),
            MemRef::Device { .. } => Vec::new(),
        };
        let core = self.clone();
        let finish = move |r: Result<()>| {
            if r.is_ok() {
                for (src, dst, n) in host_copies {
                    // SAFETY: the slots are busy (their arena bytes stay put) and the caller's
                    // host memory is valid until the ticket completes; they do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, n as usize) };
                }
                add(&core.counters.bytes_read_arena, bytes);
                add(&core.counters.copy_out_ns, started.elapsed().as_nanos() as u64);
                core.record(Track::TierOut, "copy out", started, bytes);
            }
            let mut st = core.lock();
            st.in_flight -= 1;
            for id in ids {
                if let Some(slot) = st.slots.unbusy(id) {
                    Core::free_slot(&mut st, slot);
                }
            }
            core.pump(&mut st);
            core.unlock(st);
            join.part(r.map(|()| Piece {
                at: 0,
                got: 0,
                wanted: 0,
            }));
        };
        match ev {
            Ok(ev) => Core::send(&self.out_events, ev, Box::new(finish)),
            Err(e) => finish(Err(e)),
        }
        Ok(outer)
    }

    fn write(self: &Arc<Self>, req: IoRequest) -> Result<Ticket> {
        let len = req.mem.len() as u64;
        let end = req.offset.checked_add(len).ok_or_else(|| {
            Error::invalid(format!(
                "a write of {len} bytes at offset {} runs past 2^64",
                req.offset
            ))
        })?;
        if !req.offset.is_multiple_of(self.config.align) {
            return Err(Error::invalid(format!(
                "the host tier takes writes at multiples of {} bytes, not at offset {}: set the engine's alignment to a multiple of the tier's",
                self.config.align, req.offset
            )));
        }
        let mut st = self.lock();
        self.drop_range(&mut st, req.target, req.offset, end);
        let cover = round_up(len, self.config.align);
        if !req.mem.is_device() || cover > self.config.bytes {
            self.unlock(st);
            add(&self.counters.bytes_through, len);
            // SAFETY: forwarded contract.
            return unsafe { self.inner.submit(req) };
        }
        let (outer, done) = ticket();
        let w = WaitingWrite {
            req,
            done,
            since: Instant::now(),
            waited: false,
        };
        if !st.waiting.is_empty() {
            st.waiting.push_back(w.waited(&self.counters));
        } else if let Some(w) = self.try_take(&mut st, w) {
            st.waiting.push_back(w.waited(&self.counters));
        }
        self.pump(&mut st);
        self.unlock(st);
        Ok(outer)
    }
}

impl WaitingWrite {
    /// Counts the write as one that waits for room, timed from now.
    fn waited(mut self, c: &Counters) -> Self {
        add(&c.waited_writes, 1);
        self.since = Instant::now();
        self.waited = true;
        self
    }
}

/// What one part of a read delivered: `got` of `wanted` bytes at `at` in the caller's
/// memory (arena parts report nothing: they deliver all or fail).
struct Piece {
    at: u64,
    got: u64,
    wanted: u64,
}

/// Completes a read made of several parts once all have: with the first error, or the
/// bytes delivered without a hole (a storage part that came back short ends them).
struct Join {
    state: Mutex<JoinState>,
}

struct JoinState {
    left: usize,
    len: u64,
    /// End of the valid prefix: the start of the first short part plus what it got.
    valid: u64,
    error: Option<Error>,
    done: Option<Completer>,
}

impl Join {
    fn new(parts: usize, len: u64, done: Completer) -> Self {
        let join = Join {
            state: Mutex::new(JoinState {
                left: parts,
                len,
                valid: len,
                error: None,
                done: Some(done),
            }),
        };
        if parts == 0 {
            join.finish();
        }
        join
    }

    fn part(&self, r: Result<Piece>) {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match r {
                Ok(p) if p.got < p.wanted => s.valid = s.valid.min(p.at + p.got),
                Ok(_) => {}
                Err(e) => {
                    s.error.get_or_insert(e);
                }
            }
            s.left -= 1;
            if s.left > 0 {
                return;
            }
        }
        self.finish();
    }

    fn finish(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(done) = s.done.take() else { return };
        let result = match s.error.take() {
            Some(e) => Err(e),
            None => Ok(s.valid.min(s.len) as usize),
        };
        drop(s);
        done.complete(result);
    }
}

/// `n` bytes of `mem` starting `delta` bytes in.
fn sub_mem(mem: MemRef, delta: u64, n: u64) -> MemRef {
    match mem {
        MemRef::Host { ptr, .. } => MemRef::Host {
            ptr: ptr.wrapping_add(delta as usize),
            len: n as usize,
        },
        MemRef::Device { ptr, .. } => MemRef::Device {
            ptr: ptr + delta,
            len: n as usize,
        },
    }
}

/// Gives arena space back (an error here is a bookkeeping bug: logged, never fatal).
fn free_arena(st: &mut TierState, arena: Extent) {
    if let Err(e) = st.arena_space.free(arena) {
        tracing::error!("host tier: freeing arena space {arena:?}: {e}");
    }
}

fn round_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align).saturating_mul(align)
}

impl Backend for HostTierBackend {
    fn info(&self) -> BackendInfo {
        let mut info = self.core.inner.info();
        info.details.push((
            "host_tier".into(),
            crate::size::format_size(self.core.config.bytes),
        ));
        info
    }

    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        let (id, info) = self.core.inner.open(target)?;
        self.core.lock().paths.insert(id, target.path.clone());
        Ok((id, info))
    }

    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        let _span = tracing::trace_span!("host_tier", op = req.op.as_str(), offset = req.offset).entered();
        if req.mem.is_empty() {
            return Err(Error::invalid("an I/O of 0 bytes"));
        }
        match req.op {
            IoOp::Write => self.core.write(req),
            IoOp::Read => self.core.read(req),
        }
    }

    fn discard(&self, target: TargetId, offset: u64, len: u64) {
        let mut st = self.core.lock();
        self.core
            .drop_range(&mut st, target, offset, offset.saturating_add(len));
        self.core.pump(&mut st);
        self.core.unlock(st);
    }

    fn flush(&self, target: TargetId) -> Result<()> {
        let mut st = self.core.lock();
        st.flushing += 1;
        self.core.pump(&mut st);
        // Until no bytes of the target are only in the arena, or spilling fails.
        let outcome = loop {
            let pending = st
                .slots
                .of_target(target)
                .into_iter()
                .any(|id| st.slots.get(id).is_some_and(|s| s.state != SlotState::Clean))
                || st.waiting.iter().any(|w| w.req.target == target);
            if !pending {
                break Ok(());
            }
            if st.spilling == 0 && st.in_flight == 0 {
                if let Some(f) = &st.spill_failure {
                    break Err(Error::io(
                        format!("flushing the host tier to storage: {}", f.message),
                        std::io::Error::other("spill failed"),
                    ));
                }
                self.core.pump(&mut st);
                if st.spilling == 0 && st.in_flight == 0 {
                    break Err(Error::invalid("the host tier cannot spill bytes still in use"));
                }
            }
            st = self.core.wait(st);
        };
        st.flushing -= 1;
        self.core.unlock(st);
        outcome?;
        self.core.inner.flush(target)
    }

    fn close(&self, target: TargetId) -> Result<()> {
        let mut st = self.core.lock();
        // Writes still waiting for room fail; the target's slots go once not in use.
        let mut keep = std::collections::VecDeque::new();
        while let Some(w) = st.waiting.pop_front() {
            if w.req.target == target {
                w.done
                    .complete(Err(Error::Abandoned("the target was closed".into())));
            } else {
                keep.push_back(w);
            }
        }
        st.waiting = keep;
        self.core.drop_range(&mut st, target, 0, u64::MAX);
        while st.slots.has_target(target) {
            st = self.core.wait(st);
        }
        st.paths.remove(&target);
        self.core.unlock(st);
        self.core.inner.close(target)
    }
}

impl Drop for HostTierBackend {
    fn drop(&mut self) {
        let mut st = self.core.lock();
        st.closing = true;
        while let Some(w) = st.waiting.pop_front() {
            w.done
                .complete(Err(Error::Abandoned("the host tier was dropped".into())));
        }
        // Copies and storage requests under way use the arena: wait for them.
        while st.in_flight > 0 {
            st = self.core.wait(st);
        }
        self.core.unlock(st);
        // The event threads end by themselves once the last continuation holding the core
        // has run and the core, with the channels' senders, is gone.
    }
}

impl fmt::Debug for HostTierBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTierBackend")
            .field("bytes", &self.core.config.bytes)
            .field("inner", &self.core.inner)
            .finish()
    }
}
