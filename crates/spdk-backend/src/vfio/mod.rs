//! Access to a PCI function through Linux VFIO: the kernel hands user space the device's
//! registers, its configuration space and an IOMMU to translate its DMA, so that a driver
//! can run without a kernel driver and without touching memory the device was not given.
//!
//! Layered like the hardware interface it wraps:
//! - [`sys`]: raw uAPI definitions (ioctl numbers, `#[repr(C)]` argument structures).
//! - [`container`]: `/dev/vfio/vfio`, the IOMMU context; it owns the attached groups and
//!   the IOVA space.
//! - [`group`]: `/dev/vfio/N`, an IOMMU group, attached to a container; hands out devices.
//! - [`device`]: a device fd, its regions, BAR0 mapped as [`device::Bar`], and config space.
//! - [`dma`]: [`dma::DmaBuffer`], memory mapped into the IOMMU at an IOVA the device uses.
//!
//! Lifetimes follow the kernel's rules without the caller ordering drops: devices and DMA
//! buffers hold an `Arc` to their [`container::Container`], and the container detaches its
//! groups and closes its fd only once all of them are gone, so DMA mappings are always
//! removed before the IOMMU context disappears.
//!
//! Typical use:
//!
//! ```no_run
//! use spillway_spdk::vfio::{Container, DmaBuffer, Group};
//!
//! # fn main() -> Result<(), spillway_spdk::vfio::VfioError> {
//! let container = Container::open()?;
//! let group = Group::open(&container, "/dev/vfio/1")?;
//! let device = group.device("0000:00:01.0")?;
//! device.enable_bus_master()?;
//! let bar0 = device.map_bar0()?;
//! let cap = bar0.read64(0)?;
//! let buf = DmaBuffer::new(&container, 2 << 20)?;
//! # let _ = (cap, buf.iova());
//! # Ok(())
//! # }
//! ```

pub mod container;
pub mod device;
pub mod dma;
pub mod group;
pub mod sys;

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

use thiserror::Error;

pub use container::Container;
pub use device::{Bar, Device, RegionInfo};
pub use dma::{DmaBuffer, IovaAllocator};
pub use group::Group;

/// What to check when VFIO itself is unavailable.
const HINT_VFIO: &str = "is the vfio-pci module loaded (modprobe vfio-pci) and is the IOMMU enabled \
     (intel_iommu=on or amd_iommu=on on the kernel command line)?";
/// What to check when a group or device cannot be opened.
const HINT_GROUP: &str = "is the device bound to vfio-pci (echo vfio-pci > \
     /sys/bus/pci/devices/<addr>/driver_override; echo <addr> > /sys/bus/pci/drivers_probe)? \
     is the IOMMU enabled (intel_iommu=on)? does this user have access to the group file?";

