//! Helpers shared by the GPU test programs (each includes this file as `mod common`).

#![allow(dead_code)] // each program uses its own part

use std::sync::Arc;

use spillway::cuda::{self, CudaDevice};
use spillway::runtime::{Device, DeviceBuffer};

/// splitmix64: a small, seedable generator (the tests need no better).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Log-uniform in `[lo, hi]`: as many short lengths as long ones.
    pub fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), (hi as f64 + 1.0).ln());
        let x = a + (b - a) * (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (x.exp() as u64).clamp(lo, hi)
    }

    pub fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// GPU 0, with where its kernels came from printed.
pub fn gpu() -> Arc<CudaDevice> {
    let dev = CudaDevice::new(0).unwrap_or_else(|e| panic!("cannot attach to GPU 0: {e}"));
    eprintln!("{dev:?}; kernels: {}", cuda::kernel_build());
    dev
}

/// `len` bytes of device memory, or a panic saying why not.
pub fn alloc(dev: &dyn Device, len: u64) -> DeviceBuffer {
    dev.alloc(len as usize)
        .unwrap_or_else(|e| panic!("cannot allocate {len} bytes: {e}"))
}

/// Copies `data` to `dst` and waits.
pub fn upload(dev: &dyn Device, dst: u64, data: &[u8]) {
    // SAFETY: `data` is live for the call, which waits; the callers pass regions inside
    // their own device buffers.
    unsafe { dev.copy_from_host_sync(dst, data.as_ptr(), data.len()) }
        .unwrap_or_else(|e| panic!("H2D copy of {} bytes to {dst:#x} failed: {e}", data.len()));
}

/// `len` bytes copied from `src`.
pub fn download(dev: &dyn Device, src: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    // SAFETY: as in `upload`.
    unsafe { dev.copy_to_host_sync(out.as_mut_ptr(), src, len as usize) }
        .unwrap_or_else(|e| panic!("D2H copy of {len} bytes from {src:#x} failed: {e}"));
    out
}
