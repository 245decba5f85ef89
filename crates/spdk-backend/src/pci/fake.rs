//! A fake sysfs/procfs/devfs tree in a temporary directory, laid out like the real ones
//! (symlinks for `driver`, `iommu_group` and, optionally, the device directory itself), and
//! a stand-in for the kernel that reacts to one `drivers_probe` write.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::SysRoots;

/// A fake tree; removed on drop.
pub(crate) struct FakeTree {
    _dir: tempfile::TempDir,
    /// Roots pointing into it, with a short settle time.
    pub roots: SysRoots,
}

impl FakeTree {
    /// The skeleton: the PCI bus with the nvme driver (vfio-pci not loaded), an empty
    /// mountinfo with just `/`, an empty swap list and `/dev`.
    pub fn new() -> FakeTree {
        let dir = tempfile::tempdir().unwrap();
        let mut roots = SysRoots::under(dir.path());
        roots.settle = Duration::from_millis(50);
        let t = FakeTree { _dir: dir, roots };
        for d in [
            "sys/bus/pci/devices",
            "sys/devices/pci0000:00",
            "sys/block",
            "dev/vfio",
            "proc/self",
        ] {
            fs::create_dir_all(t.path(d)).unwrap();
        }
        t.driver("nvme");
        t.write("sys/bus/pci/drivers_probe", "");
        t.write(
            "proc/self/mountinfo",
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n",
        );
        t.write("proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n");
        t
    }

