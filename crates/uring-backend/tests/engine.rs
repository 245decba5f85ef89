//! The offload engine on the io_uring backend and real files with O_DIRECT: many tensors of
//! odd sizes and layouts out and back, packed and unpacked, with a full filesystem.

mod common;

use std::path::Path;
use std::sync::Arc;

use spillway_runtime::engine::{Engine, EngineConfig, Region, StorageTarget, TensorKey};
use spillway_runtime::{pattern, Device, DeviceBuffer, DirectIo, Member, Result, StripedBackend, Target};
use spillway_uring::{UringBackend, UringConfig};

fn engine(dev: &Arc<dyn Device>, path: std::path::PathBuf, cfg: EngineConfig, capacity: u64) -> Engine {
    let backend = Arc::new(UringBackend::new(dev.clone(), UringConfig::default()).unwrap());
    Engine::new(
        dev.clone(),
        backend,
        vec![StorageTarget::new(
            Target::new(path).direct(DirectIo::Preferred),
            capacity,
        )],
        cfg,
    )
    .unwrap()
}

fn lens(n: usize, max: usize, mut seed: u64) -> Vec<usize> {
    (0..n)
        .map(|_| {
            seed = pattern::splitmix64(seed);
            1 + seed as usize % max
        })
        .collect()
}

/// Offloads `lens` tensors from one arena at odd offsets, reads them back in reverse order
/// with prefetch, and checks every byte.
fn round_trip(cfg: EngineConfig, n: usize, max: usize) -> spillway_runtime::engine::StatsSnapshot {
    // Every read checked against the checksums written, as tests run by default.
    let cfg = EngineConfig {
        checksums: true,
        ..cfg
    };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let dev = common::device();
    let e = engine(&dev, dir.path().join("spill"), cfg, 4 << 30);
    let lens = lens(n, max, 11);
    // Tensors at odd (but 16-byte aligned) offsets of one arena, as a framework allocator
    // would hand out; every tensor's expected bytes are the pattern at its arena offset.
    let offsets: Vec<u64> = lens
        .iter()
        .scan(0u64, |at, &l| {
            let o = *at;
            *at += (l as u64 + 16).div_ceil(16) * 16 + 48;
            Some(o)
        })
        .collect();
    let arena_len = (offsets.last().unwrap() + *lens.last().unwrap() as u64) as usize;
    let src: DeviceBuffer = dev.alloc(arena_len).unwrap();
    dev.fill_pattern(src.ptr(), arena_len, 5, 0).unwrap();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let r = Region::new(src.ptr() + offsets[i], lens[i] as u64);
            // SAFETY: the arena outlives the engine's use of it (drain below).
            unsafe { e.offload(TensorKey::new(i as u64, 0), &[r], None).unwrap() }
        })
        .collect();
    e.drain().unwrap();
    dev.fill_pattern(src.ptr(), arena_len, 6, 0).unwrap(); // storage is the only copy now
    let dst = dev.alloc(arena_len).unwrap();
    for &h in handles.iter().rev() {
        e.prefetch(h).unwrap();
    }
    let mut last = None;
    for i in (0..n).rev() {
        let r = Region::new(dst.ptr() + offsets[i], lens[i] as u64);
        // SAFETY: `dst` outlives the events (synchronized below).
        last = Some(unsafe { e.fetch(handles[i], &[r]).unwrap() });
    }
    last.unwrap().synchronize().unwrap();
    e.drain().unwrap();
    for i in 0..n {
        let bad = dev
            .count_pattern_mismatches(dst.ptr() + offsets[i], lens[i], 5, offsets[i])
            .unwrap();
        assert_eq!(bad, 0, "tensor {i} ({} bytes)", lens[i]);
    }
    for h in handles {
        e.release(h).unwrap();
    }
    e.drain().unwrap();
    assert_eq!(e.storage_usage().used, 0);
    let s = e.stats();
    let c = &s.counters;
    assert_eq!(c.checksum_errors, 0, "{c:?}");
    assert!(
        c.verified_bytes >= c.fetch_bytes - c.forwarded_bytes,
        "every read was checked: {c:?}"
    );
    s
}

#[test]
fn packed_tensors_round_trip_through_files() {
    let cfg = EngineConfig {
        staging_bytes: 32 << 20,
        prefetch_bytes: 16 << 20,
        pack_extent_bytes: 4 << 20,
        ..Default::default()
    };
    let s = round_trip(cfg, 800, 200 << 10).counters;
    assert_eq!(s.packed_tensors, 800);
    assert!(s.extents_written < 60, "{s:?}");
    assert!(s.prefetch_hits > 500, "{s:?}");
    assert_eq!(s.fetches, 800);
}

#[test]
fn unpacked_and_large_tensors_round_trip_through_files() {
    let cfg = EngineConfig {
        staging_bytes: 32 << 20,
        prefetch_bytes: 16 << 20,
        pack_extent_bytes: 4 << 20,
        pack_threshold: 64 << 10,
        pack: false,
        ..Default::default()
    };
    let s = round_trip(cfg, 120, 2 << 20).counters;
    assert_eq!(s.extents_written, 120);
    assert!(s.direct_tensors > 80, "{s:?}");
}

