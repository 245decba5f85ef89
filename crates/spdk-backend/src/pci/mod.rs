//! Finding NVMe controllers on the PCI bus and handing them between the kernel's `nvme`
//! driver and `vfio-pci`, through sysfs, so that the userspace driver can take one.
//!
//! - [`address`]: [`PciAddress`], `DDDD:BB:DD.F`.
//! - [`sysfs`]: [`SysRoots`] (where sysfs, procfs and devfs are), listing NVMe functions
//!   ([`list_nvme`], [`find_nvme`]) and what each is bound to ([`NvmeFunction`]).
//! - [`usage`]: [`users`], everything that makes taking a controller unsafe now: mounted
//!   namespaces or partitions, swap, device-mapper or md holders, processes with its
//!   devices (or its VFIO group) open.
//! - [`bind`]: [`bind_vfio`] and [`unbind_vfio`], the explicit hand-over in both directions.
//!   Binding refuses while [`users`] finds anything.
//!
//! Every function takes a [`SysRoots`], so the same code runs on a fake tree in tests.
//! Nothing here binds or unbinds implicitly: only [`bind_vfio`] and [`unbind_vfio`] write.

pub mod address;
pub mod bind;
pub mod sysfs;
pub mod usage;

#[cfg(test)]
mod fake;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use address::PciAddress;
pub use bind::{bind_vfio, unbind_vfio, BindOutcome};
pub use sysfs::{find_nvme, list_nvme, NvmeFunction, SysRoots, NVME_CLASS, VFIO_DRIVER};
pub use usage::{users, Usage};

/// What to do when the IOMMU is off.
const HINT_IOMMU: &str = "enable VT-d / AMD-Vi in the firmware and add intel_iommu=on (Intel) or \
     amd_iommu=on (AMD) to the kernel command line, then reboot";

/// Errors from finding, inspecting, binding and unbinding PCI functions. Each names the
/// function or file concerned and what to do.
#[derive(Debug, Error)]
pub enum PciError {
    /// A PCI address that does not parse.
    #[error(
        "bad PCI address {input:?}: {reason}; expected DDDD:BB:DD.F such as 0000:01:00.0 \
         (`spillway nvme list` or `lspci -D` shows them)"
    )]
    BadAddress {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No PCI function at that address.
    #[error(
        "no PCI function {address}: {path} does not exist; `spillway nvme list` shows the NVMe \
         controllers present"
    )]
    NotFound {
        /// The address asked for.
        address: PciAddress,
        /// The sysfs directory that would describe it.
        path: PathBuf,
    },
    /// The function is not an NVMe controller.
    #[error(
        "{address} is not an NVMe controller: its PCI class is {class:#08x}, NVMe's is {nvme:#08x}; \
         `spillway nvme list` shows the NVMe controllers present",
        nvme = NVME_CLASS
    )]
    NotNvme {
        /// The address asked for.
        address: PciAddress,
        /// Its class code (class, subclass, programming interface).
        class: u32,
    },
    /// Something uses the controller: taking it from its driver now would break it.
    #[error(
        "{address} is in use; refusing to {action}:\n{list}\nstop these uses first (unmount, \
         swapoff, remove the LVM/RAID/dm devices, stop the processes), then retry",
        list = bullet_list(usages)
    )]
    InUse {
        /// The controller.
        address: PciAddress,
        /// What was refused, e.g. "bind it to vfio-pci".
        action: &'static str,
        /// Every reason found.
        usages: Vec<Usage>,
    },
    /// The vfio-pci driver is not loaded.
    #[error(
        "the vfio-pci driver is not loaded ({path} does not exist): run `modprobe vfio-pci`, and \
         make sure the IOMMU is enabled ({hint})",
        hint = HINT_IOMMU
    )]
    NoVfioDriver {
        /// The driver's sysfs directory that was looked for.
        path: PathBuf,
    },
    /// The function has no IOMMU group, so VFIO cannot take it.
    #[error("{address} has no IOMMU group, so VFIO cannot use it: the IOMMU is off; {hint}", hint = HINT_IOMMU)]
    NoIommuGroup {
        /// The controller.
        address: PciAddress,
    },
    /// The function is not bound to the driver the operation needs.
    #[error(
        "{address} is bound to {}, not vfio-pci; there is nothing to give back (`spillway nvme \
         list` shows each controller's driver)",
        driver.as_deref().unwrap_or("no driver")
    )]
    WrongDriver {
        /// The controller.
        address: PciAddress,
        /// The driver it has.
        driver: Option<String>,
    },
    /// Reading, listing or writing a kernel interface file (sysfs, procfs, devfs) failed.
    #[error("{op} {path} failed: {source}{hint}", hint = permission_hint(source))]
    Sysfs {
        /// The file or directory.
        path: PathBuf,
        /// "reading", "writing", "listing", ...
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The kernel did not reach the expected state in time.
    #[error(
        "{address}: {what} did not happen within {waited:?}; check `dmesg` for the driver's \
         messages and `spillway nvme list` for its state now"
    )]
    Settle {
        /// The controller.
        address: PciAddress,
        /// What was waited for.
        what: String,
        /// How long.
        waited: Duration,
    },
    /// Binding failed part way; `recovery` says what state the function was returned to.
    #[error("binding {address} to vfio-pci failed: {source}; {recovery}")]
    BindFailed {
        /// The controller.
        address: PciAddress,
        /// Why.
        source: Box<PciError>,
        /// What was done to undo the partial change, and the function's state now.
        recovery: String,
    },
}

impl PciError {
    /// A [`PciError::Sysfs`] for `op` on `path`.
    pub(crate) fn sysfs(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> PciError {
        PciError::Sysfs {
            path: path.into(),
            op,
            source,
        }
    }
}

/// `usages` one per line, as "  - ...".
fn bullet_list(usages: &[Usage]) -> String {
    let lines: Vec<String> = usages.iter().map(|u| format!("  - {u}")).collect();
    lines.join("\n")
}

/// Advice for a permission error: these files are root's to write.
fn permission_hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::PermissionDenied {
        " (permission denied: binding and unbinding drivers needs root; run as root or with sudo)"
    } else {
        ""
    }
}
