//! The `spillway` command line: argument definitions (clap) for `bench`, `info` and `nvme`.

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use spillway_runtime::FaultPlan;
use spillway_spdk::pci::PciAddress;

use crate::bench::settings::BenchSettings;
use crate::size::parse_size;

/// Parses the process's command line (exiting with clap's message on bad input, as
/// `Cli::parse` does), and records which `bench` flags were given explicitly in
/// [`BenchArgs::given`], so that flags of the other workload can be refused and the flags
/// left out take their settings' values from the layers below ([`bench_settings`]).
pub fn parse() -> Cli {
    let mut command = Cli::command();
    let matches = command.clone().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command).exit());
    if let Command::Bench(args) = &mut cli.command {
        args.given = given_flags(&matches);
    }
    cli
}

/// The settings of the bench `args` asks for, on the settings layers (environment, settings
/// file; see [`BenchSettings`]). A bad setting or flag exits like bad input: status 2, with
/// a message naming the setting and where its value came from, or the flag; so does one
/// file given twice as `--path` (under two names or one), which a striped set cannot use,
/// and backends that need more host memory than the host has ([`check_memory`]).
pub fn bench_settings(args: &BenchArgs) -> BenchSettings {
    let bench = BenchSettings::load(args)
        .unwrap_or_else(|e| clap::Error::raw(ErrorKind::InvalidValue, format!("{e}\n")).exit());
    if let Err(e) = crate::select::check_path_count(bench.paths.len()) {
        clap::Error::raw(ErrorKind::TooManyValues, format!("--path: {e}\n")).exit();
    }
    let paths: Vec<&std::path::Path> = bench.paths.iter().map(PathBuf::as_path).collect();
    if let Err(e) = spillway_runtime::check_distinct(&paths) {
        clap::Error::raw(ErrorKind::ArgumentConflict, format!("--path: {e}\n")).exit();
    }
    if let Err(e) = check_memory(args, &bench) {
        clap::Error::raw(
            ErrorKind::ArgumentConflict,
            format!("{}\n", bench.layers.annotate(e)),
        )
        .exit();
    }
    bench
}

/// Refuses a bench whose backends (`threads` rings of `pinned_bytes` staging each, per
/// path) and, for the tensors workload in host memory, `staging_bytes` need more host
/// memory than the host has available ([`crate::select::check_host_memory`]).
pub fn check_memory(args: &BenchArgs, bench: &BenchSettings) -> spillway_runtime::Result<()> {
    let choices = crate::bench::choices(args, bench);
    let settings = &bench.resolved;
    let staging = match (args.workload, choices.mem) {
        (Workload::Tensors, MemChoice::Host) => settings.engine.staging_bytes,
        _ => 0,
    };
    crate::select::check_host_memory(
        &choices,
        bench.paths.len().max(1),
        &[
            ("staging_bytes (--staging)", staging),
            ("host_tier (--host-tier)", settings.host_tier),
        ],
        crate::fs::host_memory(),
    )
}

/// The ids of the `bench` flags given on the command line that `matches` holds (empty for
/// another subcommand).
pub fn given_flags(matches: &ArgMatches) -> Vec<String> {
    let Some(sub) = matches.subcommand_matches("bench") else {
        return Vec::new();
    };
    sub.ids()
        .filter(|id| sub.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect()
}

/// spillway: moves tensors between GPU memory and NVMe storage, and measures how fast.
#[derive(Debug, Parser)]
#[command(name = "spillway", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The end of `spillway bench --help`: where flags left out take their values from.
const BENCH_AFTER_HELP: &str = "\
Settings: a flag that stands for a setting (--backend, --mem/--gpu, --qd, --threads, --pinned,
--stripe, --stripe-weights, --faults, --staging, --prefetch, --pack-extent, --pack-threshold,
--no-pack, --no-dedup) overrides it; left out, it takes the setting's SPILLWAY_* environment
variable, then the TOML file named by SPILLWAY_CONFIG, then its default (docs/settings.md).
Without --path, the local rank's entry of rank_paths is the path. The report's notes list every
value so taken.";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure GPU↔storage (or host↔storage) bandwidth, IOPS and latency, like gdsio/fio.
    #[command(after_help = BENCH_AFTER_HELP)]
    Bench(Box<BenchArgs>),
    /// Show GPUs, driver and CUDA versions, cuFile/GDS status, io_uring and O_DIRECT support.
    Info(InfoArgs),
    /// List NVMe controllers, and hand them between the kernel's nvme driver and vfio-pci
    /// (for the userspace driver).
    Nvme(NvmeArgs),
}

