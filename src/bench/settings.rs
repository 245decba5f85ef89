//! [`BenchSettings`]: the settings of one `spillway bench` run, on the layers the library
//! uses (see `docs/settings.md`). A flag given on the command line is the argument layer
//! and wins; a flag left out takes its setting's value from the `SPILLWAY_*` environment
//! variables, then from the TOML file named by `SPILLWAY_CONFIG`, and only then its
//! default. Settings the bench has no flag for (`alignment`, `pack_flush_delay_ms`, …)
//! reach the tensors workload's engine the same way. [`Settings::resolve`] checks them
//! together, and the workloads read the [`Resolved`] settings it gives, as the bindings do.

use std::path::PathBuf;

use spillway_runtime::Result;

use super::flag_settings::{self, FLAGS};
use super::layers::{taken, Layers};
use super::tensors::options;
use crate::choice::BackendChoice;
use crate::cli::{BenchArgs, Workload};
use crate::rank::{self, LocalRank};
use crate::settings::{self, Resolved, Settings};

/// The settings of one bench run, resolved once from the layers and its command line.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// The settings the run reads, resolved: the device and backend choices, the storage
    /// layout, the faults, and for the tensors workload the engine's settings.
    pub resolved: Resolved,
    /// The `--path`s as the run uses them: without `--path`, this local rank's entry of
    /// `rank_paths`; a file name made the rank's own; one directory spread over several
    /// anonymous files repeated once per file. Empty: an anonymous file in $TMPDIR (or the
    /// controller of `--pci`).
    pub paths: Vec<PathBuf>,
    /// What the layers under the command line gave the run.
    pub layers: Layers,
    /// The layers under the command line (environment, settings file), for the runs a
    /// sweep makes of other command lines.
    below: Settings,
    /// This process's local rank, when it was asked for.
    rank: Option<LocalRank>,
}

impl BenchSettings {
    /// The settings of `args` over this process's settings layers (its `SPILLWAY_*`
    /// variables and the file named by `SPILLWAY_CONFIG`) and local rank: see
    /// [`BenchSettings::resolve`].
    pub fn load(args: &BenchArgs) -> Result<BenchSettings> {
        BenchSettings::resolve(args, Settings::load()?, rank::detect_from_env)
    }

    /// The settings of `args` over the layers `below`: the settings the workload does not
    /// read are put back at their defaults, the flags given become the argument layer, and
    /// the whole is resolved. Without `--path` (and `--pci`), `rank_paths` gives this local
    /// rank's paths (`local_rank` is asked only then). A value that does not fit is refused
    /// naming the setting and where it came from, or the flag.
    pub fn resolve(
        args: &BenchArgs,
        mut below: Settings,
        local_rank: impl FnOnce() -> Result<Option<LocalRank>>,
    ) -> Result<BenchSettings> {
        let names: Vec<&str> = settings::names()
            .filter(|&n| !flag_settings::reads(args.workload, n))
            .collect();
        for name in names {
            below.reset(name)?;
        }
        let mut layers = Layers::default();
        let mut settings = below.clone();
        flag_settings::apply(&mut settings, args)?;
        for f in FLAGS.iter().filter(|f| f.read_by(args.workload)) {
            layers.taken.extend(taken(&settings, f.setting));
        }
        if args.workload == Workload::Tensors {
            // The engine's settings without a flag: reported.
            for name in settings::names().filter(|&n| flag_settings::is_engine_only(n)) {
                layers.taken.extend(taken(&settings, name));
            }
        }
        let resolved = resolve_checked(args, &settings).map_err(|e| layers.annotate(e))?;
        let mut rank = None;
        let (paths, from_rank_paths, notes) = rank_storage(args, &resolved, || {
            rank = local_rank()?;
            Ok(rank)
        })?;
        if from_rank_paths {
            layers.taken.extend(taken(&settings, "rank_paths"));
        }
        layers.notes.extend(notes);
        let (paths, note) = spread(args, &resolved, paths);
        layers.notes.extend(note);
        Ok(BenchSettings {
            resolved,
            paths,
            layers,
            below,
            rank,
        })
    }

    /// The settings of `args`, another command line over the same layers and local rank
    /// (a point of a sweep).
    pub fn for_args(&self, args: &BenchArgs) -> Result<BenchSettings> {
        BenchSettings::resolve(args, self.below.clone(), || Ok(self.rank))
    }
}

/// `settings` resolved; for the tensors workload, combinations its flags make are refused
/// first naming the flags ([`options::check_engine`]).
fn resolve_checked(args: &BenchArgs, settings: &Settings) -> Result<Resolved> {
    if args.workload == Workload::Tensors {
        options::check_engine(&settings.fitted().engine)?;
    }
    Ok(settings.resolve()?)
}

