//! Compares this crate's userspace NVMe driver with Linux's nvme driver driven by io_uring,
//! on one thread: 4 KiB random reads at queue depth 32, and 1 MiB sequential reads and
//! writes at queue depth `--seq-qd`. Each workload gets an untimed warm-up, then is measured
//! for `--seconds`; the result is printed as one line per workload:
//!
//! ```text
//! NVMEPERF {"driver":"kernel","workload":"randread4k","block_bytes":4096,"queue_depth":32,
//!           "seconds":3.0,"ios":...,"bytes":...,"iops":...,"gbps":...,"mean_latency_us":...}
//! ```
//!
//! Writes carry a deterministic pattern, and a sample of the blocks written is read back and
//! checked afterwards, so broken I/O fails the run instead of looking fast.
//!
//! Usage: see [`USAGE`]. Run it in the nvme-vm test VM: tests/nvme-vm/perf.sh does both
//! drivers and collects the results.

#[path = "../common/mod.rs"]
mod common;
mod kernel;
mod spillway;
mod workload;

use std::process::ExitCode;
use std::time::Duration;

use spillway_spdk::pci::{bind_vfio, unbind_vfio, PciAddress, SysRoots};
use workload::{Measurement, Options, Workload, WORKLOAD_NAMES};

const USAGE: &str = "\
usage: nvme_perf --driver kernel|spillway|both [--block DEVICE] [--seconds S] [--warmup S]
                 [--region BYTES] [--seq-qd N] [--workloads randread4k,seqread1m,seqwrite1m]

  --driver     kernel: the block device through io_uring (O_DIRECT, registered buffers);
               spillway: this crate's driver on the controller in NVMEVM_PCI / NVMEVM_GROUP
               both: each workload with the kernel driver, then with this crate's, handing
               the controller NVMEVM_PCI over in between (start with it on the nvme driver)
  --block      block device for the kernel driver (default: $NVMEVM_BLOCK, else /dev/nvme0n1)
  --seconds    measured time per workload (default 3)
  --warmup     untimed warm-up per workload (default 0.3)
  --region     bytes from offset 0 to use; K, M, G suffixes are powers of 1024
               (default: the whole device, at most 1 GiB). Writes destroy its data.
  --seq-qd     queue depth of the sequential workloads (default 4)
  --workloads  comma-separated subset, run in the given order (default: all)";

/// Which driver to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    Kernel,
    Spillway,
    Both,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Kernel => "kernel",
            Driver::Spillway => "spillway",
            Driver::Both => "both",
        }
    }
}

/// The parsed command line.
struct Args {
    driver: Driver,
    workloads: Vec<Workload>,
    opts: Options,
}

/// What the command line asks for: a run, or the usage text.
enum Command {
    Run(Args),
    Help,
}

/// Splits `--flag=value` / `--flag value`; `None` for the value when it is in the next
/// argument.
fn split_flag(arg: &str) -> (&str, Option<&str>) {
    match arg.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => (flag, Some(value)),
        _ => (arg, None),
    }
}

fn parse_driver(value: &str) -> Result<Driver, String> {
    match value {
        "kernel" => Ok(Driver::Kernel),
        "spillway" => Ok(Driver::Spillway),
        "both" => Ok(Driver::Both),
        other => Err(format!("--driver {other}: expected kernel, spillway or both")),
    }
}

