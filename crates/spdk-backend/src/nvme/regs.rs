//! Controller registers (base specification, "Controller Registers" and "Controller
//! Initialization").
//!
//! The registers live in BAR0 of the controller's PCI function. This module only knows their
//! offsets and bit layouts: reading and writing them is the caller's business. Each register
//! has a small newtype over its raw value with typed accessors; [`Cc`] and [`Aqa`] are also
//! builders, since the host writes them.

use std::fmt;
use std::time::Duration;

use thiserror::Error;

/// Offset of CAP, Controller Capabilities (64 bits, read-only).
pub const CAP: usize = 0x00;
/// Offset of VS, Version (32 bits, read-only).
pub const VS: usize = 0x08;
/// Offset of INTMS, Interrupt Mask Set (32 bits; not used with MSI-X).
pub const INTMS: usize = 0x0C;
/// Offset of INTMC, Interrupt Mask Clear (32 bits; not used with MSI-X).
pub const INTMC: usize = 0x10;
/// Offset of CC, Controller Configuration (32 bits).
pub const CC: usize = 0x14;
/// Offset of CSTS, Controller Status (32 bits).
pub const CSTS: usize = 0x1C;
/// Offset of NSSR, NVM Subsystem Reset (32 bits, optional).
pub const NSSR: usize = 0x20;
/// Offset of AQA, Admin Queue Attributes (32 bits).
pub const AQA: usize = 0x24;
/// Offset of ASQ, Admin Submission Queue Base Address (64 bits).
pub const ASQ: usize = 0x28;
/// Offset of ACQ, Admin Completion Queue Base Address (64 bits).
pub const ACQ: usize = 0x30;
/// Offset of the first doorbell register (the admin submission queue's tail doorbell).
pub const DOORBELL_BASE: usize = 0x1000;

/// Errors building register values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RegError {
    /// An admin queue size outside what AQA can express.
    #[error(
        "admin {queue} queue of {entries} entries: AQA holds sizes of {min}..={max} entries",
        min = ADMIN_QUEUE_MIN_ENTRIES,
        max = ADMIN_QUEUE_MAX_ENTRIES
    )]
    AdminQueueSize {
        /// "submission" or "completion".
        queue: &'static str,
        /// The size asked for.
        entries: u32,
    },
    /// A queue base address that is not aligned to the memory page size.
    #[error("queue base address {addr:#x} is not aligned to the {page_size}-byte memory page size")]
    QueueBaseUnaligned {
        /// The address given.
        addr: u64,
        /// The memory page size (CC.MPS).
        page_size: u64,
    },
}

/// CAP: what the controller supports ("Offset 0h: CAP – Controller Capabilities").
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Cap(pub u64);

impl Cap {
    /// MQES, Maximum Queue Entries Supported, as reported (a 0-based value). See
    /// [`Cap::max_queue_entries`] for the entry count.
    pub fn mqes(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }

    /// The largest I/O queue the controller accepts, in entries (MQES + 1).
    pub fn max_queue_entries(self) -> u32 {
        u32::from(self.mqes()) + 1
    }

    /// CQR, Contiguous Queues Required: I/O queues must be physically contiguous.
    pub fn cqr(self) -> bool {
        self.0 & (1 << 16) != 0
    }

    /// AMS, Arbitration Mechanism Supported, beyond round robin (bit 0: weighted round robin
    /// with urgent priority class, bit 1: vendor specific).
    pub fn ams(self) -> u8 {
        ((self.0 >> 17) & 0x3) as u8
    }

    /// TO, Timeout, as reported: the worst-case time to wait for CSTS.RDY to change after
    /// CC.EN changes, in 500 ms units.
    pub fn to(self) -> u8 {
        ((self.0 >> 24) & 0xFF) as u8
    }

    /// TO as a duration.
    pub fn timeout(self) -> Duration {
        Duration::from_millis(u64::from(self.to()) * 500)
    }

