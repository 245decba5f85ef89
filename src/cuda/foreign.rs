//! [`ForeignStream`]: a stream another library created in a GPU's primary context (a
//! PyTorch stream, say), borrowed by its raw handle so the engine can follow its order:
//! record an event at its end (the producer's "ready"), or make it wait for one of the
//! engine's events (the consumer's "fetched").

use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::CUstream;
use cudarc::driver::CudaContext;
use spillway_runtime::{Event, Result};

use super::error::DriverResultExt;
use super::raw;
use super::stream::CudaEvent;
use super::CudaDevice;

/// A CUDA stream owned by someone else, in the primary context of one GPU. Never destroyed
/// here.
pub struct ForeignStream {
    ctx: Arc<CudaContext>,
    gpu: usize,
    stream: CUstream,
}

// SAFETY: a CUstream handle may be used from any thread; this type never destroys it.
unsafe impl Send for ForeignStream {}
// SAFETY: recording events and waiting on them are thread-safe driver calls.
unsafe impl Sync for ForeignStream {}

impl ForeignStream {
    /// Borrows the stream with raw handle `handle` (0: the legacy default stream) on
    /// `device`'s GPU.
    ///
    /// # Safety
    /// `handle` must be 0, the per-thread default stream, or a live stream created in the
    /// primary context of `device`'s GPU, and stay live while the returned value is used.
    pub unsafe fn from_raw(device: &CudaDevice, handle: u64) -> ForeignStream {
        ForeignStream {
            ctx: device.context().clone(),
            gpu: device.ordinal(),
            stream: handle as CUstream,
        }
    }

    /// The raw handle.
    pub fn handle(&self) -> u64 {
        self.stream as u64
    }

    /// Records an event at the current end of the stream: it completes once everything
    /// queued there so far has run.
    pub fn record_event(&self) -> Result<CudaEvent> {
        let event = CudaEvent::new(&self.ctx, self.gpu)?;
        raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)?;
        // SAFETY: the event is live (owned here); the stream is live and in this context
        // (`from_raw`'s contract).
        unsafe { raw::event_record(event.cu_event(), self.stream) }.on_gpu("cuEventRecord", self.gpu)?;
        Ok(event)
    }

    /// Makes the work queued on the stream from now on wait for `event`: on the GPU when
    /// it is a CUDA event, else by waiting for it here on the host.
    pub fn wait_event(&self, event: &dyn Event) -> Result<()> {
        match event.as_any().downcast_ref::<CudaEvent>() {
            Some(cuda) => {
                raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)?;
                // SAFETY: both handles are live (the event borrowed for the call, the
                // stream by `from_raw`'s contract) and in this context.
                unsafe { raw::stream_wait_event(self.stream, cuda.cu_event()) }
                    .on_gpu("cuStreamWaitEvent", self.gpu)
            }
            None => event.synchronize(),
        }
    }
}

impl fmt::Debug for ForeignStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ForeignStream(GPU {}, {:p})", self.gpu, self.stream)
    }
}
