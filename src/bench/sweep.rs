//! `spillway bench --sweep`: the `seq` workload run at every point of a grid of block sizes
//! × queue depths × thread counts, with one table (or one JSON object) for all of them.
//!
//! The block size, queue depth and thread count that get the most out of a drive depend on
//! the drive, the backend and the memory; finding them by hand takes one run per
//! combination and a spreadsheet. A sweep runs every combination through the same code as a
//! plain `spillway bench` (each point is [`super::run`] with its block, queue depth and
//! threads set), shows which one was fastest for each operation, and writes JSON
//! (`--json`, `--out FILE`) that scripts can plot.
//!
//! Each dimension of the grid is its list flag (`--blocks`, `--qds`, `--thread-counts`);
//! else the single flag (`--block`, `--qd`, `--threads`) when given on the command line,
//! which fixes it; else its default list ([`DEFAULT_BLOCKS`], [`DEFAULT_QDS`],
//! [`DEFAULT_THREADS`]). The sweep's values win over the `queue_depth` and `threads`
//! settings of the environment or the settings file: a point's report does not list them as
//! taken, and notes that they were not used.
//!
//! Every value and every point is checked before the first point runs, so a bad list is
//! refused at once (status 2, naming the flag). A point that fails stops the sweep with an
//! error naming the point; it keeps the exit status of the error ([`crate::exit`]).

use std::io::Write;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use spillway_runtime::{Error, PrivateFile, Result};

use super::flags::SWEEP_ONLY;
use super::report::BenchResult;
use super::settings::BenchSettings;
use crate::cli::BenchArgs;
use crate::select::fault_summary;
use crate::size::format_size;

/// The most points a sweep runs.
pub const MAX_POINTS: usize = 512;
/// The block sizes swept when neither `--blocks` nor `--block` is given (those larger than
/// `--size` are left out).
pub const DEFAULT_BLOCKS: [u64; 3] = [64 << 10, 1 << 20, 4 << 20];
/// The queue depths swept when neither `--qds` nor `--qd` is given.
pub const DEFAULT_QDS: [u32; 4] = [1, 4, 16, 64];
/// The thread counts swept when neither `--thread-counts` nor `--threads` is given.
pub const DEFAULT_THREADS: [usize; 3] = [1, 4, 8];

/// The settings whose flags the sweep sets for each of its points.
const SET_BY_SWEEP: [&str; 2] = ["queue_depth", "threads"];

/// The values swept in each dimension, in the order given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Grid {
    /// Bytes per request.
    pub blocks: Vec<u64>,
    /// Requests in flight per thread.
    pub qds: Vec<u32>,
    /// Submitting threads.
    pub threads: Vec<usize>,
}

/// One point of a [`Grid`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    /// Bytes per request.
    pub block: u64,
    /// Requests in flight per thread.
    pub qd: u32,
    /// Submitting threads.
    pub threads: usize,
}

impl std::fmt::Display for Point {
    /// "block 64 KiB, qd 16, threads 4".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block {}, qd {}, threads {}",
            format_size(self.block),
            self.qd,
            self.threads
        )
    }
}

impl Grid {
    /// The grid `args` asks for (see the [module documentation](self)), each value checked
    /// as its single flag's value is (over the settings layers of `bench`), and the whole at
    /// most [`MAX_POINTS`] points.
    pub fn from_args(args: &BenchArgs, bench: &BenchSettings) -> Result<Grid> {
        let given = |id: &str| args.given.iter().any(|g| g == id);
        let blocks = if !args.blocks.is_empty() {
            args.blocks.clone()
        } else if given("block") {
            vec![args.block]
        } else {
            let fit: Vec<u64> = DEFAULT_BLOCKS.into_iter().filter(|&b| b <= args.size).collect();
            if fit.is_empty() {
                return Err(Error::invalid(format!(
                    "--size ({}) is smaller than every default block size of the sweep (the smallest is {}): give the block sizes with --blocks, or a larger --size",
                    format_size(args.size),
                    format_size(DEFAULT_BLOCKS[0])
                )));
            }
            fit
        };
        let qds = pick(&args.qds, given("qd"), args.qd, &DEFAULT_QDS);
        let threads = pick(
            &args.thread_counts,
            given("threads"),
            args.threads,
            &DEFAULT_THREADS,
        );
        let grid = Grid { blocks, qds, threads };
        grid.check(args, bench)?;
        Ok(grid)
    }

