//! The offload engine on the host device and the memory backend: round trips, packing,
//! dedup, forwarding and cancellation, prefetch, out-of-space and I/O faults, bad input,
//! and the staging bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use spillway_runtime::engine::{Engine, EngineConfig, Handle, Region, StorageTarget, TensorKey};
use spillway_runtime::{pattern, Device, DeviceBuffer, Event, HostDevice, HostEvent, MemBackend, Target};

struct Rig {
    dev: Arc<dyn Device>,
    backend: Arc<MemBackend>,
    engine: Engine,
}

fn rig(cfg: EngineConfig, capacity: u64) -> Rig {
    let dev: Arc<dyn Device> = Arc::new(HostDevice::new());
    let backend = Arc::new(MemBackend::new(dev.clone()).unwrap());
    let engine = Engine::new(
        dev.clone(),
        backend.clone(),
        vec![StorageTarget::new(Target::new("mem0"), capacity)],
        cfg,
    )
    .unwrap();
    Rig { dev, backend, engine }
}

fn small_cfg() -> EngineConfig {
    EngineConfig {
        checksums: true,
        staging_bytes: 8 << 20,
        prefetch_bytes: 4 << 20,
        pack_threshold: 256 << 10,
        pack_extent_bytes: 1 << 20,
        direct_write_bytes: 4 << 20,
        ..Default::default()
    }
}

/// A tensor filled with the pattern for `seed`.
fn tensor(dev: &Arc<dyn Device>, len: usize, seed: u64) -> DeviceBuffer {
    let b = dev.alloc(len).unwrap();
    dev.fill_pattern(b.ptr(), len, seed, 0).unwrap();
    b
}

fn region(b: &DeviceBuffer) -> Vec<Region> {
    vec![Region::new(b.ptr(), b.len() as u64)]
}

/// Fetches `h` into a fresh buffer and counts mismatches against the pattern for `seed`.
fn fetch_check(r: &Rig, h: Handle, len: usize, seed: u64) -> u64 {
    let out = r.dev.alloc(len).unwrap();
    r.dev.fill_pattern(out.ptr(), len, !seed, 0).unwrap(); // poison
                                                           // SAFETY: `out` lives until after the event is waited on.
    let ev = unsafe { r.engine.fetch(h, &region(&out)).unwrap() };
    ev.synchronize().unwrap();
    r.dev.count_pattern_mismatches(out.ptr(), len, seed, 0).unwrap()
}

/// Offloads `srcs[i]` under key `i`, in order.
fn offload_all(r: &Rig, srcs: &[DeviceBuffer]) -> Vec<Handle> {
    srcs.iter()
        .enumerate()
        // SAFETY: every test keeps its sources alive until the engine is dropped.
        .map(|(i, s)| unsafe {
            r.engine
                .offload(TensorKey::new(i as u64, 0), &region(s), None)
                .unwrap()
        })
        .collect()
}

