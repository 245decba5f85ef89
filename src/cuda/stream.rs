//! [`CudaStream`] and [`CudaEvent`]: the runtime's [`Stream`] and [`Event`] on CUDA streams
//! (non-blocking) and events (without timing). Every call binds the GPU's context to the
//! calling thread first, so they work from any thread.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::{CUevent, CUstream};
use cudarc::driver::CudaContext;
use spillway_runtime::{DevicePtr, Error, Event, Result, Stream};

use super::error::{describe, DriverResultExt};
use super::raw;

/// A CUDA stream (created with CU_STREAM_NON_BLOCKING) of one GPU.
pub struct CudaStream {
    ctx: Arc<CudaContext>,
    gpu: usize,
    stream: CUstream,
}

// SAFETY: a CUstream handle may be used from any thread; the stream is destroyed only in drop.
unsafe impl Send for CudaStream {}
// SAFETY: all CUDA stream operations are thread-safe; `&self` methods only queue work.
unsafe impl Sync for CudaStream {}

impl CudaStream {
    /// Creates a stream on the context's GPU.
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: usize) -> Result<Self> {
        raw::bind(ctx).on_gpu("cuCtxSetCurrent", gpu)?;
        let stream = raw::stream_create_non_blocking().on_gpu("cuStreamCreate", gpu)?;
        Ok(CudaStream {
            ctx: ctx.clone(),
            gpu,
            stream,
        })
    }

    /// The raw `CUstream`, valid while `self` lives.
    pub fn cu_stream(&self) -> CUstream {
        self.stream
    }

    /// The GPU's ordinal.
    pub fn ordinal(&self) -> usize {
        self.gpu
    }

    fn bind(&self) -> Result<()> {
        raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)
    }

    /// Records a new [`CudaEvent`] at the current end of the stream.
    pub fn record_event(&self) -> Result<CudaEvent> {
        self.bind()?;
        let event = CudaEvent::new(&self.ctx, self.gpu)?;
        // SAFETY: both handles are live (owned by `self` and `event`) and in this context.
        unsafe { raw::event_record(event.event, self.stream) }.on_gpu("cuEventRecord", self.gpu)?;
        Ok(event)
    }
}

impl Drop for CudaStream {
    fn drop(&mut self) {
        let done = raw::bind(&self.ctx).and_then(|()| {
            // SAFETY: the stream was created in `new` and is destroyed only here; work still
            // queued on it completes (cuStreamDestroy does not cancel it).
            unsafe { raw::stream_destroy(self.stream) }
        });
        if let Err(e) = done {
            tracing::warn!(gpu = self.gpu, "cuStreamDestroy failed: {}", describe(e));
        }
    }
}

impl fmt::Debug for CudaStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaStream(GPU {}, {:p})", self.gpu, self.stream)
    }
}

impl Stream for CudaStream {
    unsafe fn copy_d2h(&self, dst: *mut u8, src: DevicePtr, len: usize) -> Result<()> {
        let _span = tracing::debug_span!("cuda_copy_d2h", gpu = self.gpu, src, len).entered();
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the caller keeps both regions valid until the copy completes (the trait's
        // contract); the stream is live.
        unsafe { raw::memcpy_dtoh_async(dst, src, len, self.stream) }.on_gpu("cuMemcpyDtoHAsync", self.gpu)
    }

    unsafe fn copy_h2d(&self, dst: DevicePtr, src: *const u8, len: usize) -> Result<()> {
        let _span = tracing::debug_span!("cuda_copy_h2d", gpu = self.gpu, dst, len).entered();
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: as in copy_d2h.
        unsafe { raw::memcpy_htod_async(dst, src, len, self.stream) }.on_gpu("cuMemcpyHtoDAsync", self.gpu)
    }

    unsafe fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, len: usize) -> Result<()> {
        let _span = tracing::debug_span!("cuda_copy_d2d", gpu = self.gpu, dst, src, len).entered();
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: as in copy_d2h.
        unsafe { raw::memcpy_dtod_async(dst, src, len, self.stream) }.on_gpu("cuMemcpyDtoDAsync", self.gpu)
    }

