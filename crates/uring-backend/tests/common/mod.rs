//! Helpers shared by the integration tests: a backend on the host device, targets in a
//! temporary directory, and memory of each kind filled with / checked against the pattern.

#![allow(dead_code)]

pub mod slow_device;

use std::sync::Arc;

use spillway_runtime::{
    pattern, AlignedBuf, Backend, Device, DeviceBuffer, DirectIo, HostDevice, IoOp, IoRequest, MemRef,
    Target, TargetId, Ticket,
};
use spillway_uring::{UringBackend, UringConfig};

/// The host device, shared.
pub fn device() -> Arc<dyn Device> {
    Arc::new(HostDevice::new())
}

/// A backend with `config` on the host device.
pub fn backend(config: UringConfig) -> UringBackend {
    UringBackend::new(device(), config).expect("io_uring backend")
}

/// A small configuration with few buffers, so that requests contend for them.
pub fn small_config() -> UringConfig {
    UringConfig {
        queue_depth: 4,
        threads: 1,
        chunk_size: 64 << 10,
        staging_buffers: 2,
    }
}

/// Opens `name` in `dir` with O_DIRECT required.
pub fn open_direct(backend: &UringBackend, dir: &tempfile::TempDir, name: &str) -> TargetId {
    let (id, info) = backend
        .open(&Target::new(dir.path().join(name)).direct(DirectIo::Required))
        .expect("open target");
    assert!(
        info.direct_io,
        "O_DIRECT should be in effect on {}",
        dir.path().display()
    );
    id
}

/// The kinds of memory a request can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    /// Page-aligned host memory: the direct path.
    HostAligned,
    /// Host memory one byte past a page boundary: staged with memcpy.
    HostMisaligned,
    /// Host-device "device" memory: staged with stream copies.
    Device,
}

pub const ALL_KINDS: [MemKind; 3] = [MemKind::HostAligned, MemKind::HostMisaligned, MemKind::Device];

/// Memory of one kind, owning its allocation.
pub enum Memory {
    Host {
        buf: AlignedBuf,
        shift: usize,
        len: usize,
    },
    Device {
        buf: DeviceBuffer,
    },
}

impl Memory {
    /// `len` zeroed bytes of `kind`.
    pub fn new(kind: MemKind, len: usize) -> Memory {
        match kind {
            MemKind::HostAligned => Memory::Host {
                buf: AlignedBuf::new(len, 4096).unwrap(),
                shift: 0,
                len,
            },
            MemKind::HostMisaligned => Memory::Host {
                buf: AlignedBuf::new(len + 1, 4096).unwrap(),
                shift: 1,
                len,
            },
            MemKind::Device => {
                let buf = HostDevice::new().alloc(len).unwrap();
                // SAFETY: the host device's memory is host memory of `len` bytes.
                unsafe { std::ptr::write_bytes(buf.ptr() as *mut u8, 0, len) };
                Memory::Device { buf }
            }
        }
    }

    /// `len` bytes of `kind` holding the pattern for `seed` as if starting at `offset`.
    pub fn with_pattern(kind: MemKind, len: usize, seed: u64, offset: u64) -> Memory {
        let mut mem = Memory::new(kind, len);
        pattern::fill(mem.bytes_mut(), seed, offset);
        mem
    }

    pub fn mem_ref(&self) -> MemRef {
        match self {
            Memory::Host { buf, shift, len } => MemRef::Host {
                ptr: buf.as_ptr().wrapping_add(*shift),
                len: *len,
            },
            Memory::Device { buf } => buf.as_mem(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Memory::Host { buf, shift, len } => &buf.as_slice()[*shift..*shift + *len],
            // SAFETY: the host device's memory is host memory of `len` bytes, alive as long
            // as `buf`.
            Memory::Device { buf } => unsafe {
                std::slice::from_raw_parts(buf.ptr() as *const u8, buf.len())
            },
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Memory::Host { buf, shift, len } => &mut buf.as_mut_slice()[*shift..*shift + *len],
            // SAFETY: as in `bytes`, and we hold `&mut self`.
            Memory::Device { buf } => unsafe {
                std::slice::from_raw_parts_mut(buf.ptr() as *mut u8, buf.len())
            },
        }
    }

    /// Asserts that the memory holds the pattern for `seed` starting at `offset`.
    pub fn assert_pattern(&self, seed: u64, offset: u64, what: &str) {
        if let Some(first) = first_difference(self.bytes(), seed, offset) {
            panic!(
                "{what}: {} of {} bytes differ from the pattern; first at byte {first}",
                pattern::count_mismatches(self.bytes(), seed, offset),
                self.bytes().len()
            );
        }
    }
}

/// The first byte of `bytes` that differs from the pattern, compared a megabyte at a time
/// (fast even in debug builds).
pub fn first_difference(bytes: &[u8], seed: u64, offset: u64) -> Option<usize> {
    let mut expected = vec![0u8; 1 << 20];
    let mut start = 0;
    for chunk in bytes.chunks(expected.len()) {
        let expected = &mut expected[..chunk.len()];
        pattern::fill(expected, seed, offset + start as u64);
        if chunk != expected {
            let at = chunk.iter().zip(expected.iter()).position(|(a, b)| a != b);
            return at.map(|i| start + i);
        }
        start += chunk.len();
    }
    None
}

/// Submits a request for `mem`.
pub fn submit(backend: &UringBackend, target: TargetId, op: IoOp, offset: u64, mem: &Memory) -> Ticket {
    // SAFETY: every caller keeps `mem` alive and untouched until the ticket completes.
    unsafe {
        backend.submit(IoRequest {
            target,
            op,
            offset,
            mem: mem.mem_ref(),
        })
    }
    .expect("submit")
}

/// Runs one request to completion.
pub fn run(
    backend: &UringBackend,
    target: TargetId,
    op: IoOp,
    offset: u64,
    mem: &Memory,
) -> spillway_runtime::Result<usize> {
    // SAFETY: `run` returns only after the request completed; `mem` outlives the call.
    unsafe {
        backend.run(IoRequest {
            target,
            op,
            offset,
            mem: mem.mem_ref(),
        })
    }
}
