//! Model-based test of the offload engine under fault injection. Random sequences of
//! operations — offload (new tensors of 1 byte to 3 MiB in one to three regions, bursts of
//! small ones, and tensors already offloaded: dedup), producers that finish after the
//! offload, prefetch (one handle, or all of them newest first), fetch (into fresh memory, or
//! with `fetch_into` into memory still being written by a stream), release, drain, sources
//! overwritten once the engine has let go of them, released handles used again — run
//! against an engine over a [`FaultyBackend`] with a random fault plan (EIO on reads and on
//! writes, short counts, ENOSPC after some bytes, latency; 0 to 3 retries) and small random
//! settings, so that packing, staging backpressure, eviction, forwarding, cancelled writes
//! and full storage (tensors kept resident) all happen; each is checked against a model of
//! what every handle must read back.
//!
//! The invariants:
//! - A fetch is `Ok` with exactly the bytes offloaded under the handle's key, or (only when
//!   the plan injects read faults) an EIO or short-read error — never `Ok` with other bytes,
//!   whatever was overwritten, evicted or forwarded, and never before the destination is
//!   free.
//! - A source is overwritten (under a new version) only once the engine has let go of
//!   every offload of it, as the offload contract says: its callback ran, or
//!   `source_released` said so while the handle was live. A callback that ran implies
//!   `source_released`.
//! - Operations on live handles never fail otherwise; released handles are refused.
//!   `live_handles` follows the model after every operation.
//! - Once every handle is released and the engine drained: no live handle, no staging and
//!   no storage in use, every source callback has run, and the counters agree with the
//!   model (offloads, dedup hits, fetches, how they were served, bytes fetched, read
//!   errors) and with what the fault injector saw. A tenth of the sequences instead drop
//!   the engine with handles live; every source callback must then have run.
//! - Every thread an engine, its backend and the fault injector start has ended once they
//!   are dropped: checked after each sequence with one worker, after all of them with more.
//! - A sequence that runs for more than 30 s aborts the process, printing it.
//!
//! Storage is mostly [`HostStore`] here, a quick stand-in for the runtime's [`MemBackend`]
//! (which is slow in a debug build), and `MemBackend` itself for about one sequence in 80.
//!
//! `SPILLWAY_MODEL_CASES` sets the number of sequences (default 10 000),
//! `SPILLWAY_MODEL_SEED` the seed (printed at the start, from the clock by default) and
//! `SPILLWAY_MODEL_WORKERS` the threads running sequences side by side (default: the CPUs,
//! at most 4). A failure prints the smallest failing sequence found and the settings that
//! reproduce the run (a sequence's timing is not reproducible, so a failure may need a few
//! runs to show again). The default takes about 40 to 65 s in a debug build on 2 cores.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use spillway_runtime::engine::{
    CounterSnapshot, Engine, EngineConfig, Handle, Region, StorageTarget, TensorKey,
};
use spillway_runtime::{
    pattern, Backend, BackendInfo, Completer, Device, Error, Event, FaultPlan, FaultStats, FaultyBackend,
    HostDevice, HostEvent, HostEventTrigger, IoOp, IoRequest, MemBackend, Stream, Target, TargetId,
    TargetInfo, Ticket,
};

// ---------------------------------------------------------------------------------------
// The sequences.

/// Fault plan of one sequence (see `spillway_runtime::FaultPlan`).
#[derive(Clone, Debug)]
struct Faults {
    read_error: f64,
    write_error: f64,
    short: f64,
    enospc_after_kib: Option<u64>,
    latency_us: u64,
    latency_p: f64,
    seed: u64,
}

impl Faults {
    fn plan(&self) -> FaultPlan {
        FaultPlan {
            read_error: self.read_error,
            write_error: self.write_error,
            short: self.short,
            enospc_after: self.enospc_after_kib.map(|k| k << 10),
            latency: Duration::from_micros(self.latency_us),
            latency_p: self.latency_p,
            seed: self.seed,
            ..FaultPlan::default()
        }
    }

    /// Whether a read may fail for good: an EIO on every attempt, or a short count on
    /// every resubmission.
    fn reads_may_fail(&self) -> bool {
        self.read_error > 0.0 || self.short > 0.0
    }
}

/// What the engine's storage target is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    /// A [`HostStore`] target sized in advance (a reserved file, a block device): a read
    /// anywhere in it succeeds (where nothing was written, with what was there before).
    Reserved,
    /// A [`HostStore`] target that ends where its furthest write did (a file that grows as
    /// written): a read past that end fails as a short read.
    Growing,
    /// The runtime's [`MemBackend`] (a target that grows), for a few sequences only: it is
    /// slow in a debug build (it grows its targets a byte at a time, and starts a thread
    /// per request).
    MemBackend,
}

/// Engine settings and storage of one sequence.
#[derive(Clone, Debug)]
struct Setup {
    /// Staging memory, in packed extents.
    staging_extents: u64,
    prefetch_pct: u64,
    pack_extent_kib: u64,
    pack_threshold_kib: u64,
    flush_delay_us: u64,
    direct_write_kib: u64,
    /// Capacity of each target.
    capacity_kib: u64,
    /// Storage targets the engine spreads extents over.
    targets: u8,
    alignment: u64,
    storage: Storage,
    pack: bool,
    dedup: bool,
    io_retries: u32,
    checksums: bool,
    faults: Faults,
}

impl Setup {
    fn staging_bytes(&self) -> u64 {
        self.staging_extents * (self.pack_extent_kib << 10)
    }

    fn config(&self) -> EngineConfig {
        let extent = self.pack_extent_kib << 10;
        let staging = self.staging_bytes();
        EngineConfig {
            staging_bytes: staging,
            prefetch_bytes: (staging * self.prefetch_pct / 100).max(4096),
            pack_extent_bytes: extent,
            pack_threshold: (self.pack_threshold_kib << 10).min(extent),
            pack_flush_delay: Duration::from_micros(self.flush_delay_us),
            direct_write_bytes: self.direct_write_kib << 10,
            pack: self.pack,
            dedup: self.dedup,
            io_retries: self.io_retries,
            checksums: self.checksums,
            alignment: self.alignment,
            ..EngineConfig::default()
        }
    }
}

/// One step of a sequence. Indices pick among what exists when the step runs (modulo its
/// count); a step with nothing to pick does nothing.
#[derive(Clone, Debug)]
enum Op {
    /// A new tensor of `len` bytes, in `pieces` regions (in reverse order in its buffer),
    /// offloaded under a new key. `late`: its producer writes it only after the offload,
    /// at a later `Produce` (or before the next fetch or drain), and the offload carries
    /// the producer's event.
    Offload {
        len: usize,
        pieces: u8,
        late: bool,
    },
    /// `count` new small tensors at once (a layer's activations), of 1 to `max_len` bytes
    /// (drawn from `seed`): packing and staging pressure. `late_first`: the first one's
    /// producer runs late, holding up the packing of its extent (and of those after it)
    /// in staging memory.
    Burst {
        count: u8,
        max_len: usize,
        seed: u64,
        late_first: bool,
    },
    /// Offloads an existing tensor again under its current key: a dedup hit while a handle
    /// of that key is live, a new copy otherwise.
    OffloadAgain {
        tensor: usize,
    },
    /// The oldest pending producer writes its tensor and fires its event.
    Produce,
    Prefetch {
        handle: usize,
    },
    /// Prefetches every live handle, newest first (as a backward pass asks).
    PrefetchAll,
    /// Fetches into a fresh, poisoned buffer split into `pieces` regions. `busy`: with
    /// `fetch_into`, into memory that is free only once a stream has written other bytes
    /// over it, after a gate opened a little later by another thread.
    Fetch {
        handle: usize,
        pieces: u8,
        busy: bool,
    },
    Release {
        handle: usize,
    },
    Drain,
    /// Overwrites a tensor's memory with new contents under a new version, if the engine
    /// has let go of every offload of it (asking `source_released` of its live handles).
    Mutate {
        tensor: usize,
    },
    /// Uses a released handle: must be refused. `what`: prefetch, fetch, release,
    /// source_released.
    Stale {
        handle: usize,
        what: u8,
    },
    Sleep {
        us: u64,
    },
}

