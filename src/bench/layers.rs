//! `spillway bench` on the settings layers the library uses (see `docs/settings.md`): a flag
//! given on the command line is the argument layer and wins; a flag left out takes its
//! setting's value from the `SPILLWAY_*` environment variables, then from the TOML file named
//! by `SPILLWAY_CONFIG`, and only then its own default. Settings the bench has no flag for
//! (`alignment`, `pack_flush_delay_ms`, …) reach the tensors workload's engine the same way.
//!
//! [`apply`] writes the values the layers give into the [`BenchArgs`] fields of the flags
//! left out, so the rest of the bench reads one set of fields, and records each value taken
//! ([`Taken`]): reports list them, so a result is never silently shaped by the environment.

use std::fmt;

use serde::Serialize;
use spillway_runtime::engine::EngineConfig;
use spillway_runtime::{Error, Result};

use crate::cli::{BackendChoice, BenchArgs, Workload};
use crate::rank::{self, LocalRank};
use crate::settings::{self, Resolved, Settings, Source, Value};

/// One setting's value taken from the environment or the settings file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Taken {
    /// The setting's name, as in `docs/settings.md`.
    pub setting: &'static str,
    /// Its value, as text ("32", "1MiB", "host").
    pub value: String,
    /// Where it came from: the environment variable, or "file PATH".
    pub source: String,
}

impl fmt::Display for Taken {
    /// "queue_depth=32 from SPILLWAY_QUEUE_DEPTH".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={} from {}", self.setting, self.value, self.source)
    }
}

/// What the layers under the command line (environment, settings file, defaults) gave a
/// bench run, beside the [`BenchArgs`] fields they filled in.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    /// The engine configuration of those layers: the base the tensors workload applies its
    /// flags to, and where the engine settings without a flag come from.
    pub engine: EngineConfig,
    /// The settings whose values were taken from the environment or the file: those the
    /// bench maps (`MAPPED`) in its order, then the engine's others in the table's.
    pub taken: Vec<Taken>,
    /// Choices made from them (this local rank's storage paths, from `rank_paths`).
    pub notes: Vec<String>,
}

impl Layers {
    /// The report's notes about the layers: each value taken, then the choices made.
    pub fn report_notes(&self) -> impl Iterator<Item = String> + '_ {
        self.taken
            .iter()
            .map(Taken::to_string)
            .chain(self.notes.iter().cloned())
    }

    /// `e`, saying which values came from outside the command line when any did: a refusal
    /// that names a flag (or a failure to use a device or backend) may be about a value the
    /// flag never gave. Errors without a message of their own are returned as they are.
    pub fn annotate(&self, e: Error) -> Error {
        if self.taken.is_empty() {
            return e;
        }
        let taken: Vec<String> = self.taken.iter().map(Taken::to_string).collect();
        let add = |text: String| format!("{text} (set outside the command line: {})", taken.join(", "));
        match e {
            Error::InvalidArgument(msg) => Error::InvalidArgument(add(msg)),
            Error::Device(msg) => Error::Device(add(msg)),
            Error::Unavailable { what, reason } => Error::Unavailable {
                what,
                reason: add(reason),
            },
            Error::Target { path, reason } => Error::Target {
                path,
                reason: add(reason),
            },
            Error::Io { context, source } => Error::Io {
                context: add(context),
                source,
            },
            other => other,
        }
    }
}

/// A setting the bench reads, and the flags that stand for it.
struct Mapped {
    /// The setting's name in the settings table.
    setting: &'static str,
    /// Clap ids of its flags: when any of them is given, the setting is not read.
    flags: &'static [&'static str],
    /// Whether only the tensors workload reads it.
    tensors_only: bool,
    /// Writes the setting's value into the flags' fields (nothing for the engine settings
    /// that have no flag: they reach the engine through [`Layers::engine`]).
    take: fn(&mut BenchArgs, &Resolved),
}

