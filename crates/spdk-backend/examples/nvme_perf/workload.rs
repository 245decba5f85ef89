//! What `nvme_perf` measures, independent of the driver: the workloads, the offsets they
//! visit, the data written, and the timed loop that keeps a queue full and counts what
//! completes.
//!
//! A driver plugs in by implementing [`Engine`] (queue one I/O on a slot's buffer, reap
//! completed slots) and calling [`run_workload`], which does warm-up, measurement and, for
//! writes, the read-back check. A driver that wants its own loop can use the parts:
//! [`Offsets`], [`Meter`], [`stamp_block`] / [`check_block`] and [`sample_offsets`].

use std::time::{Duration, Instant};

/// Bytes per "sector" that carries its own position stamp in written data.
pub const STAMP_SECTOR: usize = 4096;
/// Default and largest region when the device is larger: 1 GiB.
pub const MAX_DEFAULT_REGION: u64 = 1 << 30;
/// Seed of the written data pattern and of the random offsets.
const SEED: u64 = 0x5EED_0FDE_C0DE_0001;
/// Blocks read back after a write workload (untimed), at most.
const VERIFY_SAMPLES: u64 = 16;

/// Where consecutive I/Os of a workload go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random block-aligned offsets over the region.
    Random,
    /// One block after the other, wrapping around at the end of the region.
    Sequential,
}

/// Whether a workload reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// One benchmark: every I/O is `block_bytes` long, `queue_depth` are kept in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The name used on the command line and in the output, e.g. `randread4k`.
    pub name: &'static str,
    pub block_bytes: u64,
    pub queue_depth: usize,
    pub pattern: Pattern,
    pub direction: Direction,
}

/// The names [`Workload::by_name`] knows, in their default order.
pub const WORKLOAD_NAMES: [&str; 3] = ["randread4k", "seqread1m", "seqwrite1m"];

impl Workload {
    /// The workload called `name`; sequential ones use queue depth `seq_qd`.
    pub fn by_name(name: &str, seq_qd: usize) -> Result<Self, String> {
        let (name, block_bytes, queue_depth, pattern, direction) = match name {
            "randread4k" => ("randread4k", 4 << 10, 32, Pattern::Random, Direction::Read),
            "seqread1m" => ("seqread1m", 1 << 20, seq_qd, Pattern::Sequential, Direction::Read),
            "seqwrite1m" => (
                "seqwrite1m",
                1 << 20,
                seq_qd,
                Pattern::Sequential,
                Direction::Write,
            ),
            other => {
                return Err(format!(
                    "unknown workload '{other}': choose from {}",
                    WORKLOAD_NAMES.join(",")
                ))
            }
        };
        Ok(Self {
            name,
            block_bytes,
            queue_depth,
            pattern,
            direction,
        })
    }

    /// The block size as a buffer length.
    pub fn block_len(&self) -> usize {
        self.block_bytes as usize
    }
}

/// Settings shared by every workload of one run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Block device for the kernel driver (unused by the spillway driver).
    pub block: String,
    /// Length of each measurement.
    pub measure: Duration,
    /// Length of the untimed warm-up before each measurement.
    pub warmup: Duration,
    /// Bytes of the device to use, from offset 0; `None` means the whole device, at most
    /// [`MAX_DEFAULT_REGION`]. Resolve it with [`Options::region_bytes`].
    pub region: Option<u64>,
    /// Queue depth of the sequential workloads.
    pub seq_qd: usize,
    /// The controller's PCI address, for the spillway driver (and for handing the
    /// controller over with `--driver both`).
    pub pci: Option<String>,
    /// Its VFIO group file, for the spillway driver.
    pub group: Option<String>,
}

