//! An NVMe controller driven from user space: reset and enable ("Initialization"), the
//! admin queue, Identify, the number of I/O queues, and a normal shutdown once the last
//! user is gone.
//!
//! [`Controller`] is shared by the threads that do I/O: each creates an
//! [`IoQueue`] of its own with [`Controller::create_io_queue`]
//! and drives it without locks. Only admin commands (creating and deleting queues) take
//! the admin queue's lock.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::io_queue::IoQueue;
use crate::nvme::cmd::{Command, CommandError, Completion, QueuePriority, MAX_BLOCKS_PER_COMMAND};
use crate::nvme::identify::{ControllerInfo, IdentifyError, Namespace, IDENTIFY_DATA_LEN};
use crate::nvme::prp::{self, PageSize, PrpError, SplitError};
use crate::nvme::queue::QueueError;
use crate::nvme::regs::{self, Aqa, Cap, Cc, Csts, RegError, ShutdownNotification, ShutdownStatus};
use crate::nvme::status::NvmeStatusError;
use crate::qpair::QueuePair;
use crate::vfio::{Bar, Container, Device, DmaBuffer, Group, VfioError};

/// Entries in the admin queue.
pub const ADMIN_QUEUE_ENTRIES: u32 = 32;
/// Entries in each I/O queue by default (capped by CAP.MQES): up to 255 commands in flight.
pub const IO_QUEUE_ENTRIES: u32 = 256;
/// The most entries an I/O queue is given, whatever is asked for.
pub const MAX_IO_QUEUE_ENTRIES: u32 = 1024;
/// The namespace the driver uses.
pub const NSID: u32 = 1;
/// How long a command may take, by default, before the controller is declared unresponsive.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the driver waits for a normal shutdown to complete.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// I/O queue pairs asked of the controller by default (it may grant fewer).
pub const IO_QUEUES: u16 = 16;
/// How often a thread waiting for a completion looks at the controller's status register.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(10);
/// CC.MPS: 4 KiB memory pages.
const MPS: u8 = 0;

/// How to bring a controller up.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// I/O queue pairs to ask for (Set Features, Number of Queues); the controller may
    /// grant fewer, and [`Controller::create_io_queue`] fails once all granted are in use.
    pub io_queues: u16,
    /// How long any command may take before it fails with [`Error::Timeout`].
    pub command_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            io_queues: IO_QUEUES,
            command_timeout: COMMAND_TIMEOUT,
        }
    }
}

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
        "the controller stopped answering: {op} did not complete within {waited:.2?}; reset it \
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
    Fatal { during: String },
    #[error(
        "the controller failed earlier (a timeout or a fatal status) and takes no more commands; \
         close it and open it again to reset it"
    )]
    Failed,
    #[error("registers read as all ones: the device is gone from the bus or powered off")]
    Gone,
    #[error("the controller does not support the NVM command set (CAP.CSS)")]
    NoNvmCommandSet,
    #[error("the controller does not support 4 KiB memory pages (CAP.MPSMIN={mpsmin}, MPSMAX={mpsmax})")]
    PageSize { mpsmin: u8, mpsmax: u8 },
    #[error("the controller granted no I/O queues")]
    NoIoQueues,
    #[error(
        "all {granted} I/O queue pairs the controller granted are in use: drop an I/O queue, or \
         ask for more with Options::io_queues"
    )]
    NoFreeQueue { granted: u16 },
    #[error("{open} I/O queues are still open: drop them before closing the controller")]
    QueuesOpen { open: usize },
    #[error("queue {qid} has no free command identifier")]
    NoCommandId { qid: u16 },
    #[error("completion for command {got} on queue {qid} while waiting for command {want}")]
    UnexpectedCompletion { qid: u16, want: u16, got: u16 },
    #[error("a {op} of zero bytes: a command moves at least one {block_size}-byte block")]
    ZeroLength { op: &'static str, block_size: u32 },
    #[error(
        "the data of a {op} starts at IOVA {iova:#x} (buffer offset {offset}), which is not \
         4-byte aligned as NVMe requires; start it on a 4-byte boundary"
    )]
    Misaligned {
        op: &'static str,
        iova: u64,
        offset: usize,
    },
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

/// The admin queue and which I/O queue identifiers are taken.
#[derive(Debug)]
struct Admin {
    qp: QueuePair,
    /// `in_use[qid - 1]`: whether I/O queue `qid` exists on the controller.
    in_use: Vec<bool>,
}

