//! The striped set against members in memory: layout, round trips, failures and the
//! members' health.

use super::*;
use std::time::Instant;

use crate::backend::IoOp;
use crate::{HostDevice, MemBackend, MemRef};
use proptest::prelude::*;

const STRIPE: u64 = 4096;

fn set(n: usize) -> (StripedBackend, Vec<Arc<MemBackend>>) {
    weighted_set(&vec![1; n])
}

/// A set over memory backends, one per weight, named "/m0", "/m1", ….
fn weighted_set(weights: &[u32]) -> (StripedBackend, Vec<Arc<MemBackend>>) {
    let mems: Vec<Arc<MemBackend>> = weights
        .iter()
        .map(|_| Arc::new(MemBackend::new(Arc::new(HostDevice::new())).unwrap()))
        .collect();
    let members = members_over(mems.iter().map(|m| m.clone() as Arc<dyn Backend>));
    let set = StripedBackend::weighted("set", members, STRIPE, weights).unwrap();
    (set, mems)
}

fn io(b: &StripedBackend, id: TargetId, op: IoOp, offset: u64, buf: &mut [u8]) -> Result<usize> {
    let req = IoRequest {
        target: id,
        op,
        offset,
        mem: MemRef::Host {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        },
    };
    // SAFETY: the buffer outlives the wait.
    unsafe { b.submit(req) }?.wait()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn units_are_dealt_round_robin_to_the_members() {
    let (b, mems) = set(3);
    let (id, _) = b.open(&Target::new("set")).unwrap();
    let mut data = pattern(6 * STRIPE as usize, 7);
    assert_eq!(io(&b, id, IoOp::Write, 0, &mut data).unwrap(), data.len());
    for unit in 0..6u64 {
        let (m, off) = ((unit % 3) as usize, (unit / 3) * STRIPE);
        let got = mems[m].contents(TargetId(1), off, STRIPE as usize);
        let want = &data[(unit * STRIPE) as usize..((unit + 1) * STRIPE) as usize];
        assert_eq!(got, want, "unit {unit}");
    }
    let stats = b.member_stats();
    assert!(stats
        .iter()
        .all(|s| s.bytes_written == 2 * STRIPE && s.requests == 2));
    assert_eq!(stats[1].path, PathBuf::from("/m1"));
}

#[test]
fn weights_deal_consecutive_units_per_round() {
    let (b, mems) = weighted_set(&[1, 3]);
    // Weights 1 and 3: units 0 | 1 2 3 | 4 | 5 6 7 ...
    let expect = [(0, 0), (1, 0), (1, 1), (1, 2), (0, 1), (1, 3), (1, 4), (1, 5)];
    for (unit, &(m, mu)) in expect.iter().enumerate() {
        let (member, offset, room) = b.locate(unit as u64 * STRIPE + 10);
        assert_eq!(
            (member, offset, room),
            (m, mu * STRIPE + 10, STRIPE - 10),
            "unit {unit}"
        );
    }
    let (id, _) = b.open(&Target::new("set")).unwrap();
    let mut data = pattern(8 * STRIPE as usize, 3);
    io(&b, id, IoOp::Write, 0, &mut data).unwrap();
    let stats = b.member_stats();
    assert_eq!(
        (stats[0].bytes_written, stats[1].bytes_written),
        (2 * STRIPE, 6 * STRIPE)
    );
    let members = vec![
        Member {
            target: Target::new("/a"),
            backend: mems[0].clone() as Arc<dyn Backend>,
        };
        2
    ];
    assert!(StripedBackend::weighted("s", members.clone(), STRIPE, &[1, 0]).is_err());
    assert!(StripedBackend::weighted("s", members, STRIPE, &[1]).is_err());
}

proptest! {
    #[test]
    fn weighted_ranges_round_trip(offset in 0u64..100_000, len in 1usize..60_000, w0 in 1u32..4, w1 in 1u32..4) {
        let (b, _) = weighted_set(&[w0, w1]);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        let mut data = pattern(len, offset as u8);
        prop_assert_eq!(io(&b, id, IoOp::Write, offset, &mut data).unwrap(), len);
        let mut back = vec![0u8; len];
        prop_assert_eq!(io(&b, id, IoOp::Read, offset, &mut back).unwrap(), len);
        prop_assert_eq!(&back, &data);
    }

    #[test]
    fn any_range_round_trips(offset in 0u64..100_000, len in 1usize..60_000, n in 2usize..5) {
        let (b, _) = set(n);
        let (id, _) = b.open(&Target::new("set")).unwrap();
        let mut data = pattern(len, offset as u8);
        prop_assert_eq!(io(&b, id, IoOp::Write, offset, &mut data).unwrap(), len);
        let mut back = vec![0u8; len];
        prop_assert_eq!(io(&b, id, IoOp::Read, offset, &mut back).unwrap(), len);
        prop_assert_eq!(&back, &data);
        let moved: u64 = b.member_stats().iter().map(|s| s.bytes_written).sum();
        prop_assert_eq!(moved, len as u64);
    }
}

#[test]
fn a_failing_member_fails_the_request_after_the_other_pieces_end() {
    let (b, mems) = set(2);
    let (id, _) = b.open(&Target::new("set")).unwrap();
    mems[1].faults().delay_us.store(0, Ordering::Relaxed);
    mems[1].faults().writes_left.store(0, Ordering::Relaxed);
    mems[0].faults().delay_us.store(20_000, Ordering::Relaxed);
    let mut data = pattern(4 * STRIPE as usize, 1);
    let started = Instant::now();
    assert!(io(&b, id, IoOp::Write, 0, &mut data).is_err());
    // Member 0's pieces (slow) had ended before the request reported the failure.
    assert!(started.elapsed().as_millis() >= 20);
    let stats = b.member_stats();
    assert_eq!(stats[0].bytes_written, 2 * STRIPE);
    assert_eq!(stats[1].errors, 2);
}

#[test]
fn a_refused_submission_ends_the_request_once_pieces_in_flight_are_done() {
    let (b, mems) = set(2);
    let (id, _) = b.open(&Target::new("set")).unwrap();
    mems[1].faults().submits_left.store(0, Ordering::Relaxed);
    let mut data = pattern(4 * STRIPE as usize, 2);
    let err = io(&b, id, IoOp::Write, 0, &mut data).unwrap_err();
    assert!(err.to_string().contains("injected submission failure"), "{err}");
}

#[test]
fn a_member_failing_again_and_again_is_taken_out_of_use_and_fails_requests_at_once() {
    let (b, mems) = set(3);
    let (id, _) = b.open(&Target::new("set")).unwrap();
    let s = STRIPE as usize;
    // Units 0 and 2 (members 0 and 2) hold data before member 1 starts failing.
    let mut data = pattern(3 * s, 5);
    io(&b, id, IoOp::Write, 0, &mut data).unwrap();
    mems[1].faults().writes_left.store(0, Ordering::Relaxed);
    let mut unit1 = pattern(s, 6);
    for attempt in 1..=MEMBER_FAILURE_LIMIT {
        let e = io(&b, id, IoOp::Write, STRIPE, &mut unit1).unwrap_err();
        assert!(e.is_transient(), "attempt {attempt}: the member's own EIO: {e}");
        assert_eq!(
            b.member_stats()[1].failed,
            attempt == MEMBER_FAILURE_LIMIT,
            "attempt {attempt}"
        );
    }
    let stats = b.member_stats();
    let why = stats[1].failure.clone().unwrap();
    assert!(why.contains("8 requests in a row failed on it"), "{why}");
    assert!(stats.iter().enumerate().all(|(i, s)| s.failed == (i == 1)));
    let requests = stats[1].requests;

    // Touching member 1: refused at once, naming it; nothing reaches any member.
    let mut back = vec![0u8; 3 * s];
    for (op, offset, len) in [
        (IoOp::Write, STRIPE, s),
        (IoOp::Read, 0, 3 * s),
        (IoOp::Read, STRIPE + 10, 1),
    ] {
        let e = io(&b, id, op, offset, &mut back[..len]).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("/m1 (member 1 of the striped set set): taken out of use"),
            "{text}"
        );
        assert!(!e.is_transient(), "{e}");
    }
    assert!(b.flush(id).unwrap_err().to_string().contains("/m1"));
    let after = b.member_stats();
    assert_eq!(
        after[1].requests, requests,
        "fail fast: member 1 saw nothing more"
    );
    assert_eq!(
        (after[0].requests, after[2].requests),
        (stats[0].requests, stats[2].requests)
    );

    // What the other members hold is still served.
    for unit in [0, 2] {
        let mut got = vec![0u8; s];
        io(&b, id, IoOp::Read, unit as u64 * STRIPE, &mut got).unwrap();
        assert_eq!(got, data[unit * s..(unit + 1) * s], "unit {unit}");
    }
}

