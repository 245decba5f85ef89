//! The CUDA implementation of [`spillway_runtime::Device`], on the CUDA driver API through
//! `cudarc` (every CUDA library is loaded at run time: nothing CUDA is needed to build, and
//! everything here returns errors rather than panicking on a machine without a GPU).
//!
//! - [`probe`]: the driver (version, which libcuda) and the GPUs, never panicking.
//! - [`CudaDevice`]: one GPU, attached through its primary context (shared with the CUDA
//!   runtime and so with PyTorch): device and pinned memory, host registration, streams,
//!   the test-pattern kernels, the pack/unpack kernels (`kernels/pack.cu`: many pieces
//!   gathered into one extent, or scattered back, in one launch on the caller's stream), and
//!   the CRC-32C kernel (`kernels/crc32c.cu`: the checksums of many pieces in one launch on
//!   the caller's stream, read back without blocking it).
//! - [`CudaStream`], [`CudaEvent`]: non-blocking streams and timing-free events;
//!   [`ForeignStream`]: another library's stream (PyTorch's), borrowed to follow its order.
//! - [`kernel_build`]: how the kernels of `kernels/` were built into this binary (PTX from
//!   nvcc, or CUDA C source compiled by NVRTC at first use; see `build.rs`).
//!
//! Layers, bottom up: `raw` wraps single driver calls and holds the unsafe code; `memory`,
//! `stream` and `kernels` are safe RAII types over it; `launch` (pattern kernels) and
//! `pack` (pack kernels, with `pack_table` building their piece tables and `upload` moving
//! those to the GPU in stream order) and `crc` (the CRC-32C kernel, its constants and its
//! result buffers; its tables go through `upload` too) launch kernels; `device` implements
//! the runtime's trait with them.

mod crc;
mod device;
mod error;
mod foreign;
mod kernels;
mod launch;
mod memory;
mod nvrtc;
mod pack;
mod pack_table;
mod probe;
mod raw;
mod stream;
mod upload;

pub use device::CudaDevice;
pub use foreign::ForeignStream;
pub use kernels::kernel_build;
pub use probe::{probe, CudaProbe, DriverInfo, GpuInfo};
pub use stream::{CudaEvent, CudaStream};