/// Under a multi-process launcher, this local rank's storage and the notes saying so, as
/// the library chooses it: without `--path`, the rank's paths from `rank_paths` (true is
/// returned then); with `--path`, file names made the rank's own (`spill.dat` →
/// `spill.rank1.dat`; [`rank::make_own`]). A rank missing from a non-empty `rank_paths` is
/// refused. Nothing changes for `--pci` (a controller is one process's anyway), or without
/// `--path` and `rank_paths` (the anonymous file in `$TMPDIR` is the process's own).
fn rank_storage(
    args: &BenchArgs,
    values: &Resolved,
    local_rank: impl FnOnce() -> Result<Option<LocalRank>>,
) -> Result<(Vec<PathBuf>, bool, Vec<String>)> {
    let mut paths = args.path.clone();
    let from_list = paths.is_empty() && !values.rank_paths.is_empty();
    if args.pci.is_some() || (paths.is_empty() && !from_list) {
        return Ok((paths, false, Vec::new()));
    }
    let Some(rank) = local_rank()? else {
        return Ok((paths, false, Vec::new()));
    };
    if from_list {
        let (paths, note) = values.rank_paths.choose(&[], Some(rank))?;
        return Ok((paths, true, note.into_iter().collect()));
    }
    let notes = rank::make_own(&mut paths, rank)?;
    Ok((paths, false, notes))
}

/// One directory `--path` (not a controller) spread over `spread_files` anonymous files in
/// it (by default as its filesystem needs, [`crate::open::spread_files`]): that many copies
/// of it, striped, and the note saying so. Other paths are returned as they are.
fn spread(args: &BenchArgs, values: &Resolved, paths: Vec<PathBuf>) -> (Vec<PathBuf>, Option<String>) {
    let [dir] = paths.as_slice() else {
        return (paths, None);
    };
    if args.pci.is_some() || values.choices.backend == BackendChoice::Spdk || !dir.is_dir() {
        return (paths, None);
    }
    let (files, why) = crate::open::spread_files(dir, values.spread_files);
    if files <= 1 {
        return (paths, None);
    }
    let note = format!(
        "{} spread over {files} anonymous files striped in {} units ({why})",
        dir.display(),
        crate::size::format_size(values.stripe_bytes)
    );
    (vec![dir.clone(); files as usize], Some(note))
}

