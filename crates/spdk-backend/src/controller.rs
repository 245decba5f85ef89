//! An NVMe controller driven from user space: reset and enable ("Initialization"), a
//! synchronous admin command path, Identify, one polled I/O queue pair with block read and
//! write (synchronous, or asynchronous with many commands in flight), and a normal shutdown
//! on drop.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::nvme::cmd::{Command, CommandError, Completion, QueuePriority};
use crate::nvme::identify::{ControllerInfo, IdentifyError, Namespace, IDENTIFY_DATA_LEN};
use crate::nvme::prp::{self, PageSize, PrpError, SplitError};
use crate::nvme::queue::QueueError;
use crate::nvme::regs::{self, Aqa, Cap, Cc, Csts, RegError, ShutdownNotification, ShutdownStatus};
use crate::nvme::status::NvmeStatusError;
use crate::qpair::QueuePair;
use crate::vfio::{Bar, Container, Device, DmaBuffer, Group, VfioError};

/// Entries in each admin queue.
pub const ADMIN_QUEUE_ENTRIES: u32 = 32;
/// Entries in each I/O queue by default (capped by CAP.MQES): up to 255 commands in flight.
pub const IO_QUEUE_ENTRIES: u32 = 256;
/// The most entries an I/O queue is given, whatever is asked for.
pub const MAX_IO_QUEUE_ENTRIES: u32 = 1024;
/// The namespace the driver uses.
pub const NSID: u32 = 1;
/// How long a command may take before the controller is declared unresponsive.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the driver waits for a normal shutdown to complete.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

const IO_QID: u16 = 1;
/// CC.MPS: 4 KiB memory pages.
const MPS: u8 = 0;

/// What can go wrong driving the controller.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error(transparent)]
    Reg(#[from] RegError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Identify(#[from] IdentifyError),
    #[error(transparent)]
    Prp(#[from] PrpError),
    #[error(transparent)]
    Split(#[from] SplitError),
    #[error("{op} failed: {source}")]
    Status { op: String, source: NvmeStatusError },
    #[error(
        "the controller stopped answering: {op} did not complete within {waited:?}; reset it \
         (or the VM) before further use"
    )]
    Timeout { op: String, waited: Duration },
    #[error("the controller did not {what} within CAP.TO ({waited:?}); CSTS={csts:#010x}")]
    ReadyTimeout {
        what: &'static str,
        waited: Duration,
        csts: u32,
    },
    #[error("the controller reports a fatal status (CSTS.CFS) while {during}; it needs a reset")]
    Fatal { during: &'static str },
    #[error("registers read as all ones: the device is gone from the bus or powered off")]
    Gone,
    #[error("the controller does not support the NVM command set (CAP.CSS)")]
    NoNvmCommandSet,
    #[error("the controller does not support 4 KiB memory pages (CAP.MPSMIN={mpsmin}, MPSMAX={mpsmax})")]
    PageSize { mpsmin: u8, mpsmax: u8 },
    #[error("the controller granted no I/O queues")]
    NoIoQueues,
    #[error("queue {qid} has no free command identifier")]
    NoCommandId { qid: u16 },
    #[error("completion for command {got} on queue {qid} while waiting for command {want}")]
    UnexpectedCompletion { qid: u16, want: u16, got: u16 },
    #[error(
        "buffer range {start}..{end} does not fit the {buf_len}-byte DMA buffer or is not a whole \
         number of {block_size}-byte blocks"
    )]
    BufferRange {
        start: usize,
        end: usize,
        buf_len: usize,
        block_size: u32,
    },
    #[error("LBA {lba} times the {block_size}-byte block size overflows")]
    LbaOverflow { lba: u64, block_size: u32 },
    #[error("queue {qid} is full ({in_flight} commands in flight): reap completions before submitting more")]
    QueueFull { qid: u16, in_flight: usize },
    #[error(
        "a transfer of {len} bytes is larger than one command moves ({max} bytes, MDTS); split it or \
         use the synchronous read/write"
    )]
    TooLarge { len: u64, max: u64 },
}

/// The outcome of one asynchronous command: its identifier, and whether it succeeded.
pub type IoCompletion = (u16, Result<(), Error>);

