//! Concurrent requests with disjoint bytes that share partial blocks: each write of a partial
//! block reads, patches and writes back the whole block, and must not undo the bytes another
//! write put in the same block, whichever rings the two run on.

mod common;

use std::collections::VecDeque;
use std::ops::Range;

use common::{backend, open_direct, submit, MemKind, Memory};
use spillway_runtime::{pattern, Backend, IoOp, TargetId};
use spillway_uring::{UringBackend, UringConfig};

/// Threads submitting at once.
const SUBMITTERS: usize = 4;
/// Requests each submitting thread keeps in flight.
const IN_FLIGHT: usize = 8;

/// `threads` rings of queue depth 8, with 64 KiB chunks.
fn config(threads: usize) -> UringConfig {
    UringConfig {
        queue_depth: 8,
        threads,
        chunk_size: 64 << 10,
        staging_buffers: 0,
    }
}

/// Consecutive byte ranges from `start` to `end`, with lengths taken in turn from `sizes`.
fn end_to_end(start: u64, end: u64, sizes: &[u64]) -> Vec<Range<u64>> {
    let mut ranges = Vec::new();
    let mut at = start;
    for &size in sizes.iter().cycle() {
        if at >= end {
            break;
        }
        let next = (at + size).min(end);
        ranges.push(at..next);
        at = next;
    }
    ranges
}

/// One request of `op` for each of `ranges`, request `i` through memory of kind
/// `kinds[i % kinds.len()]`, the bytes being the pattern for `seed`.
struct Job<'a> {
    op: IoOp,
    ranges: &'a [Range<u64>],
    kinds: &'a [MemKind],
    seed: u64,
}

/// Runs the requests of `job` from [`SUBMITTERS`] threads (request `i` from thread `i %
/// SUBMITTERS`, so neighbours run at the same time), each keeping [`IN_FLIGHT`] in flight.
/// Writes carry the pattern for `seed`; reads are checked against it.
fn run_concurrently(backend: &UringBackend, target: TargetId, job: &Job<'_>) {
    std::thread::scope(|scope| {
        for submitter in 0..SUBMITTERS {
            scope.spawn(move || {
                let mut in_flight = VecDeque::new();
                let finish = |(mem, ticket, range): (Memory, spillway_runtime::Ticket, Range<u64>)| {
                    let len = (range.end - range.start) as usize;
                    let what = format!("{} of bytes {range:?}", job.op.as_str());
                    assert_eq!(ticket.wait().unwrap_or_else(|e| panic!("{what}: {e}")), len);
                    if job.op == IoOp::Read {
                        mem.assert_pattern(job.seed, range.start, &what);
                    }
                };
                for i in (submitter..job.ranges.len()).step_by(SUBMITTERS) {
                    let range = job.ranges[i].clone();
                    let kind = job.kinds[i % job.kinds.len()];
                    let len = (range.end - range.start) as usize;
                    let mem = match job.op {
                        IoOp::Write => Memory::with_pattern(kind, len, job.seed, range.start),
                        IoOp::Read => Memory::new(kind, len),
                    };
                    let ticket = submit(backend, target, job.op, range.start, &mem);
                    in_flight.push_back((mem, ticket, range));
                    if in_flight.len() >= IN_FLIGHT {
                        finish(in_flight.pop_front().unwrap());
                    }
                }
                in_flight.into_iter().for_each(finish);
            });
        }
    });
}

/// Reads `range` in one request and says how it differs from the pattern for `seed`, if it
/// does.
fn lost_bytes(backend: &UringBackend, target: TargetId, range: Range<u64>, seed: u64) -> Option<String> {
    let whole = Memory::new(MemKind::HostAligned, (range.end - range.start) as usize);
    common::run(backend, target, IoOp::Read, range.start, &whole).unwrap();
    let first = common::first_difference(whole.bytes(), seed, range.start)?;
    Some(format!(
        "{} of {} bytes were lost; the first at offset {}",
        pattern::count_mismatches(whole.bytes(), seed, range.start),
        whole.bytes().len(),
        range.start + first as u64
    ))
}

