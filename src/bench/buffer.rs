//! The benchmark's data buffer, in GPU or host memory, with the pattern helpers that fill,
//! poison and check it.

use std::sync::Arc;

use spillway_runtime::{pattern, AlignedBuf, Device, DeviceBuffer, MemRef, Result};

use crate::select::Memory;

/// Seed mixed into the data seed to poison buffers before reads: every byte a correct read
/// must overwrite then differs (with overwhelming probability) from the expected data.
const POISON: u64 = 0xdead_beef_0bad_f00d;

/// A buffer the benchmark moves data from and to.
pub struct BenchBuffer {
    storage: Storage,
    device: Arc<dyn Device>,
}

enum Storage {
    Host(AlignedBuf),
    Gpu(DeviceBuffer),
}

impl BenchBuffer {
    /// `len` bytes of `memory`, allocated through `device`.
    pub fn new(memory: &Memory, device: Arc<dyn Device>, len: u64) -> Result<Self> {
        let len = len as usize;
        let storage = match memory {
            Memory::Host => Storage::Host(AlignedBuf::new(len, 4096)?),
            Memory::Gpu(_) => Storage::Gpu(device.alloc(len)?),
        };
        Ok(BenchBuffer { storage, device })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match &self.storage {
            Storage::Host(b) => b.len() as u64,
            Storage::Gpu(b) => b.len() as u64,
        }
    }

    /// The region `[offset, offset + len)`.
    pub fn region(&self, offset: u64, len: u64) -> MemRef {
        let whole = match &self.storage {
            Storage::Host(b) => b.as_mem(),
            Storage::Gpu(b) => b.as_mem(),
        };
        whole.slice(offset as usize, len as usize)
    }

    /// Fills the buffer with the pattern for `seed` (byte i = pattern byte i).
    pub fn fill(&mut self, seed: u64) -> Result<()> {
        match &mut self.storage {
            Storage::Host(b) => {
                pattern::fill(b.as_mut_slice(), seed, 0);
                Ok(())
            }
            Storage::Gpu(b) => self.device.fill_pattern(b.ptr(), b.len(), seed, 0),
        }
    }

    /// Overwrites the buffer with data unlike the pattern for `seed`.
    pub fn poison(&mut self, seed: u64) -> Result<()> {
        self.fill(seed ^ POISON)
    }

    /// Bytes that differ from the pattern for `seed`.
    pub fn mismatches(&self, seed: u64) -> Result<u64> {
        match &self.storage {
            Storage::Host(b) => Ok(pattern::count_mismatches(b.as_slice(), seed, 0)),
            Storage::Gpu(b) => self.device.count_pattern_mismatches(b.ptr(), b.len(), seed, 0),
        }
    }
}