    /// DSTRD, Doorbell Stride, as reported: doorbells are `4 << DSTRD` bytes apart.
    pub fn dstrd(self) -> u8 {
        ((self.0 >> 32) & 0xF) as u8
    }

    /// The distance between two doorbell registers, in bytes.
    pub fn doorbell_stride(self) -> usize {
        4 << self.dstrd()
    }

    /// NSSRS, NVM Subsystem Reset Supported.
    pub fn nssrs(self) -> bool {
        self.0 & (1 << 36) != 0
    }

    /// CSS, Command Sets Supported, as an 8-bit field (bit 0: NVM command set, bit 6: I/O
    /// command sets (2.0), bit 7: admin command set only (2.0)).
    pub fn css(self) -> u8 {
        ((self.0 >> 37) & 0xFF) as u8
    }

    /// Whether the NVM command set is supported (CSS bit 0).
    pub fn css_nvm(self) -> bool {
        self.css() & 1 != 0
    }

    /// BPS, Boot Partition Support.
    pub fn bps(self) -> bool {
        self.0 & (1 << 45) != 0
    }

    /// MPSMIN, Memory Page Size Minimum, as reported: the smallest page size is
    /// `2 ^ (12 + MPSMIN)` bytes.
    pub fn mpsmin(self) -> u8 {
        ((self.0 >> 48) & 0xF) as u8
    }

    /// MPSMAX, Memory Page Size Maximum, as reported: the largest page size is
    /// `2 ^ (12 + MPSMAX)` bytes.
    pub fn mpsmax(self) -> u8 {
        ((self.0 >> 52) & 0xF) as u8
    }

    /// The smallest memory page size, in bytes.
    pub fn min_page_size(self) -> u64 {
        page_size_from_mps(self.mpsmin())
    }

    /// The largest memory page size, in bytes.
    pub fn max_page_size(self) -> u64 {
        page_size_from_mps(self.mpsmax())
    }

    /// Whether a memory page size field value (CC.MPS) lies in MPSMIN..=MPSMAX.
    pub fn supports_mps(self, mps: u8) -> bool {
        (self.mpsmin()..=self.mpsmax()).contains(&mps)
    }
}

impl fmt::Debug for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cap")
            .field("raw", &format_args!("{:#018x}", self.0))
            .field("max_queue_entries", &self.max_queue_entries())
            .field("cqr", &self.cqr())
            .field("timeout", &self.timeout())
            .field("doorbell_stride", &self.doorbell_stride())
            .field("css", &format_args!("{:#04x}", self.css()))
            .field("min_page_size", &self.min_page_size())
            .field("max_page_size", &self.max_page_size())
            .finish()
    }
}

/// The memory page size, in bytes, that an MPS, MPSMIN or MPSMAX value stands for:
/// `2 ^ (12 + mps)`.
pub fn page_size_from_mps(mps: u8) -> u64 {
    1u64 << (12 + u32::from(mps & 0xF))
}

/// VS: the specification version the controller implements ("Offset 8h: VS – Version").
///
/// Ordered by (major, minor, tertiary), so `version >= Version::V1_4` reads naturally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version {
    /// MJR, Major Version Number.
    pub major: u16,
    /// MNR, Minor Version Number.
    pub minor: u8,
    /// TER, Tertiary Version Number.
    pub tertiary: u8,
}

impl Version {
    /// NVMe 1.2.
    pub const V1_2: Version = Version::new(1, 2, 0);
    /// NVMe 1.3.
    pub const V1_3: Version = Version::new(1, 3, 0);
    /// NVMe 1.4.
    pub const V1_4: Version = Version::new(1, 4, 0);
    /// NVMe 2.0.
    pub const V2_0: Version = Version::new(2, 0, 0);

    /// A version from its parts.
    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Self {
        Version {
            major,
            minor,
            tertiary,
        }
    }

    /// Decodes the register value (MJR in bits 31:16, MNR in 15:8, TER in 7:0).
    pub const fn from_raw(raw: u32) -> Self {
        Version {
            major: (raw >> 16) as u16,
            minor: (raw >> 8) as u8,
            tertiary: raw as u8,
        }
    }

