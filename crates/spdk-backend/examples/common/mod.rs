//! What the VM check programs share: finding the controller, and reporting like a test.

// Each check program uses part of this module.
#![allow(dead_code)]

pub mod random_io;

use std::fmt::Display;
use std::process::ExitCode;

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