impl Options {
    /// The region `workload` uses on a device of `device_bytes`: the requested one (or the
    /// default), rounded down to whole blocks. Fails when it does not fit the device or is
    /// too small to keep `queue_depth` non-overlapping I/Os in flight.
    pub fn region_bytes(&self, workload: &Workload, device_bytes: u64) -> Result<u64, String> {
        let wanted = self.region.unwrap_or(device_bytes.min(MAX_DEFAULT_REGION));
        if wanted > device_bytes {
            return Err(format!(
                "--region {wanted} is larger than the device ({device_bytes} bytes): pass a smaller one"
            ));
        }
        let region = wanted / workload.block_bytes * workload.block_bytes;
        let needed = workload.block_bytes * workload.queue_depth as u64;
        if region < needed {
            return Err(format!(
                "a region of {wanted} bytes holds fewer than {} blocks of {} bytes (the queue \
                 depth): pass a larger --region or a smaller --seq-qd",
                workload.queue_depth, workload.block_bytes
            ));
        }
        Ok(region)
    }
}

/// Xorshift64: a small, fast, deterministic generator.
#[derive(Clone, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator started from `seed` (0 is replaced, since it would stay 0).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { SEED } else { seed })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The byte offsets a workload visits, in order.
#[derive(Clone, Debug)]
pub struct Offsets {
    pattern: Pattern,
    block_bytes: u64,
    blocks: u64,
    next_block: u64,
    rng: XorShift64,
}

impl Offsets {
    /// Offsets for `workload` over `0..region` (a whole number of blocks, at least one).
    pub fn new(workload: &Workload, region: u64) -> Self {
        Self {
            pattern: workload.pattern,
            block_bytes: workload.block_bytes,
            blocks: region / workload.block_bytes,
            next_block: 0,
            rng: XorShift64::new(SEED),
        }
    }

    /// The next offset: random and block-aligned, or the block after the previous one.
    pub fn next_offset(&mut self) -> u64 {
        let block = match self.pattern {
            Pattern::Random => self.rng.next_u64() % self.blocks,
            Pattern::Sequential => {
                let block = self.next_block;
                self.next_block = (block + 1) % self.blocks;
                block
            }
        };
        block * self.block_bytes
    }
}