    fn record(&self) -> Result<Box<dyn Event>> {
        Ok(Box::new(self.record_event()?))
    }

    fn wait_event(&self, event: &dyn Event) -> Result<()> {
        let event = event.as_any().downcast_ref::<CudaEvent>().ok_or_else(|| {
            Error::invalid("a CUDA stream can only wait on events recorded on CUDA streams")
        })?;
        self.bind()?;
        // SAFETY: both handles are live (owned by `self` and `event`).
        unsafe { raw::stream_wait_event(self.stream, event.event) }.on_gpu("cuStreamWaitEvent", self.gpu)
    }

    fn synchronize(&self) -> Result<()> {
        let _span = tracing::debug_span!("cuda_stream_synchronize", gpu = self.gpu).entered();
        self.bind()?;
        // SAFETY: the stream is live.
        unsafe { raw::stream_synchronize(self.stream) }.on_gpu("cuStreamSynchronize", self.gpu)
    }

    fn raw_handle(&self) -> u64 {
        self.stream as u64
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A CUDA event (CU_EVENT_DISABLE_TIMING), recorded by [`CudaStream::record_event`].
pub struct CudaEvent {
    ctx: Arc<CudaContext>,
    gpu: usize,
    event: CUevent,
}

// SAFETY: a CUevent handle may be used from any thread; it is destroyed only in drop.
unsafe impl Send for CudaEvent {}
// SAFETY: query, synchronize and wait are thread-safe driver calls.
unsafe impl Sync for CudaEvent {}

impl CudaEvent {
    /// Creates an event (not yet recorded: it counts as complete).
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: usize) -> Result<Self> {
        raw::bind(ctx).on_gpu("cuCtxSetCurrent", gpu)?;
        let event = raw::event_create().on_gpu("cuEventCreate", gpu)?;
        Ok(CudaEvent {
            ctx: ctx.clone(),
            gpu,
            event,
        })
    }

    /// The raw `CUevent`, valid while `self` lives.
    pub fn cu_event(&self) -> CUevent {
        self.event
    }

    /// Records this event (again) at the current end of `stream`, a stream of the same GPU.
    pub(crate) fn record_on(&self, stream: &CudaStream) -> Result<()> {
        if stream.ordinal() != self.gpu {
            return Err(Error::invalid(format!(
                "an event of GPU {} cannot be recorded on a stream of GPU {}",
                self.gpu,
                stream.ordinal()
            )));
        }
        self.bind()?;
        // SAFETY: both handles are live (owned by `self` and `stream`) and belong to the same
        // GPU's primary context (checked above).
        unsafe { raw::event_record(self.event, stream.cu_stream()) }.on_gpu("cuEventRecord", self.gpu)
    }

    fn bind(&self) -> Result<()> {
        raw::bind(&self.ctx).on_gpu("cuCtxSetCurrent", self.gpu)
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        let done = raw::bind(&self.ctx).and_then(|()| {
            // SAFETY: created in `new`, destroyed only here; a pending event may be destroyed.
            unsafe { raw::event_destroy(self.event) }
        });
        if let Err(e) = done {
            tracing::warn!(gpu = self.gpu, "cuEventDestroy failed: {}", describe(e));
        }
    }
}

impl fmt::Debug for CudaEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaEvent(GPU {}, {:p})", self.gpu, self.event)
    }
}

impl Event for CudaEvent {
    fn query(&self) -> Result<bool> {
        self.bind()?;
        // SAFETY: the event is live.
        unsafe { raw::event_query(self.event) }.on_gpu("cuEventQuery", self.gpu)
    }

    fn synchronize(&self) -> Result<()> {
        let _span = tracing::debug_span!("cuda_event_synchronize", gpu = self.gpu).entered();
        self.bind()?;
        // SAFETY: the event is live.
        unsafe { raw::event_synchronize(self.event) }.on_gpu("cuEventSynchronize", self.gpu)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