#[test]
fn a_success_resets_the_count_and_errors_not_of_the_members_doing_do_not_count() {
    let (b, mems) = set(2);
    let b = b.with_failure_limit(3);
    assert_eq!(b.failure_limit(), 3);
    let (id, _) = b.open(&Target::new("set")).unwrap();
    let mut unit = pattern(STRIPE as usize, 1);
    for _ in 0..3 {
        mems[1].faults().writes_left.store(0, Ordering::Relaxed);
        for _ in 0..2 {
            assert!(io(&b, id, IoOp::Write, STRIPE, &mut unit).is_err());
        }
        mems[1].faults().writes_left.store(u64::MAX, Ordering::Relaxed);
        io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap();
    }
    // Reads past what member 1 holds: short counts, the end of its target.
    let mut far = vec![0u8; STRIPE as usize];
    for _ in 0..5 {
        assert!(matches!(
            io(&b, id, IoOp::Read, 101 * STRIPE, &mut far),
            Err(Error::ShortIo { .. })
        ));
    }
    let stats = b.member_stats();
    assert!(!stats[1].failed, "{stats:?}");
    assert_eq!(stats[1].errors, 6 + 5);
}

#[test]
fn a_member_out_of_use_is_tried_again_after_its_cool_down_and_comes_back_once_it_works() {
    let (b, mems) = set(2);
    let cool = std::time::Duration::from_millis(60);
    let b = b.with_failure_limit(2).with_retry_after(cool);
    let (id, _) = b.open(&Target::new("set")).unwrap();
    let mut unit = pattern(STRIPE as usize, 4);
    mems[1].faults().writes_left.store(0, Ordering::Relaxed);
    for _ in 0..2 {
        assert!(io(&b, id, IoOp::Write, STRIPE, &mut unit)
            .unwrap_err()
            .is_transient());
    }
    let s = b.member_stats()[1].clone();
    assert!(s.failed && s.times_taken_out == 1, "{s:?}");
    assert!(s.retry_in_seconds.unwrap() <= cool.as_secs_f64(), "{s:?}");
    let requests = s.requests;
    let e = io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap_err();
    assert!(e.to_string().contains("taken out of use"), "{e}");
    assert_eq!(
        b.member_stats()[1].requests,
        requests,
        "resting: nothing reached it"
    );

    // Rested, still failing: the request reaches it, fails, and it rests twice as long.
    std::thread::sleep(cool + std::time::Duration::from_millis(20));
    let e = io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap_err();
    assert!(e.is_transient(), "it was tried: {e}");
    let s = b.member_stats()[1].clone();
    assert!(s.failed && s.times_taken_out == 2, "{s:?}");
    assert!(s.retry_in_seconds.unwrap() > cool.as_secs_f64(), "doubled: {s:?}");
    assert!(
        s.failure.as_deref().unwrap().contains("tried again after"),
        "{s:?}"
    );

    // Rested again and working: back in use.
    mems[1].faults().writes_left.store(u64::MAX, Ordering::Relaxed);
    std::thread::sleep(2 * cool + std::time::Duration::from_millis(20));
    io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap();
    let s = b.member_stats()[1].clone();
    assert!(
        !s.failed && s.retry_in_seconds.is_none() && s.times_taken_out == 2,
        "{s:?}"
    );
    let mut back = vec![0u8; STRIPE as usize];
    io(&b, id, IoOp::Read, STRIPE, &mut back).unwrap();
    assert_eq!(back, unit);
}

