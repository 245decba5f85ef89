//! The tensors workload's options: its own flags checked against each other, and the
//! engine's settings checked in the words of the flags that set them, every refusal naming
//! the flag to change.

use std::path::PathBuf;

use serde::Serialize;
use spillway_runtime::engine::EngineConfig;
use spillway_runtime::{Error, Result};

use crate::bench::settings::BenchSettings;
use crate::cli::BenchArgs;
use crate::size::format_size;

/// Most tensors one run offloads (the plan and the engine's tables grow with it).
pub const MAX_TENSORS: u64 = 10_000_000;
/// Most offload calls one run makes, duplicates included.
pub const MAX_CALLS: u64 = 20_000_000;

/// What one tensors run does.
#[derive(Clone, Debug)]
pub struct Options {
    /// Distinct tensors (storages) in the source arena.
    pub tensors: usize,
    /// Offload calls that repeat a tensor offloaded before.
    pub duplicates: usize,
    /// `--dup` as given.
    pub dup_fraction: f64,
    /// Smallest tensor, bytes.
    pub min_size: u64,
    /// Largest tensor, bytes.
    pub max_size: u64,
    /// Seed of the sizes, the order of duplicates and the data.
    pub seed: u64,
    /// The engine's settings.
    pub engine: EngineConfig,
    /// Where to write the Chrome trace, if asked.
    pub trace: Option<PathBuf>,
    /// Remarks for the report (flags that have no effect…).
    pub notes: Vec<String>,
}

/// The engine settings a run used, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct EngineSettings {
    /// Alignment of extents and of tensors inside packed extents (bytes).
    pub alignment: u64,
    /// Staging memory the engine owns (bytes).
    pub staging_bytes: u64,
    /// Of it, what prefetches may hold (bytes).
    pub prefetch_bytes: u64,
    /// Tensors smaller than this are packed (bytes).
    pub pack_threshold: u64,
    /// Size of a packed extent (bytes).
    pub pack_extent_bytes: u64,
    /// A partly filled packed extent is written after this long without offloads (µs).
    pub pack_flush_delay_us: u64,
    /// Unpacked writes in flight at once (bytes).
    pub direct_write_bytes: u64,
    /// Packing on.
    pub pack: bool,
    /// Dedup on.
    pub dedup: bool,
    /// Timeline recorded.
    pub timeline: bool,
    /// Reads checked against the CRC-32C written (`--verify`, the `checksums` setting).
    pub checksums: bool,
}

impl EngineSettings {
    /// The report's view of `c`.
    pub fn of(c: &EngineConfig) -> Self {
        EngineSettings {
            alignment: c.alignment,
            staging_bytes: c.staging_bytes,
            prefetch_bytes: c.prefetch_bytes,
            pack_threshold: c.pack_threshold,
            pack_extent_bytes: c.pack_extent_bytes,
            pack_flush_delay_us: c.pack_flush_delay.as_micros() as u64,
            direct_write_bytes: c.direct_write_bytes,
            pack: c.pack,
            dedup: c.dedup,
            timeline: c.timeline,
            checksums: c.checksums,
        }
    }
}

impl Options {
    /// Checks the tensors workload's own flags; the engine's settings are those of `bench`
    /// (resolved: a size left out takes the engine default, shrunk to fit a smaller
    /// `--staging`), with the timeline on for `--trace`.
    pub fn from_args(args: &BenchArgs, bench: &BenchSettings) -> Result<Options> {
        if args.tensors == 0 {
            return Err(Error::invalid(
                "--tensors 0: the tensors workload needs at least 1 tensor",
            ));
        }
        if args.tensors > MAX_TENSORS {
            return Err(Error::invalid(format!(
                "--tensors {} is more than this benchmark runs ({MAX_TENSORS}); lower --tensors",
                args.tensors
            )));
        }
        if !(0.0..1.0).contains(&args.dup) {
            return Err(Error::invalid(format!(
                "--dup {} is outside [0, 1): it is the fraction of offload calls that repeat an earlier tensor (e.g. 0.1)",
                args.dup
            )));
        }
        if args.min_size > args.max_size {
            return Err(Error::invalid(format!(
                "--min-size ({}) is larger than --max-size ({}); make the minimum smaller or the maximum larger",
                format_size(args.min_size),
                format_size(args.max_size)
            )));
        }
        // Far beyond any machine's memory (checked exactly later), and keeps the arena's
        // arithmetic well inside u64.
        if args.tensors as u128 * (args.max_size as u128 + 4096) > 1 << 60 {
            return Err(Error::invalid(format!(
                "--tensors {} of up to --max-size {} cannot fit in memory; lower --tensors or --max-size",
                args.tensors,
                format_size(args.max_size)
            )));
        }
        let duplicates = duplicate_calls(args.tensors, args.dup);
        let calls = args.tensors.saturating_add(duplicates);
        if calls > MAX_CALLS {
            return Err(Error::invalid(format!(
                "--tensors {} with --dup {} makes {} offload calls, more than this benchmark runs ({MAX_CALLS}); lower --tensors or --dup",
                args.tensors,
                args.dup,
                calls
            )));
        }
        let notes = no_effect_notes(args, bench);
        let engine = EngineConfig {
            timeline: args.trace.is_some() || bench.resolved.engine.timeline,
            ..bench.resolved.engine.clone()
        };
        Ok(Options {
            tensors: args.tensors as usize,
            duplicates: duplicates as usize,
            dup_fraction: args.dup,
            min_size: args.min_size,
            max_size: args.max_size,
            seed: args.seed,
            engine,
            trace: args.trace.clone(),
            notes,
        })
    }

