//! The CUDA device against the CPU reference: pattern kernels at every alignment, copies,
//! events across streams, pinned and registered host memory, errors.
//!
//! All but one test need an NVIDIA GPU and are ignored by default; run them with
//!
//! ```text
//! cargo test --release --test gpu_cuda -- --include-ignored --test-threads=1
//! ```
//!
//! or `scripts/gpu-test.sh` (which runs the same program from dist/). The kernels are
//! embedded as PTX when the build had nvcc, else as CUDA C source that NVRTC compiles on
//! first use — then libnvrtc must be on LD_LIBRARY_PATH. The test log names which.

use std::sync::Arc;

use spillway::cuda::{self, CudaDevice};
use spillway::runtime::{pattern, AlignedBuf, Device, DeviceBuffer, DeviceKind, Error, HostDevice};

/// What poisoned memory holds before each kernel run.
const POISON: u8 = 0xAB;
/// Bytes after each region that must keep their poison.
const GUARD: usize = 8;

fn gpu() -> Arc<CudaDevice> {
    let dev = CudaDevice::new(0).unwrap_or_else(|e| panic!("cannot attach to GPU 0: {e}"));
    eprintln!("{dev:?}; kernels: {}", cuda::kernel_build());
    dev
}

fn alloc(dev: &CudaDevice, len: usize) -> DeviceBuffer {
    dev.alloc(len)
        .unwrap_or_else(|e| panic!("cannot allocate {len} bytes on GPU {}: {e}", dev.ordinal()))
}

fn upload(dev: &CudaDevice, dst: u64, data: &[u8]) {
    // SAFETY: `data` is live for the call, which waits; the callers pass regions inside
    // their own device buffers.
    unsafe { dev.copy_from_host_sync(dst, data.as_ptr(), data.len()) }
        .unwrap_or_else(|e| panic!("H2D copy of {} bytes to {dst:#x} failed: {e}", data.len()));
}

fn download(dev: &CudaDevice, src: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: as in `upload`.
    unsafe { dev.copy_to_host_sync(out.as_mut_ptr(), src, len) }
        .unwrap_or_else(|e| panic!("D2H copy of {len} bytes from {src:#x} failed: {e}"));
    out
}

/// The first differing position and how many positions differ.
fn diff(got: &[u8], want: &[u8]) -> Option<(usize, usize)> {
    assert_eq!(got.len(), want.len());
    let first = got.iter().zip(want).position(|(a, b)| a != b)?;
    let count = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some((first, count))
}

/// A fill_pattern run: `len` bytes at byte `shift` of a buffer, as pattern bytes from `offset`.
#[derive(Clone, Copy, Debug)]
struct Case {
    len: usize,
    shift: usize,
    offset: u64,
    seed: u64,
}

/// Poisons the case's span, fills on the GPU, and checks every byte of the span against the
/// CPU reference (the region) and the poison (before and after it). Then checks both
/// counting kernels against the CPU.
fn check_fill(dev: &CudaDevice, buf: &DeviceBuffer, c: Case) {
    let span = c.shift + c.len + GUARD;
    assert!(span <= buf.len(), "{c:?}: test buffer too small");
    upload(dev, buf.ptr(), &vec![POISON; span]);
    let dst = buf.ptr() + c.shift as u64;
    dev.fill_pattern(dst, c.len, c.seed, c.offset)
        .unwrap_or_else(|e| panic!("{c:?}: fill_pattern failed: {e}"));

    let got = download(dev, buf.ptr(), span);
    let mut want = vec![POISON; span];
    pattern::fill(&mut want[c.shift..c.shift + c.len], c.seed, c.offset);
    if let Some((i, n)) = diff(&got, &want) {
        let place = if i < c.shift {
            "before the region (the kernel wrote below its start)".to_string()
        } else if i >= c.shift + c.len {
            "after the region (the kernel wrote past its end)".to_string()
        } else {
            format!("at byte {} of the region", i - c.shift)
        };
        panic!(
            "{c:?}: fill_pattern differs from the CPU reference {place}: got {:#04x}, want {:#04x}; \
             {n} of {span} bytes differ",
            got[i], want[i]
        );
    }

    let region = &got[c.shift..c.shift + c.len];
    let bad = dev
        .count_pattern_mismatches(dst, c.len, c.seed, c.offset)
        .unwrap_or_else(|e| panic!("{c:?}: count_pattern_mismatches failed: {e}"));
    assert_eq!(
        bad, 0,
        "{c:?}: count_pattern_mismatches reports {bad} mismatches in a correct fill"
    );

    // Against another seed (and another offset) the count must equal the CPU's exactly.
    for (seed, offset) in [(c.seed ^ 0x5555_5555, c.offset), (c.seed, c.offset + 1)] {
        let gpu = dev.count_pattern_mismatches(dst, c.len, seed, offset).unwrap();
        let cpu = pattern::count_mismatches(region, seed, offset);
        assert_eq!(
            gpu, cpu,
            "{c:?}: mismatches against seed {seed:#x} offset {offset}: GPU {gpu}, CPU {cpu}"
        );
    }
}

