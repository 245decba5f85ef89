//! The [`Device`] trait: the memory, copies, streams and events the engine and the
//! backends need from a GPU — and nothing else. The CUDA implementation lives in the
//! `spillway` crate; [`HostDevice`](crate::HostDevice) implements it on host memory for tests
//! and GPU-less machines.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::error::Result;
use crate::memory::{DeviceBuffer, DevicePtr, PinnedBuffer};
use crate::pack::PackPiece;

/// What kind of device this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Host memory standing in for a GPU.
    Host,
    /// A CUDA GPU.
    Cuda,
}

/// A device's identity, for reports.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Host or CUDA.
    pub kind: DeviceKind,
    /// The device's ordinal (0 for the host device).
    pub ordinal: usize,
    /// Product name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: u64,
}

/// A GPU (or a stand-in) as the runtime sees it. Implementations are cheap to share
/// (`Arc<dyn Device>`) and safe to call from any thread.
pub trait Device: Send + Sync + fmt::Debug {
    /// Identity of the device.
    fn info(&self) -> DeviceInfo;

    /// Allocates `len` bytes of device memory.
    fn alloc(&self, len: usize) -> Result<DeviceBuffer>;

    /// True when this device's memory addresses are ordinary host addresses (the host
    /// device): a backend may then do I/O on them directly instead of staging copies.
    fn host_addressable(&self) -> bool {
        false
    }

    /// Allocates `len` bytes of page-locked host memory that the device's copy engines can
    /// reach, aligned to at least 4096 bytes.
    fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer>;

    /// Page-locks existing host memory for the device (cuMemHostRegister). Unregistered
    /// when the returned guard drops.
    ///
    /// # Safety
    /// `ptr` must stay valid for `len` bytes until the guard is dropped.
    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<HostRegistration>;

    /// Creates a new stream on which copies run in order.
    fn create_stream(&self) -> Result<Arc<dyn Stream>>;

    /// Fills `[dst, dst+len)` with the [`pattern`](crate::pattern) for `seed`, as if the
    /// region started at byte `offset` of the pattern, and waits until done.
    fn fill_pattern(&self, dst: DevicePtr, len: usize, seed: u64, offset: u64) -> Result<()>;

    /// Counts the bytes of `[src, src+len)` that differ from the [`pattern`](crate::pattern)
    /// for `seed` at `offset` (0 means equal), and waits until done.
    fn count_pattern_mismatches(&self, src: DevicePtr, len: usize, seed: u64, offset: u64) -> Result<u64>;

    /// Enqueues on `stream` a gather of `pieces` into the extent `[extent, extent+extent_len)`:
    /// each piece's memory is copied to `extent + piece.offset`, and every extent byte no
    /// piece covers is zeroed. Pieces must be sorted by offset and disjoint
    /// ([`check_pack_layout`](crate::pack::check_pack_layout)); one launch does them all.
    ///
    /// # Safety
    /// `stream` must belong to this device; the extent and every piece's memory must be live
    /// device memory, not overlapping, until the work has completed on the stream.
    unsafe fn pack(
        &self,
        stream: &dyn Stream,
        extent: DevicePtr,
        extent_len: u64,
        pieces: &[PackPiece],
    ) -> Result<()>;

    /// Enqueues on `stream` a scatter of `pieces` out of the extent at `extent` (of
    /// `extent_len` bytes): `extent + piece.offset` is copied to each piece's memory.
    ///
    /// # Safety
    /// As for [`Device::pack`]; the pieces' memory must not overlap each other or the extent.
    unsafe fn unpack(
        &self,
        stream: &dyn Stream,
        extent: DevicePtr,
        extent_len: u64,
        pieces: &[PackPiece],
    ) -> Result<()>;

    /// Enqueues on `stream` the CRC-32C (Castagnoli, the value [`crc32c::crc32c`] gives) of
    /// each of `pieces`, given as (device address, length). The values are read with
    /// [`PendingChecksums::wait`] once the stream has passed this point.
    ///
    /// This default copies each piece to the host after waiting for the stream, so it blocks
    /// the caller; devices override it with work that is queued on the stream (the CUDA
    /// device runs a kernel, the host device its stream's worker thread).
    ///
    /// # Safety
    /// Every piece must be live device memory of this device until the work has completed
    /// on the stream, and nothing may write to it before then.
    unsafe fn crc32c(&self, stream: &dyn Stream, pieces: &[(DevicePtr, u64)]) -> Result<PendingChecksums> {
        stream.synchronize()?;
        let mut sums = Vec::with_capacity(pieces.len());
        let mut host = Vec::new();
        for &(ptr, len) in pieces {
            host.resize(len as usize, 0u8);
            // SAFETY: forwarded contract; `host` holds `len` bytes.
            unsafe { self.copy_to_host_sync(host.as_mut_ptr(), ptr, len as usize)? };
            sums.push(crc32c::crc32c(&host));
        }
        Ok(PendingChecksums::ready(sums))
    }