/// Errors from the VFIO layer. Each names what failed, on which device or path, and what to
/// check.
#[derive(Debug, Error)]
pub enum VfioError {
    /// Opening the container (`/dev/vfio/vfio`) failed.
    #[error("cannot open VFIO container {path}: {source}; {hint}", hint = HINT_VFIO)]
    OpenContainer {
        /// The container path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The kernel speaks a different VFIO API version.
    #[error("VFIO API version {found} at {path}, expected {expected}: the kernel's VFIO is incompatible")]
    ApiVersion {
        /// The container path.
        path: PathBuf,
        /// The version the kernel reported.
        found: i32,
        /// The version this code speaks.
        expected: i32,
    },
    /// Neither type1 IOMMU backend is available.
    #[error(
        "VFIO container {path} supports neither the Type1v2 nor the Type1 IOMMU: is the \
         vfio_iommu_type1 module loaded and the IOMMU enabled (intel_iommu=on)?"
    )]
    NoIommuType {
        /// The container path.
        path: PathBuf,
    },
    /// Opening a group file failed.
    #[error("cannot open VFIO group {path}: {source}; {hint}", hint = HINT_GROUP)]
    OpenGroup {
        /// The group path (`/dev/vfio/N`).
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The group has devices that are bound to a host driver.
    #[error(
        "VFIO group {path} is not viable: every device in the group must be bound to vfio-pci \
         (or to no driver); check /sys/kernel/iommu_groups/{group}/devices and rebind them"
    )]
    GroupNotViable {
        /// The group path.
        path: PathBuf,
        /// The group number (the file name).
        group: String,
    },
    /// Getting the device fd failed.
    #[error(
        "cannot get device {pci} from VFIO group {group}: {source}; is {pci} in that group \
         (see /sys/bus/pci/devices/{pci}/iommu_group)? {hint}",
        hint = HINT_GROUP
    )]
    DeviceFd {
        /// The PCI address asked for.
        pci: String,
        /// The group path.
        group: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A VFIO ioctl failed.
    #[error("{op} on {target} failed: {source}")]
    Ioctl {
        /// The ioctl, e.g. "VFIO_DEVICE_GET_REGION_INFO".
        op: &'static str,
        /// What it was issued on (a path, or a device with a region).
        target: String,
        /// The OS error.
        source: io::Error,
    },
    /// A region cannot be used the way asked (not mmappable, empty, ...).
    #[error("region {index} of device {pci}: {what}")]
    Region {
        /// The device's PCI address.
        pci: String,
        /// The region index.
        index: u32,
        /// What is wrong.
        what: String,
    },
    /// `mmap` failed.
    #[error("mmap of {what} ({len} bytes) failed: {source}")]
    Mmap {
        /// What was being mapped.
        what: String,
        /// The length asked for.
        len: usize,
        /// The OS error.
        source: io::Error,
    },
    /// A register access outside the BAR or misaligned.
    #[error(
        "{width}-byte access at offset {offset:#x} of BAR{bar} of {pci} ({len:#x} bytes) is out of \
         bounds or misaligned"
    )]
    BarAccess {
        /// The device's PCI address.
        pci: String,
        /// The BAR index.
        bar: u32,
        /// The offset asked for.
        offset: usize,
        /// The access width in bytes.
        width: usize,
        /// The BAR's mapped length.
        len: usize,
    },
    /// A config space read or write failed or was short.
    #[error("config space {op} of {len} bytes at {offset:#x} on {pci} failed: {source}")]
    Config {
        /// "read" or "write".
        op: &'static str,
        /// The device's PCI address.
        pci: String,
        /// The offset in config space.
        offset: u64,
        /// The access length.
        len: usize,
        /// The OS error (or a short transfer).
        source: io::Error,
    },
    /// The IOVA space has no free range of the size asked for.
    #[error(
        "no free IOVA range of {size:#x} bytes (aligned to {align:#x}) in the container's IOVA space; \
         free DMA buffers or allocate smaller ones"
    )]
    IovaExhausted {
        /// The size asked for.
        size: u64,
        /// The alignment asked for.
        align: u64,
    },
    /// A zero-size or otherwise unusable DMA buffer request.
    #[error("invalid DMA buffer request: {0}")]
    InvalidDma(String),
    /// A name with an interior NUL byte.
    #[error("PCI address {0:?} contains a NUL byte")]
    InvalidName(String),
}

/// Result alias for the VFIO layer.
pub type Result<T, E = VfioError> = std::result::Result<T, E>;

/// Issues an ioctl whose argument is a pointer, mapping -1 to the OS error.
///
/// # Safety
///
/// `arg` must point to a value of the type the ioctl `req` expects on `fd`, valid for
/// reads and writes for the duration of the call.
pub(crate) unsafe fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees `arg` matches what `req` expects; the kernel validates
    // `fd` and returns -1 for a bad one.
    let ret = unsafe { libc::ioctl(fd, req as _, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Issues an ioctl whose argument is a plain integer (or absent), mapping -1 to the OS error.
pub(crate) fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the ioctls issued through this helper (GET_API_VERSION, CHECK_EXTENSION,
    // SET_IOMMU, GROUP_UNSET_CONTAINER, DEVICE_RESET) take their argument by value and read
    // no user memory; a bad fd yields -1/EBADF.
    let ret = unsafe { libc::ioctl(fd, req as _, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as usize
    } else {
        4096
    }
}
