//! Queue pair arithmetic ("Queue Mechanism": "Empty Queue", "Full Queue", "Phase Tag") and
//! command identifier allocation, without any device.
//!
//! A submission queue of N entries is a ring the host fills at the tail and the controller
//! drains from the head; it is empty when head equals tail and full when the tail is one
//! behind the head, so at most N - 1 commands are outstanding. The host learns the head
//! from the SQHD field of completions.
//!
//! A completion queue is a ring the controller fills. The host finds new entries by their
//! phase tag: the controller writes 1 on its first pass through the ring, 0 on the second,
//! and so on, so an entry is new while its phase equals the one the host expects; the host
//! flips its expectation each time its head wraps. The host's memory for the ring starts
//! zeroed (phase 0), so nothing looks new before the controller writes.
//!
//! Reading a completion from device-written memory needs a read barrier between the phase
//! check and the other fields; that belongs to the layer that owns the memory. Here a ring
//! is a plain slice.

use std::collections::VecDeque;

use thiserror::Error;

use crate::nvme::cmd::Completion;

/// The smallest queue, in entries.
pub const MIN_QUEUE_ENTRIES: u32 = 2;
/// The largest queue, in entries.
pub const MAX_QUEUE_ENTRIES: u32 = 65536;

/// Errors of queue bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum QueueError {
    /// A queue size outside 2..=65536.
    #[error("a queue holds {MIN_QUEUE_ENTRIES}..={MAX_QUEUE_ENTRIES} entries, not {entries}")]
    Size {
        /// The size asked for.
        entries: u32,
    },
    /// The submission queue holds N - 1 commands already.
    #[error("submission queue is full ({outstanding} commands outstanding)")]
    Full {
        /// Commands outstanding.
        outstanding: u32,
    },
    /// A completion reported a submission queue head outside the commands outstanding.
    #[error(
        "completion reports submission queue head {sq_head}, outside the outstanding \
         entries {head}..={tail}: the completion is stale or corrupt"
    )]
    InvalidSqHead {
        /// The head reported.
        sq_head: u16,
        /// The head known before.
        head: u16,
        /// The tail.
        tail: u16,
    },
    /// A command identifier pool of no identifiers or of more than 65535.
    #[error("a command identifier pool holds 1..=65535 identifiers, not {capacity}")]
    CidCapacity {
        /// The capacity asked for.
        capacity: u32,
    },
    /// Releasing a command identifier that is not in flight.
    #[error("command identifier {cid} is not in flight: released twice, or never allocated")]
    CidNotInFlight {
        /// The identifier.
        cid: u16,
    },
}

fn check_entries(entries: u32) -> Result<u32, QueueError> {
    if (MIN_QUEUE_ENTRIES..=MAX_QUEUE_ENTRIES).contains(&entries) {
        Ok(entries)
    } else {
        Err(QueueError::Size { entries })
    }
}

/// The host's view of a submission queue: where the next command goes (tail) and how far
/// the controller has consumed (head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmissionRing {
    entries: u32,
    head: u32,
    tail: u32,
}

impl SubmissionRing {
    /// An empty ring of `entries` entries (2..=65536).
    pub fn new(entries: u32) -> Result<Self, QueueError> {
        Ok(SubmissionRing {
            entries: check_entries(entries)?,
            head: 0,
            tail: 0,
        })
    }

    /// The ring's size in entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The tail: the slot the next command goes to, and the value for the tail doorbell.
    pub fn tail(&self) -> u16 {
        self.tail as u16
    }

    /// The head as last reported by the controller.
    pub fn head(&self) -> u16 {
        self.head as u16
    }

    /// Commands written and not yet consumed by the controller, as far as the host knows.
    pub fn outstanding(&self) -> u32 {
        (self.tail + self.entries - self.head) % self.entries
    }

    /// Whether no command is outstanding.
    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Whether the ring holds N - 1 commands (one slot always stays free).
    pub fn is_full(&self) -> bool {
        (self.tail + 1) % self.entries == self.head
    }

