//! The engine and the striped set over storage that misbehaves ([`FaultyBackend`], and a
//! backend here that moves nothing or a little at a time). Nothing here depends on timing.
//!
//! - Short counts: never success; the rest is submitted again and the round trip is
//!   byte-exact, or the work fails the way a failed I/O does — a write keeps its tensors in
//!   their own memory, a read is an error to the fetch caller — and never hands back wrong
//!   bytes.
//! - Errors that may be transient (EIO): retried up to `io_retries` times and counted; past
//!   that, a write keeps its tensors in their own memory and a read fails the fetch with an
//!   error naming the target and offset.
//! - ENOSPC: the tensors stay in their own memory and are counted as resident, the extent
//!   goes back, and the engine carries on.
//! - A striped set's member that keeps failing is taken out of use: requests touching it
//!   fail at once naming it, the other members serve what they hold.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use spillway_runtime::engine::{Engine, EngineConfig, Handle, Region, StorageTarget, TensorKey};
use spillway_runtime::{
    pattern, Backend, BackendInfo, Device, DeviceBuffer, Error, FaultPlan, FaultyBackend, HostDevice, IoOp,
    IoRequest, MemBackend, MemRef, Member, Result, StripedBackend, Target, TargetId, TargetInfo, Ticket,
};
use spillway_runtime::{MAX_PIECE_RESUBMITS, MEMBER_FAILURE_LIMIT};

/// What [`Stingy`] does to the requests of the direction it is set for.
const PASS: u8 = 0;
/// Completes at once with `Ok(0)`, moving nothing.
const NOTHING: u8 = 1;
/// Moves at most 4096 bytes and reports that count.
const TRICKLE: u8 = 2;

/// A backend that, when told to, moves less than asked: nothing at all, or one 4096-byte
/// block at a time (more requests than the engine resubmits for). The rest passes through.
#[derive(Debug)]
struct Stingy {
    inner: Arc<dyn Backend>,
    writes: AtomicU8,
    reads: AtomicU8,
}

impl Stingy {
    fn new(inner: Arc<dyn Backend>) -> Arc<Stingy> {
        Arc::new(Stingy {
            inner,
            writes: AtomicU8::new(PASS),
            reads: AtomicU8::new(PASS),
        })
    }

    fn set(&self, op: IoOp, mode: u8) {
        match op {
            IoOp::Write => self.writes.store(mode, Ordering::SeqCst),
            IoOp::Read => self.reads.store(mode, Ordering::SeqCst),
        }
    }
}

impl Backend for Stingy {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        self.inner.open(target)
    }
    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        let mode = match req.op {
            IoOp::Write => &self.writes,
            IoOp::Read => &self.reads,
        };
        let take = match mode.load(Ordering::SeqCst) {
            NOTHING => return Ok(Ticket::ready(Ok(0))),
            TRICKLE => req.mem.len().min(4096),
            _ => req.mem.len(),
        };
        let req = IoRequest {
            mem: req.mem.slice(0, take),
            ..req
        };
        // SAFETY: forwarded contract, on a prefix of the caller's memory.
        unsafe { self.inner.submit(req) }
    }
    fn flush(&self, target: TargetId) -> Result<()> {
        self.inner.flush(target)
    }
    fn close(&self, target: TargetId) -> Result<()> {
        self.inner.close(target)
    }
}

fn host_device() -> Arc<dyn Device> {
    Arc::new(HostDevice::new())
}

fn mem_backend(dev: &Arc<dyn Device>) -> Arc<MemBackend> {
    Arc::new(MemBackend::new(dev.clone()).unwrap())
}

