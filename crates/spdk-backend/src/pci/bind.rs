//! Handing an NVMe controller to vfio-pci ([`bind_vfio`]) and back to the kernel
//! ([`unbind_vfio`]) through sysfs: `driver_override` picks the driver, the current
//! driver's `unbind` releases the function, and `/sys/bus/pci/drivers_probe` makes the
//! kernel bind it again. Both refuse while anything uses the controller ([`users`]); the
//! check and the hand-over are not atomic, so a mount started in between is not seen.

use std::thread;
use std::time::{Duration, Instant};

use super::sysfs::{driver_of, find_nvme, group_members, write_attr, NvmeFunction, SysRoots, VFIO_DRIVER};
use super::usage::users;
use super::{PciAddress, PciError};

/// What [`bind_vfio`] or [`unbind_vfio`] did.
#[derive(Clone, Debug)]
pub struct BindOutcome {
    /// The function's state afterwards.
    pub function: NvmeFunction,
    /// The driver it had before.
    pub previous_driver: Option<String>,
    /// False when it was already in the state asked for and nothing was written.
    pub changed: bool,
    /// What the user should know: what changed, the VFIO group, other devices in the
    /// group, a driver that did not come back.
    pub notes: Vec<String>,
}

/// Binds the NVMe controller at `address` to vfio-pci for the userspace driver.
///
/// Refuses with [`PciError::NoVfioDriver`] when vfio-pci is not loaded,
/// [`PciError::NoIommuGroup`] when the IOMMU is off, and [`PciError::InUse`] listing every
/// reason when [`users`] finds anything. Then writes `vfio-pci` to its `driver_override`,
/// its address to its current driver's `unbind` (if it has one) and to
/// `/sys/bus/pci/drivers_probe`, and waits up to `roots.settle` for vfio-pci to bind and
/// `/dev/vfio/N` to appear. If that fails part way, it clears the override and lets the
/// kernel probe the function again, and says so in [`PciError::BindFailed`]. A function
/// already bound to vfio-pci is left alone (`changed` is false).
pub fn bind_vfio(roots: &SysRoots, address: PciAddress) -> Result<BindOutcome, PciError> {
    let function = find_nvme(roots, address)?;
    let previous = function.driver.clone();
    if function.bound_to_vfio() {
        let mut notes = vec!["already bound to vfio-pci; nothing was changed".to_string()];
        notes.extend(group_notes(roots, &function)?);
        return Ok(BindOutcome {
            function,
            previous_driver: previous,
            changed: false,
            notes,
        });
    }
    let vfio_dir = roots.driver_dir(VFIO_DRIVER);
    if !vfio_dir.is_dir() {
        return Err(PciError::NoVfioDriver { path: vfio_dir });
    }
    let group = function.iommu_group.ok_or(PciError::NoIommuGroup { address })?;
    let usages = users(roots, &function)?;
    if !usages.is_empty() {
        return Err(PciError::InUse {
            address,
            action: "bind it to vfio-pci",
            usages,
        });
    }

    write_attr(
        &roots.device_dir(address).join("driver_override"),
        VFIO_DRIVER.as_bytes(),
    )?;
    let group_path = roots.dev.join("vfio").join(group.to_string());
    let hand_over = || -> Result<(), PciError> {
        if let Some(driver) = &previous {
            write_attr(
                &roots.driver_dir(driver).join("unbind"),
                address.to_string().as_bytes(),
            )?;
        }
        write_attr(&roots.drivers_probe(), address.to_string().as_bytes())?;
        let bound = wait_for(roots.settle, || {
            Ok(driver_of(roots, address)?.as_deref() == Some(VFIO_DRIVER) && group_path.exists())
        })?;
        if bound {
            Ok(())
        } else {
            Err(PciError::Settle {
                address,
                what: format!("vfio-pci binding it and {} appearing", group_path.display()),
                waited: roots.settle,
            })
        }
    };
    if let Err(source) = hand_over() {
        return Err(PciError::BindFailed {
            address,
            source: Box::new(source),
            recovery: restore(roots, address, previous.as_deref()),
        });
    }

    let function = find_nvme(roots, address)?;
    let mut notes = Vec::new();
    if let Some(driver) = &previous {
        let mut note = format!("unbound from {driver}");
        if driver == "nvme" {
            note.push_str(&format!(
                "; its block devices are gone until `spillway nvme unbind {address}` gives it back"
            ));
        }
        notes.push(note);
    }
    notes.push(format!("bound to vfio-pci; VFIO group {}", group_path.display()));
    notes.extend(group_notes(roots, &function)?);
    Ok(BindOutcome {
        function,
        previous_driver: previous,
        changed: true,
        notes,
    })
}

