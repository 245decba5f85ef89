//! The offload engine: what a framework calls to move activation tensors to storage in the
//! forward pass and get them back in the backward pass, with the I/O behind compute.
//!
//! - [`Engine::offload`] takes a tensor (its storage key, its memory regions and the event
//!   its producer recorded) and returns a [`Handle`] at once; the copy-out happens in the
//!   background. Offloading a key already held adds a handle to the same copy (**dedup**).
//!   Small tensors are **packed** together into one aligned extent by one kernel launch;
//!   large ones are written straight from their memory.
//! - The caller learns through a callback when the tensor's own memory may be freed
//!   ([`Engine::offload_with_callback`]), or polls [`Engine::source_released`].
//! - [`Engine::prefetch`] reads a tensor's extent ahead into staging memory, in the order
//!   asked (the backward pass asks in reverse), within a bound on bytes held; the loaded
//!   copy stays until the handles that asked for it have been fetched. A request that does
//!   not start a scan through the extent reads ahead only its tensor's bytes.
//! - [`Engine::fetch`] copies the tensor into memory the caller allocated and returns the
//!   event to wait on. A tensor still in its own memory is served from there
//!   (**forwarding**), and its write is dropped if no one else will read it back.
//! - [`Engine::release`] drops a handle; [`Engine::drain`] waits for outstanding I/O.
//!
//! Memory is bounded: the engine allocates its staging memory once
//! ([`EngineConfig::staging_bytes`]) and makes work wait for it, whatever the workload.
//! When storage is full — the engine's capacity is used up, or a write fails with ENOSPC
//! ([`CounterSnapshot::no_space_errors`]) — tensors stay in GPU memory and are counted
//! ([`CounterSnapshot::resident_tensors`]) instead of failing the step, and the extent of a
//! write that failed is free again.
//!
//! A storage request that comes back with fewer bytes than asked (which the [`Backend`]
//! contract allows) is never taken as done: the engine submits the rest of it, a bounded
//! number of times, and otherwise fails it with [`Error::ShortIo`] like any failed I/O. A
//! request that fails with an error that may be transient ([`Error::is_transient`]: EIO,
//! EAGAIN, EINTR, ETIMEDOUT) is submitted again, up to [`EngineConfig::io_retries`] times
//! (counted in [`CounterSnapshot::write_retries`] and [`CounterSnapshot::read_retries`]);
//! other errors are not retried. A write that fails for good keeps its tensors in GPU
//! memory ([`CounterSnapshot::write_errors`]); a fetch that reads from storage returns the
//! error — naming the target, the offset and the retries — never partial or stale bytes (a
//! prefetch that fails leaves the fetch to read on demand).
//!
//! ```
//! use std::sync::Arc;
//! use spillway_runtime::engine::{Engine, EngineConfig, Region, StorageTarget, TensorKey};
//! use spillway_runtime::{Backend, Device, HostDevice, MemBackend, Target};
//! # fn main() -> spillway_runtime::Result<()> {
//! let device: Arc<dyn Device> = Arc::new(HostDevice::new()); // or spillway::cuda::CudaDevice
//! let backend: Arc<dyn Backend> = Arc::new(MemBackend::new(device.clone())?); // or the uring / cuFile backend
//! let config = EngineConfig { staging_bytes: 64 << 20, prefetch_bytes: 32 << 20, ..Default::default() };
//! let engine = Engine::new(
//!     device.clone(),
//!     backend,
//!     vec![StorageTarget::new(Target::new("/nvme/spill"), 64 << 30)],
//!     config,
//! )?;
//! let tensor = device.alloc(1 << 20)?;
//! device.fill_pattern(tensor.ptr(), 1 << 20, 7, 0)?;
//! // SAFETY: `tensor` stays allocated and unchanged until the engine lets go of it.
//! let h = unsafe { engine.offload(TensorKey::new(7, 0), &[Region::new(tensor.ptr(), 1 << 20)], None)? };
//! engine.drain()?;
//! assert!(engine.source_released(h)?); // on storage: `tensor` could be freed now
//!
//! let back = device.alloc(1 << 20)?;
//! engine.prefetch(h)?;
//! // SAFETY: `back` stays allocated until the returned event has completed.
//! let ready = unsafe { engine.fetch(h, &[Region::new(back.ptr(), 1 << 20)])? };
//! ready.synchronize()?; // or make the compute stream wait on it
//! assert_eq!(device.count_pattern_mismatches(back.ptr(), 1 << 20, 7, 0)?, 0);
//! engine.release(h)?;
//! # Ok(()) }
//! ```

