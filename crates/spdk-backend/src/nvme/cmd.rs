//! Submission and completion queue entries ("Submission Queue Entry", "Completion Queue
//! Entry") and builders for the admin and NVM commands the driver issues ("Admin Command
//! Set", "NVM Command Set").
//!
//! Every command here uses PRPs for its data (PSDT = 00b) and no metadata pointer. Counts
//! (blocks, queue entries, queues) are taken as plain counts and encoded 0-based as the
//! specification wants; out-of-range counts are a [`CommandError`].

use thiserror::Error;

use crate::nvme::status::{self, NvmeStatusError, StatusField};

/// Admin command opcodes ("Admin Command Set", opcode table).
pub mod admin_opcode {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// NVM command set I/O opcodes ("NVM Command Set", opcode table).
pub mod nvm_opcode {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS (Controller or Namespace Structure) values ("Identify command", CNS table).
pub mod cns {
    /// Identify Namespace data structure for the namespace in NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u8 = 0x01;
    /// Active namespace ID list: up to 1024 active NSIDs greater than NSID, ascending.
    pub const ACTIVE_NAMESPACE_LIST: u8 = 0x02;
}

/// Feature identifiers for Get/Set Features ("Feature Identifiers" table).
pub mod feature {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x02;
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const INTERRUPT_COALESCING: u8 = 0x08;
}

/// NSID value that addresses every namespace (broadcast), e.g. for Flush.
pub const NSID_ALL: u32 = 0xFFFF_FFFF;

/// The most blocks one Read or Write can move (NLB is a 16-bit 0-based field).
pub const MAX_BLOCKS_PER_COMMAND: u32 = 1 << 16;
/// The largest I/O queue a Create I/O Queue command can describe (QSIZE is 16-bit 0-based).
pub const MAX_IO_QUEUE_ENTRIES: u32 = 1 << 16;
/// The most I/O queues of one kind Set Features (Number of Queues) can ask for.
pub const MAX_IO_QUEUES: u32 = 0xFFFF;

/// A command argument outside what its field can encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CommandError {
    /// A Read or Write of zero blocks or more than 65536.
    #[error("a command moves 1..=65536 blocks (NLB is a 16-bit 0-based field), not {blocks}")]
    BlockCount {
        /// The count asked for.
        blocks: u32,
    },
    /// An I/O queue size outside 2..=65536 entries.
    #[error("an I/O queue holds 2..=65536 entries (QSIZE is a 16-bit 0-based field), not {entries}")]
    QueueSize {
        /// The size asked for.
        entries: u32,
    },
    /// Queue ID 0 for an I/O queue (it belongs to the admin queues).
    #[error("queue ID 0 is the admin queue; I/O queues are numbered from 1")]
    AdminQueueId,
    /// A number of I/O queues outside 1..=65535.
    #[error("Number of Queues asks for 1..=65535 queues of each kind, not {count}")]
    QueueCount {
        /// The count asked for.
        count: u32,
    },
}

/// Priority of an I/O submission queue under weighted round robin arbitration (QPRIO);
/// ignored under round robin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueuePriority {
    /// Urgent (00b).
    Urgent = 0,
    /// High (01b).
    High = 1,
    /// Medium (10b).
    Medium = 2,
    /// Low (11b).
    Low = 3,
}

/// A 64-byte submission queue entry ("Submission Queue Entry – Command Format").
///
/// The field layout matches the wire layout on a little-endian host, but the driver should
/// write [`Command::to_bytes`] into queue memory rather than rely on that.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// CDW0: opcode (bits 7:0), FUSE (9:8), PSDT (15:14), CID (31:16).
    pub cdw0: u32,
    /// Namespace identifier.
    pub nsid: u32,
    /// Command dword 2 (command specific).
    pub cdw2: u32,
    /// Command dword 3 (command specific).
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer, first PRP entry.
    pub prp1: u64,
    /// Data pointer, second PRP entry or PRP list pointer.
    pub prp2: u64,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<Command>() == 64);

/// Size of a submission queue entry in bytes.
pub const COMMAND_SIZE: usize = 64;

fn queue_size_field(entries: u32) -> Result<u32, CommandError> {
    if (2..=MAX_IO_QUEUE_ENTRIES).contains(&entries) {
        Ok(entries - 1)
    } else {
        Err(CommandError::QueueSize { entries })
    }
}

