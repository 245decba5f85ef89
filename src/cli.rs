//! The `spillway` command line: argument definitions (clap) for `bench` and `info`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::size::parse_size;

/// spillway: moves tensors between GPU memory and NVMe storage, and measures how fast.
#[derive(Debug, Parser)]
#[command(name = "spillway", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure GPU↔storage (or host↔storage) bandwidth, IOPS and latency, like gdsio/fio.
    Bench(BenchArgs),
    /// Show GPUs, driver and CUDA versions, cuFile/GDS status, io_uring and O_DIRECT support.
    Info(InfoArgs),
}

/// Which backend moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// io_uring with O_DIRECT; GPU memory staged through pinned host buffers.
    Uring,
    /// NVIDIA cuFile (GPUDirect Storage, or its compat mode).
    Cufile,
    /// cuFile when it runs true GDS for GPU memory, io_uring otherwise.
    Auto,
}

/// Where the benchmark's buffers live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MemChoice {
    /// GPU memory (device `--gpu`).
    Gpu,
    /// Host memory.
    Host,
    /// GPU memory when a GPU is present, host memory otherwise.
    Auto,
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

/// `spillway bench` arguments.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// Memory the data moves from/to.
    #[arg(long, value_enum, default_value_t = MemChoice::Auto)]
    pub mem: MemChoice,

    /// GPU ordinal (with GPU memory).
    #[arg(long)]
    pub gpu: Option<usize>,

    /// Operations to run, in order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "write,read")]
    pub op: Vec<OpChoice>,

    /// Bytes to move per operation (e.g. 256M, 4GiB).
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    pub size: u64,

    /// Bytes per I/O request.
    #[arg(long, value_parser = parse_size, default_value = "1MiB")]
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
    #[arg(long, value_parser = parse_size)]
    pub buffer: Option<u64>,

    /// File or block device to use. Default: a temporary file in $TMPDIR, removed afterwards.
    /// Write operations (and --verify) overwrite the first --size bytes of a block device.
    #[arg(long)]
    pub path: Option<PathBuf>,

    /// Fill with random data and check every byte read back (after writes: the whole file
    /// is read back and checked, untimed).
    #[arg(long)]
    pub verify: bool,

    /// Seed of the random data.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,

    /// Print one JSON object per operation instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Use buffered I/O instead of O_DIRECT (for comparison only).
    #[arg(long)]
    pub buffered: bool,
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