#[test]
fn a_gone_member_is_never_tried_again() {
    let (b, mems) = set(2);
    let b = b.with_retry_after(std::time::Duration::from_millis(1));
    let (id, _) = b.open(&Target::new("set")).unwrap();
    mems[1].faults().submits_left.store(0, Ordering::Relaxed);
    let mut unit = pattern(STRIPE as usize, 2);
    assert!(io(&b, id, IoOp::Write, STRIPE, &mut unit).is_err());
    mems[1].faults().submits_left.store(u64::MAX, Ordering::Relaxed);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let e = io(&b, id, IoOp::Write, STRIPE, &mut unit).unwrap_err();
    assert!(e.to_string().contains("fail at once: it is gone"), "{e}");
    let s = b.member_stats()[1].clone();
    assert!(s.failed && s.retry_in_seconds.is_none(), "{s:?}");
}

#[test]
fn a_member_that_is_gone_is_taken_out_of_use_at_once() {
    let (b, mems) = set(2);
    let (id, _) = b.open(&Target::new("set")).unwrap();
    mems[1].faults().submits_left.store(0, Ordering::Relaxed);
    let mut data = pattern(2 * STRIPE as usize, 3);
    let e = io(&b, id, IoOp::Write, 0, &mut data).unwrap_err();
    assert!(e.to_string().contains("injected submission failure"), "{e}");
    let stats = b.member_stats();
    assert!(stats[1].failed && !stats[0].failed, "{stats:?}");
    assert!(stats[1].failure.as_deref().unwrap().starts_with("it is gone"));
    let e = io(&b, id, IoOp::Write, 0, &mut data).unwrap_err();
    assert!(e.to_string().contains("taken out of use"), "{e}");
    // Member 0 alone still works.
    io(&b, id, IoOp::Write, 0, &mut data[..STRIPE as usize]).unwrap();
}