/// Gives the controller at `address` back to the kernel: refuses with
/// [`PciError::WrongDriver`] unless vfio-pci has it and with [`PciError::InUse`] while a
/// process holds its VFIO group or device open. Then clears `driver_override` (writes a
/// newline), writes its address to vfio-pci's `unbind` and to `drivers_probe`, and waits up
/// to `roots.settle` for a driver (normally nvme) to bind. When none does, the outcome has
/// no driver and a note saying what to check; that is not an error.
pub fn unbind_vfio(roots: &SysRoots, address: PciAddress) -> Result<BindOutcome, PciError> {
    let function = find_nvme(roots, address)?;
    if !function.bound_to_vfio() {
        return Err(PciError::WrongDriver {
            address,
            driver: function.driver,
        });
    }
    let usages = users(roots, &function)?;
    if !usages.is_empty() {
        return Err(PciError::InUse {
            address,
            action: "give it back to the kernel",
            usages,
        });
    }
    write_attr(&roots.device_dir(address).join("driver_override"), b"\n")?;
    write_attr(
        &roots.driver_dir(VFIO_DRIVER).join("unbind"),
        address.to_string().as_bytes(),
    )?;
    write_attr(&roots.drivers_probe(), address.to_string().as_bytes())?;
    wait_for(roots.settle, || {
        Ok(driver_of(roots, address)?.is_some_and(|d| d != VFIO_DRIVER))
    })?;

    let function = find_nvme(roots, address)?;
    let mut notes = vec!["unbound from vfio-pci".to_string()];
    match function.driver.as_deref() {
        Some(VFIO_DRIVER) => notes.push(format!(
            "vfio-pci took it again: its vendor:device id {:04x} {:04x} was probably added to \
             vfio-pci's new_id; remove it with `echo {:04x} {:04x} > \
             /sys/bus/pci/drivers/vfio-pci/remove_id`, then `echo {address} > \
             /sys/bus/pci/drivers/vfio-pci/unbind; echo {address} > /sys/bus/pci/drivers_probe`",
            function.vendor, function.device, function.vendor, function.device
        )),
        Some(driver) => {
            notes.push(format!("bound to {driver}"));
            if driver == "nvme" && function.namespaces.is_empty() {
                notes.push(
                    "its namespaces appear as /dev/nvmeXnY once the controller has reset (a few seconds)"
                        .to_string(),
                );
            }
        }
        None => notes.push(format!(
            "no driver bound to it within {:?}: is the nvme module loaded? run `modprobe nvme`, then \
             `echo {address} > /sys/bus/pci/drivers_probe`",
            roots.settle
        )),
    }
    Ok(BindOutcome {
        function,
        previous_driver: Some(VFIO_DRIVER.to_string()),
        changed: true,
        notes,
    })
}

/// Undoes a failed bind as far as possible: clears `driver_override`, releases the function
/// from a driver other than `previous`, and lets the kernel probe it again. Says what state
/// the function is in now.
fn restore(roots: &SysRoots, address: PciAddress, previous: Option<&str>) -> String {
    let attempt = || -> Result<Option<String>, PciError> {
        write_attr(&roots.device_dir(address).join("driver_override"), b"\n")?;
        let current = driver_of(roots, address)?;
        if let Some(driver) = current.as_deref().filter(|d| Some(*d) != previous) {
            write_attr(
                &roots.driver_dir(driver).join("unbind"),
                address.to_string().as_bytes(),
            )?;
        }
        if current.as_deref() != previous || current.is_none() {
            write_attr(&roots.drivers_probe(), address.to_string().as_bytes())?;
            wait_for(roots.settle, || Ok(driver_of(roots, address)?.is_some()))?;
        }
        driver_of(roots, address)
    };
    match attempt() {
        Ok(Some(driver)) => format!("its driver_override was cleared; it is bound to {driver} now"),
        Ok(None) => format!(
            "its driver_override was cleared but no driver took it back: run `modprobe nvme` and \
             `echo {address} > /sys/bus/pci/drivers_probe`"
        ),
        Err(e) => format!(
            "undoing the change failed too ({e}): run `echo > /sys/bus/pci/devices/{address}/driver_override` \
             and `echo {address} > /sys/bus/pci/drivers_probe` as root"
        ),
    }
}

