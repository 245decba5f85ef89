//! The `spillway bench` flags that stand for settings ([`FLAGS`]), which settings each
//! workload reads, and the flags given on the command line set as the settings' argument
//! layer ([`apply`]).

use spillway_runtime::{Error, Result};

use crate::cli::{BenchArgs, Workload};
use crate::settings::{self, Resolved, Settings, Source, Value};

/// How a flag's value becomes its setting's.
enum Put {
    /// As a value the settings table parses and bounds, as it does every other layer's:
    /// the caps on resources (`threads` at most 256, `queue_depth` at most 4096, …) hold
    /// on the command line too, and a refusal names the flag and its setting.
    Checked(fn(&BenchArgs) -> Value),
    /// Already of the setting's type (clap parsed it so), written as it is.
    Typed(fn(&BenchArgs, &mut Resolved)),
}

/// A setting the bench has flags for.
pub(super) struct FlagSetting {
    /// The setting's name in the settings table.
    pub setting: &'static str,
    /// Clap ids of its flags: when any of them is given, the command line sets it.
    flags: &'static [&'static str],
    /// Whether only the tensors workload reads it.
    tensors_only: bool,
    /// How the flags' value becomes the setting's.
    put: Put,
}

/// A whole number as a setting's value (text past `i64::MAX`).
fn whole(n: u64) -> Value {
    i64::try_from(n).map_or_else(|_| Value::Str(n.to_string()), Value::Int)
}

/// A size flag left out as `None` (never, once given).
fn size(n: Option<u64>) -> Value {
    n.map_or_else(|| Value::from("auto"), whole)
}

/// The settings the bench has flags for, in the order reports list the values taken from
/// outside the command line. Every other setting but `rank_paths` (which picks paths) is
/// one of the engine's, without a flag: only the tensors workload reads it (`timeline` is
/// also turned on by `--trace`).
pub(super) const FLAGS: &[FlagSetting] = &[
    FlagSetting {
        // --mem and --gpu together stand for the device: either one given, the command
        // line says where the data lives (both as given: `--mem host --gpu 1` is refused
        // by name when the device is set up).
        setting: "device",
        flags: &["mem", "gpu"],
        tensors_only: false,
        put: Put::Typed(|a, r| (r.choices.mem, r.choices.gpu) = (a.mem, a.gpu)),
    },
    FlagSetting {
        setting: "backend",
        flags: &["backend"],
        tensors_only: false,
        put: Put::Typed(|a, r| r.choices.backend = a.backend),
    },
    FlagSetting {
        setting: "queue_depth",
        flags: &["qd"],
        tensors_only: false,
        put: Put::Checked(|a| whole(a.qd.into())),
    },
    FlagSetting {
        setting: "threads",
        flags: &["threads"],
        tensors_only: false,
        put: Put::Checked(|a| whole(a.threads as u64)),
    },
    FlagSetting {
        setting: "pinned_bytes",
        flags: &["pinned"],
        tensors_only: false,
        put: Put::Checked(|a| size(a.pinned)),
    },
    FlagSetting {
        setting: "stripe_bytes",
        flags: &["stripe"],
        tensors_only: false,
        put: Put::Checked(|a| whole(a.stripe)),
    },
    FlagSetting {
        setting: "spread_files",
        flags: &["spread"],
        tensors_only: false,
        put: Put::Checked(|a| whole(a.spread.into())),
    },
    FlagSetting {
        setting: "stripe_weights",
        flags: &["stripe_weights"],
        tensors_only: false,
        put: Put::Typed(|a, r| r.stripe_weights = a.stripe_weights.clone()),
    },
    FlagSetting {
        setting: "faults",
        flags: &["faults"],
        tensors_only: false,
        put: Put::Typed(|a, r| r.faults = a.faults.clone()),
    },
    FlagSetting {
        setting: "host_tier",
        flags: &["host_tier"],
        tensors_only: true,
        put: Put::Typed(|a, r| r.host_tier = a.host_tier.unwrap_or(0)),
    },
    FlagSetting {
        setting: "staging_bytes",
        flags: &["staging"],
        tensors_only: true,
        put: Put::Checked(|a| size(a.staging)),
    },
    FlagSetting {
        setting: "prefetch_bytes",
        flags: &["prefetch"],
        tensors_only: true,
        put: Put::Checked(|a| size(a.prefetch)),
    },
    FlagSetting {
        setting: "pack_extent_bytes",
        flags: &["pack_extent"],
        tensors_only: true,
        put: Put::Checked(|a| size(a.pack_extent)),
    },
    FlagSetting {
        setting: "pack_threshold",
        flags: &["pack_threshold"],
        tensors_only: true,
        put: Put::Checked(|a| size(a.pack_threshold)),
    },
    FlagSetting {
        setting: "pack",
        flags: &["no_pack"],
        tensors_only: true,
        put: Put::Typed(|a, r| r.engine.pack = !a.no_pack),
    },
    FlagSetting {
        setting: "dedup",
        flags: &["no_dedup"],
        tensors_only: true,
        put: Put::Typed(|a, r| r.engine.dedup = !a.no_dedup),
    },
    FlagSetting {
        // For the tensors workload, --verify is the engine's checksums setting.
        setting: "checksums",
        flags: &["verify"],
        tensors_only: true,
        put: Put::Typed(|a, r| r.engine.checksums = a.verify),
    },
];