/// Offloads `t` under `key` with a callback that counts how often its memory is handed back.
fn offload_counted(r: &Rig, t: &DeviceBuffer, key: TensorKey) -> (Handle, Arc<AtomicUsize>) {
    let released = Arc::new(AtomicUsize::new(0));
    let rel = released.clone();
    // SAFETY: every test keeps its tensors alive until the engine is dropped.
    let h = unsafe {
        r.engine
            .offload_with_callback(key, &region(t), None, move || {
                rel.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap()
    };
    (h, released)
}

fn sizes(n: usize, lo: usize, hi: usize, mut seed: u64) -> Vec<usize> {
    (0..n)
        .map(|_| {
            seed = pattern::splitmix64(seed);
            lo + (seed as usize) % (hi - lo + 1)
        })
        .collect()
}

#[test]
fn packed_round_trip_through_storage_and_prefetch() {
    let r = rig(small_cfg(), 1 << 30);
    let lens = sizes(300, 1, 200 << 10, 1);
    let srcs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| tensor(&r.dev, l, i as u64))
        .collect();
    let handles = offload_all(&r, &srcs);
    r.engine.drain().unwrap();
    for &h in &handles {
        assert!(r.engine.source_released(h).unwrap());
    }
    // Poison the sources: fetched bytes must come from storage now.
    for s in &srcs {
        r.dev.fill_pattern(s.ptr(), s.len(), 0xdead, 0).unwrap();
    }
    for &h in handles.iter().rev() {
        r.engine.prefetch(h).unwrap();
    }
    for (i, &h) in handles.iter().enumerate().rev() {
        assert_eq!(fetch_check(&r, h, lens[i], i as u64), 0, "tensor {i}");
    }
    let s = r.engine.stats().counters;
    assert_eq!(s.packed_tensors, 300);
    assert_eq!(s.direct_tensors, 0);
    assert!(
        s.extents_written < 100,
        "packing should make few extents, made {}",
        s.extents_written
    );
    assert!(
        s.bytes_written <= s.extents_written * (1 << 20),
        "a packed extent outgrew pack_extent_bytes: {s:?}"
    );
    assert_eq!(s.forwarded_fetches, 0);
    assert!(s.prefetch_hits > 0, "{s:?}");
    assert_eq!(s.fetches, 300);
    assert!(s.staging_peak <= 8 << 20);
    for h in handles {
        r.engine.release(h).unwrap();
    }
    r.engine.drain().unwrap();
    assert_eq!(r.engine.storage_usage().used, 0);
    assert_eq!(r.engine.staging_in_use(), 0);
    assert_eq!(r.engine.live_handles(), 0);
}

#[test]
fn padding_is_zeroed_and_pieces_are_aligned_on_storage() {
    let r = rig(small_cfg(), 1 << 30);
    let a = tensor(&r.dev, 5, 1);
    let b = tensor(&r.dev, 4097, 2);
    // SAFETY: the sources outlive the engine's use (drain below).
    unsafe {
        r.engine.offload(TensorKey::new(1, 0), &region(&a), None).unwrap();
        r.engine.offload(TensorKey::new(2, 0), &region(&b), None).unwrap();
    }
    r.engine.drain().unwrap();
    let (target, _) = (spillway_runtime::TargetId(1), ());
    let stored = r.backend.contents(target, 0, 3 * 4096);
    assert_eq!(pattern::count_mismatches(&stored[..5], 1, 0), 0);
    assert!(
        stored[5..4096].iter().all(|&x| x == 0),
        "padding after the first piece"
    );
    assert_eq!(pattern::count_mismatches(&stored[4096..8193], 2, 0), 0);
    assert!(
        stored[8193..].iter().all(|&x| x == 0),
        "padding after the second piece"
    );
}

#[test]
fn large_tensors_go_direct_and_multi_region_layouts_round_trip() {
    let r = rig(small_cfg(), 1 << 30);
    let big = tensor(&r.dev, 3 << 20, 9);
    // Three regions of one tensor, fetched into two regions split elsewhere.
    let parts = [
        tensor(&r.dev, 1000, 10),
        tensor(&r.dev, 5000, 11),
        tensor(&r.dev, 7, 12),
    ];
    let regions: Vec<_> = parts.iter().flat_map(region).collect();
    // SAFETY: the sources outlive the engine's use.
    let (hb, hm) = unsafe {
        (
            r.engine
                .offload(TensorKey::new(1, 0), &region(&big), None)
                .unwrap(),
            r.engine.offload(TensorKey::new(2, 0), &regions, None).unwrap(),
        )
    };
    r.engine.drain().unwrap();
    assert_eq!(fetch_check(&r, hb, 3 << 20, 9), 0);
    let out = r.dev.alloc(6007).unwrap();
    let dst = [Region::new(out.ptr(), 3000), Region::new(out.ptr() + 3000, 3007)];
    // SAFETY: `out` outlives the event.
    unsafe { r.engine.fetch(hm, &dst).unwrap() }
        .synchronize()
        .unwrap();
    let mut host = vec![0u8; 6007];
    // SAFETY: both regions are 6007 bytes and live.
    unsafe {
        r.dev
            .copy_to_host_sync(host.as_mut_ptr(), out.ptr(), 6007)
            .unwrap()
    };
    assert_eq!(pattern::count_mismatches(&host[..1000], 10, 0), 0);
    assert_eq!(pattern::count_mismatches(&host[1000..6000], 11, 0), 0);
    assert_eq!(pattern::count_mismatches(&host[6000..], 12, 0), 0);
    let s = r.engine.stats().counters;
    assert_eq!((s.direct_tensors, s.packed_tensors, s.demand_reads), (1, 1, 2));
}

#[test]
fn a_large_tensor_is_written_and_read_back_in_pieces_of_io_split_bytes() {
    // 3.5 MiB, written straight from its memory and fetched straight into place: cut at
    // the 1 MiB multiples of the target's offsets into 4 requests each way (5 if its extent
    // did not start on one), bytes exact; uncut, one request each way.
    let len = (7 << 20) / 2;
    for (split, requests) in [(1u64 << 20, 4..=5u64), (0, 1..=1)] {
        let r = rig(
            EngineConfig {
                io_split_bytes: split,
                ..small_cfg()
            },
            1 << 30,
        );
        let big = tensor(&r.dev, len, 21);
        let h = offload_all(&r, std::slice::from_ref(&big))[0];
        r.engine.drain().unwrap();
        let s = r.engine.stats().counters;
        assert!(requests.contains(&s.writes), "split {split}: {} writes", s.writes);
        assert_eq!(fetch_check(&r, h, len, 21), 0, "split {split}");
        let s = r.engine.stats().counters;
        assert_eq!(s.demand_reads, 1);
        assert!(requests.contains(&s.reads), "split {split}: {} reads", s.reads);
        assert_eq!((s.bytes_written, s.bytes_read), (len as u64, len as u64));
    }
}

#[test]
fn dedup_writes_once_and_keeps_the_copy_until_the_last_handle() {
    let r = rig(small_cfg(), 1 << 30);
    let t = tensor(&r.dev, 100 << 10, 5);
    let key = TensorKey::new(42, 3);
    // SAFETY: `t` outlives the engine's use.
    let (h1, h2) = unsafe {
        (
            r.engine.offload(key, &region(&t), None).unwrap(),
            r.engine.offload(key, &region(&t), None).unwrap(),
        )
    };
    assert_ne!(h1, h2);
    r.engine.drain().unwrap();
    let s = r.engine.stats().counters;
    assert_eq!((s.dedup_hits, s.dedup_bytes), (1, 100 << 10));
    assert_eq!(s.packed_tensors, 1, "a deduplicated offload writes nothing");
    r.engine.release(h1).unwrap();
    assert_eq!(fetch_check(&r, h2, 100 << 10, 5), 0);
    // A new version of the same storage is a different tensor.
    // SAFETY: as above.
    let h3 = unsafe {
        r.engine
            .offload(TensorKey::new(42, 4), &region(&t), None)
            .unwrap()
    };
    assert_eq!(r.engine.stats().counters.dedup_hits, 1);
    r.engine.release(h2).unwrap();
    r.engine.release(h3).unwrap();
    r.engine.drain().unwrap();
    assert_eq!(r.engine.storage_usage().used, 0);
}

#[test]
fn without_dedup_every_offload_is_written() {
    let cfg = EngineConfig {
        dedup: false,
        ..small_cfg()
    };
    let r = rig(cfg, 1 << 30);
    let t = tensor(&r.dev, 10 << 10, 5);
    for _ in 0..3 {
        // SAFETY: `t` outlives the engine's use.
        unsafe { r.engine.offload(TensorKey::new(1, 0), &region(&t), None).unwrap() };
    }
    r.engine.drain().unwrap();
    let s = r.engine.stats().counters;
    assert_eq!((s.dedup_hits, s.packed_tensors), (0, 3));
}

#[test]
fn without_packing_every_small_tensor_gets_its_own_extent() {
    let cfg = EngineConfig {
        pack: false,
        ..small_cfg()
    };
    let r = rig(cfg, 1 << 30);
    let srcs: Vec<_> = (0..20).map(|i| tensor(&r.dev, 3000 + i, i as u64)).collect();
    let hs = offload_all(&r, &srcs);
    r.engine.drain().unwrap();
    assert_eq!(r.engine.stats().counters.extents_written, 20);
    for (i, h) in hs.into_iter().enumerate() {
        assert_eq!(fetch_check(&r, h, 3000 + i, i as u64), 0);
    }
}

#[test]
fn a_fetch_before_the_write_is_forwarded_and_the_write_cancelled() {
    let cfg = EngineConfig {
        pack_flush_delay: Duration::from_secs(3600), // keep the packed extent open
        ..small_cfg()
    };
    let r = rig(cfg, 1 << 30);
    let t = tensor(&r.dev, 64 << 10, 8);
    let (h, released) = offload_counted(&r, &t, TensorKey::new(1, 0));
    assert_eq!(fetch_check(&r, h, 64 << 10, 8), 0);
    r.engine.drain().unwrap();
    let s = r.engine.stats().counters;
    assert_eq!((s.forwarded_fetches, s.forwarded_bytes), (1, 64 << 10));
    assert_eq!((s.cancelled_tensors, s.bytes_written, s.bytes_read), (1, 0, 0));
    assert_eq!(
        r.backend.written.load(Ordering::SeqCst),
        0,
        "a forwarded, cancelled tensor is never written"
    );
    // The engine still reads the tensor's memory (it may be fetched again) until release.
    assert_eq!(released.load(Ordering::SeqCst), 0);
    assert!(!r.engine.source_released(h).unwrap());
    assert_eq!(fetch_check(&r, h, 64 << 10, 8), 0);
    r.engine.release(h).unwrap();
    assert_eq!(released.load(Ordering::SeqCst), 1);
}

#[test]
fn the_source_callback_runs_once_the_write_is_done() {
    let r = rig(small_cfg(), 1 << 30);
    r.backend.faults().gate.close();
    let t = tensor(&r.dev, 2 << 20, 8); // direct
    let (h, released) = offload_counted(&r, &t, TensorKey::new(1, 0));
    // While the write is in flight, a fetch is served from the tensor's memory.
    assert_eq!(fetch_check(&r, h, 2 << 20, 8), 0);
    assert_eq!(r.engine.stats().counters.forwarded_fetches, 1);
    assert_eq!(
        released.load(Ordering::SeqCst),
        0,
        "the write has not happened yet"
    );
    r.backend.faults().gate.open();
    r.engine.drain().unwrap();
    assert_eq!(released.load(Ordering::SeqCst), 1);
    assert!(r.engine.source_released(h).unwrap());
    assert_eq!(
        r.engine.stats().counters.cancelled_tensors,
        0,
        "a started write is not cancelled"
    );
}

#[test]
fn full_storage_keeps_tensors_resident_and_counts_them() {
    let r = rig(small_cfg(), 64 << 10);
    let srcs: Vec<_> = (0..4).map(|i| tensor(&r.dev, 300 << 10, i)).collect();
    let hs = offload_all(&r, &srcs);
    r.engine.drain().unwrap();
    let s = r.engine.stats().counters;
    assert_eq!((s.resident_tensors, s.resident_bytes), (4, 4 * (300 << 10)));
    for (i, &h) in hs.iter().enumerate() {
        assert!(!r.engine.source_released(h).unwrap());
        assert_eq!(fetch_check(&r, h, 300 << 10, i as u64), 0);
    }
    for h in hs {
        r.engine.release(h).unwrap();
    }
}

#[test]
fn a_failed_write_keeps_tensors_resident_and_a_failed_read_is_reported() {
    let r = rig(small_cfg(), 1 << 30);
    r.backend.faults().writes_left.store(0, Ordering::SeqCst);
    let t = tensor(&r.dev, 2 << 20, 3);
    // SAFETY: `t` outlives the engine's use.
    let h = unsafe { r.engine.offload(TensorKey::new(1, 0), &region(&t), None).unwrap() };
    r.engine.drain().unwrap();
    assert_eq!(r.engine.stats().counters.write_errors, 1);
    assert!(
        !r.engine.source_released(h).unwrap(),
        "the only copy is the tensor's own memory"
    );
    assert_eq!(fetch_check(&r, h, 2 << 20, 3), 0);

    r.backend.faults().writes_left.store(u64::MAX, Ordering::SeqCst);
    r.backend.faults().reads_left.store(0, Ordering::SeqCst);
    let t2 = tensor(&r.dev, 2 << 20, 4);
    // SAFETY: as above.
    let h2 = unsafe {
        r.engine
            .offload(TensorKey::new(2, 0), &region(&t2), None)
            .unwrap()
    };
    r.engine.drain().unwrap();
    let out = r.dev.alloc(2 << 20).unwrap();
    // SAFETY: `out` outlives the call (it fails before any event).
    let e = unsafe { r.engine.fetch(h2, &region(&out)) }.expect_err("the read fails");
    assert!(e.to_string().contains("injected read failure"), "{e}");
    r.backend.faults().reads_left.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(
        fetch_check(&r, h2, 2 << 20, 4),
        0,
        "the engine recovers once reads work again"
    );
}

#[test]
fn bad_calls_get_clear_errors() {
    let r = rig(small_cfg(), 1 << 30);
    let t = tensor(&r.dev, 1000, 1);
    // SAFETY: `t` outlives the engine's use.
    let h = unsafe { r.engine.offload(TensorKey::new(1, 0), &region(&t), None).unwrap() };
    let e = r.engine.release(Handle(999_999)).unwrap_err().to_string();
    assert!(e.contains("unknown handle 999999"), "{e}");
    let small = r.dev.alloc(10).unwrap();
    // SAFETY: `small` is live.
    let e = unsafe { r.engine.fetch(h, &region(&small)) }
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("holds 10 bytes but the tensor has 1000"), "{e}");
    let other = tensor(&r.dev, 2000, 1);
    // SAFETY: as above.
    let e = unsafe { r.engine.offload(TensorKey::new(1, 0), &region(&other), None) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("offloaded before with other memory"), "{e}");
    // The same storage and version naming other memory (another view) is refused too.
    // SAFETY: as above.
    let e = unsafe {
        r.engine
            .offload(TensorKey::new(1, 0), &[Region::new(other.ptr(), 1000)], None)
    }
    .unwrap_err()
    .to_string();
    assert!(e.contains("offloaded before with other memory"), "{e}");
    r.engine.release(h).unwrap();
    let e = r.engine.release(h).unwrap_err().to_string();
    assert!(e.contains("already released"), "{e}");
    assert!(r.engine.prefetch(h).is_err());

    let dev: Arc<dyn Device> = Arc::new(HostDevice::new());
    let backend = Arc::new(MemBackend::new(dev.clone()).unwrap());
    let e = Engine::new(dev.clone(), backend.clone(), vec![], small_cfg()).unwrap_err();
    assert!(e.to_string().contains("at least one storage target"), "{e}");
    let bad = EngineConfig {
        prefetch_bytes: 1 << 40,
        ..small_cfg()
    };
    let e = Engine::new(
        dev,
        backend,
        vec![StorageTarget::new(Target::new("m"), 1 << 20)],
        bad,
    )
    .unwrap_err();
    assert!(e.to_string().contains("prefetch_bytes"), "{e}");
}

