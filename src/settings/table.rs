//! [`SETTINGS`]: the one table of every setting — its name, what values it takes, what it
//! means, and how it is read from and written to the [`Resolved`] choices. Its default is
//! what [`Resolved::default`] holds; its environment variable is derived from its name.
//! Everything else (the layers, the Python package, `docs/settings.md`) reads this table.

use std::time::Duration;

use spillway_runtime::FaultPlan;

use crate::choice::{BackendChoice, MemChoice};

use super::value::Value;
use super::Resolved;
use crate::rank::RankPaths;

/// What values a setting takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A byte count.
    Size,
    /// A byte count, or "auto" for the backend's default.
    SizeOrAuto,
    /// A positive whole number.
    Count,
    /// A whole number, zero or more.
    Whole,
    /// True or false.
    Flag,
    /// Milliseconds, zero or more, with a fraction if need be.
    Millis,
    /// Where tensors live: host memory or a GPU.
    Device,
    /// The backend that moves the bytes.
    Backend,
    /// Positive whole numbers, one per storage path.
    Weights,
    /// Storage paths per local rank.
    RankPaths,
    /// A fault injection plan: comma-separated `key=value` items.
    Faults,
}

/// The text values of `backend`.
/// The backends, in the order the settings list them.
const BACKENDS: [BackendChoice; 4] = [
    BackendChoice::Auto,
    BackendChoice::Uring,
    BackendChoice::Cufile,
    BackendChoice::Spdk,
];

impl Kind {
    /// What values are accepted, for error messages and the documentation.
    pub fn accepts(self) -> &'static str {
        match self {
            Kind::Size => {
                "a whole number of bytes, or text with a unit such as \"512MiB\", \"4KiB\" or \"2GB\""
            }
            Kind::SizeOrAuto => {
                "\"auto\" (the backend's default), a whole number of bytes, or text with a unit such as \"64MiB\""
            }
            Kind::Count => "a positive whole number",
            Kind::Whole => "a whole number, zero or more",
            Kind::Flag => {
                "true or false (True or False in Python; as text also \"1\"/\"0\", \"yes\"/\"no\", \"on\"/\"off\")"
            }
            Kind::Millis => "a number of milliseconds, zero or more, such as 2 or 0.5",
            Kind::Device => "\"auto\", \"host\", \"cuda\", \"cuda:N\" or a GPU ordinal N",
            Kind::Backend => "\"auto\", \"uring\", \"cufile\" or \"spdk\"",
            Kind::RankPaths => {
                "RANK=PATH[,PATH...] entries separated by ';', such as \"0=/nvme0/spill;1=/nvme1/spill\" (\"\": none)"
            }
            Kind::Weights => {
                "comma-separated positive whole numbers, one per storage path, such as \"1,2\" (\"\": equal)"
            }
            Kind::Faults => {
                "comma-separated KEY=VALUE items: read_error, write_error, error (both) and short (probabilities from 0 to 1), enospc_after (a size), latency (a duration such as \"2ms\" or \"500us\"), latency_p (a probability), seed (a whole number), ops (\"read\", \"write\" or \"both\"), such as \"write_error=0.01,short=0.05,seed=7\" (\"\", \"none\" or \"off\": no faults)"
            }
        }
    }

    /// `value` as the documentation writes it: sizes with the largest binary unit that
    /// divides them ("512MiB", "4KiB", "1000"), whole numbers bare, also those past
    /// `i64::MAX` that a setting reports as text.
    pub fn show(self, value: &Value) -> String {
        match (self, value.whole_number()) {
            (Kind::Size | Kind::SizeOrAuto, Ok(n)) => spillway_runtime::exact_size_text(n),
            (Kind::Count | Kind::Whole, Ok(n)) => n.to_string(),
            _ => value.to_string(),
        }
    }
}

/// One setting.
pub struct Setting {
    /// Its name: the TOML key and the Python keyword.
    pub name: &'static str,
    /// What values it takes.
    pub kind: Kind,
    /// What it means, in one line.
    pub meaning: &'static str,
    /// Its value in `resolved`.
    get: fn(&Resolved) -> Value,
    /// Parses `value` into `resolved`; the reason when it does not fit.
    set: fn(&mut Resolved, &Value) -> Result<(), String>,
}

