//! GPU tests of the cuFile backend: byte-exact round trips between device memory and files
//! at aligned and unaligned offsets, splitting over the I/O threads, the reported GDS mode,
//! short reads past the end of a file, host memory, flush/close/reopen and shutdown with
//! requests pending.
//!
//! They need an NVIDIA GPU, its driver (libcuda) and libcufile, so they are ignored by a
//! plain `cargo test`. Run them with scripts/gpu-test.sh, or:
//!
//! ```text
//! cargo test -p spillway-cufile --test gpu -- --ignored --test-threads=1 --nocapture
//! ```
//!
//! Files go to `$SPILLWAY_TEST_DIR` (default: the system's temporary directory), each test in
//! its own subdirectory removed afterwards. Point it at a local NVMe ext4/xfs filesystem to
//! exercise the GDS path; on tmpfs (no O_DIRECT) cuFile runs in compatibility mode.
//! cuFile's own log goes to `$CUFILE_LOGFILE_PATH`, set here to
//! `<temp dir>/spillway-cufile-gpu-tests.log` unless already set.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use spillway_cufile::{check_library, CufileBackend, CufileConfig, GdsMode};
use spillway_runtime::{pattern, AlignedBuf, Backend, Error, IoOp, IoRequest, MemRef, Target, TargetId};

struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

/// The GPU, or a panic that says exactly what is missing.
fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        if std::env::var_os("CUFILE_LOGFILE_PATH").is_none() {
            let log = std::env::temp_dir().join("spillway-cufile-gpu-tests.log");
            // Set before anything loads libcufile, while the other tests wait on this OnceLock.
            std::env::set_var("CUFILE_LOGFILE_PATH", &log);
        }
        // SAFETY: only tries to dlopen the CUDA driver library.
        let driver_present = unsafe { cudarc::driver::sys::is_culib_present() };
        assert!(
            driver_present,
            "GPU TESTS CANNOT RUN: libcuda (the NVIDIA driver) was not found; run these tests on a machine with an NVIDIA GPU"
        );
        if let Err(e) = check_library() {
            panic!("GPU TESTS CANNOT RUN: {e}");
        }
        let ctx = CudaContext::new(0)
            .unwrap_or_else(|e| panic!("GPU TESTS CANNOT RUN: CudaContext::new(0) failed: {e}"));
        let stream = ctx.default_stream();
        eprintln!(
            "GPU: {} ({} bytes)",
            ctx.name().unwrap_or_default(),
            ctx.total_mem().unwrap_or_default()
        );
        Gpu { ctx, stream }
    })
}

fn backend(config: CufileConfig) -> CufileBackend {
    CufileBackend::new(gpu().ctx.clone(), config).unwrap_or_else(|e| panic!("CufileBackend::new failed: {e}"))
}

/// A directory for one test's files, removed when dropped.
fn test_dir() -> tempfile::TempDir {
    let base = std::env::var_os("SPILLWAY_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("spillway-cufile-")
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("cannot create a test directory in {}: {e}", base.display()))
}

fn open(b: &CufileBackend, path: &Path, reserve: Option<u64>) -> TargetId {
    let mut t = Target::new(path);
    t.reserve = reserve;
    let (id, info) = b
        .open(&t)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    if let Some(w) = info.warning {
        eprintln!("target warning: {w}");
    }
    id
}

/// Zeroed device memory from cudarc's allocator (stream-ordered pool memory where the GPU
/// supports it), with the zeroing finished before cuFile touches it.
fn alloc(len: usize) -> CudaSlice<u8> {
    let s = &gpu().stream;
    let buf = s
        .alloc_zeros::<u8>(len)
        .unwrap_or_else(|e| panic!("allocating {len} bytes of device memory: {e}"));
    s.synchronize().expect("stream synchronize");
    buf
}

fn dptr(buf: &CudaSlice<u8>) -> u64 {
    let (p, _sync) = buf.device_ptr(&gpu().stream);
    p
}

fn upload(buf: &mut CudaSlice<u8>, at: usize, data: &[u8]) {
    let s = &gpu().stream;
    let mut view = buf.slice_mut(at..at + data.len());
    s.memcpy_htod(data, &mut view).expect("host to device copy");
    s.synchronize().expect("stream synchronize");
}

