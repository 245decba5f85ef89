//! Which `spillway bench` flags belong to which workload, and the refusal of a flag given
//! with the workload it does not apply to (instead of silently ignoring it).

use spillway_runtime::{Error, Result};

use crate::cli::{BenchArgs, Workload};

/// Flags only the `seq` workload reads: (clap id, flag).
const SEQ_ONLY: [(&str, &str); 9] = [
    ("op", "--op"),
    ("size", "--size"),
    ("block", "--block"),
    ("buffer", "--buffer"),
    ("sweep", "--sweep"),
    ("blocks", "--blocks"),
    ("qds", "--qds"),
    ("thread_counts", "--thread-counts"),
    ("out", "--out"),
];

/// Flags only `--sweep` reads: (clap id, flag).
pub const SWEEP_ONLY: [(&str, &str); 4] = [
    ("blocks", "--blocks"),
    ("qds", "--qds"),
    ("thread_counts", "--thread-counts"),
    ("out", "--out"),
];

/// Flags only the `tensors` workload reads: (clap id, flag).
const TENSORS_ONLY: [(&str, &str); 11] = [
    ("tensors", "--tensors"),
    ("min_size", "--min-size"),
    ("max_size", "--max-size"),
    ("dup", "--dup"),
    ("no_pack", "--no-pack"),
    ("no_dedup", "--no-dedup"),
    ("staging", "--staging"),
    ("prefetch", "--prefetch"),
    ("pack_extent", "--pack-extent"),
    ("pack_threshold", "--pack-threshold"),
    ("trace", "--trace"),
];

/// Refuses flags given on the command line that the chosen workload does not read, and
/// the flags of `--sweep` given without it. Only flags recorded in [`BenchArgs::given`] are
/// checked (defaults never are).
pub fn check(args: &BenchArgs) -> Result<()> {
    check_nvme_target(args)?;
    let (foreign, owner) = match args.workload {
        Workload::Seq => (&TENSORS_ONLY[..], Workload::Tensors),
        Workload::Tensors => (&SEQ_ONLY[..], Workload::Seq),
    };
    let given = given_of(args, foreign);
    if given.is_empty() {
        return check_sweep(args);
    }
    let (these, them) = agreement(&given);
    let mut advice = format!("add --workload {} or drop {them}", owner.as_str());
    if owner == Workload::Seq {
        advice = format!(
            "drop {them} (the tensors workload sizes its I/O from --tensors, --min-size and --max-size) or use --workload seq"
        );
    }
    Err(Error::invalid(format!(
        "{} {these} to --workload {} only, but the workload is {}: {advice}",
        given.join(", "),
        owner.as_str(),
        args.workload.as_str(),
    )))
}

/// Refuses the flags of `--sweep` (its lists and `--out`) given without it: they would
/// otherwise be silently ignored.
fn check_sweep(args: &BenchArgs) -> Result<()> {
    let given = given_of(args, &SWEEP_ONLY);
    if args.sweep || given.is_empty() {
        return Ok(());
    }
    let (these, them) = agreement(&given);
    Err(Error::invalid(format!(
        "{} {these} to --sweep only: add --sweep to run the bench at every point of the grid, or drop {them} (--block, --qd and --threads set the one point of a plain bench)",
        given.join(", "),
    )))
}

/// The flags of `flags` given on the command line.
fn given_of(args: &BenchArgs, flags: &[(&str, &'static str)]) -> Vec<&'static str> {
    flags
        .iter()
        .filter(|(id, _)| args.given.iter().any(|g| g == id))
        .map(|(_, flag)| *flag)
        .collect()
}

/// ("applies", "it") for one flag, ("apply", "them") for several.
fn agreement(given: &[&str]) -> (&'static str, &'static str) {
    if given.len() == 1 {
        ("applies", "it")
    } else {
        ("apply", "them")
    }
}

/// Refuses flags that do not apply to the target of `--backend spdk` (`--pci`): a
/// namespace, with no filesystem and no page cache.
fn check_nvme_target(args: &BenchArgs) -> Result<()> {
    let Some(pci) = args.pci else {
        return Ok(());
    };
    if let Some(path) = args.path.first() {
        return Err(Error::invalid(format!(
            "--path {} names a file or block device, but with --pci the target is namespace 1 of NVMe controller {pci}: drop one of them",
            path.display()
        )));
    }
    if args.buffered {
        return Err(Error::invalid(
            "--buffered asks for the page cache, which the userspace NVMe driver (--pci) bypasses: drop --buffered",
        ));
    }
    Ok(())
}
