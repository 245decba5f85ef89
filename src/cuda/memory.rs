//! Device memory, pinned host memory and host registrations, as RAII types that free
//! themselves (logging, never panicking, when the driver refuses), and their conversion to
//! the runtime's [`DeviceBuffer`], [`PinnedBuffer`] and [`HostRegistration`].

use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::CudaContext;
use spillway_runtime::{DeviceBuffer, Error, HostRegistration, PinnedBuffer, Result};

use super::error::{self, DriverResultExt};
use super::raw;

/// Alignment `alloc_pinned` guarantees.
pub(crate) const PINNED_ALIGN: usize = 4096;

/// A device allocation, freed on drop.
#[derive(Debug)]
pub(crate) struct DeviceAlloc {
    ctx: Arc<CudaContext>,
    gpu: usize,
    ptr: CUdeviceptr,
    len: usize,
}

impl DeviceAlloc {
    /// Allocates `len` bytes (at least one) on the context's GPU.
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: usize, len: usize) -> Result<Self> {
        raw::bind(ctx).on_gpu("cuCtxSetCurrent", gpu)?;
        let ptr =
            raw::mem_alloc(len.max(1)).map_err(|e| error::alloc("device", len, "cuMemAlloc", gpu, e))?;
        Ok(DeviceAlloc {
            ctx: ctx.clone(),
            gpu,
            ptr,
            len,
        })
    }

    /// The device address.
    pub(crate) fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Hands the allocation to a runtime [`DeviceBuffer`], which frees it on drop.
    pub(crate) fn into_buffer(self) -> DeviceBuffer {
        let (ptr, len) = (self.ptr, self.len);
        DeviceBuffer::from_raw(ptr, len, move || drop(self))
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        let what = format!("cuMemFree({:#x}, {} bytes)", self.ptr, self.len);
        error::release_logged(&self.ctx, self.gpu, &what, || {
            // SAFETY: `ptr` came from cuMemAlloc in `new` and is freed only here. The runtime's
            // contract makes users wait for their work before dropping a buffer.
            unsafe { raw::mem_free(self.ptr) }
        });
    }
}

/// Checks that `[ptr, ptr + len)` lies within one device allocation of the GPU, so a bad
/// pointer is an [`Error::InvalidArgument`] naming `what` rather than a kernel fault that
/// would wreck the context.
pub(crate) fn check_device_region(
    ctx: &CudaContext,
    gpu: usize,
    what: &str,
    ptr: CUdeviceptr,
    len: u64,
) -> Result<()> {
    raw::bind(ctx).on_gpu("cuCtxSetCurrent", gpu)?;
    let (base, size) = raw::mem_address_range(ptr).map_err(|e| {
        Error::invalid(format!(
            "{what}: {ptr:#x} is not device memory of GPU {gpu} (cuMemGetAddressRange: {})",
            error::describe(e)
        ))
    })?;
    let fits = matches!(ptr.checked_add(len), Some(end) if end <= base + size as u64);
    if !fits {
        return Err(Error::invalid(format!(
            "{what}: [{ptr:#x}, +{len}) runs past the end of its allocation [{base:#x}, +{size}) on GPU {gpu}"
        )));
    }
    Ok(())
}

/// Page-locked host memory: anonymous pages from `mmap`, page-locked for every context with
/// cuMemHostRegister (PORTABLE); unregistered and unmapped on drop.
///
/// Ordinary anonymous memory rather than cuMemHostAlloc's driver-owned mapping, so that
/// io_uring can register the same buffer as a fixed buffer (it pins user pages, which the
/// driver's mapping refuses on many kernels): one buffer both the copy engine and the disk
/// reach, with no further copy.
#[derive(Debug)]
pub(crate) struct PinnedAlloc {
    ctx: Arc<CudaContext>,
    gpu: usize,
    ptr: *mut u8,
    len: usize,
    registered: bool,
}

// SAFETY: the allocation is owned exclusively by this value; the driver allows unregistering
// it from any thread (with the context bound, which drop does).
unsafe impl Send for PinnedAlloc {}
// SAFETY: no method gives access to the memory through `&self`.
unsafe impl Sync for PinnedAlloc {}