#[test]
fn bad_sets_are_refused_with_the_reason() {
    let (b, _) = set(2);
    assert!(matches!(b.open(&Target::new("other")), Err(Error::Target { .. })));
    let one = vec![Member {
        target: Target::new("/a"),
        backend: Arc::new(MemBackend::new(Arc::new(HostDevice::new())).unwrap()),
    }];
    assert!(StripedBackend::new("s", one.clone(), STRIPE)
        .unwrap_err()
        .to_string()
        .contains("at least two"));
    let two = [one.clone(), one].concat();
    assert!(StripedBackend::new("s", two, 1000)
        .unwrap_err()
        .to_string()
        .contains("stripe_bytes"));
    let (b, _) = set(2);
    let mut buf = [0u8; 10];
    assert!(io(&b, TargetId(9), IoOp::Read, 0, &mut buf).is_err());
}

/// A member on host memory that records the reservation each target is opened with, and
/// whose targets say they hold `size` bytes where it is given.
#[derive(Debug)]
struct Recording {
    inner: MemBackend,
    reserved: Mutex<Vec<Option<u64>>>,
    size: Option<u64>,
}

impl Recording {
    fn new(size: Option<u64>) -> Recording {
        Recording {
            inner: MemBackend::new(Arc::new(HostDevice::new())).unwrap(),
            reserved: Mutex::new(Vec::new()),
            size,
        }
    }
}

impl Backend for Recording {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn open(&self, target: &Target) -> Result<(TargetId, TargetInfo)> {
        self.reserved.lock().unwrap().push(target.reserve);
        let (id, info) = self.inner.open(target)?;
        Ok((
            id,
            TargetInfo {
                size: self.size.unwrap_or(info.size),
                ..info
            },
        ))
    }
    unsafe fn submit(&self, req: IoRequest) -> Result<Ticket> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.submit(req) }
    }
    fn flush(&self, target: TargetId) -> Result<()> {
        self.inner.flush(target)
    }
    fn close(&self, target: TargetId) -> Result<()> {
        self.inner.close(target)
    }
}

#[test]
fn the_reservation_is_shared_out_in_whole_units() {
    let rec: Vec<Arc<Recording>> = (0..3).map(|_| Arc::new(Recording::new(None))).collect();
    let members = members_over(rec.iter().map(|r| r.clone() as Arc<dyn Backend>));
    let b = StripedBackend::new("set", members, STRIPE).unwrap();
    // 10 units over 3 members: 4 units each (rounded up), so every unit fits.
    let (id, _) = b.open(&Target::new("set").reserve(10 * STRIPE - 100)).unwrap();
    for r in &rec {
        assert_eq!(*r.reserved.lock().unwrap(), vec![Some(4 * STRIPE)]);
    }
    b.close(id).unwrap();
    assert!(b.flush(id).is_err(), "a closed set is gone");
}

