//! What the VM check programs share: finding the controller, and reporting like a test.

// Each check program uses part of this module.
#![allow(dead_code)]

pub mod random_io;

use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use spillway_spdk::pci::{find_nvme, PciAddress, SysRoots};

/// The controller's PCI address and VFIO group path: the first two arguments, or the
/// NVMEVM_PCI and NVMEVM_GROUP variables the VM harness (tests/nvme-vm) sets.
pub fn controller_args(program: &str) -> Result<(String, String), ExitCode> {
    let mut args = std::env::args().skip(1);
    let mut next = |var: &str| {
        args.next()
            .or_else(|| std::env::var(var).ok())
            .ok_or_else(|| format!("missing argument: pass it on the command line or set {var}"))
    };
    match (next("NVMEVM_PCI"), next("NVMEVM_GROUP")) {
        (Ok(pci), Ok(group)) => Ok((pci, group)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{program}: {e}");
            eprintln!("usage: {program} [PCI_ADDRESS [GROUP_PATH]]");
            Err(ExitCode::FAILURE)
        }
    }
}

/// The exit status of a check program: success when `run` passed every check.
pub fn exit_status<E: Display>(program: &str, outcome: Result<bool, E>, passed: &str) -> ExitCode {
    match outcome {
        Ok(true) => {
            println!("{program}: {passed}");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!("{program}: some checks failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{program}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The block device of the first namespace of the controller at `addr`, once the kernel's
/// nvme driver has created it (up to 10 s after binding).
pub fn wait_block_device(roots: &SysRoots, addr: PciAddress) -> Result<PathBuf, String> {
    let start = Instant::now();
    loop {
        let f = find_nvme(roots, addr).map_err(|e| e.to_string())?;
        if let Some(ns) = f.namespaces.first() {
            let dev = roots.dev.join(ns);
            if dev.exists() {
                return Ok(dev);
            }
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "no block device for {addr} after 10 s (driver {:?})",
                f.driver
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
