//! The offload engine on a GPU, end to end through both backends: tensors of odd sizes at
//! odd device addresses are offloaded (packed by the CUDA kernel, or written straight from
//! GPU memory when large), the GPU copies poisoned, and everything fetched back in reverse
//! order with prefetch and checked byte for byte on the GPU. Needs an NVIDIA GPU (and
//! libcufile for cuFile): run by `scripts/gpu-test.sh` with SPILLWAY_TEST_DIR set to each
//! storage to test.

use std::sync::Arc;

use spillway::cuda::CudaDevice;
use spillway_cufile::{CufileBackend, CufileConfig};
use spillway_runtime::engine::{Engine, EngineConfig, Region, StorageTarget, TensorKey};
use spillway_runtime::{pattern, Backend, Device, Target};
use spillway_uring::{UringBackend, UringConfig};

fn test_dir() -> (std::path::PathBuf, Option<tempfile::TempDir>) {
    match std::env::var_os("SPILLWAY_TEST_DIR") {
        Some(d) => (d.into(), None),
        None => {
            let t = tempfile::tempdir().unwrap();
            (t.path().to_path_buf(), Some(t))
        }
    }
}

fn engine(
    dev: &Arc<CudaDevice>,
    backend: Arc<dyn Backend>,
    name: &str,
    cfg: EngineConfig,
) -> (Engine, std::path::PathBuf) {
    let (dir, _guard) = test_dir();
    let path = dir.join(format!("spillway-gpu-engine-{name}-{}.dat", std::process::id()));
    let device: Arc<dyn Device> = dev.clone();
    let e = Engine::new(
        device,
        backend,
        vec![StorageTarget::new(Target::new(&path), 8 << 30)],
        cfg,
    )
    .unwrap();
    (e, path)
}

/// `n` tensors of 1 B to `max` bytes at odd offsets of one GPU arena: out, poisoned, back.
fn round_trip(
    dev: &Arc<CudaDevice>,
    backend: Arc<dyn Backend>,
    name: &str,
    cfg: EngineConfig,
    n: usize,
    max: u64,
) {
    let (e, path) = engine(dev, backend, name, cfg);
    let mut seed = 77u64;
    let lens: Vec<u64> = (0..n)
        .map(|_| {
            seed = pattern::splitmix64(seed);
            1 + seed % max
        })
        .collect();
    let offsets: Vec<u64> = lens
        .iter()
        .scan(0u64, |at, &l| {
            let o = *at + 3; // odd addresses
            *at = (o + l).div_ceil(16) * 16;
            Some(o)
        })
        .collect();
    let arena = (offsets[n - 1] + lens[n - 1]) as usize;
    let src = dev.alloc(arena).unwrap();
    let dst = dev.alloc(arena).unwrap();
    dev.fill_pattern(src.ptr(), arena, 9, 0).unwrap();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            // SAFETY: `src` outlives the engine's use of it (drain below).
            unsafe {
                e.offload(
                    TensorKey::new(i as u64, 0),
                    &[Region::new(src.ptr() + offsets[i], lens[i])],
                    None,
                )
                .unwrap()
            }
        })
        .collect();
    e.drain().unwrap();
    dev.fill_pattern(src.ptr(), arena, 10, 0).unwrap();
    dev.fill_pattern(dst.ptr(), arena, 11, 0).unwrap();
    for &h in handles.iter().rev() {
        e.prefetch(h).unwrap();
    }
    let mut last = None;
    for i in (0..n).rev() {
        // SAFETY: `dst` outlives the events (synchronized below).
        last = Some(unsafe {
            e.fetch(handles[i], &[Region::new(dst.ptr() + offsets[i], lens[i])])
                .unwrap()
        });
    }
    last.unwrap().synchronize().unwrap();
    e.drain().unwrap();
    for i in 0..n {
        let bad = dev
            .count_pattern_mismatches(dst.ptr() + offsets[i], lens[i] as usize, 9, offsets[i])
            .unwrap();
        assert_eq!(
            bad, 0,
            "{name}: tensor {i} ({} bytes at +{})",
            lens[i], offsets[i]
        );
    }
    let s = e.stats().counters;
    eprintln!("{name}: {s:?}");
    assert_eq!(s.fetches, n as u64);
    assert_eq!(s.forwarded_fetches, 0);
    assert_eq!(s.checksum_errors, 0);
    assert!(s.verified_bytes >= s.fetch_bytes, "every read was checked: {s:?}");
    for h in handles {
        e.release(h).unwrap();
    }
    e.drain().unwrap();
    assert_eq!(e.storage_usage().used, 0);
    drop(e);
    let _ = std::fs::remove_file(path);
}

fn packed_cfg() -> EngineConfig {
    EngineConfig {
        pack_threshold: 1 << 20,
        // Every read checked against the CRC-32C computed by the GPU kernel when written.
        checksums: true,
        ..Default::default()
    }
}

