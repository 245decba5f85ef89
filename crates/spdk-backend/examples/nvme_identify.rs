//! Brings up an NVMe controller through VFIO, prints its identity, and checks block writes
//! and reads: single blocks, a transfer that needs a PRP list, one larger than MDTS, and an
//! LBA past the end of the namespace, which must fail with a typed status.
//!
//! Usage: `nvme_identify [PCI_ADDRESS [GROUP_PATH]]`, defaulting to the `NVMEVM_PCI` and
//! `NVMEVM_GROUP` environment variables (set by the nvme-vm test harness).

mod common;

use std::process::ExitCode;

use spillway_spdk::controller::{Controller, Error, IO_QUEUE_ENTRIES};
use spillway_spdk::nvme::status::StatusKind;
use spillway_spdk::vfio::DmaBuffer;

/// The model number QEMU's NVMe controller reports.
const QEMU_MODEL: &str = "QEMU NVMe Ctrl";

/// A byte pattern that differs per LBA range and position (xorshift).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Checks Identify against what the harness gave QEMU: the model QEMU reports, the serial
/// number (`NVMEVM_SERIAL`) and the disk image's size (`NVMEVM_DISK_BYTES`).
fn identity_matches(model: &str, serial: &str, capacity: u64, block_size: usize) -> bool {
    let mut ok = true;
    let mut check = |what: &str, same: bool, detail: String| {
        println!("{what}: {}", if same { "matches" } else { "MISMATCH" });
        if !same {
            println!("  {detail}");
        }
        ok &= same;
    };
    check(
        "model",
        model == QEMU_MODEL,
        format!("{model:?}, expected {QEMU_MODEL:?}"),
    );
    if let Ok(want) = std::env::var("NVMEVM_SERIAL") {
        check("serial", serial == want, format!("{serial:?}, expected {want:?}"));
    }
    if let Some(want) = std::env::var("NVMEVM_DISK_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        check(
            "namespace size",
            capacity == want,
            format!("{capacity} bytes, the disk image holds {want}"),
        );
    }
    check(
        "block size",
        block_size == 512 || block_size == 4096,
        format!("{block_size} bytes, expected 512 or 4096"),
    );
    ok
}

fn run(pci: &str, group: &str) -> Result<bool, Error> {
    let ctrl = Controller::open(pci, group)?;
    let info = ctrl.info().clone();
    let ns = ctrl.namespace().clone();
    let bs = ns.block_size() as usize;
    println!(
        "model={:?} serial={:?} firmware={:?} version={} mdts={} (max transfer {}) nn={}",
        info.model,
        info.serial,
        info.firmware,
        info.version
            .map_or_else(|| "unknown".to_owned(), |v| v.to_string()),
        info.mdts,
        ctrl.max_transfer()
            .map_or_else(|| "unlimited".to_owned(), |b| format!("{b} bytes")),
        info.nn
    );
    println!(
        "namespace 1: {} blocks of {bs} bytes ({} MiB)",
        ns.nsze,
        ns.capacity_bytes() >> 20
    );
    let mut ok = identity_matches(&info.model, &info.serial, ns.capacity_bytes(), bs);

    let above_mdts = ctrl.max_transfer().map_or(2 << 20, |m| (2 * m).min(4 << 20)) as usize;
    let cases: [(&str, u64, usize, usize); 5] = [
        ("1 block", 0, 0, bs),
        ("8 blocks", 100, 0, 8 * bs),
        ("64 KiB + 1 block, PRP list", 1000, 0, 64 * 1024 + bs),
        ("100 KiB at buffer offset 512, PRP list", 3000, 512, 100 * 1024),
        ("2x MDTS, split", 5000, 0, above_mdts),
    ];
    let mut q = ctrl.create_io_queue(IO_QUEUE_ENTRIES)?;
    let size = cases.iter().map(|c| c.2 + c.3).max().unwrap_or(bs);
    let mut out = DmaBuffer::new(ctrl.container(), size)?;
    let mut back = DmaBuffer::new(ctrl.container(), size)?;
    for (i, &(name, lba, at, len)) in cases.iter().enumerate() {
        let range = at..at + len;
        fill(
            &mut out.as_mut_slice()[range.clone()],
            0x9E37_79B9_7F4A_7C15 ^ lba ^ i as u64,
        );
        back.as_mut_slice().fill(0);
        q.write(lba, &out, range.clone())?;
        q.read(lba, &mut back, range.clone())?;
        let same = out.as_slice()[range.clone()] == back.as_slice()[range];
        println!(
            "{name}: LBA {lba}, {len} bytes: {}",
            if same { "read back equal" } else { "MISMATCH" }
        );
        ok &= same;
    }

    match q.read(ns.nsze, &mut back, 0..bs) {
        Err(e @ Error::Status { source, .. }) if source.kind == StatusKind::LbaOutOfRange => {
            println!("read at LBA {} (past the end): expected error: {e}", ns.nsze);
        }
        Err(e) => {
            println!("read at LBA {} (past the end): wrong error: {e}", ns.nsze);
            ok = false;
        }
        Ok(()) => {
            println!(
                "read at LBA {} (past the end): succeeded, expected an error",
                ns.nsze
            );
            ok = false;
        }
    }
    drop(q);
    ctrl.close()?;
    println!("controller shut down (CSTS.SHST complete)");
    Ok(ok)
}

fn main() -> ExitCode {
    match common::controller_args("nvme_identify") {
        Ok((pci, group)) => common::exit_status("nvme_identify", run(&pci, &group), "all checks passed"),
        Err(code) => code,
    }
}