/// One member over each of `backends`, named "/m0", "/m1", ….
fn members_over(backends: impl IntoIterator<Item = Arc<dyn Backend>>) -> Vec<Member> {
    backends
        .into_iter()
        .enumerate()
        .map(|(i, backend)| Member {
            target: Target::new(format!("/m{i}")),
            backend,
        })
        .collect()
}

/// `n` members over memory backends, named "/m0", "/m1", ….
fn mem_members(n: usize) -> Vec<Member> {
    members_over(
        (0..n).map(|_| Arc::new(MemBackend::new(Arc::new(HostDevice::new())).unwrap()) as Arc<dyn Backend>),
    )
}

#[test]
fn a_round_past_two_to_the_64_bytes_is_refused_when_the_set_is_made() {
    for (stripe, weights) in [
        (1u64 << 63, vec![1u32, 1]),
        (u64::MAX - 4095, vec![1, 1]),
        (1 << 62, vec![1, 3]),
        (1 << 32, vec![u32::MAX, u32::MAX]),
    ] {
        let e = StripedBackend::weighted("s", mem_members(weights.len()), stripe, &weights).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::InvalidArgument(_)), "{text}");
        assert!(
            text.contains(&format!("stripe_bytes {stripe} times"))
                && text.contains(&format!("{weights:?}"))
                && text.contains("smaller stripe_bytes"),
            "{text}"
        );
    }
    let e = StripedBackend::new("s", mem_members(2), 1 << 63).unwrap_err();
    assert!(e.to_string().contains("[1, 1]"), "{e}");
    // Just under: three units of 2^62 bytes make a round.
    StripedBackend::weighted("s", mem_members(2), 1 << 62, &[1, 2]).unwrap();
}

#[test]
fn offsets_near_the_end_of_a_huge_set_are_computed_without_overflow() {
    let b = StripedBackend::weighted("set", mem_members(2), 1 << 62, &[1, 2]).unwrap();
    // Unit 3 is the first of round 1, on member 0, whose second unit it is.
    assert_eq!(b.locate(u64::MAX), (0, (1 << 63) - 1, 1));
    assert_eq!(b.locate(3 << 62), (0, 1 << 62, 1 << 62));
    assert_eq!(b.locate((2 << 62) + 5), (1, (1 << 62) + 5, (1 << 62) - 5));
    // A reservation whose whole rounds pass 2^64 bytes on a member is refused.
    for reserve in [u64::MAX, (3 << 62) + 1] {
        let e = b.open(&Target::new("set").reserve(reserve)).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("capacity of {reserve} bytes is too large")),
            "{e}"
        );
    }
    let (id, _) = b.open(&Target::new("set").reserve(3 << 62)).unwrap();
    // A request running past 2^64 bytes is refused before any member sees it.
    let mut buf = vec![0u8; 4096];
    for offset in [u64::MAX, u64::MAX - 4094] {
        let e = io(&b, id, IoOp::Read, offset, &mut buf).unwrap_err();
        assert!(e.to_string().contains("ends past 2^64 bytes"), "{e}");
    }
    assert!(b.member_stats().iter().all(|s| s.requests == 0));
}

#[test]
fn a_set_of_huge_members_is_as_large_as_64_bit_offsets_reach() {
    let members = members_over((0..2).map(|_| Arc::new(Recording::new(Some(u64::MAX))) as Arc<dyn Backend>));
    let b = StripedBackend::new("set", members, STRIPE).unwrap();
    let (_, info) = b.open(&Target::new("set")).unwrap();
    let round = 2 * STRIPE;
    assert_eq!(info.size, u64::MAX / round * round);
    let (member, offset, room) = b.locate(info.size - 1);
    assert_eq!((member, room), (1, 1));
    assert_eq!(offset, info.size / 2 - 1);
}