    /// The number of points.
    pub fn len(&self) -> usize {
        self.blocks
            .len()
            .saturating_mul(self.qds.len())
            .saturating_mul(self.threads.len())
    }

    /// Whether the grid has no point (never true of one [`Grid::from_args`] made).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The points, block by block, then queue depth by queue depth, then thread count by
    /// thread count, each list in its order.
    pub fn points(&self) -> Vec<Point> {
        let mut points = Vec::with_capacity(self.len());
        for &block in &self.blocks {
            for &qd in &self.qds {
                for &threads in &self.threads {
                    points.push(Point { block, qd, threads });
                }
            }
        }
        points
    }

    /// Refuses a grid of more than [`MAX_POINTS`] points, a value given twice in a list, and
    /// a value its single flag would refuse (the same checks: the settings table's caps, and
    /// the bench's own rules against --size and --buffer).
    fn check(&self, args: &BenchArgs, bench: &BenchSettings) -> Result<()> {
        if self.len() > MAX_POINTS {
            return Err(Error::invalid(format!(
                "the sweep has {} points ({} block sizes × {} queue depths × {} thread counts), more than {MAX_POINTS}: shorten --blocks, --qds or --thread-counts",
                self.len(),
                self.blocks.len(),
                self.qds.len(),
                self.threads.len()
            )));
        }
        let given = |id: &str| args.given.iter().any(|g| g == id);
        let name = |list: &str, single: &str, id: &str| {
            if given(id) {
                list.to_string()
            } else if given(single.trim_start_matches('-')) {
                single.to_string()
            } else {
                format!("the default {list} (give {list} to choose others)")
            }
        };
        let values = Values { args, bench };
        values.check(
            &name("--blocks", "--block", "blocks"),
            &self.blocks,
            |b| format_size(*b),
            |a, b| give(a, "block", |a| a.block = b),
        )?;
        values.check(
            &name("--qds", "--qd", "qds"),
            &self.qds,
            u32::to_string,
            |a, qd| give(a, "qd", |a| a.qd = qd),
        )?;
        values.check(
            &name("--thread-counts", "--threads", "thread_counts"),
            &self.threads,
            usize::to_string,
            |a, t| give(a, "threads", |a| a.threads = t),
        )
    }
}

/// The list given; else the single flag's value when given; else the defaults.
fn pick<T: Copy>(list: &[T], single_given: bool, single: T, defaults: &[T]) -> Vec<T> {
    if !list.is_empty() {
        list.to_vec()
    } else if single_given {
        vec![single]
    } else {
        defaults.to_vec()
    }
}

/// A sweep's command line and settings, against which its values are checked.
struct Values<'a> {
    args: &'a BenchArgs,
    bench: &'a BenchSettings,
}

impl Values<'_> {
    /// Refuses a value given twice in `values`, and any value the bench refuses on the
    /// command line `set` makes of it (see [`Grid::check`]); `flag` names where the values
    /// came from.
    fn check<T: Copy + PartialEq>(
        &self,
        flag: &str,
        values: &[T],
        show: impl Fn(&T) -> String,
        set: impl Fn(&mut BenchArgs, T),
    ) -> Result<()> {
        for (i, v) in values.iter().enumerate() {
            if values[..i].contains(v) {
                return Err(Error::invalid(format!(
                    "{flag} lists {} twice: give each value once",
                    show(v)
                )));
            }
            let mut one = self.args.clone();
            set(&mut one, *v);
            self.bench
                .for_args(&one)
                .and_then(|_| super::validate(&one))
                .map_err(|e| {
                    Error::invalid(format!(
                        "{flag}: the value {} is refused: {}",
                        show(v),
                        message(&e)
                    ))
                })?;
        }
        Ok(())
    }
}

/// The command line `a` with the flag of clap id `id` given, as `set` gives it.
fn give(a: &mut BenchArgs, id: &str, set: impl FnOnce(&mut BenchArgs)) {
    set(a);
    if !a.given.iter().any(|g| g == id) {
        a.given.push(id.to_string());
    }
}

/// The text of a refusal without its "invalid argument: " prefix.
fn message(e: &Error) -> String {
    match e {
        Error::InvalidArgument(msg) => msg.clone(),
        e => e.to_string(),
    }
}