#[derive(Clone, Debug)]
struct Case {
    setup: Setup,
    ops: Vec<Op>,
    /// End by dropping the engine with its handles live (and I/O perhaps in flight),
    /// rather than releasing them all and draining.
    drop_live: bool,
}

fn probability() -> impl Strategy<Value = f64> {
    prop_oneof![
        2 => Just(0.0),
        1 => prop::sample::select(vec![0.05, 0.1, 0.2, 0.3]),
    ]
}

fn faults() -> impl Strategy<Value = Faults> {
    (
        probability(),
        probability(),
        probability(),
        prop_oneof![
            3 => Just(None),
            1 => (256u64..16 << 10).prop_map(Some),
        ],
        prop_oneof![1 => Just(0u64), 1 => 1u64..=200],
        prop::sample::select(vec![1.0, 0.5, 0.1]),
        any::<u64>(),
    )
        .prop_map(
            |(read_error, write_error, short, enospc_after_kib, latency_us, latency_p, seed)| Faults {
                read_error,
                write_error,
                short,
                enospc_after_kib,
                latency_us,
                latency_p,
                seed,
            },
        )
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        (
            prop::sample::select(vec![2u64, 3, 4, 8]),
            prop::sample::select(vec![100u64, 75, 50]),
            prop::sample::select(vec![512u64, 256, 128]),
            prop::sample::select(vec![256u64, 128, 64, 16]),
            100u64..3000,
            prop::sample::select(vec![8192u64, 2048, 512]),
        ),
        (
            prop_oneof![2 => Just(64u64 << 10), 1 => 1024u64..8192],
            prop_oneof![3 => Just(1u8), 1 => Just(2u8)],
            prop_oneof![3 => Just(4096u64), 1 => Just(512u64)],
            prop_oneof![
                60 => Just(Storage::Reserved),
                20 => Just(Storage::Growing),
                1 => Just(Storage::MemBackend),
            ],
            prop_oneof![4 => Just(true), 1 => Just(false)],
            prop_oneof![4 => Just(true), 1 => Just(false)],
            0u32..=3,
            prop_oneof![4 => Just(true), 1 => Just(false)],
            faults(),
        ),
    )
        .prop_map(
            |(
                (
                    staging_extents,
                    prefetch_pct,
                    pack_extent_kib,
                    pack_threshold_kib,
                    flush_delay_us,
                    direct_write_kib,
                ),
                (capacity_kib, targets, alignment, storage, pack, dedup, io_retries, checksums, faults),
            )| Setup {
                staging_extents,
                prefetch_pct,
                pack_extent_kib,
                pack_threshold_kib,
                flush_delay_us,
                direct_write_kib,
                capacity_kib,
                targets,
                alignment,
                storage,
                pack,
                dedup,
                io_retries,
                checksums,
                faults,
            },
        )
}

/// Tensor sizes: mostly packed, some direct, a few of several MiB, and the boundaries.
fn tensor_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1usize..4096,
        4 => 4096usize..64 << 10,
        2 => (64usize << 10)..256 << 10,
        1 => (256usize << 10)..1 << 20,
        1 => (1usize << 20)..3 << 20,
        1 => prop::sample::select(vec![1usize, 4095, 4096, 4097, 64 << 10, 256 << 10, (256 << 10) + 1, 1 << 20, 2 << 20]),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (tensor_len(), 1u8..=3, prop::bool::weighted(0.2))
            .prop_map(|(len, pieces, late)| Op::Offload { len, pieces, late }),
        1 => (
            2u8..=32,
            prop::sample::select(vec![64usize << 10, 16 << 10, 4096]),
            any::<u64>(),
            prop::bool::weighted(0.5)
        )
            .prop_map(|(count, max_len, seed, late_first)| Op::Burst {
                count,
                max_len,
                seed,
                late_first
            }),
        2 => (0usize..16).prop_map(|tensor| Op::OffloadAgain { tensor }),
        1 => Just(Op::Produce),
        3 => (0usize..16).prop_map(|handle| Op::Prefetch { handle }),
        1 => Just(Op::PrefetchAll),
        4 => (0usize..16, 1u8..=3, prop::bool::weighted(0.2))
            .prop_map(|(handle, pieces, busy)| Op::Fetch { handle, pieces, busy }),
        3 => (0usize..16).prop_map(|handle| Op::Release { handle }),
        1 => Just(Op::Drain),
        2 => (0usize..16).prop_map(|tensor| Op::Mutate { tensor }),
        1 => (0usize..16, 0u8..4).prop_map(|(handle, what)| Op::Stale { handle, what }),
        1 => (0u64..300).prop_map(|us| Op::Sleep { us }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        setup(),
        prop::collection::vec(op(), 5..=40),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(setup, ops, drop_live)| Case {
            setup,
            ops,
            drop_live,
        })
}

// ---------------------------------------------------------------------------------------
// Contents: random bytes, unique per tensor version and position.

const POOL: usize = 8 << 20;

/// Random bytes that contents are cut from.
fn pool() -> &'static [u8] {
    static POOL_BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    POOL_BYTES.get_or_init(|| {
        let mut v = vec![0u8; POOL];
        pattern::fill(&mut v, 0x6d6f_64656c, 0);
        v
    })
}

/// Where a tag goes: the first bytes of every 4 KiB of a tensor.
const TAG_EVERY: usize = 4096;

/// The contents of a tensor version: a window of the pool at `at`, with a tag naming the
/// version (`uid`) and the position at the start of every 4 KiB, so that no two versions
/// (nor two places in one) agree. Computed where needed rather than stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Contents {
    uid: u64,
    at: usize,
    len: usize,
}