/// What the controller's users share. Dropping the last reference shuts it down.
#[derive(Debug)]
pub(crate) struct Shared {
    admin: Mutex<Admin>,
    info: ControllerInfo,
    ns: Namespace,
    cap: Cap,
    pub(crate) page: PageSize,
    max_transfer: Option<u64>,
    /// The most bytes one I/O command moves.
    pub(crate) command_max: u64,
    /// PRP list pages each command identifier of an I/O queue needs at most.
    pub(crate) list_pages_per_cmd: usize,
    pub(crate) options: Options,
    /// Set on a timeout or a fatal status: no more commands are sent.
    failed: AtomicBool,
    /// Set once shut down (by `close`), so that drop does not do it again.
    shut_down: bool,
    pub(crate) bar: Arc<Bar>,
    pub(crate) container: Arc<Container>,
    device: Device,
    _group: Option<Group>,
}

/// An enabled controller with its admin queue and namespace 1. Cheap to share between
/// threads by reference (it is `Sync`); each I/O thread creates its own [`IoQueue`].
#[derive(Debug)]
pub struct Controller {
    shared: Arc<Shared>,
}

impl Controller {
    /// Opens the controller at PCI address `pci` through the VFIO group file `group_path`,
    /// in a container of its own, with the default [`Options`].
    pub fn open(pci: &str, group_path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with(pci, group_path, Options::default())
    }

    /// Like [`Controller::open`], with `options`.
    pub fn open_with(pci: &str, group_path: impl AsRef<Path>, options: Options) -> Result<Self, Error> {
        let container = Container::open()?;
        let group = Group::open(&container, group_path)?;
        let device = group.device(pci)?;
        Self::init(container, device, Some(group), options)
    }

    /// Initializes an opened device whose group is attached to `container`.
    pub fn from_device(container: Arc<Container>, device: Device, options: Options) -> Result<Self, Error> {
        Self::init(container, device, None, options)
    }

    fn init(
        container: Arc<Container>,
        device: Device,
        group: Option<Group>,
        options: Options,
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

        let admin = QueuePair::new(&container, Arc::clone(&bar), 0, ADMIN_QUEUE_ENTRIES, cap.dstrd())?;
        bar.write32(regs::AQA, Aqa::new(ADMIN_QUEUE_ENTRIES, ADMIN_QUEUE_ENTRIES)?.0)?;
        bar.write64(regs::ASQ, regs::queue_base(admin.sq_iova(), page.bytes())?)?;
        bar.write64(regs::ACQ, regs::queue_base(admin.cq_iova(), page.bytes())?)?;
        bar.write32(regs::CC, Cc::nvm(MPS).with_enable(true).0)?;
        wait_ready(&bar, cap, true)?;

        // Until `Shared` exists, a failure leaves the controller enabled with no I/O
        // queues; the next open resets it.
        let mut admin = Admin {
            qp: admin,
            in_use: Vec::new(),
        };
        let run =
            |qp: &mut QueuePair, op: &str, cmd| Health::new(options.command_timeout).run(&bar, qp, op, cmd);
        let mut data = DmaBuffer::new(&container, IDENTIFY_DATA_LEN)?;
        run(
            &mut admin.qp,
            "Identify Controller",
            Command::identify_controller(0, data.iova()),
        )?;
        let info = ControllerInfo::parse(&data.as_slice()[..IDENTIFY_DATA_LEN])?;
        data.as_mut_slice().fill(0);
        run(
            &mut admin.qp,
            "Identify Namespace 1",
            Command::identify_namespace(0, NSID, data.iova()),
        )?;
        let ns = Namespace::parse(&data.as_slice()[..IDENTIFY_DATA_LEN])?;
        drop(data);

        let asked = u32::from(options.io_queues.max(1));
        let granted = run(
            &mut admin.qp,
            "Set Features (Number of Queues)",
            Command::set_features_num_queues(0, asked, asked)?,
        )?;
        let (nsq, ncq) = granted.queues_granted();
        let pairs = nsq.min(ncq).min(asked);
        if pairs == 0 {
            return Err(Error::NoIoQueues);
        }
        admin.in_use = vec![false; pairs as usize];

        let max_transfer = info.max_transfer_bytes(cap.min_page_size());
        let command_max = max_transfer
            .unwrap_or(u64::MAX)
            .min(u64::from(MAX_BLOCKS_PER_COMMAND) * u64::from(ns.block_size()));
        // Data may start anywhere in a page, so allow for one page more than the chunk.
        let list_pages_per_cmd = prp::list_pages_needed(4, command_max, page).max(1);
        Ok(Controller {
            shared: Arc::new(Shared {
                admin: Mutex::new(admin),
                info,
                ns,
                cap,
                page,
                max_transfer,
                command_max,
                list_pages_per_cmd,
                options,
                failed: AtomicBool::new(false),
                shut_down: false,
                bar,
                container,
                device,
                _group: group,
            }),
        })
    }

