//! `spillway nvme`: lists NVMe controllers, and hands one to vfio-pci for the userspace
//! driver (`bind`) or back to the kernel (`unbind`), explicitly and never for a controller
//! in use.

use std::path::PathBuf;

use serde::Serialize;
use spillway_spdk::pci::{self, BindOutcome, NvmeFunction, PciError, SysRoots};

use crate::cli::{NvmeArgs, NvmeCommand};

/// One NVMe controller as `spillway nvme list --json` and `spillway info` report it.
#[derive(Clone, Debug, Serialize)]
pub struct NvmeController {
    /// PCI address, "0000:01:00.0".
    pub address: String,
    /// PCI vendor id, 4 hex digits.
    pub vendor: String,
    /// PCI device id, 4 hex digits.
    pub device: String,
    /// Bound driver ("nvme", "vfio-pci"), if any.
    pub driver: Option<String>,
    /// IOMMU group; none when the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// Controller character device while the nvme driver has it, "nvme0".
    pub controller: Option<String>,
    /// Namespace block devices while the nvme driver has it, ["nvme0n1"].
    pub namespaces: Vec<String>,
    /// VFIO group file while vfio-pci has it, "/dev/vfio/3".
    pub vfio_group: Option<PathBuf>,
    /// True when the userspace driver can open it (`--backend spdk --pci ADDRESS`).
    pub userspace_ready: bool,
}

impl NvmeController {
    /// The report form of `f`.
    pub fn new(f: &NvmeFunction, roots: &SysRoots) -> NvmeController {
        let vfio_group = f.vfio_group_path(roots);
        NvmeController {
            address: f.address.to_string(),
            vendor: format!("{:04x}", f.vendor),
            device: format!("{:04x}", f.device),
            driver: f.driver.clone(),
            iommu_group: f.iommu_group,
            controller: f.controller.clone(),
            namespaces: f.namespaces.clone(),
            userspace_ready: vfio_group.is_some(),
            vfio_group,
        }
    }

    /// What the controller exposes now: its namespaces, its VFIO group, or "-".
    pub fn devices(&self) -> String {
        match (&self.vfio_group, &self.controller) {
            (Some(group), _) => group.display().to_string(),
            (None, Some(ctrl)) if self.namespaces.is_empty() => ctrl.clone(),
            (None, Some(ctrl)) => format!("{ctrl}: {}", self.namespaces.join(" ")),
            (None, None) => "-".to_string(),
        }
    }
}

/// The NVMe controllers on this machine.
pub fn gather(roots: &SysRoots) -> Result<Vec<NvmeController>, PciError> {
    Ok(pci::list_nvme(roots)?
        .iter()
        .map(|f| NvmeController::new(f, roots))
        .collect())
}

/// `spillway nvme`.
pub fn run(args: &NvmeArgs) -> Result<(), PciError> {
    let roots = SysRoots::default();
    match &args.command {
        NvmeCommand::List { json } => {
            let list = gather(&roots)?;
            if *json {
                let text = serde_json::to_string_pretty(&list).expect("the list serializes to JSON");
                println!("{text}");
            } else {
                print_table(&list);
            }
        }
        NvmeCommand::Bind { pci } => {
            let outcome = pci::bind_vfio(&roots, *pci)?;
            print_outcome(&outcome);
            if outcome.function.bound_to_vfio() {
                println!("use it with: spillway bench --backend spdk --pci {pci}");
            }
        }
        NvmeCommand::Unbind { pci } => print_outcome(&pci::unbind_vfio(&roots, *pci)?),
    }
    Ok(())
}

/// One row per controller, columns aligned.
fn print_table(list: &[NvmeController]) {
    for line in table(list) {
        println!("{line}");
    }
}

/// The lines of `spillway nvme list`: a header and one row per controller.
fn table(list: &[NvmeController]) -> Vec<String> {
    if list.is_empty() {
        return vec!["no NVMe controllers found (PCI class 0x010802 under /sys/bus/pci/devices)".into()];
    }
    let header = ["ADDRESS", "ID", "DRIVER", "IOMMU", "DEVICES"].map(String::from);
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|c| {
            [
                c.address.clone(),
                format!("{}:{}", c.vendor, c.device),
                c.driver.clone().unwrap_or_else(|| "-".into()),
                c.iommu_group.map_or_else(|| "-".into(), |g| g.to_string()),
                c.devices(),
            ]
        })
        .collect();
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

/// "ADDR: nvme -> vfio-pci" (or "unchanged") and the notes.
fn print_outcome(o: &BindOutcome) {
    let name = |d: &Option<String>| d.clone().unwrap_or_else(|| "no driver".into());
    if o.changed {
        println!(
            "{}: {} -> {}",
            o.function.address,
            name(&o.previous_driver),
            name(&o.function.driver)
        );
    } else {
        println!("{}: unchanged ({})", o.function.address, name(&o.function.driver));
    }
    for note in &o.notes {
        println!("  - {note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(address: &str, driver: Option<&str>, group: Option<u32>) -> NvmeController {
        let on_nvme = driver == Some("nvme");
        NvmeController {
            address: address.into(),
            vendor: "144d".into(),
            device: "a80a".into(),
            driver: driver.map(String::from),
            iommu_group: group,
            controller: on_nvme.then(|| "nvme0".into()),
            namespaces: if on_nvme {
                vec!["nvme0n1".into(), "nvme0n2".into()]
            } else {
                Vec::new()
            },
            vfio_group: (driver == Some("vfio-pci")).then(|| PathBuf::from("/dev/vfio/4")),
            userspace_ready: driver == Some("vfio-pci"),
        }
    }

    #[test]
    fn table_aligns_columns_and_shows_namespaces_or_vfio_group() {
        let lines = table(&[
            controller("0000:01:00.0", Some("nvme"), Some(3)),
            controller("0000:02:00.0", Some("vfio-pci"), Some(4)),
            controller("0000:03:00.0", None, None),
        ]);
        assert_eq!(
            lines,
            [
                "ADDRESS       ID         DRIVER    IOMMU  DEVICES",
                "0000:01:00.0  144d:a80a  nvme      3      nvme0: nvme0n1 nvme0n2",
                "0000:02:00.0  144d:a80a  vfio-pci  4      /dev/vfio/4",
                "0000:03:00.0  144d:a80a  -         -      -",
            ]
        );
        assert_eq!(table(&[]).len(), 1);
    }
}
