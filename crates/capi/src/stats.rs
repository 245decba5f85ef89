//! What the engine did and holds: its statistics (`spillway_stats`, and the same as JSON) and
//! its storage usage (`spillway_storage_usage`) — the facts the Python package's
//! `Engine.stats()` and `Engine.storage_usage()` give.
//!
//! The structs are filled whole by the library. Each call also takes `sizeof` the struct as
//! the caller compiled it, so that a program built against another version of `spillway.h`
//! is refused instead of having memory past its struct overwritten.

use std::ffi::{c_char, c_int};

use spillway_runtime::engine::{CounterSnapshot, Latency, Op, StatsSnapshot};
use spillway_runtime::SpaceUsage;

use crate::args;
use crate::engine::{opened, spillway_engine};
use crate::error::guard;
use crate::status::Failure;
use crate::strings::put_string;

/// Latency of one kind of operation, in microseconds; all 0 when there were none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct spillway_latency {
    /// Operations measured.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Longest.
    pub max_us: u64,
}

/// The engine's statistics since it was opened, from `spillway_engine_stats`. The counters
/// have the names of the keys of `spillway_engine_stats_json` (Python's `Engine.stats()`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct spillway_stats {
    /// Offload calls.
    pub offloads: u64,
    /// Bytes named by offload calls.
    pub offload_bytes: u64,
    /// Offloads of a storage and version already held: nothing written (dedup).
    pub dedup_hits: u64,
    /// Bytes of those offloads.
    pub dedup_bytes: u64,
    /// Tensors written inside a packed extent (below the setting pack_threshold).
    pub packed_tensors: u64,
    /// Tensors written in an extent of their own (large ones, or all with packing off).
    pub direct_tensors: u64,
    /// Extents written.
    pub extents_written: u64,
    /// Bytes written to storage (padding included).
    pub bytes_written: u64,
    /// Storage write requests.
    pub writes: u64,
    /// Storage read requests.
    pub reads: u64,
    /// Bytes read from storage.
    pub bytes_read: u64,
    /// Fetch calls.
    pub fetches: u64,
    /// Bytes delivered by fetch calls.
    pub fetch_bytes: u64,
    /// Fetches served from the tensor's own memory (its write not yet done).
    pub forwarded_fetches: u64,
    /// Bytes of those fetches.
    pub forwarded_bytes: u64,
    /// Fetches served from staging memory: from an extent already prefetched, or from the
    /// tensor's bytes read ahead for a lone request (`prefetched_slots`).
    pub prefetch_hits: u64,
    /// Fetches that read from storage themselves.
    pub demand_reads: u64,
    /// Extents read ahead by prefetch calls.
    pub prefetched_extents: u64,
    /// Lone prefetch requests (a tensor not the first or last of its extent still to be
    /// fetched) served by reading ahead only that tensor's bytes.
    pub prefetched_slots: u64,
    /// Prefetched extents (or tensors read ahead alone) dropped from staging before they
    /// were fetched, to make room.
    pub prefetch_evictions: u64,
    /// Tensors whose write was cancelled because no one would read it back.
    pub cancelled_tensors: u64,
    /// Bytes of those tensors.
    pub cancelled_bytes: u64,
    /// Tensors kept in their own memory because storage was full.
    pub resident_tensors: u64,
    /// Bytes of those tensors.
    pub resident_bytes: u64,
    /// Failed storage writes, after any retries (their tensors stay in their own memory).
    pub write_errors: u64,
    /// Failed storage reads (after any retries).
    pub read_errors: u64,
    /// Storage writes submitted again after an error that may be transient (EIO, EAGAIN,
    /// EINTR, ETIMEDOUT); they count in `writes` too.
    pub write_retries: u64,
    /// Storage reads submitted again after an error that may be transient.
    pub read_retries: u64,
    /// Of `write_errors`, those that failed because the storage was full (ENOSPC).
    pub no_space_errors: u64,
    /// Time writes were in flight, summed over writes (nanoseconds).
    pub write_ns: u64,
    /// Time reads were in flight, summed over reads (nanoseconds).
    pub read_ns: u64,
    /// Time fetch callers were blocked waiting for storage (nanoseconds).
    pub stall_ns: u64,
    /// Time the packing of an extent waited for staging memory (nanoseconds).
    pub staging_wait_ns: u64,
    /// Most staging memory in use at once (bytes).
    pub staging_peak: u64,
    /// Staging memory the engine owns (bytes): the setting staging_bytes.
    pub staging_budget: u64,
    /// Storage writes, submit to completion.
    pub write_latency: spillway_latency,
    /// Storage reads, submit to completion.
    pub read_latency: spillway_latency,
    /// From an offload call to its tensor being on storage.
    pub offload_latency: spillway_latency,
    /// Fetch calls, as their callers saw them (waits for storage included).
    pub fetch_latency: spillway_latency,
    /// Handles not yet released, at the time of the call (not in the JSON; Python's
    /// `Engine.live_handles()`).
    pub live_handles: u64,
    /// Staging memory in use at the time of the call, in bytes (not in the JSON; Python's
    /// `Engine.staging_in_use()`).
    pub staging_in_use: u64,
    /// Bytes read back whose checksums were checked (the setting `checksums`).
    pub verified_bytes: u64,
    /// Reads whose bytes differed from those written (checksums on): a prefetch, dropped
    /// and read again by its fetch, or a fetch's own read, which returned
    /// `SPILLWAY_ERROR_CORRUPT`.
    pub checksum_errors: u64,
}

