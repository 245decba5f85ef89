//! Raw definitions from the Linux VFIO uAPI (`include/uapi/linux/vfio.h`): ioctl numbers,
//! argument structures and flags, laid out exactly as the kernel expects (`#[repr(C)]`).
//!
//! Nothing here is safe to call on its own; [`super::container`], [`super::group`],
//! [`super::device`] and [`super::dma`] wrap these in functions that check results.

#![allow(non_camel_case_types)]

use libc::c_ulong;

/// The ioctl "type" of every VFIO ioctl: `';'`.
pub const VFIO_TYPE: u8 = b';';
/// The first VFIO ioctl number.
pub const VFIO_BASE: u8 = 100;

/// `_IO(type, nr)`: an ioctl number without a size or direction encoded.
pub const fn io(ty: u8, nr: u8) -> c_ulong {
    ((ty as c_ulong) << 8) | nr as c_ulong
}

/// Returns `VFIO_API_VERSION` (on the container).
pub const VFIO_GET_API_VERSION: c_ulong = io(VFIO_TYPE, VFIO_BASE);
/// Whether an extension (an IOMMU type) is supported: 1 if so (on the container).
pub const VFIO_CHECK_EXTENSION: c_ulong = io(VFIO_TYPE, VFIO_BASE + 1);
/// Sets the container's IOMMU type; needs at least one group attached.
pub const VFIO_SET_IOMMU: c_ulong = io(VFIO_TYPE, VFIO_BASE + 2);
/// Fills a [`vfio_group_status`] (on a group).
pub const VFIO_GROUP_GET_STATUS: c_ulong = io(VFIO_TYPE, VFIO_BASE + 3);
/// Attaches a group to a container, given a pointer to the container's fd.
pub const VFIO_GROUP_SET_CONTAINER: c_ulong = io(VFIO_TYPE, VFIO_BASE + 4);
/// Detaches a group from its container.
pub const VFIO_GROUP_UNSET_CONTAINER: c_ulong = io(VFIO_TYPE, VFIO_BASE + 5);
/// Returns a device fd, given a NUL-terminated device name (the PCI address).
pub const VFIO_GROUP_GET_DEVICE_FD: c_ulong = io(VFIO_TYPE, VFIO_BASE + 6);
/// Fills a [`vfio_device_info`].
pub const VFIO_DEVICE_GET_INFO: c_ulong = io(VFIO_TYPE, VFIO_BASE + 7);
/// Fills a [`vfio_region_info`] for the region whose index is set.
pub const VFIO_DEVICE_GET_REGION_INFO: c_ulong = io(VFIO_TYPE, VFIO_BASE + 8);
/// Fills a `vfio_irq_info`.
pub const VFIO_DEVICE_GET_IRQ_INFO: c_ulong = io(VFIO_TYPE, VFIO_BASE + 9);
/// Configures interrupts through a `vfio_irq_set`.
pub const VFIO_DEVICE_SET_IRQS: c_ulong = io(VFIO_TYPE, VFIO_BASE + 10);
/// Resets the device (function level reset or equivalent).
pub const VFIO_DEVICE_RESET: c_ulong = io(VFIO_TYPE, VFIO_BASE + 11);
/// Fills a [`vfio_iommu_type1_info`] (on the container).
pub const VFIO_IOMMU_GET_INFO: c_ulong = io(VFIO_TYPE, VFIO_BASE + 12);
/// Maps memory for DMA through a [`vfio_iommu_type1_dma_map`].
pub const VFIO_IOMMU_MAP_DMA: c_ulong = io(VFIO_TYPE, VFIO_BASE + 13);
/// Unmaps DMA memory through a [`vfio_iommu_type1_dma_unmap`].
pub const VFIO_IOMMU_UNMAP_DMA: c_ulong = io(VFIO_TYPE, VFIO_BASE + 14);

/// The API version this code speaks.
pub const VFIO_API_VERSION: i32 = 0;

/// The original type1 IOMMU backend.
pub const VFIO_TYPE1_IOMMU: u32 = 1;
/// Type1 version 2: stricter unmap semantics; preferred when available.
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;

/// Group status flag: every device in the group is bound to a VFIO driver (or unbound).
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// Group status flag: the group is attached to a container.
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;

/// Device info flag: the device supports `VFIO_DEVICE_RESET`.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// Device info flag: a PCI device.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// Region flag: readable with `pread`.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// Region flag: writable with `pwrite`.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// Region flag: can be `mmap`ed.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// Region flag: a capability chain follows.
pub const VFIO_REGION_INFO_FLAG_CAPS: u32 = 1 << 3;

/// Region index of BAR0 of a vfio-pci device.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// Region index of the PCI configuration space of a vfio-pci device.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// DMA map flag: the device may read the memory.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// DMA map flag: the device may write the memory.
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

/// IOMMU info flag: `iova_pgsizes` is valid.
pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;

/// `struct vfio_group_status`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_group_status {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_device_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_device_info {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_region_info {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_iommu_type1_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_iommu_type1_info {
    pub argsz: u32,
    pub flags: u32,
    pub iova_pgsizes: u64,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_iommu_type1_dma_map {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_iommu_type1_dma_unmap` (without the trailing flexible `data` array).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct vfio_iommu_type1_dma_unmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

/// The `argsz` value for a structure: its size in bytes.
pub const fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3B64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3B65);
        assert_eq!(VFIO_SET_IOMMU, 0x3B66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3B67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3B68);
        assert_eq!(VFIO_GROUP_UNSET_CONTAINER, 0x3B69);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3B6A);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3B6B);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3B6C);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO, 0x3B6D);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3B6E);
        assert_eq!(VFIO_DEVICE_RESET, 0x3B6F);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3B70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3B71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3B72);
    }

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(size_of::<vfio_group_status>(), 8);
        assert_eq!(size_of::<vfio_device_info>(), 24);
        assert_eq!(size_of::<vfio_region_info>(), 32);
        assert_eq!(size_of::<vfio_iommu_type1_info>(), 24);
        assert_eq!(size_of::<vfio_iommu_type1_dma_map>(), 32);
        assert_eq!(size_of::<vfio_iommu_type1_dma_unmap>(), 24);
        assert_eq!(argsz::<vfio_region_info>(), 32);
    }

    #[test]
    fn constants() {
        assert_eq!((VFIO_TYPE1_IOMMU, VFIO_TYPE1V2_IOMMU), (1, 3));
        assert_eq!((VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX), (0, 7));
        assert_eq!(VFIO_GROUP_FLAGS_VIABLE, 1);
    }
}
