//! The status field of a completion ("Completion Queue Entry", "Status Field Definition",
//! and the status code tables of the base and NVM command set specifications).
//!
//! The 15-bit status field (the completion's DW3 bits 31:17, i.e. [`Completion::status`]
//! without the phase tag) holds:
//!
//! | bits  | field | meaning                                             |
//! |-------|-------|-----------------------------------------------------|
//! | 7:0   | SC    | status code, interpreted within its type            |
//! | 10:8  | SCT   | status code type                                    |
//! | 12:11 | CRD   | command retry delay (index into the controller's CRDT) |
//! | 13    | M     | more status information in the Error Information log |
//! | 14    | DNR   | do not retry: the same command would fail again     |
//!
//! [`check`] turns it into `Ok(())` or an [`NvmeStatusError`] whose [`StatusKind`] names
//! the common statuses and keeps any other as its raw type and code.
//!
//! [`Completion::status`]: crate::nvme::cmd::Completion::status

use std::fmt;

use thiserror::Error;

/// The 15-bit status field of a completion, phase tag removed.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct StatusField(pub u16);

impl StatusField {
    /// Builds a field from its parts (each masked to its width).
    pub const fn new(sct: u8, sc: u8, crd: u8, more: bool, dnr: bool) -> Self {
        StatusField(
            sc as u16
                | ((sct as u16) & 0x7) << 8
                | ((crd as u16) & 0x3) << 11
                | (more as u16) << 13
                | (dnr as u16) << 14,
        )
    }

    /// SC, Status Code.
    pub const fn sc(self) -> u8 {
        self.0 as u8
    }

    /// SCT, Status Code Type (see [`sct`]).
    pub const fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// CRD, Command Retry Delay: 0 for none, else which of the controller's CRDT values
    /// (Identify Controller) to wait before retrying.
    pub const fn crd(self) -> u8 {
        ((self.0 >> 11) & 0x3) as u8
    }

    /// M, More: the Error Information log page holds more about this failure.
    pub const fn more(self) -> bool {
        self.0 & (1 << 13) != 0
    }

    /// DNR, Do Not Retry.
    pub const fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// Whether the command succeeded (SCT and SC both zero; CRD, M and DNR do not matter).
    pub const fn is_success(self) -> bool {
        self.0 & 0x7FF == 0
    }
}

impl fmt::Debug for StatusField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StatusField {{ sct: {}, sc: {:#04x}, crd: {}, more: {}, dnr: {} }}",
            self.sct(),
            self.sc(),
            self.crd(),
            self.more(),
            self.dnr()
        )
    }
}

/// Status code type values ("Status Code Type (SCT)" table).
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status.
    pub const PATH: u8 = 3;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

fn sct_name(sct: &u8) -> &'static str {
    match *sct {
        sct::GENERIC => "generic",
        sct::COMMAND_SPECIFIC => "command-specific",
        sct::MEDIA => "media and data integrity",
        sct::PATH => "path-related",
        sct::VENDOR => "vendor-specific",
        _ => "reserved",
    }
}

/// Why a command was aborted (generic statuses 05h, 07h, 08h, 09h, 0Ah and 1Bh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AbortReason {
    /// Commands Aborted due to Power Loss Notification (05h).
    PowerLoss,
    /// Command Abort Requested (07h): an Abort command named it.
    Requested,
    /// Command Aborted due to SQ Deletion (08h).
    SqDeletion,
    /// Command Aborted due to Failed Fused Command (09h): its fused partner failed.
    FailedFused,
    /// Command Aborted due to Missing Fused Command (0Ah): its fused partner never came.
    MissingFused,
    /// Command Aborted due to Preempt and Abort (1Bh): a reservation was preempted.
    PreemptAndAbort,
}

impl AbortReason {
    /// The generic status code of this abort.
    pub const fn code(self) -> u8 {
        match self {
            AbortReason::PowerLoss => 0x05,
            AbortReason::Requested => 0x07,
            AbortReason::SqDeletion => 0x08,
            AbortReason::FailedFused => 0x09,
            AbortReason::MissingFused => 0x0A,
            AbortReason::PreemptAndAbort => 0x1B,
        }
    }