    /// The Identify Controller data.
    pub fn info(&self) -> &ControllerInfo {
        &self.shared.info
    }

    /// The Identify Namespace data of namespace 1.
    pub fn namespace(&self) -> &Namespace {
        &self.shared.ns
    }

    /// The controller's capabilities.
    pub fn cap(&self) -> Cap {
        self.shared.cap
    }

    /// The most bytes one command moves (MDTS), `None` when unlimited.
    pub fn max_transfer(&self) -> Option<u64> {
        self.shared.max_transfer
    }

    /// The most bytes one asynchronous command moves: MDTS, and at most 65536 blocks.
    pub fn max_command_bytes(&self) -> u64 {
        self.shared.command_max
    }

    /// The options the controller was opened with.
    pub fn options(&self) -> Options {
        self.shared.options
    }

    /// I/O queue pairs the controller granted: at most this many [`IoQueue`]s exist at once.
    pub fn io_queues_granted(&self) -> u16 {
        self.shared.lock_admin().in_use.len() as u16
    }

    /// The container the controller's DMA buffers must be allocated in.
    pub fn container(&self) -> &Arc<Container> {
        &self.shared.container
    }

    /// The PCI device.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// Whether a timeout or fatal status has put the controller out of service.
    pub fn has_failed(&self) -> bool {
        self.shared.has_failed()
    }

    /// Creates an I/O queue pair of `entries` entries (at least 2, capped at CAP.MQES + 1
    /// and [`MAX_IO_QUEUE_ENTRIES`]; `entries - 1` commands can be in flight) for the
    /// calling thread. The queue is deleted on the controller when dropped.
    pub fn create_io_queue(&self, entries: u32) -> Result<IoQueue, Error> {
        let shared = &self.shared;
        shared.check_usable()?;
        let entries = entries
            .min(MAX_IO_QUEUE_ENTRIES)
            .min(shared.cap.max_queue_entries());
        let mut admin = shared.lock_admin();
        let granted = admin.in_use.len() as u16;
        let index = admin
            .in_use
            .iter()
            .position(|used| !used)
            .ok_or(Error::NoFreeQueue { granted })?;
        let qid = index as u16 + 1;
        let qp = QueuePair::new(
            &shared.container,
            Arc::clone(&shared.bar),
            qid,
            entries,
            shared.cap.dstrd(),
        )?;
        let prp_lists = DmaBuffer::new(
            &shared.container,
            qp.capacity() * shared.list_pages_per_cmd * shared.page.bytes() as usize,
        )?;
        shared.admin_run(
            &mut admin,
            "Create I/O Completion Queue",
            Command::create_io_cq(0, qid, entries, qp.cq_iova(), true)?,
        )?;
        if let Err(e) = shared.admin_run(
            &mut admin,
            "Create I/O Submission Queue",
            Command::create_io_sq(0, qid, entries, qp.sq_iova(), qid, QueuePriority::Medium)?,
        ) {
            let _ = shared.admin_run(
                &mut admin,
                "Delete I/O Completion Queue",
                Command::delete_io_cq(0, qid)?,
            );
            return Err(e);
        }
        admin.in_use[index] = true;
        drop(admin);
        Ok(IoQueue::new(Arc::clone(shared), qp, prp_lists))
    }

    /// Shuts the controller down normally (CC.SHN), waiting for CSTS.SHST to report
    /// completion. Fails with [`Error::QueuesOpen`] while I/O queues exist. Dropping the
    /// controller and its queues does the same but cannot report failure.
    pub fn close(self) -> Result<(), Error> {
        match Arc::try_unwrap(self.shared) {
            Ok(mut shared) => shared.shutdown(),
            Err(shared) => Err(Error::QueuesOpen {
                open: Arc::strong_count(&shared) - 1,
            }),
        }
    }
}

impl Shared {
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Puts the controller out of service after a timeout or fatal status.
    pub(crate) fn mark_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn check_usable(&self) -> Result<(), Error> {
        if self.has_failed() {
            Err(Error::Failed)
        } else {
            Ok(())
        }
    }

    pub(crate) fn namespace(&self) -> &Namespace {
        &self.ns
    }