#[test]
fn staging_stays_within_budget_at_ten_times_the_budget() {
    let cfg = EngineConfig {
        staging_bytes: 2 << 20,
        prefetch_bytes: 1 << 20,
        pack_threshold: 128 << 10,
        pack_extent_bytes: 512 << 10,
        ..Default::default()
    };
    let r = rig(cfg, 1 << 30);
    r.backend.faults().delay_us.store(200, Ordering::SeqCst);
    let lens = sizes(450, 4 << 10, 100 << 10, 7); // ≈ 23 MiB: over 10× the staging
    let total: usize = lens.iter().sum();
    assert!(total >= 10 * (2 << 20), "{total}");
    let srcs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| tensor(&r.dev, l, i as u64))
        .collect();
    let hs = offload_all(&r, &srcs);
    r.engine.drain().unwrap();
    for &h in hs.iter().rev() {
        r.engine.prefetch(h).unwrap();
    }
    for (i, &h) in hs.iter().enumerate().rev() {
        assert_eq!(fetch_check(&r, h, lens[i], i as u64), 0);
    }
    let s = r.engine.stats().counters;
    assert!(
        s.staging_peak <= 2 << 20,
        "staging peak {} over the 2 MiB budget",
        s.staging_peak
    );
    assert!(s.staging_peak > 0);
}