    /// Encodes the register value.
    pub const fn to_raw(self) -> u32 {
        (self.major as u32) << 16 | (self.minor as u32) << 8 | self.tertiary as u32
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.tertiary)
    }
}

/// CC.CSS, the I/O command set selected when the controller is enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandSetSelect {
    /// The NVM command set (000b).
    Nvm,
    /// All I/O command sets the controller supports (110b, 2.0).
    AllSupported,
    /// Admin command set only (111b).
    AdminOnly,
}

impl CommandSetSelect {
    const fn bits(self) -> u32 {
        match self {
            CommandSetSelect::Nvm => 0b000,
            CommandSetSelect::AllSupported => 0b110,
            CommandSetSelect::AdminOnly => 0b111,
        }
    }
}

/// CC.AMS, the arbitration mechanism among submission queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arbitration {
    /// Round robin (000b), always supported.
    RoundRobin,
    /// Weighted round robin with urgent priority class (001b), when CAP.AMS bit 0 is set.
    WeightedRoundRobin,
    /// Vendor specific (111b), when CAP.AMS bit 1 is set.
    VendorSpecific,
}

impl Arbitration {
    const fn bits(self) -> u32 {
        match self {
            Arbitration::RoundRobin => 0b000,
            Arbitration::WeightedRoundRobin => 0b001,
            Arbitration::VendorSpecific => 0b111,
        }
    }
}

/// CC.SHN, a shutdown notification from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownNotification {
    /// No notification (00b).
    None,
    /// Normal shutdown (01b): the controller finishes what is in flight and flushes.
    Normal,
    /// Abrupt shutdown (10b): the controller saves what it can, at once.
    Abrupt,
}

impl ShutdownNotification {
    const fn bits(self) -> u32 {
        match self {
            ShutdownNotification::None => 0b00,
            ShutdownNotification::Normal => 0b01,
            ShutdownNotification::Abrupt => 0b10,
        }
    }
}

/// log2 of the I/O submission queue entry size the driver uses (64 bytes).
pub const IOSQES_64B: u8 = 6;
/// log2 of the I/O completion queue entry size the driver uses (16 bytes).
pub const IOCQES_16B: u8 = 4;

/// CC: how the host configures the controller ("Offset 14h: CC – Controller Configuration").
///
/// A builder over the raw value: start from [`Cc::nvm`] (or [`Cc::default`], all zero) and
/// chain the `with_*` methods.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Cc(pub u32);

impl Cc {
    const EN: u32 = 1;
    const CSS_SHIFT: u32 = 4;
    const MPS_SHIFT: u32 = 7;
    const AMS_SHIFT: u32 = 11;
    const SHN_SHIFT: u32 = 14;
    const IOSQES_SHIFT: u32 = 16;
    const IOCQES_SHIFT: u32 = 20;

    /// The configuration the driver enables a controller with, still disabled: NVM command
    /// set, round robin arbitration, memory page size `2 ^ (12 + mps)`, 64-byte submission
    /// and 16-byte completion entries.
    pub const fn nvm(mps: u8) -> Self {
        Cc(0)
            .with_css(CommandSetSelect::Nvm)
            .with_mps(mps)
            .with_ams(Arbitration::RoundRobin)
            .with_iosqes(IOSQES_64B)
            .with_iocqes(IOCQES_16B)
    }

    const fn with_field(self, shift: u32, width: u32, value: u32) -> Self {
        let mask = ((1 << width) - 1) << shift;
        Cc((self.0 & !mask) | ((value << shift) & mask))
    }

    /// Sets or clears EN, Enable.
    pub const fn with_enable(self, enable: bool) -> Self {
        self.with_field(0, 1, enable as u32)
    }

    /// Sets CSS, I/O Command Set Selected.
    pub const fn with_css(self, css: CommandSetSelect) -> Self {
        self.with_field(Self::CSS_SHIFT, 3, css.bits())
    }

