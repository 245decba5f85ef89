//! Benchmark results: the JSON object (one per operation) and the human-readable table.

use serde::Serialize;
use spillway_runtime::MemberStats;

use super::layers::Taken;
use crate::select::{fault_summary, FaultReport};
use crate::size::format_size;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest request.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// One operation's result; `--json` prints exactly this, one object per line.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// "uring" or "cufile".
    pub backend: String,
    /// "gpu" or "host".
    pub memory: String,
    /// The device, e.g. "NVIDIA H200 (GPU 0)" or "host memory".
    pub device: String,
    /// write, read, randwrite or randread.
    pub op: String,
    /// Bytes moved.
    pub bytes: u64,
    /// Bytes per request.
    pub block_size: u64,
    /// Bytes of memory the requests cycle through.
    pub buffer_bytes: u64,
    /// Requests in flight per thread.
    pub queue_depth: u32,
    /// Submitting threads.
    pub threads: usize,
    /// Wall time of the timed part.
    pub seconds: f64,
    /// Decimal gigabytes (1e9 bytes) per second.
    pub throughput_gbps: f64,
    /// Requests per second.
    pub iops: f64,
    /// Per-request latency.
    pub latency_us: Latency,
    /// Whether O_DIRECT was in effect.
    pub direct_io: bool,
    /// Whether GPU data passed through host memory on its way (always false for host memory).
    pub host_staging: bool,
    /// For cuFile: "gds-nvfs", "gds-p2pdma" or "compat"; null for other backends.
    pub gds_mode: Option<String>,
    /// The file or device.
    pub path: String,
    /// With --verify: whether every byte matched; null without --verify.
    pub verified: Option<bool>,
    /// With --verify: bytes that differed.
    pub mismatched_bytes: Option<u64>,
    /// Warnings and choices made for the user; the first ones name each value taken from
    /// the environment or the settings file ("queue_depth=32 from SPILLWAY_QUEUE_DEPTH").
    pub notes: Vec<String>,
    /// The settings whose values came from the environment or the settings file instead of
    /// a flag or a default (empty when none did).
    pub from_env_or_file: Vec<Taken>,
    /// The command line that produced this result.
    pub command: String,
    /// With several --path: what each target of the striped set moved during this
    /// operation.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberReport>,
    /// With --faults: the plan and what was injected during this operation (its untimed
    /// fill or --verify read-back included); null without.
    pub faults: Option<FaultReport>,
}

/// What one target of a striped set did during one operation.
#[derive(Clone, Debug, Serialize)]
pub struct MemberReport {
    /// The target.
    pub path: String,
    /// Bytes it moved in the operation's direction.
    pub bytes: u64,
    /// Those bytes over the operation's wall time, in decimal GB/s.
    pub throughput_gbps: f64,
    /// Seconds during which it had I/O in flight.
    pub busy_seconds: f64,
    /// Pieces of requests that failed on it.
    pub errors: u64,
}

/// The per-target reports of one operation (`write`: bytes written, else bytes read, so
/// that the untimed read-back of --verify does not count), from the counters before and
/// after it.
pub fn member_reports(
    write: bool,
    before: &[MemberStats],
    after: &[MemberStats],
    seconds: f64,
) -> Vec<MemberReport> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let bytes = if write {
                a.bytes_written - b.bytes_written
            } else {
                a.bytes_read - b.bytes_read
            };
            MemberReport {
                path: a.path.display().to_string(),
                bytes,
                throughput_gbps: bytes as f64 / seconds.max(1e-9) / 1e9,
                busy_seconds: a.busy_seconds - b.busy_seconds,
                errors: a.errors - b.errors,
            }
        })
        .collect()
}

/// Prints the results as a table, with the run's facts above it.
pub fn print_table(results: &[BenchResult]) {
    let Some(first) = results.first() else { return };
    let device = if first.memory == "gpu" {
        format!(" ({})", first.device)
    } else {
        String::new()
    };
    println!(
        "spillway bench: {} backend, {} memory{device}, {}",
        first.backend, first.memory, first.path
    );
    println!(
        "  block {}, buffer {}, queue depth {}, threads {}, O_DIRECT {}, host staging {}{}",
        format_size(first.block_size),
        format_size(first.buffer_bytes),
        first.queue_depth,
        first.threads,
        yes_no(first.direct_io),
        yes_no(first.host_staging),
        first
            .gds_mode
            .as_ref()
            .map(|m| format!(", cuFile mode {m}"))
            .unwrap_or_default()
    );
    for note in &first.notes {
        println!("  note: {note}");
    }
    println!();
    println!(
        "{:<10} {:>11} {:>8} {:>10} {:>11} {:>10} {:>10} {:>10} {:>10}  verify",
        "op", "bytes", "GB/s", "IOPS", "seconds", "p50 us", "p99 us", "p99.9 us", "max us"
    );
    for r in results {
        let verify = match r.verified {
            None => "-".to_string(),
            Some(true) => "ok".to_string(),
            Some(false) => format!("FAILED ({} bytes differ)", r.mismatched_bytes.unwrap_or(0)),
        };
        println!(
            "{:<10} {:>11} {:>8.3} {:>10.0} {:>11.4} {:>10.1} {:>10.1} {:>10.1} {:>10.1}  {}",
            r.op,
            format_size(r.bytes),
            r.throughput_gbps,
            r.iops,
            r.seconds,
            r.latency_us.p50,
            r.latency_us.p99,
            r.latency_us.p999,
            r.latency_us.max,
            verify
        );
    }
    for r in results {
        if let Some(f) = &r.faults {
            println!("faults during {}: {}", r.op, fault_summary(&f.stats));
        }
    }
}

/// Prints one JSON object per result, one per line.
pub fn print_json(results: &[BenchResult]) {
    for r in results {
        match serde_json::to_string(r) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("error: cannot encode a result as JSON: {e}"),
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