impl Contents {
    fn new(uid: u64, len: usize) -> Contents {
        let at = (pattern::splitmix64(uid) % (POOL - len + 1) as u64) as usize;
        Contents { uid, at, len }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Calls `f(offset, expected)` over bytes `[start, end)` in pieces (`offset` from
    /// `start`), while it returns true; returns whether it always did.
    fn pieces(&self, start: usize, end: usize, mut f: impl FnMut(usize, &[u8]) -> bool) -> bool {
        let pool = pool();
        let mut p = start;
        while p < end {
            let (chunk, within) = (p / TAG_EVERY, p % TAG_EVERY);
            let ok = if within < 8 {
                let tag = pattern::splitmix64(self.uid.rotate_left(32) ^ chunk as u64).to_le_bytes();
                let to = (chunk * TAG_EVERY + 8).min(end);
                let ok = f(p - start, &tag[within..within + (to - p)]);
                p = to;
                ok
            } else {
                let to = ((chunk + 1) * TAG_EVERY).min(end);
                let ok = f(p - start, &pool[self.at + p..self.at + to]);
                p = to;
                ok
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// The bytes, whole.
    fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.pieces(0, self.len, |o, e| {
            v[o..o + e.len()].copy_from_slice(e);
            true
        });
        v
    }

    /// Writes the contents into `regions` (logical order).
    ///
    /// # Safety
    /// The regions are live host-device memory nothing else uses meanwhile.
    unsafe fn write_to(&self, regions: &[Region]) {
        let mut at = 0;
        for r in regions {
            let l = r.len as usize;
            // SAFETY: forwarded contract.
            let dst = unsafe { host_mut(r.ptr, l) };
            self.pieces(at, at + l, |o, e| {
                dst[o..o + e.len()].copy_from_slice(e);
                true
            });
            at += l;
        }
    }

    /// Whether `regions` (logical order) hold the contents.
    ///
    /// # Safety
    /// As for [`Contents::write_to`].
    unsafe fn held_by(&self, regions: &[Region]) -> bool {
        let mut at = 0;
        regions.iter().all(|r| {
            let l = r.len as usize;
            // SAFETY: forwarded contract.
            let got = unsafe { host_mut(r.ptr, l) };
            let same = self.pieces(at, at + l, |o, e| got[o..o + e.len()] == *e);
            at += l;
            same
        })
    }
}

/// The host device's memory at `ptr`, `len` bytes.
///
/// # Safety
/// `ptr` must be `len` bytes of a live buffer of the host device that nothing else writes
/// (or, for `&mut`, reads) meanwhile.
unsafe fn host_mut<'a>(ptr: u64, len: usize) -> &'a mut [u8] {
    // SAFETY: forwarded contract; a host-device pointer is a host address.
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
}

/// `len` bytes of `buf` as `pieces` regions in logical order, laid out in reverse order
/// in the buffer (the first bytes of the tensor at its end), none of them empty.
fn regions(buf: &Buf, len: usize, pieces: u8) -> Vec<Region> {
    let cuts = match pieces {
        1 => vec![0, len],
        2 => vec![0, len * 3 / 7, len],
        _ => vec![0, len / 5, len * 2 / 3, len],
    };
    let lens: Vec<usize> = cuts.windows(2).map(|w| w[1] - w[0]).filter(|&l| l > 0).collect();
    let mut end = len;
    lens.iter()
        .map(|&l| {
            end -= l;
            Region::new(buf.ptr() + end as u64, l as u64)
        })
        .collect()
}

/// Reads `regions` (logical order).
///
/// # Safety
/// As for [`Contents::write_to`].
unsafe fn read_through(regions: &[Region]) -> Vec<u8> {
    let mut out = Vec::with_capacity(regions.iter().map(|r| r.len as usize).sum());
    for r in regions {
        // SAFETY: forwarded contract.
        out.extend_from_slice(unsafe { host_mut(r.ptr, r.len as usize) });
    }
    out
}

/// "n bytes differ, the first at i" (or "equal").
fn diff(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None if got.len() == want.len() => "equal".into(),
        None => format!("lengths {} and {}", got.len(), want.len()),
        Some(first) => {
            let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
            format!("{n} of {} bytes differ, the first at {first}", want.len())
        }
    }
}

// ---------------------------------------------------------------------------------------
// The watchdog: a sequence that hangs aborts the process, naming it.

const STUCK_AFTER: Duration = Duration::from_secs(30);

struct Watched {
    since: Instant,
    case: Case,
    /// The step now running (`ops.len()`: the final checks).
    step: Arc<AtomicUsize>,
}

/// The sequence each worker runs, by worker.
static WATCHED: Mutex<Vec<Option<Watched>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn start_watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        thread::Builder::new()
            .name("engine-model-watchdog".into())
            .spawn(|| loop {
                thread::sleep(Duration::from_millis(250));
                let watched = lock(&WATCHED);
                for w in watched.iter().flatten() {
                    if w.since.elapsed() > STUCK_AFTER {
                        eprintln!(
                            "engine model: a sequence has run for more than {STUCK_AFTER:?}, stuck at step {} of {}: {:#?}",
                            w.step.load(Ordering::SeqCst),
                            w.case.ops.len(),
                            w.case
                        );
                        std::process::abort();
                    }
                }
            })
            .expect("starting the watchdog");
    });
}

/// Watches worker `worker`'s `case` until dropped.
struct Watch {
    worker: usize,
    step: Arc<AtomicUsize>,
}

impl Watch {
    fn new(worker: usize, case: &Case) -> Watch {
        start_watchdog();
        let step = Arc::new(AtomicUsize::new(0));
        let mut watched = lock(&WATCHED);
        if watched.len() <= worker {
            watched.resize_with(worker + 1, || None);
        }
        watched[worker] = Some(Watched {
            since: Instant::now(),
            case: case.clone(),
            step: step.clone(),
        });
        Watch { worker, step }
    }

    fn step(&self, i: usize) {
        self.step.store(i, Ordering::SeqCst);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&WATCHED)[self.worker] = None;
    }
}

/// The tests of this file run one at a time, so that the threads each sequence starts can
/// be counted.
static SERIAL: Mutex<()> = Mutex::new(());

/// Threads of this process, where Linux says.
fn threads() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

// ---------------------------------------------------------------------------------------
// The rig and the model.

