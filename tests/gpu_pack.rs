//! The pack and unpack kernels (`kernels/pack.cu`) against the CPU reference
//! (`spillway_runtime::{pack_host, unpack_host}`): random layouts from 1 to 100k
//! pieces of 1 byte to 64 MiB, at odd source and destination addresses, with random gaps,
//! into memory poisoned beforehand, compared byte for byte; bad layouts; and the
//! `pack_bandwidth` benchmark (pack and unpack against one large cuMemcpyDtoD).
//!
//! The GPU tests are ignored by default; run them with
//!
//! ```text
//! cargo test --release --test gpu_pack -- --include-ignored --test-threads=1
//! ```
//!
//! or `scripts/gpu-test.sh` (which runs the same program from dist/). The benchmark writes
//! `$RESULTS_DIR/pack-kernel-h200.json` when RESULTS_DIR is set. The tests that run without
//! a GPU check the same harness against the host device.

mod common;

use std::time::Instant;

use spillway::cuda::CudaDevice;
use spillway::runtime::{pack_host, unpack_host};
use spillway::runtime::{Device, DeviceBuffer, Error, HostDevice, PackPiece, Stream};

use common::{alloc, download, gpu, upload, Rng};

/// What every byte of an output buffer holds before a run.
const POISON: u8 = 0xA5;
/// Bytes before and after each output region that must keep their poison.
const GUARD: u64 = 64;

// ---------------------------------------------------------------------------------------
// Helpers

/// The first differing position and how many positions differ.
fn diff(got: &[u8], want: &[u8]) -> Option<(usize, usize)> {
    assert_eq!(got.len(), want.len());
    let first = got.iter().zip(want).position(|(a, b)| a != b)?;
    let count = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some((first, count))
}

