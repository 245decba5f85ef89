//! A VFIO device: its regions, BAR0 mapped into the process as [`Bar`], and its PCI
//! configuration space, read and written through the config region.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;

use super::container::Container;
use super::sys;
use super::{ioctl_ptr, ioctl_val, Result, VfioError};

/// Offset of the PCI command register in config space.
pub const PCI_COMMAND: u64 = 0x04;
/// PCI command register: memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// PCI command register: bus master enable (the device may issue DMA).
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// What `VFIO_DEVICE_GET_INFO` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// The number of regions (9 for vfio-pci: six BARs, ROM, config, VGA).
    pub num_regions: u32,
    /// The number of interrupt types.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Whether the device is a PCI device.
    pub fn is_pci(&self) -> bool {
        self.flags & sys::VFIO_DEVICE_FLAGS_PCI != 0
    }

    /// Whether `VFIO_DEVICE_RESET` is supported.
    pub fn can_reset(&self) -> bool {
        self.flags & sys::VFIO_DEVICE_FLAGS_RESET != 0
    }
}

/// What `VFIO_DEVICE_GET_REGION_INFO` reports for one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// The region's size in bytes (0: absent).
    pub size: u64,
    /// The region's offset in the device fd, for pread/pwrite/mmap.
    pub offset: u64,
}

impl RegionInfo {
    /// Whether the region can be mmapped.
    pub fn mmappable(&self) -> bool {
        self.flags & sys::VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// An open VFIO device. Holds its container alive; the device fd closes on drop.
#[derive(Debug)]
pub struct Device {
    container: Arc<Container>,
    fd: OwnedFd,
    pci: String,
    info: DeviceInfo,
    config: RegionInfo,
}

impl Device {
    pub(crate) fn new(container: Arc<Container>, fd: OwnedFd, pci: String) -> Result<Device> {
        let info = device_info(fd.as_raw_fd(), &pci)?;
        let config = region_info(fd.as_raw_fd(), &pci, sys::VFIO_PCI_CONFIG_REGION_INDEX)?;
        Ok(Device {
            container,
            fd,
            pci,
            info,
            config,
        })
    }

    /// The device's PCI address.
    pub fn pci_address(&self) -> &str {
        &self.pci
    }

    /// The container the device's group is attached to.
    pub fn container(&self) -> &Arc<Container> {
        &self.container
    }

    /// What the kernel reports about the device.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// The raw device fd.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Information on region `index`.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        region_info(self.raw_fd(), &self.pci, index)
    }

    /// Resets the device (`VFIO_DEVICE_RESET`).
    pub fn reset(&self) -> Result<()> {
        ioctl_val(self.raw_fd(), sys::VFIO_DEVICE_RESET, 0).map_err(|source| VfioError::Ioctl {
            op: "VFIO_DEVICE_RESET",
            target: self.pci.clone(),
            source,
        })?;
        Ok(())
    }

    /// Maps BAR0 (the NVMe controller registers).
    pub fn map_bar0(&self) -> Result<Bar> {
        self.map_bar(sys::VFIO_PCI_BAR0_REGION_INDEX)
    }

    /// Maps BAR `index` (0..=5) read-write.
    pub fn map_bar(&self, index: u32) -> Result<Bar> {
        let region = self.region_info(index)?;
        let bad = |what: &str| VfioError::Region {
            pci: self.pci.clone(),
            index,
            what: what.to_string(),
        };
        if region.size == 0 {
            return Err(bad("the BAR is absent (size 0)"));
        }
        if !region.mmappable() {
            return Err(bad("the BAR cannot be mmapped (no VFIO_REGION_INFO_FLAG_MMAP)"));
        }
        let len =
            usize::try_from(region.size).map_err(|_| bad("the BAR is larger than the address space"))?;
        let offset =
            libc::off_t::try_from(region.offset).map_err(|_| bad("the region offset does not fit off_t"))?;
        // SAFETY: a fresh shared mapping of the device fd at the region's offset; the kernel
        // checks the range against the BAR. The result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioError::Mmap {
                what: format!("BAR{index} of {}", self.pci),
                len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| bad("mmap returned a null pointer"))?;
        Ok(Bar {
            ptr,
            len,
            index,
            pci: self.pci.clone(),
        })
    }

