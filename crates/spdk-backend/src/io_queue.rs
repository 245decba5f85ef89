//! An I/O queue pair owned by one thread: block reads and writes on namespace 1, either
//! synchronous (cut at MDTS) or asynchronous with many commands in flight, each command's
//! PRP list pages preallocated per command identifier. No locks on this path: the queue
//! pair, its PRP lists and its bookkeeping belong to the queue alone.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use crate::controller::{Error, Health, Shared, NSID};
use crate::nvme::cmd::{Command, Completion};
use crate::nvme::prp::{self, SplitError};
use crate::qpair::QueuePair;
use crate::vfio::DmaBuffer;

/// The outcome of one asynchronous command: its identifier, and whether it succeeded.
pub type IoCompletion = (u16, Result<(), Error>);

/// An I/O command in flight, kept to describe its failure.
#[derive(Clone, Copy, Debug)]
enum IoOp {
    Read { lba: u64, blocks: u32 },
    Write { lba: u64, blocks: u32 },
    Flush,
}

impl IoOp {
    fn describe(self) -> String {
        match self {
            IoOp::Read { lba, blocks } => format!("read of {blocks} blocks at LBA {lba}"),
            IoOp::Write { lba, blocks } => format!("write of {blocks} blocks at LBA {lba}"),
            IoOp::Flush => "flush".to_owned(),
        }
    }
}

/// Watches a queue for a stall; see [`IoQueue::check_stalled`].
#[derive(Debug)]
pub struct Watchdog(Health);

/// An I/O submission/completion queue pair on the controller, for one thread (`Send`, not
/// shared). Created by [`Controller::create_io_queue`](crate::controller::Controller::create_io_queue);
/// deleted on the controller when dropped, after which the controller may reuse its
/// identifier.
#[derive(Debug)]
pub struct IoQueue {
    qp: QueuePair,
    /// `list_pages_per_cmd` PRP list pages for each command identifier.
    prp_lists: DmaBuffer,
    /// The IOVAs of those pages, identifier by identifier (computed once, not per command).
    list_iovas: Vec<u64>,
    /// The I/O command behind each identifier in flight.
    pending: Vec<Option<IoOp>>,
    /// Completions reaped while waiting for a particular command, not yet handed out.
    done: VecDeque<IoCompletion>,
    ctrl: Arc<Shared>,
}

impl IoQueue {
    pub(crate) fn new(ctrl: Arc<Shared>, qp: QueuePair, prp_lists: DmaBuffer) -> Self {
        let page = ctrl.page.bytes();
        let pages = (qp.capacity() * ctrl.list_pages_per_cmd) as u64;
        let list_iovas = (0..pages).map(|i| prp_lists.iova() + i * page).collect();
        IoQueue {
            list_iovas,
            pending: vec![None; qp.capacity()],
            qp,
            prp_lists,
            done: VecDeque::new(),
            ctrl,
        }
    }

    /// The queue identifier on the controller (1 and up).
    pub fn qid(&self) -> u16 {
        self.qp.qid()
    }

    /// Entries in the queue.
    pub fn entries(&self) -> u32 {
        self.qp.entries()
    }

    /// The most commands in flight at once (entries - 1).
    pub fn max_in_flight(&self) -> usize {
        self.qp.capacity()
    }

