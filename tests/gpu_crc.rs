//! The CRC-32C kernel (`kernels/crc32c.cu`, `Device::crc32c` of the CUDA device) against the
//! `crc32c` crate on a host copy of the same bytes: random pieces of 0 to 70 000 bytes (many
//! small and odd ones) at odd addresses, overlapping and repeated, up to 10 000 per call, and
//! one piece of 64 MiB; pieces that end exactly where their allocation ends; every segment
//! size; many calls in flight, some dropped without being waited for; bad streams and
//! pointers; and the `crc32c_bandwidth` benchmark (64 MiB as 2048 pieces of 32 KiB and as one
//! piece, against a cuMemcpyDtoD of the same size).
//!
//! The GPU tests are ignored by default; run them with
//!
//! ```text
//! cargo test --release --test gpu_crc -- --include-ignored --test-threads=1
//! ```
//!
//! or `scripts/gpu-test.sh` (which runs the same program from dist/). The benchmark writes
//! `$RESULTS_DIR/crc32c-kernel-h200.json` when RESULTS_DIR is set. The tests that run without
//! a GPU check the same harness against the host device.

mod common;

use std::time::Instant;

use spillway::runtime::{Device, DeviceBuffer, DevicePtr, Error, HostDevice, PendingChecksums, Stream};

use common::{alloc, download, gpu, upload, Rng};

// ---------------------------------------------------------------------------------------
// Helpers

/// Queues the checksums of `pieces` on `stream`.
///
/// # Safety
/// Every piece lies in device memory that stays live and unwritten until the result is
/// waited for (or the stream synchronized).
unsafe fn queue(
    dev: &dyn Device,
    stream: &dyn Stream,
    pieces: &[(DevicePtr, u64)],
    what: &str,
) -> PendingChecksums {
    // SAFETY: the caller's contract.
    unsafe { dev.crc32c(stream, pieces) }.unwrap_or_else(|e| panic!("{what}: crc32c failed: {e}"))
}

/// Checks `got` (for pieces at offsets into `host`, a copy of the device memory) against the
/// crate, naming the first wrong piece.
fn compare(what: &str, got: &[u32], offsets: &[(u64, u64)], host: &[u8]) {
    assert_eq!(got.len(), offsets.len(), "{what}: one checksum per piece");
    let wrong: Vec<usize> = offsets
        .iter()
        .enumerate()
        .filter(|&(i, &(off, len))| got[i] != crc32c::crc32c(&host[off as usize..(off + len) as usize]))
        .map(|(i, _)| i)
        .collect();
    if let Some(&i) = wrong.first() {
        let (off, len) = offsets[i];
        panic!(
            "{what}: {} of {} checksums differ from the crate's; the first is piece {i} (offset {off}, \
             {len} bytes): got {:#010x}, want {:#010x}",
            wrong.len(),
            got.len(),
            got[i],
            crc32c::crc32c(&host[off as usize..(off + len) as usize])
        );
    }
}

/// Pieces at `offsets` into memory at `base`.
fn at(base: DevicePtr, offsets: &[(u64, u64)]) -> Vec<(DevicePtr, u64)> {
    offsets.iter().map(|&(off, len)| (base + off, len)).collect()
}

// ---------------------------------------------------------------------------------------
// Random pieces

/// How to draw a call's pieces.
#[derive(Clone, Copy, Debug)]
struct Spec {
    name: &'static str,
    pieces: usize,
    max_len: u64,
    /// Bytes of the memory the pieces lie in (allocated at exactly this size, so a load past
    /// the last piece byte there is outside the allocation).
    arena: u64,
    seed: u64,
}

impl Spec {
    fn new(name: &'static str, pieces: usize, max_len: u64, arena: u64) -> Spec {
        Spec {
            name,
            pieces,
            max_len,
            arena,
            seed: 0xC5C ^ pieces as u64 ^ (max_len << 20) ^ arena,
        }
    }
}

