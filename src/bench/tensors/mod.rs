//! `spillway bench --workload tensors`: many small tensors offloaded through the offload
//! engine and fetched back, as a training step's forward and backward passes would.
//!
//! The tensors live in one source arena (GPU or host memory) at 512-byte aligned offsets,
//! filled with the [`pattern`](spillway_runtime::pattern) at their arena offsets, so every
//! tensor's bytes are known. Phases:
//!
//! 1. **offload** (timed): every offload call in forward order, then `drain`. The source
//!    arena is then poisoned (untimed), so what comes back must come from storage.
//! 2. **fetch** (timed): `prefetch` every handle in reverse order, then `fetch` each, in
//!    reverse order, into a destination arena of the same layout; wait for the last event
//!    and `drain`.
//! 3. **verify** (untimed, always): every tensor of the destination arena against the
//!    pattern.
//! 4. release every handle and drain.
//!
//! With `--faults` (the `faults` setting) the backend injects faults: a write that fails
//! leaves its tensors in their own memory, which the engine then forwards at fetch. Those
//! tensors' sources are not poisoned (the engine still reads them) and the run goes on;
//! without faults, any tensor left in memory stops the run, since the fetch phase would not
//! read it from storage. An error a phase ends with names the phase and the faults.

mod limits;
pub mod options;
mod plan;
pub mod report;

use std::collections::{HashMap, HashSet};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use spillway_runtime::engine::{Engine, Handle, Region, TensorKey};
use spillway_runtime::{Device, DeviceBuffer, DirectIo, Error, Event, PrivateFile, Result};

use super::flags;
use super::progress::Progress;
use super::settings::BenchSettings;
use crate::cli::BenchArgs;
use crate::open::{EngineBuilder, OpenError};
use crate::rank::RankPaths;
use crate::select;
use crate::settings::Resolved;
use options::{EngineSettings, Options};
use plan::Plan;
use report::{Phase, TensorsResult};

/// Seeds mixed into the data seed to poison the arenas: the source after offloading, the
/// destination before fetching.
const POISON_SOURCE: u64 = 0xdead_beef_0bad_f00d;
const POISON_DESTINATION: u64 = 0x0bad_cafe_dead_d00d;

/// Runs the tensors workload described by `args` with the settings `bench`. A refusal also
/// names the values that came from the environment or the settings file.
pub fn run(args: &BenchArgs, bench: &BenchSettings) -> Result<TensorsResult> {
    run_tensors(args, bench).map_err(|e| bench.layers.annotate(e))
}

