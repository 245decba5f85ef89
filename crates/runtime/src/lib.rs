//! spillway-runtime: the device-agnostic core of spillway.
//!
//! - [`Device`]: memory, copies, streams and events of a GPU (or of the host:
//!   [`HostDevice`]).
//! - [`Backend`]: moves extents between memory and storage [`Target`]s, completing through
//!   [`Ticket`]s.
//! - [`engine`]: the offload engine — offload, dedup, packing, prefetch, forwarding, fetch.
//! - Layers around a backend: [`StripedBackend`] (several targets striped into one, each
//!   with a backend of its own), [`HostTierBackend`] (a pinned host-memory arena in front
//!   of a backend, spilling to it), [`FaultyBackend`] (injected errors, short I/O, ENOSPC
//!   and latency, for resilience tests and `--faults`).
//! - [`ExtentAllocator`]: aligned extents on storage targets; [`PackPiece`]: a tensor
//!   piece's place in a packed extent.
//! - [`short`]: resubmitting the rest of a request after a short count.
//! - [`pattern`]: the deterministic data the bench and the tests verify round trips with.
//! - [`parse_size`] / [`format_size`]: byte sizes as spillway reads and prints them
//!   ("4KiB", "1M", "2GB").
//!
//! `engine`, `short` and `pattern` are the public modules; everything else is used from
//! the crate's root, one path each. With the `testing` feature, `MemBackend` (a backend
//! on host memory) is there too, for tests of code built on this crate.
//!
//! Nothing here calls CUDA; the CUDA device lives in the `spillway` crate.

#![warn(missing_docs)]

mod backend;
mod checksum;
mod device;
pub mod engine;
mod error;
mod extents;
mod faults;
mod host;
mod host_tier;
#[cfg(any(test, feature = "testing"))]
mod mem_backend;
mod memory;
mod pack;
pub mod pattern;
pub mod short;
mod size;
mod striped;
mod target;

pub use backend::{
    ticket, Backend, BackendInfo, Completer, IoOp, IoRequest, TargetId, TargetInfo, Ticket,
    DEFAULT_QUEUE_DEPTH,
};
pub use device::{Device, DeviceInfo, DeviceKind, Event, HostRegistration, PendingChecksums, Stream};
pub use error::{Error, Result};
pub use extents::{Extent, ExtentAllocator, OutOfSpace, SpaceUsage};
pub use faults::{FaultOps, FaultPlan, FaultStats, FaultyBackend};
pub use host::{HostDevice, HostEvent, HostEventTrigger};
pub use host_tier::{HostTierBackend, HostTierConfig, HostTierStats};
#[cfg(any(test, feature = "testing"))]
pub use mem_backend::MemBackend;
pub use memory::{AlignedBuf, DeviceBuffer, DevicePtr, MemRef, PinnedBuffer};
pub use pack::{check_pack_layout, check_unpack_layout, pack_host, unpack_host, PackPiece};
pub use size::{exact_size_text, format_size, parse_bytes, parse_size};
pub use striped::{
    Member, MemberStats, StripedBackend, MAX_PIECE_RESUBMITS, MEMBER_FAILURE_LIMIT, MEMBER_RETRY_AFTER,
    MEMBER_RETRY_MAX,
};
pub use target::{
    anonymous_mode, check_directory, check_distinct, check_storage_path, check_trailing_slash, file_kind,
    open_target, AnonymousMode, DirectIo, OpenedTarget, PrivateFile, Target,
};