#[test]
fn the_timeline_exports_pack_write_and_read_spans() {
    let cfg = EngineConfig {
        timeline: true,
        ..small_cfg()
    };
    let r = rig(cfg, 1 << 30);
    let t = tensor(&r.dev, 10 << 10, 1);
    // SAFETY: `t` outlives the engine's use.
    let h = unsafe { r.engine.offload(TensorKey::new(1, 0), &region(&t), None).unwrap() };
    r.engine.drain().unwrap();
    r.engine.prefetch(h).unwrap();
    assert_eq!(fetch_check(&r, h, 10 << 10, 1), 0);
    let mut out = Vec::new();
    r.engine.timeline().write_chrome_trace(&mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let names: Vec<_> = v["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    for want in ["pack", "write"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    assert!(
        names.iter().any(|n| n == "prefetch" || n == "demand read"),
        "{names:?}"
    );
}

#[test]
fn a_partly_filled_packed_extent_is_written_after_the_flush_delay() {
    let cfg = EngineConfig {
        pack_flush_delay: Duration::from_millis(5),
        ..small_cfg()
    };
    let r = rig(cfg, 1 << 30);
    let t = tensor(&r.dev, 1000, 1);
    // SAFETY: `t` outlives the engine's use.
    let h = unsafe { r.engine.offload(TensorKey::new(1, 0), &region(&t), None).unwrap() };
    let start = std::time::Instant::now();
    while !r.engine.source_released(h).unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the open extent was never flushed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.engine.stats().counters.extents_written, 1);
}

#[test]
fn extents_spread_over_several_targets() {
    let dev: Arc<dyn Device> = Arc::new(HostDevice::new());
    let backend = Arc::new(MemBackend::new(dev.clone()).unwrap());
    let targets = (0..3)
        .map(|i| StorageTarget::new(Target::new(format!("mem{i}")), 64 << 20))
        .collect();
    let cfg = EngineConfig {
        pack: false,
        ..small_cfg()
    };
    let engine = Engine::new(dev.clone(), backend.clone(), targets, cfg).unwrap();
    let srcs: Vec<_> = (0..30).map(|i| tensor(&dev, 100 << 10, i)).collect();
    for (i, s) in srcs.iter().enumerate() {
        // SAFETY: sources outlive the engine's use.
        unsafe {
            engine
                .offload(TensorKey::new(i as u64, 0), &region(s), None)
                .unwrap()
        };
    }
    engine.drain().unwrap();
    for t in 1..=3 {
        let data = backend.contents(spillway_runtime::TargetId(t), 0, 2 << 20);
        assert!(data.iter().any(|&b| b != 0), "target {t} got nothing");
    }
    let u = engine.storage_usage();
    assert_eq!(u.capacity, 3 * (64 << 20));
    assert_eq!(u.live_extents, 30);
}

#[test]
fn every_handle_of_a_deduplicated_tensor_is_served_from_one_prefetched_copy() {
    let cfg = EngineConfig {
        pack_flush_delay: Duration::from_secs(3600), // both tensors in one extent
        ..small_cfg()
    };
    let r = rig(cfg, 1 << 30);
    let t = tensor(&r.dev, 50 << 10, 4);
    let u = tensor(&r.dev, 70 << 10, 5);
    // SAFETY: the tensors outlive the engine's use.
    let (h1, h2, h3) = unsafe {
        (
            r.engine.offload(TensorKey::new(1, 0), &region(&t), None).unwrap(),
            r.engine.offload(TensorKey::new(1, 0), &region(&t), None).unwrap(),
            r.engine.offload(TensorKey::new(2, 0), &region(&u), None).unwrap(),
        )
    };
    r.engine.drain().unwrap();
    // Each handle to be fetched asks for its prefetch; the deduplicated two share a copy.
    for h in [h3, h1, h2] {
        r.engine.prefetch(h).unwrap();
    }
    for (h, len, seed) in [(h3, 70 << 10, 5), (h1, 50 << 10, 4), (h2, 50 << 10, 4)] {
        assert_eq!(fetch_check(&r, h, len, seed), 0);
    }
    let s = r.engine.stats().counters;
    assert_eq!(
        (s.prefetched_extents, s.prefetch_hits, s.demand_reads),
        (1, 3, 0),
        "{s:?}"
    );
    r.engine.drain().unwrap();
    assert_eq!(
        r.engine.staging_in_use(),
        0,
        "the loaded copy goes once every handle was served"
    );
}