/// Pieces moved from device addresses in `[from, from + len)` to the same places relative
/// to `to` (a host copy of that memory).
fn rebase(pieces: &[PackPiece], from: u64, to: u64) -> Vec<PackPiece> {
    pieces
        .iter()
        .map(|p| PackPiece {
            mem: p.mem - from + to,
            ..*p
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Random layouts

/// How to draw a layout.
#[derive(Clone, Copy, Debug)]
struct Spec {
    name: &'static str,
    pieces: usize,
    min_len: u64,
    max_len: u64,
    /// Largest gap between pieces (and before the first and after the last); 0 for none.
    max_gap: u64,
    /// Tensor-like: piece memory 256-byte aligned and extent offsets multiples of 256, so
    /// sources and destinations are congruent mod 16 (the kernels' 16-byte path). Otherwise
    /// every address is random.
    aligned: bool,
    /// Unpack also scatters some extent ranges twice (to two destinations).
    repeats: bool,
    seed: u64,
}

impl Spec {
    fn new(name: &'static str, pieces: usize, min_len: u64, max_len: u64, max_gap: u64) -> Spec {
        Spec {
            name,
            pieces,
            min_len,
            max_len,
            max_gap,
            aligned: false,
            repeats: false,
            seed: 0x5EED ^ pieces as u64 ^ max_len,
        }
    }
}

/// A drawn layout: pieces sorted by offset, with their memory at offsets into an arena of
/// `arena_len` bytes (memory addresses are arena offsets until rebased).
struct Layout {
    pieces: Vec<PackPiece>,
    extent_len: u64,
    arena_len: u64,
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Places pieces of the given lengths in an arena in random order, with random slack
/// between them; returns each piece's arena offset (by piece index) and the arena length.
fn place(rng: &mut Rng, lens: &[u64], aligned: bool) -> (Vec<u64>, u64) {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    rng.shuffle(&mut order);
    let mut at = 0u64;
    let mut mems = vec![0u64; lens.len()];
    for i in order {
        at += rng.below(40);
        if aligned {
            at = round_up(at, 256);
        }
        mems[i] = at;
        at += lens[i];
    }
    (mems, at + 64)
}

fn draw(spec: &Spec, rng: &mut Rng) -> Layout {
    let lens: Vec<u64> = (0..spec.pieces)
        .map(|_| rng.log_range(spec.min_len, spec.max_len))
        .collect();
    let mut offsets = Vec::with_capacity(lens.len());
    let mut at = if rng.chance(2) {
        rng.below(spec.max_gap + 1)
    } else {
        0
    };
    for &len in &lens {
        if spec.aligned {
            at = round_up(at, 256);
        }
        offsets.push(at);
        at += len;
        if rng.chance(2) {
            at += rng.below(spec.max_gap + 1);
        }
    }
    let extent_len = at;
    let (mems, arena_len) = place(rng, &lens, spec.aligned);
    let pieces = (0..lens.len())
        .map(|i| PackPiece {
            mem: mems[i],
            offset: offsets[i],
            len: lens[i],
        })
        .collect();
    Layout {
        pieces,
        extent_len,
        arena_len,
    }
}

/// Where extent byte `at` lies, for failure messages.
fn locate(pieces: &[PackPiece], at: u64) -> String {
    let i = pieces.partition_point(|p| p.end() <= at);
    match pieces.get(i) {
        Some(p) if p.offset <= at => format!("byte {} of piece {i} ({p:?})", at - p.offset),
        _ => "a gap between pieces (zero-fill)".to_string(),
    }
}

/// Draws a layout, packs it on `dev` into a poisoned extent at an odd address and checks
/// every byte (and the guards around it) against `pack_host`; then unpacks that extent, in
/// shuffled piece order, to odd addresses of a poisoned arena and checks it against
/// `unpack_host`.
fn check_layout(dev: &dyn Device, spec: &Spec) {
    let started = Instant::now();
    let mut rng = Rng(spec.seed);
    let layout = draw(spec, &mut rng);
    let total: u64 = layout.pieces.iter().map(|p| p.len).sum();
    let ext_shift = if spec.aligned { 0 } else { rng.below(16) };

    // Sources: random bytes.
    let src_host = rng.bytes(layout.arena_len as usize);
    let src = alloc(dev, layout.arena_len);
    upload(dev, src.ptr(), &src_host);
    let pieces: Vec<PackPiece> = rebase(&layout.pieces, 0, src.ptr());

    // The extent, poisoned, with guards; at an odd address unless aligned.
    let span = layout.extent_len + 2 * GUARD + 16;
    let ext_buf = alloc(dev, span);
    let region = GUARD + ext_shift;
    let extent = ext_buf.ptr() + region;
    upload(dev, ext_buf.ptr(), &vec![POISON; span as usize]);

    let stream = dev.create_stream().expect("create a stream");
    // SAFETY: the extent and the sources are live, disjoint buffers, kept until the stream is
    // synchronized below.
    unsafe { dev.pack(stream.as_ref(), extent, layout.extent_len, &pieces) }
        .unwrap_or_else(|e| panic!("{}: pack failed: {e}", spec.name));
    stream.synchronize().expect("synchronize after pack");

    let got = download(dev, ext_buf.ptr(), span);
    let mut want = vec![POISON; span as usize];
    let host_pieces = rebase(&pieces, src.ptr(), src_host.as_ptr() as u64);
    let ext_range = region as usize..(region + layout.extent_len) as usize;
    // SAFETY: the host pieces point into `src_host`, disjoint from `want`.
    unsafe { pack_host(&mut want[ext_range.clone()], &host_pieces) }.expect("reference pack");
    if let Some((i, n)) = diff(&got, &want) {
        let i = i as u64;
        let place = if i < region {
            "before the extent (written below its start)".to_string()
        } else if i >= region + layout.extent_len {
            "after the extent (written past its end)".to_string()
        } else {
            format!("at extent byte {} = {}", i - region, locate(&pieces, i - region))
        };
        panic!(
            "{}: pack differs from the CPU reference {place}: got {:#04x}, want {:#04x}; {n} of {span} \
             bytes differ",
            spec.name, got[i as usize], want[i as usize]
        );
    }
    let packed_host = want[ext_range].to_vec();
    drop(got);
    drop(want);

    // Unpack in shuffled order into a poisoned arena, each piece at a new odd address.
    let mut scatter = layout.pieces.clone();
    if spec.repeats {
        // Some extent ranges scattered twice, and some sub-ranges of pieces.
        let mut extra = Vec::new();
        for p in &layout.pieces {
            if rng.chance(4) {
                let skip = rng.below(p.len);
                extra.push(PackPiece {
                    offset: p.offset + skip,
                    len: rng.range(1, p.len - skip),
                    ..*p
                });
            }
        }
        scatter.extend(extra);
    }
    rng.shuffle(&mut scatter);
    let lens: Vec<u64> = scatter.iter().map(|p| p.len).collect();
    let (mems, dst_len) = place(&mut rng, &lens, spec.aligned);
    let dst = alloc(dev, dst_len);
    upload(dev, dst.ptr(), &vec![POISON; dst_len as usize]);
    for (p, m) in scatter.iter_mut().zip(&mems) {
        p.mem = dst.ptr() + m;
    }
    // SAFETY: the destinations are disjoint regions of `dst`, the extent is live; both are
    // kept until the stream is synchronized below.
    unsafe { dev.unpack(stream.as_ref(), extent, layout.extent_len, &scatter) }
        .unwrap_or_else(|e| panic!("{}: unpack failed: {e}", spec.name));
    stream.synchronize().expect("synchronize after unpack");

    let got = download(dev, dst.ptr(), dst_len);
    let mut want = vec![POISON; dst_len as usize];
    let host_scatter = rebase(&scatter, dst.ptr(), want.as_mut_ptr() as u64);
    // SAFETY: the host pieces are disjoint regions of `want`, which `packed_host` is not.
    unsafe { unpack_host(&packed_host, &host_scatter) }.expect("reference unpack");
    if let Some((i, n)) = diff(&got, &want) {
        let owner = scatter
            .iter()
            .position(|p| (p.mem - dst.ptr()..p.mem - dst.ptr() + p.len).contains(&(i as u64)));
        let place = match owner {
            Some(k) => format!(
                "in piece {k} ({:?}) at byte {}",
                scatter[k],
                i as u64 - (scatter[k].mem - dst.ptr())
            ),
            None => "outside every piece (written where it must not)".to_string(),
        };
        panic!(
            "{}: unpack differs from the CPU reference {place}: got {:#04x}, want {:#04x}; {n} bytes \
             differ",
            spec.name, got[i], want[i]
        );
    }
    eprintln!(
        "{}: {} pieces, {total} bytes in a {}-byte extent (+{ext_shift}), {} scattered: byte-exact \
         ({:.2?})",
        spec.name,
        pieces.len(),
        layout.extent_len,
        scatter.len(),
        started.elapsed()
    );
}

/// The layouts every device is checked with (sizes kept so that the largest needs about
/// 1.5 GiB of device memory).
fn gpu_specs() -> Vec<Spec> {
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    let mut specs = vec![
        Spec::new("one byte", 1, 1, 1, 9),
        Spec::new("one piece of 64 MiB", 1, 64 * M, 64 * M, 4095),
        Spec::new("7 pieces of 1 B to 64 MiB", 7, 1, 64 * M, 5000),
        Spec::new("1000 pieces of 1 B to 1 MiB", 1000, 1, M, 300),
        Spec::new("1000 pieces of 1 B to 64 KiB, no gaps", 1000, 1, 64 * K, 0),
        Spec::new("100k pieces of 1 B to 4 KiB", 100_000, 1, 4 * K, 100),
        Spec::new("100k pieces of 1 to 64 B, no gaps", 100_000, 1, 64, 0),
        Spec::new("100k pieces of 1 to 16 B, large gaps", 100_000, 1, 16, 5000),
    ];
    let mut aligned = Spec::new("1000 tensor-like pieces of 1 KiB to 1 MiB", 1000, K, M, 1000);
    aligned.aligned = true;
    specs.push(aligned);
    let mut repeats = Spec::new("unpack with repeated ranges", 3000, 1, 100 * K, 64);
    repeats.repeats = true;
    specs.push(repeats);
    specs
}

// ---------------------------------------------------------------------------------------
// Tests that run anywhere: the harness against the host device

#[test]
fn the_harness_agrees_with_the_host_device() {
    let dev = HostDevice::new();
    let mut specs = vec![
        Spec::new("one byte", 1, 1, 1, 9),
        Spec::new("7 pieces of 1 B to 1 MiB", 7, 1, 1 << 20, 5000),
        Spec::new("1000 pieces of 1 B to 8 KiB", 1000, 1, 8 << 10, 300),
    ];
    let mut repeats = Spec::new("unpack with repeated ranges", 300, 1, 4096, 64);
    repeats.repeats = true;
    specs.push(repeats);
    let mut aligned = Spec::new("tensor-like", 100, 1024, 1 << 16, 100);
    aligned.aligned = true;
    specs.push(aligned);
    for spec in &specs {
        check_layout(&dev, spec);
    }
}

// ---------------------------------------------------------------------------------------
// GPU tests

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn pack_and_unpack_match_the_cpu_reference() {
    let dev = gpu();
    eprintln!(
        "pack kernels from: {}; tile {} bytes",
        dev.pack_kernel_origin().expect("load the pack kernels"),
        dev.pack_tile_size()
    );
    for spec in gpu_specs() {
        check_layout(dev.as_ref(), &spec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn every_tile_size_gives_the_same_bytes() {
    let dev = gpu();
    let default = dev.pack_tile_size();
    let specs = [
        Spec::new("200 pieces of 1 B to 256 KiB", 200, 1, 256 << 10, 5000),
        Spec::new("5000 pieces of 1 to 100 B", 5000, 1, 100, 40),
    ];
    for tile in [1u64 << 10, 1 << 12, 1 << 16, 1 << 20, 1 << 24] {
        dev.set_pack_tile_size(tile).unwrap();
        eprintln!("tile {tile} bytes");
        for spec in &specs {
            let mut spec = *spec;
            spec.seed ^= tile;
            check_layout(dev.as_ref(), &spec);
        }
    }
    for bad in [0u64, 100, 512, 3 << 12, 1 << 25] {
        assert!(
            matches!(dev.set_pack_tile_size(bad), Err(Error::InvalidArgument(_))),
            "tile size {bad} should be refused"
        );
    }
    dev.set_pack_tile_size(default).unwrap();
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn empty_layouts_zero_the_extent_or_do_nothing() {
    let dev = gpu();
    let len = (1u64 << 20) + 3;
    let buf = alloc(dev.as_ref(), len + 2 * GUARD);
    upload(dev.as_ref(), buf.ptr(), &vec![POISON; (len + 2 * GUARD) as usize]);
    let extent = buf.ptr() + GUARD + 1;
    let stream = dev.create_stream().unwrap();
    // SAFETY: the extent lies inside `buf`, kept until the synchronize below.
    unsafe {
        dev.pack(stream.as_ref(), extent, len - 2, &[]).unwrap();
        dev.pack(stream.as_ref(), extent, 0, &[]).unwrap();
        dev.unpack(stream.as_ref(), extent, len - 2, &[]).unwrap();
    }
    stream.synchronize().unwrap();
    let got = download(dev.as_ref(), buf.ptr(), len + 2 * GUARD);
    let mut want = vec![POISON; got.len()];
    want[(GUARD + 1) as usize..(GUARD + len - 1) as usize].fill(0);
    assert_eq!(
        diff(&got, &want),
        None,
        "a pack of no pieces zeroes exactly the extent"
    );
}

/// Many packs and unpacks queued on two streams before anything waits: more launches in
/// flight than there are table upload slots, each with its own layout. The extents are
/// allocated at their exact (odd) sizes, so that under compute-sanitizer any load past an
/// extent's last byte is reported.
#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn many_launches_in_flight_stay_correct() {
    let dev = gpu();
    let rounds = 48usize;
    let mut rng = Rng(99);
    let streams = [dev.create_stream().unwrap(), dev.create_stream().unwrap()];
    struct Round {
        src_host: Vec<u8>,
        _src: DeviceBuffer,
        ext: DeviceBuffer,
        dst: DeviceBuffer,
        layout: Layout,
        scatter: Vec<PackPiece>,
    }
    let mut all = Vec::new();
    for r in 0..rounds {
        let spec = Spec::new(
            "in flight",
            1 + rng.below(3000) as usize,
            1,
            1 + rng.below(20_000),
            100,
        );
        let layout = draw(&spec, &mut rng);
        let src_host = rng.bytes(layout.arena_len as usize);
        let src = alloc(dev.as_ref(), layout.arena_len);
        upload(dev.as_ref(), src.ptr(), &src_host);
        let ext = alloc(dev.as_ref(), layout.extent_len.max(1));
        upload(dev.as_ref(), ext.ptr(), &vec![POISON; layout.extent_len as usize]);
        let dst = alloc(dev.as_ref(), layout.arena_len);
        upload(dev.as_ref(), dst.ptr(), &vec![POISON; layout.arena_len as usize]);
        let pieces = rebase(&layout.pieces, 0, src.ptr());
        let scatter = rebase(&layout.pieces, 0, dst.ptr());
        let stream = &streams[r % 2];
        // SAFETY: every buffer is kept in `all` until both streams are synchronized below.
        unsafe {
            dev.pack(stream.as_ref(), ext.ptr(), layout.extent_len, &pieces)
                .unwrap();
            dev.unpack(stream.as_ref(), ext.ptr(), layout.extent_len, &scatter)
                .unwrap();
        }
        all.push(Round {
            src_host,
            _src: src,
            ext,
            dst,
            layout,
            scatter,
        });
    }
    for s in &streams {
        s.synchronize().unwrap();
    }
    for (r, round) in all.iter().enumerate() {
        let mut want = vec![0u8; round.layout.extent_len as usize];
        let host = rebase(&round.layout.pieces, 0, round.src_host.as_ptr() as u64);
        // SAFETY: the host pieces point into `src_host`.
        unsafe { pack_host(&mut want, &host) }.unwrap();
        let got = download(dev.as_ref(), round.ext.ptr(), round.layout.extent_len);
        assert_eq!(diff(&got, &want), None, "round {r}: extent");
        let got = download(dev.as_ref(), round.dst.ptr(), round.layout.arena_len);
        let mut want_dst = vec![POISON; round.layout.arena_len as usize];
        for p in &round.scatter {
            let at = (p.mem - round.dst.ptr()) as usize;
            want_dst[at..at + p.len as usize].copy_from_slice(&round.src_host[at..at + p.len as usize]);
        }
        assert_eq!(diff(&got, &want_dst), None, "round {r}: unpacked pieces");
    }
    eprintln!("{rounds} packs and unpacks in flight on 2 streams: byte-exact");
}

#[test]
#[ignore = "needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn bad_layouts_are_errors_and_launch_nothing() {
    let dev = gpu();
    let len = 1u64 << 16;
    let src = alloc(dev.as_ref(), len);
    let ext = alloc(dev.as_ref(), len);
    upload(dev.as_ref(), ext.ptr(), &vec![POISON; len as usize]);
    let stream = dev.create_stream().unwrap();
    let piece = |mem: u64, offset: u64, len: u64| PackPiece { mem, offset, len };
    let s = src.ptr();

    let invalid = |what: &str, result: spillway::runtime::Result<()>, needle: &str| match result {
        Err(Error::InvalidArgument(msg)) => {
            assert!(
                msg.contains(needle),
                "{what}: the error should say \"{needle}\": {msg}"
            );
            eprintln!("{what}: {msg}");
        }
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    };
    // SAFETY: every call is refused before anything is queued (checked below: the extent
    // keeps its poison); the buffers are live anyway.
    unsafe {
        let overlapping = [piece(s, 0, 100), piece(s + 200, 50, 100)];
        invalid(
            "overlapping pieces",
            dev.pack(stream.as_ref(), ext.ptr(), len, &overlapping),
            "overlaps",
        );
        let unsorted = [piece(s, 1000, 10), piece(s + 100, 0, 10)];
        invalid(
            "unsorted pieces",
            dev.pack(stream.as_ref(), ext.ptr(), len, &unsorted),
            "piece 1",
        );
        let past = [piece(s, len - 5, 10)];
        invalid(
            "pack piece past the end",
            dev.pack(stream.as_ref(), ext.ptr(), len, &past),
            "past the end",
        );
        invalid(
            "unpack piece past the end",
            dev.unpack(stream.as_ref(), ext.ptr(), len, &past),
            "past the end",
        );
        invalid(
            "empty piece",
            dev.pack(stream.as_ref(), ext.ptr(), len, &[piece(s, 0, 0)]),
            "empty",
        );
        let inside = [piece(ext.ptr() + 100, 0, 10)];
        invalid(
            "piece memory inside the extent",
            dev.pack(stream.as_ref(), ext.ptr(), len, &inside),
            "overlaps the extent",
        );
        invalid(
            "unpack into the extent",
            dev.unpack(stream.as_ref(), ext.ptr(), len, &inside),
            "overlaps the extent",
        );
        let host = vec![0u8; 4096];
        invalid(
            "host memory as the extent",
            dev.pack(stream.as_ref(), host.as_ptr() as u64, 4096, &[piece(s, 0, 10)]),
            "not device memory",
        );
        invalid(
            "an extent past its allocation",
            dev.pack(stream.as_ref(), ext.ptr() + 8, len, &[piece(s, 0, 10)]),
            "past the end of its allocation",
        );
        let host_stream = HostDevice::new().create_stream().unwrap();
        invalid(
            "a host stream",
            dev.pack(host_stream.as_ref(), ext.ptr(), len, &[piece(s, 0, 10)]),
            "own streams",
        );
        invalid(
            "a host stream for unpack",
            dev.unpack(host_stream.as_ref(), ext.ptr(), len, &[piece(s, 0, 10)]),
            "own streams",
        );
    }
    stream.synchronize().unwrap();
    let got = download(dev.as_ref(), ext.ptr(), len);
    assert!(
        got.iter().all(|&b| b == POISON),
        "a refused call must not touch the extent"
    );
    // Still usable afterwards.
    check_layout(dev.as_ref(), &Spec::new("after errors", 100, 1, 5000, 50));
}

// ---------------------------------------------------------------------------------------
// Benchmark

/// Bytes per second, as GB/s (10^9).
fn gbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

/// The best of `trials` timings of `iters` back-to-back runs of `op` on `stream` (after
/// `warmup` untimed ones), in seconds per run.
fn time_runs(stream: &dyn Stream, warmup: usize, iters: usize, trials: usize, mut op: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        op();
    }
    stream.synchronize().unwrap();
    let mut best = f64::INFINITY;
    for _ in 0..trials {
        let t = Instant::now();
        for _ in 0..iters {
            op();
        }
        stream.synchronize().unwrap();
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
    }
    best
}

/// A benchmark layout: `n` pieces of uniformly random 1 KiB–1 MiB lengths, their memory
/// 256-byte aligned at shuffled places of one arena; extent offsets multiples of 256.
fn bench_layout(rng: &mut Rng, n: usize) -> Layout {
    let lens: Vec<u64> = (0..n).map(|_| rng.range(1 << 10, 1 << 20)).collect();
    let (mems, arena_len) = place(rng, &lens, true);
    let pieces: Vec<PackPiece> = (0..n)
        .map(|i| PackPiece {
            mem: mems[i],
            offset: 0,
            len: lens[i],
        })
        .collect();
    with_offsets(rng, pieces, arena_len, false)
}

/// The same pieces laid out again in the extent: at multiples of 256, or (`odd`) 1 to 15
/// bytes past them, so that no source is congruent to its destination mod 16.
fn with_offsets(rng: &mut Rng, mut pieces: Vec<PackPiece>, arena_len: u64, odd: bool) -> Layout {
    let mut at = 0;
    for p in &mut pieces {
        at = round_up(at, 256);
        if odd {
            at += rng.range(1, 15);
        }
        p.offset = at;
        at += p.len;
    }
    Layout {
        pieces,
        extent_len: round_up(at, 4096),
        arena_len,
    }
}

/// Checks that each piece of `layout` (rebased to `base`) holds the pattern for `seed` at
/// its arena offset.
fn check_pattern(dev: &CudaDevice, layout: &Layout, base: u64, seed: u64, what: &str) {
    for (i, p) in layout.pieces.iter().enumerate() {
        let bad = dev
            .count_pattern_mismatches(base + p.mem, p.len as usize, seed, p.mem)
            .unwrap();
        assert_eq!(bad, 0, "{what}: piece {i} ({p:?}) has {bad} wrong bytes");
    }
}

#[test]
#[ignore = "benchmark; needs an NVIDIA GPU; run by scripts/gpu-test.sh"]
fn pack_bandwidth() {
    let dev = gpu();
    let origin = dev.pack_kernel_origin().expect("load the pack kernels");
    let n = 10_000usize;
    let mut rng = Rng(2024);
    let layout = bench_layout(&mut rng, n);
    let bytes: u64 = layout.pieces.iter().map(|p| p.len).sum();
    let seed = 7u64;

    let src = alloc(dev.as_ref(), layout.arena_len);
    let dst = alloc(dev.as_ref(), layout.arena_len);
    let ext = alloc(dev.as_ref(), layout.extent_len.max(bytes));
    dev.fill_pattern(src.ptr(), layout.arena_len as usize, seed, 0)
        .unwrap();
    // Another pattern in the destinations, so only the unpacks can make them right.
    dev.fill_pattern(dst.ptr(), layout.arena_len as usize, !seed, 0)
        .unwrap();
    let pieces = rebase(&layout.pieces, 0, src.ptr());
    let scatter = rebase(&layout.pieces, 0, dst.ptr());
    let stream = dev.create_stream().unwrap();
    let s = stream.as_ref();
    let (warmup, iters, trials) = (3, 20, 3);

    // SAFETY (all the closures below): every buffer lives until the end of this function and
    // each timing ends with a synchronize; the pieces lie inside `src` / `dst` and the
    // extent in `ext`.
    let memcpy = time_runs(s, warmup, iters, trials, || unsafe {
        s.copy_d2d(ext.ptr(), src.ptr(), bytes as usize).unwrap()
    });
    let run = |tile: u64| {
        dev.set_pack_tile_size(tile).unwrap();
        // SAFETY: as above.
        let pack = time_runs(s, warmup, iters, trials, || unsafe {
            dev.pack(s, ext.ptr(), layout.extent_len, &pieces).unwrap()
        });
        // SAFETY: as above.
        let unpack = time_runs(s, warmup, iters, trials, || unsafe {
            dev.unpack(s, ext.ptr(), layout.extent_len, &scatter).unwrap()
        });
        (pack, unpack)
    };
    let default_tile = dev.pack_tile_size();
    let mut rows = Vec::new();
    for tile in [1u64 << 12, 1 << 13, 1 << 15, 1 << 16, default_tile] {
        let (pack, unpack) = run(tile);
        rows.push((tile, pack, unpack));
    }
    let (_, pack, unpack) = *rows.last().unwrap();
    check_pattern(&dev, &layout, dst.ptr(), seed, "after the timed unpacks");

    // The same pieces at odd extent offsets (no 16-byte path for the sources).
    let odd = with_offsets(&mut rng, layout.pieces.clone(), layout.arena_len, true);
    let odd_pieces = rebase(&odd.pieces, 0, src.ptr());
    let odd_scatter = rebase(&odd.pieces, 0, dst.ptr());
    let odd_ext = alloc(dev.as_ref(), odd.extent_len);
    dev.fill_pattern(dst.ptr(), layout.arena_len as usize, !seed, 0)
        .unwrap();
    // SAFETY: as above, with `odd_ext` as the extent.
    let odd_pack = time_runs(s, warmup, iters, trials, || unsafe {
        dev.pack(s, odd_ext.ptr(), odd.extent_len, &odd_pieces).unwrap()
    });
    // SAFETY: as above.
    let odd_unpack = time_runs(s, warmup, iters, trials, || unsafe {
        dev.unpack(s, odd_ext.ptr(), odd.extent_len, &odd_scatter)
            .unwrap()
    });
    check_pattern(&dev, &odd, dst.ptr(), seed, "after the odd unpacks");

    let memcpy_gbps = gbps(bytes, memcpy);
    println!(
        "\npack bandwidth on {}: {n} pieces of 1 KiB to 1 MiB, {bytes} bytes ({:.2} GiB) into a \
         {}-byte extent; kernels: {origin}",
        dev.gpu_info().name,
        bytes as f64 / (1u64 << 30) as f64,
        layout.extent_len
    );
    println!(
        "{:<44} {:>10} {:>10} {:>9}",
        "operation", "ms", "GB/s", "x memcpy"
    );
    let row = |name: &str, secs: f64| {
        let g = gbps(bytes, secs);
        println!(
            "{name:<44} {:>10.3} {g:>10.1} {:>9.3}",
            secs * 1e3,
            g / memcpy_gbps
        );
    };
    row("cuMemcpyDtoDAsync (one copy)", memcpy);
    for (tile, p, u) in &rows {
        row(&format!("pack, tile {} KiB", tile >> 10), *p);
        row(&format!("unpack, tile {} KiB", tile >> 10), *u);
    }
    row("pack, odd extent offsets", odd_pack);
    row("unpack, odd extent offsets", odd_unpack);

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let result = serde_json::json!({
        "command": command,
        "gpu": dev.gpu_info().name,
        "pieces": n,
        "bytes": bytes,
        "extent_bytes": layout.extent_len,
        "tile_bytes": default_tile,
        "kernels": origin,
        "iterations": iters,
        "memcpy_gbps": memcpy_gbps,
        "pack_gbps": gbps(bytes, pack),
        "unpack_gbps": gbps(bytes, unpack),
        "pack_vs_memcpy": gbps(bytes, pack) / memcpy_gbps,
        "unpack_vs_memcpy": gbps(bytes, unpack) / memcpy_gbps,
        "odd_offsets_pack_gbps": gbps(bytes, odd_pack),
        "odd_offsets_unpack_gbps": gbps(bytes, odd_unpack),
        "tile_sweep": rows.iter().map(|(t, p, u)| serde_json::json!({
            "tile_bytes": t, "pack_gbps": gbps(bytes, *p), "unpack_gbps": gbps(bytes, *u)
        })).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    if let Some(dir) = std::env::var_os("RESULTS_DIR") {
        let path = std::path::Path::new(&dir).join("pack-kernel-h200.json");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(&result).unwrap() + "\n")
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}