/// Notes about the other members of the function's IOMMU group that keep VFIO from using
/// the group: every non-bridge member must be bound to vfio-pci or to no driver.
fn group_notes(roots: &SysRoots, function: &NvmeFunction) -> Result<Vec<String>, PciError> {
    let Some(group) = function.iommu_group else {
        return Ok(Vec::new());
    };
    Ok(group_members(roots, group)?
        .into_iter()
        .filter(|m| m.address != function.address && !m.is_bridge())
        .filter_map(|m| {
            let driver = m.driver.filter(|d| d != VFIO_DRIVER)?;
            Some(format!(
                "IOMMU group {group} also holds {} (driver {driver}): VFIO opens the group only once \
                 every device in it is bound to vfio-pci or to no driver",
                m.address
            ))
        })
        .collect())
}

/// Polls `done` every 10 ms until it holds or `limit` has passed; true when it held.
fn wait_for(limit: Duration, mut done: impl FnMut() -> Result<bool, PciError>) -> Result<bool, PciError> {
    let start = Instant::now();
    loop {
        if done()? {
            return Ok(true);
        }
        let elapsed = start.elapsed();
        if elapsed >= limit {
            return Ok(false);
        }
        thread::sleep((limit - elapsed).min(Duration::from_millis(10)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeTree;
    use super::*;

    const ADDR: &str = "0000:01:00.0";

    fn addr() -> PciAddress {
        ADDR.parse().unwrap()
    }

    /// vfio-pci loaded; nvme0 at ADDR (IOMMU group 3) with nvme0n1 and partition nvme0n1p1.
    fn tree() -> FakeTree {
        let t = FakeTree::new();
        t.driver("vfio-pci");
        t.function(ADDR, Some("nvme"), Some(3), true);
        t.namespaces(ADDR, "nvme0", &["nvme0n1"]);
        t.block("nvme0n1", "259:0");
        t.block("nvme0n1/nvme0n1p1", "259:1");
        t
    }

    /// What was written to driver_override, the nvme driver's unbind, vfio-pci's unbind and
    /// drivers_probe.
    fn writes(t: &FakeTree) -> [String; 4] {
        [
            t.read(&format!("sys/devices/pci0000:00/{ADDR}/driver_override")),
            t.read("sys/bus/pci/drivers/nvme/unbind"),
            t.read("sys/bus/pci/drivers/vfio-pci/unbind"),
            t.read("sys/bus/pci/drivers_probe"),
        ]
    }

    const UNTOUCHED: [&str; 4] = ["(null)\n", "", "", ""];

    #[test]
    fn refuses_a_mounted_controller_and_writes_nothing() {
        let t = tree();
        t.append(
            "proc/self/mountinfo",
            "60 22 259:1 / /data rw - xfs /dev/nvme0n1p1 rw\n",
        );
        let err = bind_vfio(&t.roots, addr()).unwrap_err();
        assert!(
            matches!(&err, PciError::InUse { usages, .. } if usages.len() == 1),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with(
                "0000:01:00.0 is in use; refusing to bind it to vfio-pci:\n  - nvme0n1p1 is mounted at /data (xfs)\n"
            ),
            "{text}"
        );
        assert_eq!(writes(&t), UNTOUCHED);
    }

    #[test]
    fn refusal_lists_every_reason() {
        let t = tree();
        t.block("nvme0n1/nvme0n1p2", "259:2");
        t.append(
            "proc/self/mountinfo",
            "60 22 259:0 / /raw rw - ext4 /dev/nvme0n1 rw\n",
        );
        t.append("proc/swaps", "/dev/nvme0n1p2 partition 1024 0 -2\n");
        t.write("sys/block/nvme0n1/nvme0n1p1/holders/dm-3", "");
        t.open(4242, "postgres", 11, "/dev/nvme0n1p1");
        let err = bind_vfio(&t.roots, addr()).unwrap_err();
        let PciError::InUse { usages, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(usages.len(), 4, "{err}");
        let text = err.to_string();
        for line in [
            "  - nvme0n1 is mounted at /raw (ext4)",
            "  - nvme0n1p1 is held by dm-3",
            "  - nvme0n1p2 is in use as swap",
            "  - pid 4242 (postgres) has /dev/nvme0n1p1 open",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
        }
        assert_eq!(writes(&t), UNTOUCHED);
    }

    #[test]
    fn refuses_when_another_process_has_the_controller_open() {
        let t = tree();
        t.open(999, "smartd", 4, "/dev/nvme0");
        let err = bind_vfio(&t.roots, addr()).unwrap_err();
        assert!(
            err.to_string().contains("pid 999 (smartd) has /dev/nvme0 open"),
            "{err}"
        );
        assert_eq!(writes(&t), UNTOUCHED);
    }

    #[test]
    fn refuses_without_the_vfio_driver() {
        let t = FakeTree::new();
        t.function(ADDR, Some("nvme"), Some(3), false);
        let err = bind_vfio(&t.roots, addr()).unwrap_err();
        assert!(matches!(err, PciError::NoVfioDriver { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("modprobe vfio-pci") && text.contains("intel_iommu=on"),
            "{text}"
        );
    }

    #[test]
    fn refuses_without_an_iommu_group() {
        let t = FakeTree::new();
        t.driver("vfio-pci");
        t.function(ADDR, Some("nvme"), None, false);
        let err = bind_vfio(&t.roots, addr()).unwrap_err();
        assert!(matches!(err, PciError::NoIommuGroup { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("intel_iommu=on") && text.contains("amd_iommu=on"),
            "{text}"
        );
    }

    #[test]
    fn refuses_missing_and_non_nvme_functions() {
        let t = tree();
        t.other_function("0000:00:1f.3", 0x040300, Some("snd_hda_intel"));
        let err = bind_vfio(&t.roots, "0000:99:00.0".parse().unwrap()).unwrap_err();
        assert!(matches!(err, PciError::NotFound { .. }), "{err}");
        let err = bind_vfio(&t.roots, "0000:00:1f.3".parse().unwrap()).unwrap_err();
        assert!(matches!(err, PciError::NotNvme { .. }), "{err}");
    }

    #[test]
    fn binds_a_free_controller_writing_exactly_what_the_kernel_expects() {
        let mut t = tree();
        t.roots.settle = Duration::from_secs(5);
        let kernel = t.kernel_probe(ADDR, 3);
        let outcome = bind_vfio(&t.roots, addr()).unwrap();
        assert!(kernel.join().unwrap());
        assert_eq!(writes(&t), ["vfio-pci", ADDR, "", ADDR]);
        assert!(outcome.changed);
        assert_eq!(outcome.previous_driver.as_deref(), Some("nvme"));
        assert!(outcome.function.bound_to_vfio());
        assert_eq!(
            outcome.function.vfio_group_path(&t.roots),
            Some(t.roots.dev.join("vfio/3"))
        );
        assert!(
            outcome.notes[0].starts_with("unbound from nvme"),
            "{:?}",
            outcome.notes
        );
        assert!(outcome.notes[1].contains("vfio/3"), "{:?}", outcome.notes);
        assert_eq!(outcome.notes.len(), 2);
    }

    #[test]
    fn binds_a_driverless_controller_without_unbinding() {
        let mut t = FakeTree::new();
        t.roots.settle = Duration::from_secs(5);
        t.driver("vfio-pci");
        t.function(ADDR, None, Some(5), false);
        let kernel = t.kernel_probe(ADDR, 5);
        let outcome = bind_vfio(&t.roots, addr()).unwrap();
        assert!(kernel.join().unwrap());
        assert_eq!(
            t.read(&format!("sys/bus/pci/devices/{ADDR}/driver_override")),
            "vfio-pci"
        );
        assert_eq!(t.read("sys/bus/pci/drivers/nvme/unbind"), "");
        assert_eq!(t.read("sys/bus/pci/drivers_probe"), ADDR);
        assert_eq!(outcome.previous_driver, None);
        assert!(outcome.function.bound_to_vfio());
    }

    #[test]
    fn bind_notes_other_devices_in_the_iommu_group() {
        let mut t = tree();
        t.roots.settle = Duration::from_secs(5);
        t.pci_function("0000:01:00.1", 0x020000, Some("ixgbe"), Some(3), true);
        t.pci_function("0000:00:01.0", 0x060400, Some("pcieport"), Some(3), false);
        let kernel = t.kernel_probe(ADDR, 3);
        let outcome = bind_vfio(&t.roots, addr()).unwrap();
        assert!(kernel.join().unwrap());
        let group_notes: Vec<&String> = outcome
            .notes
            .iter()
            .filter(|n| n.contains("IOMMU group 3"))
            .collect();
        assert_eq!(group_notes.len(), 1, "{:?}", outcome.notes);
        assert!(
            group_notes[0].contains("0000:01:00.1 (driver ixgbe)"),
            "{group_notes:?}"
        );
    }

    #[test]
    fn already_bound_is_reported_and_nothing_is_written() {
        let t = FakeTree::new();
        t.driver("vfio-pci");
        t.function(ADDR, Some("vfio-pci"), Some(3), true);
        let outcome = bind_vfio(&t.roots, addr()).unwrap();
        assert!(!outcome.changed);
        assert!(
            outcome.notes[0].contains("already bound to vfio-pci"),
            "{:?}",
            outcome.notes
        );
        assert_eq!(writes(&t), UNTOUCHED);
    }

    #[test]
    fn failed_bind_clears_the_override_again() {
        let t = tree(); // Nothing reacts to the writes: vfio-pci never binds.
        let err = bind_vfio(&t.roots, addr()).unwrap_err();
        let PciError::BindFailed { source, recovery, .. } = &err else {
            panic!("{err}");
        };
        assert!(matches!(**source, PciError::Settle { .. }), "{err}");
        assert!(recovery.contains("bound to nvme now"), "{recovery}");
        assert_eq!(writes(&t), ["\n", ADDR, "", ADDR]);
    }

    #[test]
    fn unbind_refuses_a_controller_not_on_vfio() {
        let t = tree();
        let err = unbind_vfio(&t.roots, addr()).unwrap_err();
        assert!(
            matches!(&err, PciError::WrongDriver { driver: Some(d), .. } if d == "nvme"),
            "{err}"
        );
        assert!(err.to_string().contains("bound to nvme, not vfio-pci"), "{err}");
        let t = FakeTree::new();
        t.function(ADDR, None, Some(3), false);
        let err = unbind_vfio(&t.roots, addr()).unwrap_err();
        assert!(err.to_string().contains("bound to no driver"), "{err}");
    }

    #[test]
    fn unbind_refuses_while_a_process_holds_the_vfio_group() {
        let t = FakeTree::new();
        t.driver("vfio-pci");
        t.function(ADDR, Some("vfio-pci"), Some(3), true);
        t.open(5150, "spillway-bench", 12, "/dev/vfio/3");
        let err = unbind_vfio(&t.roots, addr()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("refusing to give it back to the kernel"), "{text}");
        assert!(
            text.contains("pid 5150 (spillway-bench) has /dev/vfio/3 open"),
            "{text}"
        );
        assert_eq!(writes(&t), UNTOUCHED);
    }

    #[test]
    fn unbind_gives_the_controller_back_to_nvme() {
        let mut t = FakeTree::new();
        t.roots.settle = Duration::from_secs(5);
        t.driver("vfio-pci");
        t.function(ADDR, Some("vfio-pci"), Some(3), true);
        let kernel = t.kernel_probe(ADDR, 3);
        let outcome = unbind_vfio(&t.roots, addr()).unwrap();
        assert!(kernel.join().unwrap());
        assert_eq!(writes(&t), ["\n", "", ADDR, ADDR]);
        assert!(outcome.changed);
        assert_eq!(outcome.previous_driver.as_deref(), Some("vfio-pci"));
        assert_eq!(outcome.function.driver.as_deref(), Some("nvme"));
        assert!(
            outcome.notes.iter().any(|n| n == "bound to nvme"),
            "{:?}",
            outcome.notes
        );
    }

    #[test]
    fn unbind_without_a_driver_to_come_back_is_not_an_error() {
        let t = FakeTree::new();
        t.driver("vfio-pci");
        t.function(ADDR, Some("vfio-pci"), Some(3), false);
        // vfio-pci releases it when told to; nothing binds afterwards.
        let kernel = std::thread::spawn({
            let roots = t.roots.clone();
            move || {
                let unbind = roots.driver_dir("vfio-pci").join("unbind");
                while std::fs::read_to_string(&unbind).unwrap_or_default() != ADDR {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::fs::remove_file(roots.device_dir(ADDR.parse().unwrap()).join("driver")).unwrap();
            }
        });
        let outcome = unbind_vfio(&t.roots, addr()).unwrap();
        kernel.join().unwrap();
        assert_eq!(outcome.function.driver, None);
        assert!(
            outcome.notes.iter().any(|n| n.contains("modprobe nvme")),
            "{:?}",
            outcome.notes
        );
    }

    #[test]
    fn unbind_notes_when_vfio_pci_takes_the_controller_again() {
        let t = FakeTree::new(); // The driver link stays on vfio-pci, as with a new_id match.
        t.driver("vfio-pci");
        t.function(ADDR, Some("vfio-pci"), Some(3), false);
        let outcome = unbind_vfio(&t.roots, addr()).unwrap();
        assert!(outcome.function.bound_to_vfio());
        assert!(
            outcome.notes.iter().any(|n| n.contains("remove_id")),
            "{:?}",
            outcome.notes
        );
    }
}