/// Whether `name` is an engine setting the bench has no flag for (see [`FLAGS`]).
pub(super) fn is_engine_only(name: &str) -> bool {
    name != "rank_paths" && !FLAGS.iter().any(|f| f.setting == name)
}

/// Whether `workload` reads the setting `name`: the tensors workload reads every setting;
/// the seq workload, which has no engine, those of its device, backend and storage.
pub(super) fn reads(workload: Workload, name: &str) -> bool {
    workload == Workload::Tensors
        || name == "rank_paths"
        || FLAGS.iter().any(|f| f.setting == name && !f.tensors_only)
}

impl FlagSetting {
    /// Whether any of its flags was given on the command line.
    pub(super) fn given(&self, args: &BenchArgs) -> bool {
        self.flags.iter().any(|id| given(args, id))
    }

    /// Whether `workload` reads it.
    pub(super) fn read_by(&self, workload: Workload) -> bool {
        workload == Workload::Tensors || !self.tensors_only
    }
}

/// Sets, as the argument layer of `settings`, each setting the workload of `args` reads
/// whose flags were given on the command line ([`BenchArgs::given`]); the others keep the
/// value of the layers below. A flag's value the settings table refuses is refused naming
/// the flag and its setting.
pub(super) fn apply(settings: &mut Settings, args: &BenchArgs) -> Result<()> {
    for f in FLAGS.iter().filter(|f| f.read_by(args.workload) && f.given(args)) {
        match f.put {
            Put::Checked(value) => {
                let value = value(args);
                check(f, &value)?;
                settings.set_from(f.setting, value, Source::Argument)?;
            }
            Put::Typed(put) => settings.set_typed(f.setting, Source::Argument, |r| put(args, r))?,
        }
    }
    Ok(())
}

/// Refuses `value` of the flag of `f` when its setting would: "--qd 5000: 5000 is too
/// large…; --qd is the setting queue_depth, which takes a positive whole number".
fn check(f: &FlagSetting, value: &Value) -> Result<()> {
    let Some((_, setting)) = settings::find(f.setting) else {
        return Ok(());
    };
    setting.set(&mut Resolved::default(), value).map_err(|why| {
        let flag = f.flags[0].replace('_', "-");
        Error::invalid(format!(
            "--{flag} {value}: {why}; --{flag} is the setting {}, which takes {}",
            f.setting,
            setting.kind.accepts()
        ))
    })
}

/// Whether the flag with clap id `id` was given on the command line.
pub(super) fn given(args: &BenchArgs, id: &str) -> bool {
    args.given.iter().any(|g| g == id)
}
