//! `spillway bench`: a gdsio/fio-like benchmark of a backend between GPU (or host) memory
//! and a file or block device.
//!
//! Without `--path`, or with `--path` naming a directory, the target is an anonymous file
//! in that directory ($TMPDIR by default; see [`Target::anonymous_in`]): it has no name and
//! its space is freed when the run ends, even when the run is killed.
//!
//! Each operation is timed on its own. Reads need data on the target: a file that already
//! holds `--size` bytes (or a block device) is read as it is; a new or shorter one is first
//! filled (untimed), so reads never hit unwritten extents. With
//! `--verify` the buffer holds random data and every byte read back is checked: after a
//! read, the buffer itself; after a write, the whole file is read back (untimed) and checked.
//!
//! That is the `seq` workload (the default); `--workload tensors` ([`tensors`]) measures
//! the offload engine on many small tensors instead. `--sweep` ([`sweep`]) runs the `seq`
//! workload at every point of a grid of block sizes × queue depths × thread counts.
//!
//! Flags left out take their settings' values from the environment or the settings file,
//! as the library does ([`settings::BenchSettings`]); the reports list every value so taken
//! ([`layers`]).
//!
//! `--faults PLAN` (the `faults` setting) wraps the backend in a
//! [`FaultyBackend`](spillway_runtime::FaultyBackend) ([`select::setup`]), to see how the
//! run copes with storage that misbehaves. Nothing injected passes unnoticed: an error
//! ends the run with one naming the pass, the plan and what was injected so far; a short
//! count has the rest of its request submitted again (`driver.rs`); and every report notes
//! the plan and counts the faults (`faults` in the JSON, null when off).

mod buffer;
mod driver;
mod flag_settings;
mod flags;
pub mod layers;
mod progress;
pub mod report;
pub mod settings;
pub mod sweep;
pub mod tensors;
pub mod workload;

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use spillway_runtime::{Backend, DirectIo, Error, IoOp, MemberStats, Result, Target, TargetId};

use crate::cli::{BenchArgs, OpChoice};
use crate::select::{self, Choices, Memory, Setup};
use buffer::BenchBuffer;
use report::{BenchResult, Latency};
use settings::BenchSettings;
use workload::Io;

/// Largest buffer the benchmark allocates without `--verify`; larger sizes reuse it.
const MAX_BUFFER: u64 = 4 << 30;
/// Largest `--size` with `--verify` (the whole size is kept in memory to be checked).
const MAX_VERIFY: u64 = 16 << 30;

/// Runs the `seq` workload described by `args` with the settings `bench` (see
/// [`tensors::run`] for the other). A refusal also names the values that came from the
/// environment or the settings file.
pub fn run(args: &BenchArgs, bench: &BenchSettings) -> Result<Vec<BenchResult>> {
    run_seq(args, bench).map_err(|e| bench.layers.annotate(e))
}

fn run_seq(args: &BenchArgs, bench: &BenchSettings) -> Result<Vec<BenchResult>> {
    flags::check(args)?;
    validate(args)?;
    let (paths, setup, path) = storage_setup(args, bench)?;
    let anonymous = paths.len() == 1 && args.pci.is_none() && path.is_dir();
    // Data already on the target is read as it is (no rewrite) unless --verify needs known
    // data; a new or shorter file is filled first, so reads never hit unwritten extents.
    // A namespace, like a block device, always has data; a new anonymous file or a new
    // striped set never does.
    let already_written = args.pci.is_some()
        || (paths.len() == 1
            && !anonymous
            && std::fs::metadata(&path)
                .map(|m| m.file_type().is_block_device() || m.len() >= args.size)
                .unwrap_or(false));
    let target = Target {
        path: path.clone(),
        direct: if args.buffered {
            DirectIo::Off
        } else {
            DirectIo::Preferred
        },
        create: true,
        reserve: Some(args.size),
    };
    let (id, target_info) = setup.backend.open(&target)?;
    let mut run = Run {
        args,
        bench,
        setup: &setup,
        target: id,
        path: display_paths(&paths, args.pci.is_some()),
        buffer: BenchBuffer::new(&setup.memory, setup.device.clone(), buffer_len(args))?,
        written: already_written,
        seeded: false,
        direct_io: target_info.direct_io,
        notes: bench
            .layers
            .report_notes()
            .chain(setup.notes.iter().cloned())
            .chain(target_info.warning)
            .collect(),
    };
    let results = args.op.iter().map(|op| run.op(*op)).collect::<Result<Vec<_>>>();
    let closed = setup.backend.close(id);
    let results = results?;
    closed?;
    Ok(results)
}