/// The storage the engine holds, from `spillway_engine_storage_usage` (Python's
/// `Engine.storage_usage()`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct spillway_storage_usage {
    /// Bytes the engine may store (its capacity, rounded down to the setting alignment).
    pub capacity: u64,
    /// Bytes in extents holding offloaded tensors.
    pub used: u64,
    /// Bytes not in use: capacity - used.
    pub free: u64,
    /// The largest free range: the largest extent that can be written now.
    pub largest_free: u64,
    /// Free ranges (neighbours merged).
    pub free_ranges: u64,
    /// Extents holding offloaded tensors.
    pub live_extents: u64,
    /// How split up the free space is, from 0 to 1: 1 - largest_free / free (0 when
    /// nothing is free). Near 1, large tensors find no room although many bytes are free.
    pub fragmentation: f64,
}

impl From<&Latency> for spillway_latency {
    fn from(l: &Latency) -> Self {
        let Latency {
            count,
            mean_us,
            p50_us,
            p99_us,
            max_us,
        } = *l;
        spillway_latency {
            count,
            mean_us,
            p50_us,
            p99_us,
            max_us,
        }
    }
}

/// The statistics as C sees them. Every field is named (no `..`): a counter added to the
/// runtime stops this from compiling until `spillway_stats` has it too.
fn stats_of(snapshot: &StatsSnapshot, live_handles: usize, staging_in_use: u64) -> spillway_stats {
    let counters: &CounterSnapshot = &snapshot.counters;
    let latency = |op| spillway_latency::from(&snapshot.latency(op));
    // Every counter by name, from the runtime's one list: a counter missing from the
    // struct (or a field left out here) does not compile.
    macro_rules! filled {
        ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
            spillway_stats {
                $($name: counters.$name,)*
                staging_budget: snapshot.staging_budget,
                write_latency: latency(Op::Write),
                read_latency: latency(Op::Read),
                offload_latency: latency(Op::Offload),
                fetch_latency: latency(Op::Fetch),
                live_handles: live_handles as u64,
                staging_in_use,
            }
        };
    }
    spillway_runtime::counter_list!(filled)
}

/// The storage usage as C sees it (every field named, as in [`stats_of`]).
fn usage_of(usage: &SpaceUsage) -> spillway_storage_usage {
    let SpaceUsage {
        capacity,
        used,
        free,
        largest_free,
        free_ranges,
        live_extents,
    } = *usage;
    spillway_storage_usage {
        capacity,
        used,
        free,
        largest_free,
        free_ranges: free_ranges as u64,
        live_extents: live_extents as u64,
        fragmentation: usage.fragmentation(),
    }
}

