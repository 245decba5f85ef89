//! Stream-ordered uploads of small host-built tables (the pack kernels' piece tables) that
//! leave the caller's stream asynchronous.
//!
//! Each upload goes through a *slot*: a pinned host buffer, a device buffer of the same
//! size and an event. The table is written into the pinned buffer, copied to the device
//! buffer with cuMemcpyHtoDAsync on the caller's stream, the kernel that reads it is
//! launched on the same stream, and the slot's event is recorded after the kernel. The slot
//! is handed out again only once that event has completed, so neither buffer is rewritten
//! while the copy or the kernel may still read it.
//!
//! Why not cuMemAllocAsync + a copy from pageable memory + cuMemFreeAsync: a copy from
//! pageable memory may make the driver wait for the stream's earlier work before it
//! returns (it stages through a pinned buffer of its own), which would make a pack wait for
//! the kernels queued before it. A pinned source copies truly asynchronously, and reusing
//! slots keeps allocations (cuMemAlloc and cuMemHostRegister are slow) off the hot path.
//!
//! Idle slots are kept, up to [`MAX_SLOTS`]; when every slot is still in use and there are
//! that many, the oldest is waited for, which bounds the memory held by uploads in flight.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::CudaContext;
use spillway_runtime::{Error, Event, Result, Stream};

use super::error::DriverResultExt;
use super::memory::{DeviceAlloc, PinnedAlloc};
use super::raw;
use super::stream::{CudaEvent, CudaStream};

/// Slots kept at most, in use or idle.
pub(crate) const MAX_SLOTS: usize = 16;
/// Smallest slot, in bytes (one page: pinned memory is mapped in pages anyway).
const MIN_SLOT: usize = 4096;

/// A pinned buffer and a device buffer of `cap` bytes each, and the event after the last
/// work that read them.
struct Slot {
    cap: usize,
    host: PinnedAlloc,
    dev: DeviceAlloc,
    /// Complete once the last copy and kernel that used the buffers are done (an event that
    /// was never recorded counts as complete).
    done: CudaEvent,
}

impl Slot {
    fn new(ctx: &Arc<CudaContext>, gpu: usize, bytes: usize) -> Result<Slot> {
        let cap = bytes.max(MIN_SLOT).next_power_of_two();
        Ok(Slot {
            cap,
            host: PinnedAlloc::new(ctx, gpu, cap)?,
            dev: DeviceAlloc::new(ctx, gpu, cap)?,
            done: CudaEvent::new(ctx, gpu)?,
        })
    }

    /// True once nothing queued uses the buffers. An error (a broken context) counts as idle:
    /// nothing will run on the GPU any more.
    fn idle(&self) -> bool {
        self.done.query().unwrap_or(true)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The buffers are freed after this (fields drop after `drop`): wait until no copy or
        // kernel still reads them.
        if let Err(e) = self.done.synchronize() {
            tracing::warn!("waiting for a table upload before freeing its buffers: {e}");
        }
    }
}

/// The upload slots of one GPU.
pub(crate) struct Uploads {
    ctx: Arc<CudaContext>,
    gpu: usize,
    /// Slots not handed out, oldest use first.
    slots: Mutex<VecDeque<Slot>>,
}

impl Uploads {
    /// No slots yet; they are made on demand.
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: usize) -> Self {
        Uploads {
            ctx: ctx.clone(),
            gpu,
            slots: Mutex::new(VecDeque::new()),
        }
    }

    /// Uploads a table of `words` `u64`s, written by `fill`, to device memory on `stream`,
    /// then calls `enqueue` with its device address to queue the work that reads it on the
    /// same stream. Returns what `enqueue` returns, without waiting for the GPU.
    ///
    /// `enqueue` must queue the work that reads the table on `stream` and nowhere else: the
    /// slot is handed out again once `stream` has passed the point right after that work.
    pub(crate) fn with_table<T>(
        &self,
        stream: &CudaStream,
        words: usize,
        fill: impl FnOnce(&mut [u64]),
        enqueue: impl FnOnce(CUdeviceptr) -> Result<T>,
    ) -> Result<T> {
        let bytes = words * std::mem::size_of::<u64>();
        raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)?;
        let slot = self.acquire(bytes)?;
        // SAFETY: the pinned buffer is page-aligned (so aligned for u64) and `cap >= bytes`
        // bytes long; the slot was taken out of the pool and its event has completed, so no
        // copy reads the buffer and nothing else refers to it until it is put back.
        let table = unsafe { std::slice::from_raw_parts_mut(slot.host.as_mut_ptr().cast::<u64>(), words) };
        fill(table);

        // SAFETY: both buffers belong to the slot, which is not handed out again before the
        // event recorded below (after the copy) has completed; the stream is live.
        let copied = unsafe {
            raw::memcpy_htod_async(slot.dev.ptr(), slot.host.as_mut_ptr(), bytes, stream.cu_stream())
        }
        .on_gpu("uploading a piece table (cuMemcpyHtoDAsync)", self.gpu);
        if let Err(e) = copied {
            // Nothing was queued: the slot is as idle as it was.
            self.release(slot);
            return Err(e);
        }
        let result = enqueue(slot.dev.ptr());
        // Whether or not `enqueue` queued anything, the copy is queued: the slot is busy
        // until the stream has passed this point.
        if let Err(record_error) = slot.done.record_on(stream) {
            self.retire_unrecorded(slot, stream, &record_error);
            // The caller's own error, if any, says more than the event's.
            return result.and(Err(record_error));
        }
        self.release(slot);
        result
    }

    /// Puts back a slot whose event could not be recorded after its last use: once the
    /// stream is idle. If even waiting for the stream fails, the buffers may still be in use,
    /// so they are leaked rather than freed.
    fn retire_unrecorded(&self, slot: Slot, stream: &CudaStream, why: &Error) {
        match stream.synchronize() {
            Ok(()) => self.release(slot),
            Err(e) => {
                tracing::error!(
                    gpu = self.gpu,
                    "leaking a {}-byte table upload slot ({why}; then {e})",
                    slot.cap
                );
                std::mem::forget(slot);
            }
        }
    }

    /// An idle slot of at least `bytes` bytes: a pooled one if one is idle and big enough,
    /// else a new one. With [`MAX_SLOTS`] slots pooled and none of them usable, waits for the
    /// oldest (holding the pool's lock: other callers wait too, which is the back-pressure
    /// that bounds the memory in flight).
    fn acquire(&self, bytes: usize) -> Result<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = slots.iter().position(|s| s.cap >= bytes && s.idle()) {
            if let Some(slot) = slots.remove(i) {
                return Ok(slot);
            }
        }
        // Idle slots too small for this table would only get in the way: free them.
        slots.retain(|s| s.cap >= bytes || !s.idle());
        if slots.len() >= MAX_SLOTS {
            if let Some(oldest) = slots.pop_front() {
                if oldest.cap >= bytes {
                    oldest.done.synchronize()?;
                    return Ok(oldest);
                }
                drop(oldest); // waits for its event
            }
        }
        drop(slots);
        Slot::new(&self.ctx, self.gpu, bytes)
    }

    /// Puts a slot back, as the most recently used.
    fn release(&self, slot: Slot) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(slot);
    }
}

impl fmt::Debug for Uploads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slots = self.slots.lock().map(|s| s.len()).unwrap_or(0);
        write!(f, "Uploads(GPU {}, {slots} slots)", self.gpu)
    }
}