/// The whole sweep: `--json` prints it as one object, `--out` writes it to a file.
#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    /// What was swept, and on what.
    pub sweep: SweepInfo,
    /// One entry per point of the grid, in the order run.
    pub points: Vec<PointResult>,
    /// For each operation, the point with the highest throughput.
    pub best: BestPoints,
}

/// What a sweep swept, and on what.
#[derive(Clone, Debug, Serialize)]
pub struct SweepInfo {
    /// Block sizes, bytes.
    pub blocks: Vec<u64>,
    /// Queue depths.
    pub qds: Vec<u32>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// Bytes moved per operation at each point (`--size`).
    pub size: u64,
    /// The operations run at each point, in order (`--op`).
    pub ops: Vec<String>,
    /// "gpu" or "host".
    pub memory: String,
    /// The backend, as the points' reports name it.
    pub backend: String,
    /// The target, as the points' reports name it.
    pub path: String,
}

/// One point of the grid and its results.
#[derive(Clone, Debug, Serialize)]
pub struct PointResult {
    /// Bytes per request.
    pub block: u64,
    /// Requests in flight per thread.
    pub qd: u32,
    /// Submitting threads.
    pub threads: usize,
    /// One result per operation, the objects `spillway bench --json` prints.
    pub results: Vec<BenchResult>,
}

/// The fastest point for one operation.
#[derive(Clone, Debug, Serialize)]
pub struct BestPoint {
    /// Bytes per request.
    pub block: u64,
    /// Requests in flight per thread.
    pub qd: u32,
    /// Submitting threads.
    pub threads: usize,
    /// Its throughput, decimal GB/s.
    pub throughput_gbps: f64,
    /// Its requests per second.
    pub iops: f64,
}

/// The fastest point of each operation, in the order the operations ran; a JSON object
/// keyed by operation.
#[derive(Clone, Debug, Default)]
pub struct BestPoints(pub Vec<(String, BestPoint)>);

impl Serialize for BestPoints {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (op, best) in &self.0 {
            map.serialize_entry(op, best)?;
        }
        map.end()
    }
}

impl BestPoints {
    /// For each operation of `points`, the point with the highest throughput (the first one
    /// run, on a tie).
    pub fn of(points: &[PointResult]) -> BestPoints {
        let mut best: Vec<(String, BestPoint)> = Vec::new();
        for p in points {
            for r in &p.results {
                let candidate = BestPoint {
                    block: p.block,
                    qd: p.qd,
                    threads: p.threads,
                    throughput_gbps: r.throughput_gbps,
                    iops: r.iops,
                };
                match best.iter_mut().find(|(op, _)| *op == r.op) {
                    Some((_, b)) if r.throughput_gbps > b.throughput_gbps => *b = candidate,
                    Some(_) => {}
                    None => best.push((r.op.clone(), candidate)),
                }
            }
        }
        BestPoints(best)
    }
}

impl Sweep {
    /// Whether any point's `--verify` found bytes that differ.
    pub fn verification_failed(&self) -> bool {
        self.results().any(|r| r.verified == Some(false))
    }

    /// The sweep as one line of JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self)
            .map_err(|e| Error::invalid(format!("cannot encode the sweep as JSON: {e}")))
    }

    fn results(&self) -> impl Iterator<Item = &BenchResult> {
        self.points.iter().flat_map(|p| &p.results)
    }
}