/// Offsets and lengths of `spec.pieces` pieces in `[0, spec.arena)`: lengths from 0 to
/// `max_len`, with many empty, tiny and odd ones; random (so odd and overlapping) offsets;
/// some pieces at the very start or end of the arena, and some repeated.
fn draw(spec: &Spec, rng: &mut Rng) -> Vec<(u64, u64)> {
    let max_len = spec.max_len.min(spec.arena);
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(spec.pieces);
    while out.len() < spec.pieces {
        if !out.is_empty() && rng.chance(20) {
            let again = out[rng.below(out.len() as u64) as usize];
            out.push(again);
            continue;
        }
        let len = match rng.below(8) {
            0 => 0,
            1 | 2 => rng.range(1, 64.min(max_len.max(1))).min(max_len),
            3 => (rng.range(1, 16.min(max_len.max(1))) | 1).min(max_len),
            4 | 5 => rng.log_range(1, max_len.max(1)).min(max_len),
            _ => rng.range(0, max_len),
        };
        let off = match rng.below(10) {
            0 => 0,
            1 => spec.arena - len,
            _ => rng.below(spec.arena - len + 1),
        };
        out.push((off, len));
    }
    out
}

/// Draws a call's pieces, checksums them on `dev` and compares every checksum with the
/// crate's on the host copy.
fn check_spec(dev: &dyn Device, spec: &Spec) {
    let started = Instant::now();
    let mut rng = Rng(spec.seed);
    let host = rng.bytes(spec.arena as usize);
    let mem = alloc(dev, spec.arena);
    upload(dev, mem.ptr(), &host);
    let offsets = draw(spec, &mut rng);
    let stream = dev.create_stream().expect("create a stream");
    // SAFETY: `mem` lives until the end of this function, after the wait, and nothing writes it.
    let pending = unsafe { queue(dev, stream.as_ref(), &at(mem.ptr(), &offsets), spec.name) };
    let got = pending
        .wait()
        .unwrap_or_else(|e| panic!("{}: waiting for the checksums failed: {e}", spec.name));
    compare(spec.name, &got, &offsets, &host);
    let bytes: u64 = offsets.iter().map(|p| p.1).sum();
    eprintln!(
        "{}: {} pieces, {bytes} bytes in a {}-byte arena: all equal ({:.2?})",
        spec.name,
        offsets.len(),
        spec.arena,
        started.elapsed()
    );
}

/// The calls every GPU is checked with.
fn gpu_specs() -> Vec<Spec> {
    const M: u64 = 1 << 20;
    vec![
        Spec::new("one byte", 1, 1, 1),
        Spec::new("one piece of up to 70000 B", 1, 70_000, 70_001),
        Spec::new("100 pieces of 0 to 70000 B", 100, 70_000, 300_001),
        Spec::new("1000 pieces of 0 to 70000 B", 1000, 70_000, 3 * M + 1),
        Spec::new("10k pieces of 0 to 70000 B", 10_000, 70_000, 16 * M + 3),
        Spec::new("10k pieces of 0 to 70000 B, much overlap", 10_000, 70_000, M + 7),
        Spec::new("10k pieces of 0 to 64 B", 10_000, 64, 100_003),
        Spec::new("5000 pieces of 0 to 8 KiB", 5000, 8 << 10, 2 * M + 5),
    ]
}

// ---------------------------------------------------------------------------------------
// Tests that run anywhere: the harness against the host device

#[test]
fn the_harness_agrees_with_the_host_device() {
    let dev = HostDevice::new();
    for spec in [
        Spec::new("one byte", 1, 1, 1),
        Spec::new("300 pieces of 0 to 70000 B", 300, 70_000, 1 << 20),
        Spec::new("2000 pieces of 0 to 64 B", 2000, 64, 50_001),
    ] {
        check_spec(&dev, &spec);
    }
}

#[test]
fn the_edge_checks_agree_with_the_host_device() {
    check_edges(&HostDevice::new());
}

#[test]
fn the_in_flight_checks_agree_with_the_host_device() {
    check_in_flight(&HostDevice::new(), 8);
}

#[test]
fn the_host_device_gives_empty_and_zero_length_pieces_their_checksums() {
    check_empty(&HostDevice::new());
}