impl PinnedAlloc {
    /// Allocates `len` bytes (at least one page), page-aligned.
    pub(crate) fn new(ctx: &Arc<CudaContext>, gpu: usize, len: usize) -> Result<Self> {
        raw::bind(ctx).on_gpu("cuCtxSetCurrent", gpu)?;
        let map_len = len.max(1).div_ceil(PINNED_ALIGN) * PINNED_ALIGN;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::OutOfMemory {
                kind: "pinned host",
                bytes: len,
            });
        }
        let mut alloc = PinnedAlloc {
            ctx: ctx.clone(),
            gpu,
            ptr: ptr.cast(),
            len: map_len,
            registered: false,
        };
        // SAFETY: the mapping stays until `alloc` drops, which unregisters it first.
        unsafe { raw::host_register(alloc.ptr, map_len, sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .map_err(|e| error::alloc("pinned host", len, "cuMemHostRegister", gpu, e))?;
        alloc.registered = true;
        Ok(alloc)
    }

    /// The start of the memory (page-aligned), valid for reads and writes of the length
    /// asked for (rounded up to whole pages) while `self` lives.
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Hands the allocation to a runtime [`PinnedBuffer`], which frees it on drop.
    pub(crate) fn into_buffer(self, len: usize) -> PinnedBuffer {
        let ptr = self.ptr;
        // SAFETY: `ptr` is valid for reads and writes of `self.len >= len` bytes until `self`
        // drops, which happens in the release closure and nowhere else.
        unsafe { PinnedBuffer::from_raw(ptr, len, move || drop(self)) }
    }
}

impl Drop for PinnedAlloc {
    fn drop(&mut self) {
        if self.registered {
            let what = format!("cuMemHostUnregister of a {}-byte pinned buffer", self.len);
            error::release_logged(&self.ctx, self.gpu, &what, || {
                // SAFETY: registered in `new`, unregistered only here.
                unsafe { raw::host_unregister(self.ptr) }
            });
        }
        // SAFETY: the mapping was created in `new` with this length and is unmapped only here.
        if unsafe { libc::munmap(self.ptr.cast(), self.len) } != 0 {
            tracing::warn!(
                len = self.len,
                "munmap of a pinned buffer failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Host memory page-locked with cuMemHostRegister (PORTABLE), unregistered on drop.
#[derive(Debug)]
struct Registration {
    ctx: Arc<CudaContext>,
    gpu: usize,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a registration is a driver-side record of an address range; the driver allows
// unregistering it from any thread (with the context bound, which drop does).
unsafe impl Send for Registration {}
// SAFETY: no method uses the memory through `&self`.
unsafe impl Sync for Registration {}

impl Drop for Registration {
    fn drop(&mut self) {
        let what = format!("cuMemHostUnregister({:p}, {} bytes)", self.ptr, self.len);
        error::release_logged(&self.ctx, self.gpu, &what, || {
            // SAFETY: `ptr` was registered in `register_host` and is unregistered only here.
            unsafe { raw::host_unregister(self.ptr) }
        });
    }
}

/// Page-locks `[ptr, ptr + len)` for the GPU until the returned guard drops.
///
/// # Safety
/// The memory stays mapped until the guard drops.
pub(crate) unsafe fn register_host(
    ctx: &Arc<CudaContext>,
    gpu: usize,
    ptr: *mut u8,
    len: usize,
) -> Result<HostRegistration> {
    if ptr.is_null() || len == 0 {
        return Err(Error::invalid(format!(
            "cannot register host memory at {ptr:p} of {len} bytes with GPU {gpu}: empty region"
        )));
    }
    raw::bind(ctx).on_gpu("cuCtxSetCurrent", gpu)?;
    // SAFETY: the caller keeps the memory mapped until the guard (below) unregisters it.
    unsafe { raw::host_register(ptr, len, sys::CU_MEMHOSTREGISTER_PORTABLE) }.map_err(|e| {
        if e.0 == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
            Error::invalid(format!(
                "host memory at {ptr:p} ({len} bytes) overlaps memory already registered with CUDA"
            ))
        } else {
            error::driver(&format!("cuMemHostRegister({ptr:p}, {len} bytes)"), Some(gpu), e)
        }
    })?;
    let registration = Registration {
        ctx: ctx.clone(),
        gpu,
        ptr,
        len,
    };
    Ok(HostRegistration::new(move || drop(registration)))
}