mod callbacks;
mod config;
mod env;
mod fenced;
mod groups;
mod io;
mod keys;
mod layout;
mod pending;
mod reads;
mod space;
mod staging;
mod state;
mod stats;
mod tensors;
mod timeline;
mod verify;
mod waiter;
mod writes;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Instant;

pub use config::{ConfigError, EngineConfig, SetSizes, MAX_IO_RETRIES};
pub use keys::{Handle, TensorKey};
pub use layout::{check_regions, copy_plan, CopyStep, Region, Segment};
pub use stats::{CounterSnapshot, Latency, Op, StatsSnapshot};
pub use timeline::{Timeline, Track};

use crate::backend::{Backend, TargetId};
use crate::device::{Device, Event};
use crate::error::{Error, Result};
use crate::extents::ExtentAllocator;
use crate::target::{check_distinct, Target};
use callbacks::SourceFreeFn;
use env::{Env, Msg};
use space::Space;
use staging::Staging;
use state::{FetchPlan, State};
use stats::Stats;
use waiter::Waiter;

/// A storage target and how much of it the engine may use.
#[derive(Clone, Debug)]
pub struct StorageTarget {
    /// The file or block device.
    pub target: Target,
    /// Bytes the engine may place there.
    pub capacity: u64,
}

impl StorageTarget {
    /// `capacity` bytes of `target`.
    pub fn new(target: Target, capacity: u64) -> Self {
        StorageTarget { target, capacity }
    }
}

pub(crate) struct Core {
    state: Mutex<Option<State>>,
    changed: Condvar,
    /// Threads waiting on `changed`; changed and read under `state`'s lock. Notifying is a
    /// system call, so it is skipped when nobody waits (the common case).
    sleepers: AtomicUsize,
    /// Batches of source-release callbacks taken from the state but not yet run (they run
    /// outside the lock); `drain` returns only once they have.
    callbacks_running: AtomicUsize,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the next change; the caller re-checks its condition.
    fn wait<'a>(&self, guard: MutexGuard<'a, Option<State>>) -> MutexGuard<'a, Option<State>> {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let guard = self.changed.wait(guard).unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// Takes the callbacks made due, to be run (outside the lock) by [`Core::run_due`].
    fn take_due(&self, st: &mut State) -> Vec<SourceFreeFn> {
        let due = st.callbacks.take_due();
        if !due.is_empty() {
            self.callbacks_running.fetch_add(1, Ordering::SeqCst);
        }
        due
    }

    /// Runs callbacks taken by [`Core::take_due`], then wakes whoever waits for them.
    fn run_due(&self, due: Vec<SourceFreeFn>) {
        if due.is_empty() {
            return;
        }
        run_callbacks(due);
        let guard = self.lock();
        self.callbacks_running.fetch_sub(1, Ordering::SeqCst);
        self.unlock_and_notify(guard);
    }

    /// Releases the lock and wakes the waiters, if any.
    fn unlock_and_notify(&self, guard: MutexGuard<'_, Option<State>>) {
        let sleepers = self.sleepers.load(Ordering::SeqCst);
        drop(guard);
        if sleepers > 0 {
            self.changed.notify_all();
        }
    }
}

/// The offload engine. Shareable across threads (`&self` methods); dropping it waits for
/// outstanding I/O and closes its targets.
pub struct Engine {
    core: Arc<Core>,
    stats: Arc<Stats>,
    timeline: Arc<Timeline>,
    targets: Vec<TargetId>,
    backend: Arc<dyn Backend>,
    progress: Option<thread::JoinHandle<()>>,
    tx: mpsc::Sender<Msg>,
    config: EngineConfig,
}

