//! A byte flipped in an offload file behind the engine's back: with checksums on, the
//! fetch of the tensor it lands in fails with `Error::Corrupt` (for a prefetched packed
//! extent and for a tensor read on demand), the other tensors of the same extent still come
//! back exact, and nothing wrong is handed out; with checksums off, the same flip comes
//! back as wrong bytes, unnoticed — which is what the checksums are for.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use spillway_runtime::engine::{Engine, EngineConfig, Handle, Region, StorageTarget, TensorKey};
use spillway_runtime::{Device, DeviceBuffer, DirectIo, Error, Target};
use spillway_uring::{UringBackend, UringConfig};

/// Small packed tensors A and C share an extent; B (2 MiB) is written on its own.
const SIZES: [u64; 3] = [256 << 10, 2 << 20, 128 << 10];
/// Where in A and in B a byte is flipped.
const FLIP_A: u64 = 100_000;
const FLIP_B: u64 = 1_500_000;

struct Offloaded {
    engine: Engine,
    dev: Arc<dyn Device>,
    handles: Vec<Handle>,
    _sources: Vec<DeviceBuffer>,
}

/// Offloads A, B and C (each the pattern of its own seed) into `file` and drains.
fn offload_three(file: &Path, checksums: bool) -> Offloaded {
    let dev = common::device();
    let backend = Arc::new(UringBackend::new(dev.clone(), UringConfig::default()).unwrap());
    let cfg = EngineConfig {
        staging_bytes: 16 << 20,
        prefetch_bytes: 8 << 20,
        pack_extent_bytes: 4 << 20,
        // A and C go in one extent, however long B takes to offload (drain seals it).
        pack_flush_delay: std::time::Duration::from_secs(10),
        checksums,
        ..Default::default()
    };
    let target = StorageTarget::new(Target::new(file).direct(DirectIo::Preferred), 64 << 20);
    let engine = Engine::new(dev.clone(), backend, vec![target], cfg).unwrap();
    let mut sources = Vec::new();
    let mut handles = Vec::new();
    for (i, &len) in SIZES.iter().enumerate() {
        let src = dev.alloc(len as usize).unwrap();
        dev.fill_pattern(src.ptr(), len as usize, seed(i), 0).unwrap();
        // SAFETY: the source outlives the engine's use of it (kept in `Offloaded`).
        let h = unsafe { engine.offload(TensorKey::new(i as u64, 0), &[Region::new(src.ptr(), len)], None) }
            .unwrap();
        handles.push(h);
        sources.push(src);
    }
    engine.drain().unwrap();
    for (i, &h) in handles.iter().enumerate() {
        assert!(
            engine.source_released(h).unwrap(),
            "tensor {i} is on storage only"
        );
    }
    Offloaded {
        engine,
        dev,
        handles,
        _sources: sources,
    }
}

fn seed(i: usize) -> u64 {
    0xC0FFEE + i as u64
}

/// Where tensor `i` starts in the file (found by its contents).
fn find(file: &Path, dev: &Arc<dyn Device>, i: usize) -> u64 {
    let head = {
        let b = dev.alloc(64).unwrap();
        dev.fill_pattern(b.ptr(), 64, seed(i), 0).unwrap();
        let mut v = vec![0u8; 64];
        // SAFETY: `v` holds 64 bytes; `b` is a live 64-byte buffer.
        unsafe { dev.copy_to_host_sync(v.as_mut_ptr(), b.ptr(), 64) }.unwrap();
        v
    };
    let contents = std::fs::read(file).unwrap();
    contents
        .windows(64)
        .position(|w| w == head.as_slice())
        .unwrap_or_else(|| panic!("tensor {i} is not in {}", file.display())) as u64
}

/// Flips one byte of tensor `i`, `at` bytes into it, in the file.
fn flip(file: &Path, dev: &Arc<dyn Device>, i: usize, at: u64) {
    let start = find(file, dev, i);
    let f = OpenOptions::new().read(true).write(true).open(file).unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, start + at).unwrap();
    byte[0] ^= 0x10;
    f.write_all_at(&byte, start + at).unwrap();
    f.sync_all().unwrap();
}

/// Fetches tensor `i` into fresh memory: the bytes that differ from what was offloaded, or
/// the error.
fn fetch(o: &Offloaded, i: usize, prefetch: bool) -> Result<u64, Error> {
    let len = SIZES[i] as usize;
    let dst = o.dev.alloc(len).unwrap();
    if prefetch {
        o.engine.prefetch(o.handles[i]).unwrap();
    }
    // SAFETY: `dst` outlives the event, waited for below.
    let ev = unsafe {
        o.engine
            .fetch(o.handles[i], &[Region::new(dst.ptr(), len as u64)])
    }?;
    ev.synchronize().unwrap();
    Ok(o.dev
        .count_pattern_mismatches(dst.ptr(), len, seed(i), 0)
        .unwrap())
}