fn faulty(inner: Arc<dyn Backend>, plan: &str) -> Arc<FaultyBackend> {
    Arc::new(FaultyBackend::new(inner, FaultPlan::parse(plan).unwrap()).unwrap())
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

fn engine(dev: &Arc<dyn Device>, backend: Arc<dyn Backend>) -> Engine {
    Engine::new(
        dev.clone(),
        backend,
        vec![StorageTarget::new(Target::new("/spill/short"), 1 << 30)],
        small_cfg(),
    )
    .unwrap()
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

/// Offloads `srcs[i]` under key `i`, in order.
fn offload_all(e: &Engine, srcs: &[DeviceBuffer]) -> Vec<Handle> {
    srcs.iter()
        .enumerate()
        // SAFETY: the sources outlive the engine's use of them: their handles are released
        // and the engine drained before they go.
        .map(|(i, s)| unsafe { e.offload(TensorKey::new(i as u64, 0), &region(s), None).unwrap() })
        .collect()
}

/// Fetches `h` into a poisoned buffer: the pattern mismatches, or the fetch's error.
fn fetch(dev: &Arc<dyn Device>, e: &Engine, h: Handle, len: usize, seed: u64) -> Result<u64> {
    let out = dev.alloc(len).unwrap();
    dev.fill_pattern(out.ptr(), len, !seed, 0).unwrap();
    // SAFETY: `out` lives until after the event is waited on (or the fetch has failed,
    // having waited for its reads).
    let ev = unsafe { e.fetch(h, &region(&out))? };
    ev.synchronize()?;
    dev.count_pattern_mismatches(out.ptr(), len, seed, 0)
}

/// Packed (small) and direct (large, 2 MiB among them) tensor sizes.
fn sizes() -> Vec<usize> {
    let mut seed = 5;
    let mut lens: Vec<usize> = (0..40)
        .map(|_| {
            seed = pattern::splitmix64(seed);
            1 + (seed as usize) % (200 << 10)
        })
        .collect();
    lens.extend([2 << 20, (1 << 20) + 12_345, 3 << 20, 2 << 20]);
    lens
}

/// Bytes of [`sizes`] that writes move: the engine counts whole extents, but a direct
/// tensor is written from its own memory without the padding up to the alignment.
fn bytes_written(counted: u64) -> u64 {
    let cfg = small_cfg();
    let padding: u64 = sizes()
        .iter()
        .map(|&l| l as u64)
        .filter(|&l| l >= cfg.pack_threshold)
        .map(|l| l.next_multiple_of(cfg.alignment) - l)
        .sum();
    counted - padding
}

/// Offloads [`sizes`] through `e`, drains, poisons the sources, prefetches every other
/// tensor and fetches them all back: returns the handles, lengths and what each fetch gave.
fn round_trip(dev: &Arc<dyn Device>, e: &Engine) -> Vec<Result<u64>> {
    let lens = sizes();
    let srcs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| tensor(dev, l, i as u64))
        .collect();
    let handles = offload_all(e, &srcs);
    e.drain().unwrap();
    for (h, s) in handles.iter().zip(&srcs) {
        if e.source_released(*h).unwrap() {
            // On storage: whatever comes back must come from there.
            dev.fill_pattern(s.ptr(), s.len(), 0xdead, 0).unwrap();
        }
    }
    for &h in handles.iter().rev().step_by(2) {
        e.prefetch(h).unwrap();
    }
    let got = handles
        .iter()
        .enumerate()
        .rev()
        .map(|(i, &h)| fetch(dev, e, h, lens[i], i as u64))
        .collect();
    for h in handles {
        e.release(h).unwrap();
    }
    e.drain().unwrap();
    drop(srcs);
    got
}

/// `plan`'s short faults under the engine: every tensor goes to storage and comes back
/// byte-exact, and storage saw each byte once.
fn exact_under(plan: &str) {
    let dev = host_device();
    let mem = mem_backend(&dev);
    let faults = faulty(mem.clone(), plan);
    let e = engine(&dev, faults.clone());
    for (i, got) in round_trip(&dev, &e).into_iter().enumerate() {
        assert_eq!(got.unwrap(), 0, "{plan}: tensor {i} came back wrong");
    }
    let c = e.stats().counters;
    assert_eq!(
        (c.write_errors, c.read_errors, c.resident_tensors),
        (0, 0, 0),
        "{plan}: {c:?}"
    );
    assert_eq!(c.forwarded_fetches, 0, "{plan}: every tensor was on storage");
    assert!(c.prefetch_hits > 0 && c.demand_reads > 0, "{plan}: {c:?}");
    let s = faults.stats();
    assert!(s.injected_short > 0, "{plan}: no request was cut: {s:?}");
    assert_eq!(
        s.requests,
        c.writes + c.reads,
        "{plan}: resubmissions are counted"
    );
    assert_eq!(
        mem.written.load(Ordering::SeqCst),
        bytes_written(c.bytes_written),
        "{plan}: each byte written once, none missing"
    );
    assert_eq!(
        mem.read.load(Ordering::SeqCst),
        c.bytes_read,
        "{plan}: each byte read once, none missing"
    );
}

#[test]
fn short_reads_are_completed_and_fetches_are_byte_exact() {
    exact_under("short=1,ops=read");
    exact_under("short=0.3,ops=read,seed=3");
}

#[test]
fn short_writes_are_completed_and_tensors_reach_storage() {
    exact_under("short=1,ops=write");
    exact_under("short=0.3,ops=write,seed=4");
}

#[test]
fn short_reads_and_writes_together_round_trip_exactly() {
    exact_under("short=1");
    exact_under("short=0.3,seed=5");
}

/// Offloads one 2 MiB tensor through `e` and drains.
fn offload_one(dev: &Arc<dyn Device>, e: &Engine, key: u64, seed: u64) -> (Handle, DeviceBuffer) {
    let t = tensor(dev, 2 << 20, seed);
    // SAFETY: the caller keeps `t` until the engine is dropped.
    let h = unsafe { e.offload(TensorKey::new(key, 0), &region(&t), None).unwrap() };
    e.drain().unwrap();
    (h, t)
}

#[test]
fn a_write_that_cannot_complete_keeps_its_tensor_in_memory() {
    for mode in [NOTHING, TRICKLE] {
        let dev = host_device();
        let stingy = Stingy::new(mem_backend(&dev));
        stingy.set(IoOp::Write, mode);
        let e = engine(&dev, stingy.clone());
        let (h, _t) = offload_one(&dev, &e, 1, 7);
        let c = e.stats().counters;
        assert_eq!((c.write_errors, c.extents_written), (1, 0), "mode {mode}: {c:?}");
        assert!(
            !e.source_released(h).unwrap(),
            "mode {mode}: the only whole copy is the tensor's own memory"
        );
        assert_eq!(fetch(&dev, &e, h, 2 << 20, 7).unwrap(), 0, "mode {mode}");
        assert_eq!(e.stats().counters.forwarded_fetches, 1);
        e.release(h).unwrap();
        e.drain().unwrap();
        assert_eq!(
            e.storage_usage().used,
            0,
            "mode {mode}: the extent was given back"
        );
    }
}

#[test]
fn a_read_that_cannot_complete_fails_the_fetch_with_short_io() {
    for mode in [NOTHING, TRICKLE] {
        let dev = host_device();
        let stingy = Stingy::new(mem_backend(&dev));
        let e = engine(&dev, stingy.clone());
        let (h, t) = offload_one(&dev, &e, 1, 8);
        assert!(e.source_released(h).unwrap());
        dev.fill_pattern(t.ptr(), t.len(), 0xdead, 0).unwrap();
        stingy.set(IoOp::Read, mode);

        // On demand: the error reaches the caller.
        let err = fetch(&dev, &e, h, 2 << 20, 8).expect_err("no wrong bytes");
        match &err {
            Error::ShortIo { op, path, wanted, .. } => {
                assert_eq!(
                    (*op, path.to_str(), *wanted),
                    ("read", Some("/spill/short"), 2 << 20)
                )
            }
            other => panic!("mode {mode}: not a short read: {other}"),
        }
        assert_eq!(e.stats().counters.read_errors, 1, "mode {mode}");

        // Read ahead: the failed prefetch is counted, the fetch reads on demand and fails.
        e.prefetch(h).unwrap();
        e.drain().unwrap();
        assert_eq!(e.stats().counters.read_errors, 2, "mode {mode}");
        assert!(matches!(
            fetch(&dev, &e, h, 2 << 20, 8),
            Err(Error::ShortIo { .. })
        ));

        // Whole reads again: the same tensor comes back intact.
        stingy.set(IoOp::Read, PASS);
        e.prefetch(h).unwrap();
        assert_eq!(fetch(&dev, &e, h, 2 << 20, 8).unwrap(), 0, "mode {mode}");
        e.release(h).unwrap();
    }
}

/// A set of three members over memory backends, each behind a [`FaultyBackend`] with
/// `plan` (seeded per member); "/m0", "/m1", "/m2".
fn faulty_set(plan: &str) -> (StripedBackend, Vec<Arc<MemBackend>>, Vec<Arc<FaultyBackend>>) {
    let dev = host_device();
    let mems: Vec<_> = (0..3).map(|_| mem_backend(&dev)).collect();
    let faults: Vec<_> = mems
        .iter()
        .enumerate()
        .map(|(i, m)| faulty(m.clone(), &format!("{plan},seed={}", 100 + i)))
        .collect();
    let members = faults
        .iter()
        .enumerate()
        .map(|(i, f)| Member {
            target: Target::new(format!("/m{i}")),
            backend: f.clone(),
        })
        .collect();
    let set = StripedBackend::new("set", members, 16 << 10).unwrap();
    (set, mems, faults)
}

fn io(b: &dyn Backend, id: TargetId, op: IoOp, offset: u64, buf: &mut [u8]) -> Result<usize> {
    let req = IoRequest {
        target: id,
        op,
        offset,
        mem: MemRef::Host {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        },
    };
    // SAFETY: the buffer outlives the wait, and nothing touches it meanwhile.
    unsafe { b.submit(req) }?.wait()
}

/// Ranges of the set, some within one unit, most across several members.
fn ranges() -> Vec<(u64, usize)> {
    let mut seed = 9;
    (0..60)
        .map(|_| {
            seed = pattern::splitmix64(seed);
            let offset = (seed >> 32) % (1 << 20);
            seed = pattern::splitmix64(seed);
            (offset, 1 + (seed as usize) % (200 << 10))
        })
        .collect()
}

#[test]
fn a_striped_set_over_short_members_round_trips_exactly_and_counts_what_moved() {
    for plan in ["short=1", "short=0.3"] {
        let (set, mems, faults) = faulty_set(plan);
        let (id, _) = set.open(&Target::new("set")).unwrap();
        let (mut written, mut read) = (0u64, 0u64);
        for (i, &(offset, len)) in ranges().iter().enumerate() {
            let mut data = vec![0u8; len];
            pattern::fill(&mut data, i as u64, 0);
            assert_eq!(
                io(&set, id, IoOp::Write, offset, &mut data).unwrap(),
                len,
                "{plan}"
            );
            let mut back = vec![0xA5u8; len];
            assert_eq!(
                io(&set, id, IoOp::Read, offset, &mut back).unwrap(),
                len,
                "{plan}"
            );
            assert_eq!(
                pattern::first_mismatch(&back, i as u64, 0),
                None,
                "{plan}: range {i}"
            );
            written += len as u64;
            read += len as u64;
        }
        let stats = set.member_stats();
        for ((s, m), f) in stats.iter().zip(&mems).zip(&faults) {
            assert_eq!(s.bytes_written, m.written.load(Ordering::SeqCst), "{plan}: {s:?}");
            assert_eq!(s.bytes_read, m.read.load(Ordering::SeqCst), "{plan}: {s:?}");
            assert_eq!((s.errors, s.requests), (0, f.stats().requests), "{plan}: {s:?}");
        }
        assert_eq!(
            stats.iter().map(|s| s.bytes_written).sum::<u64>(),
            written,
            "{plan}"
        );
        assert_eq!(stats.iter().map(|s| s.bytes_read).sum::<u64>(), read, "{plan}");
        let cut: u64 = faults.iter().map(|f| f.stats().injected_short).sum();
        assert!(cut > 0, "{plan}: no piece was cut");
    }
}

#[test]
fn a_member_that_cannot_complete_a_piece_fails_the_set_request_naming_it() {
    const STRIPE: usize = 1 << 20;
    let dev = host_device();
    let mems: Vec<_> = (0..2).map(|_| mem_backend(&dev)).collect();
    let stingy: Vec<_> = mems.iter().map(|m| Stingy::new(m.clone())).collect();
    let members = stingy
        .iter()
        .enumerate()
        .map(|(i, s)| Member {
            target: Target::new(format!("/m{i}")),
            backend: s.clone(),
        })
        .collect();
    let set = StripedBackend::new("set", members, STRIPE as u64).unwrap();
    let (id, _) = set.open(&Target::new("set")).unwrap();
    let mut data = vec![0u8; 2 * STRIPE];
    pattern::fill(&mut data, 1, 0);
    assert_eq!(io(&set, id, IoOp::Write, 0, &mut data).unwrap(), 2 * STRIPE);

    // Member 1's piece (the second unit): nothing moved, or 4096 bytes per submission, which
    // runs out of resubmissions long before its 1 MiB has moved.
    let trickled = 4096 * (u64::from(MAX_PIECE_RESUBMITS) + 1);
    for (mode, done) in [(NOTHING, 0), (TRICKLE, trickled)] {
        stingy[1].set(IoOp::Read, mode);
        let mut back = vec![0u8; 2 * STRIPE];
        match io(&set, id, IoOp::Read, 0, &mut back).unwrap_err() {
            Error::ShortIo {
                op,
                path,
                offset,
                done: d,
                wanted,
            } => assert_eq!(
                (op, path.to_str(), offset, d, wanted),
                ("read", Some("/m1"), 0, done, STRIPE as u64),
                "mode {mode}"
            ),
            other => panic!("mode {mode}: not a short read: {other}"),
        }
    }
    stingy[1].set(IoOp::Read, PASS);
    let mut back = vec![0u8; 2 * STRIPE];
    assert_eq!(io(&set, id, IoOp::Read, 0, &mut back).unwrap(), 2 * STRIPE);
    assert_eq!(back, data);

    let stats = set.member_stats();
    assert_eq!((stats[0].errors, stats[1].errors), (0, 2), "{stats:?}");
    for (s, m) in stats.iter().zip(&mems) {
        assert_eq!(s.bytes_read, m.read.load(Ordering::SeqCst), "{s:?}");
    }
    assert_eq!(stats[1].bytes_read, trickled + STRIPE as u64);
}

#[test]
fn the_engine_over_a_striped_set_of_short_members_round_trips_exactly() {
    let dev = host_device();
    let (set, mems, _) = faulty_set("short=0.5");
    let e = Engine::new(
        dev.clone(),
        Arc::new(set),
        vec![StorageTarget::new(Target::new("set"), 1 << 30)],
        small_cfg(),
    )
    .unwrap();
    for (i, got) in round_trip(&dev, &e).into_iter().enumerate() {
        assert_eq!(got.unwrap(), 0, "tensor {i} came back wrong");
    }
    let c = e.stats().counters;
    assert_eq!((c.write_errors, c.read_errors), (0, 0), "{c:?}");
    let written: u64 = mems.iter().map(|m| m.written.load(Ordering::SeqCst)).sum();
    assert_eq!(written, bytes_written(c.bytes_written));
}

/// [`small_cfg`] with `io_retries` retries, packed extents sealed only when full or drained
/// (never by the clock), and packing on or off.
fn retry_cfg(io_retries: u32, pack: bool) -> EngineConfig {
    EngineConfig {
        io_retries,
        pack,
        pack_flush_delay: std::time::Duration::from_secs(3600),
        ..small_cfg()
    }
}

fn engine_with(dev: &Arc<dyn Device>, backend: Arc<dyn Backend>, cfg: EngineConfig) -> Engine {
    Engine::new(
        dev.clone(),
        backend,
        vec![StorageTarget::new(Target::new("/spill/short"), 1 << 30)],
        cfg,
    )
    .unwrap()
}

/// Under `plan` (errors at 30%) with enough retries that no request runs out of them (each
/// gives up with probability 0.3^11, about 2e-6): every tensor reaches storage and comes
/// back byte-exact, and the retries are counted. Packing off: one write per tensor, so
/// that dozens of requests draw their fate and some surely fail.
fn exact_with_retries(plan: &str) -> spillway_runtime::engine::CounterSnapshot {
    let dev = host_device();
    let mem = mem_backend(&dev);
    let faults = faulty(mem.clone(), plan);
    let e = engine_with(&dev, faults.clone(), retry_cfg(10, false));
    for (i, got) in round_trip(&dev, &e).into_iter().enumerate() {
        assert_eq!(got.unwrap(), 0, "{plan}: tensor {i} came back wrong");
    }
    let c = e.stats().counters;
    assert_eq!(
        (
            c.write_errors,
            c.read_errors,
            c.resident_tensors,
            c.forwarded_fetches
        ),
        (0, 0, 0, 0),
        "{plan}: every tensor went to storage and came back from there: {c:?}"
    );
    let s = faults.stats();
    assert_eq!(
        s.injected_write_errors, c.write_retries,
        "{plan}: each failed write was retried"
    );
    assert_eq!(
        s.injected_read_errors, c.read_retries,
        "{plan}: each failed read was retried"
    );
    assert_eq!(s.requests, c.writes + c.reads, "{plan}: retries are requests too");
    assert_eq!(
        mem.written.load(Ordering::SeqCst),
        sizes().iter().map(|&l| l as u64).sum::<u64>(),
        "{plan}: a failed write wrote nothing, a retried one everything (unpacked: no padding)"
    );
    c
}

#[test]
fn transient_write_errors_are_retried_and_every_tensor_round_trips() {
    let c = exact_with_retries("write_error=0.3,seed=11");
    assert!(c.write_retries > 0, "{c:?}");
    assert_eq!(c.read_retries, 0);
}

#[test]
fn transient_read_errors_are_retried_and_every_fetch_is_byte_exact() {
    let c = exact_with_retries("read_error=0.3,seed=12");
    assert!(c.read_retries > 0, "{c:?}");
    assert_eq!(c.write_retries, 0);
    assert!(
        c.prefetch_hits > 0 && c.demand_reads > 0,
        "both read paths: {c:?}"
    );
    let c = exact_with_retries("error=0.3,seed=13");
    assert!(c.read_retries > 0 && c.write_retries > 0, "{c:?}");
}

#[test]
fn writes_that_always_fail_keep_every_tensor_in_its_memory_after_the_retries() {
    let dev = host_device();
    let mem = mem_backend(&dev);
    let faults = faulty(mem.clone(), "write_error=1");
    let e = engine_with(&dev, faults.clone(), retry_cfg(3, true));
    let lens = sizes();
    let srcs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| tensor(&dev, l, i as u64))
        .collect();
    let handles = offload_all(&e, &srcs);
    e.drain().unwrap();
    let c = e.stats().counters;
    assert!(c.write_errors > 0 && c.extents_written == 0, "{c:?}");
    assert_eq!(
        c.writes,
        4 * (c.writes / 4),
        "each request made 1 + 3 attempts: {c:?}"
    );
    assert_eq!(c.write_retries, 3 * c.writes / 4, "{c:?}");
    assert_eq!(
        c.write_errors,
        c.writes / 4,
        "one write per extent, each given up once: {c:?}"
    );
    assert_eq!(
        (c.resident_tensors, c.no_space_errors),
        (0, 0),
        "storage is not full"
    );
    assert_eq!(mem.written.load(Ordering::SeqCst), 0);
    assert_eq!(e.storage_usage().used, 0, "every extent went back");
    assert_eq!(e.staging_in_use(), 0, "and the packing staging");
    for (i, &h) in handles.iter().enumerate().rev() {
        assert!(!e.source_released(h).unwrap(), "tensor {i} is only in its memory");
        e.prefetch(h).unwrap();
        assert_eq!(fetch(&dev, &e, h, lens[i], i as u64).unwrap(), 0, "tensor {i}");
    }
    let c = e.stats().counters;
    assert_eq!(c.forwarded_fetches, lens.len() as u64);
    assert_eq!((c.reads, c.read_errors), (0, 0));
    for h in handles {
        e.release(h).unwrap();
    }
    e.drain().unwrap();
}

