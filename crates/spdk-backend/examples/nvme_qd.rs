//! Keeps many commands in flight on one I/O queue pair and verifies every byte: for queue
//! depths 1, 8, 32 and 128, writes random data to random non-overlapping LBA ranges (1 block
//! up to MDTS, at random dword-aligned buffer offsets), reads it all back the same way and
//! compares. The random numbers come from a fixed seed, so a failure repeats.
//!
//! Usage: `nvme_qd [PCI_ADDRESS [GROUP_PATH]]`, defaulting to the `NVMEVM_PCI` and
//! `NVMEVM_GROUP` environment variables (set by the nvme-vm test harness).

mod common;

use common::random_io::{plan, run_at_depth, Io, Rng};

use std::process::ExitCode;

use spillway_spdk::controller::{Controller, Error};
use spillway_spdk::vfio::DmaBuffer;

const QUEUE_DEPTHS: [usize; 4] = [1, 8, 32, 128];
/// Entries in the I/O queue: room for the deepest run.
const IO_ENTRIES: u32 = 256;
/// Bytes moved in each direction per queue depth, at most.
const BYTES_PER_DEPTH: u64 = 12 << 20;

fn run(pci: &str, group: &str) -> Result<bool, Error> {
    let controller = Controller::open(pci, group)?;
    let ns = controller.namespace().clone();
    let mut ctrl = controller.create_io_queue(IO_ENTRIES)?;
    let bs = u64::from(ns.block_size());
    let max_blocks = ctrl.max_command_bytes() / bs;
    println!(
        "I/O queue of {} entries ({} in flight at most), {} blocks of {bs} bytes, {} blocks per command at most",
        ctrl.entries(),
        ctrl.max_in_flight(),
        ns.nsze,
        max_blocks
    );
    let mut rng = Rng(0x5EED_0FDE_C0DE);
    let mut ok = true;
    for qd in QUEUE_DEPTHS {
        if qd > ctrl.max_in_flight() {
            println!(
                "qd={qd}: skipped, the queue holds {} commands",
                ctrl.max_in_flight()
            );
            ok = false;
            continue;
        }
        let count = (3 * qd).max(96);
        let (ios, size) = plan(&mut rng, count, bs, max_blocks, 0..ns.nsze, BYTES_PER_DEPTH);
        let mut out = DmaBuffer::new(controller.container(), size)?;
        let mut back = DmaBuffer::new(controller.container(), size)?;
        rng.fill(out.as_mut_slice());
        back.as_mut_slice().fill(0xA5);
        let peak_w = run_at_depth(&mut ctrl, qd, &ios, true, &out, &mut back)?;
        let peak_r = run_at_depth(&mut ctrl, qd, &ios, false, &out, &mut back)?;
        let bad: Vec<&Io> = ios
            .iter()
            .filter(|io| out.as_slice()[io.bytes.clone()] != back.as_slice()[io.bytes.clone()])
            .collect();
        let bytes: usize = ios.iter().map(|io| io.bytes.len()).sum();
        if let Some(first) = bad.first() {
            println!(
                "qd={qd}: {} of {} commands read back different data (first: LBA {}, {} bytes)",
                bad.len(),
                ios.len(),
                first.lba,
                first.bytes.len()
            );
            ok = false;
        } else {
            println!(
                "qd={qd}: {} commands, {:.1} MB, verified (peak in flight: write {peak_w}, read {peak_r})",
                2 * ios.len(),
                2.0 * bytes as f64 / 1e6
            );
        }
        if peak_w < qd.min(ios.len()) || peak_r < qd.min(ios.len()) {
            println!("qd={qd}: the queue never reached depth {qd}");
            ok = false;
        }
    }
    let too_large = (max_blocks + 1) * bs;
    let big = DmaBuffer::new(controller.container(), too_large as usize)?;
    // SAFETY: `big` is not touched again and outlives the controller's shutdown below.
    match unsafe { ctrl.submit_write(0, &big, 0..too_large as usize) } {
        Err(e @ Error::TooLarge { .. }) => println!("{too_large}-byte submit: expected error: {e}"),
        other => {
            println!("{too_large}-byte submit: expected a TooLarge error, got {other:?}");
            ok = false;
        }
    }
    drop(ctrl);
    controller.close()?;
    Ok(ok)
}

fn main() -> ExitCode {
    match common::controller_args("nvme_qd") {
        Ok((pci, group)) => common::exit_status("nvme_qd", run(&pci, &group), "PASS"),
        Err(code) => code,
    }
}
