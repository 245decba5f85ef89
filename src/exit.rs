//! The `spillway` command's exit statuses, one table for every subcommand (the README's):
//!
//! | status | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | anything else: a device, I/O or driver failure during the run |
//! | 2 | bad input, from any layer: a flag, a setting (environment variable or settings file), a storage path (missing, not writable, not a regular file or block device, full), or a request this machine cannot serve (an absent GPU, no libcufile) |
//! | 3 | data mismatch: bytes read back differ from those written (`--verify`, checksums) |
//!
//! Flags and settings refused while parsing exit with 2 through clap; everything found
//! later goes through [`status_of`] and [`report`].

use std::process::ExitCode;

use spillway_runtime::Error;
use spillway_spdk::pci::PciError;

/// Success.
pub const OK: u8 = 0;
/// Anything that is neither bad input nor a data mismatch.
pub const FAILURE: u8 = 1;
/// Bad input, from any layer.
pub const BAD_INPUT: u8 = 2;
/// Bytes read back differ from those written.
pub const MISMATCH: u8 = 3;

/// The status a runtime error ends the command with.
pub fn status_of(e: &Error) -> u8 {
    match e {
        Error::InvalidArgument(_)
        | Error::Target { .. }
        | Error::NoSpace { .. }
        | Error::Unavailable { .. } => BAD_INPUT,
        Error::Corrupt { .. } => MISMATCH,
        Error::Io { source, .. } => match source.kind() {
            // Opening or sizing the storage the user named: the path is the problem.
            std::io::ErrorKind::NotFound
            | std::io::ErrorKind::PermissionDenied
            | std::io::ErrorKind::ReadOnlyFilesystem
            | std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::IsADirectory
            | std::io::ErrorKind::NotADirectory => BAD_INPUT,
            _ => FAILURE,
        },
        _ => FAILURE,
    }
}

/// The status a `spillway nvme` error ends the command with.
pub fn status_of_pci(e: &PciError) -> u8 {
    match e {
        PciError::BadAddress { .. }
        | PciError::NotFound { .. }
        | PciError::NotNvme { .. }
        | PciError::InUse { .. }
        | PciError::WrongDriver { .. }
        | PciError::NoVfioDriver { .. }
        | PciError::NoIommuGroup { .. } => BAD_INPUT,
        _ => FAILURE,
    }
}

/// Prints `error: {e}` on stderr and returns `status`.
pub fn report(e: &dyn std::fmt::Display, status: u8) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_error_has_the_status_of_the_table() {
        let io = |kind| Error::io("opening /x", std::io::Error::from(kind));
        assert_eq!(status_of(&Error::invalid("--qd 0")), BAD_INPUT);
        assert_eq!(
            status_of(&Error::Target {
                path: "/dev/null".into(),
                reason: "a character device".into()
            }),
            BAD_INPUT
        );
        assert_eq!(
            status_of(&Error::NoSpace {
                path: "/x".into(),
                offset: 0,
                needed: 1
            }),
            BAD_INPUT
        );
        assert_eq!(status_of(&io(std::io::ErrorKind::PermissionDenied)), BAD_INPUT);
        assert_eq!(status_of(&io(std::io::ErrorKind::NotFound)), BAD_INPUT);
        assert_eq!(status_of(&io(std::io::ErrorKind::Other)), FAILURE);
        assert_eq!(status_of(&Error::Device("launch failed".into())), FAILURE);
        assert_eq!(
            status_of(&Error::Corrupt {
                what: "a tensor".into(),
                path: "/x".into(),
                offset: 0,
                expected: 1,
                found: 2
            }),
            MISMATCH
        );
    }
}
