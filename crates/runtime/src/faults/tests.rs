//! The fault injector against [`MemBackend`], which records what reached "storage" byte for
//! byte. Nothing here asserts an upper bound on time: a delay is checked by "not done while
//! the delay cannot have passed, done after".

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::{HostDevice, MemBackend, MemRef};

const N: usize = 10_000;

fn mem() -> Arc<MemBackend> {
    Arc::new(MemBackend::new(Arc::new(HostDevice::new())).unwrap())
}

fn wrap(mem: &Arc<MemBackend>, plan: &str) -> FaultyBackend {
    FaultyBackend::new(mem.clone(), FaultPlan::parse(plan).unwrap()).unwrap()
}

fn host(buf: &mut [u8]) -> MemRef {
    MemRef::Host {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    }
}

/// Starts an I/O on `buf`.
///
/// # Safety
/// `buf` must outlive the ticket's completion and not be touched before it.
unsafe fn start(b: &dyn Backend, id: TargetId, op: IoOp, offset: u64, buf: &mut [u8]) -> Result<Ticket> {
    let req = IoRequest {
        target: id,
        op,
        offset,
        mem: host(buf),
    };
    // SAFETY: the caller's promise, passed on.
    unsafe { b.submit(req) }
}

fn io(b: &dyn Backend, id: TargetId, op: IoOp, offset: u64, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: the buffer outlives the wait, and nothing touches it meanwhile.
    unsafe { start(b, id, op, offset, buf) }?.wait()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

fn errno(e: &Error) -> Option<i32> {
    match e {
        Error::Io { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// Every request is counted once, in one outcome.
fn check_sums(s: &FaultStats) {
    assert_eq!(
        s.requests,
        s.passed + s.injected_read_errors + s.injected_write_errors + s.injected_enospc + s.injected_short,
        "{s:?}"
    );
}

/// Runs `n` requests of `len` bytes one after the other; how many failed.
fn run_many(b: &FaultyBackend, mem: &MemBackend, op: IoOp, n: usize, len: usize) -> usize {
    let (id, _) = b.open(&Target::new("/faulty")).unwrap();
    let mut data = pattern(len, 1);
    if op == IoOp::Read {
        assert_eq!(io(mem, id, IoOp::Write, 0, &mut data).unwrap(), len);
    }
    (0..n).filter(|_| io(b, id, op, 0, &mut data).is_err()).count()
}

#[test]
fn faults_a_zero_plan_passes_everything_through_byte_exact() {
    let mem = mem();
    let b = wrap(&mem, "none");
    assert!(b.plan().is_none());
    let (id, _) = b.open(&Target::new("/zero")).unwrap();
    let mut data = pattern(100_000, 3);
    assert_eq!(io(&b, id, IoOp::Write, 123, &mut data).unwrap(), data.len());
    assert_eq!(mem.contents(id, 123, data.len()), data);
    let mut back = vec![0u8; data.len()];
    assert_eq!(io(&b, id, IoOp::Read, 123, &mut back).unwrap(), data.len());
    assert_eq!(back, data);
    b.flush(id).unwrap();
    let s = b.stats();
    assert_eq!((s.requests, s.passed, s.bytes_written), (2, 2, 100_000));
    check_sums(&s);
    b.close(id).unwrap();
    assert!(b.close(id).is_err(), "close passes through: the target is gone");
}

#[test]
fn faults_info_names_the_wrapping() {
    let mem = mem();
    let b = wrap(&mem, "error=0.5,seed=9");
    let info = b.info();
    assert_eq!(info.name, "memory+faults");
    assert!(info
        .details
        .contains(&("faults".to_string(), "error=0.5,seed=9".to_string())));
    // The name is made once per inner name, not once per wrapper.
    assert!(std::ptr::eq(info.name, wrap(&mem, "none").info().name));
}

#[test]
fn faults_read_errors_come_at_the_rate_asked() {
    let mem = mem();
    let b = wrap(&mem, "read_error=0.1");
    let failed = run_many(&b, &mem, IoOp::Read, N, 4096);
    let s = b.stats();
    assert!((800..=1200).contains(&failed), "{failed} of {N}");
    assert_eq!(s.injected_read_errors, failed as u64);
    assert_eq!(s.injected_write_errors, 0);
    check_sums(&s);
}

#[test]
fn faults_write_errors_come_at_the_rate_asked() {
    let mem = mem();
    let b = wrap(&mem, "write_error=0.1,read_error=0.5");
    let failed = run_many(&b, &mem, IoOp::Write, N, 4096);
    let s = b.stats();
    assert!((800..=1200).contains(&failed), "{failed} of {N}");
    assert_eq!(
        (s.injected_write_errors, s.injected_read_errors),
        (failed as u64, 0)
    );
    assert_eq!(mem.written.load(Ordering::Relaxed), ((N - failed) * 4096) as u64);
    check_sums(&s);
}

#[test]
fn faults_short_requests_come_at_the_rate_asked() {
    for op in [IoOp::Read, IoOp::Write] {
        let mem = mem();
        let b = wrap(&mem, "short=0.1,seed=11");
        assert_eq!(run_many(&b, &mem, op, N, 8192), 0);
        let s = b.stats();
        assert!((800..=1200).contains(&s.injected_short), "{op:?}: {s:?}");
        check_sums(&s);
        // 8192-byte requests are cut to 4096: exactly what moved.
        let moved = match op {
            IoOp::Read => mem.read.load(Ordering::Relaxed),
            IoOp::Write => mem.written.load(Ordering::Relaxed),
        };
        assert_eq!(moved, N as u64 * 8192 - s.injected_short * 4096, "{op:?}");
    }
}

#[test]
fn faults_delays_come_at_the_rate_asked() {
    let mem = mem();
    let b = wrap(&mem, "latency=1us,latency_p=0.1");
    assert_eq!(run_many(&b, &mem, IoOp::Write, N, 512), 0);
    let s = b.stats();
    assert!((800..=1200).contains(&s.delayed), "{s:?}");
    assert_eq!(s.passed, N as u64);
}

#[test]
fn faults_the_same_seed_injects_the_same_faults() {
    let outcomes = |plan: &str| -> Vec<bool> {
        let mem = mem();
        let b = wrap(&mem, plan);
        let (id, _) = b.open(&Target::new("/seeded")).unwrap();
        let mut buf = vec![1u8; 64];
        (0..300)
            .map(|_| io(&b, id, IoOp::Write, 0, &mut buf).is_ok())
            .collect()
    };
    assert_eq!(outcomes("error=0.5,seed=3"), outcomes("error=0.5,seed=3"));
    assert_ne!(outcomes("error=0.5,seed=3"), outcomes("error=0.5,seed=4"));
    assert_eq!(
        outcomes("error=0.5"),
        outcomes(&format!("error=0.5,seed={DEFAULT_SEED}"))
    );
}

#[test]
fn faults_a_failed_read_leaves_the_buffer_alone_and_reports_eio() {
    let mem = mem();
    let b = wrap(&mem, "read_error=1");
    let (id, _) = b.open(&Target::new("/eio")).unwrap();
    let mut data = pattern(16384, 5);
    io(&*mem, id, IoOp::Write, 0, &mut data).unwrap();
    let mut buf = vec![0xAAu8; 16384];
    let err = io(&b, id, IoOp::Read, 0, &mut buf).unwrap_err();
    assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    assert!(
        err.to_string()
            .contains("injected fault: read of 16384 bytes at offset 0 of /eio"),
        "{err}"
    );
    assert!(buf.iter().all(|&x| x == 0xAA), "nothing was read into the buffer");
    assert_eq!(
        mem.read.load(Ordering::Relaxed),
        0,
        "the inner backend never saw it"
    );
}

#[test]
fn faults_a_failed_write_writes_nothing_and_reports_eio() {
    let mem = mem();
    let b = wrap(&mem, "write_error=1");
    let (id, _) = b.open(&Target::new("/eio")).unwrap();
    let mut data = pattern(8192, 6);
    let err = io(&b, id, IoOp::Write, 4096, &mut data).unwrap_err();
    assert_eq!(errno(&err), Some(libc::EIO), "{err}");
    assert_eq!(mem.written.load(Ordering::Relaxed), 0);
    assert_eq!(mem.contents(id, 0, 16384), vec![0u8; 16384]);
    let s = b.stats();
    assert_eq!((s.injected_write_errors, s.bytes_written), (1, 0));
}

#[test]
fn faults_short_reports_the_shorter_length_and_moves_only_that() {
    let mem = mem();
    let b = wrap(&mem, "short=1");
    let (id, _) = b.open(&Target::new("/short")).unwrap();
    let len = 10 * 4096 + 100;
    let mut data = pattern(len, 7);
    let n = io(&b, id, IoOp::Write, 0, &mut data).unwrap();
    assert!(n.is_multiple_of(4096) && (4096..len).contains(&n), "{n}");
    assert_eq!(mem.written.load(Ordering::Relaxed), n as u64);
    assert_eq!(mem.contents(id, 0, len)[..n], data[..n]);
    assert!(mem.contents(id, n as u64, len - n).iter().all(|&x| x == 0));

    // Reads: storage holds the whole pattern; a short read fills only its prefix.
    io(&*mem, id, IoOp::Write, 0, &mut data).unwrap();
    let mut buf = vec![0xEEu8; len];
    let n = io(&b, id, IoOp::Read, 0, &mut buf).unwrap();
    assert!(n.is_multiple_of(4096) && (4096..len).contains(&n), "{n}");
    assert_eq!(buf[..n], data[..n]);
    assert!(
        buf[n..].iter().all(|&x| x == 0xEE),
        "no byte past the short count moved"
    );

    // A request of one block or less is never cut.
    let mut small = vec![0u8; 4096];
    assert_eq!(io(&b, id, IoOp::Read, 0, &mut small).unwrap(), 4096);
    let s = b.stats();
    assert_eq!((s.injected_short, s.passed), (2, 1));
    check_sums(&s);
}

#[test]
fn faults_ops_limits_the_faults_to_one_direction() {
    let mem = mem();
    let b = wrap(&mem, "short=1,ops=read");
    let (id, _) = b.open(&Target::new("/ops")).unwrap();
    let mut data = pattern(65536, 8);
    assert_eq!(io(&b, id, IoOp::Write, 0, &mut data).unwrap(), 65536);
    assert!(io(&b, id, IoOp::Read, 0, &mut data).unwrap() < 65536);
}

#[test]
fn faults_enospc_refuses_writes_past_the_limit() {
    let mem = mem();
    let b = wrap(&mem, "enospc_after=10KiB");
    let (id, _) = b.open(&Target::new("/full")).unwrap();
    let mut eight = pattern(8192, 9);
    assert_eq!(io(&b, id, IoOp::Write, 0, &mut eight).unwrap(), 8192);
    let mut four = pattern(4096, 10);
    let err = io(&b, id, IoOp::Write, 8192, &mut four).unwrap_err();
    match &err {
        Error::NoSpace { path, offset, needed } => {
            assert_eq!((path.to_str(), *offset, *needed), (Some("/full"), 8192, 4096))
        }
        other => panic!("not ENOSPC: {other}"),
    }
    assert_eq!(
        mem.written.load(Ordering::Relaxed),
        8192,
        "the refused write moved nothing"
    );
    // What is left still takes a smaller write; reads are never refused.
    let mut two = pattern(2048, 11);
    assert_eq!(io(&b, id, IoOp::Write, 8192, &mut two).unwrap(), 2048);
    assert!(
        io(&b, id, IoOp::Write, 0, &mut [0u8; 1]).is_err(),
        "10 KiB are used up"
    );
    assert_eq!(io(&b, id, IoOp::Read, 0, &mut eight).unwrap(), 8192);
    let s = b.stats();
    assert_eq!((s.injected_enospc, s.bytes_written), (2, 10240));
    check_sums(&s);

    let none = wrap(&mem, "enospc_after=0");
    assert!(matches!(
        io(&none, id, IoOp::Write, 0, &mut two),
        Err(Error::NoSpace { .. })
    ));
}

#[test]
fn faults_latency_delays_completion_without_blocking_submit() {
    let mem = mem();
    let b = wrap(&mem, "latency=3600s");
    let (id, _) = b.open(&Target::new("/slow")).unwrap();
    let mut data = pattern(4096, 12);
    // SAFETY: `data` lives until the ticket has completed, below, and is not touched.
    let t = unsafe { start(&b, id, IoOp::Write, 0, &mut data) }.unwrap();
    // The inner write completes…
    while mem.written.load(Ordering::Relaxed) < 4096 {
        thread::sleep(Duration::from_millis(1));
    }
    // …but the ticket is held for an hour.
    assert!(!t.is_done());
    let t = t.wait_timeout(Duration::from_millis(20)).unwrap_err();
    assert_eq!(b.stats().delayed, 1);
    // Dropping the wrapper completes it at once, with the write's result.
    drop(b);
    assert_eq!(t.wait().unwrap(), 4096);

    let b = wrap(&mem, "latency=20ms");
    let started = Instant::now();
    assert_eq!(io(&b, id, IoOp::Read, 0, &mut data).unwrap(), 4096);
    assert!(started.elapsed() >= Duration::from_millis(20));
}

#[test]
fn faults_injected_errors_are_delayed_too() {
    let mem = mem();
    let b = wrap(&mem, "error=1,latency=3600s");
    let (id, _) = b.open(&Target::new("/slow")).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` lives until the ticket has completed, below, and is not touched.
    let t = unsafe { start(&b, id, IoOp::Read, 0, &mut buf) }.unwrap();
    let t = t.wait_timeout(Duration::from_millis(20)).unwrap_err();
    drop(b);
    assert_eq!(errno(&t.wait().unwrap_err()), Some(libc::EIO));
}

/// Drops `b` on another thread; fails the test rather than hang if the drop does.
fn drop_within_a_minute(b: FaultyBackend) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        drop(b);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("dropping the wrapper hung");
}

#[test]
fn faults_dropping_the_wrapper_with_delayed_tickets_neither_hangs_nor_leaks() {
    let mem = mem();
    let b = wrap(&mem, "latency=3600s");
    let (id, _) = b.open(&Target::new("/drop")).unwrap();
    let timer = b.timer.as_ref().unwrap().shared.clone();
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|i| pattern(4096, i)).collect();
    let (first, second) = bufs.split_at_mut(4);
    let submit = |i: usize, buf: &mut Vec<u8>| {
        // SAFETY: the buffers live until every ticket has completed, below.
        unsafe { start(&b, id, IoOp::Write, i as u64 * 4096, buf) }.unwrap()
    };
    // Four writes done by the inner backend, their completions held by the timer…
    let mut tickets: Vec<Ticket> = first
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| submit(i, buf))
        .collect();
    while mem.written.load(Ordering::Relaxed) < 4 * 4096 {
        thread::sleep(Duration::from_millis(1));
    }
    // …and four still inside the inner backend when the wrapper goes.
    mem.faults().gate.close();
    tickets.extend(second.iter_mut().enumerate().map(|(i, buf)| submit(4 + i, buf)));
    assert!(tickets.iter().all(|t| !t.is_done()));
    drop_within_a_minute(b);
    assert!(timer.ended.load(Ordering::SeqCst), "the timer thread has ended");
    assert!(
        tickets[..4].iter().all(Ticket::is_done),
        "the timer let go of what it held"
    );
    assert!(!tickets[4].is_done(), "held by the gate, not by the timer");
    mem.faults().gate.open();
    for t in tickets {
        assert_eq!(t.wait().unwrap(), 4096);
    }
    assert_eq!(mem.contents(id, 7 * 4096, 4096), bufs[7]);
}

#[test]
fn faults_the_last_handle_dropped_by_a_waker_on_the_timer_thread_does_not_hang() {
    let mem = mem();
    let b = Arc::new(wrap(&mem, "latency=1ms"));
    let (id, _) = b.open(&Target::new("/self")).unwrap();
    let mut buf = vec![0u8; 512];
    // Held at the gate until the waker is in place, so that the timer thread runs it.
    mem.faults().gate.close();
    // SAFETY: `buf` lives until the ticket has completed (signalled below).
    let t = unsafe { start(&*b, id, IoOp::Write, 0, &mut buf) }.unwrap();
    let (tx, rx) = mpsc::channel();
    let last = b.clone();
    drop(b);
    t.then(move |r| {
        // The last handle on the wrapper goes on the timer thread.
        drop(last);
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    mem.faults().gate.open();
    assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), Ok(512));
}

#[test]
fn faults_parse_errors_name_the_key_and_what_it_takes() {
    let err = |text: &str| FaultPlan::parse(text).unwrap_err();
    assert_eq!(
        err("read_error=2"),
        "faults: \"read_error=2\": read_error is a probability from 0 to 1"
    );
    for (text, want) in [
        ("write_error=-0.1", "write_error is a probability"),
        ("error=x", "error is a probability"),
        ("short=NaN", "short is a probability"),
        ("latency_p=1.5,latency=1ms", "latency_p is a probability"),
        ("enospc_after=12Q", "enospc_after is a size"),
        ("enospc_after=", "enospc_after is a size"),
        ("latency=2", "latency is a duration"),
        ("latency=2h", "latency is a duration"),
        ("latency=-1ms", "latency is a duration"),
        ("seed=-1", "seed is a whole number"),
        ("ops=all", "ops is one of read, write, both"),
        ("short", "expected key=value"),
        ("latency_p=0.5", "latency_p needs latency"),
        (
            "read_error=0.1,ops=write",
            "read_error has no effect with ops=write",
        ),
        (
            "enospc_after=1G,ops=read",
            "enospc_after has no effect with ops=read",
        ),
    ] {
        let e = err(text);
        assert!(e.starts_with("faults: \""), "{text}: {e}");
        assert!(e.contains(want), "{text}: {e}");
    }
    let unknown = err("read_error=0.1,bogus=1");
    assert!(unknown.contains("unknown key \"bogus\""), "{unknown}");
    assert!(unknown.contains(plan::KEYS), "{unknown}");
    let bad = FaultPlan {
        short: 2.0,
        ..FaultPlan::default()
    };
    let e = FaultyBackend::new(mem(), bad).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn faults_parse_reads_every_key() {
    let p = FaultPlan::parse(
        " read_error=0.01, write_error=0.02,short=0.05,enospc_after=1GiB,latency=2ms,latency_p=0.1,seed=7,",
    )
    .unwrap();
    assert_eq!(
        p,
        FaultPlan {
            read_error: 0.01,
            write_error: 0.02,
            short: 0.05,
            enospc_after: Some(1 << 30),
            latency: Duration::from_millis(2),
            latency_p: 0.1,
            seed: 7,
            ops: FaultOps::Both,
        }
    );
    let p = FaultPlan::parse("error=0.1,write_error=0.2,enospc_after=3KB,latency=1.5s").unwrap();
    assert_eq!((p.read_error, p.write_error), (0.1, 0.2), "later keys override");
    assert_eq!(p.enospc_after, Some(3000));
    assert_eq!(p.latency, Duration::from_millis(1500));
    assert_eq!(
        FaultPlan::parse("latency=250us").unwrap().latency,
        Duration::from_micros(250)
    );
    for empty in ["", "  ", "none", "off", "OFF"] {
        assert_eq!(
            FaultPlan::parse(empty).unwrap(),
            FaultPlan::default(),
            "{empty:?}"
        );
    }
    assert_eq!("short=0.5".parse::<FaultPlan>().unwrap().short, 0.5);
}

#[test]
fn faults_display_round_trips() {
    for text in [
        "none",
        "error=0.5",
        "read_error=0.01,write_error=0.02,short=0.05,enospc_after=1GiB,latency=2ms,latency_p=0.1,seed=7",
        "write_error=0.3,enospc_after=1000,ops=write",
        "short=1,latency=1500us,ops=read",
        "latency=7ns,latency_p=0",
        "enospc_after=0",
    ] {
        let plan = FaultPlan::parse(text).unwrap();
        assert_eq!(plan.to_string(), text);
        assert_eq!(FaultPlan::parse(&plan.to_string()).unwrap(), plan);
    }
    assert_eq!(
        FaultPlan::parse("latency=2000ms,seed=0").unwrap().to_string(),
        "latency=2s,seed=0"
    );
}

proptest! {
    #[test]
    fn faults_any_plan_round_trips(
        read in 0.0f64..=1.0,
        write in 0.0f64..=1.0,
        short in 0.0f64..=1.0,
        enospc in proptest::option::of(0u64..1 << 50),
        latency_ns in 0u64..3_600_000_000_000,
        latency_p in 0.0f64..=1.0,
        seed in any::<u64>(),
        ops in 0..3u8,
    ) {
        let plan = FaultPlan {
            read_error: if ops == 1 { 0.0 } else { read },
            write_error: if ops == 0 { 0.0 } else { write },
            short,
            enospc_after: if ops == 0 { None } else { enospc },
            latency: Duration::from_nanos(latency_ns),
            latency_p: if latency_ns == 0 { 1.0 } else { latency_p },
            seed,
            ops: [FaultOps::Read, FaultOps::Write, FaultOps::Both][ops as usize],
        };
        prop_assert_eq!(FaultPlan::parse(&plan.to_string()).unwrap(), plan);
    }
}