fn download(buf: &CudaSlice<u8>, at: usize, len: usize) -> Vec<u8> {
    let s = &gpu().stream;
    let mut out = vec![0u8; len];
    s.memcpy_dtoh(&buf.slice(at..at + len), &mut out)
        .expect("device to host copy");
    s.synchronize().expect("stream synchronize");
    out
}

fn device_io(
    b: &CufileBackend,
    target: TargetId,
    op: IoOp,
    offset: u64,
    ptr: u64,
    len: usize,
) -> Result<usize, Error> {
    // SAFETY: the memory is a live device allocation of the test, untouched until `run`
    // returns.
    unsafe {
        b.run(IoRequest {
            target,
            op,
            offset,
            mem: MemRef::Device { ptr, len },
        })
    }
}

fn expect_pattern(what: &str, got: &[u8], seed: u64, offset: u64) {
    let bad = pattern::count_mismatches(got, seed, offset);
    if bad != 0 {
        let first = pattern::first_mismatch(got, seed, offset).unwrap_or(0);
        panic!(
            "{what}: {bad} of {} bytes differ; first at byte {first} (got {:#04x}, want {:#04x})",
            got.len(),
            got[first],
            pattern::byte(seed, offset + first as u64)
        );
    }
}

const POISON: u8 = 0xA5;
const GUARD: usize = 64;