    const fn from_code(sc: u8) -> Option<Self> {
        Some(match sc {
            0x05 => AbortReason::PowerLoss,
            0x07 => AbortReason::Requested,
            0x08 => AbortReason::SqDeletion,
            0x09 => AbortReason::FailedFused,
            0x0A => AbortReason::MissingFused,
            0x1B => AbortReason::PreemptAndAbort,
            _ => return None,
        })
    }
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AbortReason::PowerLoss => "the controller was notified of power loss",
            AbortReason::Requested => "an Abort command asked for it",
            AbortReason::SqDeletion => "its submission queue was deleted",
            AbortReason::FailedFused => "the other command of its fused pair failed",
            AbortReason::MissingFused => "the other command of its fused pair is missing",
            AbortReason::PreemptAndAbort => "a reservation preempt and abort removed it",
        })
    }
}

/// What a failed status means: a named variant for each status the driver is likely to see,
/// [`StatusKind::Other`] for the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
pub enum StatusKind {
    /// Generic 01h.
    #[error(
        "invalid command opcode (generic status 0x01): the controller does not implement this opcode on \
         this queue"
    )]
    InvalidOpcode,
    /// Generic 02h.
    #[error(
        "invalid field in command (generic status 0x02): a field of the command holds a value the \
         controller rejects or does not support"
    )]
    InvalidField,
    /// Generic 03h.
    #[error(
        "command ID conflict (generic status 0x03): the command identifier is already in use on this \
         submission queue"
    )]
    CommandIdConflict,
    /// Generic 04h.
    #[error(
        "data transfer error (generic status 0x04): moving the command's data or metadata to or from host \
         memory failed"
    )]
    DataTransferError,
    /// Generic 05h, 07h, 08h, 09h, 0Ah or 1Bh.
    #[error("command aborted (generic status {code:#04x}): {reason}", code = .reason.code())]
    Aborted {
        /// Which abort.
        reason: AbortReason,
    },
    /// Generic 06h.
    #[error(
        "internal error (generic status 0x06): the controller failed internally while processing the command"
    )]
    InternalError,
    /// Generic 0Bh.
    #[error(
        "invalid namespace or format (generic status 0x0b): the namespace ID does not name an active \
         namespace, or its format does not allow this command"
    )]
    InvalidNamespaceOrFormat,
    /// Generic 0Ch.
    #[error("command sequence error (generic status 0x0c): the command broke a required order of commands")]
    CommandSequenceError,
    /// Generic 13h.
    #[error(
        "PRP offset invalid (generic status 0x13): a PRP entry's offset within its memory page is not \
         allowed there"
    )]
    PrpOffsetInvalid,
    /// Generic 15h.
    #[error(
        "operation denied (generic status 0x15): the controller refuses the command for security or \
         policy reasons"
    )]
    OperationDenied,
    /// Generic 1Dh.
    #[error(
        "sanitize in progress (generic status 0x1d): media access is blocked until a sanitize operation ends"
    )]
    SanitizeInProgress,
    /// Generic 20h.
    #[error("namespace is write protected (generic status 0x20): the namespace rejects writes")]
    NamespaceWriteProtected,
    /// Generic 21h.
    #[error(
        "command interrupted (generic status 0x21): the controller stopped the command; retrying it may \
         succeed"
    )]
    CommandInterrupted,
    /// Generic 22h.
    #[error(
        "transient transport error (generic status 0x22): the transport lost the command; retrying it may \
         succeed"
    )]
    TransientTransportError,
    /// Generic (NVM command set) 80h.
    #[error("LBA out of range (generic status 0x80): the command addressed blocks past the namespace's end")]
    LbaOutOfRange,
    /// Generic (NVM command set) 81h.
    #[error(
        "capacity exceeded (generic status 0x81): the command needs more space than the namespace's capacity"
    )]
    CapacityExceeded,
    /// Generic (NVM command set) 82h.
    #[error("namespace not ready (generic status 0x82): the namespace cannot process commands yet")]
    NamespaceNotReady,
    /// Generic (NVM command set) 83h.
    #[error(
        "reservation conflict (generic status 0x83): a reservation on the namespace forbids this host's \
         access"
    )]
    ReservationConflict,
    /// Generic (NVM command set) 84h.
    #[error("format in progress (generic status 0x84): the namespace is being formatted")]
    FormatInProgress,
    /// Command specific 00h (Create I/O Submission Queue).
    #[error(
        "completion queue invalid (command-specific status 0x00): the completion queue named for the new \
         submission queue does not exist"
    )]
    CompletionQueueInvalid,
    /// Command specific 01h (Create or Delete I/O queue).
    #[error(
        "invalid queue identifier (command-specific status 0x01): the queue ID is 0, beyond the queues \
         granted by Number of Queues, or already in use"
    )]
    InvalidQueueIdentifier,
    /// Command specific 02h (Create I/O queue).
    #[error(
        "invalid queue size (command-specific status 0x02): the queue size is below 2 entries or above \
         CAP.MQES + 1"
    )]
    InvalidQueueSize,
    /// Command specific 08h (Create I/O Completion Queue).
    #[error(
        "invalid interrupt vector (command-specific status 0x08): the interrupt vector is not one the \
         controller has"
    )]
    InvalidInterruptVector,
    /// Command specific 0Ch (Delete I/O Completion Queue).
    #[error(
        "invalid queue deletion (command-specific status 0x0c): submission queues still use this \
         completion queue, or it is the admin queue"
    )]
    InvalidQueueDeletion,
    /// Command specific (NVM command set) 82h.
    #[error(
        "attempted write to read only range (command-specific status 0x82): the blocks written are read-only"
    )]
    WriteToReadOnlyRange,
    /// Media error 80h.
    #[error("write fault (media status 0x80): the media failed to store the data")]
    WriteFault,
    /// Media error 81h.
    #[error(
        "unrecovered read error (media status 0x81): the data could not be read back, even with error \
         correction"
    )]
    UnrecoveredReadError,
    /// Media error 82h.
    #[error(
        "end-to-end guard check error (media status 0x82): protection information's guard did not match \
         the data"
    )]
    GuardCheckError,
    /// Media error 83h.
    #[error(
        "end-to-end application tag check error (media status 0x83): protection information's application \
         tag did not match"
    )]
    ApplicationTagCheckError,
    /// Media error 84h.
    #[error(
        "end-to-end reference tag check error (media status 0x84): protection information's reference tag \
         did not match"
    )]
    ReferenceTagCheckError,
    /// Media error 85h.
    #[error("compare failure (media status 0x85): the data compared did not match")]
    CompareFailure,
    /// Media error 86h.
    #[error("access denied (media status 0x86): access to the namespace or blocks was denied")]
    AccessDenied,
    /// Media error 87h.
    #[error(
        "deallocated or unwritten logical block (media status 0x87): the command read blocks that hold no \
         data"
    )]
    DeallocatedOrUnwrittenBlock,
    /// Any status not named above.
    #[error(
        "{} status type {sct}, code {sc:#04x}: a status not decoded here; see the status tables of the \
         NVMe specification or the vendor's documentation",
        sct_name(.sct)
    )]
    Other {
        /// SCT, Status Code Type.
        sct: u8,
        /// SC, Status Code.
        sc: u8,
    },
}

