//! Reading the PCI bus from sysfs: where the kernel's interfaces are ([`SysRoots`]), which
//! functions are NVMe controllers ([`list_nvme`], [`find_nvme`]) and what each is bound to
//! ([`NvmeFunction`]), plus the small file helpers the other modules share.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{PciAddress, PciError};

/// PCI class code of an NVMe controller: mass storage (01), non-volatile memory (08),
/// NVM Express (02).
pub const NVME_CLASS: u32 = 0x01_08_02;
/// The name of the VFIO PCI driver.
pub const VFIO_DRIVER: &str = "vfio-pci";
/// PCI class (without programming interface) of a PCI-to-PCI bridge.
const BRIDGE_CLASS: u32 = 0x06_04;

/// Where the kernel's interfaces are mounted, and how long binding waits for the kernel.
/// [`Default`] is the real system: `/sys`, `/proc`, `/dev` and five seconds; tests point the
/// paths at a fake tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysRoots {
    /// sysfs, normally `/sys`.
    pub sys: PathBuf,
    /// procfs, normally `/proc`.
    pub proc: PathBuf,
    /// devfs, normally `/dev`.
    pub dev: PathBuf,
    /// How long [`bind_vfio`](super::bind_vfio) and [`unbind_vfio`](super::unbind_vfio)
    /// wait for a driver to bind and its device files to appear.
    pub settle: Duration,
}

impl Default for SysRoots {
    fn default() -> SysRoots {
        SysRoots {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            dev: PathBuf::from("/dev"),
            settle: Duration::from_secs(5),
        }
    }
}

impl SysRoots {
    /// `root/sys`, `root/proc` and `root/dev`, with the default settle time.
    pub fn under(root: &Path) -> SysRoots {
        SysRoots {
            sys: root.join("sys"),
            proc: root.join("proc"),
            dev: root.join("dev"),
            ..SysRoots::default()
        }
    }

    /// `/sys/bus/pci/devices`.
    pub fn pci_devices(&self) -> PathBuf {
        self.sys.join("bus/pci/devices")
    }

    /// `/sys/bus/pci/devices/ADDR`.
    pub fn device_dir(&self, address: PciAddress) -> PathBuf {
        self.pci_devices().join(address.to_string())
    }

    /// `/sys/bus/pci/drivers/NAME`.
    pub fn driver_dir(&self, driver: &str) -> PathBuf {
        self.sys.join("bus/pci/drivers").join(driver)
    }

    /// `/sys/bus/pci/drivers_probe`.
    pub fn drivers_probe(&self) -> PathBuf {
        self.sys.join("bus/pci/drivers_probe")
    }

    /// `/sys/block/NAME`.
    pub fn block_dir(&self, name: &str) -> PathBuf {
        self.sys.join("block").join(name)
    }
}

/// One NVMe PCI function (class 0x010802) and its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeFunction {
    /// Its address.
    pub address: PciAddress,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// The driver bound to it ("nvme", "vfio-pci"), if any.
    pub driver: Option<String>,
    /// Its IOMMU group; `None` when the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// Block devices of its namespaces while the kernel's nvme driver has it, e.g.
    /// `["nvme0n1"]`, sorted. With native NVMe multipath these are the shared namespace
    /// devices (`nvme0n1`), not the hidden per-path ones (`nvme0c0n1`).
    pub namespaces: Vec<String>,
    /// Its controller character device while the nvme driver has it, e.g. "nvme0".
    pub controller: Option<String>,
}

impl NvmeFunction {
    /// True when vfio-pci is its driver.
    pub fn bound_to_vfio(&self) -> bool {
        self.driver.as_deref() == Some(VFIO_DRIVER)
    }

    /// Its VFIO group file, `/dev/vfio/N`, when it is bound to vfio-pci and has a group.
    pub fn vfio_group_path(&self, roots: &SysRoots) -> Option<PathBuf> {
        match (self.bound_to_vfio(), self.iommu_group) {
            (true, Some(group)) => Some(roots.dev.join("vfio").join(group.to_string())),
            _ => None,
        }
    }
}

