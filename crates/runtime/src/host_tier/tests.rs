//! The host tier against the host device and the memory backend: bytes exact from either
//! tier, spilling and eviction when full, discards never spilled, failures without hangs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::host::HostDevice;
use crate::mem_backend::MemBackend;
use crate::memory::DeviceBuffer;
use crate::pattern;

const KIB: u64 = 1024;

struct Rig {
    device: Arc<dyn Device>,
    mem: Arc<MemBackend>,
    tier: HostTierBackend,
    target: TargetId,
}

fn rig(bytes: u64, spill_at: f64) -> Rig {
    let device: Arc<dyn Device> = Arc::new(HostDevice::new());
    let mem = Arc::new(MemBackend::new(device.clone()).unwrap());
    let tier = HostTierBackend::new(
        mem.clone(),
        device.clone(),
        HostTierConfig {
            bytes,
            align: 4096,
            spill_at,
            spill_inflight_bytes: 64 * KIB,
        },
    )
    .unwrap();
    let (target, _) = tier.open(&Target::new("/mem/tier-test")).unwrap();
    Rig {
        device,
        mem,
        tier,
        target,
    }
}

impl Rig {
    /// Device memory holding the pattern of `seed`.
    fn tensor(&self, len: usize, seed: u64) -> DeviceBuffer {
        let b = self.device.alloc(len).unwrap();
        self.device.fill_pattern(b.ptr(), len, seed, 0).unwrap();
        b
    }

    fn write(&self, offset: u64, buf: &DeviceBuffer, len: usize) -> Ticket {
        let req = IoRequest {
            target: self.target,
            op: IoOp::Write,
            offset,
            mem: MemRef::Device { ptr: buf.ptr(), len },
        };
        // SAFETY: the buffers outlive the tickets, which every test waits for.
        unsafe { self.tier.submit(req) }.unwrap()
    }

    /// Reads `len` bytes at `offset` into new device memory and counts the bytes that are
    /// not the pattern of `seed`.
    fn mismatches(&self, offset: u64, len: usize, seed: u64) -> u64 {
        let back = self.device.alloc(len).unwrap();
        let req = IoRequest {
            target: self.target,
            op: IoOp::Read,
            offset,
            mem: MemRef::Device { ptr: back.ptr(), len },
        };
        // SAFETY: `back` outlives the wait.
        let got = unsafe { self.tier.submit(req) }.unwrap().wait().unwrap();
        assert_eq!(got, len, "a whole read");
        self.device
            .count_pattern_mismatches(back.ptr(), len, seed, 0)
            .unwrap()
    }
}

#[test]
fn a_write_completes_in_the_arena_and_reads_back_from_it_without_storage() {
    let r = rig(1 << 20, 1.0);
    let t = r.tensor(100_000, 7);
    assert_eq!(r.write(0, &t, 100_000).wait().unwrap(), 100_000);
    drop(t); // the source may go as soon as the write completed
    assert_eq!(r.mismatches(0, 100_000, 7), 0);
    let s = r.tier.stats();
    assert_eq!(s.bytes_in, 100_000);
    assert_eq!(s.bytes_read_arena, 100_000);
    assert_eq!(s.bytes_read_storage, 0);
    assert_eq!(
        s.bytes_spilled, 0,
        "below the spill threshold nothing goes to storage"
    );
    assert_eq!(r.mem.written.load(Ordering::Relaxed), 0);
    assert_eq!(s.dirty, round_up(100_000, 4096));
}

#[test]
fn a_full_arena_spills_oldest_first_and_every_byte_reads_back_from_either_tier() {
    // 256 KiB of arena, 1 MiB written in 64 KiB pieces: writes wait for spills, clean
    // slots are evicted, and the early pieces come back from storage.
    let r = rig(256 * KIB, 0.5);
    let n = 16;
    let len = 64 * KIB as usize;
    let tensors: Vec<_> = (0..n).map(|i| r.tensor(len, 100 + i)).collect();
    let tickets: Vec<_> = (0..n)
        .map(|i| r.write(i * len as u64, &tensors[i as usize], len))
        .collect();
    for t in tickets {
        assert_eq!(t.wait().unwrap(), len);
    }
    for i in 0..n {
        assert_eq!(r.mismatches(i * len as u64, len, 100 + i), 0, "piece {i}");
    }
    let s = r.tier.stats();
    assert!(s.waited_writes > 0, "{s:?}");
    assert!(s.bytes_spilled >= 12 * len as u64, "{s:?}");
    assert!(s.bytes_evicted > 0, "{s:?}");
    assert!(s.bytes_read_storage > 0 && s.bytes_read_arena > 0, "{s:?}");
    assert!(s.used <= 256 * KIB);
    // The first piece is on storage, byte for byte.
    let stored = r.mem.contents(r.target, 0, len);
    assert_eq!(pattern::count_mismatches(&stored, 100, 0), 0);
}

