//! Keeps many commands in flight on one I/O queue pair and verifies every byte: for queue
//! depths 1, 8, 32 and 128, writes random data to random non-overlapping LBA ranges (1 block
//! up to MDTS, at random dword-aligned buffer offsets), reads it all back the same way and
//! compares. The random numbers come from a fixed seed, so a failure repeats.
//!
//! Usage: `nvme_qd [PCI_ADDRESS [GROUP_PATH]]`, defaulting to the `NVMEVM_PCI` and
//! `NVMEVM_GROUP` environment variables (set by the nvme-vm test harness).

mod common;

use std::ops::Range;
use std::process::ExitCode;

use spillway_spdk::controller::{Controller, Error};
use spillway_spdk::vfio::DmaBuffer;

const QUEUE_DEPTHS: [usize; 4] = [1, 8, 32, 128];
/// Entries in the I/O queue: room for the deepest run.
const IO_ENTRIES: u32 = 256;
/// Bytes moved in each direction per queue depth, at most.
const BYTES_PER_DEPTH: u64 = 12 << 20;

/// SplitMix64: a small, deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// One command: its blocks on the namespace and its bytes in the buffers.
struct Io {
    lba: u64,
    bytes: Range<usize>,
}

/// Random non-overlapping commands, in random order: sizes from 1 block to `max_blocks`
/// (mostly small, some at the limit), LBAs spread over the namespace with random gaps,
/// buffer ranges packed with random dword-aligned gaps so that data starts anywhere in a
/// page.
fn plan(rng: &mut Rng, count: usize, bs: u64, max_blocks: u64, nsze: u64) -> (Vec<Io>, usize) {
    let mut ios = Vec::with_capacity(count);
    let (mut lba, mut at, mut total) = (rng.range(0, 64), 0usize, 0u64);
    while ios.len() < count {
        let cap = match rng.next() % 4 {
            0 | 1 => 8.min(max_blocks),
            2 => 64.min(max_blocks),
            _ => max_blocks,
        };
        let blocks = if rng.next() % 8 == 0 {
            cap
        } else {
            rng.range(1, cap)
        };
        if lba + blocks > nsze || total + blocks * bs > BYTES_PER_DEPTH {
            break;
        }
        at += 4 * rng.range(0, 1023) as usize;
        let len = (blocks * bs) as usize;
        ios.push(Io {
            lba,
            bytes: at..at + len,
        });
        at += len;
        total += blocks * bs;
        lba += blocks + rng.range(0, 16);
    }
    for i in (1..ios.len()).rev() {
        ios.swap(i, rng.range(0, i as u64) as usize);
    }
    (ios, at)
}

/// Runs `ios` with at most `qd` in flight; returns the most that were in flight at once.
fn run_at_depth(
    ctrl: &mut Controller,
    qd: usize,
    ios: &[Io],
    write: bool,
    out: &DmaBuffer,
    back: &mut DmaBuffer,
) -> Result<usize, Error> {
    let (mut next, mut done, mut peak) = (0, 0, 0);
    while done < ios.len() {
        while next < ios.len() && ctrl.in_flight() < qd {
            let io = &ios[next];
            // SAFETY: every command's range is disjoint from the others, neither buffer is
            // touched until all commands have completed, and both outlive this loop.
            let submitted = unsafe {
                if write {
                    ctrl.submit_write(io.lba, out, io.bytes.clone())
                } else {
                    ctrl.submit_read(io.lba, back, io.bytes.clone())
                }
            };
            submitted?;
            next += 1;
            peak = peak.max(ctrl.in_flight());
        }
        for (_, result) in ctrl.wait_completions(qd)? {
            result?;
            done += 1;
        }
    }
    Ok(peak)
}

fn run(pci: &str, group: &str) -> Result<bool, Error> {
    let mut ctrl = Controller::open_with_io_entries(pci, group, IO_ENTRIES)?;
    let ns = ctrl.namespace().clone();
    let bs = u64::from(ns.block_size());
    let max_blocks = ctrl.max_command_bytes() / bs;
    println!(
        "I/O queue of {} entries ({} in flight at most), {} blocks of {bs} bytes, {} blocks per command at most",
        ctrl.io_queue_entries(),
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
        let (ios, size) = plan(&mut rng, count, bs, max_blocks, ns.nsze);
        let mut out = DmaBuffer::new(ctrl.container(), size)?;
        let mut back = DmaBuffer::new(ctrl.container(), size)?;
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
    let big = DmaBuffer::new(ctrl.container(), too_large as usize)?;
    // SAFETY: `big` is not touched again and outlives the controller's shutdown below.
    match unsafe { ctrl.submit_write(0, &big, 0..too_large as usize) } {
        Err(e @ Error::TooLarge { .. }) => println!("{too_large}-byte submit: expected error: {e}"),
        other => {
            println!("{too_large}-byte submit: expected a TooLarge error, got {other:?}");
            ok = false;
        }
    }
    ctrl.close()?;
    Ok(ok)
}

fn main() -> ExitCode {
    match common::controller_args("nvme_qd") {
        Ok((pci, group)) => common::exit_status("nvme_qd", run(&pci, &group), "PASS"),
        Err(code) => code,
    }
}