    /// Commands submitted whose completions the controller has not posted or this queue
    /// has not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.qp.in_flight()
    }

    /// Whether an asynchronous command can be submitted now without [`Error::QueueFull`].
    pub fn can_submit(&self) -> bool {
        self.qp.can_submit()
    }

    /// The most bytes one asynchronous command moves: MDTS, and at most 65536 blocks.
    pub fn max_command_bytes(&self) -> u64 {
        self.ctrl.command_max
    }

    /// Reads blocks from `lba` of namespace 1 into `range` of `buf`, cutting the request
    /// at MDTS, and waits for all of it.
    pub fn read(&mut self, lba: u64, buf: &mut DmaBuffer, range: Range<usize>) -> Result<(), Error> {
        self.transfer(false, lba, buf, range)
    }

    /// Writes `range` of `buf` to namespace 1 from `lba`, cutting the request at MDTS, and
    /// waits for all of it.
    pub fn write(&mut self, lba: u64, buf: &DmaBuffer, range: Range<usize>) -> Result<(), Error> {
        self.transfer(true, lba, buf, range)
    }

    fn transfer(&mut self, write: bool, lba: u64, buf: &DmaBuffer, range: Range<usize>) -> Result<(), Error> {
        let split = self.split(write, lba, buf, &range, self.ctrl.command_max)?;
        for chunk in split {
            let at = range.start + chunk.bytes.start as usize..range.start + chunk.bytes.end as usize;
            self.wait_for_room()?;
            let cid = self.submit_io(write, chunk.lba, buf, at)?;
            self.wait_for(cid)?;
        }
        Ok(())
    }

    /// Checks that `range` is non-empty, fits `buf`, starts on a 4-byte boundary and is a
    /// whole number of blocks, and cuts it into commands of at most `max` bytes.
    fn split(
        &self,
        write: bool,
        lba: u64,
        buf: &DmaBuffer,
        range: &Range<usize>,
        max: u64,
    ) -> Result<prp::Split, Error> {
        self.ctrl.check_usable()?;
        let op = if write { "write" } else { "read" };
        let block_size = self.ctrl.namespace().block_size();
        let bad_range = || Error::BufferRange {
            start: range.start,
            end: range.end,
            buf_len: buf.len(),
            block_size,
        };
        if range.start > range.end || range.end > buf.len() {
            return Err(bad_range());
        }
        if range.is_empty() {
            return Err(Error::ZeroLength { op, block_size });
        }
        let iova = buf.iova() + range.start as u64;
        if !iova.is_multiple_of(4) {
            return Err(Error::Misaligned {
                op,
                iova,
                offset: range.start,
            });
        }
        let offset = lba
            .checked_mul(u64::from(block_size))
            .ok_or(Error::LbaOverflow { lba, block_size })?;
        prp::split_by_mdts(offset, range.len() as u64, Some(max), block_size).map_err(|e| match e {
            SplitError::Unaligned { .. } => bad_range(),
            e => e.into(),
        })
    }

    /// Submits a read of blocks from `lba` of namespace 1 into `range` of `buf` and returns
    /// its command identifier without waiting; its completion comes from
    /// [`IoQueue::poll_completions`] or [`IoQueue::wait_completions`]. Fails with
    /// [`Error::TooLarge`] above [`IoQueue::max_command_bytes`] and with
    /// [`Error::QueueFull`] when [`IoQueue::max_in_flight`] commands are in flight.
    ///
    /// # Safety
    ///
    /// The controller writes `range` of `buf` until the command completes: `buf` must stay
    /// alive, and that range must not be read or written, until its completion has been
    /// reaped (or the controller is shut down).
    pub unsafe fn submit_read(
        &mut self,
        lba: u64,
        buf: &mut DmaBuffer,
        range: Range<usize>,
    ) -> Result<u16, Error> {
        self.submit_one(false, lba, buf, range)
    }

    /// Submits a write of `range` of `buf` to namespace 1 from `lba` and returns its command
    /// identifier without waiting, as [`IoQueue::submit_read`] does.
    ///
    /// # Safety
    ///
    /// The controller reads `range` of `buf` until the command completes: `buf` must stay
    /// alive, and that range must not be written, until its completion has been reaped (or
    /// the controller is shut down).
    pub unsafe fn submit_write(
        &mut self,
        lba: u64,
        buf: &DmaBuffer,
        range: Range<usize>,
    ) -> Result<u16, Error> {
        self.submit_one(true, lba, buf, range)
    }

    fn submit_one(
        &mut self,
        write: bool,
        lba: u64,
        buf: &DmaBuffer,
        range: Range<usize>,
    ) -> Result<u16, Error> {
        let split = self.split(write, lba, buf, &range, u64::MAX)?;
        if split.len() != 1 || range.len() as u64 > self.ctrl.command_max {
            return Err(Error::TooLarge {
                len: range.len() as u64,
                max: self.ctrl.command_max,
            });
        }
        if !self.qp.can_submit() {
            return Err(Error::QueueFull {
                qid: self.qp.qid(),
                in_flight: self.qp.in_flight(),
            });
        }
        self.submit_io(write, lba, buf, range)
    }

    /// Builds the PRPs of a checked single-command transfer in the list pages of the
    /// identifier it gets, and submits it.
    fn submit_io(
        &mut self,
        write: bool,
        lba: u64,
        buf: &DmaBuffer,
        range: Range<usize>,
    ) -> Result<u16, Error> {
        let len = range.len() as u64;
        let blocks = (len >> self.ctrl.namespace().block_size().trailing_zeros()) as u32;
        let start = buf.iova() + range.start as u64;
        let (page, per_cmd) = (self.ctrl.page, self.ctrl.list_pages_per_cmd);
        let (lists, all_iovas) = (&mut self.prp_lists, &self.list_iovas);
        let cid = self.qp.submit_with(|cid| {
            let first = usize::from(cid) * per_cmd;
            let list_iovas = &all_iovas[first..first + per_cmd];
            let prps = prp::build(len, page, |off| start + off, list_iovas)?;
            for list in &prps.list {
                let at = (list.iova - lists.iova()) as usize;
                let bytes = list.to_bytes();
                lists.as_mut_slice()[at..at + bytes.len()].copy_from_slice(&bytes);
            }
            Ok(if write {
                Command::write(cid, NSID, lba, blocks, prps.prp1, prps.prp2)?
            } else {
                Command::read(cid, NSID, lba, blocks, prps.prp1, prps.prp2)?
            })
        })?;
        self.pending[usize::from(cid)] = Some(if write {
            IoOp::Write { lba, blocks }
        } else {
            IoOp::Read { lba, blocks }
        });
        Ok(cid)
    }

    /// Makes every write completed on the namespace durable (a Flush command, for a
    /// volatile write cache), and waits for it.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.ctrl.check_usable()?;
        self.wait_for_room()?;
        let cid = self.qp.submit_with(|cid| Ok(Command::flush(cid, NSID)))?;
        self.pending[usize::from(cid)] = Some(IoOp::Flush);
        self.wait_for(cid)
    }

    /// Starts watching for a stall, e.g. before polling for completions in a loop.
    pub fn watchdog(&self) -> Watchdog {
        Watchdog(self.ctrl.health())
    }

    /// Call between polls that found nothing, with commands in flight: fails with
    /// [`Error::Timeout`] once the command timeout has passed since `dog` started, and at
    /// once with [`Error::Fatal`] or [`Error::Gone`] when the controller reports a fatal
    /// status or has left the bus. The controller is then out of service.
    pub fn check_stalled(&self, dog: &mut Watchdog) -> Result<(), Error> {
        let in_flight = self.qp.in_flight();
        self.watch(&mut dog.0, || format!("any of {in_flight} I/O commands"))
    }

    /// Reaps up to `max` completions of asynchronous commands without waiting. The outer
    /// error is the queue's (a device that is gone, a corrupt completion); each command's
    /// own failure is in its entry.
    pub fn poll_completions(&mut self, max: usize) -> Result<Vec<IoCompletion>, Error> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.done.pop_front() {
                Some(done) => out.push(done),
                None => break,
            }
        }
        while out.len() < max {
            match self.qp.poll()? {
                Some(cqe) => out.push(self.finish(cqe)),
                None => break,
            }
        }
        Ok(out)
    }

    /// Like [`IoQueue::poll_completions`], but waits up to the command timeout for at least
    /// one completion when commands are in flight; returns none when none are.
    pub fn wait_completions(&mut self, max: usize) -> Result<Vec<IoCompletion>, Error> {
        let mut health = self.ctrl.health();
        loop {
            let got = self.poll_completions(max)?;
            if !got.is_empty() || max == 0 || self.qp.in_flight() == 0 {
                return Ok(got);
            }
            let in_flight = self.qp.in_flight();
            self.watch(&mut health, || format!("any of {in_flight} I/O commands"))?;
        }
    }

    fn finish(&mut self, cqe: Completion) -> IoCompletion {
        let op = self.pending.get_mut(usize::from(cqe.cid)).and_then(Option::take);
        let result = cqe.check().map_err(|source| Error::Status {
            op: op.map_or_else(|| format!("I/O command {}", cqe.cid), IoOp::describe),
            source,
        });
        (cqe.cid, result)
    }

    /// One look at the controller's health while waiting; a timeout or fatal status puts
    /// the whole controller out of service.
    fn watch(&self, health: &mut Health, op: impl FnOnce() -> String) -> Result<(), Error> {
        health.check(&self.ctrl.bar, op).inspect_err(|e| {
            if e.puts_controller_out_of_service() {
                self.ctrl.mark_failed();
            }
        })
    }

    /// Waits until a command can be submitted, keeping completions reaped meanwhile for
    /// [`IoQueue::poll_completions`].
    fn wait_for_room(&mut self) -> Result<(), Error> {
        let mut health = self.ctrl.health();
        while !self.qp.can_submit() {
            if let Some(cqe) = self.qp.poll()? {
                let done = self.finish(cqe);
                self.done.push_back(done);
                continue;
            }
            self.watch(&mut health, || "a free I/O queue slot".to_owned())?;
        }
        Ok(())
    }

    /// Waits for command `cid`, keeping other completions for [`IoQueue::poll_completions`].
    fn wait_for(&mut self, cid: u16) -> Result<(), Error> {
        let mut health = self.ctrl.health();
        loop {
            if let Some(cqe) = self.qp.poll()? {
                let (got, result) = self.finish(cqe);
                if got == cid {
                    return result;
                }
                self.done.push_back((got, result));
                continue;
            }
            let op = self.pending[usize::from(cid)];
            self.watch(&mut health, || {
                op.map_or_else(|| format!("I/O command {cid}"), IoOp::describe)
            })?;
        }
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        // Best effort: a queue that cannot be deleted goes with the controller's reset.
        let _ = self.ctrl.delete_io_queue(self.qp.qid());
    }
}