#[test]
fn discarded_bytes_are_never_spilled_and_their_space_is_reused() {
    let r = rig(128 * KIB, 0.0);
    r.mem.faults().gate.close(); // hold spills in flight
    let a = r.tensor(64 * 1024, 1);
    r.write(0, &a, 64 * 1024).wait().unwrap();
    let b = r.tensor(64 * 1024, 2);
    r.write(65536, &b, 64 * 1024).wait().unwrap();
    // Both are dirty; with spill_at 0 the first spill started (held at the gate).
    r.tier.discard(r.target, 65536, 65536);
    r.mem.faults().gate.open();
    r.tier.flush(r.target).unwrap();
    let s = r.tier.stats();
    assert_eq!(
        s.bytes_spilled,
        64 * KIB,
        "only the live piece went to storage: {s:?}"
    );
    assert_eq!(s.bytes_discarded, 64 * KIB);
    assert_eq!(r.mem.written.load(Ordering::Relaxed), 64 * KIB);
}

#[test]
fn a_piece_overwritten_while_its_old_bytes_spill_reads_back_new_and_stores_new() {
    let r = rig(256 * KIB, 0.0);
    r.mem.faults().gate.close();
    let old = r.tensor(8192, 1);
    r.write(0, &old, 8192).wait().unwrap(); // spilling, held at the gate
    let new = r.tensor(8192, 2);
    r.write(0, &new, 8192).wait().unwrap();
    assert_eq!(r.mismatches(0, 8192, 2), 0);
    r.mem.faults().gate.open();
    r.tier.flush(r.target).unwrap();
    let stored = r.mem.contents(r.target, 0, 8192);
    assert_eq!(
        pattern::count_mismatches(&stored, 2, 0),
        0,
        "the newer bytes reached storage last"
    );
}

#[test]
fn a_read_across_arena_and_storage_is_joined_in_order() {
    let r = rig(64 * KIB, 1.0);
    // Larger than the arena: straight to storage.
    let big = r.tensor(128 * 1024, 5);
    r.write(0, &big, 128 * 1024).wait().unwrap();
    assert_eq!(r.tier.stats().bytes_through, 128 * KIB);
    // A piece of it overwritten through the arena.
    let piece = r.tensor(8192, 6);
    r.write(65536, &piece, 8192).wait().unwrap();
    let back = r.device.alloc(128 * 1024).unwrap();
    let req = IoRequest {
        target: r.target,
        op: IoOp::Read,
        offset: 0,
        mem: MemRef::Device {
            ptr: back.ptr(),
            len: 128 * 1024,
        },
    };
    // SAFETY: `back` outlives the wait.
    unsafe { r.tier.submit(req) }.unwrap().wait().unwrap();
    let mut host = vec![0u8; 128 * 1024];
    // SAFETY: host device memory is host memory of that length.
    unsafe {
        r.device
            .copy_to_host_sync(host.as_mut_ptr(), back.ptr(), host.len())
    }
    .unwrap();
    assert_eq!(pattern::count_mismatches(&host[..65536], 5, 0), 0);
    assert_eq!(pattern::count_mismatches(&host[65536..73728], 6, 0), 0);
    assert_eq!(pattern::count_mismatches(&host[73728..], 5, 73728), 0);
}

#[test]
fn writes_waiting_for_room_fail_when_spilling_fails_instead_of_waiting_for_ever() {
    let r = rig(64 * KIB, 0.5);
    r.mem.faults().writes_left.store(0, Ordering::Relaxed); // every storage write fails
    let a = r.tensor(64 * 1024, 1);
    r.write(0, &a, 64 * 1024).wait().unwrap(); // into the arena: fine
    let b = r.tensor(64 * 1024, 2);
    let waited = r
        .write(65536, &b, 64 * 1024)
        .wait_timeout(Duration::from_secs(20));
    let result = waited.expect("the waiting write ends");
    assert!(result.is_err(), "it cannot get room: {result:?}");
    // What is in the arena still reads back.
    assert_eq!(r.mismatches(0, 64 * 1024, 1), 0);
    assert!(r.tier.stats().spill_errors > 0);
}

