//! Round trips through the io_uring backend on real files with O_DIRECT: odd sizes at
//! aligned and unaligned offsets, through aligned host memory (direct), misaligned host
//! memory (staged with memcpy) and host-device memory (staged with stream copies).

mod common;

use common::{backend, open_direct, run, small_config, MemKind, Memory, ALL_KINDS};
use spillway_runtime::{Backend, DirectIo, IoOp, Target, TargetId};
use spillway_uring::{UringBackend, UringConfig};

const SURROUNDING_SEED: u64 = 0xBAD_CAFE;

/// Writes `size` bytes at `offset` from memory of `kind`, reads them back into fresh memory
/// of the same kind, and checks that the bytes around the request were left alone.
fn round_trip(backend: &UringBackend, target: TargetId, offset: u64, size: usize, kind: MemKind, seed: u64) {
    let what = format!("{kind:?} memory, {size} bytes at offset {offset}");

    // The blocks around the request hold other data, which read-modify-write must keep.
    let around_start = (offset / 4096).saturating_sub(1) * 4096;
    let around_end = (offset + size as u64).div_ceil(4096) * 4096 + 4096;
    let around_len = (around_end - around_start) as usize;
    let around = Memory::with_pattern(MemKind::HostAligned, around_len, SURROUNDING_SEED, around_start);
    run(backend, target, IoOp::Write, around_start, &around).expect("writing the surrounding blocks");

    let data = Memory::with_pattern(kind, size, seed, offset);
    let written =
        run(backend, target, IoOp::Write, offset, &data).unwrap_or_else(|e| panic!("write, {what}: {e}"));
    assert_eq!(written, size);

    let back = Memory::new(kind, size);
    let read =
        run(backend, target, IoOp::Read, offset, &back).unwrap_or_else(|e| panic!("read, {what}: {e}"));
    assert_eq!(read, size);
    back.assert_pattern(seed, offset, &format!("read back, {what}"));

    let whole = Memory::new(MemKind::HostAligned, around_len);
    run(backend, target, IoOp::Read, around_start, &whole).expect("reading the surrounding blocks");
    let bytes = whole.bytes();
    let (start, end) = (
        (offset - around_start) as usize,
        (offset - around_start) as usize + size,
    );
    let before = Memory::with_pattern(MemKind::HostAligned, start, SURROUNDING_SEED, around_start);
    assert!(
        bytes[..start] == *before.bytes(),
        "bytes before the request changed, {what}"
    );
    let after = Memory::with_pattern(
        MemKind::HostAligned,
        around_len - end,
        SURROUNDING_SEED,
        offset + size as u64,
    );
    assert!(
        bytes[end..] == *after.bytes(),
        "bytes after the request changed, {what}"
    );
    assert_eq!(
        common::first_difference(&bytes[start..end], seed, offset),
        None,
        "the file does not hold the data, {what}"
    );
}

const SIZES: [usize; 5] = [1, 511, 4096, 4097, (1 << 20) + 3];
const OFFSETS: [u64; 5] = [0, 1, 4095, 12345, 1 << 20];

fn all_small_round_trips(config: UringConfig) {
    let backend = backend(config);
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "round-trip.dat");
    let mut seed = 1;
    for kind in ALL_KINDS {
        for size in SIZES {
            for offset in OFFSETS {
                seed += 1;
                round_trip(&backend, target, offset, size, kind, seed);
            }
        }
    }
    backend.close(target).unwrap();
}

#[test]
fn odd_sizes_and_offsets_with_default_config() {
    all_small_round_trips(UringConfig::default());
}

#[test]
fn odd_sizes_and_offsets_with_small_chunks_and_few_buffers() {
    // 64 KiB chunks and two staging buffers: 1 MiB requests become 17 pieces that queue
    // for buffers and ring slots.
    all_small_round_trips(small_config());
}

#[test]
fn two_rings_round_trip() {
    let backend = backend(UringConfig {
        threads: 2,
        ..small_config()
    });
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "two-rings.dat");
    for (i, kind) in ALL_KINDS.into_iter().enumerate() {
        round_trip(&backend, target, 12345, (1 << 20) + 3, kind, 100 + i as u64);
    }
}

#[test]
fn large_transfers_256_mib() {
    let backend = backend(UringConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "large.dat");
    let size = 256 << 20;
    // Aligned host memory at an aligned offset: direct I/O in 1 MiB chunks.
    let data = Memory::with_pattern(MemKind::HostAligned, size, 7, 0);
    assert_eq!(run(&backend, target, IoOp::Write, 0, &data).unwrap(), size);
    drop(data);
    // Device memory at an unaligned offset: staged, with read-modify-write at both ends;
    // it overwrites the first write except its first 4095 bytes.
    let data = Memory::with_pattern(MemKind::Device, size, 8, 4095);
    assert_eq!(run(&backend, target, IoOp::Write, 4095, &data).unwrap(), size);
    drop(data);
    let back = Memory::new(MemKind::Device, size);
    assert_eq!(run(&backend, target, IoOp::Read, 4095, &back).unwrap(), size);
    back.assert_pattern(8, 4095, "256 MiB of device memory at offset 4095");
    drop(back);
    let head = Memory::new(MemKind::HostAligned, 4095);
    run(&backend, target, IoOp::Read, 0, &head).unwrap();
    head.assert_pattern(7, 0, "the first write's head, kept by read-modify-write");
}

#[test]
fn buffered_fallback_round_trips() {
    let backend = backend(small_config());
    let dir = tempfile::tempdir().unwrap();
    let (target, info) = backend
        .open(&Target::new(dir.path().join("buffered.dat")).direct(DirectIo::Off))
        .unwrap();
    assert!(!info.direct_io);
    for (i, kind) in ALL_KINDS.into_iter().enumerate() {
        for (size, offset) in [(1, 1), (4097, 4095), ((1 << 20) + 3, 12345)] {
            round_trip(&backend, target, offset, size, kind, 200 + i as u64);
        }
    }
}

#[test]
fn info_describes_the_staging() {
    let backend = backend(UringConfig::default());
    let info = backend.info();
    assert_eq!(info.name, "uring");
    assert!(info.host_staging);
    assert!(info.transfer_mode.is_none());
    let detail = |key: &str| {
        info.details
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {key} in {:?}", info.details))
    };
    assert_eq!(detail("queue_depth"), "16");
    assert_eq!(detail("rings"), "1");
    assert_eq!(detail("chunk_size"), "1048576");
    assert_eq!(detail("staging_buffers_per_ring"), "16");
    assert_eq!(detail("staging_buffers_io_uring"), "registered");
}