/// The settings the bench has flags for, and those outside the engine's (device, backend,
/// storage layout). Every other setting but `rank_paths` (which picks paths: see
/// [`rank_paths`]) is one of the engine's, without a flag: the tensors workload reads it
/// through [`Layers::engine`] (`timeline` is also turned on by `--trace`).
const MAPPED: &[Mapped] = &[
    Mapped {
        // --mem and --gpu together stand for the device: either one given, the command
        // line says where the data lives and the setting is not read.
        setting: "device",
        flags: &["mem", "gpu"],
        tensors_only: false,
        take: |a, r| (a.mem, a.gpu) = (r.choices.mem, r.choices.gpu),
    },
    Mapped {
        setting: "backend",
        flags: &["backend"],
        tensors_only: false,
        take: |a, r| a.backend = r.choices.backend,
    },
    Mapped {
        setting: "queue_depth",
        flags: &["qd"],
        tensors_only: false,
        take: |a, r| a.qd = r.choices.queue_depth,
    },
    Mapped {
        setting: "threads",
        flags: &["threads"],
        tensors_only: false,
        take: |a, r| a.threads = r.choices.threads,
    },
    Mapped {
        setting: "pinned_bytes",
        flags: &["pinned"],
        tensors_only: false,
        take: |a, r| a.pinned = r.choices.pinned_bytes,
    },
    Mapped {
        setting: "stripe_bytes",
        flags: &["stripe"],
        tensors_only: false,
        take: |a, r| a.stripe = r.stripe_bytes,
    },
    Mapped {
        setting: "spread_files",
        flags: &["spread"],
        tensors_only: false,
        take: |a, r| a.spread = r.spread_files,
    },
    Mapped {
        setting: "stripe_weights",
        flags: &["stripe_weights"],
        tensors_only: false,
        take: |a, r| a.stripe_weights = r.stripe_weights.clone(),
    },
    Mapped {
        setting: "faults",
        flags: &["faults"],
        tensors_only: false,
        take: |a, r| a.faults = r.faults.clone(),
    },
    Mapped {
        setting: "host_tier",
        flags: &["host_tier"],
        tensors_only: true,
        take: |a, r| a.host_tier = Some(r.host_tier),
    },
    Mapped {
        setting: "staging_bytes",
        flags: &["staging"],
        tensors_only: true,
        take: |a, r| a.staging = Some(r.engine.staging_bytes),
    },
    Mapped {
        setting: "prefetch_bytes",
        flags: &["prefetch"],
        tensors_only: true,
        take: |a, r| a.prefetch = Some(r.engine.prefetch_bytes),
    },
    Mapped {
        setting: "pack_extent_bytes",
        flags: &["pack_extent"],
        tensors_only: true,
        take: |a, r| a.pack_extent = Some(r.engine.pack_extent_bytes),
    },
    Mapped {
        setting: "pack_threshold",
        flags: &["pack_threshold"],
        tensors_only: true,
        take: |a, r| a.pack_threshold = Some(r.engine.pack_threshold),
    },
    Mapped {
        setting: "pack",
        flags: &["no_pack"],
        tensors_only: true,
        take: |a, r| a.no_pack = !r.engine.pack,
    },
    Mapped {
        setting: "dedup",
        flags: &["no_dedup"],
        tensors_only: true,
        take: |a, r| a.no_dedup = !r.engine.dedup,
    },
    Mapped {
        // For the tensors workload, --verify is the engine's checksums setting.
        setting: "checksums",
        flags: &["verify"],
        tensors_only: true,
        take: |a, r| a.verify = r.engine.checksums,
    },
];

/// Whether `name` is an engine setting the bench has no flag for (see [`MAPPED`]).
fn is_engine_only(name: &str) -> bool {
    name != "rank_paths" && !MAPPED.iter().any(|m| m.setting == name)
}

/// Applies the settings layers of this process (its `SPILLWAY_*` variables and the file
/// named by `SPILLWAY_CONFIG`) to `args`: see [`apply_layers`]. A value that does not fit
/// is refused with a message naming the setting and where the value came from.
pub fn apply(args: &mut BenchArgs) -> Result<()> {
    let settings = Settings::load()?;
    apply_layers(args, &settings, rank::detect_from_env)
}

