//! An NVMe controller driven from user space: reset and enable ("Initialization"), a
//! synchronous admin command path, Identify, one polled I/O queue pair with block read and
//! write, and a normal shutdown on drop.

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
/// Entries in each I/O queue (capped by CAP.MQES).
pub const IO_QUEUE_ENTRIES: u32 = 64;
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
}

/// An enabled controller with its admin queue, namespace 1 and one I/O queue pair.
#[derive(Debug)]
pub struct Controller {
    admin: QueuePair,
    io: QueuePair,
    prp_lists: DmaBuffer,
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
    /// in a container of its own.
    pub fn open(pci: &str, group_path: impl AsRef<Path>) -> Result<Self, Error> {
        let container = Container::open()?;
        let group = Group::open(&container, group_path)?;
        let device = group.device(pci)?;
        Self::init(container, device, Some(group))
    }

    /// Initializes an opened device whose group is attached to `container`.
    pub fn from_device(container: Arc<Container>, device: Device) -> Result<Self, Error> {
        Self::init(container, device, None)
    }

    fn init(container: Arc<Container>, device: Device, group: Option<Group>) -> Result<Self, Error> {
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

        let entries = IO_QUEUE_ENTRIES.min(cap.max_queue_entries());
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
        let chunk_max = max_transfer
            .unwrap_or(u64::MAX)
            .min(u64::from(crate::nvme::cmd::MAX_BLOCKS_PER_COMMAND) * u64::from(ns.block_size()));
        // Data may start anywhere in a page, so allow for one page more than the chunk.
        let list_pages = prp::list_pages_needed(4, chunk_max, page).max(1);
        let prp_lists = DmaBuffer::new(&container, list_pages * page.bytes() as usize)?;

        Ok(Controller {
            admin,
            io,
            prp_lists,
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
        let split = prp::split_by_mdts(offset, range.len() as u64, self.max_transfer, block_size).map_err(
            |e| match e {
                SplitError::Unaligned { .. } => bad_range(),
                e => e.into(),
            },
        )?;
        let base = buf.iova() + range.start as u64;
        let ps = self.page.bytes();
        let list_iovas: Vec<u64> = (0..self.prp_lists.len() as u64 / ps)
            .map(|i| self.prp_lists.iova() + i * ps)
            .collect();
        for chunk in split {
            let start = base + chunk.bytes.start;
            let len = chunk.bytes.end - chunk.bytes.start;
            let prps = prp::build(len, self.page, |off| start + off, &list_iovas)?;
            for list in &prps.list {
                let at = (list.iova - self.prp_lists.iova()) as usize;
                let bytes = list.to_bytes();
                self.prp_lists.as_mut_slice()[at..at + bytes.len()].copy_from_slice(&bytes);
            }
            let (name, cmd) = if write {
                (
                    "write",
                    Command::write(0, NSID, chunk.lba, chunk.blocks, prps.prp1, prps.prp2)?,
                )
            } else {
                (
                    "read",
                    Command::read(0, NSID, chunk.lba, chunk.blocks, prps.prp1, prps.prp2)?,
                )
            };
            let op = format!("{name} of {} blocks at LBA {}", chunk.blocks, chunk.lba);
            run_sync(&mut self.io, op, cmd)?;
        }
        Ok(())
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