impl Engine {
    /// Opens `targets` on `backend` and starts the engine on `device`, allocating its
    /// staging memory. One file given as two targets is refused ([`check_distinct`]), and so
    /// is a named file another engine holds (see [`crate::target::open_target`]).
    pub fn new(
        device: Arc<dyn Device>,
        backend: Arc<dyn Backend>,
        targets: Vec<StorageTarget>,
        config: EngineConfig,
    ) -> Result<Engine> {
        config.validate()?;
        if targets.is_empty() {
            return Err(Error::invalid("the engine needs at least one storage target"));
        }
        // One file twice would have each target allocate from offset 0 over the other.
        let target_paths: Vec<&Path> = targets.iter().map(|st| st.target.path.as_path()).collect();
        check_distinct(&target_paths)?;
        let mut storage = ExtentAllocator::new(config.alignment)?;
        let mut opened = Vec::new();
        let mut paths = HashMap::new();
        let close_all = |opened: &[TargetId]| {
            for &t in opened {
                let _ = backend.close(t);
            }
        };
        for (i, st) in targets.iter().enumerate() {
            let (id, info) = match backend.open(&st.target) {
                Ok(x) => x,
                Err(e) => {
                    close_all(&opened);
                    // A file an earlier target just made may be this one under another name.
                    return Err(check_distinct(&target_paths[..=i]).err().unwrap_or(e));
                }
            };
            opened.push(id);
            paths.insert(id, Arc::from(st.target.path.as_path()));
            if let Some(w) = &info.warning {
                tracing::warn!("{}: {w}", st.target.path.display());
            }
            if !config.alignment.is_multiple_of(info.offset_align as u64) {
                close_all(&opened);
                return Err(Error::invalid(format!(
                    "{} needs {}-byte aligned I/O, which the engine alignment {} does not give: raise the alignment",
                    st.target.path.display(),
                    info.offset_align,
                    config.alignment
                )));
            }
            if let Err(e) = storage.add_target(id, st.capacity) {
                close_all(&opened);
                return Err(e);
            }
        }
        let setup = || -> Result<_> {
            let staging_buf = device.alloc(config.staging_bytes as usize)?;
            let mut staging = ExtentAllocator::new(config.alignment)?;
            staging.add_target(TargetId(0), config.staging_bytes)?;
            Ok((
                staging_buf,
                staging,
                device.create_stream()?,
                device.create_stream()?,
                Waiter::new("spillway-pack-wait")?,
                Waiter::new("spillway-fetch-wait")?,
            ))
        };
        let (staging_buf, staging, offload_stream, fetch_stream, offload_waiter, fetch_waiter) = match setup()
        {
            Ok(x) => x,
            Err(e) => {
                close_all(&opened);
                return Err(e);
            }
        };
        let stats = Arc::new(Stats::new(config.staging_bytes));
        let timeline = Arc::new(Timeline::new(config.timeline, config.timeline_capacity));
        let (tx, rx) = mpsc::channel();
        let env = Env {
            cfg: config.clone(),
            device,
            backend: backend.clone(),
            paths,
            offload_stream,
            fetch_stream,
            offload_waiter,
            fetch_waiter,
            tx: tx.clone(),
            stats: stats.clone(),
            timeline: timeline.clone(),
        };
        let state = State::new(env, Space::new(storage), Staging::new(staging_buf, staging));
        let core = Arc::new(Core {
            state: Mutex::new(Some(state)),
            changed: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            callbacks_running: AtomicUsize::new(0),
        });
        let progress = {
            let core = core.clone();
            let delay = config.pack_flush_delay;
            thread::Builder::new()
                .name("spillway-engine".into())
                .spawn(move || progress_loop(&core, rx, delay))
                .map_err(|e| Error::io("starting the engine thread", e))?
        };
        Ok(Engine {
            core,
            stats,
            timeline,
            targets: opened,
            backend,
            progress: Some(progress),
            tx,
            config,
        })
    }