fn io_qid(qid: u16) -> Result<u32, CommandError> {
    if qid == 0 {
        Err(CommandError::AdminQueueId)
    } else {
        Ok(u32::from(qid))
    }
}

impl Command {
    /// An empty command with `opcode` and `cid` (no fused operation, PRPs for data).
    pub const fn new(opcode: u8, cid: u16) -> Self {
        Command {
            cdw0: opcode as u32 | (cid as u32) << 16,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            prp1: 0,
            prp2: 0,
            cdw10: 0,
            cdw11: 0,
            cdw12: 0,
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        }
    }

    /// The opcode (CDW0 bits 7:0).
    pub const fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    /// FUSE (CDW0 bits 9:8): 00b normal, 01b first and 10b second of a fused pair.
    pub const fn fuse(&self) -> u8 {
        ((self.cdw0 >> 8) & 0x3) as u8
    }

    /// PSDT (CDW0 bits 15:14): 00b for PRPs.
    pub const fn psdt(&self) -> u8 {
        ((self.cdw0 >> 14) & 0x3) as u8
    }

    /// The command identifier (CDW0 bits 31:16).
    pub const fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }

    /// Replaces the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xFFFF) | u32::from(cid) << 16;
    }

    /// Identify Controller (CNS 01h) into the 4096-byte buffer at `prp1`, which must not
    /// cross a memory page boundary (a 4 KiB-aligned buffer never does).
    pub const fn identify_controller(cid: u16, prp1: u64) -> Self {
        let mut c = Command::new(admin_opcode::IDENTIFY, cid);
        c.prp1 = prp1;
        c.cdw10 = cns::CONTROLLER as u32;
        c
    }

    /// Identify Namespace (CNS 00h) of namespace `nsid` into the 4096-byte buffer at `prp1`.
    pub const fn identify_namespace(cid: u16, nsid: u32, prp1: u64) -> Self {
        let mut c = Command::new(admin_opcode::IDENTIFY, cid);
        c.nsid = nsid;
        c.prp1 = prp1;
        c.cdw10 = cns::NAMESPACE as u32;
        c
    }

    /// Active Namespace ID list (CNS 02h): the active NSIDs greater than `after_nsid` (0 for
    /// all), up to 1024 of them, into the 4096-byte buffer at `prp1`.
    pub const fn identify_active_ns_list(cid: u16, after_nsid: u32, prp1: u64) -> Self {
        let mut c = Command::new(admin_opcode::IDENTIFY, cid);
        c.nsid = after_nsid;
        c.prp1 = prp1;
        c.cdw10 = cns::ACTIVE_NAMESPACE_LIST as u32;
        c
    }

    /// Set Features, Number of Queues (FID 07h): asks for `nsq` I/O submission and `ncq`
    /// I/O completion queues (each 1..=65535; sent 0-based in CDW11: NSQR in bits 15:0,
    /// NCQR in 31:16). The completion's DW0 says how many were granted, see
    /// [`Completion::queues_granted`].
    pub fn set_features_num_queues(cid: u16, nsq: u32, ncq: u32) -> Result<Self, CommandError> {
        let field = |count| {
            if (1..=MAX_IO_QUEUES).contains(&count) {
                Ok(count - 1)
            } else {
                Err(CommandError::QueueCount { count })
            }
        };
        let mut c = Command::new(admin_opcode::SET_FEATURES, cid);
        c.cdw10 = u32::from(feature::NUMBER_OF_QUEUES);
        c.cdw11 = field(nsq)? | field(ncq)? << 16;
        Ok(c)
    }

    /// Create I/O Completion Queue `qid` of `entries` entries at `prp1` (physically
    /// contiguous memory, page aligned, when `physically_contiguous`; otherwise `prp1` is a
    /// PRP list). Interrupts are left disabled (IEN = 0): the driver polls.
    pub fn create_io_cq(
        cid: u16,
        qid: u16,
        entries: u32,
        prp1: u64,
        physically_contiguous: bool,
    ) -> Result<Self, CommandError> {
        let mut c = Command::new(admin_opcode::CREATE_IO_CQ, cid);
        c.prp1 = prp1;
        c.cdw10 = io_qid(qid)? | queue_size_field(entries)? << 16;
        c.cdw11 = u32::from(physically_contiguous);
        Ok(c)
    }

    /// Create I/O Submission Queue `qid` of `entries` entries at `prp1`, bound to completion
    /// queue `cqid` (which must exist already), with arbitration `priority`. The queue is
    /// physically contiguous (PC = 1).
    pub fn create_io_sq(
        cid: u16,
        qid: u16,
        entries: u32,
        prp1: u64,
        cqid: u16,
        priority: QueuePriority,
    ) -> Result<Self, CommandError> {
        let mut c = Command::new(admin_opcode::CREATE_IO_SQ, cid);
        c.prp1 = prp1;
        c.cdw10 = io_qid(qid)? | queue_size_field(entries)? << 16;
        c.cdw11 = 1 | (priority as u32) << 1 | io_qid(cqid)? << 16;
        Ok(c)
    }

    /// Delete I/O Submission Queue `qid`; commands still in it are aborted.
    pub fn delete_io_sq(cid: u16, qid: u16) -> Result<Self, CommandError> {
        let mut c = Command::new(admin_opcode::DELETE_IO_SQ, cid);
        c.cdw10 = io_qid(qid)?;
        Ok(c)
    }

    /// Delete I/O Completion Queue `qid`; every submission queue bound to it must be deleted
    /// first.
    pub fn delete_io_cq(cid: u16, qid: u16) -> Result<Self, CommandError> {
        let mut c = Command::new(admin_opcode::DELETE_IO_CQ, cid);
        c.cdw10 = io_qid(qid)?;
        Ok(c)
    }

    fn rw(
        opcode: u8,
        cid: u16,
        nsid: u32,
        slba: u64,
        blocks: u32,
        prp1: u64,
        prp2: u64,
    ) -> Result<Self, CommandError> {
        if !(1..=MAX_BLOCKS_PER_COMMAND).contains(&blocks) {
            return Err(CommandError::BlockCount { blocks });
        }
        let mut c = Command::new(opcode, cid);
        c.nsid = nsid;
        c.prp1 = prp1;
        c.prp2 = prp2;
        c.cdw10 = slba as u32;
        c.cdw11 = (slba >> 32) as u32;
        c.cdw12 = blocks - 1;
        Ok(c)
    }

    /// Read `blocks` logical blocks (1..=65536, sent 0-based in CDW12 bits 15:0) starting at
    /// `slba` (CDW10 low, CDW11 high) of namespace `nsid` into the memory described by
    /// `prp1`/`prp2` (see [`crate::nvme::prp`]).
    pub fn read(
        cid: u16,
        nsid: u32,
        slba: u64,
        blocks: u32,
        prp1: u64,
        prp2: u64,
    ) -> Result<Self, CommandError> {
        Self::rw(nvm_opcode::READ, cid, nsid, slba, blocks, prp1, prp2)
    }

    /// Write `blocks` logical blocks starting at `slba` of namespace `nsid` from the memory
    /// described by `prp1`/`prp2`; encoded like [`Command::read`].
    pub fn write(
        cid: u16,
        nsid: u32,
        slba: u64,
        blocks: u32,
        prp1: u64,
        prp2: u64,
    ) -> Result<Self, CommandError> {
        Self::rw(nvm_opcode::WRITE, cid, nsid, slba, blocks, prp1, prp2)
    }

    /// Flush namespace `nsid` ([`NSID_ALL`] for all): data in a volatile write cache is
    /// made durable.
    pub const fn flush(cid: u16, nsid: u32) -> Self {
        let mut c = Command::new(nvm_opcode::FLUSH, cid);
        c.nsid = nsid;
        c
    }

    /// Sets FUA, Force Unit Access (CDW12 bit 30), on a Read or Write: a write is durable
    /// when it completes, a read comes from non-volatile media.
    pub const fn with_fua(mut self) -> Self {
        self.cdw12 |= 1 << 30;
        self
    }

    /// The 64 bytes of the entry, little-endian, as they go into the submission queue.
    pub fn to_bytes(&self) -> [u8; COMMAND_SIZE] {
        let mut b = [0u8; COMMAND_SIZE];
        let dwords = [self.cdw0, self.nsid, self.cdw2, self.cdw3];
        for (i, d) in dwords.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&d.to_le_bytes());
        }
        for (i, q) in [self.mptr, self.prp1, self.prp2].iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&q.to_le_bytes());
        }
        let tail = [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ];
        for (i, d) in tail.iter().enumerate() {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_le_bytes());
        }
        b
    }

    /// Decodes an entry from its 64 little-endian bytes.
    pub fn from_bytes(b: &[u8; COMMAND_SIZE]) -> Self {
        let d = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let q = |at: usize| u64::from(d(at)) | u64::from(d(at + 4)) << 32;
        Command {
            cdw0: d(0),
            nsid: d(4),
            cdw2: d(8),
            cdw3: d(12),
            mptr: q(16),
            prp1: q(24),
            prp2: q(32),
            cdw10: d(40),
            cdw11: d(44),
            cdw12: d(48),
            cdw13: d(52),
            cdw14: d(56),
            cdw15: d(60),
        }
    }
}