#[test]
fn threads_share_one_engine_and_a_panicking_callback_does_not_stop_it() {
    let r = Arc::new(rig(small_cfg(), 1 << 30));
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let key = t * 1000 + i;
                    let len = 1 + (pattern::splitmix64(key) % (300 << 10)) as usize;
                    let src = tensor(&r.dev, len, key);
                    let freed = Arc::new(AtomicUsize::new(0));
                    let f = freed.clone();
                    // SAFETY: `src` outlives the engine's use: the loop waits for the
                    // callback below before `src` drops.
                    let h = unsafe {
                        r.engine
                            .offload_with_callback(TensorKey::new(key, 0), &region(&src), None, move || {
                                f.fetch_add(1, Ordering::SeqCst);
                                if key % 7 == 0 {
                                    panic!("a careless callback");
                                }
                            })
                            .unwrap()
                    };
                    if i % 3 == 0 {
                        r.engine.prefetch(h).unwrap();
                    }
                    assert_eq!(fetch_check(&r, h, len, key), 0, "thread {t} tensor {i}");
                    r.engine.release(h).unwrap();
                    let start = std::time::Instant::now();
                    while freed.load(Ordering::SeqCst) == 0 {
                        assert!(
                            start.elapsed() < Duration::from_secs(20),
                            "the source was never handed back"
                        );
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    r.engine.drain().unwrap();
    assert_eq!(r.engine.live_handles(), 0);
    assert_eq!(r.engine.storage_usage().used, 0);
    assert_eq!(r.engine.stats().counters.fetches, 200);
}

#[test]
fn a_tensor_of_many_tiny_regions_is_not_packed_past_the_extent_size() {
    let r = rig(small_cfg(), 1 << 30);
    // 600 one-byte regions: 600 bytes, but 600 aligned slots (2.3 MiB) if packed.
    let t = tensor(&r.dev, 600 * 8, 3);
    let regions: Vec<_> = (0..600).map(|i| Region::new(t.ptr() + i * 8, 1)).collect();
    // SAFETY: `t` outlives the engine's use.
    let h = unsafe { r.engine.offload(TensorKey::new(1, 0), &regions, None).unwrap() };
    r.engine.drain().unwrap();
    assert!(r.engine.source_released(h).unwrap());
    let s = r.engine.stats().counters;
    assert_eq!((s.direct_tensors, s.packed_tensors), (1, 0));
    let out = r.dev.alloc(600).unwrap();
    // SAFETY: `out` outlives the event.
    unsafe { r.engine.fetch(h, &region(&out)).unwrap() }
        .synchronize()
        .unwrap();
    let mut got = vec![0u8; 600];
    // SAFETY: 600 live bytes each side.
    unsafe { r.dev.copy_to_host_sync(got.as_mut_ptr(), out.ptr(), 600).unwrap() };
    let want: Vec<u8> = (0..600).map(|i| pattern::byte(3, i * 8)).collect();
    assert_eq!(got, want);
}

#[test]
fn a_submission_failing_midway_waits_for_the_io_already_in_flight() {
    let r = rig(small_cfg(), 1 << 30);
    r.backend.faults().delay_us.store(20_000, Ordering::SeqCst);
    // A direct tensor of three regions: three writes, the second refused.
    let parts = [
        tensor(&r.dev, 1 << 20, 1),
        tensor(&r.dev, 1 << 20, 2),
        tensor(&r.dev, 1 << 20, 3),
    ];
    let regions: Vec<_> = parts.iter().flat_map(region).collect();
    r.backend.faults().submits_left.store(1, Ordering::SeqCst);
    // SAFETY: the parts outlive the engine's use.
    let h = unsafe { r.engine.offload(TensorKey::new(1, 0), &regions, None).unwrap() };
    r.engine.drain().unwrap();
    assert_eq!(
        r.backend.written.load(Ordering::SeqCst),
        1 << 20,
        "the write in flight completed"
    );
    let s = r.engine.stats().counters;
    assert_eq!((s.write_errors, s.extents_written), (1, 0));
    assert!(
        !r.engine.source_released(h).unwrap(),
        "the tensor stays in its own memory"
    );
    r.backend.faults().submits_left.store(u64::MAX, Ordering::SeqCst);
    let out = r.dev.alloc(3 << 20).unwrap();
    // SAFETY: `out` outlives the event.
    unsafe { r.engine.fetch(h, &region(&out)).unwrap() }
        .synchronize()
        .unwrap();
    for i in 0..3u64 {
        let at = out.ptr() + (i << 20);
        assert_eq!(r.dev.count_pattern_mismatches(at, 1 << 20, i + 1, 0).unwrap(), 0);
    }

    // A demand read split in three by the destination, the second submission refused: the
    // fetch fails, but only after the first read has landed.
    let t = tensor(&r.dev, 3 << 20, 9);
    // SAFETY: `t` outlives the engine's use.
    let h2 = unsafe { r.engine.offload(TensorKey::new(2, 0), &region(&t), None).unwrap() };
    r.engine.drain().unwrap();
    let read_before = r.backend.read.load(Ordering::SeqCst);
    r.backend.faults().submits_left.store(1, Ordering::SeqCst);
    let dst: Vec<_> = (0..3)
        .map(|i| Region::new(out.ptr() + (i << 20), 1 << 20))
        .collect();
    // SAFETY: `out` outlives the call, which waits for the read in flight.
    let e = unsafe { r.engine.fetch(h2, &dst) }.expect_err("the second read is refused");
    assert!(e.to_string().contains("injected submission failure"), "{e}");
    assert_eq!(
        r.backend.read.load(Ordering::SeqCst) - read_before,
        1 << 20,
        "the first read landed first"
    );
    r.backend.faults().submits_left.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(fetch_check(&r, h2, 3 << 20, 9), 0);
}

/// An event of no device: streams cannot wait on it.
#[derive(Debug)]
struct ForeignEvent;

impl spillway_runtime::Event for ForeignEvent {
    fn query(&self) -> spillway_runtime::Result<bool> {
        Ok(true)
    }
    fn synchronize(&self) -> spillway_runtime::Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn a_write_that_cannot_be_prepared_keeps_its_tensors_and_drain_still_returns() {
    let r = rig(small_cfg(), 1 << 30);
    let small = tensor(&r.dev, 10 << 10, 1);
    let big = tensor(&r.dev, 2 << 20, 2);
    let ready: Arc<dyn spillway_runtime::Event> = Arc::new(ForeignEvent);
    // SAFETY: the tensors outlive the engine's use.
    let (hs, hb) = unsafe {
        (
            r.engine
                .offload(TensorKey::new(1, 0), &region(&small), Some(ready.clone()))
                .unwrap(),
            r.engine
                .offload(TensorKey::new(2, 0), &region(&big), Some(ready))
                .unwrap(),
        )
    };
    r.engine.drain().unwrap();
    let s = r.engine.stats().counters;
    assert_eq!((s.write_errors, s.extents_written), (2, 0), "{s:?}");
    assert_eq!(
        r.engine.staging_in_use(),
        0,
        "the packed extent's staging was given back"
    );
    assert_eq!(r.engine.storage_usage().used, 0);
    for h in [hs, hb] {
        assert!(!r.engine.source_released(h).unwrap());
    }
    r.engine.release(hs).unwrap();
    r.engine.release(hb).unwrap();
}

#[test]
fn a_prefetch_overtaken_by_its_fetch_is_dropped_not_read_late() {
    let cfg = EngineConfig {
        staging_bytes: 8 << 20,
        prefetch_bytes: 1 << 20,
        pack_threshold: 256 << 10,
        pack_extent_bytes: 1 << 20,
        // Extents fill up to their size whatever the timing (drain seals the last).
        pack_flush_delay: Duration::from_secs(3600),
        ..Default::default()
    };
    let r = rig(cfg, 1 << 30);
    let srcs: Vec<_> = (0..40).map(|i| tensor(&r.dev, 100 << 10, i)).collect();
    let hs = offload_all(&r, &srcs);
    r.engine.drain().unwrap();
    // Prefetches asked in reverse order, fetches made in forward order: only the first
    // asked fits the budget; the others are overtaken by their fetches.
    for &h in hs.iter().rev() {
        r.engine.prefetch(h).unwrap();
    }
    for (i, &h) in hs.iter().enumerate() {
        assert_eq!(fetch_check(&r, h, 100 << 10, i as u64), 0);
    }
    r.engine.drain().unwrap();
    let s = r.engine.stats().counters;
    assert_eq!(s.prefetched_extents, 1, "{s:?}");
    assert!(s.demand_reads > 0 && s.prefetch_hits > 0, "{s:?}");
    assert_eq!(
        r.engine.staging_in_use(),
        0,
        "no extent was read after its tensors were served"
    );
}

#[test]
fn a_copy_read_ahead_for_an_early_request_does_not_wait_for_late_ones() {
    // A deduplicated tensor needed early and late (as when a framework saves one storage
    // twice): the extent read for the early request goes once that request is served, so
    // it does not hold the prefetch budget until the late one, and is read again then.
    let cfg = EngineConfig {
        staging_bytes: 8 << 20,
        prefetch_bytes: 2 << 20,
        pack_threshold: 256 << 10,
        pack_extent_bytes: 1 << 20,
        // Extents fill up to their size whatever the timing (drain seals the last).
        pack_flush_delay: Duration::from_secs(3600),
        ..Default::default()
    };
    let r = rig(cfg, 1 << 30);
    let srcs: Vec<_> = (0..40).map(|i| tensor(&r.dev, 100 << 10, i)).collect();
    let mut hs = offload_all(&r, &srcs);
    // SAFETY: as for offload_all.
    let dup = unsafe {
        r.engine
            .offload(TensorKey::new(0, 0), &region(&srcs[0]), None)
            .unwrap()
    };
    hs.push(dup);
    r.engine.drain().unwrap();
    for &h in hs.iter().rev() {
        r.engine.prefetch(h).unwrap();
    }
    for (i, &h) in hs.iter().enumerate().rev() {
        assert_eq!(fetch_check(&r, h, 100 << 10, (i % 40) as u64), 0);
    }
    let s = r.engine.stats().counters;
    assert_eq!(
        s.demand_reads, 0,
        "every fetch was served from a prefetched copy: {s:?}"
    );
    assert_eq!(s.prefetch_hits, 41);
    assert_eq!(
        s.prefetched_extents, 5,
        "four extents, the first read twice: {s:?}"
    );
    assert_eq!(r.engine.staging_in_use(), 0);
}

/// Fetches `h` into a poisoned buffer whose memory is free only once a manual event fires,
/// `hold` after the call. Returns the buffer, whether the buffer was still untouched and
/// the fetch event pending just before the event fired, and the fetch event.
fn fetch_into_held_buffer(
    r: &Rig,
    h: Handle,
    len: usize,
    hold: Duration,
) -> (DeviceBuffer, bool, Arc<dyn Event>) {
    let out = r.dev.alloc(len).unwrap();
    r.dev.fill_pattern(out.ptr(), len, 0x5eed, 0).unwrap(); // poison
    let (free, trigger) = HostEvent::manual();
    let free: Arc<dyn Event> = Arc::new(free);
    let out_ptr = out.ptr();
    let dev = r.dev.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(hold);
        let untouched = dev.count_pattern_mismatches(out_ptr, len, 0x5eed, 0).unwrap() == 0;
        let pending = rx
            .recv_timeout(Duration::ZERO)
            .map_or(true, |ev: Arc<dyn Event>| !ev.query().unwrap());
        trigger.fire();
        untouched && pending
    });
    // SAFETY: `out` lives until the returned event has been waited on by the caller.
    let ev = unsafe { r.engine.fetch_into(h, &region(&out), Some(free)).unwrap() };
    let _ = tx.send(ev.clone());
    let waited = opener.join().unwrap();
    (out, waited, ev)
}