    /// Sets MPS, Memory Page Size (`2 ^ (12 + mps)` bytes; 4 bits).
    pub const fn with_mps(self, mps: u8) -> Self {
        self.with_field(Self::MPS_SHIFT, 4, mps as u32)
    }

    /// Sets AMS, Arbitration Mechanism Selected.
    pub const fn with_ams(self, ams: Arbitration) -> Self {
        self.with_field(Self::AMS_SHIFT, 3, ams.bits())
    }

    /// Sets SHN, Shutdown Notification.
    pub const fn with_shutdown(self, shn: ShutdownNotification) -> Self {
        self.with_field(Self::SHN_SHIFT, 2, shn.bits())
    }

    /// Sets IOSQES, I/O Submission Queue Entry Size, as log2 of the size in bytes.
    pub const fn with_iosqes(self, log2: u8) -> Self {
        self.with_field(Self::IOSQES_SHIFT, 4, log2 as u32)
    }

    /// Sets IOCQES, I/O Completion Queue Entry Size, as log2 of the size in bytes.
    pub const fn with_iocqes(self, log2: u8) -> Self {
        self.with_field(Self::IOCQES_SHIFT, 4, log2 as u32)
    }

    /// EN, Enable.
    pub const fn enabled(self) -> bool {
        self.0 & Self::EN != 0
    }

    /// MPS, Memory Page Size, as a field value.
    pub const fn mps(self) -> u8 {
        ((self.0 >> Self::MPS_SHIFT) & 0xF) as u8
    }

    /// The memory page size in bytes.
    pub fn page_size(self) -> u64 {
        page_size_from_mps(self.mps())
    }

    /// SHN, Shutdown Notification, as a 2-bit field value.
    pub const fn shn(self) -> u8 {
        ((self.0 >> Self::SHN_SHIFT) & 0x3) as u8
    }

    /// IOSQES as log2 of the entry size.
    pub const fn iosqes(self) -> u8 {
        ((self.0 >> Self::IOSQES_SHIFT) & 0xF) as u8
    }

    /// IOCQES as log2 of the entry size.
    pub const fn iocqes(self) -> u8 {
        ((self.0 >> Self::IOCQES_SHIFT) & 0xF) as u8
    }
}

impl fmt::Debug for Cc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cc({:#010x})", self.0)
    }
}

/// CSTS.SHST, the progress of a shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownStatus {
    /// Normal operation, no shutdown requested (00b).
    Normal,
    /// Shutdown processing occurring (01b).
    Occurring,
    /// Shutdown processing complete (10b).
    Complete,
    /// A reserved value (11b).
    Reserved,
}

/// CSTS: the controller's state ("Offset 1Ch: CSTS – Controller Status").
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Csts(pub u32);

impl Csts {
    /// RDY, Ready: the controller processes commands once set after CC.EN is set.
    pub const fn ready(self) -> bool {
        self.0 & 1 != 0
    }

    /// CFS, Controller Fatal Status: the controller hit a fatal error it cannot report
    /// through a completion; only a reset recovers it.
    pub const fn fatal(self) -> bool {
        self.0 & (1 << 1) != 0
    }

    /// SHST, Shutdown Status.
    pub const fn shutdown_status(self) -> ShutdownStatus {
        match (self.0 >> 2) & 0x3 {
            0b00 => ShutdownStatus::Normal,
            0b01 => ShutdownStatus::Occurring,
            0b10 => ShutdownStatus::Complete,
            _ => ShutdownStatus::Reserved,
        }
    }

    /// NSSRO, NVM Subsystem Reset Occurred.
    pub const fn nssro(self) -> bool {
        self.0 & (1 << 4) != 0
    }

    /// PP, Processing Paused.
    pub const fn processing_paused(self) -> bool {
        self.0 & (1 << 5) != 0
    }

    /// Whether the register reads as all ones: a PCI read of a function that is gone
    /// (surprise removal, failed link) returns all ones rather than a real status.
    pub const fn is_all_ones(self) -> bool {
        self.0 == u32::MAX
    }
}

