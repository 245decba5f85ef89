//! Short counts: the engine and the striped set over backends whose requests come back with
//! fewer bytes than asked ([`FaultyBackend`]'s `short=P`, and a backend here that moves
//! nothing or a little at a time). A short count is never success: the rest is submitted
//! again and the round trip is byte-exact, or the work fails the way a failed I/O does —
//! a write keeps its tensors in their own memory, a read is an error to the fetch caller —
//! and never hands back wrong bytes. Nothing here depends on timing.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use spillway_runtime::engine::{Engine, EngineConfig, Handle, Region, StorageTarget, TensorKey};
use spillway_runtime::striped::MAX_PIECE_RESUBMITS;
use spillway_runtime::{
    pattern, Backend, BackendInfo, Device, DeviceBuffer, Error, FaultPlan, FaultyBackend, HostDevice, IoOp,
    IoRequest, MemBackend, MemRef, Member, Result, StripedBackend, Target, TargetId, TargetInfo, Ticket,
};

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
