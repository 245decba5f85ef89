//! The tensors workload's result: the JSON object (one per run) and the table.

use serde::Serialize;
use spillway_runtime::engine::StatsSnapshot;

use super::options::EngineSettings;
use crate::bench::layers::Taken;
use crate::select::{fault_summary, FaultReport};
use crate::size::format_size;

/// One timed phase.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// "offload" or "fetch".
    pub op: String,
    /// Logical tensor bytes the phase's calls named (duplicates counted each time).
    pub bytes: u64,
    /// Calls made (offloads or fetches).
    pub tensors: u64,
    /// Wall time.
    pub seconds: f64,
    /// Decimal gigabytes (1e9 bytes) of `bytes` per second.
    pub throughput_gbps: f64,
    /// Calls per second.
    pub tensors_per_s: f64,
}

impl Phase {
    /// A phase that moved `bytes` in `tensors` calls in `seconds`.
    pub fn new(op: &str, bytes: u64, tensors: u64, seconds: f64) -> Self {
        let seconds = seconds.max(1e-9);
        Phase {
            op: op.to_string(),
            bytes,
            tensors,
            seconds,
            throughput_gbps: bytes as f64 / seconds / 1e9,
            tensors_per_s: tensors as f64 / seconds,
        }
    }
}

/// One tensors run; `--json` prints exactly this, on one line.
#[derive(Clone, Debug, Serialize)]
pub struct TensorsResult {
    /// Always "tensors".
    pub workload: String,
    /// "uring" or "cufile".
    pub backend: String,
    /// "gpu" or "host".
    pub memory: String,
    /// The device, e.g. "NVIDIA H200 (GPU 0)" or "host memory".
    pub device: String,
    /// The storage file or device.
    pub path: String,
    /// The command line that produced this result.
    pub command: String,
    /// Distinct tensors.
    pub tensors: u64,
    /// Offload calls, duplicates included.
    pub offload_calls: u64,
    /// Of them, calls repeating a tensor offloaded before.
    pub duplicate_calls: u64,
    /// `--dup` as given.
    pub dup_fraction: f64,
    /// Smallest tensor size asked for.
    pub min_size: u64,
    /// Largest tensor size asked for.
    pub max_size: u64,
    /// Bytes of the distinct tensors.
    pub total_bytes: u64,
    /// Bytes each arena spans (512-byte alignment gaps included).
    pub arena_bytes: u64,
    /// Packing on.
    pub pack: bool,
    /// Dedup on.
    pub dedup: bool,
    /// The engine settings used.
    pub engine: EngineSettings,
    /// Storage the engine was given (bytes).
    pub storage_capacity: u64,
    /// The backend's requests in flight per thread.
    pub queue_depth: u32,
    /// The backend's threads.
    pub threads: usize,
    /// Whether O_DIRECT was in effect.
    pub direct_io: bool,
    /// Whether GPU data passed through host memory on its way.
    pub host_staging: bool,
    /// For cuFile: which path ran.
    pub gds_mode: Option<String>,
    /// Seed of the sizes, the duplicates and the data.
    pub seed: u64,
    /// The timed phases: offload, then fetch.
    pub phases: Vec<Phase>,
    /// Whether every fetched tensor matched what was offloaded.
    pub verified: bool,
    /// Bytes that differed.
    pub mismatched_bytes: u64,
    /// Tensors with at least one differing byte.
    pub mismatched_tensors: u64,
    /// The Chrome trace written, if asked.
    pub trace: Option<String>,
    /// Warnings and choices made for the user; the first ones name each value taken from
    /// the environment or the settings file ("staging_bytes=1GiB from SPILLWAY_STAGING_BYTES").
    pub notes: Vec<String>,
    /// The settings whose values came from the environment or the settings file instead of
    /// a flag or a default (empty when none did).
    pub from_env_or_file: Vec<Taken>,
    /// The engine's statistics at the end of the run.
    pub engine_stats: StatsSnapshot,
    /// With --faults: the plan and what was injected during the run; null without.
    pub faults: Option<FaultReport>,
    /// With --host-tier: what the host tier held and moved; null without.
    pub host_tier: Option<spillway_runtime::HostTierStats>,
}