    /// The settings the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Runs `f` on the state, then the callbacks it made due, outside the lock.
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut guard = self.core.lock();
        let st = guard.as_mut().ok_or_else(io::stopped)?;
        let out = f(st);
        st.pump();
        let due = self.core.take_due(st);
        self.core.unlock_and_notify(guard);
        self.core.run_due(due);
        out
    }

    /// Offloads a tensor: `key` names its storage and version, `regions` its bytes in
    /// device memory, `ready` the event after which they may be read (the producer's
    /// stream; `None` when they are ready now). Returns at once.
    ///
    /// # Safety
    /// The regions must stay allocated and unmodified until the engine releases them:
    /// until [`Engine::source_released`] says so (or the callback of
    /// [`Engine::offload_with_callback`] runs), or the engine is dropped.
    pub unsafe fn offload(
        &self,
        key: TensorKey,
        regions: &[Region],
        ready: Option<Arc<dyn Event>>,
    ) -> Result<Handle> {
        // SAFETY: forwarded contract.
        unsafe { self.offload_inner(key, regions, ready, None) }
    }

    /// [`Engine::offload`], calling `on_source_free` (from an engine thread, once) when
    /// the engine no longer reads the tensor's memory: its write is done, it was kept in
    /// its own memory and released, or the engine dropped.
    ///
    /// # Safety
    /// As for [`Engine::offload`].
    pub unsafe fn offload_with_callback(
        &self,
        key: TensorKey,
        regions: &[Region],
        ready: Option<Arc<dyn Event>>,
        on_source_free: impl FnOnce() + Send + 'static,
    ) -> Result<Handle> {
        // SAFETY: forwarded contract.
        unsafe { self.offload_inner(key, regions, ready, Some(Box::new(on_source_free))) }
    }

    unsafe fn offload_inner(
        &self,
        key: TensorKey,
        regions: &[Region],
        ready: Option<Arc<dyn Event>>,
        cb: Option<SourceFreeFn>,
    ) -> Result<Handle> {
        let _span = tracing::trace_span!("offload", storage = key.storage, version = key.version).entered();
        check_regions("offload region", regions)?;
        self.with_state(|st| st.offload(key, regions, ready, cb))
    }

    /// True once the engine no longer reads the memory of the tensor behind `handle`
    /// (including copies it made from there for forwarded fetches).
    pub fn source_released(&self, handle: Handle) -> Result<bool> {
        self.with_state(|st| {
            let e = st.tensors.entry_by_handle(handle)?;
            let fenced = match &e.source_fence {
                Some(fence) => !fence.query()?,
                None => false,
            };
            Ok(!e.source_held && !fenced)
        })
    }

    /// True when the engine keeps reading the tensor's own memory until the handle is
    /// released, because no copy of it is on storage or on its way: the storage was full,
    /// its write failed, or every handle fetched it before its write started. False while
    /// the write is pending or under way, and once the memory is released.
    pub fn source_kept(&self, handle: Handle) -> Result<bool> {
        self.with_state(|st| {
            let e = st.tensors.entry_by_handle(handle)?;
            Ok(e.source_held && e.group.is_none())
        })
    }

    /// Asks for the handle's extent to be read ahead into staging memory. Requests are
    /// served in the order made, within [`EngineConfig::prefetch_bytes`]; the copy stays
    /// until every handle that asked for it was fetched or released. A fetch that comes
    /// before its request was served drops the request (and reads what it needs itself).
    /// A whole extent is read only for a request that starts a scan through it (its
    /// tensor is the first or last there still to be fetched): reading the extent for a
    /// lone request (a deduplicated tensor wanted again, a random access) would read most
    /// bytes twice, so only the tensor's own bytes are read ahead for it (counted in
    /// [`CounterSnapshot::prefetched_slots`]), held until the handle is fetched or released.
    pub fn prefetch(&self, handle: Handle) -> Result<()> {
        self.with_state(|st| st.prefetch(handle))
    }

    /// Copies the tensor into `dst` (regions totalling its size, allocated by the caller)
    /// and returns the event after which `dst` holds it. Blocks only while the bytes are
    /// still on their way from storage (counted as stall time).
    ///
    /// # Safety
    /// `dst` must be live device memory, not read or written by anything else, until the
    /// returned event completes.
    pub unsafe fn fetch(&self, handle: Handle, dst: &[Region]) -> Result<Arc<dyn Event>> {
        // SAFETY: forwarded contract.
        unsafe { self.fetch_into(handle, dst, None) }
    }

    /// [`Engine::fetch`] into memory that becomes free only once `dst_free` completes
    /// (e.g. memory a framework's allocator hands out in the order of the consumer's
    /// stream: record an event there). The engine's copies into `dst` wait for the event
    /// on the device; reads straight from storage wait for it on the host.
    ///
    /// # Safety
    /// As for [`Engine::fetch`], from the completion of `dst_free` on.
    pub unsafe fn fetch_into(
        &self,
        handle: Handle,
        dst: &[Region],
        dst_free: Option<Arc<dyn Event>>,
    ) -> Result<Arc<dyn Event>> {
        let _span = tracing::trace_span!("fetch", handle = handle.0).entered();
        check_regions("fetch region", dst)?;
        let start = Instant::now();
        let mut guard = self.core.lock();
        let mut stalled: Option<Instant> = None;
        let result = loop {
            let Some(st) = guard.as_mut() else {
                break Err(io::stopped());
            };
            match st.fetch(handle, dst, dst_free.as_ref()) {
                Ok(FetchPlan::WaitLoad) => {
                    stalled.get_or_insert_with(Instant::now);
                    guard = self.core.wait(guard);
                }
                Ok(FetchPlan::WaitDestination(ev)) => {
                    self.core.unlock_and_notify(guard);
                    stalled.get_or_insert_with(Instant::now);
                    let waited = ev.synchronize();
                    guard = self.core.lock();
                    if let Err(e) = waited {
                        break Err(e);
                    }
                }
                Ok(FetchPlan::Done(ev)) => break Ok(ev),
                Ok(FetchPlan::Read(ios, failed, check)) => {
                    st.pump();
                    self.core.unlock_and_notify(guard);
                    let read_start = Instant::now();
                    stalled.get_or_insert(read_start);
                    let outcome = self
                        .wait_reads(ios, failed)
                        .and_then(|()| check.map_or(Ok(()), |c| c.run(dst)));
                    let took = read_start.elapsed();
                    self.stats.record(Op::Read, took);
                    Stats::add(&self.stats.c.read_ns, took.as_nanos() as u64);
                    self.timeline
                        .record(Track::Read, "demand read", read_start, Instant::now(), 0);
                    guard = self.core.lock();
                    let Some(st) = guard.as_mut() else {
                        break Err(io::stopped());
                    };
                    st.reads.demand_ended();
                    if let Err(e) = outcome {
                        Stats::add(&self.stats.c.read_errors, 1);
                        break Err(e);
                    }
                    break st.env.fetch_stream.record().map(Arc::from);
                }
                Err(e) => break Err(e),
            }
        };
        if let Some(st) = guard.as_mut() {
            st.pump();
        }
        let due = guard
            .as_mut()
            .map(|st| self.core.take_due(st))
            .unwrap_or_default();
        self.core.unlock_and_notify(guard);
        self.core.run_due(due);
        if let Some(s) = stalled {
            let now = Instant::now();
            Stats::add(&self.stats.c.stall_ns, now.duration_since(s).as_nanos() as u64);
            self.timeline.record(Track::Stall, "fetch waited", s, now, 0);
        }
        self.stats.record(Op::Fetch, start.elapsed());
        result
    }

    /// Waits for the reads of a demand fetch, submitting the rest of any that comes back
    /// short, and returns the first failure (`failed`: a submission that failed). Every read
    /// is waited for, even after one has failed; after a failure, short counts are no longer
    /// resubmitted.
    fn wait_reads(&self, ios: Vec<pending::PendingIo>, failed: Option<Error>) -> Result<()> {
        let mut outcome = failed.map_or(Ok(()), Err);
        for io in ios {
            let waited = io.wait(self.backend.as_ref(), outcome.is_ok());
            if let Err(e) = waited {
                tracing::debug!("a demand read failed: {e}");
                outcome = outcome.and(Err(e));
            }
        }
        outcome
    }

    /// Drops a handle. The stored copy goes once no handle names it; a write not yet
    /// started is then dropped.
    pub fn release(&self, handle: Handle) -> Result<()> {
        self.with_state(|st| st.release(handle))
    }

    /// Writes out everything offloaded so far (sealing a partly filled packed extent) and
    /// waits until no write or read is in flight.
    pub fn drain(&self) -> Result<()> {
        let _span = tracing::debug_span!("drain").entered();
        let mut guard = self.core.lock();
        if let Some(st) = guard.as_mut() {
            st.seal_open();
            st.pump();
        }
        loop {
            let Some(st) = guard.as_mut() else {
                return Err(io::stopped());
            };
            if st.idle() && self.core.callbacks_running.load(Ordering::SeqCst) == 0 {
                break;
            }
            guard = self.core.wait(guard);
        }
        let st = guard.as_mut().ok_or_else(io::stopped)?;
        let due = self.core.take_due(st);
        let synced = st
            .env
            .offload_stream
            .synchronize()
            .and(st.env.fetch_stream.synchronize());
        drop(guard);
        self.core.run_due(due);
        synced?;
        // Fences that completed with the synchronize above.
        self.with_state(|_| Ok(()))
    }

    /// A copy of the statistics.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The timeline (empty unless [`EngineConfig::timeline`] is set).
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The timeline, shared: for a backend that records its own stages on it (the host
    /// tier does).
    pub fn timeline_handle(&self) -> Arc<Timeline> {
        self.timeline.clone()
    }

    /// Live handles.
    pub fn live_handles(&self) -> usize {
        self.core
            .lock()
            .as_ref()
            .map_or(0, |st| st.tensors.live_handles())
    }

    /// Storage space in use (bytes), and the allocator's view of it.
    pub fn storage_usage(&self) -> crate::extents::SpaceUsage {
        self.core
            .lock()
            .as_ref()
            .map(|st| st.space.usage())
            .unwrap_or_default()
    }

    /// Staging memory in use now (bytes).
    pub fn staging_in_use(&self) -> u64 {
        self.core.lock().as_ref().map_or(0, |st| st.staging.used())
    }
}