fn run_tensors(args: &BenchArgs, bench: &BenchSettings) -> Result<TensorsResult> {
    flags::check(args)?;
    let opts = Options::from_args(args, bench)?;
    let paths = super::storage_paths(args, bench)?;
    let plan = Plan::new(
        opts.tensors,
        opts.duplicates,
        opts.min_size,
        opts.max_size,
        opts.seed,
    );
    let capacity = plan.storage_capacity(
        opts.engine.alignment,
        opts.engine.pack_extent_bytes,
        opts.engine.dedup,
    );
    // The engine opens with the bench's settings and its options' engine; ranks are settled
    // already (the bench's settings chose this rank's paths).
    let settings = Resolved {
        engine: opts.engine.clone(),
        rank_paths: RankPaths::default(),
        ..bench.resolved.clone()
    };
    let prepared = builder(args, &paths, capacity, &settings)
        .prepare()
        .map_err(blame_capacity)?;
    let setup = prepared.setup();
    let mut notes: Vec<String> = bench.layers.report_notes().collect();
    notes.extend(prepared.notes().cloned());
    notes.extend(limits::check(
        &setup.memory,
        plan.arena_len.saturating_mul(2),
        opts.engine.staging_bytes,
    )?);
    notes.extend(opts.notes.iter().cloned());
    // Created now, so that a bad --trace path is reported before the run, not after it;
    // put in place at its path once written (see PrivateFile: never through a link).
    let trace_file = match &opts.trace {
        Some(file) => {
            Some(PrivateFile::create(file, "trace file").map_err(|e| super::blame_flag(e, "--trace"))?)
        }
        None => None,
    };
    let probe = prepared.probe_direct_io()?;
    notes.extend(probe.warning);
    let backend = setup.backend.info();

    // The arenas are declared before the engine, so that the engine (and its host tier) is
    // dropped, and lets go of their memory, first.
    let arenas = Arenas::new(setup.device.clone(), &plan, opts.seed)?;
    let opened = prepared.start()?;
    let engine = &opened.engine;
    let faults = opened.faults();
    let faulty = |e, what: &str| select::fault_context(e, what, faults);
    let (handles, held, offload) = offload_phase(engine, &arenas, &plan, !faults.is_empty(), !args.json)
        .map_err(|e| faulty(e, "the offload phase"))?;
    arenas.poison(&plan, &held, opts.seed)?;
    if !held.is_empty() {
        notes.push(format!(
            "{} tensors stayed in their own memory (their writes failed under fault injection): their sources were not poisoned, and fetching them forwards them",
            held.len()
        ));
    }
    let fetch = fetch_phase(engine, &arenas, &plan, &handles, !args.json)
        .map_err(|e| faulty(e, "the fetch phase"))?;
    let (mismatched_bytes, mismatched_tensors) = arenas.mismatches(&plan, opts.seed)?;
    for h in handles {
        engine.release(h)?;
    }
    engine.drain()?;

    let trace = match (&opts.trace, trace_file) {
        (Some(file), Some(mut out)) => {
            engine
                .timeline()
                .write_chrome_trace(BufWriter::new(&mut out))
                .map_err(|e| trace_error(file, e))?;
            out.persist().map_err(|e| super::blame_flag(e, "--trace"))?;
            let dropped = engine.timeline().dropped();
            if dropped > 0 {
                notes.push(format!(
                    "the timeline was full: {dropped} spans were not recorded"
                ));
            }
            Some(file.display().to_string())
        }
        _ => None,
    };
    Ok(TensorsResult {
        workload: "tensors".into(),
        backend: backend.name.to_string(),
        memory: opened.memory.name().to_string(),
        device: match opened.gpu() {
            None => "host memory".to_string(),
            Some(gpu) => format!("{} (GPU {})", opened.device.info().name, gpu.ordinal()),
        },
        path: super::display_paths(&paths, args.pci.is_some()),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        tensors: plan.tensors.len() as u64,
        offload_calls: plan.calls.len() as u64,
        duplicate_calls: (plan.calls.len() - plan.tensors.len()) as u64,
        dup_fraction: opts.dup_fraction,
        min_size: opts.min_size,
        max_size: opts.max_size,
        total_bytes: plan.tensor_bytes(),
        arena_bytes: plan.arena_len,
        pack: opts.engine.pack,
        dedup: opts.engine.dedup,
        engine: EngineSettings::of(&opts.engine),
        storage_capacity: opened.info.capacity,
        queue_depth: settings.choices.queue_depth,
        threads: settings.choices.threads,
        direct_io: probe.direct_io,
        host_staging: opened.gpu().is_some() && backend.host_staging,
        gds_mode: backend.transfer_mode.map(str::to_string),
        seed: opts.seed,
        phases: vec![offload, fetch],
        verified: mismatched_bytes == 0,
        mismatched_bytes,
        mismatched_tensors,
        trace,
        notes,
        from_env_or_file: bench.layers.taken.clone(),
        engine_stats: engine.stats(),
        faults: opened.fault_report(),
        host_tier: opened.host_tier_stats(),
    })
}

/// The engine users open ([`EngineBuilder`]), on `paths` with the plan's `capacity`:
/// `--buffered` goes through the page cache, and `--pci` names the spdk backend's
/// controller.
fn builder<'a>(
    args: &BenchArgs,
    paths: &'a [PathBuf],
    capacity: u64,
    settings: &'a Resolved,
) -> EngineBuilder<'a> {
    let direct = if args.buffered {
        DirectIo::Off
    } else {
        DirectIo::Preferred
    };
    EngineBuilder::new(paths, Some(capacity), settings)
        .direct(direct)
        .controller(args.pci)
}