impl StatusKind {
    /// The kind a status code type and code stand for; `None` for success (SCT 0, SC 0).
    pub const fn from_codes(sct: u8, sc: u8) -> Option<Self> {
        use StatusKind::*;
        let sct = sct & 0x7;
        Some(match (sct, sc) {
            (sct::GENERIC, 0x00) => return None,
            (sct::GENERIC, 0x01) => InvalidOpcode,
            (sct::GENERIC, 0x02) => InvalidField,
            (sct::GENERIC, 0x03) => CommandIdConflict,
            (sct::GENERIC, 0x04) => DataTransferError,
            (sct::GENERIC, 0x06) => InternalError,
            (sct::GENERIC, 0x0B) => InvalidNamespaceOrFormat,
            (sct::GENERIC, 0x0C) => CommandSequenceError,
            (sct::GENERIC, 0x13) => PrpOffsetInvalid,
            (sct::GENERIC, 0x15) => OperationDenied,
            (sct::GENERIC, 0x1D) => SanitizeInProgress,
            (sct::GENERIC, 0x20) => NamespaceWriteProtected,
            (sct::GENERIC, 0x21) => CommandInterrupted,
            (sct::GENERIC, 0x22) => TransientTransportError,
            (sct::GENERIC, 0x80) => LbaOutOfRange,
            (sct::GENERIC, 0x81) => CapacityExceeded,
            (sct::GENERIC, 0x82) => NamespaceNotReady,
            (sct::GENERIC, 0x83) => ReservationConflict,
            (sct::GENERIC, 0x84) => FormatInProgress,
            (sct::GENERIC, sc) => match AbortReason::from_code(sc) {
                Some(reason) => Aborted { reason },
                None => Other { sct, sc },
            },
            (sct::COMMAND_SPECIFIC, 0x00) => CompletionQueueInvalid,
            (sct::COMMAND_SPECIFIC, 0x01) => InvalidQueueIdentifier,
            (sct::COMMAND_SPECIFIC, 0x02) => InvalidQueueSize,
            (sct::COMMAND_SPECIFIC, 0x08) => InvalidInterruptVector,
            (sct::COMMAND_SPECIFIC, 0x0C) => InvalidQueueDeletion,
            (sct::COMMAND_SPECIFIC, 0x82) => WriteToReadOnlyRange,
            (sct::MEDIA, 0x80) => WriteFault,
            (sct::MEDIA, 0x81) => UnrecoveredReadError,
            (sct::MEDIA, 0x82) => GuardCheckError,
            (sct::MEDIA, 0x83) => ApplicationTagCheckError,
            (sct::MEDIA, 0x84) => ReferenceTagCheckError,
            (sct::MEDIA, 0x85) => CompareFailure,
            (sct::MEDIA, 0x86) => AccessDenied,
            (sct::MEDIA, 0x87) => DeallocatedOrUnwrittenBlock,
            (sct, sc) => Other { sct, sc },
        })
    }