/// Runs source-release callbacks outside the lock. A callback that panics is reported and
/// does not take the engine's thread down with it.
fn run_callbacks(due: Vec<SourceFreeFn>) {
    for cb in due {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(cb)).is_err() {
            tracing::error!("an offload callback panicked; the engine carries on");
        }
    }
}

fn progress_loop(core: &Core, rx: Receiver<Msg>, flush_delay: std::time::Duration) {
    loop {
        let open = core.lock().as_ref().is_some_and(|st| st.writes.open.is_some());
        let msg = if open {
            match rx.recv_timeout(flush_delay) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            }
        };
        let mut guard = core.lock();
        let Some(st) = guard.as_mut() else { return };
        match msg {
            Some(Msg::Shutdown) => return,
            Some(Msg::WriteIo(gid)) => st.on_write_io(gid),
            Some(Msg::ReadIo(gid)) => st.on_read_io(gid),
            Some(Msg::Prepared(gid, r)) => st.on_prepared(gid, r),
            Some(Msg::Verified(gid, r)) => st.on_verified(gid, r),
            Some(Msg::SlotIo(sid)) => st.on_slot_io(sid),
            Some(Msg::SlotVerified(sid, r)) => st.on_slot_verified(sid, r),
            Some(Msg::Fence | Msg::Wake) | None => {}
        }
        if st.writes.flush_due(flush_delay) {
            st.seal_open();
        }
        st.pump();
        let due = core.take_due(st);
        core.unlock_and_notify(guard);
        core.run_due(due);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.drain() {
            tracing::warn!("draining the engine on drop: {e}");
        }
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.progress.take() {
            let _ = t.join();
        }
        let state = self.core.lock().take();
        if let Some(mut st) = state {
            // Every tensor's memory goes back to its owner; nothing reads it any more.
            let due = st.take_all_callbacks();
            drop(st); // waiters join, streams and staging memory go
            run_callbacks(due);
        }
        for &t in &self.targets {
            if let Err(e) = self.backend.close(t) {
                tracing::warn!("closing a storage target: {e}");
            }
        }
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("targets", &self.targets)
            .field("config", &self.config)
            .finish()
    }
}