impl Setting {
    /// The environment variable that sets it: `SPILLWAY_` and its name in capitals.
    pub fn env_var(&self) -> String {
        format!("SPILLWAY_{}", self.name.to_ascii_uppercase())
    }

    /// Its default.
    pub fn default_value(&self) -> Value {
        self.get(&Resolved::default())
    }

    /// Its value in `resolved`.
    pub fn get(&self, resolved: &Resolved) -> Value {
        (self.get)(resolved)
    }

    /// Parses `value` into `resolved`, or says why it does not fit (the caller names the
    /// setting and where the value came from).
    pub fn set(&self, resolved: &mut Resolved, value: &Value) -> Result<(), String> {
        (self.set)(resolved, value)
    }
}

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setting")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// The most io_uring rings, cuFile worker groups or NVMe queue pairs (`threads`): each
/// has a thread and pinned staging memory of its own, and more than this cannot move bytes
/// faster on any host.
pub const MAX_THREADS: usize = 256;

/// The most I/O requests in flight per ring or queue pair (`queue_depth`): io_uring's
/// limit on a ring spillway makes (`spillway_uring::config::MAX_QUEUE_DEPTH`).
pub const MAX_QUEUE_DEPTH: u32 = spillway_uring::config::MAX_QUEUE_DEPTH;

/// The most pinned staging memory per io_uring ring (`pinned_bytes`): 1024 staging
/// buffers (the most one ring registers) of the 1 MiB chunk.
pub const MAX_PINNED_BYTES: u64 = 1 << 30;

/// The io_uring backend's staging chunk: `pinned_bytes` is a whole number of them.
const PINNED_CHUNK: u64 = 1 << 20;

/// The longest `pack_flush_delay_ms`: a partly filled packed extent is written at most
/// this long after the last offload, so that a caller waiting for its memory back
/// (`wait_source_released`) never waits on a timer longer than this.
pub const MAX_PACK_FLUSH_DELAY_MS: f64 = 10_000.0;

/// The most events `timeline_capacity` keeps (each takes about 64 bytes once recorded).
pub const MAX_TIMELINE_CAPACITY: usize = 100_000_000;

/// Stripe weights: "1,2", or one whole number; "" for none (equal).
fn weights(v: &Value) -> Result<Vec<u32>, String> {
    let one = |text: &str| -> Result<u32, String> {
        match text.trim().parse::<u32>() {
            Ok(w) if w >= 1 => Ok(w),
            _ => Err(format!("{text:?} is not a positive whole number")),
        }
    };
    match v {
        Value::Int(n) => one(&n.to_string()).map(|w| vec![w]),
        Value::Str(text) if text.trim().is_empty() => Ok(Vec::new()),
        Value::Str(text) => text.split(',').map(one).collect(),
        other => Err(format!("{other} is not a list of weights")),
    }
}

fn size(v: &Value) -> Result<u64, String> {
    v.size()
}

/// A positive count for a `usize` field, at most `max`.
fn count_usize(v: &Value, max: usize) -> Result<usize, String> {
    let n = v.count()?;
    match usize::try_from(n) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("{n} is too large: at most {max}")),
    }
}

/// `"auto"`, `"host"`/`"cpu"`, `"cuda"`/`"gpu"`, `"cuda:N"`, or a GPU ordinal.
fn device(v: &Value) -> Result<(MemChoice, Option<usize>), String> {
    let ordinal = |text: &str| text.trim().parse::<usize>().ok();
    match v {
        Value::Int(n) => usize::try_from(*n)
            .map(|n| (MemChoice::Gpu, Some(n)))
            .map_err(|_| format!("{n} is not a GPU ordinal")),
        Value::Str(s) => match s.trim() {
            "auto" => Ok((MemChoice::Auto, None)),
            "host" | "cpu" => Ok((MemChoice::Host, None)),
            "cuda" | "gpu" => Ok((MemChoice::Gpu, None)),
            other => other
                .strip_prefix("cuda:")
                .map_or_else(|| ordinal(other), ordinal)
                .map(|n| (MemChoice::Gpu, Some(n)))
                .ok_or_else(|| format!("{v} is not a device")),
        },
        _ => Err(format!("{v} is not a device")),
    }
}