pub use crate::choice::{BackendChoice, MemChoice};

// The choices' names and help come from `crate::choice`, where the settings read them too.
impl ValueEnum for BackendChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(self.help()))
    }
}

impl ValueEnum for MemChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(self.help()))
    }
}

/// What `spillway bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Large sequential or random I/O straight through the backend, like fio or gdsio.
    Seq,
    /// Many small tensors offloaded and fetched back through the offload engine.
    Tensors,
}

impl Workload {
    /// The name used in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Seq => "seq",
            Workload::Tensors => "tensors",
        }
    }
}

/// One benchmark operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OpChoice {
    /// Sequential writes.
    Write,
    /// Sequential reads.
    Read,
    /// Writes at random block offsets (each block once).
    Randwrite,
    /// Reads at random block offsets (each block once).
    Randread,
}

impl OpChoice {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            OpChoice::Write => "write",
            OpChoice::Read => "read",
            OpChoice::Randwrite => "randwrite",
            OpChoice::Randread => "randread",
        }
    }

    /// True for write and randwrite.
    pub fn is_write(self) -> bool {
        matches!(self, OpChoice::Write | OpChoice::Randwrite)
    }

    /// True for randwrite and randread.
    pub fn is_random(self) -> bool {
        matches!(self, OpChoice::Randwrite | OpChoice::Randread)
    }
}