/// Every NVMe function on the PCI bus, sorted by address. Empty (not an error) when there
/// is no `/sys/bus/pci/devices`, as on a machine without PCI.
pub fn list_nvme(roots: &SysRoots) -> Result<Vec<NvmeFunction>, PciError> {
    let mut found = Vec::new();
    for name in list_dir(&roots.pci_devices())? {
        let Ok(address) = name.parse::<PciAddress>() else {
            continue;
        };
        match read_class(roots, address) {
            Ok(NVME_CLASS) => found.push(read_function(roots, address)?),
            Ok(_) => {}
            // The function went away while we looked (hot unplug, SR-IOV VFs disabled).
            Err(PciError::Sysfs { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    found.sort_by_key(|f| f.address);
    Ok(found)
}

/// The NVMe function at `address`: [`PciError::NotFound`] when there is no function there,
/// [`PciError::NotNvme`] when it is not an NVMe controller.
pub fn find_nvme(roots: &SysRoots, address: PciAddress) -> Result<NvmeFunction, PciError> {
    let dir = roots.device_dir(address);
    if !dir.exists() {
        return Err(PciError::NotFound { address, path: dir });
    }
    match read_class(roots, address)? {
        NVME_CLASS => read_function(roots, address),
        class => Err(PciError::NotNvme { address, class }),
    }
}

/// The function's state as sysfs shows it now.
fn read_function(roots: &SysRoots, address: PciAddress) -> Result<NvmeFunction, PciError> {
    let dir = roots.device_dir(address);
    let controller = list_dir(&dir.join("nvme"))?
        .into_iter()
        .find(|name| name.strip_prefix("nvme").is_some_and(all_digits));
    let mut namespaces = match &controller {
        Some(ctrl) => list_dir(&dir.join("nvme").join(ctrl))?
            .iter()
            .filter_map(|name| namespace_block_name(name))
            .collect(),
        None => Vec::new(),
    };
    namespaces.sort();
    namespaces.dedup();
    Ok(NvmeFunction {
        address,
        vendor: read_hex(&dir.join("vendor"))? as u16,
        device: read_hex(&dir.join("device"))? as u16,
        driver: driver_of(roots, address)?,
        iommu_group: link_name(&dir.join("iommu_group"))?.and_then(|g| g.parse().ok()),
        namespaces,
        controller,
    })
}

/// The function's class code (class, subclass, programming interface).
pub(crate) fn read_class(roots: &SysRoots, address: PciAddress) -> Result<u32, PciError> {
    read_hex(&roots.device_dir(address).join("class"))
}

/// The driver bound to the function at `address`, from its `driver` link.
pub(crate) fn driver_of(roots: &SysRoots, address: PciAddress) -> Result<Option<String>, PciError> {
    link_name(&roots.device_dir(address).join("driver"))
}

/// The block device a namespace entry of a controller's sysfs directory stands for:
/// `nvme0n1` for itself, `nvme0n1` for the multipath path device `nvme0c1n1` (subsystem 0,
/// controller 1, namespace 1); `None` for anything else.
pub(crate) fn namespace_block_name(entry: &str) -> Option<String> {
    let rest = entry.strip_prefix("nvme")?;
    let (head, ns) = rest.split_once('n')?;
    if !all_digits(ns) {
        return None;
    }
    let subsystem = match head.split_once('c') {
        Some((subsystem, ctrl)) if all_digits(ctrl) => subsystem,
        Some(_) => return None,
        None => head,
    };
    all_digits(subsystem).then(|| format!("nvme{subsystem}n{ns}"))
}

/// One other member of an IOMMU group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GroupMember {
    /// Its address.
    pub address: PciAddress,
    /// Its driver.
    pub driver: Option<String>,
    /// Its class code.
    pub class: u32,
}

impl GroupMember {
    /// True for PCI-to-PCI bridges, which VFIO tolerates in a group whatever their driver.
    pub fn is_bridge(&self) -> bool {
        self.class >> 8 == BRIDGE_CLASS
    }
}

/// The functions in IOMMU group `group`, from `/sys/kernel/iommu_groups/N/devices`.
pub(crate) fn group_members(roots: &SysRoots, group: u32) -> Result<Vec<GroupMember>, PciError> {
    let dir = roots
        .sys
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let mut members = Vec::new();
    for name in list_dir(&dir)? {
        let Ok(address) = name.parse::<PciAddress>() else {
            continue;
        };
        members.push(GroupMember {
            address,
            driver: driver_of(roots, address)?,
            class: read_class(roots, address).unwrap_or(0),
        });
    }
    members.sort_by_key(|m| m.address);
    Ok(members)
}

/// The names in directory `path`, sorted; empty when it does not exist.
pub(crate) fn list_dir(path: &Path) -> Result<Vec<String>, PciError> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PciError::sysfs("listing", path, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PciError::sysfs("listing", path, e))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// The last component of the symlink at `path` (a driver's or group's name); `None` when
/// there is no link.
pub(crate) fn link_name(path: &Path) -> Result<Option<String>, PciError> {
    match fs::read_link(path) {
        Ok(target) => Ok(target.file_name().and_then(|n| n.to_str()).map(str::to_string)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PciError::sysfs("reading the link", path, e)),
    }
}

/// The file at `path`, without surrounding whitespace.
pub(crate) fn read_trimmed(path: &Path) -> Result<String, PciError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| PciError::sysfs("reading", path, e))
}

/// A sysfs attribute holding a hex number such as `0x010802`.
fn read_hex(path: &Path) -> Result<u32, PciError> {
    let text = read_trimmed(path)?;
    let digits = text.strip_prefix("0x").unwrap_or(&text);
    u32::from_str_radix(digits, 16).map_err(|_| {
        PciError::sysfs(
            "parsing",
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{text:?} is not a hex number"),
            ),
        )
    })
}