    /// Reads `buf.len()` bytes of config space at `offset`.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        let err = |source| VfioError::Config {
            op: "read",
            pci: self.pci.clone(),
            offset,
            len,
            source,
        };
        let pos = self.config_pos(offset, len).map_err(err)?;
        // SAFETY: `buf` is valid for writes of `len` bytes for the call.
        let n = unsafe { libc::pread(self.raw_fd(), buf.as_mut_ptr().cast(), len, pos) };
        check_transfer(n, len).map_err(err)
    }

    /// Writes `buf` to config space at `offset`.
    pub fn write_config(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let err = |source| VfioError::Config {
            op: "write",
            pci: self.pci.clone(),
            offset,
            len: buf.len(),
            source,
        };
        let pos = self.config_pos(offset, buf.len()).map_err(err)?;
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call.
        let n = unsafe { libc::pwrite(self.raw_fd(), buf.as_ptr().cast(), buf.len(), pos) };
        check_transfer(n, buf.len()).map_err(err)
    }

    /// Reads a 16-bit config register.
    pub fn read_config_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_config(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a 32-bit config register.
    pub fn read_config_u32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_config(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a 16-bit config register.
    pub fn write_config_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.write_config(offset, &value.to_le_bytes())
    }

    /// Writes a 32-bit config register.
    pub fn write_config_u32(&self, offset: u64, value: u32) -> Result<()> {
        self.write_config(offset, &value.to_le_bytes())
    }

    /// Sets Bus Master Enable (bit 2 of the PCI command register) so the device can DMA.
    /// Returns the command register's new value.
    pub fn enable_bus_master(&self) -> Result<u16> {
        let cmd = self.read_config_u16(PCI_COMMAND)?;
        let new = cmd | PCI_COMMAND_MASTER;
        if new != cmd {
            self.write_config_u16(PCI_COMMAND, new)?;
        }
        self.read_config_u16(PCI_COMMAND)
    }

    fn config_pos(&self, offset: u64, len: usize) -> io::Result<libc::off_t> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.config.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("outside the {}-byte config region", self.config.size),
            ));
        }
        libc::off_t::try_from(self.config.offset + offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset does not fit off_t"))
    }
}

fn check_transfer(n: isize, want: usize) -> io::Result<()> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else if n as usize != want {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short transfer: {n} of {want} bytes"),
        ))
    } else {
        Ok(())
    }
}