/// A backend over host memory like [`MemBackend`] (requests run in order on a worker
/// thread; the host device's memory is host memory), but quick in a debug build: a target
/// is one recycled buffer of `size` bytes, where `MemBackend` grows a vector byte by byte
/// and starts a thread per request. A request past the end fails (the engine placed an
/// extent past its capacity).
#[derive(Debug)]
struct HostStore {
    size: usize,
    /// Reads past the furthest byte written fail (as on a file that grows), or not (as on
    /// a target sized in advance).
    growing: bool,
    stores: Arc<Mutex<HashMap<TargetId, Store>>>,
    next: AtomicUsize,
    tx: Mutex<Option<mpsc::Sender<(IoRequest, Completer)>>>,
    worker: Mutex<Option<thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Store {
    /// Recycled memory: where nothing was written, it holds what an earlier sequence left
    /// (as a reused device does).
    data: Buf,
    /// The end of the furthest write.
    end: usize,
}

impl HostStore {
    fn new(size: usize, growing: bool) -> std::io::Result<HostStore> {
        let stores: Arc<Mutex<HashMap<TargetId, Store>>> = Arc::default();
        let (tx, rx) = mpsc::channel::<(IoRequest, Completer)>();
        let worker = {
            let stores = stores.clone();
            thread::Builder::new().name("model-store".into()).spawn(move || {
                for (req, done) in rx {
                    let r = HostStore::run(&mut lock(&stores), growing, req);
                    done.complete(r);
                }
            })?
        };
        Ok(HostStore {
            size,
            growing,
            stores,
            next: AtomicUsize::new(0),
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    fn run(
        stores: &mut HashMap<TargetId, Store>,
        growing: bool,
        req: IoRequest,
    ) -> spillway_runtime::Result<usize> {
        let store = stores
            .get_mut(&req.target)
            .ok_or_else(|| Error::invalid(format!("target {:?} is not open", req.target)))?;
        let len = req.mem.len();
        let (start, end) = (req.offset as usize, req.offset as usize + len);
        let data = &mut store.data.mem[..store.data.len];
        if end > data.len() {
            return Err(Error::invalid(format!(
                "{} of {len} bytes at {start} is past the end of the {}-byte store",
                req.op.as_str(),
                data.len()
            )));
        }
        // Host-device memory is host memory.
        let mem = req.mem.addr() as *mut u8;
        match req.op {
            IoOp::Write => {
                // SAFETY: the submitter keeps the memory valid for `len` bytes until the
                // request completes (Backend::submit's contract).
                data[start..end].copy_from_slice(unsafe { std::slice::from_raw_parts(mem, len) });
                store.end = store.end.max(end);
            }
            IoOp::Read => {
                if growing && end > store.end {
                    // Like a read at the end of a file: what was written, and its count.
                    let moved = store.end.saturating_sub(start).min(len);
                    // SAFETY: as above; `moved` is at most `len`.
                    unsafe { std::slice::from_raw_parts_mut(mem, moved) }
                        .copy_from_slice(&data[start..start + moved]);
                    return Ok(moved);
                }
                // SAFETY: as above, and nothing else touches the memory meanwhile.
                unsafe { std::slice::from_raw_parts_mut(mem, len) }.copy_from_slice(&data[start..end]);
            }
        }
        Ok(len)
    }
}

impl Backend for HostStore {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "model-store",
            host_staging: true,
            transfer_mode: None,
            details: vec![("growing".into(), self.growing.to_string())],
        }
    }

    fn open(&self, _target: &Target) -> spillway_runtime::Result<(TargetId, TargetInfo)> {
        let id = TargetId(self.next.fetch_add(1, Ordering::SeqCst) as u32 + 1);
        let store = Store {
            data: Buf::new(self.size),
            end: 0,
        };
        lock(&self.stores).insert(id, store);
        let info = TargetInfo {
            direct_io: false,
            offset_align: 1,
            size: if self.growing { 0 } else { self.size as u64 },
            warning: None,
        };
        Ok((id, info))
    }

    unsafe fn submit(&self, req: IoRequest) -> spillway_runtime::Result<Ticket> {
        let (ticket, done) = spillway_runtime::ticket();
        lock(&self.tx)
            .as_ref()
            .and_then(|tx| tx.send((req, done)).ok())
            .ok_or_else(|| Error::invalid("the store has shut down"))?;
        Ok(ticket)
    }

    fn flush(&self, _target: TargetId) -> spillway_runtime::Result<()> {
        Ok(())
    }

    fn close(&self, target: TargetId) -> spillway_runtime::Result<()> {
        lock(&self.stores)
            .remove(&target)
            .map(|_| ())
            .ok_or_else(|| Error::invalid(format!("target {target:?} is not open")))
    }
}

impl Drop for HostStore {
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(w) = lock(&self.worker).take() {
            let _ = w.join();
        }
    }
}

/// One `offload` of a tensor's memory: done once its callback has run, or
/// `source_released` said so while its handle was live.
struct Claim {
    handle: Handle,
    freed: Arc<AtomicBool>,
    seen_released: bool,
}

impl Claim {
    fn done(&self) -> bool {
        self.seen_released || self.freed.load(Ordering::SeqCst)
    }
}

/// A tensor: its memory, regions, current key and contents.
struct Tensor {
    buf: Buf,
    regions: Vec<Region>,
    storage: u64,
    version: u64,
    contents: Contents,
    /// The event of its producer while that has not run.
    producing: Option<Arc<dyn Event>>,
    claims: Vec<Claim>,
}

impl Tensor {
    fn key(&self) -> TensorKey {
        TensorKey::new(self.storage, self.version)
    }
}

/// A live handle and what it must read back.
struct Live {
    handle: Handle,
    tensor: usize,
    key: TensorKey,
    contents: Contents,
}

/// A destination still being written by the rig's stream (see [`Rig::busy_until`]).
struct Busy {
    /// Completes once the stream has written over the destination.
    free: Arc<dyn Event>,
    /// Opens the stream's gate.
    opener: thread::JoinHandle<()>,
    stream: Arc<dyn Stream>,
}

impl Busy {
    /// Waits until the gate is open and the stream is done with the destination.
    fn settle(self) {
        let _ = self.opener.join();
        let _ = self.stream.synchronize();
    }
}

/// Producers that have not run, oldest first. Dropping fires them all, so that an engine
/// dropped after a failed check does not wait for them forever.
#[derive(Default)]
struct Producers(VecDeque<(usize, HostEventTrigger)>);

impl Drop for Producers {
    fn drop(&mut self) {
        for (_, t) in self.0.drain(..) {
            t.fire();
        }
    }
}

/// Live handles fetched at the end of a sequence, at most.
const FINAL_FETCHES: usize = 4;

/// What one sequence did, summed over sequences for the report.
#[derive(Clone, Debug, Default)]
struct Tally {
    sequences: u64,
    ops: u64,
    fetch_ok: u64,
    fetch_errors: u64,
    mutations: u64,
    late_producers: u64,
    busy_fetches: u64,
    stale_refused: u64,
    dropped_live: u64,
    counters: CounterSnapshot,
    injected: FaultStats,
}

fn add_counters(a: &mut CounterSnapshot, b: &CounterSnapshot) {
    macro_rules! sum {
        ($($f:ident),*) => { $(a.$f += b.$f;)* };
    }
    sum!(
        offloads,
        dedup_hits,
        packed_tensors,
        direct_tensors,
        fetches,
        forwarded_fetches,
        prefetch_hits,
        demand_reads,
        prefetched_extents,
        prefetch_evictions,
        cancelled_tensors,
        resident_tensors,
        write_errors,
        read_errors,
        write_retries,
        read_retries,
        no_space_errors,
        staging_wait_ns
    );
}

fn add_injected(a: &mut FaultStats, b: &FaultStats) {
    a.requests += b.requests;
    a.injected_read_errors += b.injected_read_errors;
    a.injected_write_errors += b.injected_write_errors;
    a.injected_enospc += b.injected_enospc;
    a.injected_short += b.injected_short;
    a.delayed += b.delayed;
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)*)));
        }
    };
}

/// Turns an engine error where none may be into a failure naming the step.
fn ok<T>(r: spillway_runtime::Result<T>, what: &str) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{what}: unexpected error: {e}")))
}

struct Rig {
    // Fields drop in this order: pending producers fire before the engine drains on drop,
    // and the tensors' memory goes only after the engine.
    producers: Producers,
    engine: Engine,
    /// The stream that keeps destinations busy (made when first needed).
    stream: Option<Arc<dyn Stream>>,
    faults: Arc<FaultyBackend>,
    tensors: Vec<Tensor>,
    setup: Setup,
    live: Vec<Live>,
    released: Vec<Handle>,
    /// Live handles per key.
    live_keys: HashMap<TensorKey, usize>,
    next_uid: u64,
    offloads: u64,
    dedup_hits: u64,
    fetch_calls: u64,
    fetch_bytes: u64,
    tally: Tally,
}