/// Applies `settings` to `args`: each setting the bench reads whose flags are not in
/// [`BenchArgs::given`] and whose value comes from the environment or the file is written
/// into the flags' fields and recorded in [`BenchArgs::layers`]. Settings only the other
/// workload reads are left alone. Without `--path` (and `--pci`), `rank_paths` gives this
/// local rank's paths (`local_rank` is asked only then). Callers that build [`BenchArgs`]
/// themselves must list their explicit flags in `given`, or the layers override them.
pub fn apply_layers(
    args: &mut BenchArgs,
    settings: &Settings,
    local_rank: impl FnOnce() -> Result<Option<LocalRank>>,
) -> Result<()> {
    let values = typed(settings)?;
    let mut layers = Layers {
        engine: values.engine.clone(),
        ..Layers::default()
    };
    for mapped in MAPPED {
        let read = args.workload == Workload::Tensors || !mapped.tensors_only;
        if !read || mapped.flags.iter().any(|id| given(args, id)) {
            continue;
        }
        if let Some(taken) = taken(settings, mapped.setting) {
            (mapped.take)(args, &values);
            layers.taken.push(taken);
        }
    }
    if args.workload == Workload::Tensors {
        // The engine's settings without a flag: already in `layers.engine`; reported.
        for name in settings::names().filter(|&name| is_engine_only(name)) {
            layers.taken.extend(taken(settings, name));
        }
    }
    let (from_rank_paths, notes) = rank_storage(args, &values, local_rank)?;
    if from_rank_paths {
        layers.taken.extend(taken(settings, "rank_paths"));
    }
    layers.notes.extend(notes);
    layers.notes.extend(spread(args));
    args.layers = layers;
    Ok(())
}

/// One directory `--path` (not a controller) spread over `--spread` anonymous files in it
/// (by default as its filesystem needs, [`crate::open::spread_files`]): the paths become
/// that many copies of it, striped. Returns the note saying so.
fn spread(args: &mut BenchArgs) -> Option<String> {
    let [dir] = args.path.as_slice() else { return None };
    if args.pci.is_some() || args.backend == BackendChoice::Spdk || !dir.is_dir() {
        return None;
    }
    let (files, why) = crate::open::spread_files(dir, args.spread);
    if files <= 1 {
        return None;
    }
    let note = format!(
        "{} spread over {files} anonymous files striped in {} units ({why})",
        dir.display(),
        crate::size::format_size(args.stripe)
    );
    args.path = vec![dir.clone(); files as usize];
    Some(note)
}

/// A bench flag that stands for a setting, and its value as the setting takes it (`None`
/// when the flag holds none).
struct FlagSetting {
    /// The flag's clap id (its name without the dashes, `_` for `-`).
    flag: &'static str,
    /// The setting it stands for.
    setting: &'static str,
    /// Its value.
    value: fn(&BenchArgs) -> Option<Value>,
}

/// A whole number as a setting's value (text past `i64::MAX`).
fn whole(n: u64) -> Value {
    i64::try_from(n).map_or_else(|_| Value::Str(n.to_string()), Value::Int)
}

/// The flags whose values the settings table checks: the same bounds as every other layer.
const FLAG_SETTINGS: &[FlagSetting] = &[
    FlagSetting {
        flag: "qd",
        setting: "queue_depth",
        value: |a| Some(whole(a.qd.into())),
    },
    FlagSetting {
        flag: "threads",
        setting: "threads",
        value: |a| Some(whole(a.threads as u64)),
    },
    FlagSetting {
        flag: "pinned",
        setting: "pinned_bytes",
        value: |a| a.pinned.map(whole),
    },
    FlagSetting {
        flag: "spread",
        setting: "spread_files",
        value: |a| Some(whole(a.spread.into())),
    },
    FlagSetting {
        flag: "stripe",
        setting: "stripe_bytes",
        value: |a| Some(whole(a.stripe)),
    },
    FlagSetting {
        flag: "staging",
        setting: "staging_bytes",
        value: |a| a.staging.map(whole),
    },
    FlagSetting {
        flag: "prefetch",
        setting: "prefetch_bytes",
        value: |a| a.prefetch.map(whole),
    },
    FlagSetting {
        flag: "pack_extent",
        setting: "pack_extent_bytes",
        value: |a| a.pack_extent.map(whole),
    },
    FlagSetting {
        flag: "pack_threshold",
        setting: "pack_threshold",
        value: |a| a.pack_threshold.map(whole),
    },
];

