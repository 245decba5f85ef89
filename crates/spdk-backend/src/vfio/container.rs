//! The VFIO container, `/dev/vfio/vfio`: one IOMMU context. Groups are attached to it, the
//! IOMMU type is set once the first group is attached, and DMA mappings are made on it.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::dma::IovaAllocator;
use super::sys;
use super::{ioctl_ptr, ioctl_val, Result, VfioError};

/// The container device's path.
pub const CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// Where IOVAs handed to DMA buffers start: 4 GiB, above the x86 MSI window (0xFEE0_0000)
/// and any low reserved ranges.
pub const IOVA_BASE: u64 = 1 << 32;
/// Where IOVAs end: 2^39, the smallest address width common IOMMUs implement (VT-d with
/// 3-level tables, QEMU's default).
pub const IOVA_END: u64 = 1 << 39;

/// A group attached to the container; detached and closed when the container drops.
struct AttachedGroup {
    path: PathBuf,
    fd: OwnedFd,
}

struct State {
    iommu_type: Option<u32>,
    groups: Vec<AttachedGroup>,
}

/// An open VFIO container. Shared through `Arc`: groups, devices and DMA buffers each hold
/// one, so the container outlives all of them.
pub struct Container {
    fd: OwnedFd,
    path: PathBuf,
    state: Mutex<State>,
    iova: Mutex<IovaAllocator>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("path", &self.path)
            .field("fd", &self.fd.as_raw_fd())
            .field("iommu_type", &self.lock_state().iommu_type)
            .field(
                "groups",
                &self
                    .lock_state()
                    .groups
                    .iter()
                    .map(|g| g.path.clone())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks the API version.
    pub fn open() -> Result<Arc<Self>> {
        Self::open_path(CONTAINER_PATH)
    }

    /// Opens a container at `path` (normally [`CONTAINER_PATH`]) and checks the API version.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Arc<Self>> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| VfioError::OpenContainer {
                path: path.clone(),
                source,
            })?;
        let fd = OwnedFd::from(file);
        let version =
            ioctl_val(fd.as_raw_fd(), sys::VFIO_GET_API_VERSION, 0).map_err(|source| VfioError::Ioctl {
                op: "VFIO_GET_API_VERSION",
                target: path.display().to_string(),
                source,
            })?;
        if version != sys::VFIO_API_VERSION {
            return Err(VfioError::ApiVersion {
                path,
                found: version,
                expected: sys::VFIO_API_VERSION,
            });
        }
        Ok(Arc::new(Container {
            fd,
            path,
            state: Mutex::new(State {
                iommu_type: None,
                groups: Vec::new(),
            }),
            iova: Mutex::new(IovaAllocator::new(IOVA_BASE, IOVA_END)),
        }))
    }

    /// The container's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw container fd.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether the container supports an extension (an IOMMU type such as
    /// [`sys::VFIO_TYPE1V2_IOMMU`]).
    pub fn check_extension(&self, ext: u32) -> Result<bool> {
        let ret = ioctl_val(self.raw_fd(), sys::VFIO_CHECK_EXTENSION, ext.into()).map_err(|source| {
            VfioError::Ioctl {
                op: "VFIO_CHECK_EXTENSION",
                target: self.path.display().to_string(),
                source,
            }
        })?;
        Ok(ret > 0)
    }

    /// The IOMMU type set on the container, once a group is attached.
    pub fn iommu_type(&self) -> Option<u32> {
        self.lock_state().iommu_type
    }

    /// The IOMMU page sizes supported (a bitmap of sizes), from `VFIO_IOMMU_GET_INFO`.
    pub fn iova_pgsizes(&self) -> Result<u64> {
        let mut info = sys::vfio_iommu_type1_info {
            argsz: sys::argsz::<sys::vfio_iommu_type1_info>(),
            ..Default::default()
        };
        // SAFETY: `info` is a live vfio_iommu_type1_info with argsz set to its size, as
        // VFIO_IOMMU_GET_INFO expects.
        unsafe { ioctl_ptr(self.raw_fd(), sys::VFIO_IOMMU_GET_INFO, &mut info) }.map_err(|source| {
            VfioError::Ioctl {
                op: "VFIO_IOMMU_GET_INFO",
                target: self.path.display().to_string(),
                source,
            }
        })?;
        Ok(if info.flags & sys::VFIO_IOMMU_INFO_PGSIZES != 0 {
            info.iova_pgsizes
        } else {
            0
        })
    }

    /// Takes ownership of an attached group's fd and, for the first group, sets the IOMMU
    /// type (Type1v2 when supported, else Type1). On failure the group is still owned, and
    /// detached when the container drops.
    pub(crate) fn adopt_group(&self, path: PathBuf, fd: OwnedFd) -> Result<()> {
        let mut state = self.lock_state();
        state.groups.push(AttachedGroup { path, fd });
        if state.iommu_type.is_some() {
            return Ok(());
        }
        let ty = if self.check_extension(sys::VFIO_TYPE1V2_IOMMU)? {
            sys::VFIO_TYPE1V2_IOMMU
        } else if self.check_extension(sys::VFIO_TYPE1_IOMMU)? {
            sys::VFIO_TYPE1_IOMMU
        } else {
            return Err(VfioError::NoIommuType {
                path: self.path.clone(),
            });
        };
        ioctl_val(self.raw_fd(), sys::VFIO_SET_IOMMU, ty.into()).map_err(|source| VfioError::Ioctl {
            op: "VFIO_SET_IOMMU",
            target: self.path.display().to_string(),
            source,
        })?;
        state.iommu_type = Some(ty);
        Ok(())
    }

    /// Maps `size` bytes at `vaddr` for device reads and writes at `iova`.
    pub(crate) fn map_dma(&self, vaddr: u64, iova: u64, size: u64) -> Result<()> {
        let mut map = sys::vfio_iommu_type1_dma_map {
            argsz: sys::argsz::<sys::vfio_iommu_type1_dma_map>(),
            flags: sys::VFIO_DMA_MAP_FLAG_READ | sys::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        };
        // SAFETY: `map` is a live vfio_iommu_type1_dma_map with argsz set; the kernel pins
        // the pages at `vaddr`, which the caller keeps mapped until `unmap_dma`.
        unsafe { ioctl_ptr(self.raw_fd(), sys::VFIO_IOMMU_MAP_DMA, &mut map) }.map_err(|source| {
            VfioError::Ioctl {
                op: "VFIO_IOMMU_MAP_DMA",
                target: format!("{} (iova {iova:#x}, {size:#x} bytes)", self.path.display()),
                source,
            }
        })?;
        Ok(())
    }

    /// Removes the mapping of `size` bytes at `iova`.
    pub(crate) fn unmap_dma(&self, iova: u64, size: u64) -> Result<()> {
        let mut unmap = sys::vfio_iommu_type1_dma_unmap {
            argsz: sys::argsz::<sys::vfio_iommu_type1_dma_unmap>(),
            flags: 0,
            iova,
            size,
        };
        // SAFETY: `unmap` is a live vfio_iommu_type1_dma_unmap with argsz set to its size
        // (no trailing bitmap data).
        unsafe { ioctl_ptr(self.raw_fd(), sys::VFIO_IOMMU_UNMAP_DMA, &mut unmap) }.map_err(|source| {
            VfioError::Ioctl {
                op: "VFIO_IOMMU_UNMAP_DMA",
                target: format!("{} (iova {iova:#x}, {size:#x} bytes)", self.path.display()),
                source,
            }
        })?;
        Ok(())
    }

    /// The container's IOVA allocator.
    pub(crate) fn iova(&self) -> MutexGuard<'_, IovaAllocator> {
        self.iova.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Every device and DMA buffer is gone (each held an Arc): detach the groups, then
        // the container fd closes with `self.fd`.
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for group in state.groups.drain(..) {
            // A failure here cannot be acted on; the fd closes regardless, which detaches.
            let _ = ioctl_val(group.fd.as_raw_fd(), sys::VFIO_GROUP_UNSET_CONTAINER, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_container_names_path_and_hint() {
        let err = Container::open_path("/nonexistent/vfio/vfio").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VfioError::OpenContainer { .. }), "{err:?}");
        assert!(msg.contains("/nonexistent/vfio/vfio"), "{msg}");
        assert!(
            msg.contains("vfio-pci") && msg.contains("intel_iommu=on"),
            "{msg}"
        );
    }

    #[test]
    fn non_vfio_file_is_rejected() {
        // /dev/null opens, but the API version ioctl fails: the error names the ioctl and path.
        let msg = Container::open_path("/dev/null").unwrap_err().to_string();
        assert!(
            msg.contains("VFIO_GET_API_VERSION") && msg.contains("/dev/null"),
            "{msg}"
        );
    }
}