/// A 16-byte completion queue entry ("Completion Queue Entry").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// DW0: command specific result.
    pub dw0: u32,
    /// DW1: command specific result (reserved for most commands).
    pub dw1: u32,
    /// SQHD, SQ Head Pointer: how far the controller has consumed the submission queue.
    pub sq_head: u16,
    /// SQID, SQ Identifier: the submission queue the command came from.
    pub sq_id: u16,
    /// CID, Command Identifier of the command that completed.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: u16,
}

const _: () = assert!(std::mem::size_of::<Completion>() == 16);

/// Size of a completion queue entry in bytes.
pub const COMPLETION_SIZE: usize = 16;

impl Completion {
    /// P, the phase tag: the controller inverts it on each pass through the queue, so an
    /// entry is new when its phase matches the one the host expects.
    pub const fn phase(&self) -> bool {
        self.status & 1 != 0
    }

    /// The 15-bit status field (SC, SCT, CRD, M, DNR), phase tag removed.
    pub const fn status(&self) -> StatusField {
        StatusField(self.status >> 1)
    }

    /// `Ok` for a successful completion, the decoded status otherwise.
    pub fn check(&self) -> Result<(), NvmeStatusError> {
        status::check(self.status().0)
    }

    /// For a completed Set Features (Number of Queues): the I/O submission and completion
    /// queues granted (NSQA in DW0 bits 15:0, NCQA in 31:16, both 0-based), as counts.
    pub const fn queues_granted(&self) -> (u32, u32) {
        ((self.dw0 & 0xFFFF) + 1, (self.dw0 >> 16) + 1)
    }