fn device_value(r: &Resolved) -> Value {
    Value::Str(match (r.choices.mem, r.choices.gpu) {
        (MemChoice::Host, _) => "host".into(),
        (_, Some(n)) => format!("cuda:{n}"),
        (MemChoice::Gpu, None) => "cuda".into(),
        (MemChoice::Auto, None) => "auto".into(),
    })
}

fn backend(v: &Value) -> Result<BackendChoice, String> {
    let names: Vec<&str> = BACKENDS.iter().map(|c| c.name()).collect();
    let name = v.choice(&names).map_err(|_| format!("{v} is not a backend"))?;
    Ok(BackendChoice::from_name(name).expect("a name of the list"))
}

fn backend_value(r: &Resolved) -> Value {
    Value::from(r.choices.backend.name())
}

fn millis(v: &Value) -> Result<Duration, String> {
    let ms = v.non_negative()?;
    if ms > MAX_PACK_FLUSH_DELAY_MS {
        return Err(format!(
            "{v} milliseconds is too long: at most {MAX_PACK_FLUSH_DELAY_MS} (10 s)"
        ));
    }
    Duration::try_from_secs_f64(ms / 1000.0).map_err(|_| format!("{v} milliseconds is too long"))
}

/// A fault plan: its text, parsed by [`FaultPlan::parse`] (whose own `faults: ` prefix is
/// dropped: the caller names the setting).
fn faults(v: &Value) -> Result<FaultPlan, String> {
    let text = v.as_str().ok_or_else(|| format!("{v} is not text"))?;
    FaultPlan::parse(text).map_err(|e| e.strip_prefix("faults: ").map(str::to_string).unwrap_or(e))
}

/// The plan as text: `""` for the plan that injects nothing with the default seed and ops
/// (what [`FaultPlan`]'s `Display` calls `none`), else its `Display` form.
fn faults_value(r: &Resolved) -> Value {
    match r.faults.to_string() {
        none if none == "none" => Value::from(""),
        text => Value::Str(text),
    }
}

/// A whole number as a [`Value`], exactly: an integer up to `i64::MAX`, past it (a size or
/// count up to `u64::MAX`) the text of its digits, which is how TOML and Python give such a
/// value too (their integers stop at `i64::MAX`), so that it sets the setting again.
fn int<N: TryInto<i64> + ToString + Copy>(n: N) -> Value {
    n.try_into()
        .map_or_else(|_| Value::Str(n.to_string()), Value::Int)
}