/// `spillway bench` arguments: the command line as given. Flags under "Seq workload" apply
/// to `--workload seq` only, those under "Tensors workload" to `--workload tensors` only;
/// the rest to both. A flag that stands for a setting (`--qd` for `queue_depth`, …) is that
/// setting's argument layer; left out, the setting takes its value from the environment or
/// the settings file before its default ([`bench_settings`]): the bench reads settings
/// from there, never from these fields.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// What to measure: `seq` runs --op over --size bytes in --block requests; `tensors`
    /// offloads --tensors tensors through the offload engine and fetches them back.
    #[arg(long, value_enum, default_value_t = Workload::Seq)]
    pub workload: Workload,

    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// Memory the data moves from/to.
    #[arg(long, value_enum, default_value_t = MemChoice::Auto)]
    pub mem: MemChoice,

    /// GPU ordinal (with GPU memory).
    #[arg(long)]
    pub gpu: Option<usize>,

    /// PCI address of the NVMe controller for --backend spdk, e.g. 0000:01:00.0 (see
    /// `spillway nvme list`). Its namespace 1 is the target: writes overwrite its data.
    #[arg(long, value_name = "ADDRESS")]
    pub pci: Option<PciAddress>,

    /// Operations to run, in order (comma-separated).
    #[arg(
        help_heading = "Seq workload",
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "write,read"
    )]
    pub op: Vec<OpChoice>,

    /// Bytes to move per operation (e.g. 256M, 4GiB).
    #[arg(help_heading = "Seq workload", long, value_parser = parse_size, default_value = "1GiB")]
    pub size: u64,

    /// Bytes per I/O request.
    #[arg(help_heading = "Seq workload", long, value_parser = parse_size, default_value = "1MiB")]
    pub block: u64,

    /// Requests in flight per thread.
    #[arg(long, default_value_t = 16)]
    pub qd: u32,

    /// Submitting threads (and io_uring rings / cuFile workers).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Memory the requests cycle through: the request at target offset `o` uses buffer
    /// offset `o % buffer`. Default: all of --size, up to 4 GiB. fio's footprint is
    /// queue depth × block per thread. With --verify it must hold all of --size.
    #[arg(help_heading = "Seq workload", long, value_parser = parse_size)]
    pub buffer: Option<u64>,

    /// Directory, file or block device to use; a directory gets an anonymous file (one that
    /// never has a name). Default: an anonymous file in $TMPDIR. Give it several times to
    /// stripe over them (--stripe), each with a backend of its own; --size is then the
    /// set's. Write operations (and --verify) overwrite the first --size bytes of a block
    /// device; the tensors workload overwrites up to twice its tensors' bytes.
    #[arg(long)]
    pub path: Vec<PathBuf>,

    /// A directory --path is spread over this many anonymous files in it, striped in
    /// --stripe units. Default 0: 8 on tmpfs and ramfs (which take one file's writes one at
    /// a time), 1 elsewhere.
    #[arg(long, default_value_t = 0, value_name = "FILES")]
    pub spread: u32,

    /// With several --path: bytes per stripe unit (a multiple of 4 KiB), dealt round robin
    /// to the paths.
    #[arg(long, value_parser = parse_size, default_value = "1MiB")]
    pub stripe: u64,

    /// With several --path: stripe units per round for each path, in order (e.g. 1,2 when
    /// the second is twice as fast). Default: one each.
    #[arg(long, value_delimiter = ',', value_name = "W,W,...")]
    pub stripe_weights: Vec<u32>,

    /// Fill with random data and check every byte read back (after writes: the whole file
    /// is read back and checked, untimed). The tensors workload always checks what it
    /// fetched; --verify also turns its engine's checksums on (the `checksums` setting:
    /// every read checked against the CRC-32C written, on the GPU, timed).
    #[arg(help_heading = "Seq workload", long)]
    pub verify: bool,

    /// Run the seq bench at every point of a grid of block sizes × queue depths × thread
    /// counts (at most 512 points) and print a row per point and operation, then the best
    /// point of each operation. Each dimension is its list flag (--blocks, --qds,
    /// --thread-counts), else the single flag (--block, --qd, --threads) when given, which
    /// fixes it, else its default list. The sweep's values win over the queue_depth and
    /// threads settings (environment, settings file). With --json: one JSON object for the
    /// whole sweep.
    #[arg(help_heading = "Seq workload", long)]
    pub sweep: bool,

    /// With --sweep: the block sizes to sweep, comma-separated (e.g. 64K,1M,4M); each is
    /// checked as --block is, and one given twice is refused [default: 64KiB,1MiB,4MiB,
    /// those up to --size].
    #[arg(
        help_heading = "Seq workload",
        long,
        value_parser = parse_size,
        value_delimiter = ',',
        value_name = "SIZE,SIZE,...",
        conflicts_with = "block"
    )]
    pub blocks: Vec<u64>,

    /// With --sweep: the queue depths to sweep, comma-separated; each is checked as --qd
    /// is, and one given twice is refused [default: 1,4,16,64].
    #[arg(
        help_heading = "Seq workload",
        long,
        value_delimiter = ',',
        value_name = "QD,QD,...",
        conflicts_with = "qd"
    )]
    pub qds: Vec<u32>,

    /// With --sweep: the thread counts to sweep, comma-separated; each is checked as
    /// --threads is, and one given twice is refused [default: 1,4,8].
    #[arg(
        help_heading = "Seq workload",
        long,
        value_delimiter = ',',
        value_name = "N,N,...",
        conflicts_with = "threads"
    )]
    pub thread_counts: Vec<usize>,

    /// With --sweep: also write the sweep's JSON (what --json prints) to FILE, made like a
    /// data file (mode 0600, never through a symbolic link).
    #[arg(help_heading = "Seq workload", long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Seed of the random data (and of the tensors' sizes and order).
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,

    /// Print JSON instead of a table: one object per operation (seq), one for a whole
    /// --sweep, one per run (tensors).
    #[arg(long)]
    pub json: bool,

    /// Use buffered I/O instead of O_DIRECT (for comparison only).
    #[arg(long)]
    pub buffered: bool,

    /// Pinned host memory each io_uring ring stages GPU data through (a multiple of its
    /// 1 MiB chunk) [default: queue depth × 1 MiB, at most 64 MiB per ring].
    #[arg(long, value_parser = parse_size)]
    pub pinned: Option<u64>,

    /// For testing resilience only: inject storage faults into the backend's requests, e.g.
    /// "write_error=0.01,short=0.05,seed=7" (keys: read_error, write_error, error, short,
    /// enospc_after, latency, latency_p, seed, ops; docs/settings.md, setting `faults`). An
    /// injected error ends a seq run with status 1; short counts are resubmitted; the
    /// tensors workload keeps tensors whose writes failed in memory and forwards them. The
    /// report counts what was injected.
    #[arg(long, value_name = "PLAN", value_parser = FaultPlan::parse, default_value = "none")]
    pub faults: FaultPlan,

    /// Tensors to offload (each one storage of its own).
    #[arg(
        help_heading = "Tensors workload",
        long,
        value_name = "N",
        default_value_t = 20_000
    )]
    pub tensors: u64,

    /// Smallest tensor size (sizes are uniform in [--min-size, --max-size]).
    #[arg(help_heading = "Tensors workload", long, value_parser = parse_size, default_value = "4KiB")]
    pub min_size: u64,

    /// Largest tensor size.
    #[arg(help_heading = "Tensors workload", long, value_parser = parse_size, default_value = "256KiB")]
    pub max_size: u64,

    /// Fraction of offload calls, in [0, 1), that name a tensor offloaded before (the same
    /// storage saved twice); the engine stores it once unless --no-dedup.
    #[arg(
        help_heading = "Tensors workload",
        long,
        value_name = "FRACTION",
        default_value_t = 0.1,
        allow_negative_numbers = true
    )]
    pub dup: f64,

    /// Write every tensor straight from its own memory into an extent of its own (no pack
    /// kernel), instead of packing small ones together into aligned slots.
    #[arg(help_heading = "Tensors workload", long)]
    pub no_pack: bool,

    /// Write every offload to storage, even one naming a tensor already stored.
    #[arg(help_heading = "Tensors workload", long)]
    pub no_dedup: bool,

    /// Pinned host memory the engine fills first, before storage (the host tier)
    /// [default: 0, none].
    #[arg(help_heading = "Tensors workload", long, value_parser = parse_size)]
    pub host_tier: Option<u64>,

    /// Device memory the engine allocates for packing and prefetching [default: 512MiB].
    #[arg(help_heading = "Tensors workload", long, value_parser = parse_size)]
    pub staging: Option<u64>,

    /// Of the staging memory, how much prefetched extents may hold, at most --staging
    /// [default: 256MiB or half of --staging, whichever is less].
    #[arg(help_heading = "Tensors workload", long, value_parser = parse_size)]
    pub prefetch: Option<u64>,

    /// Size of one packed extent, at most half of --staging [default: 16MiB or half of
    /// --staging, whichever is less].
    #[arg(help_heading = "Tensors workload", long, value_parser = parse_size)]
    pub pack_extent: Option<u64>,

    /// Tensors smaller than this are packed; larger ones are written on their own; at most
    /// --pack-extent [default: 1MiB or --pack-extent, whichever is less].
    #[arg(help_heading = "Tensors workload", long, value_parser = parse_size)]
    pub pack_threshold: Option<u64>,

    /// Record the engine's timeline and write it here as Chrome trace JSON
    /// (chrome://tracing, Perfetto).
    #[arg(help_heading = "Tensors workload", long, value_name = "FILE")]
    pub trace: Option<PathBuf>,

    /// Ids of the flags given on the command line (filled by [`parse`]; empty otherwise).
    #[arg(skip)]
    pub given: Vec<String>,
}

