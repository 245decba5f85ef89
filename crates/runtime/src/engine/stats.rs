//! Engine statistics: counters of what moved and how (written, deduplicated, forwarded,
//! prefetched, cancelled, kept resident), time spent in I/O and time callers waited, and
//! latency histograms per operation. [`Stats::snapshot`] gives a consistent-enough copy
//! that serialises to JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The operations whose latency is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// One storage write, submit to completion.
    Write,
    /// One storage read, submit to completion.
    Read,
    /// From `offload` to the moment the tensor is on storage (its GPU copy may be freed).
    Offload,
    /// One `fetch` call, as the caller saw it (including any wait for storage).
    Fetch,
}

const OPS: [Op; 4] = [Op::Write, Op::Read, Op::Offload, Op::Fetch];

impl Op {
    fn index(self) -> usize {
        self as usize
    }

    /// Name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Read => "read",
            Op::Offload => "offload",
            Op::Fetch => "fetch",
        }
    }
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters, updated by the engine with relaxed atomics.
        #[derive(Default)]
        pub(crate) struct Counters { $(pub(crate) $name: AtomicU64,)* }

        /// A copy of the counters.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
        pub struct CounterSnapshot { $($(#[$doc])* pub $name: u64,)* }

        impl Counters {
            fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

/// Hands the engine's counters, in order and with their documentation, to the macro
/// `$callback` as `$(#[doc] name),*`: the one list every copy of the counters is made from
/// (the engine's atomics and [`CounterSnapshot`] here, the C library's `spillway_stats`
/// filled from a snapshot). A new counter is added here and nowhere else but where it is
/// counted (and, for C, in the struct that cbindgen reads).
#[macro_export]
macro_rules! counter_list {
    ($callback:ident) => {
        $callback! {
            /// `offload` calls.
            offloads,
            /// Bytes named by `offload` calls.
            offload_bytes,
            /// Offloads of a storage already held (same id and version): nothing written.
            dedup_hits,
            /// Bytes of those offloads.
            dedup_bytes,
            /// Tensors written inside a packed extent (packing on, below the threshold).
            packed_tensors,
            /// Tensors written in an extent of their own (large ones, or all with packing off).
            direct_tensors,
            /// Extents written.
            extents_written,
            /// Bytes written to storage (padding included).
            bytes_written,
            /// Storage write requests.
            writes,
            /// Storage read requests.
            reads,
            /// Bytes read from storage.
            bytes_read,
            /// `fetch` calls.
            fetches,
            /// Bytes delivered by `fetch` calls.
            fetch_bytes,
            /// Fetches served from the tensor's own GPU memory (its write not yet done).
            forwarded_fetches,
            /// Bytes of those fetches.
            forwarded_bytes,
            /// Fetches served from staging memory: from an extent already prefetched, or from the
            /// tensor's bytes read ahead for a lone request (`prefetched_slots`).
            prefetch_hits,
            /// Fetches that read from storage themselves.
            demand_reads,
            /// Extents read ahead by `prefetch`.
            prefetched_extents,
            /// Lone `prefetch` requests (a tensor not the first or last of its extent still to be
            /// fetched) served by reading ahead only that tensor's bytes.
            prefetched_slots,
            /// Prefetched extents (or tensors read ahead alone) dropped from staging before they
            /// were fetched, to make room.
            prefetch_evictions,
            /// Tensors whose write was cancelled because no one would read it back.
            cancelled_tensors,
            /// Bytes of those tensors.
            cancelled_bytes,
            /// Tensors kept in GPU memory because storage was full: the engine's capacity was used
            /// up, or a write failed with ENOSPC.
            resident_tensors,
            /// Bytes of those tensors.
            resident_bytes,
            /// Extent writes that failed for good, after any retries (their tensors stay in GPU
            /// memory).
            write_errors,
            /// Storage reads that failed for good, after any retries: prefetches (the fetch then
            /// reads on demand) and demand reads (the fetch returns the error).
            read_errors,
            /// Storage write requests submitted again after an error that may be transient (EIO,
            /// EAGAIN, EINTR, ETIMEDOUT), each counted once; they count in `writes` too.
            write_retries,
            /// Storage read requests submitted again after an error that may be transient; they
            /// count in `reads` too.
            read_retries,
            /// Of `write_errors`, those that failed because the storage was full (ENOSPC): their
            /// tensors count in `resident_tensors`.
            no_space_errors,
            /// Bytes read back whose checksums were checked (the `checksums` setting).
            verified_bytes,
            /// Reads whose bytes differed from those written (checksums on): a prefetch, dropped
            /// (the fetch reads again), or a demand read, whose fetch returned the error.
            checksum_errors,
            /// Time writes were in flight, summed over writes (ns).
            write_ns,
            /// Time reads were in flight, summed over reads (ns).
            read_ns,
            /// Time `fetch` callers spent blocked waiting for storage (ns).
            stall_ns,
            /// Time the packing of an extent waited for staging memory (ns).
            staging_wait_ns,
            /// Most staging memory in use at once (bytes).
            staging_peak,
        }
    };
}

counter_list!(counters);

/// Latency percentiles of one operation, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest.
    pub max_us: u64,
}

/// A copy of all statistics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    /// The counters.
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    /// Staging memory the engine owns (bytes).
    pub staging_budget: u64,
    /// Latency of writes, reads, offloads and fetches, by operation name.
    pub latency: BTreeMap<String, Latency>,
}

impl StatsSnapshot {
    /// The latency of `op`.
    pub fn latency(&self, op: Op) -> Latency {
        self.latency.get(op.as_str()).cloned().unwrap_or_default()
    }
}

/// The engine's statistics.
pub struct Stats {
    pub(crate) c: Counters,
    histograms: Mutex<Vec<Histogram<u64>>>,
    staging_budget: u64,
}

impl Stats {
    pub(crate) fn new(staging_budget: u64) -> Self {
        // 1 µs to 1 hour with 3 significant digits: new_with_bounds cannot fail with these.
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        Stats {
            c: Counters::default(),
            histograms: Mutex::new(OPS.iter().map(|_| h()).collect()),
            staging_budget,
        }
    }

    /// Adds `n` to a counter.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records one latency sample.
    pub(crate) fn record(&self, op: Op, took: Duration) {
        let us = (took.as_micros() as u64).clamp(1, 3_600_000_000);
        let mut h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        // Cannot fail: the value is clamped into the histogram's bounds.
        let _ = h[op.index()].record(us);
    }

    /// Raises the staging high-water mark to `in_use` if higher.
    pub(crate) fn staging_in_use(&self, in_use: u64) {
        self.c.staging_peak.fetch_max(in_use, Ordering::Relaxed);
    }

    /// A copy of everything.
    pub fn snapshot(&self) -> StatsSnapshot {
        let h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        let latency = OPS
            .iter()
            .map(|op| {
                let h = &h[op.index()];
                let l = if h.is_empty() {
                    Latency::default()
                } else {
                    Latency {
                        count: h.len(),
                        mean_us: h.mean(),
                        p50_us: h.value_at_quantile(0.5),
                        p99_us: h.value_at_quantile(0.99),
                        max_us: h.max(),
                    }
                };
                (op.as_str().to_string(), l)
            })
            .collect();
        StatsSnapshot {
            counters: self.c.snapshot(),
            staging_budget: self.staging_budget,
            latency,
        }
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats")
            .field("counters", &self.c.snapshot())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_latencies_reach_the_snapshot() {
        let s = Stats::new(1 << 20);
        Stats::add(&s.c.offloads, 3);
        s.staging_in_use(10);
        s.staging_in_use(5);
        s.record(Op::Write, Duration::from_micros(100));
        s.record(Op::Write, Duration::from_micros(300));
        let snap = s.snapshot();
        assert_eq!(snap.counters.offloads, 3);
        assert_eq!(snap.counters.staging_peak, 10);
        let w = snap.latency(Op::Write);
        assert_eq!(w.count, 2);
        assert!(w.max_us >= 300 && w.p50_us >= 100);
        assert_eq!(snap.latency(Op::Read).count, 0);
        let json = serde_json::to_value(&snap).unwrap();
        assert_eq!(json["offloads"], 3);
    }
}