    /// Offload calls in all: every tensor once, plus the duplicates.
    pub fn calls(&self) -> usize {
        self.tensors + self.duplicates
    }
}

/// Notes for packing flags given while packing is off (by --no-pack, or by the `pack`
/// setting from the environment or the settings file).
fn no_effect_notes(args: &BenchArgs, bench: &BenchSettings) -> Vec<String> {
    if bench.resolved.engine.pack {
        return Vec::new();
    }
    let off = if args.given.iter().any(|g| g == "no_pack") {
        "--no-pack".to_string()
    } else {
        let taken = bench.layers.taken.iter().find(|t| t.setting == "pack");
        taken.map_or_else(|| "packing off".to_string(), ToString::to_string)
    };
    [
        ("pack_extent", "--pack-extent"),
        ("pack_threshold", "--pack-threshold"),
    ]
    .into_iter()
    .filter(|(id, _)| args.given.iter().any(|g| g == id))
    .map(|(_, flag)| format!("{flag} has no effect with {off}"))
    .collect()
}

/// Duplicate calls so that they are `dup` of all calls: `d / (tensors + d) = dup`.
fn duplicate_calls(tensors: u64, dup: f64) -> u64 {
    // A float-to-integer `as` saturates: a huge count stays huge and is refused by the caller.
    (tensors as f64 * dup / (1.0 - dup)).round() as u64
}

/// Refuses combinations of the engine's settings (the sizes left unset already fitted to
/// the staging memory) that the engine cannot run with, in the words of the flags that set
/// them; the settings' own check ([`crate::settings::Settings::resolve`]) refuses the rest.
pub(crate) fn check_engine(cfg: &EngineConfig) -> Result<()> {
    let size = format_size;
    let (staging, pack) = (cfg.staging_bytes, cfg.pack);
    if staging < 2 * cfg.alignment {
        return Err(Error::invalid(format!(
            "--staging {} is too small: the engine needs at least {} (two {} alignment units)",
            size(staging),
            size(2 * cfg.alignment),
            size(cfg.alignment)
        )));
    }
    if cfg.prefetch_bytes > staging {
        return Err(Error::invalid(format!(
            "--prefetch ({}) exceeds --staging ({}): prefetched extents live in the staging memory; lower --prefetch or raise --staging",
            size(cfg.prefetch_bytes),
            size(staging)
        )));
    }
    if pack && cfg.pack_extent_bytes > staging / 2 {
        return Err(Error::invalid(format!(
            "--pack-extent ({}) must be at most half of --staging ({}), so that packing and writing overlap; lower --pack-extent or raise --staging",
            size(cfg.pack_extent_bytes),
            size(staging)
        )));
    }
    if pack && cfg.pack_threshold > cfg.pack_extent_bytes {
        return Err(Error::invalid(format!(
            "--pack-threshold ({}) exceeds --pack-extent ({}): a packed tensor must fit in a packed extent; lower --pack-threshold or raise --pack-extent",
            size(cfg.pack_threshold),
            size(cfg.pack_extent_bytes)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_the_given_fraction_of_all_calls() {
        assert_eq!(duplicate_calls(20_000, 0.0), 0);
        assert_eq!(duplicate_calls(900, 0.1), 100);
        assert_eq!(duplicate_calls(300, 0.5), 300);
        assert!(duplicate_calls(10, 0.999_999_999_999) > 1_000_000);
    }
}