impl Rig {
    fn new(setup: &Setup) -> Result<Rig, TestCaseError> {
        let dev: Arc<dyn Device> = Arc::new(HostDevice::new());
        let capacity = setup.capacity_kib << 10;
        let mem: Arc<dyn Backend> = match setup.storage {
            Storage::MemBackend => Arc::new(ok(MemBackend::new(dev.clone()), "the memory backend")?),
            s => Arc::new(
                HostStore::new(capacity as usize, s == Storage::Growing)
                    .map_err(|e| TestCaseError::fail(format!("starting the store: {e}")))?,
            ),
        };
        let faults = Arc::new(ok(
            FaultyBackend::new(mem, setup.faults.plan()),
            "the fault plan",
        )?);
        let targets = (0..setup.targets)
            .map(|i| StorageTarget::new(Target::new(format!("/model/spill{i}")), capacity))
            .collect();
        let engine = ok(
            Engine::new(dev, faults.clone(), targets, setup.config()),
            "starting the engine",
        )?;
        Ok(Rig {
            producers: Producers::default(),
            engine,
            stream: None,
            faults,
            tensors: Vec::new(),
            setup: setup.clone(),
            live: Vec::new(),
            released: Vec::new(),
            live_keys: HashMap::new(),
            next_uid: 0,
            offloads: 0,
            dedup_hits: 0,
            fetch_calls: 0,
            fetch_bytes: 0,
            tally: Tally::default(),
        })
    }

    fn uid(&mut self) -> u64 {
        self.next_uid += 1;
        self.next_uid
    }

    /// Offloads tensor `t` under its current key, with its producer's event if pending.
    fn offload(&mut self, t: usize) -> Result<(), TestCaseError> {
        let freed = Arc::new(AtomicBool::new(false));
        let flag = freed.clone();
        let tensor = &self.tensors[t];
        let key = tensor.key();
        // SAFETY: the memory stays allocated until the rig is dropped, after the engine, and
        // unmodified until every claim on it is done (`mutate`); a late producer writes it
        // before firing the event the offload waits for.
        let handle = unsafe {
            self.engine
                .offload_with_callback(key, &tensor.regions, tensor.producing.clone(), move || {
                    assert!(!flag.swap(true, Ordering::SeqCst), "a source callback ran twice");
                })
        };
        let handle = ok(handle, "offload")?;
        self.offloads += 1;
        let n = self.live_keys.entry(key).or_default();
        if *n > 0 && self.setup.dedup {
            self.dedup_hits += 1;
        }
        *n += 1;
        let tensor = &mut self.tensors[t];
        tensor.claims.push(Claim {
            handle,
            freed,
            seen_released: false,
        });
        self.live.push(Live {
            handle,
            tensor: t,
            key,
            contents: tensor.contents,
        });
        Ok(())
    }

    /// Offloads a new tensor of `len` bytes in `pieces` regions under a new key; `late`:
    /// its producer has not run yet.
    fn offload_new(&mut self, len: usize, pieces: u8, late: bool) -> Result<(), TestCaseError> {
        let buf = ok(alloc(len), "allocating a tensor")?;
        let regions = regions(&buf, len, pieces);
        let uid = self.uid();
        let contents = Contents::new(uid, len);
        let t = self.tensors.len();
        let producing = if late {
            // The memory holds whatever it held before until the producer runs.
            let (event, trigger) = HostEvent::manual();
            self.producers.0.push_back((t, trigger));
            self.tally.late_producers += 1;
            Some(Arc::new(event) as Arc<dyn Event>)
        } else {
            // SAFETY: a new buffer nothing else uses yet.
            unsafe { contents.write_to(&regions) };
            None
        };
        self.tensors.push(Tensor {
            buf,
            regions,
            storage: t as u64,
            version: 0,
            contents,
            producing,
            claims: Vec::new(),
        });
        self.offload(t)
    }

    /// Runs tensor `t`'s producer, if pending: writes its contents, fires its event.
    fn produce(&mut self, t: usize) {
        let Some(i) = self.producers.0.iter().position(|(x, _)| *x == t) else {
            return;
        };
        let (_, trigger) = self.producers.0.remove(i).expect("found");
        let tensor = &mut self.tensors[t];
        // SAFETY: the engine reads the memory only once the event has fired.
        unsafe { tensor.contents.write_to(&tensor.regions) };
        tensor.producing = None;
        trigger.fire();
    }

