//! [`OpenError`]: why an engine could not be opened, with the refusal of a capacity the
//! storage cannot hold ([`CapacityRefusal`]) kept apart, so that a caller that chose the
//! capacity for its user (`spillway bench --workload tensors`) can say which of its own
//! inputs to change.

use std::path::PathBuf;

use spillway_runtime::Error;

use super::capacity::{bytes, list};
use crate::fs::HEADROOM_MAX;
use crate::size::format_size;

/// A capacity the per-filesystem accounting refuses ([`super::capacity`]), with the
/// figures it found. Its message names the capacity, the paths, the bytes asked and the
/// bytes there are, and says what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CapacityRefusal {
    /// The paths on one filesystem would take more than it has available.
    #[error(
        "capacity={capacity} asks {} of the filesystem at {}{} for {}, which has {} \
         available (free space{}); pass a smaller capacity= (at most {} with these \
         paths), free space there, or move some of the paths to another filesystem",
        bytes(*.wanted),
        .mount.display(),
        memory_backed(*.ram_backed),
        list(.paths),
        bytes(*.available),
        held_already(" and the ", *.held),
        bytes(*.largest)
    )]
    Filesystem {
        /// The capacity asked for, bytes.
        capacity: u64,
        /// Where the filesystem is mounted.
        mount: PathBuf,
        /// Whether it is memory-backed (tmpfs, ramfs).
        ram_backed: bool,
        /// The paths on it.
        paths: Vec<PathBuf>,
        /// Bytes the capacity puts on those paths together.
        wanted: u64,
        /// Bytes they have: the filesystem's free space and [`held`](Self::Filesystem::held).
        available: u64,
        /// Of those, bytes their files hold already.
        held: u64,
        /// The largest capacity these paths can hold.
        largest: u64,
    },
    /// The paths on memory-backed filesystems (tmpfs, ramfs), whose space is the host's
    /// memory, would leave the host less than its headroom.
    #[error(
        "capacity={capacity} puts {} on {}, on a memory-backed filesystem (tmpfs space is RAM): \
         the host has {} of memory available{}, {} of which stay free for everything else \
         (a tenth of its memory, at most {}){}; pass a smaller capacity= (at most {} with \
         these paths), or put the paths on a disk",
        bytes(*.wanted),
        list(.paths),
        bytes(*.available),
        held_already(", plus the ", *.held),
        bytes(*.headroom),
        format_size(HEADROOM_MAX),
        engine_memory(*.extra_ram),
        bytes(*.largest)
    )]
    Memory {
        /// The capacity asked for, bytes.
        capacity: u64,
        /// The paths on memory-backed filesystems.
        paths: Vec<PathBuf>,
        /// Bytes the capacity puts on them together.
        wanted: u64,
        /// Bytes of memory the host has available.
        available: u64,
        /// Bytes their files hold already (memory they have taken before).
        held: u64,
        /// Bytes of memory left free for everything else.
        headroom: u64,
        /// Other host memory the engine takes (a host-memory tier).
        extra_ram: u64,
        /// The largest capacity these paths can hold.
        largest: u64,
    },
}

/// " (a memory-backed filesystem: its space is RAM)" for one, else nothing.
fn memory_backed(ram_backed: bool) -> &'static str {
    if ram_backed {
        " (a memory-backed filesystem: its space is RAM)"
    } else {
        ""
    }
}

/// "`before`N bytes their files hold already" when they hold any, else nothing.
fn held_already(before: &str, held: u64) -> String {
    if held > 0 {
        format!("{before}{} their files hold already", bytes(held))
    } else {
        String::new()
    }
}

/// ", and N bytes go to the engine's host memory" when it takes any, else nothing.
fn engine_memory(extra_ram: u64) -> String {
    if extra_ram > 0 {
        format!(", and {} go to the engine's host memory", bytes(extra_ram))
    } else {
        String::new()
    }
}

/// Why an engine could not be opened ([`super::EngineBuilder::prepare`]): the storage
/// cannot hold the capacity asked for, or anything else. Either one becomes an
/// [`Error`] with the same message ([`Error::InvalidArgument`] for the capacity), which is
/// what the bindings report.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The storage cannot hold the capacity asked for.
    #[error("{}", Error::invalid(.0.to_string()))]
    Capacity(#[from] CapacityRefusal),
    /// Anything else.
    #[error(transparent)]
    Other(#[from] Error),
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Error {
        match e {
            OpenError::Capacity(refusal) => Error::invalid(refusal.to_string()),
            OpenError::Other(e) => e,
        }
    }
}