/// Checks the values of the flags that stand for settings (`--qd`, `--threads`, `--pinned`,
/// …) against the settings table, as a value from any other layer is: the caps on
/// resources (`threads` at most 256, `queue_depth` at most 4096, …) hold on the command
/// line too. The refusal names the flag and its setting.
pub fn check_flags(args: &BenchArgs) -> Result<()> {
    for f in FLAG_SETTINGS {
        let Some(value) = (f.value)(args) else { continue };
        let Some((_, setting)) = settings::find(f.setting) else {
            continue;
        };
        setting.set(&mut Resolved::default(), &value).map_err(|why| {
            Error::invalid(format!(
                "--{} {value}: {why}; --{} is the setting {}, which takes {}",
                f.flag.replace('_', "-"),
                f.flag.replace('_', "-"),
                f.setting,
                setting.kind.accepts()
            ))
        })?;
    }
    Ok(())
}

/// Whether the flag with clap id `id` was given on the command line.
fn given(args: &BenchArgs, id: &str) -> bool {
    args.given.iter().any(|g| g == id)
}

/// Every setting's value in the layers, parsed, but not yet checked together: the bench
/// checks its own combination once its flags are applied (the library's
/// [`Settings::resolve`] would refuse what a flag may still change).
fn typed(settings: &Settings) -> Result<Resolved> {
    let mut values = Resolved::default();
    for (setting, value, source) in settings.iter() {
        if *source == Source::Default {
            continue;
        }
        setting.set(&mut values, &value).map_err(|why| {
            Error::invalid(format!(
                "{}={value} from {source}: {why}; {} takes {}",
                setting.name,
                setting.name,
                setting.kind.accepts()
            ))
        })?;
    }
    Ok(values)
}

/// The value of `name` when the environment or the file gave it; `None` at its default.
fn taken(settings: &Settings, name: &'static str) -> Option<Taken> {
    let source = match settings.source(name)? {
        Source::Env(var) => var.clone(),
        Source::File(path) => format!("file {}", path.display()),
        Source::Default | Source::Argument => return None,
    };
    let (_, setting) = settings::find(name)?;
    let value = match settings.value(name)? {
        Value::Str(text) => text,
        other => setting.kind.show(&other),
    };
    Some(Taken {
        setting: name,
        value,
        source,
    })
}