/// An I/O command in flight, kept to describe its failure.
#[derive(Clone, Copy, Debug)]
struct IoOp {
    write: bool,
    lba: u64,
    blocks: u32,
}

impl IoOp {
    fn describe(self) -> String {
        let name = if self.write { "write" } else { "read" };
        format!("{name} of {} blocks at LBA {}", self.blocks, self.lba)
    }
}

/// An enabled controller with its admin queue, namespace 1 and one I/O queue pair.
#[derive(Debug)]
pub struct Controller {
    admin: QueuePair,
    io: QueuePair,
    /// `list_pages_per_cmd` PRP list pages for each command identifier of the I/O queue.
    prp_lists: DmaBuffer,
    list_pages_per_cmd: usize,
    /// The I/O command behind each identifier in flight.
    pending: Vec<Option<IoOp>>,
    /// Completions reaped while waiting for a particular command, not yet handed out.
    done: VecDeque<IoCompletion>,
    /// The most bytes one I/O command moves.
    command_max: u64,
    info: ControllerInfo,
    ns: Namespace,
    cap: Cap,
    page: PageSize,
    max_transfer: Option<u64>,
    bar: Arc<Bar>,
    container: Arc<Container>,
    device: Device,
    _group: Option<Group>,
    shut_down: bool,
}

impl Controller {
    /// Opens the controller at PCI address `pci` through the VFIO group file `group_path`,
    /// in a container of its own, with an I/O queue of [`IO_QUEUE_ENTRIES`] entries.
    pub fn open(pci: &str, group_path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with_io_entries(pci, group_path, IO_QUEUE_ENTRIES)
    }

    /// Like [`Controller::open`], with an I/O queue of `io_entries` entries (at least 2),
    /// capped at CAP.MQES + 1 and [`MAX_IO_QUEUE_ENTRIES`]; `io_entries - 1` commands can
    /// be in flight.
    pub fn open_with_io_entries(
        pci: &str,
        group_path: impl AsRef<Path>,
        io_entries: u32,
    ) -> Result<Self, Error> {
        let container = Container::open()?;
        let group = Group::open(&container, group_path)?;
        let device = group.device(pci)?;
        Self::init(container, device, Some(group), io_entries)
    }

    /// Initializes an opened device whose group is attached to `container`.
    pub fn from_device(container: Arc<Container>, device: Device) -> Result<Self, Error> {
        Self::from_device_with_io_entries(container, device, IO_QUEUE_ENTRIES)
    }

    /// Like [`Controller::from_device`], with an I/O queue of `io_entries` entries, capped
    /// as in [`Controller::open_with_io_entries`].
    pub fn from_device_with_io_entries(
        container: Arc<Container>,
        device: Device,
        io_entries: u32,
    ) -> Result<Self, Error> {
        Self::init(container, device, None, io_entries)
    }