    /// How many more commands fit.
    pub fn free_slots(&self) -> u32 {
        self.entries - 1 - self.outstanding()
    }

    /// Claims the tail slot for a command and advances the tail; returns the slot's index.
    /// Write the command there, then ring the tail doorbell with [`SubmissionRing::tail`].
    pub fn push(&mut self) -> Result<u16, QueueError> {
        if self.is_full() {
            return Err(QueueError::Full {
                outstanding: self.outstanding(),
            });
        }
        let slot = self.tail;
        self.tail = (self.tail + 1) % self.entries;
        Ok(slot as u16)
    }

    /// Records the head a completion reported (SQHD), freeing the slots before it. The new
    /// head must lie between the current head and the tail.
    pub fn update_head(&mut self, sq_head: u16) -> Result<(), QueueError> {
        let new = u32::from(sq_head);
        let advance = (new + self.entries - self.head) % self.entries;
        if new >= self.entries || advance > self.outstanding() {
            return Err(QueueError::InvalidSqHead {
                sq_head,
                head: self.head(),
                tail: self.tail(),
            });
        }
        self.head = new;
        Ok(())
    }
}

/// The host's view of a completion queue: the next entry to look at and the phase tag that
/// marks it new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionRing {
    entries: u32,
    head: u32,
    phase: bool,
}

impl CompletionRing {
    /// A ring of `entries` entries (2..=65536) over zeroed memory: head 0, expecting phase 1.
    pub fn new(entries: u32) -> Result<Self, QueueError> {
        Ok(CompletionRing {
            entries: check_entries(entries)?,
            head: 0,
            phase: true,
        })
    }

    /// Resumes at a known head and expected phase (e.g. from [`new_completions`]).
    pub fn at(entries: u32, head: u16, phase: bool) -> Result<Self, QueueError> {
        let entries = check_entries(entries)?;
        Ok(CompletionRing {
            entries,
            head: u32::from(head) % entries,
            phase,
        })
    }

    /// The ring's size in entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The head: the next entry to look at, and the value for the head doorbell.
    pub fn head(&self) -> u16 {
        self.head as u16
    }

    /// The phase tag a new entry at the head carries.
    pub fn phase(&self) -> bool {
        self.phase
    }

    /// Takes the entry at the head when it is new, advancing the head (and flipping the
    /// expected phase when the head wraps).
    ///
    /// # Panics
    /// If `ring` is not the ring's size.
    pub fn pop(&mut self, ring: &[Completion]) -> Option<Completion> {
        assert_eq!(
            ring.len(),
            self.entries as usize,
            "completion ring memory has the wrong size"
        );
        let entry = ring[self.head as usize];
        if entry.phase() != self.phase {
            return None;
        }
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        Some(entry)
    }

    /// Takes up to `max` new entries from the head.
    ///
    /// # Panics
    /// If `ring` is not the ring's size.
    pub fn reap(&mut self, ring: &[Completion], max: usize) -> Vec<Completion> {
        std::iter::from_fn(|| self.pop(ring)).take(max).collect()
    }
}

/// The completions that are new in `ring` from `head` when new entries carry `phase`,
/// stopping at the first entry whose phase differs, with the head and expected phase after
/// them. At most N - 1 entries are returned: the controller never holds more before the
/// host rings the head doorbell.
///
/// # Panics
/// If `ring` has fewer than 2 or more than 65536 entries.
pub fn new_completions(ring: &[Completion], head: u16, phase: bool) -> (Vec<Completion>, u16, bool) {
    let entries = u32::try_from(ring.len()).unwrap_or(u32::MAX);
    let mut cq = CompletionRing::at(entries, head, phase).expect("completion ring of 2..=65536 entries");
    let new = cq.reap(ring, ring.len() - 1);
    (new, cq.head(), cq.phase())
}