#[test]
fn enospc_keeps_the_tensor_resident_gives_its_extent_back_and_the_engine_carries_on() {
    let dev = host_device();
    let mem = mem_backend(&dev);
    // Room for 3 MiB of writes in all, ever: a device that fills up and stays full.
    let faults = faulty(mem.clone(), "enospc_after=3MiB");
    let e = engine_with(&dev, faults.clone(), retry_cfg(3, true));
    let (a, ta) = offload_one(&dev, &e, 1, 1);
    assert!(e.source_released(a).unwrap(), "the first 2 MiB fit");
    let (b, _tb) = offload_one(&dev, &e, 2, 2);
    let c = e.stats().counters;
    assert_eq!(
        (c.no_space_errors, c.write_errors, c.write_retries),
        (1, 1, 0),
        "ENOSPC is counted and not retried: {c:?}"
    );
    assert_eq!((c.resident_tensors, c.resident_bytes), (1, 2 << 20), "{c:?}");
    assert!(!e.source_released(b).unwrap(), "kept in its own memory");
    assert_eq!(
        e.storage_usage().used,
        2 << 20,
        "the failed write's extent was given back"
    );
    assert_eq!(faults.stats().injected_enospc, 1);

    // Both come back exactly: one from storage, one from its own memory.
    dev.fill_pattern(ta.ptr(), ta.len(), 0xdead, 0).unwrap();
    assert_eq!(fetch(&dev, &e, a, 2 << 20, 1).unwrap(), 0);
    assert_eq!(fetch(&dev, &e, b, 2 << 20, 2).unwrap(), 0);
    assert_eq!(e.stats().counters.forwarded_fetches, 1);
    e.release(a).unwrap();
    e.release(b).unwrap();
    e.drain().unwrap();
    assert_eq!(e.storage_usage().used, 0);

    // After the releases the engine goes on offloading: what still fits on the device is
    // written (into the space given back), what does not stays resident, and a packed
    // extent fails the same way.
    let (c1, tc) = offload_one(&dev, &e, 3, 3);
    assert!(!e.source_released(c1).unwrap(), "2 MiB more do not fit");
    let small = tensor(&dev, 1 << 20, 4);
    let tiny = tensor(&dev, 100 << 10, 5);
    // SAFETY: the tensors outlive the engine's use of them.
    let (d, t) = unsafe {
        (
            e.offload(TensorKey::new(4, 0), &region(&small), None).unwrap(),
            e.offload(TensorKey::new(5, 0), &region(&tiny), None).unwrap(),
        )
    };
    e.drain().unwrap();
    assert!(e.source_released(d).unwrap(), "1 MiB still fits");
    assert_eq!(
        e.storage_usage().used,
        1 << 20,
        "only what was written holds space"
    );
    assert!(!e.source_released(t).unwrap(), "nothing more fits");
    let c = e.stats().counters;
    assert_eq!((c.no_space_errors, c.resident_tensors), (3, 3), "{c:?}");
    assert_eq!(e.staging_in_use(), 0, "the packed extent's staging went back");
    dev.fill_pattern(small.ptr(), small.len(), 0xdead, 0).unwrap();
    assert_eq!(fetch(&dev, &e, d, 1 << 20, 4).unwrap(), 0);
    assert_eq!(fetch(&dev, &e, t, 100 << 10, 5).unwrap(), 0);
    assert_eq!(fetch(&dev, &e, c1, 2 << 20, 3).unwrap(), 0);
    for h in [c1, d, t] {
        e.release(h).unwrap();
    }
    e.drain().unwrap();
    assert_eq!(e.storage_usage().used, 0);
    drop((tc, small, tiny));
}

