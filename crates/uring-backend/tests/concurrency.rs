//! Many requests at once from several threads, on two rings with a shallow queue; and
//! sequential rewrites of overlapping regions.

mod common;

use std::sync::Arc;

use common::{backend, open_direct, run, submit, MemKind, Memory, ALL_KINDS};
use spillway_runtime::{Backend, IoOp};
use spillway_uring::UringConfig;

/// Each request gets its own slot of the file, so no two share a block.
const SLOT: u64 = 512 << 10;

/// (offset, size, memory kind, seed) of request `i` of thread `t`.
fn request(t: usize, i: usize, per_thread: usize) -> (u64, usize, MemKind, u64) {
    let n = (t * per_thread + i) as u64;
    let shift = [0u64, 1, 511, 4095, 12345 % 4096][(n % 5) as usize];
    let size = [1usize, 4096, 4097, 65536 + 3, (256 << 10) + 17, 511][(n % 6) as usize];
    let kind = ALL_KINDS[(n % 3) as usize];
    (n * SLOT + 4096 + shift, size, kind, 1000 + n)
}

#[test]
fn concurrent_requests_from_several_threads() {
    let backend = Arc::new(backend(UringConfig {
        queue_depth: 8,
        threads: 2,
        chunk_size: 64 << 10,
        staging_buffers: 4,
    }));
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "concurrent.dat");
    let (threads, per_thread) = (4, 24);

    // Write: every thread submits all its requests before waiting for any.
    std::thread::scope(|scope| {
        for t in 0..threads {
            let backend = backend.clone();
            scope.spawn(move || {
                let requests: Vec<_> = (0..per_thread)
                    .map(|i| {
                        let (offset, size, kind, seed) = request(t, i, per_thread);
                        let mem = Memory::with_pattern(kind, size, seed, offset);
                        let ticket = submit(&backend, target, IoOp::Write, offset, &mem);
                        (mem, ticket, offset, size)
                    })
                    .collect();
                for (mem, ticket, offset, size) in requests {
                    assert_eq!(ticket.wait().unwrap(), size, "write of {size} at {offset}");
                    drop(mem);
                }
            });
        }
    });

    // Read back the same way, into memory of another kind.
    std::thread::scope(|scope| {
        for t in 0..threads {
            let backend = backend.clone();
            scope.spawn(move || {
                let requests: Vec<_> = (0..per_thread)
                    .map(|i| {
                        let (offset, size, kind, seed) = request(t, i, per_thread);
                        let other = ALL_KINDS[(ALL_KINDS.iter().position(|k| *k == kind).unwrap() + 1) % 3];
                        let mem = Memory::new(other, size);
                        let ticket = submit(&backend, target, IoOp::Read, offset, &mem);
                        (mem, ticket, offset, size, seed)
                    })
                    .collect();
                for (mem, ticket, offset, size, seed) in requests {
                    assert_eq!(ticket.wait().unwrap(), size);
                    mem.assert_pattern(seed, offset, &format!("{size} bytes at offset {offset}"));
                }
            });
        }
    });
    backend.close(target).unwrap();
}

#[test]
fn sequential_overlapping_rewrites_leave_the_last_data() {
    let backend = backend(UringConfig {
        queue_depth: 8,
        threads: 2,
        chunk_size: 64 << 10,
        staging_buffers: 4,
    });
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "rewrites.dat");
    // (offset, size, kind, seed), each written after the previous one completed.
    let writes = [
        (0u64, 1usize << 20, MemKind::HostAligned, 1u64),
        (256 << 10, 512 << 10, MemKind::Device, 2),
        (128 << 10, 256 << 10, MemKind::HostMisaligned, 3),
        ((512 << 10) + 1, 100_000, MemKind::Device, 4),
        (4095, 2, MemKind::HostAligned, 5),
    ];
    for &(offset, size, kind, seed) in &writes {
        let mem = Memory::with_pattern(kind, size, seed, offset);
        run(&backend, target, IoOp::Write, offset, &mem).unwrap();
    }
    let whole = Memory::new(MemKind::HostAligned, 1 << 20);
    run(&backend, target, IoOp::Read, 0, &whole).unwrap();
    for (at, byte) in whole.bytes().iter().enumerate() {
        let at = at as u64;
        let last = writes
            .iter()
            .rev()
            .find(|(offset, size, ..)| (*offset..*offset + *size as u64).contains(&at))
            .expect("the first write covers everything");
        let expected = spillway_runtime::pattern::byte(last.3, at);
        assert_eq!(
            *byte, expected,
            "byte {at} should come from the write with seed {}",
            last.3
        );
    }
}