/// Command identifiers of one submission queue: hands out identifiers not in flight and
/// takes them back when their command completes.
///
/// Identifiers are reused in first-released, first-reused order, so a recently completed
/// identifier is the last to come back (a late or duplicated completion is then less likely
/// to name a new command). Identifier 0xFFFF is never handed out: the Error Information log
/// uses it for "no command".
#[derive(Clone, Debug)]
pub struct CidPool {
    free: VecDeque<u16>,
    in_flight: Vec<bool>,
}

impl CidPool {
    /// A pool of identifiers `0..capacity` (capacity 1..=65535). A submission queue of N
    /// entries needs at most N - 1.
    pub fn new(capacity: u32) -> Result<Self, QueueError> {
        if !(1..=0xFFFF).contains(&capacity) {
            return Err(QueueError::CidCapacity { capacity });
        }
        Ok(CidPool {
            free: (0..capacity as u16).collect(),
            in_flight: vec![false; capacity as usize],
        })
    }

    /// The number of identifiers in the pool.
    pub fn capacity(&self) -> usize {
        self.in_flight.len()
    }

    /// An identifier not in flight, now marked in flight; `None` when all are.
    pub fn alloc(&mut self) -> Option<u16> {
        let cid = self.free.pop_front()?;
        self.in_flight[usize::from(cid)] = true;
        Some(cid)
    }

    /// Returns an identifier whose command completed.
    pub fn release(&mut self, cid: u16) -> Result<(), QueueError> {
        match self.in_flight.get_mut(usize::from(cid)) {
            Some(flag) if *flag => {
                *flag = false;
                self.free.push_back(cid);
                Ok(())
            }
            _ => Err(QueueError::CidNotInFlight { cid }),
        }
    }

    /// Whether `cid` is in flight.
    pub fn is_in_flight(&self, cid: u16) -> bool {
        self.in_flight.get(usize::from(cid)).copied().unwrap_or(false)
    }