/// Every setting, in the order the documentation lists them.
pub static SETTINGS: &[Setting] = &[
    Setting {
        name: "device",
        kind: Kind::Device,
        meaning: "where tensors live: \"auto\" (the local rank's GPU under torchrun, Slurm or Open MPI, else GPU 0 when there is one, else host memory), \"host\", \"cuda\" (GPU 0), \"cuda:N\" or N (GPU N)",
        get: device_value,
        set: |r, v| {
            (r.choices.mem, r.choices.gpu) = device(v)?;
            Ok(())
        },
    },
    Setting {
        name: "backend",
        kind: Kind::Backend,
        meaning: "what moves the bytes: \"uring\" (io_uring, O_DIRECT), \"cufile\" (GPUDirect Storage), \"spdk\" (spillway's userspace NVMe driver: the path is then the controller's PCI address, bound with `spillway nvme bind`) or \"auto\" (cuFile when it runs true GDS, else io_uring)",
        get: backend_value,
        set: |r, v| {
            r.choices.backend = backend(v)?;
            Ok(())
        },
    },
    Setting {
        name: "queue_depth",
        kind: Kind::Count,
        meaning: "I/O requests in flight per io_uring ring, cuFile worker group or NVMe queue pair (at most 4096)",
        get: |r| int(r.choices.queue_depth),
        set: |r, v| {
            let n = v.count()?;
            r.choices.queue_depth = u32::try_from(n)
                .ok()
                .filter(|&n| n <= MAX_QUEUE_DEPTH)
                .ok_or_else(|| format!("{n} is too large: at most {MAX_QUEUE_DEPTH} requests in flight per ring"))?;
            Ok(())
        },
    },
    Setting {
        name: "threads",
        kind: Kind::Count,
        meaning: "io_uring rings, cuFile worker groups, or NVMe queue pairs (at most 256; each storage path gets its own, and each io_uring ring its own pinned staging memory, see pinned_bytes)",
        get: |r| int(r.choices.threads),
        set: |r, v| {
            r.choices.threads = count_usize(v, MAX_THREADS)?;
            Ok(())
        },
    },
    Setting {
        name: "pinned_bytes",
        kind: Kind::SizeOrAuto,
        meaning: "pinned host staging memory per io_uring ring, a whole number of 1MiB chunks up to 1GiB (\"auto\": queue_depth × 1MiB, at most 64MiB); the rings of every path together must fit the host's available memory",
        get: |r| r.choices.pinned_bytes.map_or_else(|| Value::from("auto"), int),
        set: |r, v| {
            r.choices.pinned_bytes = match v.as_str().map(str::trim) {
                Some("auto") => None,
                _ => match size(v)? {
                    n if n > MAX_PINNED_BYTES => {
                        return Err(format!("{n} is too large: at most 1GiB ({MAX_PINNED_BYTES} bytes) per ring"))
                    }
                    n if n < PINNED_CHUNK || n % PINNED_CHUNK != 0 => {
                        return Err(format!(
                            "{n} is not a whole number of the {PINNED_CHUNK}-byte (1MiB) staging chunks (at least one)"
                        ))
                    }
                    n => Some(n),
                },
            };
            Ok(())
        },
    },
    Setting {
        name: "alignment",
        kind: Kind::Size,
        meaning: "alignment of every extent and packed piece on storage (a power of two from 512 bytes to 1 GiB)",
        get: |r| int(r.engine.alignment),
        set: |r, v| {
            r.engine.alignment = size(v)?;
            Ok(())
        },
    },
    Setting {
        name: "staging_bytes",
        kind: Kind::Size,
        meaning: "device memory the engine allocates once, at start, for packing and prefetching (it never allocates more: work waits for space)",
        get: |r| int(r.engine.staging_bytes),
        set: |r, v| {
            r.engine.staging_bytes = size(v)?;
            Ok(())
        },
    },
    Setting {
        name: "prefetch_bytes",
        kind: Kind::Size,
        meaning: "of the staging memory, how much read-ahead may hold (at most staging_bytes; when not set, the default or half of staging_bytes, whichever is less)",
        get: |r| int(r.engine.prefetch_bytes),
        set: |r, v| {
            r.engine.prefetch_bytes = size(v)?;
            Ok(())
        },
    },
    Setting {
        name: "pack_threshold",
        kind: Kind::Size,
        meaning: "tensors smaller than this are packed together into shared extents (at most pack_extent_bytes; when not set, the default or pack_extent_bytes, whichever is less)",
        get: |r| int(r.engine.pack_threshold),
        set: |r, v| {
            r.engine.pack_threshold = size(v)?;
            Ok(())
        },
    },
    Setting {
        name: "pack_extent_bytes",
        kind: Kind::Size,
        meaning: "size of one packed extent, written once full (at most half of staging_bytes; when not set, the default or half of staging_bytes, whichever is less)",
        get: |r| int(r.engine.pack_extent_bytes),
        set: |r, v| {
            r.engine.pack_extent_bytes = size(v)?;
            Ok(())
        },
    },
    Setting {
        name: "pack_flush_delay_ms",
        kind: Kind::Millis,
        meaning: "a partly filled packed extent is written after this long without offloads (at most 10000: 10 s)",
        get: |r| Value::Float(r.engine.pack_flush_delay.as_secs_f64() * 1000.0),
        set: |r, v| {
            r.engine.pack_flush_delay = millis(v)?;
            Ok(())
        },
    },
    Setting {
        name: "io_retries",
        kind: Kind::Whole,
        meaning: "times a storage request failing with an error that may pass (EIO, EAGAIN, EINTR, ETIMEDOUT) is submitted again before the engine gives up on it (a write's tensors then stay in GPU memory, a read is an error to the fetch); at most 100, 0: never",
        get: |r| int(r.engine.io_retries),
        set: |r, v| {
            let n = v.whole_number()?;
            r.engine.io_retries = u32::try_from(n).map_err(|_| format!("{n} is too large"))?;
            Ok(())
        },
    },
    Setting {
        name: "io_split_bytes",
        kind: Kind::Size,
        meaning: "the largest storage request a tensor's write or a fetch's read is submitted as: larger ones are cut at multiples of it, so that the backend's threads move one large tensor side by side (rounded up to a multiple of alignment; 0: never cut)",
        get: |r| int(r.engine.io_split_bytes),
        set: |r, v| {
            r.engine.io_split_bytes = size(v)?;
            Ok(())
        },
    },
    Setting {
        name: "direct_write_bytes",
        kind: Kind::Size,
        meaning: "bytes of unpacked (direct) writes in flight at once",
        get: |r| int(r.engine.direct_write_bytes),
        set: |r, v| {
            r.engine.direct_write_bytes = size(v)?;
            Ok(())
        },
    },
    Setting {
        name: "host_tier",
        kind: Kind::Size,
        meaning: "pinned host memory the engine fills first, by one device copy, before storage: offloads complete at the speed of the host link and spill to storage in the background once half of it holds bytes not yet written there (0: off; it counts against host memory with the storage on tmpfs)",
        get: |r| int(r.host_tier),
        set: |r, v| {
            r.host_tier = size(v)?;
            Ok(())
        },
    },
    Setting {
        name: "spread_files",
        kind: Kind::Whole,
        meaning: "files one directory path is spread over, striped in stripe_bytes units (anonymous files in it); 0: chosen by its filesystem, 8 on tmpfs and ramfs (which take one file's writes one at a time) and 1 elsewhere; at most 64",
        get: |r| int(u64::from(r.spread_files)),
        set: |r, v| {
            let n = v.whole_number()?;
            if n > super::MAX_PATHS as u64 {
                return Err(format!("{n} is more than {} files", super::MAX_PATHS));
            }
            r.spread_files = n as u32;
            Ok(())
        },
    },
    Setting {
        name: "stripe_bytes",
        kind: Kind::Size,
        meaning: "with several storage paths, bytes per stripe unit, dealt round robin to them (a multiple of 4KiB)",
        get: |r| int(r.stripe_bytes),
        set: |r, v| {
            let bytes = size(v)?;
            if bytes == 0 || bytes % 4096 != 0 {
                return Err(format!("{bytes} is not a positive multiple of 4096 bytes"));
            }
            r.stripe_bytes = bytes;
            Ok(())
        },
    },
    Setting {
        name: "stripe_weights",
        kind: Kind::Weights,
        meaning: "with several storage paths, stripe units per round for each, in path order (e.g. their throughputs: a path of weight 2 takes two units for every one of a path of weight 1); \"\": equal",
        get: |r| {
            let text: Vec<String> = r.stripe_weights.iter().map(u32::to_string).collect();
            Value::Str(text.join(","))
        },
        set: |r, v| {
            r.stripe_weights = weights(v)?;
            Ok(())
        },
    },
    Setting {
        name: "rank_paths",
        kind: Kind::RankPaths,
        meaning: "storage paths of each local rank (LOCAL_RANK, SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK), used instead of the path given, e.g. GPU i's drive on its PCIe switch; several paths for a rank are striped; \"\": the path given (under a launcher a file name becomes the rank's own, spill.bin → spill.rank1.bin, and a block device is rank 0's)",
        get: |r| Value::Str(r.rank_paths.to_string()),
        set: |r, v| {
            let text = v.as_str().ok_or_else(|| format!("{v} is not text"))?;
            r.rank_paths = RankPaths::parse(text, "rank_paths").map_err(|e| e.to_string())?;
            Ok(())
        },
    },
    Setting {
        name: "pack",
        kind: Kind::Flag,
        meaning: "pack small tensors together (false: every tensor gets an extent of its own)",
        get: |r| Value::Bool(r.engine.pack),
        set: |r, v| {
            r.engine.pack = v.flag()?;
            Ok(())
        },
    },
    Setting {
        name: "dedup",
        kind: Kind::Flag,
        meaning: "store a storage and version offloaded twice only once",
        get: |r| Value::Bool(r.engine.dedup),
        set: |r, v| {
            r.engine.dedup = v.flag()?;
            Ok(())
        },
    },
    Setting {
        name: "checksums",
        kind: Kind::Flag,
        meaning: "keep a CRC-32C of every 32 KiB stored, computed on the GPU when written, and check the bytes read back before a fetch hands them out (a mismatch is an error, never wrong data)",
        get: |r| Value::Bool(r.engine.checksums),
        set: |r, v| {
            r.engine.checksums = v.flag()?;
            Ok(())
        },
    },
    Setting {
        name: "timeline",
        kind: Kind::Flag,
        meaning: "record a timeline of every stage, exportable as Chrome trace JSON (`Engine.write_trace`)",
        get: |r| Value::Bool(r.engine.timeline),
        set: |r, v| {
            r.engine.timeline = v.flag()?;
            Ok(())
        },
    },
    Setting {
        name: "timeline_capacity",
        kind: Kind::Count,
        meaning: "most timeline events kept (later ones are counted and dropped; at most 100000000)",
        get: |r| int(r.engine.timeline_capacity),
        set: |r, v| {
            r.engine.timeline_capacity = count_usize(v, MAX_TIMELINE_CAPACITY)?;
            Ok(())
        },
    },
    Setting {
        name: "faults",
        kind: Kind::Faults,
        meaning: "storage faults injected into the backend's requests, FOR TESTING RESILIENCE ONLY (never in production): read_error, write_error or error = P fail that share of reads, writes or both with EIO (nothing moves); short = P completes that share of requests over 4KiB with a shorter count (a multiple of 4KiB: the caller must submit the rest); enospc_after = SIZE fails a write with ENOSPC once it would take the bytes written to a target past SIZE; latency = DURATION delays completions (latency_p = P of them, default all); seed = N fixes the draws (the same submissions get the same faults); ops = read or write limits them to one direction. Each path of a striped set injects on its own (seed + i for the i-th path). \"\": none. Reports note that it is on and count what was injected",
        get: faults_value,
        set: |r, v| {
            r.faults = faults(v)?;
            Ok(())
        },
    },
];