/// Runs the sweep `args` asks for (`--sweep`) with the settings `bench`; with `--out`, also
/// writes its JSON there. A refusal before the first point also names the values that came
/// from the environment or the settings file; a point's error names the point.
pub fn run(args: &BenchArgs, bench: &BenchSettings) -> Result<Sweep> {
    let (grid, points) = plan(args, bench).map_err(|e| bench.layers.annotate(e))?;
    // Made before the first point, so that a bad --out is reported before the run, not
    // after it; put in place once written (see PrivateFile: never through a link).
    let mut out = match &args.out {
        Some(path) => {
            Some(PrivateFile::create(path, "sweep file").map_err(|e| super::blame_flag(e, "--out"))?)
        }
        None => None,
    };
    let line = PointLine::new(!args.json, points.len());
    let mut done = Vec::with_capacity(points.len());
    for (i, (point, point_args, settings)) in points.iter().enumerate() {
        line.show(i + 1, point);
        let results =
            super::run(point_args, settings).map_err(|e| at_point(e, i + 1, points.len(), point))?;
        done.push(PointResult {
            block: point.block,
            qd: point.qd,
            threads: point.threads,
            results,
        });
    }
    let first = done.first().and_then(|p| p.results.first());
    let sweep = Sweep {
        sweep: SweepInfo {
            blocks: grid.blocks,
            qds: grid.qds,
            threads: grid.threads,
            size: args.size,
            ops: args.op.iter().map(|op| op.as_str().to_string()).collect(),
            memory: first.map(|r| r.memory.clone()).unwrap_or_default(),
            backend: first.map(|r| r.backend.clone()).unwrap_or_default(),
            path: first.map(|r| r.path.clone()).unwrap_or_default(),
        },
        best: BestPoints::of(&done),
        points: done,
    };
    if let (Some(path), Some(file)) = (&args.out, out.as_mut()) {
        let json = sweep.to_json()?;
        writeln!(file, "{json}").map_err(|e| {
            Error::io(
                format!("writing the sweep to {} (check --out)", path.display()),
                e,
            )
        })?;
    }
    if let Some(file) = out {
        file.persist().map_err(|e| super::blame_flag(e, "--out"))?;
    }
    Ok(sweep)
}

/// A point of a sweep, with the command line and the settings its bench runs with.
type PointRun = (Point, BenchArgs, BenchSettings);

/// The grid, and each of its points with the command line and settings its bench runs
/// with, all checked.
fn plan(args: &BenchArgs, bench: &BenchSettings) -> Result<(Grid, Vec<PointRun>)> {
    super::flags::check(args)?;
    let grid = Grid::from_args(args, bench)?;
    let n = grid.len();
    let mut points = Vec::with_capacity(n);
    for (i, p) in grid.points().into_iter().enumerate() {
        // Combinations the values alone do not show: the staging of many rings at a deep
        // queue may not fit the host's memory.
        let (a, settings) = point_args(args, bench, &p)
            .and_then(|(a, settings)| {
                super::validate(&a)?;
                crate::cli::check_memory(&a, &settings)?;
                Ok((a, settings))
            })
            .map_err(|e| at_point(e, i + 1, n, &p))?;
        points.push((p, a, settings));
    }
    Ok((grid, points))
}

/// The command line and settings of the plain bench of `point`: its block, queue depth and
/// threads given as if on the command line, the sweep's own flags gone; the `queue_depth`
/// and `threads` values of the environment or the settings file (which the sweep
/// overrides) are then not taken, but noted as unused.
fn point_args(args: &BenchArgs, bench: &BenchSettings, point: &Point) -> Result<(BenchArgs, BenchSettings)> {
    let mut a = args.clone();
    give(&mut a, "block", |a| a.block = point.block);
    give(&mut a, "qd", |a| a.qd = point.qd);
    give(&mut a, "threads", |a| a.threads = point.threads);
    a.sweep = false;
    a.blocks.clear();
    a.qds.clear();
    a.thread_counts.clear();
    a.out = None;
    a.given
        .retain(|g| g != "sweep" && !SWEEP_ONLY.iter().any(|(id, _)| g == id));
    let mut settings = bench.for_args(&a)?;
    let overridden = bench
        .layers
        .taken
        .iter()
        .filter(|t| SET_BY_SWEEP.contains(&t.setting));
    settings
        .layers
        .notes
        .extend(overridden.map(|t| format!("{t} not used: the sweep sets {} for each point", t.setting)));
    Ok((a, settings))
}

/// `e`, saying at which point of the sweep it happened, with the exit status it had.
fn at_point(e: Error, i: usize, n: usize, point: &Point) -> Error {
    let at = format!("sweep point {i}/{n} ({point})");
    match e {
        Error::InvalidArgument(msg) => Error::InvalidArgument(format!("{at}: {msg}")),
        Error::Device(msg) => Error::Device(format!("{at}: {msg}")),
        Error::Abandoned(msg) => Error::Abandoned(format!("{at}: {msg}")),
        Error::Io { context, source } => Error::Io {
            context: format!("{at}: {context}"),
            source,
        },
        Error::Target { path, reason } => Error::Target {
            path,
            reason: format!("{reason} (at {at})"),
        },
        Error::Unavailable { what, reason } => Error::Unavailable {
            what,
            reason: format!("{reason} (at {at})"),
        },
        Error::Storage { target, source } => Error::Storage {
            target: format!("{at}: {target}"),
            source,
        },
        Error::Corrupt {
            what,
            path,
            offset,
            expected,
            found,
        } => Error::Corrupt {
            what: format!("{what} (at {at})"),
            path,
            offset,
            expected,
            found,
        },
        // No text of their own to extend: an I/O error of the same kind keeps the status
        // (a full storage is bad input; the others are failures).
        e @ Error::NoSpace { .. } => Error::io(
            at,
            std::io::Error::new(std::io::ErrorKind::StorageFull, e.to_string()),
        ),
        e @ (Error::ShortIo { .. } | Error::OutOfMemory { .. }) => {
            Error::io(at, std::io::Error::other(e.to_string()))
        }
    }
}

