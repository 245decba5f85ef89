//! The driver's error paths against a real controller: requests it must refuse before
//! they reach the device (zero length, a misaligned buffer, a partial block), and a
//! controller that stops answering — once because it can no longer reach memory (bus
//! mastering switched off), once because it was reset behind the driver's back. Both must
//! end in an error within the command timeout, never a hang, and a fresh open must work
//! again afterwards.
//!
//! Usage: `nvme_errors [PCI_ADDRESS [GROUP_PATH]]`, defaulting to the `NVMEVM_PCI` and
//! `NVMEVM_GROUP` environment variables (set by the nvme-vm test harness).

mod common;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use spillway_spdk::controller::{Controller, Error, Options};
use spillway_spdk::io_queue::IoQueue;
use spillway_spdk::nvme::regs::{self, Cc};
use spillway_spdk::vfio::DmaBuffer;

/// Command timeout for these checks: short, so a hang shows as a long run.
const TIMEOUT: Duration = Duration::from_secs(2);
/// PCI command register and its bus master enable bit.
const PCI_COMMAND: u64 = 0x04;
const BUS_MASTER: u16 = 1 << 2;

fn options() -> Options {
    Options {
        command_timeout: TIMEOUT,
        ..Options::default()
    }
}

/// Prints the outcome of one check; true when `outcome` is the error `expected` accepts.
fn expect_error(name: &str, outcome: Result<(), Error>, expected: impl Fn(&Error) -> bool) -> bool {
    match outcome {
        Err(e) if expected(&e) => {
            println!("{name}: expected error: {e}");
            true
        }
        Err(e) => {
            println!("{name}: wrong error: {e:?}");
            false
        }
        Ok(()) => {
            println!("{name}: succeeded, expected an error");
            false
        }
    }
}

/// Requests refused before they reach the device.
fn refusals(ctrl: &Controller) -> Result<bool, Error> {
    let bs = ctrl.namespace().block_size() as usize;
    let mut q = ctrl.create_io_queue(8)?;
    let mut buf = DmaBuffer::new(ctrl.container(), 4 * bs)?;
    let mut ok = expect_error("zero-length read", q.read(0, &mut buf, 0..0), |e| {
        matches!(e, Error::ZeroLength { .. })
    });
    ok &= expect_error("write from buffer offset 2", q.write(0, &buf, 2..2 + bs), |e| {
        matches!(e, Error::Misaligned { .. })
    });
    ok &= expect_error("read of 100 bytes", q.read(0, &mut buf, 0..100), |e| {
        matches!(e, Error::BufferRange { .. })
    });
    let past = buf.len() + bs;
    ok &= expect_error("read past the buffer", q.read(0, &mut buf, 0..past), |e| {
        matches!(e, Error::BufferRange { .. })
    });
    // The queue still works after refusals.
    buf.as_mut_slice()[..bs].fill(0x3C);
    q.write(7, &buf, 0..bs)?;
    q.read(7, &mut buf, bs..2 * bs)?;
    let same = buf.as_slice()[..bs] == buf.as_slice()[bs..2 * bs];
    println!(
        "round trip after the refusals: {}",
        if same { "equal" } else { "MISMATCH" }
    );
    Ok(ok && same)
}

/// A read on a controller that will not answer: must fail within the timeout (plus the
/// health check's slack), and every later command must fail at once.
fn unanswered(
    name: &str,
    ctrl: &Controller,
    mut q: IoQueue,
    accept: impl Fn(&Error) -> bool,
) -> Result<bool, Error> {
    let bs = ctrl.namespace().block_size() as usize;
    let mut buf = DmaBuffer::new(ctrl.container(), bs)?;
    let start = Instant::now();
    let outcome = q.read(0, &mut buf, 0..bs);
    let took = start.elapsed();
    let mut ok = expect_error(&format!("{name}: read"), outcome, &accept);
    println!(
        "{name}: the read returned after {:.2} s (timeout {:?})",
        took.as_secs_f64(),
        TIMEOUT
    );
    ok &= took < TIMEOUT + Duration::from_secs(1);
    ok &= expect_error(&format!("{name}: next read"), q.read(0, &mut buf, 0..bs), |e| {
        matches!(e, Error::Failed)
    });
    ok &= ctrl.has_failed();
    ok &= expect_error(
        &format!("{name}: new queue"),
        ctrl.create_io_queue(8).map(drop),
        |e| matches!(e, Error::Failed),
    );
    Ok(ok)
}

/// Drops a failed controller, saying how long that took (it must not wait for answers).
fn drop_timed(ctrl: Controller) {
    let start = Instant::now();
    drop(ctrl);
    println!(
        "failed controller closed in {:.2} s",
        start.elapsed().as_secs_f64()
    );
}

fn run(pci: &str, group: &str) -> Result<bool, Error> {
    let mut ok = true;

    let ctrl = Controller::open_with(pci, group, options())?;
    ok &= refusals(&ctrl)?;

    // The controller loses access to memory: it cannot fetch the command.
    let q = ctrl.create_io_queue(8)?;
    let command = ctrl.device().read_config_u16(PCI_COMMAND)?;
    ctrl.device()
        .write_config_u16(PCI_COMMAND, command & !BUS_MASTER)?;
    ok &= unanswered("bus mastering off", &ctrl, q, |e| {
        matches!(e, Error::Fatal { .. } | Error::Timeout { .. })
    })?;
    drop_timed(ctrl);

    // A fresh open resets the controller and turns bus mastering back on.
    let ctrl = Controller::open_with(pci, group, options())?;
    let fresh = refusals(&ctrl)?;
    println!(
        "reopened after the failure: {}",
        if fresh { "works" } else { "BROKEN" }
    );
    ok &= fresh;

    // Reset behind the driver's back: the queues vanish, the command is never answered.
    let q = ctrl.create_io_queue(8)?;
    let bar = ctrl.device().map_bar0()?;
    let cc = Cc(bar.read32(regs::CC)?);
    bar.write32(regs::CC, cc.with_enable(false).0)?;
    ok &= unanswered("controller reset underneath", &ctrl, q, |e| {
        matches!(e, Error::Timeout { .. })
    })?;
    drop_timed(ctrl);
    Ok(ok)
}

fn main() -> ExitCode {
    match common::controller_args("nvme_errors") {
        Ok((pci, group)) => common::exit_status("nvme_errors", run(&pci, &group), "PASS"),
        Err(code) => code,
    }
}
