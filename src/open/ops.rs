//! The calls a binding makes on an [`OpenedEngine`]: tensors as memory regions, CUDA
//! streams as raw handles borrowed for the call ([`ForeignStream`]), handles as numbers.

use std::sync::Arc;

use spillway_runtime::engine::{Handle, Region, TensorKey};
use spillway_runtime::{Error, Event, Result};

use super::handles::{lock, SourceFlag};
use super::OpenedEngine;
use crate::cuda::ForeignStream;

/// How often [`OpenedEngine::wait_source_released`] asks the engine whether it keeps the
/// memory (it is told of a release at once).
const KEPT_POLL: std::time::Duration = std::time::Duration::from_millis(5);

impl OpenedEngine {
    /// Checks that every region is memory of the engine's GPU (any memory passes with host
    /// memory). `what` names the regions in the error ("offload region").
    pub fn check(&self, what: &str, regions: &[Region]) -> Result<()> {
        if let Some(gpu) = self.gpu() {
            for r in regions.iter().filter(|r| r.len > 0) {
                gpu.check_region(what, r.ptr, r.len)?;
            }
        }
        Ok(())
    }

    /// The caller's stream, borrowed; an error when one is given to a host-memory engine.
    ///
    /// # Safety
    /// `stream`, when given, must be 0, the per-thread default stream, or a live stream of
    /// the primary context of the engine's GPU, and stay live while the result is used.
    pub unsafe fn stream(&self, stream: Option<u64>) -> Result<Option<ForeignStream>> {
        match (self.gpu(), stream) {
            // SAFETY: forwarded contract.
            (Some(gpu), Some(s)) => Ok(Some(unsafe { ForeignStream::from_raw(gpu, s) })),
            (None, Some(_)) => Err(Error::invalid(
                "a CUDA stream was given, but this engine works on host memory: pass no stream (None from Python, NULL from C)",
            )),
            (_, None) => Ok(None),
        }
    }

    /// Offloads a tensor: `key` names its bytes (the same key offloaded again with the same
    /// memory is stored once), `regions` are its pieces, `stream` the raw handle of the
    /// CUDA stream that produces it (the engine reads the memory once the work queued there
    /// so far is done; `None`: ready now). Returns a handle at once.
    ///
    /// # Safety
    /// The memory must stay allocated and unmodified until
    /// [`OpenedEngine::source_released`] says so, and `stream` must meet the contract of
    /// [`OpenedEngine::stream`] for this call.
    pub unsafe fn offload(&self, key: TensorKey, regions: &[Region], stream: Option<u64>) -> Result<Handle> {
        self.check("offload region", regions)?;
        // SAFETY: forwarded contract; the stream is used only during this call.
        let ready: Option<Arc<dyn Event>> = match unsafe { self.stream(stream)? } {
            Some(s) => Some(Arc::new(s.record_event()?)),
            None => None,
        };
        let freed = Arc::new(SourceFlag::default());
        let flag = freed.clone();
        // SAFETY: the caller keeps the memory allocated and unmodified until
        // `source_released` says so (this function's contract); the flag it reads is set by
        // this callback.
        let h = unsafe {
            self.engine
                .offload_with_callback(key, regions, ready, move || flag.set())?
        };
        lock(&self.handles).insert(h.0, key, freed);
        Ok(h)
    }

    /// True once the engine no longer reads the memory of the tensor behind `handle`: its
    /// owner may free or reuse it.
    pub fn source_released(&self, handle: Handle) -> Result<bool> {
        Ok(lock(&self.handles).flag(handle.0)?.is_set())
    }

    /// Waits until the engine no longer reads the memory offloaded as `handle` (its write
    /// is done, or was dropped): true. False, as soon as it is known, when the engine keeps
    /// using that memory until the handle is released, having no copy on storage
    /// ([`Engine::source_kept`](spillway_runtime::engine::Engine::source_kept): the storage
    /// was full, the write failed, or every handle fetched the tensor before its write
    /// started) — waiting longer would wait forever.
    pub fn wait_source_released(&self, handle: Handle) -> Result<bool> {
        let flag = lock(&self.handles).flag(handle.0)?;
        loop {
            if flag.wait_for(KEPT_POLL) {
                return Ok(true);
            }
            if self.engine.source_kept(handle)? {
                // Released meanwhile after all (a last look, since the flag is set after
                // the engine lets go).
                return Ok(flag.is_set());
            }
        }
    }