    /// Copies device memory to host memory and waits (convenience for tests and tools).
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes and `src` a live device region of `len` bytes.
    unsafe fn copy_to_host_sync(&self, dst: *mut u8, src: DevicePtr, len: usize) -> Result<()> {
        let stream = self.create_stream()?;
        // SAFETY: forwarded contract.
        unsafe { stream.copy_d2h(dst, src, len)? };
        stream.synchronize()
    }

    /// Copies host memory to device memory and waits (convenience for tests and tools).
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes and `dst` a live device region of `len` bytes.
    unsafe fn copy_from_host_sync(&self, dst: DevicePtr, src: *const u8, len: usize) -> Result<()> {
        let stream = self.create_stream()?;
        // SAFETY: forwarded contract.
        unsafe { stream.copy_h2d(dst, src, len)? };
        stream.synchronize()
    }
}

/// An ordered queue of device work. Copies are asynchronous: they have happened once an
/// event recorded after them completes (or after [`Stream::synchronize`]).
pub trait Stream: Send + Sync + fmt::Debug {
    /// Enqueues a device→host copy.
    ///
    /// # Safety
    /// `dst` (host, `len` bytes) and `src` (device, `len` bytes) must stay valid until the
    /// copy has completed on the stream.
    unsafe fn copy_d2h(&self, dst: *mut u8, src: DevicePtr, len: usize) -> Result<()>;

    /// Enqueues a host→device copy.
    ///
    /// # Safety
    /// As for [`Stream::copy_d2h`], with the directions swapped.
    unsafe fn copy_h2d(&self, dst: DevicePtr, src: *const u8, len: usize) -> Result<()>;

    /// Enqueues a device→device copy.
    ///
    /// # Safety
    /// Both regions must be live device memory of `len` bytes until the copy completes.
    unsafe fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, len: usize) -> Result<()>;

    /// Records a new event at the current end of the stream.
    fn record(&self) -> Result<Box<dyn Event>>;

    /// Makes later work on this stream wait until `event` has completed.
    fn wait_event(&self, event: &dyn Event) -> Result<()>;

    /// Blocks until all work enqueued so far has completed.
    fn synchronize(&self) -> Result<()>;

    /// The native handle (`CUstream` as an integer); 0 for the host device.
    fn raw_handle(&self) -> u64;

    /// The implementation, so the device that made the stream can use its own type.
    fn as_any(&self) -> &dyn Any;
}

/// A point in a stream's work.
pub trait Event: Send + Sync + fmt::Debug {
    /// True once all work before the event has completed.
    fn query(&self) -> Result<bool>;

    /// Blocks until the event has completed.
    fn synchronize(&self) -> Result<()>;

    /// The implementation, so a stream of the same device can wait on it.
    fn as_any(&self) -> &dyn Any;
}

/// Checksums queued on a stream by [`Device::crc32c`].
pub struct PendingChecksums {
    done: Option<Box<dyn Event>>,
    read: Box<dyn FnOnce() -> Result<Vec<u32>> + Send>,
}

impl PendingChecksums {
    /// Checksums that are known once `done` has completed, then read by `read`.
    pub fn new(done: Box<dyn Event>, read: impl FnOnce() -> Result<Vec<u32>> + Send + 'static) -> Self {
        PendingChecksums {
            done: Some(done),
            read: Box::new(read),
        }
    }

    /// Checksums already computed.
    pub fn ready(sums: Vec<u32>) -> Self {
        PendingChecksums {
            done: None,
            read: Box::new(move || Ok(sums)),
        }
    }

    /// Waits until the stream has computed them (at once if an event recorded after them
    /// has completed) and returns one CRC-32C per piece, in the order of the pieces.
    pub fn wait(self) -> Result<Vec<u32>> {
        if let Some(done) = &self.done {
            done.synchronize()?;
        }
        (self.read)()
    }
}

impl fmt::Debug for PendingChecksums {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingChecksums")
            .field("queued", &self.done.is_some())
            .finish()
    }
}

/// Guard of a [`Device::register_host`] registration; unregisters on drop.
pub struct HostRegistration {
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl HostRegistration {
    /// A registration undone by `release` on drop.
    pub fn new(release: impl FnOnce() + Send + Sync + 'static) -> Self {
        HostRegistration {
            release: Some(Box::new(release)),
        }
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostRegistration")
    }
}