fn uring(dev: &Arc<CudaDevice>) -> Arc<dyn Backend> {
    Arc::new(UringBackend::new(dev.clone(), UringConfig::default()).unwrap())
}

fn cufile(dev: &Arc<CudaDevice>) -> Arc<dyn Backend> {
    Arc::new(CufileBackend::new(dev.context().clone(), CufileConfig::default()).unwrap())
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn engine_round_trips_through_uring() {
    let dev = CudaDevice::new(0).unwrap();
    round_trip(&dev, uring(&dev), "uring-packed", packed_cfg(), 3000, 300 << 10);
    round_trip(&dev, uring(&dev), "uring-large", packed_cfg(), 60, 24 << 20);
    let no_pack = EngineConfig {
        pack: false,
        ..packed_cfg()
    };
    round_trip(&dev, uring(&dev), "uring-no-pack", no_pack, 500, 300 << 10);
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn engine_round_trips_through_cufile() {
    let dev = CudaDevice::new(0).unwrap();
    round_trip(&dev, cufile(&dev), "cufile-packed", packed_cfg(), 3000, 300 << 10);
    round_trip(&dev, cufile(&dev), "cufile-large", packed_cfg(), 60, 24 << 20);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn gpu_fetches_before_the_write_are_forwarded() {
    let dev = CudaDevice::new(0).unwrap();
    let cfg = EngineConfig {
        pack_flush_delay: std::time::Duration::from_secs(3600),
        ..packed_cfg()
    };
    let (e, path) = engine(&dev, uring(&dev), "forward", cfg);
    let t = dev.alloc(100_003).unwrap();
    dev.fill_pattern(t.ptr(), 100_003, 5, 0).unwrap();
    // SAFETY: `t` outlives the engine's use.
    let h = unsafe {
        e.offload(TensorKey::new(1, 0), &[Region::new(t.ptr(), 100_003)], None)
            .unwrap()
    };
    let out = dev.alloc(100_003).unwrap();
    // SAFETY: `out` outlives the event.
    unsafe { e.fetch(h, &[Region::new(out.ptr(), 100_003)]).unwrap() }
        .synchronize()
        .unwrap();
    assert_eq!(dev.count_pattern_mismatches(out.ptr(), 100_003, 5, 0).unwrap(), 0);
    e.drain().unwrap();
    let s = e.stats().counters;
    assert_eq!(
        (s.forwarded_fetches, s.cancelled_tensors, s.bytes_written),
        (1, 1, 0)
    );
    e.release(h).unwrap();
    drop(e);
    let _ = std::fs::remove_file(path);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn gpu_checksums_catch_a_flipped_byte_in_the_file() {
    let dev = CudaDevice::new(0).unwrap();
    let cfg = EngineConfig {
        pack_flush_delay: std::time::Duration::from_secs(3600),
        ..packed_cfg()
    };
    let (e, path) = engine(&dev, uring(&dev), "corrupt", cfg);
    // A packed tensor and one written straight from GPU memory, at odd addresses.
    let lens = [256_001u64, 3 << 20];
    let bufs: Vec<_> = lens.iter().map(|&l| dev.alloc(l as usize + 3).unwrap()).collect();
    let handles: Vec<_> = (0..2)
        .map(|i| {
            dev.fill_pattern(bufs[i].ptr() + 3, lens[i] as usize, 40 + i as u64, 0)
                .unwrap();
            // SAFETY: the buffers outlive the engine's use of them.
            unsafe {
                e.offload(
                    TensorKey::new(i as u64, 0),
                    &[Region::new(bufs[i].ptr() + 3, lens[i])],
                    None,
                )
                .unwrap()
            }
        })
        .collect();
    e.drain().unwrap();
    let file = std::fs::read(&path).unwrap();
    for i in 0..2 {
        let mut head = vec![0u8; 64];
        // SAFETY: `head` holds 64 bytes of the live buffer's tensor.
        unsafe { dev.copy_to_host_sync(head.as_mut_ptr(), bufs[i].ptr() + 3, 64) }.unwrap();
        let at = file
            .windows(64)
            .position(|w| w == head.as_slice())
            .expect("tensor in the file") as u64;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt;
        let flip_at = at + lens[i] - 5;
        f.write_all_at(&[file[flip_at as usize] ^ 1], flip_at).unwrap();
        f.sync_all().unwrap();
    }
    for (i, &h) in handles.iter().enumerate() {
        let out = dev.alloc(lens[i] as usize).unwrap();
        e.prefetch(h).unwrap();
        // SAFETY: `out` outlives the call, which fails before handing anything out.
        let err = unsafe { e.fetch(h, &[Region::new(out.ptr(), lens[i])]) }.expect_err("corrupt");
        assert!(matches!(err, spillway_runtime::Error::Corrupt { .. }), "{err}");
    }
    let s = e.stats().counters;
    eprintln!("corrupt: {s:?}");
    assert!(s.checksum_errors >= 2, "{s:?}");
    for h in handles {
        e.release(h).unwrap();
    }
    drop(e);
    let _ = std::fs::remove_file(path);
}