/// `spillway info` arguments.
#[derive(Clone, Debug, Args)]
pub struct InfoArgs {
    /// Also check whether this file or directory supports O_DIRECT.
    #[arg(long)]
    pub path: Option<PathBuf>,

    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `spillway nvme` arguments.
#[derive(Clone, Debug, Args)]
pub struct NvmeArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: NvmeCommand,
}

/// The `spillway nvme` subcommands. Binding and unbinding need root.
#[derive(Clone, Debug, Subcommand)]
pub enum NvmeCommand {
    /// List NVMe controllers: address, vendor:device, driver, IOMMU group, and their
    /// namespaces (nvme driver) or VFIO group (vfio-pci).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bind a controller to vfio-pci so the userspace driver (--backend spdk) can use it.
    /// Refuses while any namespace or partition is mounted, used as swap, part of an
    /// LVM/dm/RAID device, or open in a process.
    Bind {
        /// The controller's PCI address, e.g. 0000:01:00.0 (see `spillway nvme list`).
        pci: PciAddress,
    },
    /// Give a controller bound to vfio-pci back to the kernel (normally its nvme driver).
    /// Refuses while a process holds its VFIO group open.
    Unbind {
        /// The controller's PCI address, e.g. 0000:01:00.0.
        pci: PciAddress,
    },
}

/// `spillway bench ARGS`, parsed as [`parse`] does (without the settings layers): for
/// tests.
#[cfg(test)]
pub(crate) fn bench_args(args: &[&str]) -> BenchArgs {
    let argv = [&["spillway", "bench"], args].concat();
    let matches = Cli::command().try_get_matches_from(argv).expect("valid flags");
    let Command::Bench(mut bench) = Cli::from_arg_matches(&matches).unwrap().command else {
        panic!("not a bench command")
    };
    bench.given = given_flags(&matches);
    *bench
}
