//! spillway-runtime: the device-agnostic core of spillway.
//!
//! - [`Device`]: memory, copies, streams and events of a GPU (or of the host, for tests:
//!   [`HostDevice`]).
//! - [`Backend`]: moves extents between memory and storage [`Target`]s, completing through
//!   [`Ticket`]s.
//! - [`engine`]: the offload engine — offload, dedup, packing, prefetch, forwarding, fetch.
//! - [`extents`]: the allocator of aligned extents on storage targets.
//! - [`checksum`]: CRC-32C block lists of stored tensors, checked on the bytes read back.
//! - [`pack`]: gathering many tensor pieces into one extent and back (CPU reference).
//! - [`MemBackend`]: a backend on host memory, for tests.
//! - [`host_tier`]: a pinned host-memory arena in front of a backend, spilling to it.
//!
//! The modules holding the core types (backend, device, error, host, memory, the memory
//! backend) are private: those types are used from the crate's root, one path each.
//! - [`striped`]: several targets striped into one, each with a backend of its own.
//! - [`faults`]: a backend wrapper injecting errors, short I/O, ENOSPC and latency.
//! - [`pattern`]: the deterministic data used to verify round trips.
//! - [`size`]: byte sizes as spillway reads and prints them ("4KiB", "1M", "2GB").
//!
//! Nothing here calls CUDA; the CUDA device lives in the `spillway` crate.

#![warn(missing_docs)]

mod backend;
pub mod checksum;
mod device;
pub mod engine;
mod error;
pub mod extents;
pub mod faults;
mod host;
pub mod host_tier;
mod mem_backend;
mod memory;
pub mod pack;
pub mod pattern;
pub mod short;
pub mod size;
pub mod striped;
pub mod target;

pub use backend::{
    ticket, Backend, BackendInfo, Completer, IoOp, IoRequest, TargetId, TargetInfo, Ticket,
    DEFAULT_QUEUE_DEPTH,
};
pub use device::{Device, DeviceInfo, DeviceKind, Event, HostRegistration, PendingChecksums, Stream};
pub use error::{Error, Result};
pub use extents::{Extent, ExtentAllocator, OutOfSpace, SpaceUsage};
pub use faults::{FaultPlan, FaultStats, FaultyBackend};
pub use host::{HostDevice, HostEvent, HostEventTrigger};
pub use host_tier::{HostTierBackend, HostTierConfig, HostTierStats};
pub use mem_backend::MemBackend;
pub use memory::{AlignedBuf, DeviceBuffer, DevicePtr, MemRef, PinnedBuffer};
pub use pack::PackPiece;
pub use striped::{Member, MemberStats, StripedBackend};
pub use target::{
    anonymous_mode, check_directory, check_distinct, check_storage_path, check_trailing_slash, file_kind,
    open_target, AnonymousMode, DirectIo, OpenedTarget, PrivateFile, Target,
};