/// The settings of `args` over the layers of the environment `vars` only, without a local
/// rank: for tests.
#[cfg(test)]
pub(crate) fn of(args: &BenchArgs, vars: &[(&str, &str)]) -> Result<BenchSettings> {
    let below = Settings::load_from(vars.iter().copied())?;
    BenchSettings::resolve(args, below, || Ok(None))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use spillway_runtime::Error;

    use super::*;
    use crate::cli::MemChoice;
    use crate::settings::Value;

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
        let b = of(
            &bench(&[]),
            &[
                ("SPILLWAY_QUEUE_DEPTH", "32"),
                ("SPILLWAY_STRIPE_BYTES", "256KiB"),
            ],
        )
        .unwrap();
        assert_eq!(
            (b.resolved.choices.queue_depth, b.resolved.stripe_bytes),
            (32, 256 << 10)
        );
        let notes: Vec<String> = b.layers.report_notes().collect();
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
        let vars = [("SPILLWAY_QUEUE_DEPTH", "32"), ("SPILLWAY_DEVICE", "host")];
        let b = of(&bench(&["--qd", "4", "--gpu", "1"]), &vars).unwrap();
        let c = b.resolved.choices;
        assert_eq!((c.queue_depth, c.mem, c.gpu), (4, MemChoice::Auto, Some(1)));
        assert!(b.layers.taken.is_empty(), "{:?}", b.layers.taken);

        let b = of(&bench(&[]), &[("SPILLWAY_DEVICE", "cuda:2")]).unwrap();
        assert_eq!(
            (b.resolved.choices.mem, b.resolved.choices.gpu),
            (MemChoice::Gpu, Some(2))
        );
    }

    #[test]
    fn engine_settings_reach_only_the_tensors_workload() {
        let vars = [
            ("SPILLWAY_STAGING_BYTES", "64MiB"),
            ("SPILLWAY_PACK", "false"),
            ("SPILLWAY_DIRECT_WRITE_BYTES", "8MiB"),
        ];
        let seq = of(&bench(&[]), &vars).unwrap();
        let engine = &seq.resolved.engine;
        assert!(seq.layers.taken.is_empty() && engine.staging_bytes == 512 << 20 && engine.pack);

        let tensors = of(&bench(&["--workload", "tensors", "--staging", "32MiB"]), &vars).unwrap();
        let engine = &tensors.resolved.engine;
        assert_eq!(engine.staging_bytes, 32 << 20, "the flag wins");
        assert!(!engine.pack);
        assert_eq!(engine.direct_write_bytes, 8 << 20);
        let names: Vec<&str> = tensors.layers.taken.iter().map(|t| t.setting).collect();
        assert_eq!(names, ["pack", "direct_write_bytes"]);
    }

    #[test]
    fn rank_paths_give_the_rank_s_paths_unless_a_path_is_given() {
        let vars = [("SPILLWAY_RANK_PATHS", "0=/nvme0;1=/nvme1,/nvme2")];
        let rank = |rank| {
            move || {
                Ok(Some(LocalRank {
                    rank,
                    source: "LOCAL_RANK",
                }))
            }
        };
        let b = BenchSettings::resolve(&bench(&[]), env(&vars), rank(1)).unwrap();
        assert_eq!(b.paths, [PathBuf::from("/nvme1"), PathBuf::from("/nvme2")]);
        assert_eq!(b.layers.taken[0].setting, "rank_paths");
        assert!(b.layers.notes[0].contains("local rank 1 (LOCAL_RANK)"));

        // A path given on the command line wins; a file name is made the rank's own.
        let args = bench(&["--path", "/given/spill.dat", "--path", "/"]);
        let b = BenchSettings::resolve(&args, env(&vars), rank(1)).unwrap();
        assert_eq!(
            b.paths,
            [PathBuf::from("/given/spill.rank1.dat"), PathBuf::from("/")]
        );
        assert!(b.layers.taken.is_empty());
        assert!(b.layers.notes[0].contains("spill.rank1.dat is this rank's own"));
        let args = bench(&["--path", "/given/spill.dat"]);
        let b = BenchSettings::resolve(&args, Settings::default(), no_rank).unwrap();
        assert_eq!(b.paths, [PathBuf::from("/given/spill.dat")]);

        let b = BenchSettings::resolve(&bench(&[]), env(&vars), no_rank).unwrap();
        assert!(b.paths.is_empty() && b.layers.taken.is_empty());

        let e = BenchSettings::resolve(&bench(&[]), env(&vars), rank(5)).unwrap_err();
        assert!(e.to_string().contains("no entry for local rank 5"), "{e}");
    }

    #[test]
    fn the_flags_defaults_are_the_settings_defaults() {
        // On a clean environment the bench runs as documented, and as the library would:
        // every flag given at its default leaves the settings at theirs.
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
        let vars = [("SPILLWAY_FAULTS", "write_error=0.5,seed=3")];
        let b = of(&bench(&[]), &vars).unwrap();
        assert_eq!((b.resolved.faults.write_error, b.resolved.faults.seed), (0.5, 3));
        let notes: Vec<String> = b.layers.report_notes().collect();
        assert_eq!(notes, ["faults=write_error=0.5,seed=3 from SPILLWAY_FAULTS"]);

        let b = of(
            &bench(&["--faults", "short=0.25", "--workload", "tensors"]),
            &vars,
        )
        .unwrap();
        assert_eq!(
            (b.resolved.faults.short, b.resolved.faults.write_error),
            (0.25, 0.0),
            "the flag wins"
        );
        assert!(b.layers.taken.is_empty());

        let b = of(&bench(&["--faults", "off"]), &vars).unwrap();
        assert!(
            b.resolved.faults.is_none(),
            "off turns off what the environment set"
        );
    }

    #[test]
    fn every_setting_without_a_flag_is_the_engines() {
        // The settings the bench has no flag for reach the tensors workload through the
        // engine configuration: each one set to another value changes the engine's
        // settings and nothing else. (A setting of another part needs a flag in FLAGS.)
        let before = Settings::default().fitted();
        let unmapped: Vec<&str> = settings::names()
            .filter(|&n| flag_settings::is_engine_only(n))
            .collect();
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
                    panic!("{name}={text:?}: not an engine setting? give it a flag in FLAGS")
                }
            };
            s.set(name, other).unwrap();
            let after = s.fitted();
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
            assert!(!flag_settings::reads(Workload::Seq, name), "{name} read by seq");
        }
    }

    #[test]
    fn an_engine_setting_without_a_flag_from_the_environment_is_reported() {
        let vars = [("SPILLWAY_IO_SPLIT_BYTES", "8MiB")];
        let b = of(&bench(&["--workload", "tensors"]), &vars).unwrap();
        assert_eq!(b.resolved.engine.io_split_bytes, 8 << 20);
        let notes: Vec<String> = b.layers.report_notes().collect();
        assert_eq!(notes, ["io_split_bytes=8MiB from SPILLWAY_IO_SPLIT_BYTES"]);
        // The seq workload has no engine: nothing taken.
        let b = of(&bench(&[]), &vars).unwrap();
        assert!(b.layers.taken.is_empty());
    }

    #[test]
    fn refusals_name_the_values_from_outside_the_command_line() {
        let b = of(&bench(&[]), &[("SPILLWAY_THREADS", "3")]).unwrap();
        let e = b.layers.annotate(Error::invalid("--threads 3 is out of range"));
        assert!(e.to_string().contains("threads=3 from SPILLWAY_THREADS"), "{e}");
    }

    #[test]
    fn a_flag_s_value_is_bounded_by_its_setting_and_refused_naming_the_flag() {
        let e = of(&bench(&["--qd", "5000"]), &[]).unwrap_err().to_string();
        assert!(
            e.contains("--qd 5000: ") && e.contains("--qd is the setting queue_depth"),
            "{e}"
        );
    }
}
