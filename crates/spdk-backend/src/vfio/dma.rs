//! DMA memory: [`DmaBuffer`] is page-aligned anonymous memory mapped into the container's
//! IOMMU at an IOVA chosen by the container's [`IovaAllocator`]; the device addresses it by
//! that IOVA. Unmapped from the IOMMU, its IOVA range freed and the memory unmapped on drop.

use std::collections::BTreeMap;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use super::container::Container;
use super::{page_size, Result, VfioError};

/// A first-fit allocator of IOVA ranges in `[base, end)`, with coalescing frees.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    /// Free ranges: start -> end (exclusive), disjoint and never adjacent.
    free: BTreeMap<u64, u64>,
    base: u64,
    end: u64,
}

impl IovaAllocator {
    /// An allocator handing out addresses in `[base, end)`.
    pub fn new(base: u64, end: u64) -> Self {
        let mut free = BTreeMap::new();
        if end > base {
            free.insert(base, end);
        }
        IovaAllocator { free, base, end }
    }

    /// The managed range.
    pub fn range(&self) -> (u64, u64) {
        (self.base, self.end)
    }

    /// The total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }

    /// Allocates `size` bytes aligned to `align` (a power of two) at the lowest fitting
    /// address, or `None` if no free range fits.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let (start, end, at) = self.free.iter().find_map(|(&start, &end)| {
            let at = start.checked_add(align - 1)? & !(align - 1);
            let stop = at.checked_add(size)?;
            (stop <= end).then_some((start, end, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at);
        }
        if at + size < end {
            self.free.insert(at + size, end);
        }
        Some(at)
    }

    /// Returns `[iova, iova + size)` to the free space. Returns false (and changes nothing)
    /// if the range lies outside the managed range or overlaps free space (a double free).
    pub fn free(&mut self, iova: u64, size: u64) -> bool {
        let Some(mut stop) = iova.checked_add(size) else {
            return false;
        };
        if size == 0 || iova < self.base || stop > self.end {
            return false;
        }
        let mut start = iova;
        let prev = self.free.range(..=iova).next_back().map(|(&s, &e)| (s, e));
        let next = self.free.range(iova..).next().map(|(&s, &e)| (s, e));
        if prev.is_some_and(|(_, e)| e > iova) || next.is_some_and(|(s, _)| s < stop) {
            return false;
        }
        if let Some((s, e)) = prev {
            if e == iova {
                self.free.remove(&s);
                start = s;
            }
        }
        if let Some((s, e)) = next {
            if s == stop {
                self.free.remove(&s);
                stop = e;
            }
        }
        self.free.insert(start, stop);
        true
    }
}

/// Memory the device can DMA to and from, at [`DmaBuffer::iova`].
#[derive(Debug)]
pub struct DmaBuffer {
    container: Arc<Container>,
    ptr: NonNull<u8>,
    len: usize,
    iova: u64,
}