    fn produce_all(&mut self) {
        while let Some(&(t, _)) = self.producers.0.front() {
            self.produce(t);
        }
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Offload { len, pieces, late } => self.offload_new(len, pieces, late)?,
            Op::Burst {
                count,
                max_len,
                seed,
                late_first,
            } => {
                for i in 0..u64::from(count) {
                    let len = 1 + (pattern::splitmix64(seed ^ i) % max_len as u64) as usize;
                    self.offload_new(len, 1, late_first && i == 0)?;
                }
            }
            Op::OffloadAgain { tensor } if !self.tensors.is_empty() => {
                self.offload(tensor % self.tensors.len())?;
            }
            Op::Produce => {
                if let Some(&(t, _)) = self.producers.0.front() {
                    self.produce(t);
                }
            }
            Op::Prefetch { handle } if !self.live.is_empty() => {
                let h = self.live[handle % self.live.len()].handle;
                ok(self.engine.prefetch(h), "prefetch")?;
            }
            Op::PrefetchAll => {
                for l in self.live.iter().rev() {
                    ok(self.engine.prefetch(l.handle), "prefetch")?;
                }
            }
            Op::Fetch { handle, pieces, busy } if !self.live.is_empty() => {
                self.produce_all();
                self.fetch(handle % self.live.len(), pieces, busy)?;
            }
            Op::Release { handle } if !self.live.is_empty() => {
                let l = self.live.remove(handle % self.live.len());
                ok(self.engine.release(l.handle), "release")?;
                *self.live_keys.get_mut(&l.key).expect("counted") -= 1;
                self.released.push(l.handle);
            }
            Op::Drain => {
                self.produce_all();
                ok(self.engine.drain(), "drain")?;
                let used = self.engine.storage_usage();
                check!(
                    used.used <= u64::from(self.setup.targets) * (self.setup.capacity_kib << 10),
                    "more storage in use than the capacity: {used:?}"
                );
                check!(
                    self.engine.staging_in_use() <= self.setup.staging_bytes(),
                    "more staging in use than there is"
                );
            }
            Op::Mutate { tensor } if !self.tensors.is_empty() => self.mutate(tensor % self.tensors.len())?,
            Op::Stale { handle, what } if !self.released.is_empty() => {
                let h = self.released[handle % self.released.len()];
                let refused = match what {
                    0 => self.engine.prefetch(h).is_err(),
                    1 => {
                        let dst = ok(alloc(4096), "allocating")?;
                        // SAFETY: `dst` outlives the call; a refused fetch copies nothing.
                        let r = unsafe { self.engine.fetch(h, &[Region::new(dst.ptr(), 4096)]) };
                        if let Ok(ev) = &r {
                            let _ = ev.synchronize();
                        }
                        r.is_err()
                    }
                    2 => self.engine.release(h).is_err(),
                    _ => self.engine.source_released(h).is_err(),
                };
                check!(refused, "released handle {h:?} was not refused (what {what})");
                self.tally.stale_refused += 1;
            }
            Op::Sleep { us } => thread::sleep(Duration::from_micros(us)),
            _ => {}
        }
        check!(
            self.engine.live_handles() == self.live.len(),
            "live handles: the engine has {}, the model {}",
            self.engine.live_handles(),
            self.live.len()
        );
        Ok(())
    }

    /// Fetches live handle `i` into a poisoned buffer of `pieces` regions and checks it;
    /// `busy`: see [`Op::Fetch`].
    fn fetch(&mut self, i: usize, pieces: u8, busy: bool) -> Result<(), TestCaseError> {
        let uid = self.uid();
        let Live {
            handle,
            tensor,
            key,
            contents,
        } = self.live[i];
        let len = contents.len();
        let dst = ok(alloc(len), "allocating a destination")?;
        // Poisoned with other random bytes: a recycled buffer may hold these very contents.
        let at = (pattern::splitmix64(uid) % (POOL - len + 1) as u64) as usize;
        // SAFETY: a buffer nothing else uses.
        unsafe { host_mut(dst.ptr(), len) }.copy_from_slice(&pool()[at..at + len]);
        let dst_regions = regions(&dst, len, pieces);
        let busy = if busy {
            Some(self.busy_until(&dst, uid)?)
        } else {
            None
        };
        self.fetch_calls += 1;
        self.fetch_bytes += len as u64;
        // SAFETY: `dst` lives until the event has completed (or the fetch failed, having
        // waited for its reads), and, busy, until the stream's write to it has completed.
        let fetched = unsafe {
            match &busy {
                Some(b) => self.engine.fetch_into(handle, &dst_regions, Some(b.free.clone())),
                None => self.engine.fetch(handle, &dst_regions),
            }
        };
        let fetched = match fetched {
            Ok(ev) => ev.synchronize().map(|()| true),
            Err(e) => Err(e),
        };
        if let Some(b) = busy {
            b.settle();
        }
        match fetched {
            Ok(_) => {
                // SAFETY: the fetch (and any stream write) has completed; nothing else uses
                // `dst`.
                let same = unsafe { contents.held_by(&dst_regions) };
                check!(
                    same,
                    "fetch of {handle:?} (key {key:?}, tensor {tensor}) returned wrong bytes: {}",
                    // SAFETY: as above.
                    diff(&unsafe { read_through(&dst_regions) }, &contents.bytes())
                );
                self.tally.fetch_ok += 1;
            }
            Err(e) => {
                check!(
                    self.setup.faults.reads_may_fail(),
                    "fetch of {handle:?} failed with no read faults injected: {e}"
                );
                let eio = matches!(&e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EIO));
                check!(
                    eio || matches!(e, Error::ShortIo { .. }),
                    "fetch of {handle:?} failed with an error that is not a read's: {e}"
                );
                self.tally.fetch_errors += 1;
            }
        }
        Ok(())
    }

    /// Makes `dst` busy: the rig's stream waits for a gate that another thread opens a
    /// little later, then writes other bytes over `dst`; returns the event after which
    /// `dst` is free.
    fn busy_until(&mut self, dst: &Buf, uid: u64) -> Result<Busy, TestCaseError> {
        if self.stream.is_none() {
            self.stream = Some(ok(HostDevice::new().create_stream(), "creating a stream")?);
        }
        let stream = self.stream.clone().expect("just made");
        let (gate, opener) = HostEvent::manual();
        // The gate opens whatever happens below, so the stream never waits for ever.
        let delay = Duration::from_micros(pattern::splitmix64(uid) % 300);
        let opener = thread::Builder::new()
            .name("model-gate".into())
            .spawn(move || {
                thread::sleep(delay);
                opener.fire();
            })
            .map_err(|e| TestCaseError::fail(format!("starting the gate thread: {e}")))?;
        ok(stream.wait_event(&gate), "waiting on the gate")?;
        let len = dst.len();
        let at = (pattern::splitmix64(uid ^ 0xb05e) % (POOL - len + 1) as u64) as usize;
        // SAFETY: the pool lives for the whole process; `dst` lives until `Busy::settle`
        // has waited for the stream.
        ok(
            unsafe { stream.copy_h2d(dst.ptr(), pool()[at..].as_ptr(), len) },
            "writing over the destination",
        )?;
        let free: Arc<dyn Event> = Arc::from(ok(stream.record(), "recording")?);
        self.tally.busy_fetches += 1;
        Ok(Busy { free, opener, stream })
    }

    /// Overwrites tensor `t` under a new version, if every offload of it is done with.
    fn mutate(&mut self, t: usize) -> Result<(), TestCaseError> {
        let live: Vec<Handle> = self.live.iter().map(|l| l.handle).collect();
        for c in &mut self.tensors[t].claims {
            if !live.contains(&c.handle) {
                continue;
            }
            // A callback that ran means the engine has let go (the flag is read first, so
            // that a callback running in between cannot fail this).
            let freed = c.freed.load(Ordering::SeqCst);
            let released = ok(self.engine.source_released(c.handle), "source_released")?;
            check!(
                released || !freed,
                "the source callback of {:?} ran but source_released says the memory is held",
                c.handle
            );
            c.seen_released |= released;
        }
        if !self.tensors[t].claims.iter().all(Claim::done) {
            return Ok(());
        }
        self.produce(t);
        let uid = self.uid();
        let tensor = &mut self.tensors[t];
        tensor.version += 1;
        tensor.contents = Contents::new(uid, tensor.buf.len());
        tensor.claims.clear();
        // SAFETY: the engine has let go of every offload of this memory.
        unsafe { tensor.contents.write_to(&tensor.regions) };
        self.tally.mutations += 1;
        Ok(())
    }

    /// Fetches some live handles; with `release`, releases them all, drains, and checks
    /// that everything was given back. Then checks that the counters add up.
    fn finish(&mut self, release: bool) -> Result<(), TestCaseError> {
        self.produce_all();
        // Some live handles read back, spread over them (all of them would take as long as
        // the rest of a sequence after a burst).
        let n = self.live.len();
        let picks = n.min(FINAL_FETCHES);
        for k in 0..picks {
            self.fetch(k * n / picks, 1, false)?;
        }
        let e = &self.engine;
        if release {
            for l in std::mem::take(&mut self.live) {
                ok(e.release(l.handle), "release")?;
            }
            ok(e.drain(), "the final drain")?;
            check!(e.live_handles() == 0, "handles left: {}", e.live_handles());
            check!(
                e.staging_in_use() == 0,
                "staging left in use: {}",
                e.staging_in_use()
            );
            let used = e.storage_usage();
            check!(
                used.used == 0 && used.live_extents == 0,
                "storage left in use: {used:?}"
            );
            for (t, tensor) in self.tensors.iter().enumerate() {
                for c in &tensor.claims {
                    check!(
                        c.freed.load(Ordering::SeqCst),
                        "tensor {t}: the source callback of {:?} has not run after the final drain",
                        c.handle
                    );
                }
            }
        }

        let c = e.stats().counters;
        let s = self.faults.stats();
        let f = &self.setup.faults;
        check!(
            c.offloads == self.offloads,
            "offloads: {} counted, {} made",
            c.offloads,
            self.offloads
        );
        check!(
            c.dedup_hits == self.dedup_hits,
            "dedup hits: {} counted, {} expected",
            c.dedup_hits,
            self.dedup_hits
        );
        check!(
            c.fetches == self.fetch_calls && c.fetch_bytes == self.fetch_bytes,
            "fetches: {} of {} bytes counted, {} of {} made",
            c.fetches,
            c.fetch_bytes,
            self.fetch_calls,
            self.fetch_bytes
        );
        check!(
            c.forwarded_fetches + c.prefetch_hits + c.demand_reads == c.fetches,
            "fetches served: {c:?}"
        );
        check!(
            c.read_errors >= self.tally.fetch_errors,
            "{} fetches failed but {} read errors counted",
            self.tally.fetch_errors,
            c.read_errors
        );
        self.tally.sequences = 1;
        self.tally.dropped_live += u64::from(!release);
        if !release {
            // I/O may be in flight: what it counts may still change.
            return Ok(());
        }
        if !f.reads_may_fail() {
            check!(
                c.read_errors == 0 && c.read_retries == 0,
                "read errors with no read faults injected: {c:?}"
            );
        }
        check!(
            s.requests == c.writes + c.reads,
            "the backend saw {} requests, the engine counted {} writes and {} reads",
            s.requests,
            c.writes,
            c.reads
        );
        check!(
            c.read_retries <= s.injected_read_errors && c.write_retries <= s.injected_write_errors,
            "more retries than injected errors: {c:?} {s:?}"
        );
        check!(
            c.checksum_errors == 0 && (self.setup.checksums || c.verified_bytes == 0),
            "checksums failed (or ran while off) though no fault changes data: {c:?}"
        );
        check!(
            c.no_space_errors <= s.injected_enospc,
            "more ENOSPC than injected: {c:?} {s:?}"
        );
        check!(
            c.write_errors <= s.injected_write_errors + s.injected_enospc + s.injected_short,
            "more failed writes than faults injected: {c:?} {s:?}"
        );
        check!(
            c.resident_tensors >= c.no_space_errors,
            "ENOSPC kept fewer tensors resident than it failed writes: {c:?}"
        );
        check!(
            c.staging_peak <= self.setup.staging_bytes(),
            "staging peak {} past the budget",
            c.staging_peak
        );
        // Summed over sequences, this counts the sequences where packing waited.
        let c = CounterSnapshot {
            staging_wait_ns: u64::from(c.staging_wait_ns > 0),
            ..c
        };
        add_counters(&mut self.tally.counters, &c);
        add_injected(&mut self.tally.injected, &s);
        Ok(())
    }
}

