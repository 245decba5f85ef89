//! GPU round trips through both backends: GPU memory → file → GPU memory, byte-exact, for
//! odd sizes at odd file offsets and odd device addresses. Needs an NVIDIA GPU (and, for
//! cuFile, libcufile): run by `scripts/gpu-test.sh`, which sets SPILLWAY_TEST_DIR to each
//! storage to test (a disk directory, /dev/shm).

use std::sync::Arc;

use spillway::cuda::CudaDevice;
use spillway_cufile::{CufileBackend, CufileConfig};
use spillway_runtime::{Backend, Device, IoOp, IoRequest, MemRef, Target};
use spillway_uring::{UringBackend, UringConfig};

const SIZES: [usize; 6] = [1, 511, 4096, 4097, (1 << 20) + 3, 256 << 20];
const OFFSETS: [u64; 3] = [0, 4095, 12345];
const PTR_SHIFTS: [usize; 2] = [0, 3];

fn test_dir() -> (std::path::PathBuf, Option<tempfile::TempDir>) {
    match std::env::var_os("SPILLWAY_TEST_DIR") {
        Some(d) => (d.into(), None),
        None => {
            let t = tempfile::tempdir().unwrap();
            (t.path().to_path_buf(), Some(t))
        }
    }
}

/// Writes `len` bytes of pattern from GPU memory at `file_offset`, reads them back into a
/// poisoned GPU buffer, and checks every byte on the GPU.
fn round_trips(device: &Arc<CudaDevice>, backend: &dyn Backend, name: &str) {
    let (dir, _guard) = test_dir();
    let path = dir.join(format!("spillway-gpu-{name}-{}.dat", std::process::id()));
    let (target, info) = backend.open(&Target::new(&path)).unwrap();
    eprintln!(
        "{name}: {} direct_io={} align={}",
        path.display(),
        info.direct_io,
        info.offset_align
    );
    let src = device.alloc((256 << 20) + 64).unwrap();
    let dst = device.alloc((256 << 20) + 64).unwrap();
    for (i, &len) in SIZES.iter().enumerate() {
        for &offset in &OFFSETS {
            for &shift in &PTR_SHIFTS {
                if len == 256 << 20 && (offset, shift) != (12345, 3) && (offset, shift) != (0, 0) {
                    continue; // the large size twice: aligned and fully unaligned
                }
                let seed = 1000 + i as u64 * 31 + offset + shift as u64;
                let s = src.ptr() + shift as u64;
                let d = dst.ptr() + shift as u64 + 1;
                device.fill_pattern(s, len, seed, 0).unwrap();
                device.fill_pattern(d, len, !seed, 0).unwrap();
                assert!(device.count_pattern_mismatches(d, len, seed, 0).unwrap() > 0 || len < 4);
                let w = IoRequest {
                    target,
                    op: IoOp::Write,
                    offset,
                    mem: MemRef::Device { ptr: s, len },
                };
                // SAFETY: both buffers outlive the calls, which wait for completion.
                let written = unsafe { backend.run(w) }.unwrap();
                assert_eq!(written, len);
                let r = IoRequest {
                    op: IoOp::Read,
                    mem: MemRef::Device { ptr: d, len },
                    ..w
                };
                let read = unsafe { backend.run(r) }.unwrap();
                assert_eq!(read, len);
                let bad = device.count_pattern_mismatches(d, len, seed, 0).unwrap();
                assert_eq!(
                    bad, 0,
                    "{name}: len {len} offset {offset} shift {shift}: {bad} bytes differ"
                );
            }
        }
    }
    backend.flush(target).unwrap();
    backend.close(target).unwrap();
    std::fs::remove_file(&path).unwrap();
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn uring_round_trips_from_gpu_memory() {
    let device = CudaDevice::new(0).unwrap();
    let backend = UringBackend::new(device.clone(), UringConfig::default()).unwrap();
    round_trips(&device, &backend, "uring");
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn cufile_round_trips_from_gpu_memory() {
    let device = CudaDevice::new(0).unwrap();
    let backend = CufileBackend::new(device.context().clone(), CufileConfig::default()).unwrap();
    eprintln!("cufile mode: {:?}", backend.info().transfer_mode);
    round_trips(&device, &backend, "cufile");
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn uring_reports_host_staging_for_gpu_memory() {
    let device = CudaDevice::new(0).unwrap();
    let backend = UringBackend::new(device, UringConfig::default()).unwrap();
    assert!(backend.info().host_staging);
}