    /// `rel` under the tree's root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.roots.sys.parent().unwrap().join(rel)
    }

    /// Writes `text` to `rel`, creating parent directories.
    pub fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// Appends `text` to `rel`.
    pub fn append(&self, rel: &str, text: &str) {
        let old = fs::read_to_string(self.path(rel)).unwrap_or_default();
        self.write(rel, &(old + text));
    }

    /// The contents of `rel`.
    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    /// A loaded PCI driver: `/sys/bus/pci/drivers/NAME` with `bind` and `unbind`.
    pub fn driver(&self, name: &str) {
        self.write(&format!("sys/bus/pci/drivers/{name}/bind"), "");
        self.write(&format!("sys/bus/pci/drivers/{name}/unbind"), "");
    }

    /// An NVMe function (vendor 144d, device a80a). With `symlinked`, its directory lives
    /// under `/sys/devices/pci0000:00` and `/sys/bus/pci/devices/ADDR` links to it, as in
    /// real sysfs.
    pub fn function(&self, addr: &str, driver: Option<&str>, group: Option<u32>, symlinked: bool) {
        self.pci_function(addr, 0x01_08_02, driver, group, symlinked);
    }

    /// A function of another class, without an IOMMU group.
    pub fn other_function(&self, addr: &str, class: u32, driver: Option<&str>) {
        self.pci_function(addr, class, driver, None, false);
    }

    /// A function of `class` in IOMMU group `group`.
    pub fn pci_function(
        &self,
        addr: &str,
        class: u32,
        driver: Option<&str>,
        group: Option<u32>,
        symlinked: bool,
    ) {
        let (dir, up) = if symlinked {
            let real = format!("sys/devices/pci0000:00/{addr}");
            fs::create_dir_all(self.path(&real)).unwrap();
            let link = self.path(&format!("sys/bus/pci/devices/{addr}"));
            symlink(format!("../../../devices/pci0000:00/{addr}"), link).unwrap();
            (real, "../../..")
        } else {
            (format!("sys/bus/pci/devices/{addr}"), "../../../..")
        };
        self.write(&format!("{dir}/class"), &format!("{class:#08x}\n"));
        self.write(&format!("{dir}/vendor"), "0x144d\n");
        self.write(&format!("{dir}/device"), "0xa80a\n");
        self.write(&format!("{dir}/driver_override"), "(null)\n");
        if let Some(driver) = driver {
            self.set_driver(addr, Some(driver));
        }
        if let Some(group) = group {
            symlink(
                format!("{up}/kernel/iommu_groups/{group}"),
                self.path(&format!("{dir}/iommu_group")),
            )
            .unwrap();
            let members = self.path(&format!("sys/kernel/iommu_groups/{group}/devices"));
            fs::create_dir_all(&members).unwrap();
            symlink(
                format!("../../../../devices/pci0000:00/{addr}"),
                members.join(addr),
            )
            .unwrap();
        }
    }

    /// Points the function's `driver` link at `driver`, or removes it.
    pub fn set_driver(&self, addr: &str, driver: Option<&str>) {
        set_driver_link(&self.roots, addr, driver);
    }

    /// The nvme driver's view of a controller: `ADDR/nvme/CTRL/NS` for each of `entries`,
    /// and `/dev/CTRL`.
    pub fn namespaces(&self, addr: &str, ctrl: &str, entries: &[&str]) {
        for entry in entries {
            let dir = self
                .roots
                .device_dir(addr.parse().unwrap())
                .join("nvme")
                .join(ctrl)
                .join(entry);
            fs::create_dir_all(dir).unwrap();
        }
        self.write(&format!("dev/{ctrl}"), "");
    }

    /// A block device (`/sys/block/NAME` with `dev` and `holders`, and `/dev/NAME`);
    /// `name` may be `NS/PART` for a partition.
    pub fn block(&self, name: &str, devnum: &str) {
        self.write(&format!("sys/block/{name}/dev"), &format!("{devnum}\n"));
        fs::create_dir_all(self.path(&format!("sys/block/{name}/holders"))).unwrap();
        let leaf = name.rsplit('/').next().unwrap();
        self.write(&format!("dev/{leaf}"), "");
    }

    /// A process `pid` named `comm` with `target` open as descriptor `fd`.
    pub fn open(&self, pid: u32, comm: &str, fd: u32, target: &str) {
        self.write(&format!("proc/{pid}/comm"), &format!("{comm}\n"));
        let fd_dir = self.path(&format!("proc/{pid}/fd"));
        fs::create_dir_all(&fd_dir).unwrap();
        symlink(target, fd_dir.join(fd.to_string())).unwrap();
    }

    /// A stand-in for the kernel: waits for `addr` to be written to `drivers_probe`, then
    /// binds it the way `driver_override` asks (vfio-pci, creating `/dev/vfio/GROUP`) or,
    /// with no override, to nvme. Gives up after ten seconds.
    pub fn kernel_probe(&self, addr: &str, group: u32) -> JoinHandle<bool> {
        let roots = self.roots.clone();
        let addr = addr.to_string();
        thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                let probe = fs::read_to_string(roots.drivers_probe()).unwrap_or_default();
                if probe == addr {
                    let dir = roots.device_dir(addr.parse().unwrap());
                    let over = fs::read_to_string(dir.join("driver_override")).unwrap();
                    if over == "vfio-pci" {
                        fs::write(roots.dev.join(format!("vfio/{group}")), "").unwrap();
                        set_driver_link(&roots, &addr, Some("vfio-pci"));
                    } else {
                        set_driver_link(&roots, &addr, Some("nvme"));
                    }
                    return true;
                }
                thread::sleep(Duration::from_millis(2));
            }
            false
        })
    }
}

/// Points `ADDR/driver` at `driver` (relative, like sysfs), or removes it.
fn set_driver_link(roots: &SysRoots, addr: &str, driver: Option<&str>) {
    let link = roots.device_dir(addr.parse().unwrap()).join("driver");
    let _ = fs::remove_file(&link);
    if let Some(driver) = driver {
        let real_dir = fs::canonicalize(roots.device_dir(addr.parse().unwrap())).unwrap();
        let depth = real_dir
            .strip_prefix(fs::canonicalize(&roots.sys).unwrap())
            .unwrap()
            .components()
            .count();
        let up = vec![".."; depth].join("/");
        symlink(Path::new(&up).join("bus/pci/drivers").join(driver), link).unwrap();
    }
}