    fn init(
        container: Arc<Container>,
        device: Device,
        group: Option<Group>,
        io_entries: u32,
    ) -> Result<Self, Error> {
        device.enable_bus_master()?;
        let bar = Arc::new(device.map_bar0()?);
        let cap = Cap(bar.read64(regs::CAP)?);
        if cap.0 == u64::MAX {
            return Err(Error::Gone);
        }
        if !cap.css_nvm() {
            return Err(Error::NoNvmCommandSet);
        }
        if !cap.supports_mps(MPS) {
            return Err(Error::PageSize {
                mpsmin: cap.mpsmin(),
                mpsmax: cap.mpsmax(),
            });
        }
        let page = PageSize::from_mps(MPS);

        // Reset: disable, and wait for the controller to leave the ready state.
        let cc = Cc(bar.read32(regs::CC)?);
        if cc.enabled() {
            bar.write32(regs::CC, cc.with_enable(false).0)?;
        }
        wait_ready(&bar, cap, false)?;

        let mut admin = QueuePair::new(&container, Arc::clone(&bar), 0, ADMIN_QUEUE_ENTRIES, cap.dstrd())?;
        bar.write32(regs::AQA, Aqa::new(ADMIN_QUEUE_ENTRIES, ADMIN_QUEUE_ENTRIES)?.0)?;
        bar.write64(regs::ASQ, regs::queue_base(admin.sq_iova(), page.bytes())?)?;
        bar.write64(regs::ACQ, regs::queue_base(admin.cq_iova(), page.bytes())?)?;
        bar.write32(regs::CC, Cc::nvm(MPS).with_enable(true).0)?;
        wait_ready(&bar, cap, true)?;

        let mut data = DmaBuffer::new(&container, IDENTIFY_DATA_LEN)?;
        admin_run(
            &mut admin,
            "Identify Controller",
            Command::identify_controller(0, data.iova()),
        )?;
        let info = ControllerInfo::parse(&data.as_slice()[..IDENTIFY_DATA_LEN])?;
        data.as_mut_slice().fill(0);
        admin_run(
            &mut admin,
            "Identify Namespace 1",
            Command::identify_namespace(0, NSID, data.iova()),
        )?;
        let ns = Namespace::parse(&data.as_slice()[..IDENTIFY_DATA_LEN])?;
        drop(data);

        let granted = admin_run(
            &mut admin,
            "Set Features (Number of Queues)",
            Command::set_features_num_queues(0, 1, 1)?,
        )?;
        let (nsq, ncq) = granted.queues_granted();
        if nsq == 0 || ncq == 0 {
            return Err(Error::NoIoQueues);
        }

        let entries = io_entries.min(MAX_IO_QUEUE_ENTRIES).min(cap.max_queue_entries());
        let io = QueuePair::new(&container, Arc::clone(&bar), IO_QID, entries, cap.dstrd())?;
        admin_run(
            &mut admin,
            "Create I/O Completion Queue",
            Command::create_io_cq(0, IO_QID, entries, io.cq_iova(), true)?,
        )?;
        admin_run(
            &mut admin,
            "Create I/O Submission Queue",
            Command::create_io_sq(0, IO_QID, entries, io.sq_iova(), IO_QID, QueuePriority::Medium)?,
        )?;

        let max_transfer = info.max_transfer_bytes(cap.min_page_size());
        let command_max = max_transfer
            .unwrap_or(u64::MAX)
            .min(u64::from(crate::nvme::cmd::MAX_BLOCKS_PER_COMMAND) * u64::from(ns.block_size()));
        // Data may start anywhere in a page, so allow for one page more than the chunk.
        let list_pages_per_cmd = prp::list_pages_needed(4, command_max, page).max(1);
        let capacity = io.capacity();
        let prp_lists = DmaBuffer::new(&container, capacity * list_pages_per_cmd * page.bytes() as usize)?;

        Ok(Controller {
            admin,
            io,
            prp_lists,
            list_pages_per_cmd,
            pending: vec![None; capacity],
            done: VecDeque::new(),
            command_max,
            info,
            ns,
            cap,
            page,
            max_transfer,
            bar,
            container,
            device,
            _group: group,
            shut_down: false,
        })
    }

    /// The Identify Controller data.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// The Identify Namespace data of namespace 1.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The controller's capabilities.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// The most bytes one command moves (MDTS), `None` when unlimited.
    pub fn max_transfer(&self) -> Option<u64> {
        self.max_transfer
    }

