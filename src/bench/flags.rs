//! Which `spillway bench` flags belong to which workload, and the refusal of a flag given
//! with the workload it does not apply to (instead of silently ignoring it).

use spillway_runtime::{Error, Result};

use crate::cli::{BenchArgs, Workload};

/// Flags only the `seq` workload reads: (clap id, flag).
const SEQ_ONLY: [(&str, &str); 4] = [
    ("op", "--op"),
    ("size", "--size"),
    ("block", "--block"),
    ("buffer", "--buffer"),
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

/// Refuses flags given on the command line that the chosen workload does not read.
/// Only flags recorded in [`BenchArgs::given`] are checked (defaults never are).
pub fn check(args: &BenchArgs) -> Result<()> {
    check_nvme_target(args)?;
    let (foreign, owner) = match args.workload {
        Workload::Seq => (&TENSORS_ONLY[..], Workload::Tensors),
        Workload::Tensors => (&SEQ_ONLY[..], Workload::Seq),
    };
    let given: Vec<&str> = foreign
        .iter()
        .filter(|(id, _)| args.given.iter().any(|g| g == id))
        .map(|(_, flag)| *flag)
        .collect();
    if given.is_empty() {
        return Ok(());
    }
    let (these, them) = if given.len() == 1 {
        ("applies", "it")
    } else {
        ("apply", "them")
    };
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