#[test]
fn reads_that_always_fail_are_an_error_naming_the_target_and_offset_never_wrong_bytes() {
    let dev = host_device();
    let mem = mem_backend(&dev);
    let faults = faulty(mem.clone(), "read_error=1,ops=read");
    let e = engine_with(&dev, faults.clone(), retry_cfg(3, true));
    let (first, t1) = offload_one(&dev, &e, 1, 1);
    let (h, t) = offload_one(&dev, &e, 2, 2);
    assert!(e.source_released(first).unwrap() && e.source_released(h).unwrap());
    dev.fill_pattern(t1.ptr(), t1.len(), 0xdead, 0).unwrap();
    dev.fill_pattern(t.ptr(), t.len(), 0xdead, 0).unwrap();
    let offset = 2 << 20; // the second extent, after the first

    let check = |e: Error| match e {
        Error::Io { context, source } => {
            assert_eq!(source.raw_os_error(), Some(libc::EIO), "{context}");
            assert!(
                context.starts_with(&format!(
                    "read of {} bytes at offset {offset} of /spill/short, given up after 3 retries: ",
                    2 << 20
                )),
                "{context}"
            );
        }
        other => panic!("not the read's EIO: {other}"),
    };
    // Read ahead: the prefetch fails after its retries, the fetch reads on demand, which
    // fails after its own.
    e.prefetch(h).unwrap();
    check(fetch(&dev, &e, h, 2 << 20, 2).expect_err("no wrong bytes"));
    let c = e.stats().counters;
    assert_eq!((c.read_errors, c.read_retries, c.reads), (2, 6, 8), "{c:?}");
    assert_eq!(c.prefetch_hits, 0);
    // On demand alone.
    check(fetch(&dev, &e, h, 2 << 20, 2).expect_err("no wrong bytes"));
    assert_eq!(e.stats().counters.read_errors, 3);
    // The bytes are still on storage, intact.
    for h in [first, h] {
        e.release(h).unwrap();
    }
    e.drain().unwrap();
    assert_eq!(faults.stats().injected_read_errors, 12);
}