/// `VFIO_DEVICE_GET_INFO` on a device fd.
pub fn device_info(fd: RawFd, pci: &str) -> Result<DeviceInfo> {
    let mut info = sys::vfio_device_info {
        argsz: sys::argsz::<sys::vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: `info` is a live vfio_device_info with argsz set to its size.
    unsafe { ioctl_ptr(fd, sys::VFIO_DEVICE_GET_INFO, &mut info) }.map_err(|source| VfioError::Ioctl {
        op: "VFIO_DEVICE_GET_INFO",
        target: pci.to_string(),
        source,
    })?;
    Ok(DeviceInfo {
        flags: info.flags,
        num_regions: info.num_regions,
        num_irqs: info.num_irqs,
    })
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` on a device fd.
pub fn region_info(fd: RawFd, pci: &str, index: u32) -> Result<RegionInfo> {
    let mut info = sys::vfio_region_info {
        argsz: sys::argsz::<sys::vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: `info` is a live vfio_region_info with argsz and index set; the kernel writes
    // no capability chain beyond argsz.
    unsafe { ioctl_ptr(fd, sys::VFIO_DEVICE_GET_REGION_INFO, &mut info) }.map_err(|source| {
        VfioError::Ioctl {
            op: "VFIO_DEVICE_GET_REGION_INFO",
            target: format!("{pci} region {index}"),
            source,
        }
    })?;
    Ok(RegionInfo {
        index,
        flags: info.flags,
        size: info.size,
        offset: info.offset,
    })
}

/// A BAR mapped into the process, with bounds-checked volatile register access. Unmapped on
/// drop.
#[derive(Debug)]
pub struct Bar {
    ptr: NonNull<u8>,
    len: usize,
    index: u32,
    pci: String,
}

// SAFETY: the mapping is device memory reached only through volatile reads and writes of
// whole registers; sharing the pointer across threads is as safe as sharing the device.
unsafe impl Send for Bar {}
// SAFETY: as above; `&Bar` only permits individual volatile register accesses.
unsafe impl Sync for Bar {}

impl Bar {
    /// The mapped length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a mapped BAR).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The BAR index.
    pub fn index(&self) -> u32 {
        self.index
    }

    fn at(&self, offset: usize, width: usize) -> Result<*mut u8> {
        bar_check(offset, width, self.len).map_err(|()| VfioError::BarAccess {
            pci: self.pci.clone(),
            bar: self.index,
            offset,
            width,
            len: self.len,
        })?;
        // SAFETY: `offset + width <= len`, so the pointer stays inside the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// Reads a 32-bit register at `offset` (4-byte aligned).
    pub fn read32(&self, offset: usize) -> Result<u32> {
        let p = self.at(offset, 4)?;
        // SAFETY: `p` is in bounds and 4-byte aligned (the mapping is page aligned).
        Ok(u32::from_le(unsafe { p.cast::<u32>().read_volatile() }))
    }

    /// Writes a 32-bit register at `offset` (4-byte aligned).
    pub fn write32(&self, offset: usize, value: u32) -> Result<()> {
        let p = self.at(offset, 4)?;
        // SAFETY: `p` is in bounds and 4-byte aligned (the mapping is page aligned).
        unsafe { p.cast::<u32>().write_volatile(value.to_le()) };
        Ok(())
    }

    /// Reads a 64-bit register at `offset` (8-byte aligned) in one access.
    pub fn read64(&self, offset: usize) -> Result<u64> {
        let p = self.at(offset, 8)?;
        // SAFETY: `p` is in bounds and 8-byte aligned (the mapping is page aligned).
        Ok(u64::from_le(unsafe { p.cast::<u64>().read_volatile() }))
    }

    /// Writes a 64-bit register at `offset` (8-byte aligned) in one access.
    pub fn write64(&self, offset: usize, value: u64) -> Result<()> {
        let p = self.at(offset, 8)?;
        // SAFETY: `p` is in bounds and 8-byte aligned (the mapping is page aligned).
        unsafe { p.cast::<u64>().write_volatile(value.to_le()) };
        Ok(())
    }
}

/// Whether a `width`-byte access at `offset` fits a `len`-byte BAR and is naturally aligned.
fn bar_check(offset: usize, width: usize, len: usize) -> Result<(), ()> {
    let fits = offset.checked_add(width).is_some_and(|end| end <= len);
    if fits && offset.is_multiple_of(width) {
        Ok(())
    } else {
        Err(())
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map_bar`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_bounds_and_alignment() {
        assert!(bar_check(0, 8, 0x4000).is_ok());
        assert!(bar_check(0x1C, 4, 0x4000).is_ok());
        assert!(bar_check(0x3FFC, 4, 0x4000).is_ok());
        assert!(bar_check(0x4000, 4, 0x4000).is_err());
        assert!(bar_check(0x3FFC, 8, 0x4000).is_err());
        assert!(bar_check(2, 4, 0x4000).is_err());
        assert!(bar_check(4, 8, 0x4000).is_err());
        assert!(bar_check(usize::MAX - 1, 4, usize::MAX).is_err());
    }

    #[test]
    fn bus_master_bit() {
        assert_eq!(PCI_COMMAND, 4);
        assert_eq!(PCI_COMMAND_MASTER, 0b100);
    }
}
