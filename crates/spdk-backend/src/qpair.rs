//! A queue pair in DMA memory: a submission ring the host fills and a completion ring the
//! controller fills, with their doorbells in BAR0. The admin queue is queue pair 0; I/O
//! queues are created on the controller with admin commands (see [`crate::controller`]).

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::controller::Error;
use crate::nvme::cmd::{Command, Completion, COMMAND_SIZE, COMPLETION_SIZE};
use crate::nvme::queue::{CidPool, QueueError, SubmissionRing};
use crate::nvme::regs::{doorbell_offset, DoorbellKind};
use crate::vfio::{Bar, Container, DmaBuffer};

/// One submission queue and its completion queue, owning their memory.
#[derive(Debug)]
pub struct QueuePair {
    qid: u16,
    entries: u32,
    sq_mem: DmaBuffer,
    cq_mem: DmaBuffer,
    sq: SubmissionRing,
    cq_head: u32,
    cq_phase: bool,
    cids: CidPool,
    bar: Arc<Bar>,
    sq_doorbell: usize,
    cq_doorbell: usize,
}

impl QueuePair {
    /// Allocates zeroed, page-aligned memory for a queue pair `qid` of `entries` entries
    /// whose doorbells are in `bar` (doorbell stride `dstrd`). The controller does not know
    /// the queues until they are registered (AQA/ASQ/ACQ for queue 0, Create I/O CQ/SQ
    /// otherwise).
    pub fn new(
        container: &Arc<Container>,
        bar: Arc<Bar>,
        qid: u16,
        entries: u32,
        dstrd: u8,
    ) -> Result<Self, Error> {
        let sq = SubmissionRing::new(entries)?;
        let cids = CidPool::new(entries - 1)?;
        let sq_mem = DmaBuffer::new(container, entries as usize * COMMAND_SIZE)?;
        let cq_mem = DmaBuffer::new(container, entries as usize * COMPLETION_SIZE)?;
        Ok(QueuePair {
            qid,
            entries,
            sq_mem,
            cq_mem,
            sq,
            cq_head: 0,
            cq_phase: true,
            cids,
            bar,
            sq_doorbell: doorbell_offset(qid, DoorbellKind::SqTail, dstrd),
            cq_doorbell: doorbell_offset(qid, DoorbellKind::CqHead, dstrd),
        })
    }

    /// The queue identifier (0 for the admin queue).
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Entries in each ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The IOVA of the submission ring.
    pub fn sq_iova(&self) -> u64 {
        self.sq_mem.iova()
    }

    /// The IOVA of the completion ring.
    pub fn cq_iova(&self) -> u64 {
        self.cq_mem.iova()
    }

    /// Commands submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.cids.in_flight()
    }

    /// Whether a command can be submitted now: a command identifier and a submission slot
    /// are free. When not, completions must be reaped with [`QueuePair::poll`] first.
    pub fn can_submit(&self) -> bool {
        self.cids.in_flight() < self.cids.capacity() && !self.sq.is_full()
    }

    /// The most commands in flight at once (`entries - 1`); command identifiers are below it.
    pub fn capacity(&self) -> usize {
        self.cids.capacity()
    }

    /// Gives `cmd` a free command identifier, writes it at the submission tail and rings
    /// the tail doorbell. Returns the identifier its completion will carry.
    pub fn submit(&mut self, cmd: Command) -> Result<u16, Error> {
        self.submit_with(|_| Ok(cmd))
    }

    /// Like [`QueuePair::submit`], with the command built by `build` from the identifier it
    /// will carry (for per-command resources such as PRP list pages); nothing is submitted
    /// when `build` fails.
    pub fn submit_with(&mut self, build: impl FnOnce(u16) -> Result<Command, Error>) -> Result<u16, Error> {
        if self.sq.is_full() {
            return Err(QueueError::Full {
                outstanding: self.sq.outstanding(),
            }
            .into());
        }
        let cid = self.cids.alloc().ok_or(Error::NoCommandId { qid: self.qid })?;
        let mut cmd = match build(cid) {
            Ok(cmd) => cmd,
            Err(e) => {
                self.cids.release(cid)?;
                return Err(e);
            }
        };
        let slot = match self.sq.push() {
            Ok(slot) => usize::from(slot),
            Err(e) => {
                self.cids.release(cid)?;
                return Err(e.into());
            }
        };
        cmd.set_cid(cid);
        let bytes = cmd.to_bytes();
        // SAFETY: `slot < entries` and the ring memory holds `entries * COMMAND_SIZE` bytes,
        // so the 64 bytes written stay inside `sq_mem`, which this queue pair owns; the
        // controller does not read the slot before the doorbell below.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.sq_mem.as_ptr().add(slot * COMMAND_SIZE),
                COMMAND_SIZE,
            );
        }
        // The command must be in memory before the controller learns of it.
        fence(Ordering::SeqCst);
        self.bar.write32(self.sq_doorbell, u32::from(self.sq.tail()))?;
        Ok(cid)
    }

    /// Takes the next completion when the controller has posted one: frees its submission
    /// slots and command identifier and rings the completion head doorbell.
    pub fn poll(&mut self) -> Result<Option<Completion>, Error> {
        let entry = self.cq_entry_ptr(self.cq_head);
        // SAFETY: `entry` points at a 16-byte, 16-byte-aligned entry inside `cq_mem`, which
        // this queue pair owns; the controller writes it concurrently, hence volatile.
        let status = unsafe { std::ptr::read_volatile(entry.add(14).cast::<u16>()) };
        if (status & 1 != 0) != self.cq_phase {
            return Ok(None);
        }
        // The rest of the entry is read only after its phase tag says it is new.
        fence(Ordering::Acquire);
        // SAFETY: as above; the whole entry is read after the phase check.
        let raw = unsafe { std::ptr::read_volatile(entry.cast::<[u8; COMPLETION_SIZE]>()) };
        let cqe = Completion::from_bytes(&raw);
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.cq_phase = !self.cq_phase;
        }
        self.sq.update_head(cqe.sq_head)?;
        self.cids.release(cqe.cid)?;
        fence(Ordering::SeqCst);
        self.bar.write32(self.cq_doorbell, self.cq_head)?;
        Ok(Some(cqe))
    }

    fn cq_entry_ptr(&self, index: u32) -> *const u8 {
        debug_assert!(index < self.entries);
        // SAFETY: `index < entries` and the ring holds `entries * COMPLETION_SIZE` bytes.
        unsafe { self.cq_mem.as_ptr().add(index as usize * COMPLETION_SIZE) }
    }
}