#[test]
fn staging_waits_for_slow_device_copies() {
    // Every copy waits 2 ms before it runs: a write submitted before its copy's event, or
    // a staging buffer reused before the copy out of it, would move the wrong bytes.
    let device = Arc::new(common::slow_device::SlowDevice::new(
        std::time::Duration::from_millis(2),
    ));
    let backend = spillway_uring::UringBackend::new(
        device,
        UringConfig {
            queue_depth: 8,
            threads: 1,
            chunk_size: 64 << 10,
            staging_buffers: 3,
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "slow.dat");
    let cases = [(0u64, 1usize << 20), (4095, 4097), (12345, (1 << 20) + 3), (1, 1)];
    let written: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, &(offset, size))| {
            let offset = offset + (i as u64) * (4 << 20);
            let mem = Memory::with_pattern(MemKind::Device, size, 50 + i as u64, offset);
            let ticket = submit(&backend, target, IoOp::Write, offset, &mem);
            (mem, ticket, offset, size)
        })
        .collect();
    let written: Vec<_> = written
        .into_iter()
        .map(|(mem, ticket, offset, size)| {
            assert_eq!(ticket.wait().unwrap(), size);
            drop(mem);
            (offset, size)
        })
        .collect();
    let reads: Vec<_> = written
        .iter()
        .map(|&(offset, size)| {
            let mem = Memory::new(MemKind::Device, size);
            let ticket = submit(&backend, target, IoOp::Read, offset, &mem);
            (mem, ticket, offset)
        })
        .collect();
    for (i, (mem, ticket, offset)) in reads.into_iter().enumerate() {
        ticket.wait().unwrap();
        mem.assert_pattern(
            50 + i as u64,
            offset,
            &format!("slow device copy at offset {offset}"),
        );
    }
}

/// One request at a time from each of several threads, each submitted just as the worker
/// finishes the previous one and goes back to sleep: the pattern that would strand a
/// request behind a blocked worker if a wake-up were lost. Fails (rather than hangs) when a
/// request does not complete in time.
#[test]
fn back_to_back_requests_always_wake_the_worker() {
    let backend = Arc::new(backend(UringConfig {
        queue_depth: 4,
        threads: 2,
        chunk_size: 64 << 10,
        staging_buffers: 2,
    }));
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "ping_pong.dat");
    let threads = 3;
    let rounds = 500;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let backend = backend.clone();
            scope.spawn(move || {
                let offset = t as u64 * SLOT;
                let data = Memory::with_pattern(MemKind::HostAligned, 4096, 7 + t as u64, offset);
                let back = Memory::new(MemKind::HostAligned, 4096);
                for round in 0..rounds {
                    let (op, mem) = if round % 2 == 0 {
                        (IoOp::Write, &data)
                    } else {
                        (IoOp::Read, &back)
                    };
                    let ticket = submit(&backend, target, op, offset, mem);
                    match ticket.wait_timeout(std::time::Duration::from_secs(10)) {
                        Ok(result) => assert_eq!(result.unwrap(), 4096, "round {round} of thread {t}"),
                        Err(_) => panic!("round {round} of thread {t} did not complete: a lost wake-up"),
                    }
                }
                back.assert_pattern(7 + t as u64, offset, "the last read");
            });
        }
    });
}