    /// Decodes an entry from its 16 little-endian bytes.
    pub fn from_bytes(b: &[u8; COMPLETION_SIZE]) -> Self {
        let w = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let d = |at: usize| u32::from(w(at)) | u32::from(w(at + 2)) << 16;
        Completion {
            dw0: d(0),
            dw1: d(4),
            sq_head: w(8),
            sq_id: w(10),
            cid: w(12),
            status: w(14),
        }
    }

    /// The 16 little-endian bytes of the entry.
    pub fn to_bytes(&self) -> [u8; COMPLETION_SIZE] {
        let mut b = [0u8; COMPLETION_SIZE];
        b[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        b[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        b[10..12].copy_from_slice(&self.sq_id.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layouts() {
        assert_eq!(std::mem::size_of::<Command>(), COMMAND_SIZE);
        assert_eq!(offset_of!(Command, nsid), 4);
        assert_eq!(offset_of!(Command, mptr), 16);
        assert_eq!(offset_of!(Command, prp1), 24);
        assert_eq!(offset_of!(Command, prp2), 32);
        assert_eq!(offset_of!(Command, cdw10), 40);
        assert_eq!(offset_of!(Command, cdw15), 60);
        assert_eq!(std::mem::size_of::<Completion>(), COMPLETION_SIZE);
        assert_eq!(offset_of!(Completion, sq_head), 8);
        assert_eq!(offset_of!(Completion, cid), 12);
        assert_eq!(offset_of!(Completion, status), 14);
    }

    #[test]
    fn read_encoding() {
        let c = Command::read(0x42, 1, 0x1234, 8, 0x10_0000, 0).unwrap();
        assert_eq!(c.opcode(), 0x02);
        assert_eq!(c.cid(), 0x42);
        assert_eq!(c.cdw0, 0x0042_0002);
        assert_eq!(c.fuse(), 0);
        assert_eq!(c.psdt(), 0);
        assert_eq!(c.nsid, 1);
        assert_eq!(c.cdw10, 0x1234);
        assert_eq!(c.cdw11, 0);
        assert_eq!(c.cdw12 & 0xFFFF, 7);
        assert_eq!(c.cdw12, 7);
        assert_eq!((c.prp1, c.prp2), (0x10_0000, 0));
        assert_eq!((c.cdw13, c.cdw14, c.cdw15, c.mptr), (0, 0, 0, 0));
    }

    #[test]
    fn write_encoding_with_high_lba() {
        let c = Command::write(7, 3, 0x0000_0012_3456_789A, 65536, 0x2000, 0x3000).unwrap();
        assert_eq!(c.opcode(), nvm_opcode::WRITE);
        assert_eq!(c.cdw10, 0x3456_789A);
        assert_eq!(c.cdw11, 0x12);
        assert_eq!(c.cdw12, 0xFFFF);
        assert_eq!(c.with_fua().cdw12, 0x4000_FFFF);
        assert_eq!(Command::write(7, 3, 0, 1, 0, 0).unwrap().cdw12, 0);
    }

    #[test]
    fn block_count_limits() {
        assert_eq!(
            Command::read(0, 1, 0, 0, 0, 0),
            Err(CommandError::BlockCount { blocks: 0 })
        );
        assert_eq!(
            Command::write(0, 1, 0, 65537, 0, 0),
            Err(CommandError::BlockCount { blocks: 65537 })
        );
    }

    #[test]
    fn flush_encoding() {
        let c = Command::flush(9, NSID_ALL);
        assert_eq!(c.cdw0, 0x0009_0000);
        assert_eq!(c.nsid, 0xFFFF_FFFF);
        assert_eq!(c.prp1, 0);
    }

    #[test]
    fn identify_encodings() {
        let c = Command::identify_controller(1, 0xAB_C000);
        assert_eq!(c.cdw0, 0x0001_0006);
        assert_eq!(c.cdw10, 1);
        assert_eq!(c.nsid, 0);
        assert_eq!(c.prp1, 0xAB_C000);
        let n = Command::identify_namespace(2, 5, 0x1000);
        assert_eq!((n.opcode(), n.cdw10, n.nsid), (0x06, 0, 5));
        let l = Command::identify_active_ns_list(3, 0, 0x1000);
        assert_eq!((l.opcode(), l.cdw10, l.nsid), (0x06, 2, 0));
    }

    #[test]
    fn set_features_number_of_queues() {
        let c = Command::set_features_num_queues(4, 8, 16).unwrap();
        assert_eq!(c.opcode(), 0x09);
        assert_eq!(c.cdw10, 0x07);
        assert_eq!(c.cdw11, 15 << 16 | 7);
        assert_eq!(
            Command::set_features_num_queues(4, 1, 65535).unwrap().cdw11,
            0xFFFE_0000
        );
        assert_eq!(
            Command::set_features_num_queues(4, 0, 1),
            Err(CommandError::QueueCount { count: 0 })
        );
        assert_eq!(
            Command::set_features_num_queues(4, 1, 65536),
            Err(CommandError::QueueCount { count: 65536 })
        );
        let granted = Completion {
            dw0: 3 << 16 | 31,
            ..Default::default()
        };
        assert_eq!(granted.queues_granted(), (32, 4));
    }

    #[test]
    fn create_io_cq_encoding() {
        let c = Command::create_io_cq(5, 1, 1024, 0x20_0000, true).unwrap();
        assert_eq!(c.opcode(), 0x05);
        assert_eq!(c.cdw10, 1023 << 16 | 1);
        assert_eq!(c.cdw11, 1, "PC set, IEN clear, IV 0");
        assert_eq!(c.prp1, 0x20_0000);
        assert_eq!(
            Command::create_io_cq(5, 2, 65536, 0, false).unwrap().cdw10,
            0xFFFF_0002
        );
        assert_eq!(Command::create_io_cq(5, 2, 2, 0, false).unwrap().cdw11, 0);
        assert_eq!(
            Command::create_io_cq(5, 0, 64, 0, true),
            Err(CommandError::AdminQueueId)
        );
        assert_eq!(
            Command::create_io_cq(5, 1, 1, 0, true),
            Err(CommandError::QueueSize { entries: 1 })
        );
        assert_eq!(
            Command::create_io_cq(5, 1, 65537, 0, true),
            Err(CommandError::QueueSize { entries: 65537 })
        );
    }

    #[test]
    fn create_io_sq_encoding() {
        let c = Command::create_io_sq(6, 3, 256, 0x30_0000, 2, QueuePriority::Medium).unwrap();
        assert_eq!(c.opcode(), 0x01);
        assert_eq!(c.cdw10, 255 << 16 | 3);
        assert_eq!(c.cdw11, 2 << 16 | 0b10 << 1 | 1);
        assert_eq!(c.cdw12, 0);
        let urgent = Command::create_io_sq(6, 3, 256, 0, 3, QueuePriority::Urgent).unwrap();
        assert_eq!(urgent.cdw11, 3 << 16 | 1);
        let low = Command::create_io_sq(6, 3, 256, 0, 3, QueuePriority::Low).unwrap();
        assert_eq!(low.cdw11, 3 << 16 | 0b111);
        assert_eq!(
            Command::create_io_sq(6, 3, 256, 0, 0, QueuePriority::Low),
            Err(CommandError::AdminQueueId)
        );
    }

    #[test]
    fn delete_queue_encodings() {
        let sq = Command::delete_io_sq(7, 4).unwrap();
        assert_eq!((sq.opcode(), sq.cdw10), (0x00, 4));
        let cq = Command::delete_io_cq(8, 4).unwrap();
        assert_eq!((cq.opcode(), cq.cdw10), (0x04, 4));
        assert_eq!(Command::delete_io_cq(8, 0), Err(CommandError::AdminQueueId));
    }

    #[test]
    fn set_cid_keeps_opcode_and_flags() {
        let mut c = Command::read(1, 1, 0, 1, 0, 0).unwrap();
        c.cdw0 |= 0b01 << 8;
        c.set_cid(0xBEEF);
        assert_eq!(c.cid(), 0xBEEF);
        assert_eq!(c.opcode(), nvm_opcode::READ);
        assert_eq!(c.fuse(), 1);
    }

    #[test]
    fn command_bytes_round_trip() {
        let c = Command {
            cdw0: 0x0102_0304,
            nsid: 0x0506_0708,
            cdw2: 9,
            cdw3: 10,
            mptr: 0x1112_1314_1516_1718,
            prp1: 0x2122_2324_2526_2728,
            prp2: 0x3132_3334_3536_3738,
            cdw10: 0x4142_4344,
            cdw11: 45,
            cdw12: 46,
            cdw13: 47,
            cdw14: 48,
            cdw15: 0x4950_5152,
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &[0x04, 0x03, 0x02, 0x01]);
        assert_eq!(b[24], 0x28);
        assert_eq!(b[31], 0x21);
        assert_eq!(&b[60..64], &[0x52, 0x51, 0x50, 0x49]);
        assert_eq!(Command::from_bytes(&b), c);
    }

    #[test]
    fn completion_fields() {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
        raw[8..10].copy_from_slice(&17u16.to_le_bytes());
        raw[10..12].copy_from_slice(&1u16.to_le_bytes());
        raw[12..14].copy_from_slice(&0x42u16.to_le_bytes());
        // Phase 1, SCT 0, SC 0x80 (LBA out of range), DNR.
        let status: u16 = 1 | 0x80 << 1 | 1 << 15;
        raw[14..16].copy_from_slice(&status.to_le_bytes());
        let c = Completion::from_bytes(&raw);
        assert_eq!(c.dw0, 0xDEAD_BEEF);
        assert_eq!((c.sq_head, c.sq_id, c.cid), (17, 1, 0x42));
        assert!(c.phase());
        assert_eq!(c.status().sc(), 0x80);
        assert!(c.status().dnr());
        assert_eq!(c.to_bytes(), raw);
        let err = c.check().unwrap_err();
        assert!(!err.is_retryable());
        let ok = Completion { status: 1, ..c };
        assert!(ok.check().is_ok());
        let ok_phase0 = Completion { status: 0, ..c };
        assert!(!ok_phase0.phase());
        assert!(ok_phase0.check().is_ok());
    }
}
