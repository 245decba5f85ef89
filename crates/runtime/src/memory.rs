//! Memory the runtime moves: device allocations, pinned host buffers, aligned host buffers,
//! and [`MemRef`], the (where, how long) of one I/O's memory.

use std::fmt;

use crate::error::{Error, Result};

/// An address in a [`Device`](crate::Device)'s memory (`CUdeviceptr` for CUDA; a host
/// address for the host device).
pub type DevicePtr = u64;

/// The memory side of one I/O request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemRef {
    /// Host memory: pageable or pinned.
    Host {
        /// First byte.
        ptr: *mut u8,
        /// Length in bytes.
        len: usize,
    },
    /// Device memory of the backend's device.
    Device {
        /// First byte.
        ptr: DevicePtr,
        /// Length in bytes.
        len: usize,
    },
}

// SAFETY: a MemRef is only an address and a length; whoever submits it promises the memory
// stays valid until the request completes (see `Backend::submit`).
unsafe impl Send for MemRef {}
// SAFETY: as above; MemRef has no interior mutability.
unsafe impl Sync for MemRef {}

impl MemRef {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match *self {
            MemRef::Host { len, .. } | MemRef::Device { len, .. } => len,
        }
    }

    /// True when the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True for device memory.
    pub fn is_device(&self) -> bool {
        matches!(self, MemRef::Device { .. })
    }

    /// The sub-region `[start, start + len)`.
    pub fn slice(&self, start: usize, len: usize) -> MemRef {
        assert!(start + len <= self.len(), "MemRef::slice out of range");
        match *self {
            // SAFETY: in bounds of the original region, checked above.
            MemRef::Host { ptr, .. } => MemRef::Host {
                ptr: unsafe { ptr.add(start) },
                len,
            },
            MemRef::Device { ptr, .. } => MemRef::Device {
                ptr: ptr + start as u64,
                len,
            },
        }
    }

    /// The start address as an integer, for alignment checks.
    pub fn addr(&self) -> u64 {
        match *self {
            MemRef::Host { ptr, .. } => ptr as u64,
            MemRef::Device { ptr, .. } => ptr,
        }
    }
}

type Release = Box<dyn FnOnce() + Send + Sync>;

/// An allocation of device memory, freed on drop.
pub struct DeviceBuffer {
    ptr: DevicePtr,
    len: usize,
    release: Option<Release>,
}

impl DeviceBuffer {
    /// Wraps a raw allocation; `release` frees it and runs exactly once, on drop.
    pub fn from_raw(ptr: DevicePtr, len: usize, release: impl FnOnce() + Send + Sync + 'static) -> Self {
        DeviceBuffer {
            ptr,
            len,
            release: Some(Box::new(release)),
        }
    }

    /// The device address of the first byte.
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer as an I/O region.
    pub fn as_mem(&self) -> MemRef {
        MemRef::Device {
            ptr: self.ptr,
            len: self.len,
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.len)
    }
}

/// Page-locked host memory, usable by the device's copy engine (and registrable with
/// io_uring), freed on drop.
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    release: Option<Release>,
}

// SAFETY: the buffer owns its memory exclusively; access goes through &self / &mut self.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only hands out shared slices.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Wraps a raw pinned allocation. `release` frees it, once, on drop.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes until `release` runs, and
    /// nothing else may free it.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize, release: impl FnOnce() + Send + Sync + 'static) -> Self {
        PinnedBuffer {
            ptr,
            len,
            release: Some(Box::new(release)),
        }
    }

    /// First byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (from_raw's contract).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The whole buffer as an I/O region.
    pub fn as_mem(&self) -> MemRef {
        MemRef::Host {
            ptr: self.ptr,
            len: self.len,
        }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinnedBuffer({:p}, {} bytes)", self.ptr, self.len)
    }
}

/// Host memory aligned for O_DIRECT (page-aligned by default), zeroed at allocation.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: owns its memory exclusively.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out shared slices.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes aligned to `align` (a power of two). A zero `len` is rounded up
    /// to one alignment unit so the pointer is always real.
    pub fn new(len: usize, align: usize) -> Result<Self> {
        if !align.is_power_of_two() {
            return Err(Error::invalid(format!("alignment {align} is not a power of two")));
        }
        let layout = std::alloc::Layout::from_size_align(len.max(align), align)
            .map_err(|e| Error::invalid(format!("cannot allocate {len} bytes aligned to {align}: {e}")))?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::OutOfMemory {
                kind: "host",
                bytes: layout.size(),
            });
        }
        Ok(AlignedBuf { ptr, len, layout })
    }

    /// First byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() >= len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The whole buffer as a host I/O region.
    pub fn as_mem(&self) -> MemRef {
        MemRef::Host {
            ptr: self.ptr,
            len: self.len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({:p}, {} bytes)", self.ptr, self.len)
    }
}