#[test]
fn a_flipped_byte_is_detected_and_never_handed_out() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("spill.bin");
    let o = offload_three(&file, true);
    flip(&file, &o.dev, 0, FLIP_A);
    flip(&file, &o.dev, 1, FLIP_B);

    // A, prefetched: its extent fails its check in staging, and the fetch's own read fails.
    let err = fetch(&o, 0, true).expect_err("a corrupt tensor is an error");
    let msg = err.to_string();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(
        msg.contains("checksum mismatch") && msg.contains("spill.bin"),
        "{msg}"
    );
    // The flipped byte lies in the fourth 32 KiB block of A.
    assert!(
        msg.contains("bytes 98304..131072 of a 262144-byte tensor (storage 0"),
        "{msg}"
    );
    let c = o.engine.stats().counters;
    assert_eq!((c.checksum_errors, c.read_errors), (2, 2), "{c:?}");

    // B, read on demand into the caller's memory: the error, not the bytes.
    let err = fetch(&o, 1, false).expect_err("a corrupt tensor is an error");
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string().contains("of a 2097152-byte tensor (storage 1"),
        "{err}"
    );

    // C shares A's extent but not its flipped byte: exact, prefetched or not.
    assert_eq!(fetch(&o, 2, true).unwrap(), 0);
    assert_eq!(fetch(&o, 2, false).unwrap(), 0);
    let c = o.engine.stats().counters;
    assert_eq!(c.checksum_errors, 4, "{c:?}");
    assert!(c.verified_bytes >= 2 * SIZES[2], "{c:?}");
    for h in o.handles.iter().copied() {
        o.engine.release(h).unwrap();
    }
    o.engine.drain().unwrap();
    assert_eq!(o.engine.storage_usage().used, 0);
}

#[test]
fn without_checksums_the_same_flip_comes_back_unnoticed() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("spill.bin");
    let o = offload_three(&file, false);
    flip(&file, &o.dev, 0, FLIP_A);
    flip(&file, &o.dev, 1, FLIP_B);
    assert_eq!(fetch(&o, 0, true).unwrap(), 1, "one wrong byte, handed out");
    assert_eq!(fetch(&o, 1, false).unwrap(), 1, "one wrong byte, handed out");
    let c = o.engine.stats().counters;
    assert_eq!((c.checksum_errors, c.verified_bytes), (0, 0), "{c:?}");
}

#[test]
fn intact_files_pass_every_check() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let o = offload_three(&dir.path().join("spill.bin"), true);
    for i in 0..SIZES.len() {
        assert_eq!(fetch(&o, i, i % 2 == 0).unwrap(), 0, "tensor {i}");
    }
    let c = o.engine.stats().counters;
    assert_eq!(c.checksum_errors, 0, "{c:?}");
    // A and C share an extent, checked whole at each of their two prefetches; B is read
    // on demand.
    assert_eq!(c.verified_bytes, 2 * SIZES[0] + SIZES[1] + 2 * SIZES[2], "{c:?}");
}

#[test]
fn a_file_truncated_and_grown_again_underneath_is_an_error_not_zeros() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("spill.bin");
    // Checksums off: before, the fetch handed out zeros unnoticed.
    let o = offload_three(&file, false);
    let len = std::fs::metadata(&file).unwrap().len();
    let f = OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(0).unwrap();
    f.set_len(len).unwrap();
    for (i, prefetch) in [(0, true), (1, false)] {
        let err = fetch(&o, i, prefetch).unwrap_err().to_string();
        assert!(
            err.contains("the file changed underneath spillway")
                && err.contains("spill.bin")
                && err.contains("hole"),
            "tensor {i}: {err}"
        );
    }
}

#[test]
fn a_cut_inside_a_read_grown_again_is_an_error_not_zeros() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("spill.bin");
    let o = offload_three(&file, false);
    let len = std::fs::metadata(&file).unwrap().len();
    // Cut in the middle of B (read on demand): its first half still holds data, its second
    // half is a hole once the file grows back.
    let cut = (find(&file, &o.dev, 1) + SIZES[1] / 2).next_multiple_of(4096);
    assert!(cut < find(&file, &o.dev, 1) + SIZES[1], "the cut lies inside B");
    let f = OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(cut).unwrap();
    f.set_len(len).unwrap();
    let err = fetch(&o, 1, false).unwrap_err().to_string();
    assert!(
        err.contains("the file changed underneath spillway") && err.contains("hole"),
        "{err}"
    );
}

#[test]
fn a_file_truncated_underneath_is_an_error_naming_it() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("spill.bin");
    let o = offload_three(&file, false);
    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let err = fetch(&o, 1, false).unwrap_err().to_string();
    assert!(
        err.contains("the file changed underneath spillway") && err.contains("it was truncated"),
        "{err}"
    );
}
