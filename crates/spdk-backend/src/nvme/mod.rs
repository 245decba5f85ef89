//! The NVMe controller as the specification describes it (NVM Express Base Specification
//! 1.4 and 2.0, with the NVM Command Set): pure data layouts and arithmetic, tested without
//! a device.
//!
//! - [`regs`]: the controller registers (CAP, VS, CC, CSTS, AQA, ASQ, ACQ) and doorbells.
//! - [`cmd`]: the 64-byte submission queue entry with builders for the admin and NVM
//!   commands the driver issues, and the 16-byte completion queue entry.
//! - [`status`]: decoding a completion's status field into a typed error.
//! - [`identify`]: parsing the Identify Controller, Identify Namespace and active namespace
//!   list data structures.
//! - [`prp`]: describing a transfer's memory with PRP entries and PRP lists, and splitting a
//!   request into commands no larger than the controller's maximum data transfer size.
//! - [`queue`]: the ring arithmetic of a queue pair (tail, head, phase tag) and command
//!   identifier allocation.
//!
//! Everything here is little-endian on the wire, as the specification requires; the types
//! convert to and from byte arrays explicitly so that nothing depends on the host's byte
//! order or on reinterpreting memory.

pub mod cmd;
pub mod identify;
pub mod prp;
pub mod queue;
pub mod regs;
pub mod status;
