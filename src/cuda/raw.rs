//! Thin wrappers over the CUDA driver API (cudarc's `driver::sys` and `driver::result`),
//! returning `Result<_, DriverError>`. This is the only module of [`crate::cuda`] that
//! calls the driver; the safe types of the other modules are built on it.
//!
//! Functions that take raw handles or raw memory are `unsafe`: their callers promise the
//! handles are live and the memory valid. Everything else needs only a loaded driver
//! library (see [`super::probe`]) and, where CUDA says so, a current context
//! ([`bind`]).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::MaybeUninit;

use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys::{self, CUdevice, CUdeviceptr, CUevent, CUfunction, CUmodule, CUresult, CUstream};
use cudarc::driver::CudaContext;

/// Initializes the driver (cuInit); cheap after the first call.
pub(crate) fn init() -> Result<(), DriverError> {
    cu::init()
}

/// The CUDA version the driver supports, as (major, minor).
pub(crate) fn driver_version() -> Result<(u32, u32), DriverError> {
    let mut version: c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
    let version = version.max(0) as u32;
    Ok((version / 1000, (version % 1000) / 10))
}

/// The number of GPUs the driver sees.
pub(crate) fn device_count() -> Result<usize, DriverError> {
    cu::device::get_count().map(|n| n.max(0) as usize)
}

/// The device handle of GPU `ordinal`.
pub(crate) fn device(ordinal: usize) -> Result<CUdevice, DriverError> {
    cu::device::get(ordinal as c_int)
}

/// The product name of `dev`.
pub(crate) fn device_name(dev: CUdevice) -> Result<String, DriverError> {
    let mut buf = [0 as c_char; 256];
    // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `buf`.
    unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as c_int, dev) }.result()?;
    Ok(c_chars_to_string(&buf))
}

/// Total memory of `dev` in bytes.
pub(crate) fn device_total_memory(dev: CUdevice) -> Result<u64, DriverError> {
    // SAFETY: `dev` came from `device` (cuDeviceGet); the call only reads it.
    unsafe { cu::device::total_mem(dev) }.map(|b| b as u64)
}

/// A device attribute of `dev`.
pub(crate) fn device_attribute(dev: CUdevice, attr: sys::CUdevice_attribute) -> Result<i32, DriverError> {
    // SAFETY: `dev` came from `device` (cuDeviceGet); the call only reads it.
    unsafe { cu::device::get_attribute(dev, attr) }
}

/// The PCI address of `dev`, "0000:17:00.0".
pub(crate) fn device_pci_bus_id(dev: CUdevice) -> Result<String, DriverError> {
    let mut buf = [0 as c_char; 64];
    // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `buf`.
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as c_int, dev) }.result()?;
    Ok(c_chars_to_string(&buf))
}

fn c_chars_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Makes `ctx` the calling thread's current context, unless it already is.
pub(crate) fn bind(ctx: &CudaContext) -> Result<(), DriverError> {
    let want = ctx.cu_ctx();
    if cu::ctx::get_current()? != Some(want) {
        // SAFETY: `want` is the live context of `ctx`, which the caller holds.
        unsafe { cu::ctx::set_current(want) }?;
    }
    Ok(())
}

/// Allocates `bytes` of device memory in the current context.
pub(crate) fn mem_alloc(bytes: usize) -> Result<CUdeviceptr, DriverError> {
    // SAFETY: the memory is returned as an address only; nothing reads it here.
    unsafe { cu::malloc_sync(bytes) }
}

/// Frees device memory.
///
/// # Safety
/// `ptr` came from [`mem_alloc`], is freed once, and no queued work still uses it.
pub(crate) unsafe fn mem_free(ptr: CUdeviceptr) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::free_sync(ptr) }
}

/// The allocation holding device address `ptr`: (base, size).
pub(crate) fn mem_address_range(ptr: CUdeviceptr) -> Result<(CUdeviceptr, usize), DriverError> {
    let mut base: CUdeviceptr = 0;
    let mut size: usize = 0;
    // SAFETY: a query; the driver writes two values through valid pointers.
    unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }.result()?;
    Ok((base, size))
}

/// Page-locks existing host memory (cuMemHostRegister).
///
/// # Safety
/// `[ptr, ptr + len)` is mapped host memory that stays mapped until [`host_unregister`].
pub(crate) unsafe fn host_register(ptr: *mut u8, len: usize, flags: u32) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, flags) }.result()
}

/// Undoes [`host_register`].
///
/// # Safety
/// `ptr` is the start of a region registered with [`host_register`], unregistered once.
pub(crate) unsafe fn host_unregister(ptr: *mut u8) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemHostUnregister(ptr.cast()) }.result()
}

/// Creates a stream that does not synchronize with the legacy default stream.
pub(crate) fn stream_create_non_blocking() -> Result<CUstream, DriverError> {
    cu::stream::create(cu::stream::StreamKind::NonBlocking)
}

/// Destroys a stream (work already queued still completes).
///
/// # Safety
/// `stream` came from [`stream_create_non_blocking`] and is destroyed once.
pub(crate) unsafe fn stream_destroy(stream: CUstream) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::stream::destroy(stream) }
}

/// Blocks until all work queued on `stream` has completed.
///
/// # Safety
/// `stream` is live.
pub(crate) unsafe fn stream_synchronize(stream: CUstream) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::stream::synchronize(stream) }
}

/// Makes later work on `stream` wait for `event`.
///
/// # Safety
/// `stream` and `event` are live.
pub(crate) unsafe fn stream_wait_event(stream: CUstream, event: CUevent) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::stream::wait_event(stream, event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
}