/// The setting called `name`, with its place in [`SETTINGS`].
pub fn find(name: &str) -> Option<(usize, &'static Setting)> {
    SETTINGS.iter().enumerate().find(|(_, s)| s.name == name)
}

/// The names of every setting, in table order.
pub fn names() -> impl Iterator<Item = &'static str> {
    SETTINGS.iter().map(|s| s.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_are_reported_exactly_up_to_u64_max() {
        assert_eq!(int(4096u64), Value::Int(4096));
        assert_eq!(int(i64::MAX as u64), Value::Int(i64::MAX));
        assert_eq!(int(1u64 << 63), Value::from("9223372036854775808"));
        assert_eq!(int(u64::MAX), Value::from("18446744073709551615"));
        assert_eq!(int(usize::MAX), Value::Str(usize::MAX.to_string()));
        assert_eq!(int(u32::MAX), Value::Int(u32::MAX.into()));
    }

    #[test]
    fn shown_values_keep_their_units_past_i64_max() {
        assert_eq!(Kind::Size.show(&Value::Int(512 << 20)), "512MiB");
        assert_eq!(Kind::Size.show(&Value::Int(1000)), "1000");
        assert_eq!(Kind::Size.show(&Value::from("9223372036854775808")), "8388608TiB");
        assert_eq!(
            Kind::SizeOrAuto.show(&Value::from("18446744073709551615")),
            "18446744073709551615"
        );
        assert_eq!(Kind::SizeOrAuto.show(&Value::from("auto")), "\"auto\"");
        assert_eq!(
            Kind::Count.show(&Value::from("18446744073709551615")),
            "18446744073709551615"
        );
        assert_eq!(Kind::Count.show(&Value::Int(16)), "16");
        assert_eq!(Kind::Flag.show(&Value::Bool(true)), "true");
    }
}