    /// The status code type and code of this kind.
    pub const fn codes(self) -> (u8, u8) {
        use StatusKind::*;
        match self {
            InvalidOpcode => (sct::GENERIC, 0x01),
            InvalidField => (sct::GENERIC, 0x02),
            CommandIdConflict => (sct::GENERIC, 0x03),
            DataTransferError => (sct::GENERIC, 0x04),
            Aborted { reason } => (sct::GENERIC, reason.code()),
            InternalError => (sct::GENERIC, 0x06),
            InvalidNamespaceOrFormat => (sct::GENERIC, 0x0B),
            CommandSequenceError => (sct::GENERIC, 0x0C),
            PrpOffsetInvalid => (sct::GENERIC, 0x13),
            OperationDenied => (sct::GENERIC, 0x15),
            SanitizeInProgress => (sct::GENERIC, 0x1D),
            NamespaceWriteProtected => (sct::GENERIC, 0x20),
            CommandInterrupted => (sct::GENERIC, 0x21),
            TransientTransportError => (sct::GENERIC, 0x22),
            LbaOutOfRange => (sct::GENERIC, 0x80),
            CapacityExceeded => (sct::GENERIC, 0x81),
            NamespaceNotReady => (sct::GENERIC, 0x82),
            ReservationConflict => (sct::GENERIC, 0x83),
            FormatInProgress => (sct::GENERIC, 0x84),
            CompletionQueueInvalid => (sct::COMMAND_SPECIFIC, 0x00),
            InvalidQueueIdentifier => (sct::COMMAND_SPECIFIC, 0x01),
            InvalidQueueSize => (sct::COMMAND_SPECIFIC, 0x02),
            InvalidInterruptVector => (sct::COMMAND_SPECIFIC, 0x08),
            InvalidQueueDeletion => (sct::COMMAND_SPECIFIC, 0x0C),
            WriteToReadOnlyRange => (sct::COMMAND_SPECIFIC, 0x82),
            WriteFault => (sct::MEDIA, 0x80),
            UnrecoveredReadError => (sct::MEDIA, 0x81),
            GuardCheckError => (sct::MEDIA, 0x82),
            ApplicationTagCheckError => (sct::MEDIA, 0x83),
            ReferenceTagCheckError => (sct::MEDIA, 0x84),
            CompareFailure => (sct::MEDIA, 0x85),
            AccessDenied => (sct::MEDIA, 0x86),
            DeallocatedOrUnwrittenBlock => (sct::MEDIA, 0x87),
            Other { sct, sc } => (sct, sc),
        }
    }