/// Writes `value` to the caller's struct `out` of `size` bytes, refusing a size that is not
/// `T`'s (a program compiled against another `spillway.h`). `what` names the struct.
///
/// # Safety
/// `out` is NULL or valid for a write of `size` bytes.
unsafe fn put_struct<T>(out: *mut T, size: usize, value: T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::invalid(format!(
            "out is NULL: pass the address of a {what} to fill"
        )));
    }
    let want = std::mem::size_of::<T>();
    if size != want {
        return Err(Failure::invalid(format!(
            "size is {size} but a {what} is {want} bytes in this library: pass sizeof({what}), \
             and compile against the spillway.h of the library you link"
        )));
    }
    if !out.is_aligned() {
        return Err(Failure::invalid(format!(
            "out ({out:p}) is misaligned for a {what}"
        )));
    }
    // SAFETY: not NULL, aligned, and valid for `size` = size_of::<T>() bytes (the contract).
    unsafe { args::put(out, value, "out") }
}

/// Fills `*out` with the engine's statistics: counters of what it offloaded, wrote, read,
/// deduplicated, forwarded, prefetched, cancelled and kept in memory, the time I/O took and
/// callers waited, latency percentiles per operation, and the handles and staging memory in
/// use now. `size` is `sizeof(spillway_stats)`: another size is refused
/// (SPILLWAY_ERROR_INVALID_ARGUMENT), as from a program compiled against another
/// spillway.h. `*out` is left as it was on failure.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `out` is NULL or valid for a write of
/// `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_stats(
    engine: *const spillway_engine,
    out: *mut spillway_stats,
    size: usize,
) -> c_int {
    guard("spillway_engine_stats", || {
        // SAFETY: `engine` is NULL or open (the contract).
        let opened = unsafe { opened(engine)? };
        let e = &opened.engine;
        let stats = stats_of(&e.stats(), e.live_handles(), e.staging_in_use());
        // SAFETY: `out` is NULL or valid for `size` bytes (the contract).
        unsafe { put_struct(out, size, stats, "spillway_stats") }
    })
}

/// The engine's statistics as a JSON object stored in `*out` (NULL on failure; free it with
/// `spillway_string_free`), as Python's `Engine.stats()` gives them: the counters of
/// `spillway_stats` under the same names, "staging_budget", and "latency": an object with
/// "write", "read", "offload" and "fetch", each {"count", "mean_us", "p50_us", "p99_us",
/// "max_us"}; and "members": for an engine striped over several paths, one object per path
/// in the order given ({"path", "backend", "bytes_written", "bytes_read", "requests",
/// "errors", "busy_seconds", "failed", "failure"}), empty for one path; and, only when the
/// setting faults injects some, "faults": {"plan", "stats", …} (what was injected). New
/// versions may add keys.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `out` is NULL or valid for a write of a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_stats_json(
    engine: *const spillway_engine,
    out: *mut *mut c_char,
) -> c_int {
    guard("spillway_engine_stats_json", || {
        // SAFETY: the pointers are NULL or valid (the contract).
        unsafe { args::put(out, std::ptr::null_mut(), "out")? };
        // SAFETY: as above.
        let opened = unsafe { opened(engine)? };
        let json = opened.stats_json().to_string();
        // SAFETY: as above.
        unsafe { put_string(out, json, "out") }
    })
}

/// Fills `*out` with the storage the engine holds now: its capacity, the bytes used and
/// free, the largest free range, and how fragmented the free space is. `size` is
/// `sizeof(spillway_storage_usage)`: another size is refused
/// (SPILLWAY_ERROR_INVALID_ARGUMENT). `*out` is left as it was on failure.
///
/// # Safety
/// `engine` is NULL or an open `spillway_engine`; `out` is NULL or valid for a write of
/// `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn spillway_engine_storage_usage(
    engine: *const spillway_engine,
    out: *mut spillway_storage_usage,
    size: usize,
) -> c_int {
    guard("spillway_engine_storage_usage", || {
        // SAFETY: `engine` is NULL or open (the contract).
        let opened = unsafe { opened(engine)? };
        let usage = usage_of(&opened.engine.storage_usage());
        // SAFETY: `out` is NULL or valid for `size` bytes (the contract).
        unsafe { put_struct(out, size, usage, "spillway_storage_usage") }
    })
}
