//! Moving tensors: offload, fetch, prefetch, release and drain. A tensor is given as its
//! memory regions; a CUDA stream as its raw handle (`cudaStream_t` / `CUstream`), borrowed
//! for the call only.

use std::ffi::{c_int, c_void};

use spillway_runtime::engine::{Handle, Region, TensorKey};

use crate::args;
use crate::engine::{opened, spillway_engine};
use crate::error::guard;
use crate::status::Failure;

/// A handle on an offloaded tensor, from `spillway_engine_offload`.
pub type spillway_handle = u64;

/// A piece of a tensor's memory: `length` bytes at `address` (GPU memory of the engine's
/// device, or host memory for an engine on the host).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct spillway_region {
    /// The first byte.
    pub address: *mut c_void,
    /// The number of bytes.
    pub length: usize,
}

/// The regions at `regions` as the runtime's.
///
/// # Safety
/// `regions` is NULL or an array of `n` regions.
unsafe fn regions_of(
    regions: *const spillway_region,
    n: usize,
) -> Result<Vec<Region>, crate::status::Failure> {
    // SAFETY: forwarded contract.
    let regions = unsafe { args::array(regions, n, "regions")? };
    Ok(regions
        .iter()
        .map(|r| Region::new(r.address as u64, r.length as u64))
        .collect())
}

/// The raw stream handle; NULL is none.
fn stream_of(stream: *mut c_void) -> Option<u64> {
    (!stream.is_null()).then_some(stream as u64)
}

/// Offloads a tensor and stores its handle in `*handle`, at once (the write goes on in the
/// background).
///
/// `storage` and `version` name its bytes: the same pair offloaded again with the same
/// memory is stored once (a tensor whose bytes change must be offloaded under a new
/// version). `regions` are its `n_regions` pieces. `stream` is the CUDA stream that
/// produces it: the engine reads the memory once the work queued there so far is done.
/// NULL means the memory is ready now; to follow the legacy default stream, pass
/// `CU_STREAM_LEGACY` (`cudaStreamLegacy`). With host memory, `stream` must be NULL.
///
/// The memory must stay allocated and unmodified until `spillway_engine_source_released`
/// says so (or `spillway_engine_wait_source_released` returns).
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `regions` is NULL (with `n_regions` 0)
/// or an array of `n_regions`, describing memory that stays as said above; `stream` is
/// NULL or a live stream of the engine's GPU (its primary context); `handle` is NULL or
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_offload(
    engine: *const spillway_engine,
    storage: u64,
    version: u64,
    regions: *const spillway_region,
    n_regions: usize,
    stream: *mut c_void,
    handle: *mut spillway_handle,
) -> c_int {
    guard("spillway_engine_offload", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        let (opened, regions) = unsafe { (opened(engine)?, regions_of(regions, n_regions)?) };
        if handle.is_null() {
            // Checked first: a handle the caller cannot see could never be released.
            // SAFETY: writes nothing to a NULL pointer; refuses it.
            return unsafe { args::put(handle, 0, "handle") };
        }
        // SAFETY: the caller keeps the memory allocated and unmodified until the engine
        // releases it, and `stream` is live for this call (the contract).
        let h = unsafe { opened.offload(TensorKey::new(storage, version), &regions, stream_of(stream))? };
        // SAFETY: `handle` is not NULL, so writable (the contract).
        unsafe { args::put(handle, h.0, "handle") }
    })
}

/// Stores in `*released` whether the engine no longer reads the memory of the tensor
/// behind `handle`: once true, its owner may free or reuse it.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `released` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_source_released(
    engine: *const spillway_engine,
    handle: spillway_handle,
    released: *mut bool,
) -> c_int {
    guard("spillway_engine_source_released", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        let opened = unsafe { opened(engine)? };
        if released.is_null() {
            // SAFETY: writes nothing to a NULL pointer; refuses it.
            return unsafe { args::put(released, false, "released") };
        }
        let is = opened.source_released(Handle(handle))?;
        // SAFETY: as above.
        unsafe { args::put(released, is, "released") }
    })
}

/// Waits until the engine no longer reads the memory offloaded as `handle` (its write is
/// done, or was dropped) and stores true in `*released` (when not NULL). Returns at once,
/// storing false, when the engine keeps using that memory until the handle is released
/// because it has no copy of the tensor on storage: the storage was full (the stats'
/// `resident_tensors`), the write failed, or every handle fetched the tensor before its
/// write started. Waiting would then never end.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `released` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_wait_source_released(
    engine: *const spillway_engine,
    handle: spillway_handle,
    released: *mut bool,
) -> c_int {
    guard("spillway_engine_wait_source_released", || {
        // SAFETY: `engine` is NULL or open (the contract).
        let opened = unsafe { opened(engine)? };
        let done = opened.wait_source_released(Handle(handle))?;
        if !released.is_null() {
            // SAFETY: not NULL, so writable (the contract).
            unsafe { args::put(released, done, "released")? };
        }
        Ok(())
    })
}

/// Starts reading the tensor behind `handle` ahead into staging memory, so that a later
/// fetch is served from there.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_prefetch(
    engine: *const spillway_engine,
    handle: spillway_handle,
) -> c_int {
    guard("spillway_engine_prefetch", || {
        // SAFETY: `engine` is NULL or open (the contract).
        let opened = unsafe { opened(engine)? };
        opened.engine.prefetch(Handle(handle)).map_err(Failure::from)
    })
}

/// Copies the tensor behind `handle` into `regions` (`n_regions` pieces of memory totalling
/// its size). With `stream`, the copy waits for the work queued there so far (the memory's
/// previous users) and the stream's later work waits for the copy: the call returns
/// without waiting for the GPU. With NULL, it returns once the bytes are in place. With
/// host memory, `stream` must be NULL.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `regions` is NULL (with `n_regions` 0)
/// or an array of `n_regions`, describing live memory used by nothing else until the copy
/// is done (with a stream: by nothing but that stream's work); `stream` is NULL or a live
/// stream of the engine's GPU (its primary context).
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_fetch(
    engine: *const spillway_engine,
    handle: spillway_handle,
    regions: *const spillway_region,
    n_regions: usize,
    stream: *mut c_void,
) -> c_int {
    guard("spillway_engine_fetch", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        let (opened, regions) = unsafe { (opened(engine)?, regions_of(regions, n_regions)?) };
        // SAFETY: the memory is the caller's and free for the copy, and `stream` is live
        // for this call (the contract).
        unsafe { opened.fetch(Handle(handle), &regions, stream_of(stream)) }.map_err(Failure::from)
    })
}

/// Drops a handle; the stored copy goes with the last handle of its storage and version.
/// Releasing the last handle of a pair returns once the engine no longer reads the
/// tensor's memory (a write under way is finished first; one not yet started is
/// dropped): the memory may be freed then.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_release(
    engine: *const spillway_engine,
    handle: spillway_handle,
) -> c_int {
    guard("spillway_engine_release", || {
        // SAFETY: `engine` is NULL or open (the contract).
        let opened = unsafe { opened(engine)? };
        opened.release(Handle(handle)).map_err(Failure::from)
    })
}

/// Writes out everything offloaded so far and waits until every accepted write has
/// finished (or failed and been kept in memory).
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_drain(engine: *const spillway_engine) -> c_int {
    guard("spillway_engine_drain", || {
        // SAFETY: `engine` is NULL or open (the contract).
        let opened = unsafe { opened(engine)? };
        opened.engine.drain().map_err(Failure::from)
    })
}