    /// The container the controller's DMA buffers must be allocated in.
    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }

    /// The PCI device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Reads blocks from `lba` of namespace 1 into `range` of `buf`, cutting the request
    /// at MDTS.
    pub fn read(&mut self, lba: u64, buf: &mut DmaBuffer, range: Range<usize>) -> Result<(), Error> {
        self.transfer(false, lba, buf, range)
    }

    /// Writes `range` of `buf` to namespace 1 from `lba`, cutting the request at MDTS.
    pub fn write(&mut self, lba: u64, buf: &DmaBuffer, range: Range<usize>) -> Result<(), Error> {
        self.transfer(true, lba, buf, range)
    }

    fn transfer(&mut self, write: bool, lba: u64, buf: &DmaBuffer, range: Range<usize>) -> Result<(), Error> {
        let split = self.split(lba, buf, &range, self.max_transfer)?;
        for chunk in split {
            let at = range.start + chunk.bytes.start as usize..range.start + chunk.bytes.end as usize;
            self.wait_for_room()?;
            let cid = self.submit_io(write, chunk.lba, buf, at)?;
            self.wait_for(cid)?;
        }
        Ok(())
    }

    /// Checks that `range` fits `buf` and is a whole number of blocks, and cuts it into
    /// commands of at most `max_transfer` bytes.
    fn split(
        &self,
        lba: u64,
        buf: &DmaBuffer,
        range: &Range<usize>,
        max_transfer: Option<u64>,
    ) -> Result<prp::Split, Error> {
        let block_size = self.ns.block_size();
        let bad_range = || Error::BufferRange {
            start: range.start,
            end: range.end,
            buf_len: buf.len(),
            block_size,
        };
        if range.start > range.end || range.end > buf.len() {
            return Err(bad_range());
        }
        let offset = lba
            .checked_mul(u64::from(block_size))
            .ok_or(Error::LbaOverflow { lba, block_size })?;
        prp::split_by_mdts(offset, range.len() as u64, max_transfer, block_size).map_err(|e| match e {
            SplitError::Unaligned { .. } => bad_range(),
            e => e.into(),
        })
    }

    /// Entries in the I/O queue.
    pub fn io_queue_entries(&self) -> u32 {
        self.io.entries()
    }

    /// The most I/O commands in flight at once (entries - 1).
    pub fn max_in_flight(&self) -> usize {
        self.io.capacity()
    }

    /// I/O commands submitted whose completions the controller has not posted or the
    /// driver has not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.io.in_flight()
    }

    /// Whether an asynchronous command can be submitted now without [`Error::QueueFull`].
    pub fn can_submit(&self) -> bool {
        self.io.can_submit()
    }

    /// The most bytes one asynchronous command moves: MDTS, and at most 65536 blocks.
    pub fn max_command_bytes(&self) -> u64 {
        self.command_max
    }

    /// Submits a read of blocks from `lba` of namespace 1 into `range` of `buf` and returns
    /// its command identifier without waiting; its completion comes from
    /// [`Controller::poll_completions`] or [`Controller::wait_completions`]. Fails with
    /// [`Error::TooLarge`] above [`Controller::max_command_bytes`] and with
    /// [`Error::QueueFull`] when [`Controller::max_in_flight`] commands are in flight.
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
    /// identifier without waiting, as [`Controller::submit_read`] does.
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
        let split = self.split(lba, buf, &range, None)?;
        if split.len() != 1 || range.len() as u64 > self.command_max {
            return Err(Error::TooLarge {
                len: range.len() as u64,
                max: self.command_max,
            });
        }
        if !self.io.can_submit() {
            return Err(Error::QueueFull {
                qid: self.io.qid(),
                in_flight: self.io.in_flight(),
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
        let blocks = (len >> self.ns.block_size().trailing_zeros()) as u32;
        let start = buf.iova() + range.start as u64;
        let (page, per_cmd) = (self.page, self.list_pages_per_cmd as u64);
        let lists = &mut self.prp_lists;
        let cid = self.io.submit_with(|cid| {
            let first = lists.iova() + u64::from(cid) * per_cmd * page.bytes();
            let list_iovas: Vec<u64> = (0..per_cmd).map(|i| first + i * page.bytes()).collect();
            let prps = prp::build(len, page, |off| start + off, &list_iovas)?;
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
        self.pending[usize::from(cid)] = Some(IoOp { write, lba, blocks });
        Ok(cid)
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
            match self.io.poll()? {
                Some(cqe) => out.push(self.finish(cqe)),
                None => break,
            }
        }
        Ok(out)
    }

    /// Like [`Controller::poll_completions`], but waits up to [`COMMAND_TIMEOUT`] for at
    /// least one completion when commands are in flight; returns none when none are.
    pub fn wait_completions(&mut self, max: usize) -> Result<Vec<IoCompletion>, Error> {
        let start = Instant::now();
        loop {
            let got = self.poll_completions(max)?;
            if !got.is_empty() || max == 0 || self.io.in_flight() == 0 {
                return Ok(got);
            }
            let waited = start.elapsed();
            if waited >= COMMAND_TIMEOUT {
                return Err(Error::Timeout {
                    op: format!("any of {} I/O commands", self.io.in_flight()),
                    waited,
                });
            }
            std::hint::spin_loop();
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

    /// Waits until a command can be submitted, keeping completions reaped meanwhile for
    /// [`Controller::poll_completions`].
    fn wait_for_room(&mut self) -> Result<(), Error> {
        let start = Instant::now();
        while !self.io.can_submit() {
            if let Some(cqe) = self.io.poll()? {
                let done = self.finish(cqe);
                self.done.push_back(done);
                continue;
            }
            let waited = start.elapsed();
            if waited >= COMMAND_TIMEOUT {
                return Err(Error::Timeout {
                    op: "a free I/O queue slot".to_owned(),
                    waited,
                });
            }
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// Waits for command `cid`, keeping other completions for
    /// [`Controller::poll_completions`].
    fn wait_for(&mut self, cid: u16) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            if let Some(cqe) = self.io.poll()? {
                let (got, result) = self.finish(cqe);
                if got == cid {
                    return result;
                }
                self.done.push_back((got, result));
                continue;
            }
            let waited = start.elapsed();
            if waited >= COMMAND_TIMEOUT {
                let op = self.pending[usize::from(cid)]
                    .map_or_else(|| format!("I/O command {cid}"), IoOp::describe);
                return Err(Error::Timeout { op, waited });
            }
            std::hint::spin_loop();
        }
    }

    /// Deletes the I/O queues and shuts the controller down normally (CC.SHN), waiting for
    /// CSTS.SHST to report completion; dropping the controller does the same but cannot
    /// report failure.
    pub fn close(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        if self.shut_down {
            return Ok(());
        }
        self.shut_down = true;
        let admin = &mut self.admin;
        let deleted = admin_run(
            admin,
            "Delete I/O Submission Queue",
            Command::delete_io_sq(0, IO_QID)?,
        )
        .and_then(|_| {
            admin_run(
                admin,
                "Delete I/O Completion Queue",
                Command::delete_io_cq(0, IO_QID)?,
            )
        });
        let cc = Cc(self.bar.read32(regs::CC)?).with_shutdown(ShutdownNotification::Normal);
        self.bar.write32(regs::CC, cc.0)?;
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            let csts = Csts(self.bar.read32(regs::CSTS)?);
            if csts.is_all_ones() {
                return Err(Error::Gone);
            }
            if csts.shutdown_status() == ShutdownStatus::Complete {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::ReadyTimeout {
                    what: "complete a normal shutdown",
                    waited: SHUTDOWN_TIMEOUT,
                    csts: csts.0,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        deleted.map(drop)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Best effort: a controller that does not shut down cleanly is reset on next open.
        let _ = self.shutdown();
    }
}

/// Runs one admin command synchronously.
fn admin_run(admin: &mut QueuePair, op: &str, cmd: Command) -> Result<Completion, Error> {
    run_sync(admin, op.to_owned(), cmd)
}

/// Submits `cmd` on `qp` and polls for its completion, with no other command outstanding.
fn run_sync(qp: &mut QueuePair, op: String, cmd: Command) -> Result<Completion, Error> {
    let cid = qp.submit(cmd)?;
    let start = Instant::now();
    loop {
        if let Some(cqe) = qp.poll()? {
            if cqe.cid != cid {
                return Err(Error::UnexpectedCompletion {
                    qid: qp.qid(),
                    want: cid,
                    got: cqe.cid,
                });
            }
            return match cqe.check() {
                Ok(()) => Ok(cqe),
                Err(source) => Err(Error::Status { op, source }),
            };
        }
        let waited = start.elapsed();
        if waited >= COMMAND_TIMEOUT {
            return Err(Error::Timeout { op, waited });
        }
        std::hint::spin_loop();
    }
}

/// Waits up to CAP.TO for CSTS.RDY to equal `ready`.
fn wait_ready(bar: &Bar, cap: Cap, ready: bool) -> Result<(), Error> {
    let timeout = cap.timeout().max(Duration::from_millis(500));
    let deadline = Instant::now() + timeout;
    loop {
        let csts = Csts(bar.read32(regs::CSTS)?);
        if csts.is_all_ones() {
            return Err(Error::Gone);
        }
        if ready && csts.fatal() {
            return Err(Error::Fatal { during: "enabling" });
        }
        if csts.ready() == ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            if csts.fatal() {
                return Err(Error::Fatal { during: "resetting" });
            }
            return Err(Error::ReadyTimeout {
                what: if ready {
                    "become ready (CSTS.RDY=1)"
                } else {
                    "reset (CSTS.RDY=0)"
                },
                waited: timeout,
                csts: csts.0,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