/// A set of three members over memory backends, member 1 behind a [`FaultyBackend`] that
/// fails every write; "/m0", "/m1", "/m2" in `stripe`-byte units.
fn set_with_failing_writes(stripe: u64) -> (StripedBackend, Vec<Arc<MemBackend>>, Arc<FaultyBackend>) {
    let dev = host_device();
    let mems: Vec<_> = (0..3).map(|_| mem_backend(&dev)).collect();
    let failing = faulty(mems[1].clone(), "write_error=1");
    let members = mems
        .iter()
        .enumerate()
        .map(|(i, m)| Member {
            target: Target::new(format!("/m{i}")),
            backend: if i == 1 {
                failing.clone() as Arc<dyn Backend>
            } else {
                m.clone() as Arc<dyn Backend>
            },
        })
        .collect();
    let set = StripedBackend::new("set", members, stripe).unwrap();
    (set, mems, failing)
}

#[test]
fn a_member_whose_writes_always_fail_is_taken_out_of_use_and_the_others_serve_their_data() {
    const STRIPE: u64 = 16 << 10;
    let s = STRIPE as usize;
    let (set, _mems, failing) = set_with_failing_writes(STRIPE);
    let (id, _) = set.open(&Target::new("set")).unwrap();
    let mut data = vec![0u8; 3 * s];
    pattern::fill(&mut data, 1, 0);
    for unit in [0, 2] {
        let at = unit * s;
        io(&set, id, IoOp::Write, at as u64, &mut data[at..at + s]).unwrap();
    }
    for attempt in 1..=MEMBER_FAILURE_LIMIT {
        let e = io(&set, id, IoOp::Write, STRIPE, &mut data[s..2 * s]).unwrap_err();
        assert!(e.to_string().contains("of /m1"), "attempt {attempt}: {e}");
    }
    let stats = set.member_stats();
    assert_eq!(
        stats.iter().map(|m| m.failed).collect::<Vec<_>>(),
        [false, true, false]
    );
    assert_eq!(stats[1].errors, u64::from(MEMBER_FAILURE_LIMIT));
    let seen = failing.stats().requests;

    let e = io(&set, id, IoOp::Write, 0, &mut data).unwrap_err();
    assert!(
        matches!(&e, Error::Storage { target, .. } if target == "/m1 (member 1 of the striped set set)"),
        "{e}"
    );
    let mut back = vec![0u8; 3 * s];
    let e = io(&set, id, IoOp::Read, 0, &mut back).unwrap_err();
    assert!(e.to_string().contains("taken out of use"), "{e}");
    assert_eq!(failing.stats().requests, seen, "nothing more reached member 1");
    for unit in [0, 2] {
        let at = unit * s;
        io(&set, id, IoOp::Read, at as u64, &mut back[at..at + s]).unwrap();
        assert_eq!(back[at..at + s], data[at..at + s], "unit {unit}");
    }
}