#[test]
fn a_fetch_into_busy_memory_waits_for_it_to_be_free() {
    // Read straight from storage: the read starts only once the memory is free.
    let r = rig(small_cfg(), 1 << 30);
    let t = tensor(&r.dev, 2 << 20, 21); // direct
    let h = offload_all(&r, std::slice::from_ref(&t))[0];
    r.engine.drain().unwrap();
    let (out, waited, ev) = fetch_into_held_buffer(&r, h, 2 << 20, Duration::from_millis(100));
    ev.synchronize().unwrap();
    assert!(waited, "nothing was written into the memory before it was free");
    assert_eq!(
        r.dev.count_pattern_mismatches(out.ptr(), 2 << 20, 21, 0).unwrap(),
        0
    );
    assert_eq!(r.engine.stats().counters.demand_reads, 1);

    // Forwarded from the tensor's own memory (its write held back): the copy waits on the stream.
    let r = rig(small_cfg(), 1 << 30);
    r.backend.faults().gate.close();
    let t = tensor(&r.dev, 2 << 20, 22);
    let h = offload_all(&r, std::slice::from_ref(&t))[0];
    let (out, waited, ev) = fetch_into_held_buffer(&r, h, 2 << 20, Duration::from_millis(100));
    ev.synchronize().unwrap();
    r.backend.faults().gate.open();
    r.engine.drain().unwrap(); // before `t` can go, even on a failed assertion
    assert!(waited, "the forwarded copy waited for the memory to be free");
    assert_eq!(
        r.dev.count_pattern_mismatches(out.ptr(), 2 << 20, 22, 0).unwrap(),
        0
    );
    assert_eq!(r.engine.stats().counters.forwarded_fetches, 1);
}

#[test]
fn an_empty_tensor_round_trips_and_is_counted() {
    let r = rig(small_cfg(), 1 << 20);
    // SAFETY: no memory is named.
    let h = unsafe { r.engine.offload(TensorKey::new(9, 0), &[], None) }.unwrap();
    r.engine.drain().unwrap();
    assert!(r.engine.source_released(h).unwrap());
    r.engine.prefetch(h).unwrap();
    // SAFETY: no memory is named.
    unsafe { r.engine.fetch(h, &[]) }.unwrap().synchronize().unwrap();
    let c = r.engine.stats().counters;
    assert_eq!(
        (c.fetches, c.fetch_bytes, c.forwarded_fetches),
        (1, 0, 1),
        "{c:?}"
    );
    assert_eq!((c.extents_written, c.reads), (0, 0), "{c:?}");
    r.engine.release(h).unwrap();
    r.engine.drain().unwrap();
    assert_eq!(r.engine.storage_usage().used, 0);
}