/// A positive number of seconds (fractions allowed).
fn parse_seconds(flag: &str, value: &str, allow_zero: bool) -> Result<Duration, String> {
    let secs: f64 = value
        .parse()
        .map_err(|_| format!("{flag} {value}: expected a number of seconds"))?;
    let ok = secs.is_finite() && (secs > 0.0 || (allow_zero && secs == 0.0)) && secs < 1e6;
    if !ok {
        return Err(format!("{flag} {value}: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A byte count with an optional K, M or G (binary) suffix.
fn parse_bytes(flag: &str, value: &str) -> Result<u64, String> {
    let (digits, shift) = match value.char_indices().last() {
        Some((i, 'k' | 'K')) => (&value[..i], 10),
        Some((i, 'm' | 'M')) => (&value[..i], 20),
        Some((i, 'g' | 'G')) => (&value[..i], 30),
        _ => (value, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{flag} {value}: expected a positive byte count, e.g. 268435456 or 256M"))
}

fn parse_queue_depth(flag: &str, value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=4096).contains(n))
        .ok_or_else(|| format!("{flag} {value}: expected a queue depth from 1 to 4096"))
}

/// Parses the arguments after the program name.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut driver = None;
    let mut names: Vec<String> = WORKLOAD_NAMES.iter().map(|s| s.to_string()).collect();
    let mut opts = Options {
        block: std::env::var("NVMEVM_BLOCK").unwrap_or_else(|_| "/dev/nvme0n1".into()),
        measure: Duration::from_secs(3),
        warmup: Duration::from_millis(300),
        region: None,
        seq_qd: 4,
        pci: std::env::var("NVMEVM_PCI").ok(),
        group: std::env::var("NVMEVM_GROUP").ok(),
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = split_flag(&arg);
        if matches!(flag, "-h" | "--help") {
            return Ok(Command::Help);
        }
        let value = match inline {
            Some(v) => v.to_owned(),
            None => args.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        match flag {
            "--driver" => driver = Some(parse_driver(&value)?),
            "--block" => opts.block = value,
            "--seconds" => opts.measure = parse_seconds(flag, &value, false)?,
            "--warmup" => opts.warmup = parse_seconds(flag, &value, true)?,
            "--region" => opts.region = Some(parse_bytes(flag, &value)?),
            "--seq-qd" => opts.seq_qd = parse_queue_depth(flag, &value)?,
            "--workloads" => names = value.split(',').map(str::to_owned).collect(),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    let driver = driver.ok_or("--driver is required: kernel, spillway or both")?;
    let workloads = names
        .iter()
        .map(|name| Workload::by_name(name, opts.seq_qd))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Command::Run(Args {
        driver,
        workloads,
        opts,
    }))
}

/// Prints one measurement: a summary on stderr, the `NVMEPERF` line on stdout.
fn report(driver: &str, workload: &Workload, m: &Measurement) {
    eprintln!(
        "nvme_perf: {driver} {}: {:.0} IOPS, {:.3} GB/s, {:.1} us mean latency",
        workload.name,
        m.iops(),
        m.gbps(),
        m.mean_latency.as_secs_f64() * 1e6
    );
    println!("{}", m.line(driver));
}

/// Runs every workload with `args.driver`, printing one `NVMEPERF` line each (two with
/// `both`).
fn run(args: &Args) -> Result<(), String> {
    if args.driver == Driver::Both {
        return run_both(args);
    }
    let driver = args.driver.name();
    for workload in &args.workloads {
        let result = match args.driver {
            Driver::Kernel => kernel::run(workload, &args.opts),
            _ => spillway::run(workload, &args.opts),
        };
        let m = result.map_err(|e| format!("{driver} {}: {e}", workload.name))?;
        report(driver, workload, &m);
    }
    Ok(())
}

/// Each workload with the kernel driver, then with this crate's on the same controller:
/// the controller goes to vfio-pci and back between them, so that both drivers are
/// measured in the same VM within seconds of each other.
fn run_both(args: &Args) -> Result<(), String> {
    let roots = SysRoots::default();
    let pci = args.opts.pci.clone().ok_or("--driver both needs NVMEVM_PCI")?;
    let addr: PciAddress = pci.parse().map_err(|e| format!("NVMEVM_PCI: {e}"))?;
    let mut opts = args.opts.clone();
    for workload in &args.workloads {
        opts.block = common::wait_block_device(&roots, addr)?.display().to_string();
        let k = kernel::run(workload, &opts).map_err(|e| format!("kernel {}: {e}", workload.name))?;
        report("kernel", workload, &k);
        let bound = bind_vfio(&roots, addr).map_err(|e| e.to_string())?;
        let group = bound
            .function
            .vfio_group_path(&roots)
            .ok_or("no VFIO group after binding")?;
        opts.group = Some(group.display().to_string());
        let s = spillway::run(workload, &opts).map_err(|e| format!("spillway {}: {e}", workload.name))?;
        report("spillway", workload, &s);
        unbind_vfio(&roots, addr).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("nvme_perf: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvme_perf: error: {e}");
            ExitCode::FAILURE
        }
    }
}