/// The data pattern's word `index` of a block (the same in every block).
fn pattern_word(index: u64) -> u64 {
    // SplitMix64's finaliser: neighbouring words look unrelated.
    let mut z = SEED.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the data pattern, without stamps. Done once per buffer, so that each
/// write only needs [`stamp_block`].
pub fn fill_pattern(buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = pattern_word(i as u64).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// The 16-byte stamp at the start of the sector at byte `position` of the device.
fn stamp(position: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&position.to_le_bytes());
    out[8..].copy_from_slice(&(!position ^ SEED).to_le_bytes());
    out
}

/// Marks a pattern-filled block that goes to byte `offset`: the start of each
/// [`STAMP_SECTOR`] gets that sector's device position, so a block that lands at the wrong
/// place, or is torn, fails [`check_block`].
pub fn stamp_block(buf: &mut [u8], offset: u64) {
    for (i, sector) in buf.chunks_mut(STAMP_SECTOR).enumerate() {
        let s = stamp(offset + (i * STAMP_SECTOR) as u64);
        let n = s.len().min(sector.len());
        sector[..n].copy_from_slice(&s[..n]);
    }
}

/// Checks that `buf`, read from byte `offset`, holds what [`fill_pattern`] +
/// [`stamp_block`] wrote there; the error names the first bad byte.
pub fn check_block(buf: &[u8], offset: u64) -> Result<(), String> {
    let mut expected = vec![0u8; buf.len()];
    fill_pattern(&mut expected);
    stamp_block(&mut expected, offset);
    match buf.iter().zip(&expected).position(|(got, want)| got != want) {
        None => Ok(()),
        Some(i) => Err(format!(
            "read-back of the {}-byte block at offset {offset} differs from what was written, \
             first at byte {i} (got {:#04x}, expected {:#04x}): the write path is broken",
            buf.len(),
            buf[i],
            expected[i]
        )),
    }
}

/// Up to [`VERIFY_SAMPLES`] block offsets, spread evenly over the first `written` blocks of
/// `workload` (always including the first and the last).
pub fn sample_offsets(workload: &Workload, written: u64) -> Vec<u64> {
    if written == 0 {
        return Vec::new();
    }
    let n = written.min(VERIFY_SAMPLES);
    let last = written - 1;
    let mut blocks: Vec<u64> = (0..n)
        .map(|i| if n == 1 { 0 } else { i * last / (n - 1) })
        .collect();
    blocks.dedup();
    blocks.into_iter().map(|b| b * workload.block_bytes).collect()
}

/// Counts completed I/Os over one timed phase and says when its time is up.
#[derive(Debug)]
pub struct Meter {
    start: Instant,
    deadline: Instant,
    stopped: Option<Instant>,
    ios: u64,
    bytes: u64,
    latency: Duration,
}

impl Meter {
    /// A phase of `length`, starting now.
    pub fn start(length: Duration) -> Self {
        let start = Instant::now();
        Self {
            start,
            deadline: start + length,
            stopped: None,
            ios: 0,
            bytes: 0,
            latency: Duration::ZERO,
        }
    }

    /// Whether the phase is over; the first `true` fixes its length.
    pub fn time_up(&mut self) -> bool {
        if self.stopped.is_none() {
            let now = Instant::now();
            if now >= self.deadline {
                self.stopped = Some(now);
            }
        }
        self.stopped.is_some()
    }

    /// Counts one I/O of `bytes` that was submitted at `submitted` and has just completed;
    /// ignored once the time is up.
    pub fn record(&mut self, bytes: u64, submitted: Instant) {
        if self.stopped.is_none() {
            self.ios += 1;
            self.bytes += bytes;
            self.latency += submitted.elapsed();
        }
    }

    /// The phase's result (its length ends at the first [`Meter::time_up`] that said so).
    pub fn finish(mut self, workload: &Workload) -> Measurement {
        let end = *self.stopped.get_or_insert_with(Instant::now);
        let mean_latency = if self.ios == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(self.latency.as_secs_f64() / self.ios as f64)
        };
        Measurement {
            workload: workload.name,
            block_bytes: workload.block_bytes,
            queue_depth: workload.queue_depth,
            seconds: (end - self.start).as_secs_f64(),
            ios: self.ios,
            bytes: self.bytes,
            mean_latency,
        }
    }
}

/// The result of one workload on one driver.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub workload: &'static str,
    pub block_bytes: u64,
    pub queue_depth: usize,
    /// Length of the measured phase.
    pub seconds: f64,
    /// I/Os completed within it.
    pub ios: u64,
    pub bytes: u64,
    /// Mean time from submitting an I/O to reaping its completion.
    pub mean_latency: Duration,
}

impl Measurement {
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.seconds
    }

    /// Decimal gigabytes (1e9 bytes) per second.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    /// The result as one JSON object, naming the driver that produced it.
    pub fn to_json(&self, driver: &str) -> serde_json::Value {
        serde_json::json!({
            "driver": driver,
            "workload": self.workload,
            "block_bytes": self.block_bytes,
            "queue_depth": self.queue_depth,
            "seconds": self.seconds,
            "ios": self.ios,
            "bytes": self.bytes,
            "iops": self.iops(),
            "gbps": self.gbps(),
            "mean_latency_us": self.mean_latency.as_secs_f64() * 1e6,
        })
    }

    /// The output line: `NVMEPERF {json}`.
    pub fn line(&self, driver: &str) -> String {
        format!("NVMEPERF {}", self.to_json(driver))
    }
}

/// A driver as [`run_workload`] drives it: `queue_depth` slots, each with its own
/// block-sized buffer, on which I/Os are queued and then reaped.
pub trait Engine {
    /// The buffer of `slot`, `block_bytes` long. Only called while the slot is idle.
    fn buffer(&mut self, slot: usize) -> &mut [u8];

