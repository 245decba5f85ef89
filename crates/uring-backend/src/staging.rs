//! The staging buffers of one ring: pinned host memory from the device (so its copy engine
//! can reach it), registered with io_uring (so reads and writes use `ReadFixed` /
//! `WriteFixed` without mapping pages on every I/O).

use spillway_runtime::{Device, PinnedBuffer, Result};

/// Index of a staging buffer: also its index among the ring's registered buffers.
pub type BufferIndex = u16;

/// A fixed set of equally sized staging buffers and the list of those not in use.
#[derive(Debug)]
pub struct StagingPool {
    buffers: Vec<PinnedBuffer>,
    free: Vec<BufferIndex>,
    buffer_size: usize,
}

impl StagingPool {
    /// Allocates `count` pinned buffers of `buffer_size` bytes each.
    pub fn new(device: &dyn Device, count: usize, buffer_size: usize) -> Result<Self> {
        debug_assert!(count >= 1 && count <= usize::from(BufferIndex::MAX));
        let buffers = (0..count)
            .map(|_| device.alloc_pinned(buffer_size))
            .collect::<Result<Vec<_>>>()?;
        // Hand out low indices first, so a lightly loaded ring keeps reusing warm buffers.
        let free = (0..count as BufferIndex).rev().collect();
        Ok(StagingPool {
            buffers,
            free,
            buffer_size,
        })
    }

    /// Size of every buffer.
    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.buffers.len()
    }

    /// The largest power of two that divides every buffer's address (capped at 1 MiB).
    pub fn address_alignment(&self) -> usize {
        self.buffers
            .iter()
            .map(|b| 1usize << (b.as_ptr() as usize).trailing_zeros().min(20))
            .min()
            .unwrap_or(1)
    }

    /// Takes a free buffer, if there is one.
    pub fn acquire(&mut self) -> Option<BufferIndex> {
        self.free.pop()
    }

    /// Gives a buffer back.
    pub fn release(&mut self, index: BufferIndex) {
        debug_assert!(
            !self.free.contains(&index),
            "staging buffer {index} released twice"
        );
        self.free.push(index);
    }

    /// True when every buffer is free.
    pub fn all_free(&self) -> bool {
        self.free.len() == self.buffers.len()
    }

    /// First byte of buffer `index`.
    pub fn ptr(&self, index: BufferIndex) -> *mut u8 {
        self.buffers[usize::from(index)].as_ptr()
    }

    /// The buffers as an iovec array, for `io_uring_register(IORING_REGISTER_BUFFERS)`.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.buffers
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_runtime::HostDevice;

    #[test]
    fn buffers_are_handed_out_once_and_come_back() {
        let mut pool = StagingPool::new(&HostDevice::new(), 3, 8192).unwrap();
        assert_eq!(pool.count(), 3);
        assert!(pool.address_alignment() >= 4096);
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        let c = pool.acquire().unwrap();
        assert_eq!(pool.acquire(), None);
        assert_ne!(pool.ptr(a), pool.ptr(b));
        pool.release(b);
        assert_eq!(pool.acquire(), Some(b));
        pool.release(a);
        pool.release(b);
        pool.release(c);
        assert!(pool.all_free());
        assert_eq!(pool.iovecs().len(), 3);
    }
}