/// Writes pattern data from `src + ptr_off`, checks the file with plain reads, reads it back
/// into a poisoned `dst + ptr_off`, and checks the data and the untouched bytes around it.
#[allow(clippy::too_many_arguments)]
fn round_trip(
    b: &CufileBackend,
    t: TargetId,
    file: &Path,
    src: &mut CudaSlice<u8>,
    dst: &mut CudaSlice<u8>,
    len: usize,
    file_off: u64,
    ptr_off: usize,
    seed: u64,
) {
    let case = format!("{len} bytes at file offset {file_off}, device offset {ptr_off}");
    let mut host = vec![0u8; len];
    pattern::fill(&mut host, seed, file_off);
    upload(src, ptr_off, &host);
    let n = device_io(b, t, IoOp::Write, file_off, dptr(src) + ptr_off as u64, len)
        .unwrap_or_else(|e| panic!("write of {case}: {e}"));
    assert_eq!(n, len, "write of {case}");

    let mut on_disk = vec![0u8; len];
    std::fs::File::open(file)
        .and_then(|f| f.read_exact_at(&mut on_disk, file_off))
        .unwrap_or_else(|e| panic!("reading back {case} with plain reads: {e}"));
    expect_pattern(&format!("file after writing {case}"), &on_disk, seed, file_off);

    let lo = ptr_off.saturating_sub(GUARD);
    let hi = (ptr_off + len + GUARD).min(dst.len());
    upload(dst, lo, &vec![POISON; hi - lo]);
    let n = device_io(b, t, IoOp::Read, file_off, dptr(dst) + ptr_off as u64, len)
        .unwrap_or_else(|e| panic!("read of {case}: {e}"));
    assert_eq!(n, len, "read of {case}");
    let back = download(dst, lo, hi - lo);
    let (before, rest) = back.split_at(ptr_off - lo);
    let (data, after) = rest.split_at(len);
    expect_pattern(
        &format!("device memory after reading {case}"),
        data,
        seed,
        file_off,
    );
    assert!(
        before.iter().chain(after).all(|&x| x == POISON),
        "read of {case} wrote outside its region"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn the_gds_mode_is_reported() {
    let b = backend(CufileConfig::default());
    let mode = b.gds_mode();
    let info = b.info();
    eprintln!("cuFile mode: {} ({} details)", mode.as_str(), info.details.len());
    for (k, v) in &info.details {
        eprintln!("  {k}: {v}");
    }
    assert_eq!(info.name, "cufile");
    assert_eq!(info.transfer_mode, Some(mode.as_str()));
    assert_eq!(info.host_staging, mode == GdsMode::Compat);
    assert!(info.details.iter().any(|(k, _)| k == "gds mode because"));
    if !Path::new("/proc/driver/nvidia-fs/version").exists() {
        assert_ne!(
            mode,
            GdsMode::NvidiaFs,
            "nvidia-fs is not loaded, yet the backend reports the nvidia-fs path"
        );
    }
    if std::env::var("CUFILE_FORCE_COMPAT_MODE").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        assert_eq!(mode, GdsMode::Compat);
    }
    let probe = spillway_cufile::probe();
    assert!(probe.library.is_ok(), "{:?}", probe.library);
    assert_eq!(probe.gds_mode, Some(mode));
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn round_trips_are_byte_exact_at_any_alignment() {
    let dir = test_dir();
    let path = dir.path().join("round-trips.dat");
    let b = backend(CufileConfig::default());
    let t = open(&b, &path, None);
    eprintln!("cuFile mode: {}", b.gds_mode().as_str());
    let sizes = [1usize, 511, 4096, 4097, (1 << 20) + 3, 256 << 20];
    // (file offset, device pointer offset): aligned/aligned, aligned/unaligned,
    // unaligned/aligned, unaligned/unaligned.
    let places = [
        (0u64, 0usize),
        (5 * 4096, 777),
        (7 * 4096 + 513, 4096),
        (3 * 4096 + 1, 1),
    ];
    let cap = sizes.iter().max().unwrap() + 2 * 4096 + GUARD;
    let mut src = alloc(cap);
    let mut dst = alloc(cap);
    let mut seed = 1;
    for &len in &sizes {
        for &(file_off, ptr_off) in &places {
            round_trip(&b, t, &path, &mut src, &mut dst, len, file_off, ptr_off, seed);
            seed += 1;
        }
    }
    b.flush(t).unwrap();
    b.close(t).unwrap();
    let info = b.info();
    eprintln!(
        "{:?}",
        info.details.iter().find(|(k, _)| k == "buffer registration")
    );
}

/// Memory from plain `cuMemAlloc` (what PyTorch's caching allocator uses), which cuFile can
/// register; I/O on a region inside it goes through the registered base plus an offset.
#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn cumemalloc_buffers_are_registered_and_round_trip() {
    use cudarc::driver::result as cu;
    let dir = test_dir();
    let path = dir.path().join("registered.dat");
    let b = backend(CufileConfig::default());
    let t = open(&b, &path, None);
    let len = (4 << 20) + 3;
    let cap = len + 8192;
    // SAFETY: plain allocations of `cap` bytes, freed at the end of the test after all I/O.
    let (src, dst) = unsafe {
        let _ = gpu().ctx.bind_to_thread();
        (cu::malloc_sync(cap).unwrap(), cu::malloc_sync(cap).unwrap())
    };
    for (i, (file_off, ptr_off)) in [(0u64, 0usize), (4096 * 9 + 5, 4096 + 7)].into_iter().enumerate() {
        let seed = 100 + i as u64;
        let mut host = vec![0u8; len];
        pattern::fill(&mut host, seed, file_off);
        // SAFETY: [src + ptr_off, + len) lies inside the allocation.
        unsafe { cu::memcpy_htod_sync(src + ptr_off as u64, &host) }.unwrap();
        assert_eq!(
            device_io(&b, t, IoOp::Write, file_off, src + ptr_off as u64, len).unwrap(),
            len
        );
        let poison = vec![POISON; cap];
        // SAFETY: the whole allocation.
        unsafe { cu::memcpy_htod_sync(dst, &poison) }.unwrap();
        assert_eq!(
            device_io(&b, t, IoOp::Read, file_off, dst + ptr_off as u64, len).unwrap(),
            len
        );
        let mut back = vec![0u8; cap];
        // SAFETY: the whole allocation.
        unsafe { cu::memcpy_dtoh_sync(&mut back, dst) }.unwrap();
        expect_pattern(
            "cuMemAlloc memory after reading",
            &back[ptr_off..ptr_off + len],
            seed,
            file_off,
        );
        assert!(back[..ptr_off]
            .iter()
            .chain(&back[ptr_off + len..])
            .all(|&x| x == POISON));
    }
    let reg = b
        .info()
        .details
        .into_iter()
        .find(|(k, _)| k == "buffer registration")
        .map(|(_, v)| v)
        .unwrap_or_default();
    eprintln!("buffer registration: {reg} (mode {})", b.gds_mode().as_str());
    drop(b);
    // SAFETY: no I/O is left (the backend is gone); each allocation is freed once.
    unsafe {
        cu::free_sync(src).unwrap();
        cu::free_sync(dst).unwrap();
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn large_transfers_are_split_across_the_threads() {
    let dir = test_dir();
    let path = dir.path().join("split.dat");
    let b = backend(CufileConfig {
        threads: 4,
        split_size: 64 << 10,
        register_buffers: true,
    });
    let t = open(&b, &path, None);
    let len = (8 << 20) + 5;
    let mut src = alloc(len + 8192);
    let mut dst = alloc(len + 8192);
    round_trip(&b, t, &path, &mut src, &mut dst, len, 4096 + 3, 100, 77);
    round_trip(&b, t, &path, &mut src, &mut dst, len, 0, 0, 78);
    let details = b.info().details;
    let get = |k: &str| -> u64 {
        details
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {details:?}"))
    };
    let (requests, pieces) = (get("requests"), get("pieces"));
    assert_eq!(requests, 4);
    assert!(
        pieces >= 4 * (len as u64 / (64 << 10)),
        "{pieces} pieces for {requests} requests: not split"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn buffers_work_unregistered_too() {
    let dir = test_dir();
    let path = dir.path().join("unregistered.dat");
    let b = backend(CufileConfig {
        register_buffers: false,
        ..CufileConfig::default()
    });
    let t = open(&b, &path, None);
    let mut src = alloc(3 << 20);
    let mut dst = alloc(3 << 20);
    round_trip(&b, t, &path, &mut src, &mut dst, (1 << 20) + 3, 4096 + 11, 13, 5);
    round_trip(&b, t, &path, &mut src, &mut dst, 4096, 0, 0, 6);
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn reading_past_the_end_is_a_short_io() {
    let dir = test_dir();
    let path = dir.path().join("short.dat");
    for split_size in [16 << 20, 4096] {
        let b = backend(CufileConfig {
            split_size,
            ..CufileConfig::default()
        });
        let _ = std::fs::remove_file(&path);
        let t = open(&b, &path, None);
        let mut buf = alloc(1 << 20);
        let mut host = vec![0u8; 8192];
        pattern::fill(&mut host, 9, 0);
        upload(&mut buf, 0, &host);
        assert_eq!(device_io(&b, t, IoOp::Write, 0, dptr(&buf), 8192).unwrap(), 8192);
        b.flush(t).unwrap();
        for (offset, len, done) in [
            (4096u64, 16384usize, 4096u64),
            (1 << 20, 4096, 0),
            (0, 65536, 8192),
        ] {
            match device_io(&b, t, IoOp::Read, offset, dptr(&buf), len) {
                Err(Error::ShortIo {
                    op,
                    done: d,
                    wanted,
                    offset: o,
                    ..
                }) => {
                    assert_eq!((op, d, wanted, o), ("read", done, len as u64, offset));
                }
                other => panic!(
                    "read of {len} bytes at {offset} of an 8192-byte file (split {split_size}): {other:?}"
                ),
            }
        }
        expect_pattern("data before the end", &download(&buf, 0, 8192), 9, 0);
        b.close(t).unwrap();
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn host_memory_is_moved_or_refused_clearly() {
    let dir = test_dir();
    let path = dir.path().join("host.dat");
    let b = backend(CufileConfig::default());
    let t = open(&b, &path, None);
    let len = (1 << 20) + 3;
    let mut src = AlignedBuf::new(len + 1, 4096).unwrap();
    pattern::fill(&mut src.as_mut_slice()[1..], 21, 4097);
    let mem = src.as_mem().slice(1, len);
    // SAFETY: `src` outlives the call.
    let wrote = unsafe {
        b.run(IoRequest {
            target: t,
            op: IoOp::Write,
            offset: 4097,
            mem,
        })
    };
    if !b.host_memory() {
        let msg = wrote
            .expect_err("host memory accepted although refused")
            .to_string();
        assert!(msg.contains("the uring backend"), "{msg}");
        return;
    }
    assert_eq!(wrote.unwrap_or_else(|e| panic!("host write: {e}")), len);
    let dst = AlignedBuf::new(len, 4096).unwrap();
    // SAFETY: `dst` outlives the call and is not otherwise accessed meanwhile.
    let read = unsafe {
        b.run(IoRequest {
            target: t,
            op: IoOp::Read,
            offset: 4097,
            mem: dst.as_mem(),
        })
    };
    assert_eq!(read.unwrap_or_else(|e| panic!("host read: {e}")), len);
    expect_pattern("host memory after reading", dst.as_slice(), 21, 4097);
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn concurrent_requests_flush_close_and_reopen() {
    let dir = test_dir();
    let path = dir.path().join("concurrent.dat");
    let b = backend(CufileConfig::default());
    let t = open(&b, &path, Some(8 << 20));
    const N: usize = 64;
    const LEN: usize = 64 << 10;
    let mut src = alloc(N * LEN);
    let mut host = vec![0u8; N * LEN];
    pattern::fill(&mut host, 33, 0);
    upload(&mut src, 0, &host);
    let base = dptr(&src);
    // SAFETY: `src` outlives every ticket (all are waited for below).
    let tickets = unsafe { submit_consecutive_writes(&b, t, base, N, LEN) };
    for (i, tk) in tickets.into_iter().enumerate() {
        assert_eq!(tk.wait().unwrap_or_else(|e| panic!("write {i}: {e}")), LEN);
    }
    b.flush(t).unwrap();
    b.close(t).unwrap();
    assert!(matches!(b.flush(t), Err(Error::InvalidArgument(_))));

    let t = open(&b, &path, None);
    let dst = alloc(N * LEN);
    assert_eq!(
        device_io(&b, t, IoOp::Read, 0, dptr(&dst), N * LEN).unwrap(),
        N * LEN
    );
    expect_pattern("file after concurrent writes", &download(&dst, 0, N * LEN), 33, 0);
    assert!(matches!(
        device_io(&b, t, IoOp::Read, 0, dptr(&dst), 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        device_io(&b, TargetId(9999), IoOp::Read, 0, dptr(&dst), 1),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
#[ignore = "needs an NVIDIA GPU and libcufile; run by scripts/gpu-test.sh"]
fn dropping_the_backend_with_requests_pending_does_not_hang() {
    let dir = test_dir();
    let path = dir.path().join("drop.dat");
    let b = backend(CufileConfig {
        threads: 2,
        ..CufileConfig::default()
    });
    let t = open(&b, &path, None);
    const N: usize = 32;
    const LEN: usize = 1 << 20;
    let src = alloc(N * LEN);
    let base = dptr(&src);
    // SAFETY: `src` outlives every ticket (all are waited for below).
    let tickets = unsafe { submit_consecutive_writes(&b, t, base, N, LEN) };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(b);
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("dropping the backend hung");
    let (mut ok, mut abandoned) = (0, 0);
    for tk in tickets {
        match tk.wait_timeout(Duration::from_secs(10)) {
            Ok(Ok(n)) => {
                assert_eq!(n, LEN);
                ok += 1;
            }
            Ok(Err(Error::Abandoned(_))) => abandoned += 1,
            Ok(Err(e)) => panic!("unexpected error: {e}"),
            Err(_) => panic!("a ticket never completed after the backend was dropped"),
        }
    }
    eprintln!("{ok} completed, {abandoned} abandoned");
    drop(src);
}

/// Submits `count` writes of `len` bytes, the i-th from `base + i*len` to offset `i*len`.
///
/// # Safety
/// The device memory must outlive every returned ticket.
unsafe fn submit_consecutive_writes(
    b: &CufileBackend,
    t: TargetId,
    base: u64,
    count: usize,
    len: usize,
) -> Vec<spillway_runtime::Ticket> {
    (0..count)
        .map(|i| {
            // SAFETY: the caller keeps the memory alive until the tickets complete.
            unsafe {
                b.submit(IoRequest {
                    target: t,
                    op: IoOp::Write,
                    offset: (i * len) as u64,
                    mem: MemRef::Device {
                        ptr: base + (i * len) as u64,
                        len,
                    },
                })
            }
            .unwrap()
        })
        .collect()
}
