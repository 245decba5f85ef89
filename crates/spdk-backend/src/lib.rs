//! spillway's userspace NVMe driver, after SPDK's model: the controller is driven from user
//! space through VFIO, with one polled queue pair per I/O thread and no kernel on the I/O
//! path.
//!
//! Modules mirror the hardware:
//! - [`nvme`]: the NVMe controller as the specification describes it — its registers,
//!   commands, completion statuses, Identify data and the PRP lists that describe memory.
//!   Pure data and arithmetic, tested without a device.
//! - [`vfio`]: access to the PCI function through Linux VFIO — container, group, device,
//!   BAR0 and config space, and DMA buffers mapped into the IOMMU.
//! - [`qpair`]: a submission/completion queue pair in DMA memory with its doorbells.
//! - [`controller`]: a controller brought up over VFIO: reset, enable, admin commands,
//!   Identify, the number of I/O queues, and shutdown once its last user is gone.
//! - [`io_queue`]: an I/O queue pair owned by one thread: block reads and writes, many
//!   commands in flight, no locks.
//! - [`pci`]: finding NVMe controllers in sysfs, who uses them, and handing them between
//!   the kernel's nvme driver and vfio-pci (explicitly, refusing controllers in use).
//! - [`backend`]: spillway's `Backend` trait on a namespace, one worker thread and I/O
//!   queue pair each, staging memory mapped for the controller and registered with the GPU.

pub mod backend;
pub mod controller;
pub mod io_queue;
pub mod nvme;
pub mod pci;
pub mod qpair;
pub mod vfio;