/// Creates an event without timing (the cheapest kind).
pub(crate) fn event_create() -> Result<CUevent, DriverError> {
    cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
}

/// Records `event` at the current end of `stream`.
///
/// # Safety
/// `event` and `stream` are live and belong to the current context.
pub(crate) unsafe fn event_record(event: CUevent, stream: CUstream) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::event::record(event, stream) }
}

/// True once the work before `event` has completed (CUDA_ERROR_NOT_READY is `false`).
///
/// # Safety
/// `event` is live.
pub(crate) unsafe fn event_query(event: CUevent) -> Result<bool, DriverError> {
    // SAFETY: the caller's contract.
    match unsafe { cu::event::query(event) } {
        Ok(()) => Ok(true),
        Err(DriverError(CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Blocks until `event` has completed.
///
/// # Safety
/// `event` is live.
pub(crate) unsafe fn event_synchronize(event: CUevent) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::event::synchronize(event) }
}

/// Destroys an event (it may still be pending).
///
/// # Safety
/// `event` came from [`event_create`] and is destroyed once.
pub(crate) unsafe fn event_destroy(event: CUevent) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::event::destroy(event) }
}

/// Queues a device→host copy.
///
/// # Safety
/// `dst` (host) and `src` (device) are valid for `len` bytes until the copy completes, and
/// `stream` is live.
pub(crate) unsafe fn memcpy_dtoh_async(
    dst: *mut u8,
    src: CUdeviceptr,
    len: usize,
    stream: CUstream,
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, len, stream) }.result()
}

/// Queues a host→device copy.
///
/// # Safety
/// As for [`memcpy_dtoh_async`], directions swapped.
pub(crate) unsafe fn memcpy_htod_async(
    dst: CUdeviceptr,
    src: *const u8,
    len: usize,
    stream: CUstream,
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, stream) }.result()
}

/// Queues a device→device copy.
///
/// # Safety
/// Both regions are device memory valid for `len` bytes until the copy completes, and
/// `stream` is live.
pub(crate) unsafe fn memcpy_dtod_async(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
    stream: CUstream,
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::memcpy_dtod_async(dst, src, len, stream) }
}

/// Queues setting `len` bytes at `dst` to `value`.
///
/// # Safety
/// `dst` is device memory valid for `len` bytes until the operation completes; `stream` is live.
pub(crate) unsafe fn memset_d8_async(
    dst: CUdeviceptr,
    value: u8,
    len: usize,
    stream: CUstream,
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::memset_d8_async(dst, value, len, stream) }
}

/// Loads a module from a NUL-terminated PTX image into the current context.
pub(crate) fn module_load_ptx(ptx: &CStr) -> Result<CUmodule, DriverError> {
    // SAFETY: `ptx` is a NUL-terminated text image, as cuModuleLoadData requires; the
    // driver copies it before returning.
    unsafe { cu::module::load_data(ptx.as_ptr().cast()) }
}

/// Loads a module from a CUBIN (an ELF image of machine code) into the current context.
pub(crate) fn module_load_cubin(cubin: &[u8]) -> Result<CUmodule, DriverError> {
    if cubin.len() < 4 || &cubin[..4] != b"\x7fELF" {
        return Err(DriverError(CUresult::CUDA_ERROR_INVALID_IMAGE));
    }
    // SAFETY: `cubin` is a whole ELF image (checked to start like one) that the driver
    // reads within the sizes its header declares, and copies before returning.
    unsafe { cu::module::load_data(cubin.as_ptr().cast()) }
}

/// The function `name` of `module`.
///
/// # Safety
/// `module` is loaded and stays loaded while the function is used.
pub(crate) unsafe fn module_function(module: CUmodule, name: &CStr) -> Result<CUfunction, DriverError> {
    let mut f = MaybeUninit::uninit();
    // SAFETY: the caller's contract; `name` is NUL-terminated and `f` a valid out-pointer.
    unsafe { sys::cuModuleGetFunction(f.as_mut_ptr(), module, name.as_ptr()) }.result()?;
    // SAFETY: initialized by the successful call above.
    Ok(unsafe { f.assume_init() })
}

/// Unloads a module.
///
/// # Safety
/// `module` is loaded, unloaded once, and none of its functions run or will be launched.
pub(crate) unsafe fn module_unload(module: CUmodule) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::module::unload(module) }
}

/// The most blocks of `block` threads of `f` (with no dynamic shared memory) that one
/// multiprocessor holds at once.
///
/// # Safety
/// `f` belongs to a loaded module.
pub(crate) unsafe fn occupancy_max_blocks(f: CUfunction, block: u32) -> Result<u32, DriverError> {
    // SAFETY: the caller's contract; the call only reads the function's attributes.
    let blocks = unsafe { cu::occupancy::max_active_block_per_multiprocessor(f, block as c_int, 0) }?;
    Ok(blocks.max(0) as u32)
}

/// Launches `f` on `stream`.
///
/// # Safety
/// `f` belongs to a loaded module; `params` holds one pointer per kernel parameter, each
/// pointing to a value of that parameter's type (read during this call only); the memory
/// the kernel touches stays valid until the launch completes; `stream` is live.
pub(crate) unsafe fn launch(
    f: CUfunction,
    grid: u32,
    block: u32,
    stream: CUstream,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract.
    unsafe { cu::launch_kernel(f, (grid, 1, 1), (block, 1, 1), 0, stream, params) }
}