    /// Whether this is a media or data integrity error (SCT 2): the device could not keep
    /// or return the data, as opposed to the command being wrong.
    pub const fn is_media_error(self) -> bool {
        self.codes().0 == sct::MEDIA
    }
}

/// A command that completed with an error status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
#[error("{kind}{suffix}", suffix = dnr_suffix(.field))]
pub struct NvmeStatusError {
    /// What the status means.
    pub kind: StatusKind,
    /// The raw status field, with CRD, M and DNR.
    pub field: StatusField,
}

impl NvmeStatusError {
    /// Whether retrying the same command may succeed: the controller left DNR clear.
    pub const fn is_retryable(&self) -> bool {
        !self.field.dnr()
    }

    /// CRD, Command Retry Delay: 0 to retry at once, 1..=3 to wait the controller's CRDT1..3
    /// (Identify Controller, in 100 ms units) first.
    pub const fn retry_delay_index(&self) -> u8 {
        self.field.crd()
    }

    /// M: the Error Information log page has more about this failure.
    pub const fn has_more_info(&self) -> bool {
        self.field.more()
    }
}

fn dnr_suffix(field: &StatusField) -> &'static str {
    if field.dnr() {
        " [do not retry]"
    } else {
        ""
    }
}

/// Checks a 15-bit status field (phase tag removed; see [`StatusField`]): `Ok` when the
/// command succeeded, the decoded error otherwise.
pub const fn check(status_field: u16) -> Result<(), NvmeStatusError> {
    let field = StatusField(status_field & 0x7FFF);
    match StatusKind::from_codes(field.sct(), field.sc()) {
        None => Ok(()),
        Some(kind) => Err(NvmeStatusError { kind, field }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success() {
        assert_eq!(check(0), Ok(()));
        // CRD, M and DNR do not turn a success into an error.
        assert_eq!(check(StatusField::new(0, 0, 3, true, true).0), Ok(()));
        assert!(StatusField(0).is_success());
    }

    #[test]
    fn field_parts() {
        let f = StatusField::new(2, 0x81, 2, true, true);
        assert_eq!(f.0, 0x81 | 2 << 8 | 2 << 11 | 1 << 13 | 1 << 14);
        assert_eq!(
            (f.sct(), f.sc(), f.crd(), f.more(), f.dnr()),
            (2, 0x81, 2, true, true)
        );
        assert!(!f.is_success());
    }

    #[test]
    fn named_generic_statuses() {
        let cases = [
            (0x01, StatusKind::InvalidOpcode),
            (0x02, StatusKind::InvalidField),
            (0x03, StatusKind::CommandIdConflict),
            (0x04, StatusKind::DataTransferError),
            (0x0B, StatusKind::InvalidNamespaceOrFormat),
            (0x80, StatusKind::LbaOutOfRange),
            (0x81, StatusKind::CapacityExceeded),
            (0x82, StatusKind::NamespaceNotReady),
        ];
        for (sc, kind) in cases {
            let err = check(StatusField::new(0, sc, 0, false, false).0).unwrap_err();
            assert_eq!(err.kind, kind);
        }
    }

    #[test]
    fn aborts() {
        for (sc, reason) in [
            (0x05, AbortReason::PowerLoss),
            (0x07, AbortReason::Requested),
            (0x08, AbortReason::SqDeletion),
            (0x09, AbortReason::FailedFused),
            (0x0A, AbortReason::MissingFused),
            (0x1B, AbortReason::PreemptAndAbort),
        ] {
            assert_eq!(
                StatusKind::from_codes(0, sc),
                Some(StatusKind::Aborted { reason })
            );
        }
        let msg = StatusKind::Aborted {
            reason: AbortReason::SqDeletion,
        }
        .to_string();
        assert_eq!(
            msg,
            "command aborted (generic status 0x08): its submission queue was deleted"
        );
    }

    #[test]
    fn queue_creation_statuses() {
        assert_eq!(
            StatusKind::from_codes(1, 0),
            Some(StatusKind::CompletionQueueInvalid)
        );
        assert_eq!(
            StatusKind::from_codes(1, 1),
            Some(StatusKind::InvalidQueueIdentifier)
        );
        assert_eq!(StatusKind::from_codes(1, 2), Some(StatusKind::InvalidQueueSize));
        assert_eq!(
            StatusKind::from_codes(1, 0x0C),
            Some(StatusKind::InvalidQueueDeletion)
        );
    }

    #[test]
    fn media_errors() {
        let write_fault = StatusKind::from_codes(2, 0x80).unwrap();
        assert_eq!(write_fault, StatusKind::WriteFault);
        assert!(write_fault.is_media_error());
        assert_eq!(
            StatusKind::from_codes(2, 0x81),
            Some(StatusKind::UnrecoveredReadError)
        );
        assert!(!StatusKind::LbaOutOfRange.is_media_error());
    }

    #[test]
    fn messages_name_status_and_meaning() {
        let err = check(StatusField::new(0, 0x80, 0, false, false).0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "LBA out of range (generic status 0x80): the command addressed blocks past the namespace's end"
        );
        let dnr = check(StatusField::new(0, 0x80, 0, false, true).0).unwrap_err();
        assert!(dnr.to_string().ends_with(" [do not retry]"), "{dnr}");
        let other = check(StatusField::new(3, 0x71, 0, false, false).0).unwrap_err();
        assert_eq!(other.kind, StatusKind::Other { sct: 3, sc: 0x71 });
        assert!(
            other
                .to_string()
                .starts_with("path-related status type 3, code 0x71"),
            "{other}"
        );
        let vendor = StatusKind::Other { sct: 7, sc: 0xC0 }.to_string();
        assert!(
            vendor.starts_with("vendor-specific status type 7, code 0xc0"),
            "{vendor}"
        );
    }

    #[test]
    fn retryable_follows_dnr() {
        let retry = check(StatusField::new(0, 0x21, 1, true, false).0).unwrap_err();
        assert!(retry.is_retryable());
        assert_eq!(retry.retry_delay_index(), 1);
        assert!(retry.has_more_info());
        let final_ = check(StatusField::new(2, 0x81, 0, false, true).0).unwrap_err();
        assert!(!final_.is_retryable());
    }

    #[test]
    fn check_ignores_bit_15() {
        // A caller passing the raw DW3 half with the phase shifted out keeps bit 15 clear;
        // a stray bit 15 must not change the decode.
        assert_eq!(check(0x8000), Ok(()));
    }

    #[test]
    fn every_code_round_trips() {
        for sct in 0..8u8 {
            for sc in 0..=255u8 {
                match StatusKind::from_codes(sct, sc) {
                    None => assert_eq!((sct, sc), (0, 0)),
                    Some(kind) => {
                        assert_eq!(kind.codes(), (sct, sc), "{kind:?}");
                        let field = StatusField::new(sct, sc, 0, false, true);
                        let err = check(field.0).unwrap_err();
                        assert_eq!(err.kind, kind);
                        assert_eq!(err.field, field);
                    }
                }
            }
        }
    }

    #[test]
    fn named_kinds_are_not_other() {
        // Every named variant decodes from its own codes rather than falling into Other.
        let mut named = 0;
        for sct in 0..8u8 {
            for sc in 0..=255u8 {
                if let Some(kind) = StatusKind::from_codes(sct, sc) {
                    if !matches!(kind, StatusKind::Other { .. }) {
                        named += 1;
                    }
                }
            }
        }
        assert_eq!(named, 38);
    }
}