    pub(crate) fn health(&self) -> Health {
        Health::new(self.options.command_timeout)
    }

    fn lock_admin(&self) -> MutexGuard<'_, Admin> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admin_run(&self, admin: &mut Admin, op: &str, cmd: Command) -> Result<Completion, Error> {
        self.check_usable()?;
        self.health()
            .run(&self.bar, &mut admin.qp, op, cmd)
            .inspect_err(|e| {
                if e.puts_controller_out_of_service() {
                    self.mark_failed();
                }
            })
    }

    /// Deletes I/O queue `qid` (its submission queue, then its completion queue) and frees
    /// its identifier. On a failed controller only the identifier is freed.
    pub(crate) fn delete_io_queue(&self, qid: u16) -> Result<(), Error> {
        let mut admin = self.lock_admin();
        let deleted = if self.has_failed() {
            Ok(())
        } else {
            self.admin_run(
                &mut admin,
                "Delete I/O Submission Queue",
                Command::delete_io_sq(0, qid)?,
            )
            .and_then(|_| {
                self.admin_run(
                    &mut admin,
                    "Delete I/O Completion Queue",
                    Command::delete_io_cq(0, qid)?,
                )
            })
            .map(drop)
        };
        if let Some(used) = admin.in_use.get_mut(usize::from(qid) - 1) {
            *used = false;
        }
        deleted
    }

    /// A normal shutdown (CC.SHN); a failed controller is only disabled (CC.EN=0).
    fn shutdown(&mut self) -> Result<(), Error> {
        if std::mem::replace(&mut self.shut_down, true) {
            return Ok(());
        }
        let cc = Cc(self.bar.read32(regs::CC)?);
        if self.has_failed() {
            self.bar.write32(regs::CC, cc.with_enable(false).0)?;
            return Ok(());
        }
        self.bar
            .write32(regs::CC, cc.with_shutdown(ShutdownNotification::Normal).0)?;
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            let csts = Csts(self.bar.read32(regs::CSTS)?);
            if csts.is_all_ones() {
                return Err(Error::Gone);
            }
            if csts.shutdown_status() == ShutdownStatus::Complete {
                return Ok(());
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
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Best effort: a controller that does not shut down cleanly is reset on next open.
        let _ = self.shutdown();
    }
}

impl Error {
    /// Whether the error means the controller can no longer be trusted with commands.
    pub fn puts_controller_out_of_service(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::Fatal { .. } | Error::Gone)
    }
}

/// Watches a wait for completions: fails it once `timeout` has passed, and looks at the
/// controller's status register every few milliseconds, so that a controller that has
/// failed (CSTS.CFS) or left the bus is reported at once instead of after the timeout.
#[derive(Debug)]
pub(crate) struct Health {
    timeout: Duration,
    start: Instant,
    next_check: Instant,
}

impl Health {
    pub(crate) fn new(timeout: Duration) -> Self {
        let start = Instant::now();
        Health {
            timeout,
            start,
            next_check: start + HEALTH_CHECK_EVERY,
        }
    }

    /// Called between polls that found nothing: an error ends the wait.
    pub(crate) fn check(&mut self, bar: &Bar, op: impl FnOnce() -> String) -> Result<(), Error> {
        let now = Instant::now();
        if now < self.next_check {
            std::hint::spin_loop();
            return Ok(());
        }
        self.next_check = now + HEALTH_CHECK_EVERY;
        let csts = Csts(bar.read32(regs::CSTS)?);
        if csts.is_all_ones() {
            return Err(Error::Gone);
        }
        if csts.fatal() {
            return Err(Error::Fatal {
                during: format!("waiting for {}", op()),
            });
        }
        let waited = now - self.start;
        if waited >= self.timeout {
            return Err(Error::Timeout { op: op(), waited });
        }
        Ok(())
    }

    /// Submits `cmd` on `qp` and polls for its completion, with no other command outstanding.
    fn run(mut self, bar: &Bar, qp: &mut QueuePair, op: &str, cmd: Command) -> Result<Completion, Error> {
        let cid = qp.submit(cmd)?;
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
                    Err(source) => Err(Error::Status {
                        op: op.to_owned(),
                        source,
                    }),
                };
            }
            self.check(bar, || op.to_owned())?;
        }
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
            return Err(Error::Fatal {
                during: "enabling".to_owned(),
            });
        }
        if csts.ready() == ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            if csts.fatal() {
                return Err(Error::Fatal {
                    during: "resetting".to_owned(),
                });
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