#[test]
fn a_null_region_of_nonzero_length_is_refused_before_any_copy() {
    let r = rig(small_cfg(), 64 << 20);
    // SAFETY: refused before any memory is read.
    let err = unsafe {
        r.engine
            .offload(TensorKey::new(1, 0), &[Region::new(0, 4096)], None)
    }
    .unwrap_err()
    .to_string();
    assert!(err.contains("offload region 0 has address 0"), "{err}");
    assert!(matches!(
        // SAFETY: as above.
        unsafe {
            r.engine
                .offload(TensorKey::new(1, 0), &[Region::new(0, 4096)], None)
        },
        Err(spillway_runtime::Error::InvalidArgument(_))
    ));
    // An empty region at 0 is no memory at all: accepted.
    let t = tensor(&r.dev, 4096, 3);
    let regions = [Region::new(0, 0), Region::new(t.ptr(), 4096)];
    // SAFETY: `t` lives until the engine is dropped.
    let h = unsafe { r.engine.offload(TensorKey::new(2, 0), &regions, None).unwrap() };
    // SAFETY: refused before anything is written.
    let err = unsafe { r.engine.fetch(h, &[Region::new(0, 4096)]) }
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("fetch region 0 has address 0"), "{err}");
    assert_eq!(fetch_check(&r, h, 4096, 3), 0);
}

#[test]
fn region_lengths_that_overflow_are_refused() {
    let r = rig(small_cfg(), 64 << 20);
    let t = tensor(&r.dev, 4096, 5);
    let p = t.ptr();
    let half = 1u64 << 63;
    // Two regions of 2^63 bytes: their total wraps to 0.
    let twice = [Region::new(p, half), Region::new(p, half)];
    // SAFETY: refused before any memory is read.
    let err = unsafe { r.engine.offload(TensorKey::new(1, 0), &twice, None) }
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("passes the end of the address space") || err.contains("add up to more than 2^64"),
        "{err}"
    );
    // A region running past the end of the address space.
    let past = [Region::new(u64::MAX - 10, 4096)];
    // SAFETY: as above.
    let err = unsafe { r.engine.offload(TensorKey::new(2, 0), &past, None) }
        .unwrap_err()
        .to_string();
    assert!(err.contains("passes the end of the address space"), "{err}");
    // Lengths whose sum wraps though each region fits.
    let wraps = [
        Region::new(1 << 12, u64::MAX >> 1),
        Region::new(1 << 12, u64::MAX >> 1),
        Region::new(1 << 12, 4),
    ];
    // SAFETY: as above.
    let err = unsafe { r.engine.offload(TensorKey::new(3, 0), &wraps, None) }
        .unwrap_err()
        .to_string();
    assert!(err.contains("add up to more than 2^64"), "{err}");
    assert_eq!(r.engine.live_handles(), 0);
}

/// Packed extents of ten tensors of `SLOT_TENSOR` bytes each (1 MiB, filled whatever the
/// timing), with `prefetch_bytes` of read-ahead.
fn slot_cfg(prefetch_bytes: u64, checksums: bool) -> EngineConfig {
    EngineConfig {
        checksums,
        staging_bytes: 8 << 20,
        prefetch_bytes,
        pack_threshold: 256 << 10,
        pack_extent_bytes: 1 << 20,
        pack_flush_delay: Duration::from_secs(3600),
        ..Default::default()
    }
}

fn slot_rig(prefetch_bytes: u64, checksums: bool) -> Rig {
    rig(slot_cfg(prefetch_bytes, checksums), 1 << 30)
}

/// Off the alignment: its slot is the 4 KiB-aligned range around it.
const SLOT_TENSOR: usize = 100_000;
const SLOT_BYTES: u64 = 102_400;

/// `n` tensors of `SLOT_TENSOR` bytes (pattern seed = index), offloaded and drained.
fn offload_slot_tensors(r: &Rig, n: u64) -> (Vec<DeviceBuffer>, Vec<Handle>) {
    let srcs: Vec<_> = (0..n).map(|i| tensor(&r.dev, SLOT_TENSOR, i)).collect();
    let hs = offload_all(r, &srcs);
    r.engine.drain().unwrap();
    (srcs, hs)
}

#[test]
fn a_lone_prefetch_request_reads_ahead_only_its_tensor_and_its_fetch_is_a_hit() {
    for checksums in [false, true] {
        let r = slot_rig(4 << 20, checksums);
        let (_srcs, hs) = offload_slot_tensors(&r, 10);
        let read_before = r.engine.stats().counters.bytes_read;
        // The fifth of ten, asked alone: neither the first nor the last still to be fetched.
        r.engine.prefetch(hs[4]).unwrap();
        r.engine.drain().unwrap();
        let s = r.engine.stats().counters;
        assert_eq!(
            (s.prefetched_extents, s.prefetched_slots),
            (0, 1),
            "checksums {checksums}: {s:?}"
        );
        assert_eq!(
            s.bytes_read - read_before,
            SLOT_BYTES,
            "only the tensor's slot was read"
        );
        assert_eq!(r.engine.staging_in_use(), SLOT_BYTES, "held until fetched");
        assert_eq!(fetch_check(&r, hs[4], SLOT_TENSOR, 4), 0);
        let s = r.engine.stats().counters;
        assert_eq!(
            (s.prefetch_hits, s.demand_reads, s.read_errors),
            (1, 0, 0),
            "checksums {checksums}: {s:?}"
        );
        assert_eq!(s.bytes_read - read_before, SLOT_BYTES, "nothing read on demand");
        if checksums {
            assert_eq!(
                s.verified_bytes, SLOT_TENSOR as u64,
                "the slot's bytes were checked"
            );
        }
        r.engine.drain().unwrap();
        assert_eq!(r.engine.staging_in_use(), 0, "the slot goes with its fetch");
        // The others still come back exact, read on demand.
        for (i, &h) in hs.iter().enumerate().filter(|&(i, _)| i != 4) {
            assert_eq!(fetch_check(&r, h, SLOT_TENSOR, i as u64), 0);
        }
        for h in hs {
            r.engine.release(h).unwrap();
        }
        r.engine.drain().unwrap();
        assert_eq!((r.engine.staging_in_use(), r.engine.storage_usage().used), (0, 0));
    }
}