    /// Queues one I/O of the slot's whole buffer at byte `offset`. It may wait for the next
    /// [`Engine::reap`] to be started.
    fn queue(&mut self, slot: usize, direction: Direction, offset: u64) -> Result<(), String>;

    /// Starts every queued I/O, waits until at least one has completed, and appends the
    /// slots of all completed ones to `done`. Fails when an I/O failed or moved fewer bytes
    /// than asked.
    fn reap(&mut self, done: &mut Vec<usize>) -> Result<(), String>;
}

/// What [`timed_phase`] needs to carry across phases of one workload.
struct Loop<'a, E> {
    engine: &'a mut E,
    workload: &'a Workload,
    offsets: Offsets,
    /// Submission time of each busy slot.
    busy: Vec<Option<Instant>>,
    done: Vec<usize>,
    /// I/Os submitted so far, over all phases.
    submitted: u64,
}

impl<E: Engine> Loop<'_, E> {
    /// Queues an I/O on every idle slot.
    fn fill(&mut self) -> Result<(), String> {
        for slot in 0..self.busy.len() {
            if self.busy[slot].is_some() {
                continue;
            }
            let offset = self.offsets.next_offset();
            if self.workload.direction == Direction::Write {
                stamp_block(self.engine.buffer(slot), offset);
            }
            self.engine.queue(slot, self.workload.direction, offset)?;
            self.busy[slot] = Some(Instant::now());
            self.submitted += 1;
        }
        Ok(())
    }

    /// Reaps at least one completion, passing each slot's submission time to `meter`.
    fn reap(&mut self, meter: &mut Option<&mut Meter>) -> Result<(), String> {
        self.done.clear();
        self.engine.reap(&mut self.done)?;
        for &slot in &self.done {
            let submitted = self.busy[slot]
                .take()
                .ok_or_else(|| format!("the driver reported slot {slot} complete, but it was idle"))?;
            if let Some(meter) = meter {
                meter.record(self.workload.block_bytes, submitted);
            }
        }
        Ok(())
    }

    fn in_flight(&self) -> bool {
        self.busy.iter().any(Option::is_some)
    }

    /// Keeps every slot busy until `length` is over, then waits for the rest (uncounted).
    fn timed_phase(&mut self, length: Duration) -> Result<Measurement, String> {
        let mut meter = Meter::start(length);
        while !meter.time_up() {
            self.fill()?;
            self.reap(&mut Some(&mut meter))?;
        }
        let measurement = meter.finish(self.workload);
        self.drain()?;
        Ok(measurement)
    }

    /// Waits for every I/O in flight.
    fn drain(&mut self) -> Result<(), String> {
        while self.in_flight() {
            self.reap(&mut None)?;
        }
        Ok(())
    }

    /// Reads back a sample of the blocks written so far and checks them.
    fn verify_writes(&mut self, region: u64) -> Result<(), String> {
        let blocks = region / self.workload.block_bytes;
        let written = match self.workload.pattern {
            Pattern::Sequential => self.submitted.min(blocks),
            // Random writes could land anywhere: nothing this loop can sample cheaply.
            Pattern::Random => 0,
        };
        for offset in sample_offsets(self.workload, written) {
            self.engine.buffer(0).fill(0);
            self.engine.queue(0, Direction::Read, offset)?;
            self.busy[0] = Some(Instant::now());
            self.drain()?;
            check_block(self.engine.buffer(0), offset)?;
        }
        Ok(())
    }
}