#[test]
fn refuses_unaligned_writes_and_empty_requests_with_a_clear_error() {
    let r = rig(64 * KIB, 0.5);
    let a = r.tensor(4096, 1);
    let req = IoRequest {
        target: r.target,
        op: IoOp::Write,
        offset: 100,
        mem: MemRef::Device {
            ptr: a.ptr(),
            len: 4096,
        },
    };
    // SAFETY: refused before any memory is touched.
    let err = unsafe { r.tier.submit(req) }.unwrap_err().to_string();
    assert!(err.contains("multiples of 4096"), "{err}");
    assert!(
        HostTierBackend::new(r.mem.clone(), r.device.clone(), HostTierConfig::default())
            .unwrap_err()
            .to_string()
            .contains("host_tier")
    );
}

#[test]
fn closing_a_target_with_spills_in_flight_waits_for_them_and_drops_the_rest() {
    let r = rig(256 * KIB, 0.0);
    r.mem.faults().gate.close();
    let a = r.tensor(64 * 1024, 1);
    r.write(0, &a, 64 * 1024).wait().unwrap();
    let mem = r.mem.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        mem.faults().gate.open();
    });
    r.tier.close(r.target).unwrap();
    opener.join().unwrap();
    assert_eq!(r.tier.stats().used, 0);
}

/// The engine over a host tier: tensors fetched exact whichever tier holds them, and
/// released tensors discarded.
#[test]
fn the_engine_over_a_host_tier_round_trips_and_discards_what_it_frees() {
    use crate::engine::{Engine, EngineConfig, Region, StorageTarget, TensorKey};
    let device: Arc<dyn Device> = Arc::new(HostDevice::new());
    let mem = Arc::new(MemBackend::new(device.clone()).unwrap());
    let tier = Arc::new(
        HostTierBackend::new(
            mem.clone(),
            device.clone(),
            HostTierConfig {
                bytes: 2 << 20,
                align: 4096,
                spill_at: 0.5,
                spill_inflight_bytes: 256 * KIB,
            },
        )
        .unwrap(),
    );
    let config = EngineConfig {
        staging_bytes: 4 << 20,
        prefetch_bytes: 2 << 20,
        pack_extent_bytes: 1 << 20,
        pack_threshold: 256 << 10,
        checksums: true,
        ..Default::default()
    };
    let engine = Engine::new(
        device.clone(),
        tier.clone(),
        vec![StorageTarget::new(Target::new("/mem/engine-tier"), 64 << 20)],
        config,
    )
    .unwrap();
    let sizes = [
        3 << 20,
        100_000,
        1 << 20,
        5000,
        2 << 20,
        700_000,
        64 << 10,
        1 << 20,
    ];
    let mut held = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let t = device.alloc(len).unwrap();
        device.fill_pattern(t.ptr(), len, i as u64, 0).unwrap();
        // SAFETY: `t` is kept (in `held`) until the engine is drained.
        let h = unsafe {
            engine.offload(
                TensorKey::new(i as u64, 0),
                &[Region::new(t.ptr(), len as u64)],
                None,
            )
        }
        .unwrap();
        held.push((h, t, len));
    }
    engine.drain().unwrap();
    for (i, (h, _, len)) in held.iter().enumerate().rev() {
        if i % 2 == 0 {
            engine.prefetch(*h).unwrap();
        }
        let back = device.alloc(*len).unwrap();
        // SAFETY: `back` outlives the wait below.
        let ev = unsafe { engine.fetch(*h, &[Region::new(back.ptr(), *len as u64)]) }.unwrap();
        ev.synchronize().unwrap();
        assert_eq!(
            device
                .count_pattern_mismatches(back.ptr(), *len, i as u64, 0)
                .unwrap(),
            0,
            "tensor {i}"
        );
        engine.release(*h).unwrap();
    }
    engine.drain().unwrap();
    let s = tier.stats();
    assert!(s.bytes_in > 0 && s.bytes_spilled > 0, "{s:?}");
    assert_eq!(s.used, 0, "every extent was freed and discarded: {s:?}");
}
