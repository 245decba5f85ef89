//! Several I/O queue pairs driven from several threads at once, each thread on a queue of
//! its own and a region of the namespace of its own: random writes (1 block up to MDTS,
//! 32 in flight), then reads of the same blocks, verified byte for byte. Also checks that
//! the controller hands out no more queues than it granted.
//!
//! Usage: `nvme_threads [PCI_ADDRESS [GROUP_PATH]]`, defaulting to the `NVMEVM_PCI` and
//! `NVMEVM_GROUP` environment variables (set by the nvme-vm test harness).

mod common;

use std::process::ExitCode;
use std::sync::Barrier;

use common::random_io::{plan, run_at_depth, Rng};
use spillway_spdk::controller::{Controller, Error, Options};
use spillway_spdk::vfio::DmaBuffer;

const THREADS: u16 = 4;
const QUEUE_DEPTH: usize = 32;
/// Bytes each thread writes (and reads back), at most.
const BYTES_PER_THREAD: u64 = 6 << 20;

/// What one thread did.
struct Report {
    qid: u16,
    commands: usize,
    bytes: usize,
    mismatches: usize,
    peak: usize,
}

fn worker(ctrl: &Controller, index: u16, start: &Barrier) -> Result<Report, Error> {
    let ns = ctrl.namespace();
    let bs = u64::from(ns.block_size());
    let share = ns.nsze / u64::from(THREADS);
    let lbas = u64::from(index) * share..u64::from(index + 1) * share;
    let mut q = ctrl.create_io_queue(64)?;
    let mut rng = Rng(0xC0FF_EE00 + u64::from(index));
    let (ios, size) = plan(
        &mut rng,
        256,
        bs,
        q.max_command_bytes() / bs,
        lbas,
        BYTES_PER_THREAD,
    );
    let mut out = DmaBuffer::new(ctrl.container(), size)?;
    let mut back = DmaBuffer::new(ctrl.container(), size)?;
    rng.fill(out.as_mut_slice());
    back.as_mut_slice().fill(0x5A);
    // All queues exist before any thread starts its I/O, so they overlap.
    start.wait();
    let peak_w = run_at_depth(&mut q, QUEUE_DEPTH, &ios, true, &out, &mut back)?;
    let peak_r = run_at_depth(&mut q, QUEUE_DEPTH, &ios, false, &out, &mut back)?;
    let mismatches = ios
        .iter()
        .filter(|io| out.as_slice()[io.bytes.clone()] != back.as_slice()[io.bytes.clone()])
        .count();
    Ok(Report {
        qid: q.qid(),
        commands: 2 * ios.len(),
        bytes: 2 * ios.iter().map(|io| io.bytes.len()).sum::<usize>(),
        mismatches,
        peak: peak_w.min(peak_r),
    })
}

fn run(pci: &str, group: &str) -> Result<bool, Error> {
    let options = Options {
        io_queues: THREADS,
        ..Options::default()
    };
    let ctrl = Controller::open_with(pci, group, options)?;
    println!(
        "asked for {THREADS} I/O queue pairs, granted {}",
        ctrl.io_queues_granted()
    );
    let start = Barrier::new(usize::from(THREADS));
    let results: Vec<Result<Report, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (ctrl, start) = (&ctrl, &start);
                s.spawn(move || worker(ctrl, i, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker thread panicked"))
            .collect()
    });
    let mut ok = true;
    let mut qids = Vec::new();
    for (i, result) in results.into_iter().enumerate() {
        let r = result?;
        let verdict = if r.mismatches == 0 {
            "verified".to_owned()
        } else {
            ok = false;
            format!("{} commands read back different data", r.mismatches)
        };
        println!(
            "thread {i}: queue {}, {} commands, {:.1} MB, peak in flight {}: {verdict}",
            r.qid,
            r.commands,
            r.bytes as f64 / 1e6,
            r.peak
        );
        if r.peak < QUEUE_DEPTH {
            println!("thread {i}: the queue never reached depth {QUEUE_DEPTH}");
            ok = false;
        }
        qids.push(r.qid);
    }
    qids.sort_unstable();
    qids.dedup();
    if qids.len() != usize::from(THREADS) {
        println!("threads shared queue identifiers: {qids:?}");
        ok = false;
    }

    // Every granted queue in use: one more is refused with a typed error, and a queue
    // dropped frees its identifier for the next.
    let granted = ctrl.io_queues_granted();
    let mut queues = (0..granted)
        .map(|_| ctrl.create_io_queue(2))
        .collect::<Result<Vec<_>, _>>()?;
    match ctrl.create_io_queue(2) {
        Err(e @ Error::NoFreeQueue { .. }) => {
            println!("queue {} of {granted}: expected error: {e}", granted + 1)
        }
        other => {
            println!(
                "queue {} of {granted}: expected NoFreeQueue, got {other:?}",
                granted + 1
            );
            ok = false;
        }
    }
    let freed = queues.pop().map(|q| q.qid());
    let again = ctrl.create_io_queue(2)?;
    println!(
        "a dropped queue's identifier is reused: {freed:?} -> {}",
        again.qid()
    );
    ok &= freed == Some(again.qid());
    match ctrl.close() {
        Err(e @ Error::QueuesOpen { .. }) => println!("close with queues open: expected error: {e}"),
        other => {
            println!("close with queues open: expected QueuesOpen, got {other:?}");
            ok = false;
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    match common::controller_args("nvme_threads") {
        Ok((pci, group)) => common::exit_status("nvme_threads", run(&pci, &group), "PASS"),
        Err(code) => code,
    }
}