/// Runs `workload` on `engine` over `0..region`: an untimed warm-up of `opts.warmup`, a
/// measurement of `opts.measure`, and for a sequential write, an untimed read-back check of
/// a sample of the blocks written.
pub fn run_workload<E: Engine>(
    engine: &mut E,
    workload: &Workload,
    region: u64,
    opts: &Options,
) -> Result<Measurement, String> {
    let mut run = Loop {
        offsets: Offsets::new(workload, region),
        busy: vec![None; workload.queue_depth],
        done: Vec::with_capacity(workload.queue_depth),
        submitted: 0,
        engine,
        workload,
    };
    if workload.direction == Direction::Write {
        for slot in 0..workload.queue_depth {
            fill_pattern(run.engine.buffer(slot));
        }
    }
    if !opts.warmup.is_zero() {
        run.timed_phase(opts.warmup)?;
    }
    let measurement = run.timed_phase(opts.measure)?;
    if measurement.ios == 0 {
        return Err(format!(
            "{}: no I/O completed within {:.1} s: the device is stalled",
            workload.name, measurement.seconds
        ));
    }
    if workload.direction == Direction::Write {
        run.verify_writes(region)?;
    }
    Ok(measurement)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str) -> Workload {
        Workload::by_name(name, 4).unwrap()
    }

    #[test]
    fn sequential_offsets_wrap_around_the_region() {
        let mut offsets = Offsets::new(&workload("seqread1m"), 3 << 20);
        let got: Vec<u64> = (0..5).map(|_| offsets.next_offset()).collect();
        assert_eq!(got, [0, 1 << 20, 2 << 20, 0, 1 << 20]);
    }

    #[test]
    fn random_offsets_are_aligned_and_inside_the_region() {
        let region = 1 << 20;
        let mut offsets = Offsets::new(&workload("randread4k"), region);
        let got: Vec<u64> = (0..1000).map(|_| offsets.next_offset()).collect();
        assert!(got.iter().all(|&o| o % 4096 == 0 && o + 4096 <= region));
        let distinct: std::collections::BTreeSet<_> = got.iter().collect();
        assert!(distinct.len() > 200, "only {} distinct offsets", distinct.len());
    }

    #[test]
    fn check_block_accepts_what_was_written_and_nothing_else() {
        let mut block = vec![0u8; 3 * STAMP_SECTOR];
        fill_pattern(&mut block);
        stamp_block(&mut block, 1 << 20);
        assert!(check_block(&block, 1 << 20).is_ok());
        // The same data found at another offset, a zeroed sector, a torn sector.
        assert!(check_block(&block, 2 << 20).is_err());
        let mut bad = block.clone();
        bad[STAMP_SECTOR..2 * STAMP_SECTOR].fill(0);
        assert!(check_block(&bad, 1 << 20).is_err());
        let mut bad = block.clone();
        bad[STAMP_SECTOR..2 * STAMP_SECTOR].copy_from_slice(&block[..STAMP_SECTOR]);
        assert!(check_block(&bad, 1 << 20).is_err());
    }

    #[test]
    fn region_defaults_to_the_device_up_to_one_gib() {
        let opts = Options {
            block: String::new(),
            measure: Duration::from_secs(1),
            warmup: Duration::ZERO,
            region: None,
            seq_qd: 4,
        };
        let seq = workload("seqwrite1m");
        assert_eq!(opts.region_bytes(&seq, 4 << 30), Ok(MAX_DEFAULT_REGION));
        assert_eq!(opts.region_bytes(&seq, (64 << 20) + 512), Ok(64 << 20));
        assert!(opts.region_bytes(&seq, 3 << 20).is_err());
        let too_big = Options {
            region: Some(2 << 30),
            ..opts
        };
        assert!(too_big.region_bytes(&seq, 1 << 30).is_err());
    }

    #[test]
    fn samples_cover_the_first_and_last_block_written() {
        let seq = workload("seqwrite1m");
        assert_eq!(sample_offsets(&seq, 0), Vec::<u64>::new());
        assert_eq!(sample_offsets(&seq, 1), [0]);
        let many = sample_offsets(&seq, 1000);
        assert_eq!(many.len(), VERIFY_SAMPLES as usize);
        assert_eq!((many[0], *many.last().unwrap()), (0, 999 << 20));
    }
}