#[test]
fn the_engine_over_a_set_with_a_failing_member_keeps_tensors_resident_and_serves_the_rest() {
    const STRIPE: u64 = 16 << 10;
    let dev = host_device();
    let (set, _mems, _failing) = set_with_failing_writes(STRIPE);
    let set = Arc::new(set);
    // Unpacked 4 KiB tensors, each an extent of its own: those placed on members 0 and 2
    // reach storage, those on member 1 fail (retried, until it is taken out of use, then at
    // once) and stay in their own memory.
    let e = Engine::new(
        dev.clone(),
        set.clone(),
        vec![StorageTarget::new(Target::new("set"), 1 << 30)],
        retry_cfg(3, false),
    )
    .unwrap();
    let srcs: Vec<_> = (0..48).map(|i| tensor(&dev, 4096, i)).collect();
    let handles = offload_all(&e, &srcs);
    e.drain().unwrap();
    let stats = set.member_stats();
    assert!(
        stats[1].failed && !stats[0].failed && !stats[2].failed,
        "{stats:?}"
    );
    let c = e.stats().counters;
    assert!(c.write_errors > 0 && c.extents_written > 0, "{c:?}");
    let mut on_storage = 0;
    for (h, s) in handles.iter().zip(&srcs) {
        if e.source_released(*h).unwrap() {
            on_storage += 1;
            dev.fill_pattern(s.ptr(), s.len(), 0xdead, 0).unwrap();
        }
    }
    assert_eq!(on_storage, c.extents_written, "{c:?}");
    assert_eq!(on_storage + c.write_errors, 48, "{c:?}");
    for (i, &h) in handles.iter().enumerate() {
        assert_eq!(fetch(&dev, &e, h, 4096, i as u64).unwrap(), 0, "tensor {i}");
    }
    let c = e.stats().counters;
    assert_eq!(c.read_errors, 0, "every read was of a healthy member");
    assert_eq!(c.forwarded_fetches, c.write_errors);
    for h in handles {
        e.release(h).unwrap();
    }
    e.drain().unwrap();
}