/// The run's storage paths, its device and backend (striped over the paths when there are
/// several), and the path of the target to open.
fn storage_setup(args: &BenchArgs, bench: &BenchSettings) -> Result<(Vec<PathBuf>, Setup, PathBuf)> {
    let paths = storage_paths(args, bench)?;
    let settings = &bench.resolved;
    let (setup, path) = select::setup_striped(
        choices(args, bench),
        &settings.faults,
        &paths,
        settings.stripe_bytes,
        &settings.stripe_weights,
    )?;
    Ok((paths, setup, path))
}

/// What the benchmark stores to: the controller of `--pci`, the paths of `bench` (a
/// directory: an anonymous file in it; several: striped), or without either an anonymous
/// file in $TMPDIR.
fn storage_paths(args: &BenchArgs, bench: &BenchSettings) -> Result<Vec<PathBuf>> {
    if let Some(pci) = args.pci {
        return Ok(vec![PathBuf::from(pci.to_string())]);
    }
    if !bench.paths.is_empty() {
        return Ok(bench.paths.clone());
    }
    let dir = std::env::temp_dir();
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "the temporary directory {} does not exist or is not a directory; set TMPDIR to an existing directory or pass --path",
            dir.display()
        )));
    }
    Ok(vec![dir])
}

/// The paths as the report names them: "<anonymous in DIR>" for an anonymous file, and
/// the members of a striped set joined by " + ".
fn display_paths(paths: &[PathBuf], controller: bool) -> String {
    let one = |p: &PathBuf| {
        if !controller && p.is_dir() {
            format!("<anonymous in {}>", p.display())
        } else {
            p.display().to_string()
        }
    };
    paths.iter().map(one).collect::<Vec<_>>().join(" + ")
}

/// Refuses a seq run whose flags do not fit together (`queue_depth` and `threads` are
/// bounded by the settings table, for a flag and every other layer alike).
fn validate(args: &BenchArgs) -> Result<()> {
    if args.block > args.size {
        return Err(Error::invalid(format!(
            "--block ({}) is larger than --size ({}); make the block smaller or the size larger",
            args.block, args.size
        )));
    }
    if let Some(buffer) = args.buffer {
        if buffer < args.block {
            return Err(Error::invalid(format!(
                "--buffer ({buffer}) is smaller than --block ({}); a request must fit in the buffer",
                args.block
            )));
        }
        if args.verify && buffer < args.size {
            return Err(Error::invalid(format!(
                "--verify checks all of --size in memory, so --buffer ({buffer}) must be at least --size ({}); drop --buffer or --verify",
                args.size
            )));
        }
    }
    if args.verify && args.size > MAX_VERIFY {
        return Err(Error::invalid(format!(
            "--verify keeps all of --size in memory to check it; use a --size of at most {} with --verify",
            crate::size::format_size(MAX_VERIFY)
        )));
    }
    Ok(())
}

/// The buffer: `--buffer`, or the whole size up to [`MAX_BUFFER`]; never more than the size,
/// and a whole number of blocks (unless it is the whole size) so no request wraps around
/// its end.
fn buffer_len(args: &BenchArgs) -> u64 {
    let wanted = args.buffer.unwrap_or(MAX_BUFFER).min(args.size);
    if args.verify || wanted == args.size {
        args.size
    } else {
        (wanted / args.block).max(1) * args.block
    }
}

struct Run<'a> {
    args: &'a BenchArgs,
    bench: &'a BenchSettings,
    setup: &'a Setup,
    target: TargetId,
    /// The target as the report names it.
    path: String,
    buffer: BenchBuffer,
    /// True once the first `size` bytes of the target hold written data (of any kind).
    written: bool,
    /// True once they hold the pattern for `seed` (what --verify checks reads against).
    seeded: bool,
    direct_io: bool,
    notes: Vec<String>,
}