/// `e`, with a refusal of the storage by the engine's capacity accounting
/// ([`OpenError::Capacity`]: the filesystem or memory short of it, the bytes asked and
/// those there are) saying where that capacity comes from: the bench has no flag for it.
fn blame_capacity(e: OpenError) -> Error {
    match e {
        OpenError::Capacity(refusal) => Error::invalid(format!(
            "{refusal} (capacity= is the storage the tensors workload reserves, twice the tensors' bytes: lower --tensors or --max-size, or pass a --path with more room)"
        )),
        OpenError::Other(e) => e,
    }
}

/// The source and destination arenas, in the run's memory.
struct Arenas {
    device: Arc<dyn Device>,
    source: DeviceBuffer,
    destination: DeviceBuffer,
}

impl Arenas {
    /// Allocates both arenas and fills the source with the pattern for `seed` (byte `o` of
    /// the arena is pattern byte `o`), waiting until it is done.
    fn new(device: Arc<dyn Device>, plan: &Plan, seed: u64) -> Result<Self> {
        let len = usize::try_from(plan.arena_len).map_err(|_| {
            Error::invalid(
                "the arena does not fit in this machine's address space; lower --tensors or --max-size",
            )
        })?;
        let source = device.alloc(len)?;
        let destination = device.alloc(len)?;
        device.fill_pattern(source.ptr(), len, seed, 0)?;
        Ok(Arenas {
            device,
            source,
            destination,
        })
    }

    /// Overwrites the source with other data and fills the destination with yet other data,
    /// so that only bytes read back from storage can match the pattern afterwards. The
    /// tensors of `held` (whose memory the engine still holds: their writes failed) are
    /// left as they are.
    fn poison(&self, plan: &Plan, held: &HashSet<usize>, seed: u64) -> Result<()> {
        let dev = &self.device;
        if held.is_empty() {
            dev.fill_pattern(self.source.ptr(), self.source.len(), seed ^ POISON_SOURCE, 0)?;
        } else {
            for (i, t) in plan.tensors.iter().enumerate() {
                if !held.contains(&i) {
                    dev.fill_pattern(
                        self.source.ptr() + t.offset,
                        t.len as usize,
                        seed ^ POISON_SOURCE,
                        t.offset,
                    )?;
                }
            }
        }
        dev.fill_pattern(
            self.destination.ptr(),
            self.destination.len(),
            seed ^ POISON_DESTINATION,
            0,
        )
    }

    /// Bytes of the destination's tensors that differ from the pattern, and how many
    /// tensors have any.
    fn mismatches(&self, plan: &Plan, seed: u64) -> Result<(u64, u64)> {
        let (mut bytes, mut tensors) = (0, 0);
        for t in &plan.tensors {
            let bad = self.device.count_pattern_mismatches(
                self.destination.ptr() + t.offset,
                t.len as usize,
                seed,
                t.offset,
            )?;
            bytes += bad;
            tensors += u64::from(bad > 0);
        }
        Ok((bytes, tensors))
    }

    fn region(buffer: &DeviceBuffer, t: plan::Tensor) -> [Region; 1] {
        [Region::new(buffer.ptr() + t.offset, t.len)]
    }
}