#[test]
fn a_duplicates_request_ahead_of_its_extents_scan_reads_the_extent_once() {
    // Ten tensors to an extent, read ahead within three extents; tensor 0 (the first of
    // its extent) offloaded again last, a duplicate. Everything is asked for in reverse,
    // as the tensors bench does, the duplicate after the first three extents (which fill
    // the budget, so it waits in the queue). With its extent's scan far behind it, the
    // duplicate reads its own bytes alone (it read the whole extent, and held it in the
    // budget until the scan came). With the scan within reach behind it, the duplicate's
    // request loads the extent for the scan too, and the load stays until the scan is
    // fetched: each extent is read once.
    for (tensors, extents_read, slots_read) in [(60u64, 6, 1), (50, 5, 0)] {
        let r = slot_rig(3 << 20, false);
        let (srcs, hs) = offload_slot_tensors(&r, tensors);
        // SAFETY: `srcs` outlives the engine's use of it.
        let dup = unsafe {
            r.engine
                .offload(TensorKey::new(0, 0), &region(&srcs[0]), None)
                .unwrap()
        };
        let s = r.engine.stats().counters;
        assert_eq!((s.dedup_hits, s.extents_written), (1, tensors / 10), "{s:?}");
        let mut order: Vec<(Handle, u64)> =
            hs.iter().enumerate().rev().map(|(i, &h)| (h, i as u64)).collect();
        order.insert(30, (dup, 0));
        for &(h, _) in &order {
            r.engine.prefetch(h).unwrap();
        }
        for &(h, seed) in &order {
            assert_eq!(fetch_check(&r, h, SLOT_TENSOR, seed), 0);
        }
        let s = r.engine.stats().counters;
        assert_eq!(
            (s.prefetched_extents, s.prefetched_slots, s.demand_reads),
            (extents_read, slots_read, 0),
            "{tensors} tensors: {s:?}"
        );
        for &(h, _) in &order {
            r.engine.release(h).unwrap();
        }
        r.engine.drain().unwrap();
    }
}

#[test]
fn a_fetch_that_comes_while_its_slot_is_read_waits_for_it() {
    let r = Arc::new(slot_rig(4 << 20, true));
    let (_srcs, hs) = offload_slot_tensors(&r, 10);
    r.backend.faults().gate.close();
    r.engine.prefetch(hs[6]).unwrap();
    assert_eq!(
        r.engine.stats().counters.prefetched_slots,
        1,
        "its read is in flight"
    );
    let fetcher = {
        let r = r.clone();
        let h = hs[6];
        std::thread::spawn(move || fetch_check(&r, h, SLOT_TENSOR, 6))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!fetcher.is_finished(), "the fetch waits for the slot's read");
    r.backend.faults().gate.open();
    assert_eq!(fetcher.join().unwrap(), 0);
    let s = r.engine.stats().counters;
    assert_eq!(
        (s.prefetched_slots, s.prefetch_hits, s.demand_reads, s.reads),
        (1, 1, 0, 1),
        "served from the slot, read once: {s:?}"
    );
    r.engine.drain().unwrap();
    assert_eq!(r.engine.staging_in_use(), 0);
}

#[test]
fn a_failed_slot_read_leaves_the_fetch_to_read_on_demand_with_exact_bytes() {
    let r = slot_rig(4 << 20, true);
    let (_srcs, hs) = offload_slot_tensors(&r, 10);
    let faults = r.backend.faults();
    faults.reads_left.store(0, Ordering::SeqCst); // every read fails, retries too
    r.engine.prefetch(hs[3]).unwrap();
    r.engine.drain().unwrap();
    let s = r.engine.stats().counters;
    assert_eq!((s.prefetched_slots, s.read_errors), (1, 1), "{s:?}");
    assert_eq!(
        r.engine.staging_in_use(),
        0,
        "a failed slot's staging goes at once"
    );
    faults.reads_left.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(fetch_check(&r, hs[3], SLOT_TENSOR, 3), 0);
    let s = r.engine.stats().counters;
    assert_eq!(
        (s.prefetch_hits, s.demand_reads, s.read_errors),
        (0, 1, 1),
        "read on demand: {s:?}"
    );
    r.engine.drain().unwrap();
    assert_eq!(r.engine.staging_in_use(), 0);
}

#[test]
fn releasing_a_handle_frees_its_slot_loaded_or_still_loading() {
    let r = slot_rig(4 << 20, false);
    let (_srcs, hs) = offload_slot_tensors(&r, 10);
    // Loaded, then released.
    r.engine.prefetch(hs[2]).unwrap();
    r.engine.drain().unwrap();
    assert_eq!(r.engine.staging_in_use(), SLOT_BYTES);
    r.engine.release(hs[2]).unwrap();
    r.engine.drain().unwrap();
    assert_eq!(r.engine.staging_in_use(), 0, "released with its handle");
    // Released while its read is in flight: freed once the read settles, and its extent
    // stays until then even with every handle gone.
    r.backend.faults().gate.close();
    r.engine.prefetch(hs[5]).unwrap();
    assert_eq!(r.engine.staging_in_use(), SLOT_BYTES);
    for (i, &h) in hs.iter().enumerate().filter(|&(i, _)| i != 2) {
        r.engine.release(h).unwrap();
        if i == 5 {
            assert_eq!(
                r.engine.staging_in_use(),
                SLOT_BYTES,
                "kept while its read is in flight"
            );
        }
    }
    assert!(
        r.engine.storage_usage().used > 0,
        "the extent stays while it is read"
    );
    r.backend.faults().gate.open();
    r.engine.drain().unwrap();
    assert_eq!((r.engine.staging_in_use(), r.engine.storage_usage().used), (0, 0));
    let s = r.engine.stats().counters;
    assert_eq!((s.prefetched_slots, s.read_errors), (2, 0), "{s:?}");
}

#[test]
fn many_lone_requests_stay_within_the_prefetch_budget_and_are_all_served() {
    // Extents of five tensors, and a budget of one extent: five slots fit. Twelve lone
    // requests (the middle three of four extents) are read ahead five at a time, in the
    // order asked, as their fetches free room.
    let budget = 512 << 10;
    let r = rig(
        EngineConfig {
            pack_extent_bytes: 512 << 10,
            ..slot_cfg(budget, true)
        },
        1 << 30,
    );
    let (_srcs, hs) = offload_slot_tensors(&r, 20);
    let lone: Vec<usize> = (0..20).filter(|i| i % 5 != 0 && i % 5 != 4).collect();
    for &i in &lone {
        r.engine.prefetch(hs[i]).unwrap();
    }
    r.engine.drain().unwrap();
    assert_eq!(r.engine.stats().counters.prefetched_slots, 5);
    assert_eq!(r.engine.staging_in_use(), 5 * SLOT_BYTES);
    for &i in &lone {
        assert_eq!(fetch_check(&r, hs[i], SLOT_TENSOR, i as u64), 0);
        r.engine.drain().unwrap();
        assert!(
            r.engine.staging_in_use() <= budget,
            "{}",
            r.engine.staging_in_use()
        );
    }
    let s = r.engine.stats().counters;
    assert_eq!(
        (
            s.prefetched_slots,
            s.prefetch_hits,
            s.demand_reads,
            s.prefetched_extents
        ),
        (12, 12, 0, 0),
        "{s:?}"
    );
    assert_eq!(r.engine.staging_in_use(), 0);
}