    /// Copies the tensor behind `handle` into `regions` (memory of its size). With
    /// `stream` (a raw CUDA stream handle), the copy waits for the work queued there so far
    /// (the memory's previous users) and the stream's later work waits for the copy: the
    /// call returns without waiting for the GPU. Without, it returns once the bytes are in
    /// place.
    ///
    /// # Safety
    /// The memory must be live and used by nothing else until the copy is done (with a
    /// stream: by nothing but that stream's work), and `stream` must meet the contract of
    /// [`OpenedEngine::stream`] for this call.
    pub unsafe fn fetch(&self, handle: Handle, regions: &[Region], stream: Option<u64>) -> Result<()> {
        self.check("fetch region", regions)?;
        // SAFETY: forwarded contract; the stream is used only during this call.
        match unsafe { self.stream(stream)? } {
            Some(s) => {
                let free: Arc<dyn Event> = Arc::new(s.record_event()?);
                // SAFETY: the memory is the caller's, not used by anything but its stream,
                // whose later work waits for the returned event below.
                let ev = unsafe { self.engine.fetch_into(handle, regions, Some(free))? };
                s.wait_event(ev.as_ref())
            }
            None => {
                // SAFETY: the memory is the caller's and idle (this function's contract);
                // the event is waited on before returning.
                let ev = unsafe { self.engine.fetch(handle, regions)? };
                ev.synchronize()
            }
        }
    }

    /// Copies the tensor behind `handle` into `regions` ahead of its use: the copy waits
    /// for the work queued on `stream` so far (the memory's previous users), but no later
    /// work waits for it. Returns the event after which the memory holds the tensor; make
    /// the consumer's stream wait for it ([`OpenedEngine::wait_on`]) before the memory is
    /// read. Blocks while the bytes come from storage (or the host tier), so callers run
    /// it off their own thread to overlap it with compute.
    ///
    /// # Safety
    /// The memory must be live and used by nothing else until the returned event completes
    /// (with a stream: by nothing queued there after this call until the stream waits for
    /// the event), and `stream` must meet the contract of [`OpenedEngine::stream`] for this
    /// call.
    pub unsafe fn fetch_ahead(
        &self,
        handle: Handle,
        regions: &[Region],
        stream: Option<u64>,
    ) -> Result<Arc<dyn Event>> {
        self.check("fetch region", regions)?;
        // SAFETY: forwarded contract; the stream is used only during this call.
        let free: Option<Arc<dyn Event>> = match unsafe { self.stream(stream)? } {
            Some(s) => Some(Arc::new(s.record_event()?)),
            None => None,
        };
        // SAFETY: the memory is the caller's and free once `free` completes (this
        // function's contract); nothing reads it before the returned event completes.
        unsafe { self.engine.fetch_into(handle, regions, free) }
    }

    /// Makes `stream`'s later work wait for `event` (one [`OpenedEngine::fetch_ahead`]
    /// returned); without a stream, waits on the host.
    ///
    /// # Safety
    /// `stream` must meet the contract of [`OpenedEngine::stream`] for this call.
    pub unsafe fn wait_on(&self, event: &dyn Event, stream: Option<u64>) -> Result<()> {
        // SAFETY: forwarded contract; the stream is used only during this call.
        match unsafe { self.stream(stream)? } {
            Some(s) => s.wait_event(event),
            None => event.synchronize(),
        }
    }

    /// Drops a handle; the stored copy goes with its last handle. The last handle of a key
    /// returns once the engine no longer reads the tensor's memory (a write under way is
    /// finished first; one not yet started is dropped): the memory may be freed then.
    /// Other handles of the same key share that memory, which stays in use for them.
    pub fn release(&self, handle: Handle) -> Result<()> {
        self.engine.release(handle)?;
        let last = lock(&self.handles).remove(handle.0);
        if let Some(flag) = last {
            flag.wait();
        }
        Ok(())
    }
}