/// Phase 1: every offload call in forward order, then drain. Returns the handles, the
/// tensors whose memory the engine still holds and the phase. Without fault injection
/// (`faults` false), refuses to go on when any tensor stayed in memory (the fetch phase
/// would not read it from storage); with it, tensors whose writes failed are expected.
/// `progress`: show a bar once the phase has run for a second.
fn offload_phase(
    engine: &Engine,
    arenas: &Arenas,
    plan: &Plan,
    faults: bool,
    progress: bool,
) -> Result<(Vec<Handle>, HashSet<usize>, Phase)> {
    let bar = Progress::new(progress, "offload", plan.call_bytes());
    let mut submitted = 0u64;
    let start = Instant::now();
    let mut handles = Vec::with_capacity(plan.calls.len());
    for &i in &plan.calls {
        let region = Arenas::region(&arenas.source, plan.tensors[i]);
        // SAFETY: the source arena outlives the engine (it is dropped after it) and is not
        // modified until `drain` below has returned and every source is released (checked
        // below, before the arena is poisoned).
        let h = unsafe { engine.offload(TensorKey::new(i as u64, 0), &region, None)? };
        handles.push(h);
        submitted += plan.tensors[i].len;
        bar.set_position(submitted);
    }
    bar.set_label("drain");
    engine.drain()?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish();
    let c = engine.stats().counters;
    if !faults && (c.resident_tensors > 0 || c.write_errors > 0) {
        return Err(Error::invalid(format!(
            "the engine kept {} tensors in memory ({} failed writes): the fetch phase would not read them from storage; see the warnings above, free space on the storage or pass another --path",
            c.resident_tensors, c.write_errors
        )));
    }
    let mut held = HashSet::new();
    for (&h, &i) in handles.iter().zip(&plan.calls) {
        if !engine.source_released(h)? {
            if !faults {
                return Err(Error::invalid(
                    "a tensor's memory is still in use by the engine after drain; the offload phase cannot be verified",
                ));
            }
            held.insert(i);
        }
    }
    let phase = Phase::new("offload", plan.call_bytes(), plan.calls.len() as u64, seconds);
    Ok((handles, held, phase))
}

/// Phase 2: prefetch every handle in reverse order, then fetch each in reverse order into
/// the destination arena; wait for the last event and drain. `progress`: show a bar once
/// the phase has run for a second.
fn fetch_phase(
    engine: &Engine,
    arenas: &Arenas,
    plan: &Plan,
    handles: &[Handle],
    progress: bool,
) -> Result<Phase> {
    let bar = Progress::new(progress, "fetch", plan.call_bytes());
    let mut fetched = 0u64;
    // Handles of a tensor offloaded more than once fetch into the same place: the next
    // fetch there waits for the previous one's event.
    let mut remaining = plan.calls_per_tensor();
    let mut pending: HashMap<usize, Arc<dyn Event>> = HashMap::new();
    let start = Instant::now();
    for &h in handles.iter().rev() {
        engine.prefetch(h)?;
    }
    let mut last = None;
    for (&h, &i) in handles.iter().zip(&plan.calls).rev() {
        if let Some(previous) = pending.remove(&i) {
            previous.synchronize()?;
        }
        let region = Arenas::region(&arenas.destination, plan.tensors[i]);
        // SAFETY: the destination arena outlives the engine; this region is written by
        // nothing else until the event completes (a second fetch into it waits above, and
        // the arena is read only after the last event and `drain`).
        let ready = unsafe { engine.fetch(h, &region)? };
        fetched += plan.tensors[i].len;
        bar.set_position(fetched);
        remaining[i] -= 1;
        if remaining[i] > 0 {
            pending.insert(i, ready.clone());
        }
        last = Some(ready);
    }
    // Fetch-stream events complete in order: the last one covers them all.
    if let Some(ready) = last {
        ready.synchronize()?;
    }
    engine.drain()?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish();
    Ok(Phase::new(
        "fetch",
        plan.call_bytes(),
        handles.len() as u64,
        seconds,
    ))
}

/// An error writing the Chrome trace to `file`.
fn trace_error(file: &Path, e: std::io::Error) -> Error {
    Error::io(
        format!("writing the trace to {} (check --trace)", file.display()),
        e,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::choice::MemChoice;

    #[test]
    fn storage_beyond_the_filesystem_is_refused_with_the_flags_to_change() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().join("t.dat")];
        let mut settings = Resolved::default();
        settings.choices.mem = MemChoice::Host;
        let builder = |capacity| EngineBuilder::new(&paths, Some(capacity), &settings).prepare();
        builder(1 << 20).expect("a MiB fits");
        let refused = builder(crate::open::MAX_CAPACITY).unwrap_err();
        assert!(matches!(refused, OpenError::Capacity(_)), "{refused}");
        let err = blame_capacity(refused).to_string();
        let path = paths[0].display().to_string();
        for want in [path.as_str(), "--path", "--tensors", "--max-size"] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }
}