    /// Identifiers in flight.
    pub fn in_flight(&self) -> usize {
        self.capacity() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cqe(cid: u16, phase: bool) -> Completion {
        Completion {
            cid,
            status: u16::from(phase),
            ..Default::default()
        }
    }

    /// A controller's side of a completion queue: posts entries with its phase tag and
    /// never overruns the host's head.
    struct FakeController {
        ring: Vec<Completion>,
        tail: usize,
        phase: bool,
        host_head: usize,
    }

    impl FakeController {
        fn new(entries: usize) -> Self {
            FakeController {
                ring: vec![Completion::default(); entries],
                tail: 0,
                phase: true,
                host_head: 0,
            }
        }

        fn full(&self) -> bool {
            (self.tail + 1) % self.ring.len() == self.host_head
        }

        fn post(&mut self, cid: u16) -> bool {
            if self.full() {
                return false;
            }
            self.ring[self.tail] = cqe(cid, self.phase);
            self.tail += 1;
            if self.tail == self.ring.len() {
                self.tail = 0;
                self.phase = !self.phase;
            }
            true
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(SubmissionRing::new(1), Err(QueueError::Size { entries: 1 }));
        assert_eq!(
            SubmissionRing::new(65537),
            Err(QueueError::Size { entries: 65537 })
        );
        assert!(SubmissionRing::new(65536).is_ok());
        assert_eq!(CompletionRing::new(0), Err(QueueError::Size { entries: 0 }));
    }

    #[test]
    fn submission_ring_fills_at_n_minus_1() {
        let mut sq = SubmissionRing::new(4).unwrap();
        assert!(sq.is_empty());
        assert_eq!(sq.free_slots(), 3);
        assert_eq!(sq.push(), Ok(0));
        assert_eq!(sq.push(), Ok(1));
        assert_eq!(sq.push(), Ok(2));
        assert!(sq.is_full());
        assert_eq!(sq.tail(), 3);
        assert_eq!(sq.push(), Err(QueueError::Full { outstanding: 3 }));
        sq.update_head(2).unwrap();
        assert_eq!(sq.outstanding(), 1);
        assert_eq!(sq.push(), Ok(3));
        assert_eq!(sq.push(), Ok(0), "tail wraps");
        assert_eq!(sq.tail(), 1);
        assert_eq!(sq.outstanding(), 3);
        assert!(sq.is_full());
        sq.update_head(1).unwrap();
        assert!(sq.is_empty());
    }

    #[test]
    fn submission_head_validated() {
        let mut sq = SubmissionRing::new(8).unwrap();
        sq.push().unwrap();
        sq.push().unwrap();
        sq.update_head(0).unwrap(); // no progress is fine
        sq.update_head(1).unwrap();
        assert_eq!(
            sq.update_head(0),
            Err(QueueError::InvalidSqHead {
                sq_head: 0,
                head: 1,
                tail: 2
            })
        );
        assert!(sq.update_head(3).is_err());
        assert!(sq.update_head(8).is_err());
        sq.update_head(2).unwrap();
        assert!(sq.is_empty());
    }

    #[test]
    fn completion_phase_flips_on_wrap() {
        let mut dev = FakeController::new(4);
        let mut cq = CompletionRing::new(4).unwrap();
        assert_eq!(cq.pop(&dev.ring), None, "zeroed memory holds nothing new");
        for cid in 0..3 {
            assert!(dev.post(cid));
        }
        assert!(!dev.post(99), "controller sees the queue full");
        let got: Vec<u16> = cq.reap(&dev.ring, usize::MAX).iter().map(|c| c.cid).collect();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!((cq.head(), cq.phase()), (3, true));
        dev.host_head = 3;
        assert!(dev.post(3)); // last slot, phase 1; the controller wraps to phase 0
        assert!(dev.post(4)); // slot 0, phase 0
        let got: Vec<u16> = cq.reap(&dev.ring, usize::MAX).iter().map(|c| c.cid).collect();
        assert_eq!(got, vec![3, 4]);
        assert_eq!((cq.head(), cq.phase()), (1, false));
        assert!(!dev.ring[0].phase());
        // Slots 1 and 2 still hold phase-1 entries from the first pass: not new.
        assert_eq!(cq.pop(&dev.ring), None);
    }

    #[test]
    fn new_completions_stops_at_phase_mismatch() {
        let mut ring = vec![cqe(0, false); 8];
        ring[2] = cqe(10, true);
        ring[3] = cqe(11, true);
        ring[4] = cqe(12, false);
        ring[5] = cqe(13, true); // after a mismatch: not reported
        let (new, head, phase) = new_completions(&ring, 2, true);
        assert_eq!(new.iter().map(|c| c.cid).collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!((head, phase), (4, true));
        let (again, head2, phase2) = new_completions(&ring, head, phase);
        assert!(again.is_empty());
        assert_eq!((head2, phase2), (4, true));
    }

    #[test]
    fn new_completions_wraps_and_caps() {
        // Slots 2, 3 carry phase 1 and slots 0, 1 phase 0 (the controller's next pass), so
        // every entry looks new from head 2: at most N - 1 come back.
        let ring: Vec<Completion> = (0..4).map(|i| cqe(i, i >= 2)).collect();
        let (new, head, phase) = new_completions(&ring, 2, true);
        assert_eq!(new.iter().map(|c| c.cid).collect::<Vec<_>>(), vec![2, 3, 0]);
        assert_eq!((head, phase), (1, false));
    }

    #[test]
    fn reap_limit() {
        let ring: Vec<Completion> = (0..8).map(|i| cqe(i, true)).collect();
        let mut cq = CompletionRing::new(8).unwrap();
        assert_eq!(cq.reap(&ring, 3).len(), 3);
        assert_eq!(cq.head(), 3);
    }

    #[test]
    #[should_panic(expected = "wrong size")]
    fn ring_size_mismatch_panics() {
        let mut cq = CompletionRing::new(8).unwrap();
        cq.pop(&[Completion::default(); 4]);
    }

    #[test]
    fn cid_pool_exhaustion_and_reuse_order() {
        let mut pool = CidPool::new(3).unwrap();
        assert_eq!(
            (pool.alloc(), pool.alloc(), pool.alloc()),
            (Some(0), Some(1), Some(2))
        );
        assert_eq!(pool.alloc(), None);
        assert_eq!(pool.in_flight(), 3);
        pool.release(1).unwrap();
        pool.release(0).unwrap();
        assert!(!pool.is_in_flight(1));
        assert!(pool.is_in_flight(2));
        assert_eq!(pool.alloc(), Some(1), "first released, first reused");
        assert_eq!(pool.alloc(), Some(0));
        assert_eq!(pool.alloc(), None);
    }

    #[test]
    fn cid_pool_errors() {
        let mut pool = CidPool::new(2).unwrap();
        assert_eq!(pool.release(0), Err(QueueError::CidNotInFlight { cid: 0 }));
        assert_eq!(pool.release(7), Err(QueueError::CidNotInFlight { cid: 7 }));
        let cid = pool.alloc().unwrap();
        pool.release(cid).unwrap();
        assert_eq!(pool.release(cid), Err(QueueError::CidNotInFlight { cid }));
        assert_eq!(
            CidPool::new(0).unwrap_err(),
            QueueError::CidCapacity { capacity: 0 }
        );
        assert_eq!(
            CidPool::new(0x1_0000).unwrap_err(),
            QueueError::CidCapacity { capacity: 0x1_0000 }
        );
        let big = CidPool::new(0xFFFF).unwrap();
        assert_eq!(big.capacity(), 0xFFFF);
        assert!(!big.is_in_flight(0xFFFF));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against a controller that posts completions whenever the queue has room, the host
        /// sees every completion exactly once, in order, and never a stale one.
        #[test]
        fn completions_seen_once_in_order(
            entries in 2usize..12,
            ops in proptest::collection::vec((0u8..4, 1usize..10), 1..200),
        ) {
            let mut dev = FakeController::new(entries);
            let mut cq = CompletionRing::new(entries as u32).unwrap();
            let mut posted = 0u16;
            let mut seen = Vec::new();
            for (op, n) in ops {
                if op == 0 {
                    // Host reaps up to n and rings the doorbell.
                    let got = cq.reap(&dev.ring, n);
                    seen.extend(got.iter().map(|c| c.cid));
                    dev.host_head = usize::from(cq.head());
                } else {
                    for _ in 0..n {
                        if dev.post(posted) {
                            posted += 1;
                        }
                    }
                }
                let in_order = seen.iter().enumerate().all(|(i, &c)| i == usize::from(c));
                prop_assert!(in_order, "completions out of order or repeated: {:?}", seen);
            }
            let rest = cq.reap(&dev.ring, usize::MAX);
            seen.extend(rest.iter().map(|c| c.cid));
            let expect: Vec<u16> = (0..posted).collect();
            prop_assert_eq!(seen, expect);
            prop_assert!(cq.pop(&dev.ring).is_none());
        }

        /// The submission ring's outstanding count tracks pushes minus consumed entries.
        #[test]
        fn submission_ring_counts(entries in 2u32..64, ops in proptest::collection::vec(0u32..8, 1..200)) {
            let mut sq = SubmissionRing::new(entries).unwrap();
            let mut outstanding = 0u32;
            for op in ops {
                if op < 5 {
                    match sq.push() {
                        Ok(_) => outstanding += 1,
                        Err(_) => prop_assert_eq!(outstanding, entries - 1),
                    }
                } else {
                    let consume = (op - 4).min(outstanding);
                    let new_head = (u32::from(sq.head()) + consume) % entries;
                    sq.update_head(new_head as u16).unwrap();
                    outstanding -= consume;
                }
                prop_assert_eq!(sq.outstanding(), outstanding);
                prop_assert_eq!(sq.free_slots(), entries - 1 - outstanding);
            }
        }
    }
}