impl Run<'_> {
    fn op(&mut self, op: OpChoice) -> Result<BenchResult> {
        let before = self.member_stats();
        let faults_before = select::fault_stats(&self.setup.faults);
        let result = self.op_timed(op)?;
        let after = self.member_stats();
        let paths: Vec<PathBuf> = after.iter().map(|m| m.path.clone()).collect();
        Ok(BenchResult {
            members: report::member_reports(op.is_write(), &before, &after, result.seconds),
            faults: select::fault_report(&self.setup.faults, &paths, &faults_before),
            ..result
        })
    }

    /// The striped set's per-target counters (empty for one target).
    fn member_stats(&self) -> Vec<MemberStats> {
        self.setup
            .striped
            .as_ref()
            .map(|s| s.member_stats())
            .unwrap_or_default()
    }

    fn op_timed(&mut self, op: OpChoice) -> Result<BenchResult> {
        let args = self.args;
        let ios = workload::plan(args.size, args.block, op.is_random(), args.seed);
        let name = op.as_str();
        let timing = if op.is_write() {
            self.buffer.fill(args.seed)?;
            let t = self.pass(IoOp::Write, &ios, name, &format!("bench op {name}"))?;
            self.setup.backend.flush(self.target)?;
            self.written = true;
            self.seeded = true;
            t
        } else {
            if !self.written || (args.verify && !self.seeded) {
                self.buffer.fill(args.seed)?;
                self.pass(
                    IoOp::Write,
                    &workload::plan(args.size, args.block, false, 0),
                    "fill",
                    &format!("the write filling the target before bench op {name} (untimed)"),
                )?;
                self.setup.backend.flush(self.target)?;
                self.written = true;
                self.seeded = true;
            }
            if args.verify {
                self.buffer.poison(args.seed)?;
            }
            self.pass(IoOp::Read, &ios, name, &format!("bench op {name}"))?
        };
        let mismatched_bytes = if args.verify {
            if op.is_write() {
                self.buffer.poison(args.seed)?;
                self.pass(
                    IoOp::Read,
                    &workload::plan(args.size, args.block, false, 0),
                    "verify",
                    &format!("the read-back checking bench op {name} (--verify, untimed)"),
                )?;
            }
            Some(self.buffer.mismatches(args.seed)?)
        } else {
            None
        };
        Ok(self.result(op, &timing, mismatched_bytes))
    }

    /// One pass of `ios`; `what` names it in the error of a run with fault injection on.
    fn pass(&self, op: IoOp, ios: &[Io], progress: &str, what: &str) -> Result<driver::Timing> {
        driver::run(&driver::Pass {
            backend: self.setup.backend.as_ref() as &dyn Backend,
            target: self.target,
            op,
            ios,
            buffer: &self.buffer,
            qd: self.bench.resolved.choices.queue_depth,
            threads: self.bench.resolved.choices.threads,
            progress: (!self.args.json).then_some(progress),
        })
        .map_err(|e| select::fault_context(e, what, &self.setup.faults))
    }

    fn result(&self, op: OpChoice, t: &driver::Timing, mismatched_bytes: Option<u64>) -> BenchResult {
        let seconds = t.elapsed.as_secs_f64().max(1e-9);
        let us = |q: f64| t.latency_ns.value_at_quantile(q) as f64 / 1e3;
        let backend = self.setup.backend.info();
        let device = match &self.setup.memory {
            Memory::Host => "host memory".to_string(),
            Memory::Gpu(gpu) => format!("{} (GPU {})", self.setup.device.info().name, gpu.ordinal()),
        };
        BenchResult {
            backend: backend.name.to_string(),
            memory: self.setup.memory.name().to_string(),
            device,
            op: op.as_str().to_string(),
            bytes: t.bytes,
            block_size: self.args.block,
            buffer_bytes: self.buffer.len(),
            queue_depth: self.bench.resolved.choices.queue_depth,
            threads: self.bench.resolved.choices.threads,
            seconds,
            throughput_gbps: t.bytes as f64 / seconds / 1e9,
            iops: t.ios as f64 / seconds,
            latency_us: Latency {
                p50: us(0.5),
                p99: us(0.99),
                p999: us(0.999),
                max: t.latency_ns.max() as f64 / 1e3,
                mean: t.latency_ns.mean() / 1e3,
            },
            direct_io: self.direct_io,
            host_staging: matches!(self.setup.memory, Memory::Gpu(_)) && backend.host_staging,
            gds_mode: backend.transfer_mode.map(str::to_string),
            path: self.path.clone(),
            verified: mismatched_bytes.map(|m| m == 0),
            mismatched_bytes,
            notes: self.notes.clone(),
            from_env_or_file: self.bench.layers.taken.clone(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            members: Vec::new(),
            faults: None,
        }
    }
}

/// The device and backend choices of a bench run (either workload): its settings', with
/// the controller of `--pci`.
pub fn choices(args: &BenchArgs, bench: &BenchSettings) -> Choices {
    Choices {
        pci: args.pci,
        ..bench.resolved.choices
    }
}

/// `e`, from making or placing a file a flag named (`--trace`, `--out`), pointing at that
/// flag.
pub(crate) fn blame_flag(e: Error, flag: &str) -> Error {
    match e {
        Error::Io { context, source } => Error::Io {
            context: format!("{context} (check {flag})"),
            source,
        },
        e => e,
    }
}