/// Under a multi-process launcher, this local rank's storage and the notes saying so, as
/// the library chooses it: without `--path`, the rank's paths from `rank_paths` (true is
/// returned then); with `--path`, file names made the rank's own (`spill.dat` →
/// `spill.rank1.dat`; [`rank::make_own`]). A rank missing from a non-empty `rank_paths` is
/// refused. Nothing changes for `--pci` (a controller is one process's anyway), or without
/// `--path` and `rank_paths` (the anonymous file in `$TMPDIR` is the process's own).
fn rank_storage(
    args: &mut BenchArgs,
    values: &Resolved,
    local_rank: impl FnOnce() -> Result<Option<LocalRank>>,
) -> Result<(bool, Vec<String>)> {
    let from_list = args.path.is_empty() && !values.rank_paths.is_empty();
    if args.pci.is_some() || (args.path.is_empty() && !from_list) {
        return Ok((false, Vec::new()));
    }
    let Some(rank) = local_rank()? else {
        return Ok((false, Vec::new()));
    };
    if from_list {
        let (paths, note) = values.rank_paths.choose(&[], Some(rank))?;
        args.path = paths;
        return Ok((true, note.into_iter().collect()));
    }
    Ok((false, rank::make_own(&mut args.path, rank)?))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cli::MemChoice;

    /// `spillway bench ARGS`, parsed as [`crate::cli::parse`] does (without the layers).
    fn bench(args: &[&str]) -> BenchArgs {
        crate::cli::bench_args(args)
    }

    fn env(vars: &[(&str, &str)]) -> Settings {
        Settings::load_from(vars.iter().copied()).expect("valid settings")
    }

    fn no_rank() -> Result<Option<LocalRank>> {
        Ok(None)
    }

    #[test]
    fn a_flag_left_out_takes_the_environment_s_value_and_says_so() {
        let mut args = bench(&[]);
        let settings = env(&[
            ("SPILLWAY_QUEUE_DEPTH", "32"),
            ("SPILLWAY_STRIPE_BYTES", "256KiB"),
        ]);
        apply_layers(&mut args, &settings, no_rank).unwrap();
        assert_eq!((args.qd, args.stripe), (32, 256 << 10));
        let notes: Vec<String> = args.layers.report_notes().collect();
        assert_eq!(
            notes,
            [
                "queue_depth=32 from SPILLWAY_QUEUE_DEPTH",
                "stripe_bytes=256KiB from SPILLWAY_STRIPE_BYTES"
            ]
        );
    }

    #[test]
    fn a_flag_given_wins_and_the_device_flags_stand_together() {
        let mut args = bench(&["--qd", "4", "--gpu", "1"]);
        let settings = env(&[("SPILLWAY_QUEUE_DEPTH", "32"), ("SPILLWAY_DEVICE", "host")]);
        apply_layers(&mut args, &settings, no_rank).unwrap();
        assert_eq!((args.qd, args.mem, args.gpu), (4, MemChoice::Auto, Some(1)));
        assert!(args.layers.taken.is_empty(), "{:?}", args.layers.taken);

        let mut args = bench(&[]);
        apply_layers(&mut args, &env(&[("SPILLWAY_DEVICE", "cuda:2")]), no_rank).unwrap();
        assert_eq!((args.mem, args.gpu), (MemChoice::Gpu, Some(2)));
    }

    #[test]
    fn engine_settings_reach_only_the_tensors_workload() {
        let vars = [
            ("SPILLWAY_STAGING_BYTES", "64MiB"),
            ("SPILLWAY_PACK", "false"),
            ("SPILLWAY_DIRECT_WRITE_BYTES", "8MiB"),
        ];
        let mut seq = bench(&[]);
        apply_layers(&mut seq, &env(&vars), no_rank).unwrap();
        assert!(seq.layers.taken.is_empty() && seq.staging.is_none() && !seq.no_pack);

        let mut tensors = bench(&["--workload", "tensors", "--staging", "32MiB"]);
        apply_layers(&mut tensors, &env(&vars), no_rank).unwrap();
        assert_eq!(tensors.staging, Some(32 << 20), "the flag wins");
        assert!(tensors.no_pack);
        assert_eq!(tensors.layers.engine.direct_write_bytes, 8 << 20);
        let names: Vec<&str> = tensors.layers.taken.iter().map(|t| t.setting).collect();
        assert_eq!(names, ["pack", "direct_write_bytes"]);
    }

    #[test]
    fn rank_paths_give_the_rank_s_paths_unless_a_path_is_given() {
        let settings = env(&[("SPILLWAY_RANK_PATHS", "0=/nvme0;1=/nvme1,/nvme2")]);
        let rank = |rank| {
            move || {
                Ok(Some(LocalRank {
                    rank,
                    source: "LOCAL_RANK",
                }))
            }
        };
        let mut args = bench(&[]);
        apply_layers(&mut args, &settings, rank(1)).unwrap();
        assert_eq!(args.path, [PathBuf::from("/nvme1"), PathBuf::from("/nvme2")]);
        assert_eq!(args.layers.taken[0].setting, "rank_paths");
        assert!(args.layers.notes[0].contains("local rank 1 (LOCAL_RANK)"));

        // A path given on the command line wins; a file name is made the rank's own.
        let mut args = bench(&["--path", "/given/spill.dat", "--path", "/"]);
        apply_layers(&mut args, &settings, rank(1)).unwrap();
        assert_eq!(
            args.path,
            [PathBuf::from("/given/spill.rank1.dat"), PathBuf::from("/")]
        );
        assert!(args.layers.taken.is_empty());
        assert!(args.layers.notes[0].contains("spill.rank1.dat is this rank's own"));
        let mut args = bench(&["--path", "/given/spill.dat"]);
        apply_layers(&mut args, &Settings::default(), no_rank).unwrap();
        assert_eq!(args.path, [PathBuf::from("/given/spill.dat")]);

        let mut args = bench(&[]);
        apply_layers(&mut args, &settings, no_rank).unwrap();
        assert!(args.path.is_empty() && args.layers.taken.is_empty());

        let e = apply_layers(&mut bench(&[]), &settings, rank(5)).unwrap_err();
        assert!(e.to_string().contains("no entry for local rank 5"), "{e}");
    }

    #[test]
    fn the_flags_defaults_are_the_settings_defaults() {
        // On a clean environment the bench runs as documented, and as the library would.
        let args = bench(&[]);
        let d = Resolved::default();
        assert_eq!(
            (args.backend, args.mem, args.gpu),
            (d.choices.backend, d.choices.mem, d.choices.gpu)
        );
        assert_eq!(
            (args.qd, args.threads),
            (d.choices.queue_depth, d.choices.threads)
        );
        assert_eq!(args.pinned, d.choices.pinned_bytes);
        assert_eq!(
            (args.stripe, &args.stripe_weights),
            (d.stripe_bytes, &d.stripe_weights)
        );
        assert_eq!((!args.no_pack, !args.no_dedup), (d.engine.pack, d.engine.dedup));
        assert_eq!(args.faults, d.faults);
    }

    #[test]
    fn faults_come_from_the_flag_else_the_environment() {
        let settings = env(&[("SPILLWAY_FAULTS", "write_error=0.5,seed=3")]);
        let mut args = bench(&[]);
        apply_layers(&mut args, &settings, no_rank).unwrap();
        assert_eq!((args.faults.write_error, args.faults.seed), (0.5, 3));
        let notes: Vec<String> = args.layers.report_notes().collect();
        assert_eq!(notes, ["faults=write_error=0.5,seed=3 from SPILLWAY_FAULTS"]);

        let mut args = bench(&["--faults", "short=0.25", "--workload", "tensors"]);
        apply_layers(&mut args, &settings, no_rank).unwrap();
        assert_eq!(
            (args.faults.short, args.faults.write_error),
            (0.25, 0.0),
            "the flag wins"
        );
        assert!(args.layers.taken.is_empty());

        let mut args = bench(&["--faults", "off"]);
        apply_layers(&mut args, &settings, no_rank).unwrap();
        assert!(args.faults.is_none(), "off turns off what the environment set");
    }

    #[test]
    fn every_setting_without_a_flag_is_the_engines() {
        // The settings the bench maps to nothing reach the tensors workload through the
        // engine configuration: each one set to another value changes the engine's
        // settings and nothing else. (A setting of another part needs a flag in MAPPED.)
        let before = typed(&Settings::default()).unwrap();
        let unmapped: Vec<&str> = settings::names().filter(|&n| is_engine_only(n)).collect();
        assert!(
            unmapped.contains(&"io_retries") && !unmapped.contains(&"threads"),
            "{unmapped:?}"
        );
        for name in unmapped {
            let mut s = Settings::default();
            let other = match s.value(name).unwrap() {
                Value::Int(0) => Value::Int(4096),
                Value::Int(n) => Value::Int(n * 2),
                Value::Bool(b) => Value::Bool(!b),
                Value::Float(f) => Value::Float(f + 1.0),
                Value::Str(text) => {
                    panic!("{name}={text:?}: not an engine setting? give it a flag in MAPPED")
                }
            };
            s.set(name, other).unwrap();
            let after = typed(&s).unwrap();
            assert_ne!(
                after.engine, before.engine,
                "{name} does not change the engine's settings"
            );
            let mut rest = after.clone();
            rest.engine = before.engine.clone();
            assert_eq!(
                format!("{rest:?}"),
                format!("{before:?}"),
                "{name} changes more than the engine"
            );
        }
    }

    #[test]
    fn an_engine_setting_without_a_flag_from_the_environment_is_reported() {
        let settings = env(&[("SPILLWAY_IO_SPLIT_BYTES", "8MiB")]);
        let mut args = bench(&["--workload", "tensors"]);
        apply_layers(&mut args, &settings, no_rank).unwrap();
        assert_eq!(args.layers.engine.io_split_bytes, 8 << 20);
        let notes: Vec<String> = args.layers.report_notes().collect();
        assert_eq!(notes, ["io_split_bytes=8MiB from SPILLWAY_IO_SPLIT_BYTES"]);
        // The seq workload has no engine: nothing taken.
        let mut args = bench(&[]);
        apply_layers(&mut args, &settings, no_rank).unwrap();
        assert!(args.layers.taken.is_empty());
    }

    #[test]
    fn refusals_name_the_values_from_outside_the_command_line() {
        let mut args = bench(&[]);
        apply_layers(&mut args, &env(&[("SPILLWAY_THREADS", "3")]), no_rank).unwrap();
        let e = args
            .layers
            .annotate(Error::invalid("--threads 3 is out of range"));
        assert!(e.to_string().contains("threads=3 from SPILLWAY_THREADS"), "{e}");
    }
}