// ---------------------------------------------------------------------------------------
// GPU tests

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn crc32c_matches_the_crate() {
    let dev = gpu();
    eprintln!(
        "crc32c kernel from: {}; segments of {} bytes",
        dev.crc_kernel_origin().expect("load the crc32c kernel"),
        dev.crc_segment_size()
    );
    for spec in gpu_specs() {
        check_spec(dev.as_ref(), &spec);
    }

    // One piece of 64 MiB at an odd address, and the same memory as 2048 pieces of 32 KiB.
    let len = 64u64 << 20;
    let mut rng = Rng(64);
    let host = rng.bytes(len as usize + 1);
    let mem = alloc(dev.as_ref(), len + 1);
    upload(dev.as_ref(), mem.ptr(), &host);
    let stream = dev.create_stream().unwrap();
    let tensors: Vec<(u64, u64)> = (0..2048).map(|i| (i * (32 << 10), 32 << 10)).collect();
    // SAFETY: `mem` lives until the end of the test and nothing writes it.
    let (one, many) = unsafe {
        (
            queue(dev.as_ref(), stream.as_ref(), &[(mem.ptr() + 1, len)], "64 MiB"),
            queue(
                dev.as_ref(),
                stream.as_ref(),
                &at(mem.ptr(), &tensors),
                "2048 x 32 KiB",
            ),
        )
    };
    compare(
        "one piece of 64 MiB at +1",
        &one.wait().unwrap(),
        &[(1, len)],
        &host,
    );
    compare("2048 pieces of 32 KiB", &many.wait().unwrap(), &tensors, &host);
    eprintln!("one piece of 64 MiB at an odd address, and 2048 pieces of 32 KiB: equal");
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn every_segment_size_gives_the_same_checksums() {
    let dev = gpu();
    let default = dev.crc_segment_size();
    let specs = [
        Spec::new("2000 pieces of 0 to 70000 B", 2000, 70_000, (4 << 20) + 9),
        Spec::new("3000 pieces of 0 to 600 B", 3000, 600, 60_001),
    ];
    for segment in [1u64 << 9, 1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 20] {
        dev.set_crc_segment_size(segment).unwrap();
        eprintln!("segments of {segment} bytes");
        for spec in &specs {
            let mut spec = *spec;
            spec.seed ^= segment;
            check_spec(dev.as_ref(), &spec);
        }
    }
    for bad in [0u64, 100, 256, 3 << 12, 1 << 21] {
        assert!(
            matches!(dev.set_crc_segment_size(bad), Err(Error::InvalidArgument(_))),
            "segment size {bad} should be refused"
        );
    }
    dev.set_crc_segment_size(default).unwrap();
}

/// Pieces that start at the first byte or end at the last byte of allocations of exact, odd
/// sizes: on a GPU under compute-sanitizer, any load past a piece's end (or before its
/// start) there is reported.
fn check_edges(dev: &dyn Device) {
    let stream = dev.create_stream().unwrap();
    let mut rng = Rng(7);
    for size in [
        1u64, 2, 3, 4, 15, 16, 17, 31, 33, 511, 512, 513, 4097, 8191, 8193, 70_001,
    ] {
        let host = rng.bytes(size as usize);
        let mem = alloc(dev, size);
        upload(dev, mem.ptr(), &host);
        let mut offsets = vec![(0, size)];
        for k in 0..=size.min(40) {
            offsets.push((size - k, k)); // the last k bytes
            offsets.push((0, k)); // the first k bytes
        }
        for _ in 0..20 {
            let len = rng.range(0, size);
            offsets.push((size - len, len));
        }
        // SAFETY: `mem` lives until after the wait and nothing writes it.
        let pending = unsafe { queue(dev, stream.as_ref(), &at(mem.ptr(), &offsets), "edges") };
        compare(
            &format!("allocation of {size} bytes"),
            &pending.wait().unwrap(),
            &offsets,
            &host,
        );
    }
    eprintln!("pieces at the edges of allocations of 1 to 70001 bytes: equal");
}

/// `rounds` calls queued on two streams before anything waits: on a GPU more than there are
/// table and result slots, a quarter of them dropped without being waited for (their
/// buffers must not be handed to a later call before their work is done), each with its own
/// pieces.
fn check_in_flight(dev: &dyn Device, rounds: usize) {
    let streams = [dev.create_stream().unwrap(), dev.create_stream().unwrap()];
    let mut rng = Rng(99);
    struct Call {
        host: Vec<u8>,
        _mem: DeviceBuffer,
        offsets: Vec<(u64, u64)>,
        pending: PendingChecksums,
    }
    let mut calls = Vec::new();
    // The memory of the calls dropped unread, kept until the streams are synchronized.
    let mut kept = Vec::new();
    for round in 0..rounds {
        let mut spec = Spec::new(
            "in flight",
            1 + rng.below(3000) as usize,
            1 + rng.below(70_000),
            1 + rng.range(70_000, 1 << 20),
        );
        spec.seed ^= round as u64;
        let mut call_rng = Rng(spec.seed);
        let host = call_rng.bytes(spec.arena as usize);
        let mem = alloc(dev, spec.arena);
        upload(dev, mem.ptr(), &host);
        let offsets = draw(&spec, &mut call_rng);
        let stream = streams[round % 2].as_ref();
        // SAFETY: every buffer is kept in `calls` until its checksums are waited for, or in
        // `kept` until the streams are synchronized.
        let pending = unsafe { queue(dev, stream, &at(mem.ptr(), &offsets), "in flight") };
        if round % 4 == 3 {
            // Dropped unread: its result buffer goes back to the pool with its copy queued.
            drop(pending);
            kept.push(mem);
            // A large call behind it on the same stream, so the dropped one's slot stays busy
            // for a while; it is checked like the others.
            let big = Spec::new("big", 64, 70_000, 8 << 20);
            let mut big_rng = Rng(spec.seed ^ 0xB16);
            let big_host = big_rng.bytes(big.arena as usize);
            let big_mem = alloc(dev, big.arena);
            upload(dev, big_mem.ptr(), &big_host);
            let big_offsets = draw(&big, &mut big_rng);
            // SAFETY: as above.
            let big_pending = unsafe { queue(dev, stream, &at(big_mem.ptr(), &big_offsets), "big") };
            calls.push(Call {
                host: big_host,
                _mem: big_mem,
                offsets: big_offsets,
                pending: big_pending,
            });
            continue;
        }
        calls.push(Call {
            host,
            _mem: mem,
            offsets,
            pending,
        });
    }
    let n = calls.len();
    for (i, call) in calls.into_iter().enumerate() {
        let got = call.pending.wait().unwrap();
        compare(&format!("call {i} of {n}"), &got, &call.offsets, &call.host);
    }
    for s in &streams {
        s.synchronize().unwrap();
    }
    eprintln!(
        "{n} calls in flight on 2 streams ({} more dropped unread): all equal",
        kept.len()
    );
    drop(kept);
}

/// No pieces, pieces of length 0 only (at addresses that are not memory of the device: they
/// must not be read), and empty pieces among others. (No null address: the host device makes
/// a slice of each piece, which must not start at null.)
fn check_empty(dev: &dyn Device) {
    let stream = dev.create_stream().unwrap();
    let mem = alloc(dev, 4096);
    let host = Rng(5).bytes(4096);
    upload(dev, mem.ptr(), &host);
    let elsewhere = [0u8; 64];
    // SAFETY: `mem` lives until after every wait; zero-length pieces are never read, whatever
    // their address.
    unsafe {
        let got = queue(dev, stream.as_ref(), &[], "no pieces").wait().unwrap();
        assert_eq!(got, Vec::<u32>::new(), "no pieces, no checksums");
        let nothing = [(1, 0), (elsewhere.as_ptr() as u64, 0), (mem.ptr() + 4096, 0)];
        let got = queue(dev, stream.as_ref(), &nothing, "zero-length")
            .wait()
            .unwrap();
        assert_eq!(got, [0, 0, 0], "the CRC-32C of nothing is 0");
        let offsets = [(0, 0), (0, 4096), (7, 0), (4095, 1), (4096, 0), (100, 3)];
        let mut pieces = at(mem.ptr(), &offsets);
        pieces[2].0 = 1; // an empty piece anywhere
        let got = queue(dev, stream.as_ref(), &pieces, "mixed").wait().unwrap();
        compare("empty pieces among others", &got, &offsets, &host);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn pieces_at_allocation_edges() {
    check_edges(gpu().as_ref());
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn many_calls_in_flight_stay_correct() {
    check_in_flight(gpu().as_ref(), 60);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn empty_and_zero_length_pieces() {
    let dev = gpu();
    check_empty(dev.as_ref());
    // A null address too, which only the GPU is given: an empty piece is never read.
    let stream = dev.create_stream().unwrap();
    // SAFETY: no piece has a byte to read.
    let got = unsafe { queue(dev.as_ref(), stream.as_ref(), &[(0, 0), (0, 0)], "null") }
        .wait()
        .unwrap();
    assert_eq!(got, [0, 0]);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn bad_streams_and_pointers_are_refused() {
    let dev = gpu();
    let stream = dev.create_stream().unwrap();
    let len = 1u64 << 16;
    let mem = alloc(dev.as_ref(), len);
    let m = mem.ptr();
    let invalid = |what: &str, result: spillway::runtime::Result<PendingChecksums>, needle: &str| match result
    {
        Err(Error::InvalidArgument(msg)) => {
            assert!(
                msg.contains(needle),
                "{what}: the error should say \"{needle}\": {msg}"
            );
            eprintln!("{what}: {msg}");
        }
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    };
    let host = vec![0u8; 4096];
    let host_stream = HostDevice::new().create_stream().unwrap();
    // SAFETY: every call is refused before anything is queued; the buffers are live anyway.
    unsafe {
        invalid(
            "a host stream",
            dev.crc32c(host_stream.as_ref(), &[(m, 10)]),
            "own streams",
        );
        invalid(
            "host memory",
            dev.crc32c(stream.as_ref(), &[(m, 10), (host.as_ptr() as u64, 100)]),
            "piece 1: ",
        );
        invalid(
            "host memory",
            dev.crc32c(stream.as_ref(), &[(host.as_ptr() as u64, 100)]),
            "not device memory",
        );
        invalid(
            "a piece past the end of its allocation",
            dev.crc32c(stream.as_ref(), &[(m, len), (m + 8, len)]),
            "past the end of its allocation",
        );
        invalid(
            "a piece wrapping around",
            dev.crc32c(stream.as_ref(), &[(u64::MAX - 5, 10)]),
            "wraps",
        );
    }
    // Still usable afterwards.
    check_spec(dev.as_ref(), &Spec::new("after errors", 500, 70_000, 1 << 20));
}

// ---------------------------------------------------------------------------------------
// Benchmark

/// Bytes per second, as GB/s (10^9).
fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

/// The best of `trials` timings of `iters` back-to-back calls of `op` on `stream` (after
/// `warmup` untimed ones), in seconds per call. What `op` returns is kept until the stream
/// is synchronized, and dropped after the timing.
fn time_runs<T>(
    stream: &dyn Stream,
    warmup: usize,
    iters: usize,
    trials: usize,
    mut op: impl FnMut() -> T,
) -> f64 {
    let kept: Vec<T> = (0..warmup).map(|_| op()).collect();
    stream.synchronize().unwrap();
    drop(kept);
    let mut best = f64::INFINITY;
    for _ in 0..trials {
        let t = Instant::now();
        let kept: Vec<T> = (0..iters).map(|_| op()).collect();
        stream.synchronize().unwrap();
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
        drop(kept);
    }
    best
}

#[test]
#[ignore = "benchmark; needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn crc32c_bandwidth() {
    let dev = gpu();
    let origin = dev.crc_kernel_origin().expect("load the crc32c kernel");
    let bytes = 64u64 << 20;
    let piece = 32u64 << 10;
    let n = (bytes / piece) as usize;
    let seed = 11u64;
    let src = alloc(dev.as_ref(), bytes + 16);
    let dst = alloc(dev.as_ref(), bytes + 16);
    dev.fill_pattern(src.ptr(), (bytes + 16) as usize, seed, 0)
        .unwrap();
    let host = download(dev.as_ref(), src.ptr(), bytes + 16);
    let tensors: Vec<(u64, u64)> = (0..n as u64).map(|i| (i * piece, piece)).collect();
    let odd: Vec<(u64, u64)> = (0..n as u64).map(|i| (i * piece + 1 + i % 15, piece)).collect();
    let whole = [(0u64, bytes)];
    let stream = dev.create_stream().unwrap();
    let s = stream.as_ref();
    let (warmup, iters, trials) = (10, 10, 5);

    // The benchmark's inputs give the crate's checksums.
    for (what, offsets) in [
        ("tensors", &tensors[..]),
        ("odd", &odd[..]),
        ("whole", &whole[..]),
    ] {
        // SAFETY: `src` lives until the end of the test and nothing writes it.
        let got = unsafe { queue(dev.as_ref(), s, &at(src.ptr(), offsets), what) }
            .wait()
            .unwrap();
        compare(what, &got, offsets, &host);
    }

    // SAFETY (all the closures below): `src` and `dst` live until the end of this function,
    // each timing ends with a synchronize, and the pieces lie inside `src`.
    let memcpy = time_runs(s, warmup, iters, trials, || unsafe {
        s.copy_d2d(dst.ptr(), src.ptr(), bytes as usize).unwrap()
    });
    let run = |offsets: &[(u64, u64)]| {
        let pieces = at(src.ptr(), offsets);
        // SAFETY: as above.
        time_runs(s, warmup, iters, trials, || unsafe {
            queue(dev.as_ref(), s, &pieces, "timed")
        })
    };
    let default_segment = dev.crc_segment_size();
    let mut rows = Vec::new();
    for segment in [1u64 << 11, 1 << 12, 1 << 14, 1 << 15, 1 << 16, default_segment] {
        dev.set_crc_segment_size(segment).unwrap();
        rows.push((segment, run(&tensors), run(&whole)));
    }
    let (_, many, one) = *rows.last().unwrap();
    let odd_time = run(&odd);

    let memcpy_gbps = gbps(bytes, memcpy);
    println!(
        "\ncrc32c bandwidth on {}: {bytes} bytes as {n} pieces of {piece} bytes and as one piece; \
         kernels: {origin}",
        dev.gpu_info().name
    );
    println!(
        "{:<48} {:>10} {:>10} {:>9}",
        "operation", "ms", "GB/s", "x memcpy"
    );
    let row = |name: &str, secs: f64| {
        let g = gbps(bytes, secs);
        println!(
            "{name:<48} {:>10.3} {g:>10.1} {:>9.3}",
            secs * 1e3,
            g / memcpy_gbps
        );
    };
    row("cuMemcpyDtoDAsync (one copy)", memcpy);
    for (segment, m, o) in &rows {
        row(
            &format!("crc32c, {n} x 32 KiB, segment {} KiB", segment >> 10),
            *m,
        );
        row(&format!("crc32c, 1 x 64 MiB, segment {} KiB", segment >> 10), *o);
    }
    row(&format!("crc32c, {n} x 32 KiB at odd addresses"), odd_time);

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let result = serde_json::json!({
        "command": command,
        "gpu": dev.gpu_info().name,
        "pieces": n,
        "piece_bytes": piece,
        "bytes": bytes,
        "segment_bytes": default_segment,
        "kernels": origin,
        "iterations": iters,
        "memcpy_gbps": memcpy_gbps,
        "crc32c_gbps": gbps(bytes, many),
        "crc32c_vs_memcpy": gbps(bytes, many) / memcpy_gbps,
        "one_piece_gbps": gbps(bytes, one),
        "one_piece_vs_memcpy": gbps(bytes, one) / memcpy_gbps,
        "odd_addresses_gbps": gbps(bytes, odd_time),
        "segment_sweep": rows.iter().map(|(seg, m, o)| serde_json::json!({
            "segment_bytes": seg, "crc32c_gbps": gbps(bytes, *m), "one_piece_gbps": gbps(bytes, *o)
        })).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    if let Some(dir) = std::env::var_os("RESULTS_DIR") {
        let path = std::path::Path::new(&dir).join("crc32c-kernel-h200.json");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(&result).unwrap() + "\n")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}
