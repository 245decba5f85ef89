//! Opens an NVMe controller through VFIO, reads its identity registers and maps a DMA
//! buffer: a smoke test of the VFIO layer on a real (or emulated) device.
//!
//! Usage: `vfio_probe [PCI_ADDRESS [GROUP_PATH]]`, defaulting to the `NVMEVM_PCI` and
//! `NVMEVM_GROUP` environment variables (set by the nvme-vm test harness).

mod common;

use std::process::ExitCode;

use spillway_spdk::nvme::regs::{self, Cap, Csts, Version};
use spillway_spdk::vfio::{sys, Container, DmaBuffer, Group, VfioError};

const DMA_SIZE: usize = 2 << 20;

fn run(pci: &str, group_path: &str) -> Result<(), VfioError> {
    let container = Container::open()?;
    let group = Group::open(&container, group_path)?;
    let iommu = match container.iommu_type() {
        Some(sys::VFIO_TYPE1V2_IOMMU) => "Type1v2",
        Some(sys::VFIO_TYPE1_IOMMU) => "Type1",
        _ => "unknown",
    };
    println!(
        "container {} iommu={iommu} pgsizes={:#x}; group {} attached",
        container.path().display(),
        container.iova_pgsizes()?,
        group.path().display()
    );

    let device = group.device(pci)?;
    let info = device.info();
    let ids = device.read_config_u32(0)?;
    println!(
        "device {pci}: vendor={:04x} device={:04x} pci={} reset={} regions={} irqs={}",
        ids & 0xFFFF,
        ids >> 16,
        info.is_pci(),
        info.can_reset(),
        info.num_regions,
        info.num_irqs
    );
    let cmd = device.enable_bus_master()?;
    println!("PCI command={cmd:#06x} (bus master={})", cmd & 0b100 != 0);

    let bar0_info = device.region_info(sys::VFIO_PCI_BAR0_REGION_INDEX)?;
    let bar0 = device.map_bar0()?;
    println!(
        "BAR0 size={:#x} offset={:#x} flags={:#x} mapped={:#x}",
        bar0_info.size,
        bar0_info.offset,
        bar0_info.flags,
        bar0.len()
    );
    let cap = Cap(bar0.read64(regs::CAP)?);
    let vs = Version::from_raw(bar0.read32(regs::VS)?);
    let csts = Csts(bar0.read32(regs::CSTS)?);
    println!(
        "CAP mqes={} dstrd={} timeout={:?} mpsmin={} mpsmax={} css_nvm={} VS={vs} CSTS rdy={} cfs={} \
         (raw CAP={:#018x} CSTS={:#010x})",
        cap.mqes(),
        cap.dstrd(),
        cap.timeout(),
        cap.min_page_size(),
        cap.max_page_size(),
        cap.css_nvm(),
        csts.ready(),
        csts.fatal(),
        cap.0,
        csts.0
    );

    let mut buf = DmaBuffer::new(&container, DMA_SIZE)?;
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u8) ^ 0xA5;
    }
    let ok = buf
        .as_slice()
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i as u8) ^ 0xA5);
    println!(
        "DMA buffer {} bytes at iova={:#x} vaddr={:p}: pattern written, verified={ok}",
        buf.len(),
        buf.iova(),
        buf.as_ptr()
    );
    drop(buf);
    println!("DMA buffer unmapped");
    drop(bar0);
    drop(device);
    drop(group);
    drop(container);
    Ok(())
}

fn main() -> ExitCode {
    match common::controller_args("vfio_probe") {
        Ok((pci, group)) => common::exit_status("vfio_probe", run(&pci, &group).map(|()| true), "ok"),
        Err(code) => code,
    }
}