#[test]
fn a_full_filesystem_keeps_tensors_resident() {
    if !nix_is_root() {
        eprintln!("a_full_filesystem_keeps_tensors_resident needs root to mount a small tmpfs; not run");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(status.success());
    let dev = common::device();
    {
        // The engine believes it has 64 MiB; the filesystem has 1 MiB.
        let cfg = EngineConfig {
            pack_threshold: 64 << 10,
            ..Default::default()
        };
        let e = engine(&dev, mnt.path().join("spill"), cfg, 64 << 20);
        let t = dev.alloc(4 << 20).unwrap();
        dev.fill_pattern(t.ptr(), 4 << 20, 3, 0).unwrap();
        // SAFETY: `t` outlives the engine's use.
        let h = unsafe {
            e.offload(TensorKey::new(1, 0), &[Region::new(t.ptr(), 4 << 20)], None)
                .unwrap()
        };
        e.drain().unwrap();
        let s = e.stats().counters;
        assert_eq!(s.write_errors, 1, "{s:?}");
        assert!(
            !e.source_released(h).unwrap(),
            "the tensor stays in its own memory"
        );
        let out = dev.alloc(4 << 20).unwrap();
        // SAFETY: `out` outlives the event.
        unsafe { e.fetch(h, &[Region::new(out.ptr(), 4 << 20)]).unwrap() }
            .synchronize()
            .unwrap();
        assert_eq!(dev.count_pattern_mismatches(out.ptr(), 4 << 20, 3, 0).unwrap(), 0);
        e.release(h).unwrap();
    }
    let _ = std::process::Command::new("umount").arg(mnt.path()).status();
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Engine settings of the size a small training step would use.
fn small_cfg() -> EngineConfig {
    EngineConfig {
        staging_bytes: 8 << 20,
        prefetch_bytes: 4 << 20,
        pack_extent_bytes: 1 << 20,
        pack_threshold: 256 << 10,
        ..Default::default()
    }
}

/// `Engine::new` on the uring backend, returning its error.
fn try_engine(
    dev: &Arc<dyn Device>,
    backend: Arc<dyn spillway_runtime::Backend>,
    path: &Path,
) -> Result<Engine> {
    Engine::new(
        dev.clone(),
        backend,
        vec![StorageTarget::new(
            Target::new(path).direct(DirectIo::Preferred),
            16 << 20,
        )],
        small_cfg(),
    )
}

fn uring(dev: &Arc<dyn Device>) -> Arc<UringBackend> {
    Arc::new(UringBackend::new(dev.clone(), UringConfig::default()).unwrap())
}

#[test]
fn a_second_engine_on_the_same_file_is_refused_instead_of_sharing_its_offsets() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("same.bin");
    let dev = common::device();
    let e1 = try_engine(&dev, uring(&dev), &path).unwrap();
    // Both would allocate from offset 0: the first engine's tensor would read the second's bytes.
    let err = match try_engine(&dev, uring(&dev), &path) {
        Ok(_) => panic!(
            "a second engine opened {} while the first holds it",
            path.display()
        ),
        Err(e) => e.to_string(),
    };
    let pid = std::process::id();
    assert!(
        err.contains(&format!(
            "{} is in use by another spillway engine (process {pid}, this process)",
            path.display()
        )) && err.contains("give each engine its own file"),
        "{err}"
    );

    // The first engine's data is its own.
    let len = 2 << 20;
    let ones = dev.alloc(len).unwrap();
    dev.fill_pattern(ones.ptr(), len, 1, 0).unwrap();
    // SAFETY: `ones` outlives the engine's use of it (drain below).
    let h = unsafe {
        e1.offload(TensorKey::new(7, 0), &[Region::new(ones.ptr(), len as u64)], None)
            .unwrap()
    };
    e1.drain().unwrap();
    let out = dev.alloc(len).unwrap();
    // SAFETY: `out` outlives the event.
    unsafe { e1.fetch(h, &[Region::new(out.ptr(), len as u64)]).unwrap() }
        .synchronize()
        .unwrap();
    assert_eq!(dev.count_pattern_mismatches(out.ptr(), len, 1, 0).unwrap(), 0);
    e1.release(h).unwrap();

    // Closed, the file is free for the next engine.
    drop(e1);
    drop(try_engine(&dev, uring(&dev), &path).unwrap());
}

#[test]
fn one_file_twice_in_a_striped_set_is_refused_naming_both_paths() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let f = dir.path().join("x.bin");
    let linked = dir.path().join("linked");
    std::os::unix::fs::symlink(dir.path(), &linked).unwrap();
    let dev = common::device();
    for exists in [false, true] {
        if exists {
            drop(try_engine(&dev, uring(&dev), &f).unwrap());
        }
        for second in [
            f.clone(),
            dir.path().join(".").join("x.bin"),
            linked.join("x.bin"),
        ] {
            let members = [&f, &second]
                .iter()
                .map(|p| Member {
                    target: Target::new(p.as_path()),
                    backend: uring(&dev),
                })
                .collect();
            let refs = [f.as_path(), second.as_path()];
            let name = StripedBackend::set_name(&refs);
            let set = Arc::new(StripedBackend::new(name.clone(), members, 1 << 20).unwrap());
            let err = match try_engine(&dev, set, &name) {
                Ok(_) => panic!("a set of {f:?} and {second:?} opened"),
                Err(e) => e.to_string(),
            };
            let said = if second.as_os_str() == f.as_os_str() {
                format!("{} is listed twice, the same file both times", f.display())
            } else {
                format!("{} and {} are the same file", second.display(), f.display())
            };
            assert!(
                err.contains(&said) && err.contains("list each file once"),
                "{err}"
            );
        }
    }
}