// SAFETY: the buffer owns its anonymous mapping exclusively; access goes through `&self`
// (shared slices) and `&mut self` (exclusive slices), as for a `Vec<u8>`.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above.
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    /// Allocates `size` bytes (rounded up to whole pages) of zeroed, page-aligned memory and
    /// maps it for device reads and writes. Buffers of 2 MiB or more get a 2 MiB-aligned
    /// IOVA so the IOMMU can use large pages.
    pub fn new(container: &Arc<Container>, size: usize) -> Result<DmaBuffer> {
        let page = page_size();
        if size == 0 {
            return Err(VfioError::InvalidDma("a DMA buffer of 0 bytes".into()));
        }
        let len = size
            .checked_next_multiple_of(page)
            .ok_or_else(|| VfioError::InvalidDma(format!("{size} bytes overflows when rounded to pages")))?;
        let align: u64 = if len >= 2 << 20 { 2 << 20 } else { page as u64 };

        // SAFETY: a fresh private anonymous mapping; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioError::Mmap {
                what: "anonymous DMA memory".into(),
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap does not return null on success");
        let unmap_mem = || {
            // SAFETY: `ptr`/`len` are the mapping just made, not yet handed out.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        };

        let Some(iova) = container.iova().alloc(len as u64, align) else {
            unmap_mem();
            return Err(VfioError::IovaExhausted {
                size: len as u64,
                align,
            });
        };
        if let Err(e) = container.map_dma(ptr.as_ptr() as u64, iova, len as u64) {
            container.iova().free(iova, len as u64);
            unmap_mem();
            return Err(e);
        }
        Ok(DmaBuffer {
            container: Arc::clone(container),
            ptr,
            len,
            iova,
        })
    }

    /// The address the device uses for the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The CPU address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The contents. The device may write them concurrently while it is running a command
    /// on this buffer; read them after the command completes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live, initialized (zero-filled) mapping of `len` bytes owned by
        // `self`, so the borrow cannot outlive it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The contents, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // Order: the IOMMU mapping first (the device must not reach memory being freed),
        // then the IOVA range, then the memory.
        if self.container.unmap_dma(self.iova, self.len as u64).is_ok() {
            self.container.iova().free(self.iova, self.len as u64);
        }
        // If the unmap failed the IOVA range stays allocated (the mapping may still exist);
        // the container is alive (we hold an Arc), so this only happens if the kernel
        // refused, and reusing the range would be worse than leaking it.
        // SAFETY: `ptr`/`len` are the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB2: u64 = 2 << 20;

    #[test]
    fn first_fit_and_alignment() {
        let mut a = IovaAllocator::new(0x1000, 0x100_0000);
        assert_eq!(a.alloc(0x1000, 0x1000), Some(0x1000));
        assert_eq!(a.alloc(0x1000, 0x1000), Some(0x2000));
        // 2 MiB alignment skips ahead and leaves the gap free.
        assert_eq!(a.alloc(MB2, MB2), Some(MB2));
        assert_eq!(a.alloc(0x1000, 0x1000), Some(0x3000));
        assert_eq!(a.free_bytes(), 0x100_0000 - 0x1000 - 3 * 0x1000 - MB2);
    }

    #[test]
    fn free_coalesces_and_reuses_lowest() {
        let mut a = IovaAllocator::new(0, 0x10000);
        let x = a.alloc(0x1000, 0x1000).unwrap();
        let y = a.alloc(0x1000, 0x1000).unwrap();
        let z = a.alloc(0x1000, 0x1000).unwrap();
        assert_eq!((x, y, z), (0, 0x1000, 0x2000));
        assert!(a.free(x, 0x1000));
        assert!(a.free(z, 0x1000));
        assert!(a.free(y, 0x1000));
        assert_eq!(a.free_bytes(), 0x10000);
        // Fully coalesced: one range, so a whole-space allocation fits.
        assert_eq!(a.alloc(0x10000, 0x1000), Some(0));
        assert_eq!(a.alloc(0x1000, 0x1000), None);
    }

    #[test]
    fn exhaustion_and_bad_requests() {
        let mut a = IovaAllocator::new(0, 0x4000);
        assert_eq!(a.alloc(0x5000, 0x1000), None);
        assert_eq!(a.alloc(0, 0x1000), None);
        assert_eq!(a.alloc(0x1000, 3), None);
        assert_eq!(a.alloc(0x4000, 0x1000), Some(0));
        assert_eq!(a.alloc(0x1000, 0x1000), None);
    }

    #[test]
    fn rejects_double_free_and_foreign_ranges() {
        let mut a = IovaAllocator::new(0x1000, 0x9000);
        let x = a.alloc(0x2000, 0x1000).unwrap();
        assert!(a.free(x, 0x2000));
        assert!(!a.free(x, 0x2000), "double free");
        assert!(!a.free(0, 0x1000), "below base");
        assert!(!a.free(0x8000, 0x2000), "past end");
        assert!(!a.free(u64::MAX, 2), "overflow");
        let y = a.alloc(0x1000, 0x1000).unwrap();
        assert!(!a.free(y, 0x2000), "overlaps free space");
        assert!(a.free(y, 0x1000));
    }

    #[test]
    fn alloc_near_top_does_not_overflow() {
        let mut a = IovaAllocator::new(u64::MAX - 0x1FFF, u64::MAX);
        assert_eq!(a.alloc(0x1000, 1 << 63), None);
        assert_eq!(a.alloc(0x1000, 0x1000), Some(u64::MAX - 0x1FFF));
    }

    #[test]
    fn container_range_is_above_msi_window() {
        use crate::vfio::container::{IOVA_BASE, IOVA_END};
        let a = IovaAllocator::new(IOVA_BASE, IOVA_END);
        assert!(a.range().0 > 0xFEE0_0000);
        assert_eq!(a.range().1, 1 << 39);
    }
}
