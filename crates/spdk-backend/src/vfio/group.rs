//! A VFIO group, `/dev/vfio/N`: the set of devices behind one IOMMU translation. It must be
//! viable (every member bound to vfio-pci or unbound) before it is attached to a container,
//! and devices are obtained from it by name (the PCI address).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::container::Container;
use super::device::Device;
use super::sys;
use super::{ioctl_ptr, Result, VfioError};

/// A group attached to a container. The group's fd is owned by the container (which
/// detaches it last); this is a handle that keeps the container alive.
#[derive(Debug, Clone)]
pub struct Group {
    container: Arc<Container>,
    path: PathBuf,
    fd: RawFd,
}

impl Group {
    /// Opens the group at `path` (e.g. `/dev/vfio/1`), checks that it is viable, attaches it
    /// to `container` and, for the container's first group, sets the IOMMU type.
    pub fn open(container: &Arc<Container>, path: impl AsRef<Path>) -> Result<Group> {
        let path = path.as_ref().to_path_buf();
        let fd = open_group(&path)?;
        let status = group_status(fd.as_raw_fd(), &path)?;
        if status.flags & sys::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::GroupNotViable {
                group: group_number(&path),
                path,
            });
        }
        let mut container_fd: libc::c_int = container.raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads an int (the container fd) through the
        // pointer; `container_fd` lives across the call.
        unsafe { ioctl_ptr(fd.as_raw_fd(), sys::VFIO_GROUP_SET_CONTAINER, &mut container_fd) }.map_err(
            |source| VfioError::Ioctl {
                op: "VFIO_GROUP_SET_CONTAINER",
                target: format!("{} (container {})", path.display(), container.path().display()),
                source,
            },
        )?;
        let raw = fd.as_raw_fd();
        container.adopt_group(path.clone(), fd)?;
        Ok(Group {
            container: Arc::clone(container),
            path,
            fd: raw,
        })
    }

    /// The group's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The container the group is attached to.
    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }

    /// Opens the device named `pci` (a PCI address such as `0000:00:01.0`) in this group.
    pub fn device(&self, pci: &str) -> Result<Device> {
        let name = CString::new(pci).map_err(|_| VfioError::InvalidName(pci.to_string()))?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string through the
        // pointer; `name` lives across the call and is not written.
        let ret = unsafe {
            ioctl_ptr(
                self.fd,
                sys::VFIO_GROUP_GET_DEVICE_FD,
                name.as_ptr() as *mut libc::c_char,
            )
        }
        .map_err(|source| VfioError::DeviceFd {
            pci: pci.to_string(),
            group: self.path.clone(),
            source,
        })?;
        // SAFETY: on success the ioctl returns a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(ret) };
        Device::new(Arc::clone(&self.container), fd, pci.to_string())
    }
}

/// Opens a group file read-write, with an error naming the path and what to check.
pub fn open_group(path: &Path) -> Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| VfioError::OpenGroup {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(OwnedFd::from(file))
}

/// Reads a group's status flags.
pub fn group_status(fd: RawFd, path: &Path) -> Result<sys::vfio_group_status> {
    let mut status = sys::vfio_group_status {
        argsz: sys::argsz::<sys::vfio_group_status>(),
        flags: 0,
    };
    // SAFETY: `status` is a live vfio_group_status with argsz set, as the ioctl expects.
    unsafe { ioctl_ptr(fd, sys::VFIO_GROUP_GET_STATUS, &mut status) }.map_err(|source| VfioError::Ioctl {
        op: "VFIO_GROUP_GET_STATUS",
        target: path.display().to_string(),
        source,
    })?;
    Ok(status)
}

/// The group number from a path like `/dev/vfio/12` ("12"), for messages.
fn group_number(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "N".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_group_names_path_and_hint() {
        let path = Path::new("/dev/vfio/987654");
        let err = open_group(path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VfioError::OpenGroup { .. }), "{err:?}");
        assert!(msg.contains("/dev/vfio/987654"), "{msg}");
        assert!(msg.contains("vfio-pci"), "{msg}");
        assert!(msg.contains("intel_iommu=on"), "{msg}");
    }

    #[test]
    fn group_number_from_path() {
        assert_eq!(group_number(Path::new("/dev/vfio/12")), "12");
    }

    #[test]
    fn not_viable_message_points_at_sysfs() {
        let err = VfioError::GroupNotViable {
            path: PathBuf::from("/dev/vfio/7"),
            group: "7".into(),
        };
        let msg = err.to_string();
        assert!(msg.contains("/sys/kernel/iommu_groups/7/devices"), "{msg}");
    }
}