/// Host-device memory (host memory) of `len` bytes, from buffers recycled between
/// sequences: allocating (and faulting in) fresh memory would cost more than the rest of a
/// sequence. Its contents are whatever the last user left.
struct Buf {
    mem: Vec<u8>,
    len: usize,
}

/// Free buffers by size class (a power of two).
static FREE_BUFS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

impl Buf {
    fn new(len: usize) -> Buf {
        let class = len.max(4096).next_power_of_two();
        let mut free = lock(&FREE_BUFS);
        let mem = match free.iter().position(|b| b.len() == class) {
            Some(i) => free.swap_remove(i),
            None => vec![0; class],
        };
        Buf { mem, len }
    }

    fn ptr(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl fmt::Debug for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buf({:#x}, {} bytes)", self.ptr(), self.len)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        lock(&FREE_BUFS).push(std::mem::take(&mut self.mem));
    }
}

fn alloc(len: usize) -> spillway_runtime::Result<Buf> {
    Ok(Buf::new(len))
}

/// Runs one sequence on worker `worker`; returns what it did. `count_threads`: check that
/// the threads the sequence started have ended (only when nothing else starts threads
/// meanwhile).
fn run_case(worker: usize, case: &Case, count_threads: bool) -> Result<Tally, TestCaseError> {
    let watch = Watch::new(worker, case);
    let before = if count_threads { threads() } else { None };
    let tally = {
        let mut rig = Rig::new(&case.setup)?;
        for (i, op) in case.ops.iter().enumerate() {
            watch.step(i);
            rig.step(op)
                .map_err(|e| TestCaseError::fail(format!("step {i} ({op:?}): {e}")))?;
        }
        watch.step(case.ops.len());
        rig.finish(!case.drop_live)
            .map_err(|e| TestCaseError::fail(format!("final checks: {e}")))?;
        let mut tally = rig.tally.clone();
        tally.ops = case.ops.len() as u64;
        let freed: Vec<_> = rig
            .tensors
            .iter()
            .flat_map(|t| t.claims.iter().map(|c| (c.handle, c.freed.clone())))
            .collect();
        drop(rig);
        // Dropping the engine lets go of every source.
        for (h, f) in freed {
            check!(
                f.load(Ordering::SeqCst),
                "final checks: the source callback of {h:?} has not run after the engine was dropped"
            );
        }
        tally
    };
    if let Some(before) = before {
        let now = threads_down_to(before);
        check!(
            now <= before,
            "{} threads left running after the engine and its backend were dropped ({before} before)",
            now - before
        );
    }
    Ok(tally)
}

/// The threads of this process once they are `target` or fewer, or after 5 s: a thread
/// that was joined may linger in /proc for a moment.
fn threads_down_to(target: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = threads().unwrap_or(0);
        if now <= target || Instant::now() > deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

impl Tally {
    fn add(&mut self, t: &Tally) {
        self.sequences += t.sequences;
        self.ops += t.ops;
        self.fetch_ok += t.fetch_ok;
        self.fetch_errors += t.fetch_errors;
        self.mutations += t.mutations;
        self.late_producers += t.late_producers;
        self.busy_fetches += t.busy_fetches;
        self.dropped_live += t.dropped_live;
        self.stale_refused += t.stale_refused;
        add_counters(&mut self.counters, &t.counters);
        add_injected(&mut self.injected, &t.injected);
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counters;
        let s = &self.injected;
        write!(
            f,
            "{} sequences, {} ops; fetches {} ok, {} failed (injected read faults); {} sources \
             overwritten after release, {} late producers, {} fetches into busy memory, {} stale handles refused; {} engines dropped with live handles;\n  engine: \
             offloads {}, dedup hits {}, packed {}, direct {}, forwarded {}, prefetch hits {}, demand \
             reads {}, prefetched extents {}, evictions {}, cancelled {}, resident {}, write errors {} \
             (ENOSPC {}), read errors {}, retries {} writes / {} reads, sequences with staging waits {};\n  \
             injected: {} requests, {} read EIO, {} write EIO, {} ENOSPC, {} short, {} delayed",
            self.sequences,
            self.ops,
            self.fetch_ok,
            self.fetch_errors,
            self.mutations,
            self.late_producers,
            self.busy_fetches,
            self.stale_refused,
            self.dropped_live,
            c.offloads,
            c.dedup_hits,
            c.packed_tensors,
            c.direct_tensors,
            c.forwarded_fetches,
            c.prefetch_hits,
            c.demand_reads,
            c.prefetched_extents,
            c.prefetch_evictions,
            c.cancelled_tensors,
            c.resident_tensors,
            c.write_errors,
            c.no_space_errors,
            c.read_errors,
            c.write_retries,
            c.read_retries,
            c.staging_wait_ns,
            s.requests,
            s.injected_read_errors,
            s.injected_write_errors,
            s.injected_enospc,
            s.injected_short,
            s.delayed
        )
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
    )
}

/// Runs `cases` random sequences from `seed` on worker `worker`; returns their tally, or
/// why one failed and the smallest sequence found that fails so.
fn run_model(worker: usize, cases: u32, seed: u64, count_threads: bool) -> Result<Tally, String> {
    let mut seed_bytes = [0u8; 16];
    for (i, chunk) in seed_bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern::splitmix64(seed ^ i as u64).to_le_bytes());
    }
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::XorShift, &seed_bytes));
    let total = std::cell::RefCell::new(Tally::default());
    let result = runner.run(&case(), |case| {
        let t = run_case(worker, &case, count_threads)?;
        total.borrow_mut().add(&t);
        Ok(())
    });
    match result {
        Ok(()) => Ok(total.into_inner()),
        Err(TestError::Fail(why, case)) => Err(format!("{why}\nminimal failing sequence: {case:#?}")),
        Err(TestError::Abort(why)) => Err(format!("aborted: {why}")),
    }
}