/// Writes `bytes` to the existing sysfs attribute at `path` in one write, as `echo` does.
pub(crate) fn write_attr(path: &Path, bytes: &[u8]) -> Result<(), PciError> {
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut file| file.write_all(bytes))
        .map_err(|e| PciError::sysfs("writing", path, e))
}

/// True when `s` is a non-empty run of ASCII digits.
pub(crate) fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeTree;
    use super::*;

    #[test]
    fn lists_nothing_without_a_pci_bus() {
        let dir = tempfile::tempdir().unwrap();
        let roots = SysRoots::under(dir.path());
        assert_eq!(list_nvme(&roots).unwrap(), Vec::new());
    }

    #[test]
    fn lists_only_nvme_functions_with_their_state() {
        let t = FakeTree::new();
        t.function("0000:02:00.0", Some("vfio-pci"), Some(7), true);
        t.function("0000:01:00.0", Some("nvme"), Some(3), false);
        t.namespaces("0000:01:00.0", "nvme0", &["nvme0n1", "nvme0n2"]);
        t.function("0000:03:00.0", None, None, false);
        t.other_function("0000:00:02.0", 0x030000, Some("i915"));
        let list = list_nvme(&t.roots).unwrap();
        let addrs: Vec<String> = list.iter().map(|f| f.address.to_string()).collect();
        assert_eq!(addrs, ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0"]);

        let kernel = &list[0];
        assert_eq!((kernel.vendor, kernel.device), (0x144d, 0xa80a));
        assert_eq!(kernel.driver.as_deref(), Some("nvme"));
        assert_eq!(kernel.iommu_group, Some(3));
        assert_eq!(kernel.controller.as_deref(), Some("nvme0"));
        assert_eq!(kernel.namespaces, ["nvme0n1", "nvme0n2"]);
        assert!(!kernel.bound_to_vfio());
        assert_eq!(kernel.vfio_group_path(&t.roots), None);

        let vfio = &list[1];
        assert!(vfio.bound_to_vfio());
        assert_eq!(vfio.vfio_group_path(&t.roots), Some(t.roots.dev.join("vfio/7")));
        assert!(vfio.namespaces.is_empty() && vfio.controller.is_none());

        let unbound = &list[2];
        assert_eq!((unbound.driver.as_deref(), unbound.iommu_group), (None, None));
    }

    #[test]
    fn find_reports_missing_and_non_nvme_functions() {
        let t = FakeTree::new();
        t.other_function("0000:00:02.0", 0x030000, Some("i915"));
        let missing: PciAddress = "0000:99:00.0".parse().unwrap();
        let err = find_nvme(&t.roots, missing).unwrap_err();
        assert!(matches!(err, PciError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("0000:99:00.0"), "{err}");
        let err = find_nvme(&t.roots, "00:02.0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, PciError::NotNvme { class: 0x030000, .. }), "{err}");
        assert!(err.to_string().contains("0x030000"), "{err}");
    }

    #[test]
    fn multipath_path_devices_map_to_shared_namespaces() {
        assert_eq!(namespace_block_name("nvme0n1").as_deref(), Some("nvme0n1"));
        assert_eq!(namespace_block_name("nvme2c5n13").as_deref(), Some("nvme2n13"));
        for other in [
            "nvme0",
            "nvme0n",
            "nvme0n1p1",
            "nvmec1n1",
            "ng0n1",
            "nvme0cxn1",
            "subsysnqn",
        ] {
            assert_eq!(namespace_block_name(other), None, "{other}");
        }
        let t = FakeTree::new();
        t.function("0000:01:00.0", Some("nvme"), Some(3), false);
        t.namespaces("0000:01:00.0", "nvme1", &["nvme0c1n1", "nvme0c1n2"]);
        let f = find_nvme(&t.roots, "0000:01:00.0".parse().unwrap()).unwrap();
        assert_eq!(f.namespaces, ["nvme0n1", "nvme0n2"]);
        assert_eq!(f.controller.as_deref(), Some("nvme1"));
    }
}