/// Prints one JSON object on one line.
pub fn print_json(r: &TensorsResult) {
    match serde_json::to_string(r) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("error: cannot encode the result as JSON: {e}"),
    }
}

/// Prints the result as a table, with the run's facts above and the engine's counters below.
pub fn print_table(r: &TensorsResult) {
    let device = if r.memory == "gpu" {
        format!(" ({})", r.device)
    } else {
        String::new()
    };
    println!(
        "spillway bench --workload tensors: {} backend, {} memory{device}, {}",
        r.backend, r.memory, r.path
    );
    println!(
        "  {} tensors of {} to {} ({} in all), {} duplicate offload calls ({:.0}%), pack {}, dedup {}",
        r.tensors,
        format_size(r.min_size),
        format_size(r.max_size),
        format_size(r.total_bytes),
        r.duplicate_calls,
        r.dup_fraction * 100.0,
        on_off(r.pack),
        on_off(r.dedup)
    );
    let e = &r.engine;
    println!(
        "  staging {}, prefetch {}, pack extent {}, pack threshold {}, queue depth {}, threads {}, O_DIRECT {}, host staging {}{}",
        format_size(e.staging_bytes),
        format_size(e.prefetch_bytes),
        format_size(e.pack_extent_bytes),
        format_size(e.pack_threshold),
        r.queue_depth,
        r.threads,
        yes_no(r.direct_io),
        yes_no(r.host_staging),
        r.gds_mode
            .as_ref()
            .map(|m| format!(", cuFile mode {m}"))
            .unwrap_or_default()
    );
    for note in &r.notes {
        println!("  note: {note}");
    }
    println!();
    println!(
        "{:<10} {:>11} {:>8} {:>11} {:>10}  verify",
        "op", "bytes", "GB/s", "tensors/s", "seconds"
    );
    for (i, p) in r.phases.iter().enumerate() {
        let verify = if i + 1 < r.phases.len() {
            "-".to_string()
        } else if r.verified {
            "ok".to_string()
        } else {
            format!(
                "FAILED ({} bytes in {} tensors differ)",
                r.mismatched_bytes, r.mismatched_tensors
            )
        };
        println!(
            "{:<10} {:>11} {:>8.3} {:>11.0} {:>10.4}  {verify}",
            p.op,
            format_size(p.bytes),
            p.throughput_gbps,
            p.tensors_per_s,
            p.seconds
        );
    }
    let s = &r.engine_stats.counters;
    println!();
    println!(
        "engine: {} extents written ({}; {} packed, {} direct tensors), {} dedup hits",
        s.extents_written,
        format_size(s.bytes_written),
        s.packed_tensors,
        s.direct_tensors,
        s.dedup_hits
    );
    println!(
        "        {} extents and {} tensors alone prefetched, {} prefetch hits, {} demand reads, {} forwarded, fetches stalled {:.3} s, staging peak {}",
        s.prefetched_extents,
        s.prefetched_slots,
        s.prefetch_hits,
        s.demand_reads,
        s.forwarded_fetches,
        s.stall_ns as f64 / 1e9,
        format_size(s.staging_peak)
    );
    if r.engine.checksums {
        println!(
            "        checksums: {} read back and checked, {} reads failed their checksum",
            format_size(s.verified_bytes),
            s.checksum_errors
        );
    }
    if s.write_errors > 0 || s.read_errors > 0 || s.resident_tensors > 0 {
        println!(
            "        {} write errors, {} read errors, {} tensors kept in memory",
            s.write_errors, s.read_errors, s.resident_tensors
        );
    }
    if let Some(f) = &r.faults {
        println!("faults: {} ({})", fault_summary(&f.stats), f.plan);
    }
    if let Some(trace) = &r.trace {
        println!("        timeline: {trace}");
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