/// Runs without a GPU too: probing never panics and explains a missing driver, and
/// attaching fails with `Unavailable` exactly when the probe found no GPU.
#[test]
fn probe_never_panics_and_attach_agrees_with_it() {
    let probe = cuda::probe();
    eprintln!("probe: {probe:#?}");
    eprintln!("kernels: {}", cuda::kernel_build());
    assert!(!cuda::kernel_build().is_empty());
    match &probe.driver {
        Err(e) => {
            assert!(probe.gpus.is_empty(), "GPUs listed without a driver: {probe:?}");
            assert!(
                e.contains("libcuda") || e.contains("cuInit"),
                "the driver error should say what is missing: {e}"
            );
        }
        Ok(driver) => {
            assert!(
                driver.cuda_version.0 >= 11,
                "implausible CUDA version {:?}",
                driver.cuda_version
            );
            assert!(!driver.library.is_empty());
            for (i, gpu) in probe.gpus.iter().enumerate() {
                assert_eq!(gpu.ordinal, i);
                assert!(!gpu.name.is_empty() && gpu.total_memory > 0, "{gpu:?}");
                assert!(gpu.compute_capability.0 >= 3, "{gpu:?}");
            }
        }
    }
    match CudaDevice::new(0) {
        Ok(dev) => {
            assert!(
                !probe.gpus.is_empty(),
                "attached to GPU 0 although the probe found none: {probe:?}"
            );
            assert_eq!(dev.ordinal(), 0);
        }
        Err(Error::Unavailable { what, reason }) => {
            assert!(
                probe.gpus.is_empty(),
                "the probe found GPUs but attaching failed: {reason}"
            );
            assert_eq!(what, "CUDA");
            if let Err(e) = &probe.driver {
                if e.contains("libcuda.so not found") {
                    assert!(
                        reason.contains("libcuda"),
                        "the error should name libcuda: {reason}"
                    );
                    assert!(
                        reason.contains("install the NVIDIA driver"),
                        "and what to do: {reason}"
                    );
                }
            }
        }
        Err(e) => panic!("CudaDevice::new(0) failed with an unexpected error: {e:?}"),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn device_identity_and_primary_context() {
    let dev = gpu();
    let info = dev.info();
    assert_eq!(info.kind, DeviceKind::Cuda);
    assert_eq!(info.ordinal, 0);
    let probe = cuda::probe();
    let p = probe.gpus.first().expect("the probe lists GPU 0");
    assert_eq!(info.name, p.name);
    assert_eq!(info.total_memory, p.total_memory);
    assert_eq!(dev.gpu_info(), p);
    assert!(
        dev.context().is_primary(),
        "CudaDevice must use the primary context"
    );
    eprintln!("kernels loaded from: {}", dev.kernel_origin().unwrap());
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn bad_ordinal_is_an_invalid_argument_naming_the_count() {
    let count = cuda::probe().gpus.len();
    match CudaDevice::new(99) {
        Err(Error::InvalidArgument(msg)) => {
            assert!(msg.contains("GPU 99"), "{msg}");
            assert!(
                msg.contains(&format!("has {count} GPU")),
                "should name the count {count}: {msg}"
            );
        }
        other => panic!("CudaDevice::new(99) should be InvalidArgument, got {other:?}"),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn fill_pattern_matches_the_cpu_reference_at_every_alignment() {
    let dev = gpu();
    let buf = alloc(&dev, 2 << 20);
    let lens = [
        1usize, 2, 3, 5, 7, 8, 9, 15, 16, 17, 23, 24, 31, 63, 64, 65, 255, 256, 257, 1000, 4095, 4096, 4097,
        65537,
    ];
    let mut runs = 0;
    for &len in &lens {
        for shift in [0usize, 1, 3, 4, 7, 8] {
            for offset in [0u64, 1, 5, 7, 8, 13, 4093, (1 << 40) + 3] {
                for seed in [0u64, 0xDEAD_BEEF, u64::MAX] {
                    check_fill(
                        &dev,
                        &buf,
                        Case {
                            len,
                            shift,
                            offset,
                            seed,
                        },
                    );
                    runs += 1;
                }
            }
        }
    }
    eprintln!("{runs} fills checked");
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn fill_pattern_matches_the_cpu_reference_up_to_64_mib() {
    let dev = gpu();
    let buf = alloc(&dev, (64 << 20) + 64);
    for c in [
        Case {
            len: (1 << 20) + 3,
            shift: 1,
            offset: 5,
            seed: 7,
        },
        Case {
            len: (8 << 20) - 1,
            shift: 3,
            offset: 4096,
            seed: 8,
        },
        Case {
            len: 64 << 20,
            shift: 0,
            offset: 0,
            seed: 9,
        },
        Case {
            len: (64 << 20) - 5,
            shift: 3,
            offset: 12345,
            seed: 10,
        },
        Case {
            len: (64 << 20) - 1,
            shift: 1,
            offset: (1 << 33) + 7,
            seed: 11,
        },
    ] {
        check_fill(&dev, &buf, c);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn count_finds_exactly_the_planted_differences() {
    let dev = gpu();
    let (len, shift, seed, offset) = ((1usize << 20) + 7, 3usize, 42u64, 11u64);
    let buf = alloc(&dev, len + 16);
    let mut data = vec![0u8; len];
    pattern::fill(&mut data, seed, offset);
    let ptr = buf.ptr() + shift as u64;

    upload(&dev, ptr, &data);
    assert_eq!(dev.count_pattern_mismatches(ptr, len, seed, offset).unwrap(), 0);

    // Head, word edges, the middle, the tail; three bytes of one word.
    let planted = [
        0usize,
        1,
        4,
        7,
        8,
        9,
        10,
        4095,
        4096,
        len / 2,
        len - 9,
        len - 2,
        len - 1,
    ];
    for (k, &i) in planted.iter().enumerate() {
        data[i] ^= if k % 2 == 0 { 0xFF } else { 0x01 };
    }
    upload(&dev, ptr, &data);
    assert_eq!(
        pattern::count_mismatches(&data, seed, offset),
        planted.len() as u64
    );
    let got = dev.count_pattern_mismatches(ptr, len, seed, offset).unwrap();
    assert_eq!(
        got,
        planted.len() as u64,
        "planted {} differences at {planted:?}",
        planted.len()
    );

    // Sub-regions see only their own differences.
    let sub = dev
        .count_pattern_mismatches(ptr + 5, 4096, seed, offset + 5)
        .unwrap();
    let want = planted.iter().filter(|&&i| (5..5 + 4096).contains(&i)).count() as u64;
    assert_eq!(sub, want, "sub-region [5, 4101)");

    // All zeros: every byte that is not zero in the pattern counts.
    let zeros = vec![0u8; len];
    upload(&dev, ptr, &zeros);
    let got = dev.count_pattern_mismatches(ptr, len, seed, offset).unwrap();
    assert_eq!(got, pattern::count_mismatches(&zeros, seed, offset));

    // 64 MiB with differences spread out, including in the last word.
    let big = (64usize << 20) + 5;
    let bbuf = alloc(&dev, big + 8);
    let bptr = bbuf.ptr() + 1;
    dev.fill_pattern(bptr, big, 3, 0).unwrap();
    let mut flipped = 0u64;
    // A set: the last byte may also be a multiple of the step, and flipping it twice
    // would undo the flip.
    let spots: std::collections::BTreeSet<usize> = (0..big).step_by(big / 97).chain([big - 1]).collect();
    for i in spots {
        let mut b = download(&dev, bptr + i as u64, 1);
        b[0] ^= 0x80;
        upload(&dev, bptr + i as u64, &b);
        flipped += 1;
    }
    assert_eq!(dev.count_pattern_mismatches(bptr, big, 3, 0).unwrap(), flipped);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn async_copies_with_events_across_two_streams_are_byte_exact() {
    let dev = gpu();
    let len = (8usize << 20) + 13;
    let (seed, offset) = (77u64, 3u64);
    let a = alloc(&dev, len + 8);
    let b = alloc(&dev, len + 8);
    let c = alloc(&dev, len + 8);
    let (pa, pb, pc) = (a.ptr() + 1, b.ptr() + 3, c.ptr() + 5);
    dev.fill_pattern(pa, len, seed, offset).unwrap();
    upload(&dev, b.ptr(), &vec![POISON; len + 8]);
    upload(&dev, c.ptr(), &vec![POISON; len + 8]);
    let mut pinned = dev.alloc_pinned(len).unwrap();
    pinned.as_mut_slice().fill(POISON);
    let mut pageable = vec![POISON; len];

    let s1 = dev.create_stream().unwrap();
    let s2 = dev.create_stream().unwrap();
    assert_ne!(s1.raw_handle(), 0);
    assert_ne!(s1.raw_handle(), s2.raw_handle());
    // In chunks, alternating streams: each chunk's D2D on s1, then D2H and H2D on s2 after
    // s2 waits for s1's event.
    let chunk = (1 << 20) + 1;
    let mut events = Vec::new();
    let mut at = 0;
    while at < len {
        let n = chunk.min(len - at);
        let o = at as u64;
        // SAFETY: all regions are inside live buffers and are only read after both streams
        // are synchronized below.
        unsafe {
            s1.copy_d2d(pb + o, pa + o, n).unwrap();
            let ev = s1.record().unwrap();
            s2.wait_event(ev.as_ref()).unwrap();
            s2.copy_d2h(pinned.as_ptr().add(at), pb + o, n).unwrap();
            s2.copy_h2d(pc + o, pinned.as_ptr().add(at), n).unwrap();
            s2.copy_d2h(pageable.as_mut_ptr().add(at), pc + o, n).unwrap();
            events.push(ev);
        }
        at += n;
    }
    let done = s2.record().unwrap();
    done.synchronize().unwrap();
    assert!(done.query().unwrap(), "an event is complete after synchronize");
    for ev in &events {
        assert!(ev.query().unwrap());
    }
    s1.synchronize().unwrap();

    let mut want = vec![0u8; len];
    pattern::fill(&mut want, seed, offset);
    if let Some((i, n)) = diff(pinned.as_slice(), &want) {
        panic!("pinned copy differs at byte {i} ({n} bytes differ)");
    }
    if let Some((i, n)) = diff(&pageable, &want) {
        panic!("pageable copy differs at byte {i} ({n} bytes differ)");
    }
    assert_eq!(dev.count_pattern_mismatches(pb, len, seed, offset).unwrap(), 0);
    assert_eq!(dev.count_pattern_mismatches(pc, len, seed, offset).unwrap(), 0);
    // Nothing written outside the destination regions.
    let edges = download(&dev, c.ptr(), 5);
    assert_eq!(edges, vec![POISON; 5]);
    let tail = download(&dev, pc + len as u64, 3);
    assert_eq!(tail, vec![POISON; 3]);

    // A stream of another device kind cannot be waited on.
    let host_stream = HostDevice::new().create_stream().unwrap();
    let host_event = host_stream.record().unwrap();
    assert!(matches!(
        s1.wait_event(host_event.as_ref()),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn pinned_memory_is_page_aligned_and_usable() {
    let dev = gpu();
    for len in [0usize, 1, 4095, 4096, 4097, (1 << 20) + 1, 3 << 20] {
        let mut p = dev.alloc_pinned(len).unwrap();
        assert_eq!(p.len(), len);
        assert_eq!(
            p.as_ptr() as usize % 4096,
            0,
            "pinned buffer of {len} bytes at {:p}",
            p.as_ptr()
        );
        if len == 0 {
            continue;
        }
        pattern::fill(p.as_mut_slice(), len as u64, 0);
        let d = alloc(&dev, len);
        // SAFETY: both regions are live and `len` long; the copy is waited for.
        unsafe { dev.copy_from_host_sync(d.ptr(), p.as_ptr(), len) }.unwrap();
        assert_eq!(
            dev.count_pattern_mismatches(d.ptr(), len, len as u64, 0).unwrap(),
            0
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn registered_host_memory_takes_async_copies() {
    let dev = gpu();
    let len = (2usize << 20) + 4096;
    let mut host = AlignedBuf::new(len, 4096).unwrap();
    let d = alloc(&dev, len);
    dev.fill_pattern(d.ptr(), len, 5, 1).unwrap();
    {
        // SAFETY: `host` outlives the registration, which drops at the end of this block.
        let reg = unsafe { dev.register_host(host.as_ptr(), len) }.unwrap();
        // Registering the same memory twice is refused, not fatal.
        // SAFETY: as above.
        let again = unsafe { dev.register_host(host.as_ptr(), len) };
        assert!(again.is_err(), "double registration should fail");
        let s = dev.create_stream().unwrap();
        // SAFETY: both regions live; synchronized before reading.
        unsafe { s.copy_d2h(host.as_ptr(), d.ptr(), len) }.unwrap();
        s.synchronize().unwrap();
        drop(reg);
    }
    assert_eq!(pattern::count_mismatches(host.as_slice(), 5, 1), 0);
    // And again after unregistering: the memory is plain pageable memory once more.
    host.as_mut_slice().fill(0);
    // SAFETY: as above.
    let reg = unsafe { dev.register_host(host.as_ptr(), len) }.unwrap();
    drop(reg);
    // SAFETY: empty regions are refused before reaching the driver.
    assert!(unsafe { dev.register_host(host.as_ptr(), 0) }.is_err());
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn bad_regions_are_errors_and_leave_the_device_usable() {
    let dev = gpu();
    let buf = alloc(&dev, 4096);
    let host = [0u8; 64];
    assert!(matches!(
        dev.fill_pattern(host.as_ptr() as u64, 64, 1, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        dev.fill_pattern(buf.ptr() + 4000, 64 << 20, 1, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        dev.count_pattern_mismatches(buf.ptr() + 1, 64 << 20, 1, 0),
        Err(Error::InvalidArgument(_))
    ));
    match dev.alloc(1 << 50) {
        Err(Error::OutOfMemory {
            kind: "device",
            bytes,
        }) => assert_eq!(bytes, 1 << 50),
        other => panic!("a 1 PiB allocation should be OutOfMemory, got {other:?}"),
    }
    let empty = dev.alloc(0).unwrap();
    assert_eq!(empty.len(), 0);
    dev.fill_pattern(empty.ptr(), 0, 1, 0).unwrap();
    // Still fine afterwards.
    check_fill(
        &dev,
        &buf,
        Case {
            len: 4000,
            shift: 1,
            offset: 2,
            seed: 3,
        },
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn works_from_many_threads() {
    let dev = gpu();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for round in 0..20u64 {
                    let len = (64 << 10) + (t * 7 + round) as usize;
                    let buf = alloc(&dev, len + 8);
                    let ptr = buf.ptr() + t % 8;
                    let seed = t * 1000 + round;
                    dev.fill_pattern(ptr, len, seed, round).unwrap();
                    assert_eq!(dev.count_pattern_mismatches(ptr, len, seed, round).unwrap(), 0);
                    let s = dev.create_stream().unwrap();
                    let mut out = vec![0u8; len];
                    // SAFETY: live regions; synchronized before reading.
                    unsafe { s.copy_d2h(out.as_mut_ptr(), ptr, len) }.unwrap();
                    s.synchronize().unwrap();
                    assert_eq!(
                        pattern::first_mismatch(&out, seed, round),
                        None,
                        "thread {t} round {round}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a worker thread failed");
    }
}