/// The line "point i/N: block B qd Q threads T" on stderr as each point starts, above the
/// point's own progress bars (a sibling of [`super::progress::Progress`]). Each point's line
/// stays, so the lines above the results tell how far the sweep got. Hidden with `--json`
/// and when stderr is not a terminal (indicatif's terminal target draws only to one).
struct PointLine {
    enabled: bool,
    total: usize,
}

impl PointLine {
    fn new(enabled: bool, total: usize) -> Self {
        PointLine { enabled, total }
    }

    /// Draws the line of the `i`-th point (from 1).
    fn show(&self, i: usize, point: &Point) {
        if !self.enabled {
            return;
        }
        // Made hidden and drawn once, whole, when abandoned.
        let bar = ProgressBar::with_draw_target(Some(self.total as u64), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template("point {pos}/{len}: {msg}") {
            bar.set_style(style);
        }
        bar.set_position(i as u64);
        bar.set_message(format!(
            "block {} qd {} threads {}",
            format_size(point.block),
            point.qd,
            point.threads
        ));
        bar.set_draw_target(ProgressDrawTarget::stderr());
        // Left in place: the point's own bars appear below it.
        bar.abandon();
    }
}

/// Prints the sweep as a table: the facts of the sweep, a row per point and operation, then
/// the best point of each operation.
pub fn print_table(sweep: &Sweep) {
    let s = &sweep.sweep;
    let Some(first) = sweep.results().next() else {
        return;
    };
    let device = if first.memory == "gpu" {
        format!(" ({})", first.device)
    } else {
        String::new()
    };
    let list = |v: Vec<String>| v.join(",");
    println!(
        "spillway bench --sweep: {} backend, {} memory{device}, {}",
        s.backend, s.memory, s.path
    );
    println!(
        "  {} points: blocks {} × qds {} × threads {}; {} per operation, O_DIRECT {}",
        sweep.points.len(),
        list(s.blocks.iter().map(|b| format_size(*b)).collect()),
        list(s.qds.iter().map(u32::to_string).collect()),
        list(s.threads.iter().map(usize::to_string).collect()),
        format_size(s.size),
        if first.direct_io { "yes" } else { "no" },
    );
    for note in &first.notes {
        println!("  note: {note}");
    }
    println!();
    let verify = sweep.results().any(|r| r.verified.is_some());
    println!(
        "{:>10} {:>5} {:>7}  {:<10} {:>8} {:>10} {:>10} {:>10}{}",
        "block",
        "qd",
        "threads",
        "op",
        "GB/s",
        "IOPS",
        "p50 us",
        "p99 us",
        if verify { "  verify" } else { "" }
    );
    for p in &sweep.points {
        for r in &p.results {
            let check = match r.verified {
                None => String::new(),
                Some(true) => "  ok".to_string(),
                Some(false) => format!("  FAILED ({} bytes differ)", r.mismatched_bytes.unwrap_or(0)),
            };
            println!(
                "{:>10} {:>5} {:>7}  {:<10} {:>8.3} {:>10.0} {:>10.1} {:>10.1}{check}",
                format_size(p.block),
                p.qd,
                p.threads,
                r.op,
                r.throughput_gbps,
                r.iops,
                r.latency_us.p50,
                r.latency_us.p99,
            );
        }
    }
    for p in &sweep.points {
        for r in &p.results {
            if let Some(f) = &r.faults {
                let point = Point {
                    block: p.block,
                    qd: p.qd,
                    threads: p.threads,
                };
                println!("faults during {} at {point}: {}", r.op, fault_summary(&f.stats));
            }
        }
    }
    println!();
    let width = sweep.best.0.iter().map(|(op, _)| op.len()).max().unwrap_or(0);
    for (op, b) in &sweep.best.0 {
        let point = Point {
            block: b.block,
            qd: b.qd,
            threads: b.threads,
        };
        println!(
            "best {:<width$} {:>8.3} GB/s, {:.0} IOPS at {point}",
            format!("{op}:"),
            b.throughput_gbps,
            b.iops,
            width = width + 1
        );
    }
}

/// Prints the sweep as one JSON object on one line (what `--out` writes).
pub fn print_json(sweep: &Sweep) {
    match sweep.to_json() {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("error: {e}"),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    use crate::bench::settings::of;
    use crate::exit::{status_of, BAD_INPUT, FAILURE, MISMATCH};

    /// `spillway bench ARGS`, parsed as [`crate::cli::parse`] does (without the layers).
    fn bench(args: &[&str]) -> BenchArgs {
        crate::cli::bench_args(args)
    }

    /// The grid of `args`, over no settings layers.
    fn grid(args: &BenchArgs) -> Result<Grid> {
        Grid::from_args(args, &of(args, &[])?)
    }

    #[test]
    fn each_dimension_is_its_list_else_its_flag_else_the_defaults() {
        let g = grid(&bench(&["--sweep"])).unwrap();
        assert_eq!(g.blocks, DEFAULT_BLOCKS);
        assert_eq!(
            (g.qds.as_slice(), g.threads.as_slice()),
            (&DEFAULT_QDS[..], &DEFAULT_THREADS[..])
        );
        assert_eq!(g.len(), 36);

        let g = grid(&bench(&["--sweep", "--threads", "4", "--qds", "2,1"])).unwrap();
        assert_eq!((g.qds, g.threads), (vec![2, 1], vec![4]));
        let g = grid(&bench(&["--sweep", "--block", "256K", "--qd", "8"])).unwrap();
        assert_eq!((g.blocks, g.qds), (vec![256 << 10], vec![8]));

        // Default block sizes larger than --size are left out.
        let g = grid(&bench(&["--sweep", "--size", "2M"])).unwrap();
        assert_eq!(g.blocks, [64 << 10, 1 << 20]);
        let e = grid(&bench(&["--sweep", "--size", "32K"])).unwrap_err();
        assert!(e.to_string().contains("--blocks"), "{e}");
    }

    #[test]
    fn points_go_block_then_qd_then_threads() {
        let g = Grid {
            blocks: vec![1, 2],
            qds: vec![3],
            threads: vec![4, 5],
        };
        let p: Vec<(u64, u32, usize)> = g.points().iter().map(|p| (p.block, p.qd, p.threads)).collect();
        assert_eq!(p, [(1, 3, 4), (1, 3, 5), (2, 3, 4), (2, 3, 5)]);
    }

    #[test]
    fn bad_values_duplicates_and_big_grids_are_refused_naming_the_flag() {
        for (flags, expected) in [
            (&["--qds", "4,0"][..], "--qds: the value 0 is refused: --qd 0"),
            (
                &["--thread-counts", "1,300"],
                "--thread-counts: the value 300 is refused: --threads 300",
            ),
            (
                &["--blocks", "64K,8M", "--size", "4M"],
                "--blocks: the value 8 MiB is refused",
            ),
            (&["--qds", "4,4"], "--qds lists 4 twice"),
            (&["--blocks", "1M,1024K"], "--blocks lists 1 MiB twice"),
        ] {
            let e = grid(&bench(&[&["--sweep"], flags].concat())).unwrap_err();
            assert_eq!(status_of(&e), BAD_INPUT);
            assert!(e.to_string().contains(expected), "{flags:?}: {e}");
        }
        let many: Vec<String> = (1..=9).map(|n| n.to_string()).collect();
        let many = many.join(",");
        let e = grid(&bench(&[
            "--sweep",
            "--qds",
            &many,
            "--thread-counts",
            &many,
            "--blocks",
            "4K,8K,16K,32K,64K,128K,256K",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("567 points"), "{e}");
    }

    #[test]
    fn a_point_s_values_win_over_the_environment_and_the_sweep_flags_go() {
        let vars = [
            ("SPILLWAY_QUEUE_DEPTH", "32"),
            ("SPILLWAY_STRIPE_BYTES", "256KiB"),
        ];
        let args = bench(&["--sweep", "--thread-counts", "2", "--out", "/tmp/x.json"]);
        let settings = of(&args, &vars).unwrap();
        assert_eq!(
            settings.resolved.choices.queue_depth, 32,
            "the environment's queue depth"
        );
        let point = Point {
            block: 4096,
            qd: 4,
            threads: 2,
        };
        let (a, s) = point_args(&args, &settings, &point).unwrap();
        let choices = s.resolved.choices;
        assert_eq!(
            (a.block, choices.queue_depth, choices.threads, a.sweep),
            (4096, 4, 2, false)
        );
        let taken: Vec<&str> = s.layers.taken.iter().map(|t| t.setting).collect();
        assert_eq!(taken, ["stripe_bytes"]);
        assert!(
            s.layers
                .notes
                .iter()
                .any(|n| n == "queue_depth=32 from SPILLWAY_QUEUE_DEPTH not used: the sweep sets queue_depth for each point"),
            "{:?}",
            s.layers.notes
        );
        assert!(a.out.is_none() && a.thread_counts.is_empty());
        for id in ["sweep", "thread_counts", "out"] {
            assert!(!a.given.iter().any(|g| g == id), "{id} left in {:?}", a.given);
        }
        super::super::flags::check(&a).expect("a point is a plain bench");
    }

    /// A result of `op` at `gbps`, the rest of it of no interest.
    fn result(op: &str, gbps: f64) -> BenchResult {
        BenchResult {
            backend: "uring".into(),
            memory: "host".into(),
            device: "host memory".into(),
            op: op.into(),
            bytes: 1,
            block_size: 1,
            buffer_bytes: 1,
            queue_depth: 1,
            threads: 1,
            seconds: 1.0,
            throughput_gbps: gbps,
            iops: gbps * 10.0,
            latency_us: crate::bench::report::Latency {
                p50: 1.0,
                p99: 1.0,
                p999: 1.0,
                max: 1.0,
                mean: 1.0,
            },
            direct_io: true,
            host_staging: false,
            gds_mode: None,
            path: "/x".into(),
            verified: None,
            mismatched_bytes: None,
            notes: Vec::new(),
            from_env_or_file: Vec::new(),
            command: String::new(),
            members: Vec::new(),
            faults: None,
        }
    }

    #[test]
    fn the_best_point_of_each_op_is_the_fastest_in_op_order() {
        let point = |qd: u32, write: f64, read: f64| PointResult {
            block: 4096,
            qd,
            threads: 1,
            results: vec![result("write", write), result("read", read)],
        };
        let best = BestPoints::of(&[point(1, 1.0, 3.0), point(2, 2.0, 3.0), point(3, 1.5, 2.0)]);
        let found: Vec<(&str, u32, f64)> = best
            .0
            .iter()
            .map(|(op, b)| (op.as_str(), b.qd, b.throughput_gbps))
            .collect();
        assert_eq!(
            found,
            [("write", 2, 2.0), ("read", 1, 3.0)],
            "the first one run on a tie"
        );
        let json = serde_json::to_string(&best).unwrap();
        assert!(json.starts_with("{\"write\":{\"block\":4096,\"qd\":2,"), "{json}");
    }

    #[test]
    fn a_point_s_error_names_it_and_keeps_its_status() {
        let p = Point {
            block: 64 << 10,
            qd: 16,
            threads: 4,
        };
        let cases = [
            (Error::invalid("--buffer too small"), BAD_INPUT),
            (
                Error::NoSpace {
                    path: "/x".into(),
                    offset: 0,
                    needed: 1,
                },
                BAD_INPUT,
            ),
            (Error::Device("launch failed".into()), FAILURE),
            (
                Error::ShortIo {
                    op: "read",
                    path: "/x".into(),
                    offset: 0,
                    done: 1,
                    wanted: 2,
                },
                FAILURE,
            ),
            (
                Error::Corrupt {
                    what: "bytes".into(),
                    path: "/x".into(),
                    offset: 0,
                    expected: 1,
                    found: 2,
                },
                MISMATCH,
            ),
        ];
        for (e, status) in cases {
            let e = at_point(e, 3, 8, &p);
            assert_eq!(status_of(&e), status, "{e}");
            assert!(
                e.to_string()
                    .contains("sweep point 3/8 (block 64 KiB, qd 16, threads 4)"),
                "{e}"
            );
        }
    }
}