impl fmt::Debug for Csts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csts")
            .field("raw", &format_args!("{:#010x}", self.0))
            .field("ready", &self.ready())
            .field("fatal", &self.fatal())
            .field("shutdown", &self.shutdown_status())
            .finish()
    }
}

/// The smallest admin queue AQA can describe, in entries.
pub const ADMIN_QUEUE_MIN_ENTRIES: u32 = 2;
/// The largest admin queue AQA can describe, in entries (a 12-bit 0-based field).
pub const ADMIN_QUEUE_MAX_ENTRIES: u32 = 4096;

/// AQA: the admin queues' sizes ("Offset 24h: AQA – Admin Queue Attributes").
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Aqa(pub u32);

impl Aqa {
    /// AQA for an admin submission queue of `sq_entries` and an admin completion queue of
    /// `cq_entries` entries, each in 2..=4096 (stored 0-based: ASQS in bits 11:0, ACQS in
    /// bits 27:16).
    pub fn new(sq_entries: u32, cq_entries: u32) -> Result<Self, RegError> {
        let check = |queue, entries| {
            if (ADMIN_QUEUE_MIN_ENTRIES..=ADMIN_QUEUE_MAX_ENTRIES).contains(&entries) {
                Ok(entries - 1)
            } else {
                Err(RegError::AdminQueueSize { queue, entries })
            }
        };
        let asqs = check("submission", sq_entries)?;
        let acqs = check("completion", cq_entries)?;
        Ok(Aqa(asqs | acqs << 16))
    }

    /// The admin submission queue's size in entries.
    pub const fn sq_entries(self) -> u32 {
        (self.0 & 0xFFF) + 1
    }

    /// The admin completion queue's size in entries.
    pub const fn cq_entries(self) -> u32 {
        ((self.0 >> 16) & 0xFFF) + 1
    }
}

impl fmt::Debug for Aqa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Aqa(sq: {}, cq: {})", self.sq_entries(), self.cq_entries())
    }
}

/// Checks a value for ASQ or ACQ (or a PRP1 of a physically contiguous I/O queue): the base
/// of a queue must be aligned to the memory page size (its low 12 bits are reserved in ASQ
/// and ACQ, and further bits are ignored for larger pages).
pub fn queue_base(addr: u64, page_size: u64) -> Result<u64, RegError> {
    if page_size.is_power_of_two() && addr & (page_size - 1) == 0 {
        Ok(addr)
    } else {
        Err(RegError::QueueBaseUnaligned { addr, page_size })
    }
}

/// Which doorbell of a queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorbellKind {
    /// The submission queue's tail doorbell (SQyTDBL): the host tells the controller up to
    /// where it has written commands.
    SqTail,
    /// The completion queue's head doorbell (CQyHDBL): the host tells the controller up to
    /// where it has consumed completions.
    CqHead,
}