/// `SPILLWAY_MODEL_CASES` sequences (default 10 000) from `SPILLWAY_MODEL_SEED` (default:
/// from the clock), over `SPILLWAY_MODEL_WORKERS` threads (default: the CPUs, at most 4;
/// the sequences wait on I/O and on the engine's threads much of the time). With one
/// worker, each sequence checks that the threads it started have ended; with more, the
/// check is over the whole run.
#[test]
fn the_engine_under_faults_matches_the_model() {
    let _serial = lock(&SERIAL);
    let cases = env_u64("SPILLWAY_MODEL_CASES").unwrap_or(10_000);
    let seed = env_u64("SPILLWAY_MODEL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let workers = env_u64("SPILLWAY_MODEL_WORKERS")
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get().min(4) as u64))
        .clamp(1, cases.max(1));
    eprintln!(
        "engine model: {cases} sequences on {workers} workers, SPILLWAY_MODEL_SEED={seed} SPILLWAY_MODEL_WORKERS={workers}"
    );
    start_watchdog();
    pool();
    let before = threads();
    let start = Instant::now();
    let results: Vec<Result<Tally, String>> = thread::scope(|s| {
        let runs: Vec<_> = (0..workers)
            .map(|w| {
                let n = cases / workers + u64::from(w < cases % workers);
                let seed = seed.wrapping_add(w);
                s.spawn(move || run_model(w as usize, n as u32, seed, workers == 1))
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().unwrap_or_else(|_| Err("the worker panicked".into())))
            .collect()
    });
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for (w, r) in results.into_iter().enumerate() {
        match r {
            Ok(t) => tally.add(&t),
            Err(why) => failures.push(format!(
                "worker {w} (SPILLWAY_MODEL_SEED={seed} SPILLWAY_MODEL_WORKERS={workers}): {why}"
            )),
        }
    }
    assert!(failures.is_empty(), "engine model:\n{}", failures.join("\n\n"));
    eprintln!("engine model: {tally}\n  in {:.1?}", start.elapsed());
    if let Some(before) = before {
        let now = threads_down_to(before);
        assert!(
            now <= before,
            "engine model: {} threads left running after every engine was dropped; run with \
             SPILLWAY_MODEL_WORKERS=1 to find the sequence",
            now - before
        );
    }
    assert_eq!(tally.sequences, cases);
    if cases >= 1000 {
        // Every path the model is meant to reach was reached.
        let c = &tally.counters;
        let reached = [
            ("dedup hits", c.dedup_hits),
            ("packed tensors", c.packed_tensors),
            ("direct tensors", c.direct_tensors),
            ("forwarded fetches", c.forwarded_fetches),
            ("prefetch hits", c.prefetch_hits),
            ("demand reads", c.demand_reads),
            ("prefetch evictions", c.prefetch_evictions),
            ("cancelled writes", c.cancelled_tensors),
            ("resident tensors", c.resident_tensors),
            ("write errors", c.write_errors),
            ("ENOSPC", c.no_space_errors),
            ("read errors", c.read_errors),
            ("write retries", c.write_retries),
            ("read retries", c.read_retries),
            ("staging waits", c.staging_wait_ns),
            ("failed fetches", tally.fetch_errors),
            ("overwritten sources", tally.mutations),
            ("late producers", tally.late_producers),
            ("fetches into busy memory", tally.busy_fetches),
            ("stale handles", tally.stale_refused),
            ("engines dropped with live handles", tally.dropped_live),
            ("short requests", tally.injected.injected_short),
        ];
        for (what, n) in reached {
            assert!(n > 0, "no {what} in {cases} sequences: {tally}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bugs the model found, each reduced to a test.

/// Found by the model (a sequence with no faults at all counted a read error). A tensor
/// written straight from its memory ends its extent off the alignment: the write moves
/// `len` bytes, the extent is `len` rounded up. A prefetch reads the whole extent, so on a
/// target that ends where its last write did (a [`MemBackend`] target, a file that grows
/// as written) the read-ahead of the last extent ran past the end and failed with a short
/// read: counted in `read_errors` with nothing injected, its staging wasted, and the fetch
/// reading on demand instead. A load is now done once the tensors' bytes have come.
#[test]
fn a_read_ahead_of_the_last_direct_extent_reads_past_the_end_of_storage() {
    let _serial = lock(&SERIAL);
    let dev: Arc<dyn Device> = Arc::new(HostDevice::new());
    let mem = Arc::new(MemBackend::new(dev.clone()).unwrap());
    let cfg = EngineConfig {
        staging_bytes: 4 << 20,
        prefetch_bytes: 2 << 20,
        pack_threshold: 256 << 10,
        pack_extent_bytes: 1 << 20,
        ..EngineConfig::default()
    };
    let e = Engine::new(
        dev,
        mem,
        vec![StorageTarget::new(Target::new("/spill"), 64 << 20)],
        cfg,
    )
    .unwrap();
    let len = (300 << 10) + 1; // direct (over the threshold), off the 4096-byte alignment
    let src = alloc(len).unwrap();
    let bytes = Contents::new(1, len).bytes();
    // SAFETY: a new buffer, kept until after the engine is dropped.
    unsafe { host_mut(src.ptr(), len) }.copy_from_slice(&bytes);
    // SAFETY: `src` outlives the engine and is not written again.
    let h = unsafe { e.offload(TensorKey::new(1, 0), &[Region::new(src.ptr(), len as u64)], None) }.unwrap();
    e.drain().unwrap();
    assert!(e.source_released(h).unwrap(), "on storage");
    e.prefetch(h).unwrap();
    e.drain().unwrap();
    let dst = alloc(len).unwrap();
    // SAFETY: `dst` outlives the event.
    unsafe { e.fetch(h, &[Region::new(dst.ptr(), len as u64)]) }
        .unwrap()
        .synchronize()
        .unwrap();
    // SAFETY: the fetch has completed.
    assert!(
        unsafe { host_mut(dst.ptr(), len) }[..] == bytes[..],
        "the bytes are right"
    );
    let c = e.stats().counters;
    e.release(h).unwrap();
    drop(e);
    assert_eq!(
        (c.read_errors, c.prefetch_hits, c.demand_reads),
        (0, 1, 0),
        "the read-ahead failed with nothing injected, and the fetch read on demand: {c:?}"
    );
}