#[test]
fn odd_writes_laid_end_to_end_keep_each_others_bytes() {
    // Every boundary between two requests falls inside a block, so every request shares its
    // first and last blocks with its neighbours.
    let ranges = end_to_end(1, 600_000, &[4097, 511, 1, 12345, 4095, 3, 8193, 1023, 7]);
    let mut failures = Vec::new();
    for threads in 2..=4 {
        for kinds in [[MemKind::HostAligned], [MemKind::Device]] {
            let backend = backend(config(threads));
            let dir = tempfile::tempdir().unwrap();
            let target = open_direct(&backend, &dir, "end-to-end.dat");
            let seed = 10 + threads as u64;
            let write = Job {
                op: IoOp::Write,
                ranges: &ranges,
                kinds: &kinds,
                seed,
            };
            run_concurrently(&backend, target, &write);
            if let Some(lost) = lost_bytes(&backend, target, 1..600_000, seed) {
                failures.push(format!("{:?} memory on {threads} rings: {lost}", kinds[0]));
            }
            backend.close(target).unwrap();
        }
    }
    assert!(
        failures.is_empty(),
        "{} writes laid end to end:\n{}",
        ranges.len(),
        failures.join("\n")
    );
}

#[test]
fn tiny_writes_of_mixed_memory_fill_two_blocks() {
    // Hundreds of writes of a few bytes each into the same two blocks: nearly every one waits
    // for the block lock, on all four rings.
    let ranges = end_to_end(1000, 7000, &[1, 2, 3, 5, 7, 11]);
    let kinds = [MemKind::HostAligned, MemKind::Device, MemKind::HostMisaligned];
    let backend = backend(config(4));
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "tiny.dat");
    let write = Job {
        op: IoOp::Write,
        ranges: &ranges,
        kinds: &kinds,
        seed: 20,
    };
    run_concurrently(&backend, target, &write);
    if let Some(lost) = lost_bytes(&backend, target, 1000..7000, 20) {
        panic!("{} tiny writes: {lost}", ranges.len());
    }
}

#[test]
fn partial_reads_beside_concurrent_writes_see_steady_bytes() {
    // The file holds pattern 30. Then the even ranges are rewritten with pattern 31 while the
    // odd ranges, which share blocks with them, are read: the reads must see pattern 30
    // throughout, and the rewrites must not disturb the odd ranges.
    let (start, end) = (3, 300_000);
    let ranges = end_to_end(start, end, &[4097, 511, 1, 12345, 4095]);
    let even: Vec<_> = ranges.iter().step_by(2).cloned().collect();
    let odd: Vec<_> = ranges.iter().skip(1).step_by(2).cloned().collect();
    let kinds = [MemKind::HostAligned, MemKind::Device];
    let backend = backend(config(3));
    let dir = tempfile::tempdir().unwrap();
    let target = open_direct(&backend, &dir, "steady.dat");
    let old = Memory::with_pattern(MemKind::HostAligned, (end - start) as usize, 30, start);
    common::run(&backend, target, IoOp::Write, start, &old).unwrap();

    std::thread::scope(|scope| {
        scope.spawn(|| {
            let read = Job {
                op: IoOp::Read,
                ranges: &odd,
                kinds: &kinds,
                seed: 30,
            };
            run_concurrently(&backend, target, &read);
        });
        let write = Job {
            op: IoOp::Write,
            ranges: &even,
            kinds: &kinds,
            seed: 31,
        };
        run_concurrently(&backend, target, &write);
    });

    let whole = Memory::new(MemKind::HostAligned, (end - start) as usize);
    common::run(&backend, target, IoOp::Read, start, &whole).unwrap();
    for (i, range) in ranges.iter().enumerate() {
        let seed = if i % 2 == 0 { 31 } else { 30 };
        let bytes = &whole.bytes()[(range.start - start) as usize..(range.end - start) as usize];
        assert_eq!(
            pattern::first_mismatch(bytes, seed, range.start),
            None,
            "bytes {range:?} should hold pattern {seed}"
        );
    }
}