/// The BAR0 offset of a doorbell register ("Offset (1000h + ((2y) * (4 << CAP.DSTRD)))" and
/// its completion queue counterpart): queue `qid`'s submission tail doorbell is the
/// `2 * qid`-th register from 0x1000 and its completion head doorbell the next one, with
/// registers `4 << dstrd` bytes apart.
pub fn doorbell_offset(qid: u16, kind: DoorbellKind, dstrd: u8) -> usize {
    let index = 2 * usize::from(qid)
        + match kind {
            DoorbellKind::SqTail => 0,
            DoorbellKind::CqHead => 1,
        };
    DOORBELL_BASE + index * (4usize << (dstrd & 0xF))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(mqes: u64, to: u64, dstrd: u64, css: u64, mpsmin: u64, mpsmax: u64) -> Cap {
        Cap(mqes | to << 24 | dstrd << 32 | css << 37 | mpsmin << 48 | mpsmax << 52)
    }

    #[test]
    fn register_offsets() {
        assert_eq!(
            (CAP, VS, INTMS, INTMC, CC, CSTS),
            (0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C)
        );
        assert_eq!(
            (NSSR, AQA, ASQ, ACQ, DOORBELL_BASE),
            (0x20, 0x24, 0x28, 0x30, 0x1000)
        );
    }

    #[test]
    fn cap_fields() {
        let c = cap(1023, 30, 2, 1, 0, 4) | Cap(1 << 16 | 1 << 36 | 1 << 45);
        assert_eq!(c.mqes(), 1023);
        assert_eq!(c.max_queue_entries(), 1024);
        assert!(c.cqr());
        assert!(c.nssrs());
        assert!(c.bps());
        assert_eq!(c.to(), 30);
        assert_eq!(c.timeout(), Duration::from_secs(15));
        assert_eq!(c.dstrd(), 2);
        assert_eq!(c.doorbell_stride(), 16);
        assert!(c.css_nvm());
        assert_eq!(c.mpsmin(), 0);
        assert_eq!(c.mpsmax(), 4);
        assert_eq!(c.min_page_size(), 4096);
        assert_eq!(c.max_page_size(), 65536);
        assert!(c.supports_mps(0) && c.supports_mps(4) && !c.supports_mps(5));
    }

    #[test]
    fn cap_max_values() {
        let c = cap(0xFFFF, 0xFF, 0xF, 0xFE, 0xF, 0xF);
        assert_eq!(c.max_queue_entries(), 65536);
        assert_eq!(c.timeout(), Duration::from_millis(255 * 500));
        assert_eq!(c.doorbell_stride(), 4 << 15);
        assert!(!c.css_nvm(), "CSS bit 0 clear");
        assert_eq!(c.css(), 0xFE);
        assert_eq!(c.min_page_size(), 1 << 27);
        assert!(!c.cqr());
    }

    #[test]
    fn cap_timeout_units_are_500ms() {
        assert_eq!(Cap(0).timeout(), Duration::ZERO);
        assert_eq!(Cap(1 << 24).timeout(), Duration::from_millis(500));
        assert_eq!(Cap(3 << 24).timeout(), Duration::from_millis(1500));
    }

    impl std::ops::BitOr for Cap {
        type Output = Cap;
        fn bitor(self, rhs: Cap) -> Cap {
            Cap(self.0 | rhs.0)
        }
    }

    #[test]
    fn version_round_trip_and_order() {
        let v = Version::from_raw(0x0001_0400);
        assert_eq!(v, Version::V1_4);
        assert_eq!(v.to_raw(), 0x0001_0400);
        assert_eq!(Version::from_raw(0x0002_0000), Version::V2_0);
        assert_eq!(Version::from_raw(0x0001_0201).to_string(), "1.2.1");
        assert!(Version::V2_0 > Version::V1_4);
        assert!(Version::new(1, 3, 1) > Version::V1_3);
        assert!(Version::new(1, 10, 0) > Version::V1_4);
    }

    #[test]
    fn cc_spec_value() {
        let cc = Cc::nvm(0).with_enable(true);
        assert_eq!(cc.0, 0x0046_0001);
        assert!(cc.enabled());
        assert_eq!((cc.iosqes(), cc.iocqes(), cc.mps()), (6, 4, 0));
        assert_eq!(cc.page_size(), 4096);
        assert_eq!(Cc::nvm(0).0, 0x0046_0000);
    }

    #[test]
    fn cc_fields() {
        let cc = Cc::default().with_mps(4);
        assert_eq!(cc.0, 4 << 7);
        assert_eq!(cc.page_size(), 65536);
        assert_eq!(Cc::default().with_css(CommandSetSelect::AdminOnly).0, 0b111 << 4);
        assert_eq!(
            Cc::default().with_css(CommandSetSelect::AllSupported).0,
            0b110 << 4
        );
        assert_eq!(Cc::default().with_ams(Arbitration::WeightedRoundRobin).0, 1 << 11);
        assert_eq!(Cc::default().with_ams(Arbitration::VendorSpecific).0, 0b111 << 11);
        let normal = Cc::nvm(0)
            .with_enable(true)
            .with_shutdown(ShutdownNotification::Normal);
        assert_eq!(normal.0, 0x0046_4001);
        assert_eq!(normal.shn(), 1);
        let abrupt = normal.with_shutdown(ShutdownNotification::Abrupt);
        assert_eq!(abrupt.0, 0x0046_8001);
        assert_eq!(abrupt.with_shutdown(ShutdownNotification::None).0, 0x0046_0001);
        assert_eq!(normal.with_enable(false).0, 0x0046_4000);
    }

    #[test]
    fn cc_fields_do_not_spill() {
        // Out-of-range values are masked to their field's width.
        assert_eq!(Cc::default().with_mps(0xFF).0, 0xF << 7);
        assert_eq!(Cc::default().with_iosqes(0x1F).0, 0xF << 16);
    }

    #[test]
    fn csts_fields() {
        assert!(Csts(1).ready());
        assert!(!Csts(0).ready());
        assert!(Csts(0b10).fatal());
        assert_eq!(Csts(0).shutdown_status(), ShutdownStatus::Normal);
        assert_eq!(Csts(0b0100).shutdown_status(), ShutdownStatus::Occurring);
        assert_eq!(Csts(0b1001).shutdown_status(), ShutdownStatus::Complete);
        assert_eq!(Csts(0b1100).shutdown_status(), ShutdownStatus::Reserved);
        assert!(Csts(1 << 4).nssro());
        assert!(Csts(1 << 5).processing_paused());
        assert!(Csts(u32::MAX).is_all_ones());
    }

    #[test]
    fn aqa_encoding_and_limits() {
        let aqa = Aqa::new(32, 64).unwrap();
        assert_eq!(aqa.0, 63 << 16 | 31);
        assert_eq!((aqa.sq_entries(), aqa.cq_entries()), (32, 64));
        assert_eq!(Aqa::new(2, 4096).unwrap().0, 0x0FFF_0001);
        assert_eq!(
            Aqa::new(1, 2),
            Err(RegError::AdminQueueSize {
                queue: "submission",
                entries: 1
            })
        );
        assert_eq!(
            Aqa::new(2, 4097),
            Err(RegError::AdminQueueSize {
                queue: "completion",
                entries: 4097
            })
        );
        let msg = Aqa::new(0, 2).unwrap_err().to_string();
        assert!(msg.contains("2..=4096"), "{msg}");
    }

    #[test]
    fn queue_base_alignment() {
        assert_eq!(queue_base(0x1_0000, 4096), Ok(0x1_0000));
        assert!(queue_base(0x1_0800, 4096).is_err());
        assert!(queue_base(0x1_1000, 8192).is_err());
    }

    #[test]
    fn doorbells_stride_0() {
        assert_eq!(doorbell_offset(0, DoorbellKind::SqTail, 0), 0x1000);
        assert_eq!(doorbell_offset(0, DoorbellKind::CqHead, 0), 0x1004);
        assert_eq!(doorbell_offset(1, DoorbellKind::SqTail, 0), 0x1008);
        assert_eq!(doorbell_offset(1, DoorbellKind::CqHead, 0), 0x100C);
        assert_eq!(doorbell_offset(7, DoorbellKind::CqHead, 0), 0x1000 + 15 * 4);
    }

    #[test]
    fn doorbells_stride_2() {
        // Registers 16 bytes apart.
        assert_eq!(doorbell_offset(0, DoorbellKind::SqTail, 2), 0x1000);
        assert_eq!(doorbell_offset(0, DoorbellKind::CqHead, 2), 0x1010);
        assert_eq!(doorbell_offset(1, DoorbellKind::SqTail, 2), 0x1020);
        assert_eq!(doorbell_offset(1, DoorbellKind::CqHead, 2), 0x1030);
        assert_eq!(doorbell_offset(3, DoorbellKind::SqTail, 2), 0x1060);
    }

    #[test]
    fn doorbell_of_last_queue() {
        assert_eq!(
            doorbell_offset(u16::MAX, DoorbellKind::CqHead, 0),
            0x1000 + (2 * 65535 + 1) * 4
        );
    }
}
