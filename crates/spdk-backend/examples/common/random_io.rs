//! Random, non-overlapping block I/O kept many commands deep on one I/O queue, shared by
//! the check programs that verify data.

use std::ops::Range;

use spillway_spdk::controller::Error;
use spillway_spdk::io_queue::IoQueue;
use spillway_spdk::vfio::DmaBuffer;

/// SplitMix64: a small, deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// One command: its blocks on the namespace and its bytes in the buffers.
pub struct Io {
    pub lba: u64,
    pub bytes: Range<usize>,
}

/// Random non-overlapping commands within `lbas`, moving at most `max_bytes`, in random order: sizes from 1 block to `max_blocks`
/// (mostly small, some at the limit), LBAs spread over the namespace with random gaps,
/// buffer ranges packed with random dword-aligned gaps so that data starts anywhere in a
/// page.
pub fn plan(
    rng: &mut Rng,
    count: usize,
    bs: u64,
    max_blocks: u64,
    lbas: Range<u64>,
    max_bytes: u64,
) -> (Vec<Io>, usize) {
    let mut ios = Vec::with_capacity(count);
    let (mut lba, mut at, mut total) = (lbas.start + rng.range(0, 64), 0usize, 0u64);
    while ios.len() < count {
        let cap = match rng.next() % 4 {
            0 | 1 => 8.min(max_blocks),
            2 => 64.min(max_blocks),
            _ => max_blocks,
        };
        let blocks = if rng.next().is_multiple_of(8) {
            cap
        } else {
            rng.range(1, cap)
        };
        if lba + blocks > lbas.end || total + blocks * bs > max_bytes {
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
pub fn run_at_depth(
    ctrl: &mut IoQueue,
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
