//! spillway's `Backend` trait on the userspace NVMe driver, as the engine and the bench use
//! it: several workers (one I/O queue pair each), large requests cut into chunks, requests
//! at any byte offset and length (read-modify-write at the edges), host memory and device
//! memory (the host device stands in for a GPU), many requests in flight from several
//! threads, flush, and the errors a caller can provoke. Every byte is verified.
//!
//! Usage: `nvme_backend [PCI_ADDRESS [GROUP_PATH]]`, defaulting to the `NVMEVM_PCI` and
//! `NVMEVM_GROUP` environment variables (set by the nvme-vm test harness).

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use common::random_io::Rng;
use spillway_runtime::{Backend, Device, Error, HostDevice, IoOp, IoRequest, MemRef, Target, TargetId};
use spillway_spdk::backend::{SpdkBackend, SpdkConfig};

/// One request of the plan: where on the namespace, where in the buffer.
#[derive(Clone, Copy)]
struct Piece {
    offset: u64,
    at: usize,
    len: usize,
}

/// Random non-overlapping pieces at any byte offset and length, over `span` bytes.
fn pieces(rng: &mut Rng, base: u64, span: u64, max_len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let (mut offset, mut at) = (base + rng.range(0, 4095), 0usize);
    loop {
        let len = match rng.next() % 4 {
            0 => rng.range(1, 511),
            1 => rng.range(512, 8192),
            _ => rng.range(8192, max_len),
        };
        if offset + len > base + span {
            break;
        }
        out.push(Piece {
            offset,
            at,
            len: len as usize,
        });
        at += len as usize + rng.range(0, 64) as usize;
        offset += len + rng.range(0, 3000);
    }
    for i in (1..out.len()).rev() {
        out.swap(i, rng.range(0, i as u64) as usize);
    }
    out
}

/// Runs `pieces` with all of them in flight at once.
fn run_all(
    backend: &SpdkBackend,
    target: TargetId,
    op: IoOp,
    mem: MemRef,
    pieces: &[Piece],
) -> Result<usize, Error> {
    let tickets = pieces
        .iter()
        .map(|p| {
            let req = IoRequest {
                target,
                op,
                offset: p.offset,
                mem: mem.slice(p.at, p.len),
            };
            // SAFETY: the pieces' memory is disjoint and stays alive and untouched until
            // every ticket has been waited for below.
            unsafe { backend.submit(req) }
        })
        .collect::<Result<Vec<_>, _>>()?;
    tickets.into_iter().map(|t| t.wait()).sum()
}

fn compare(name: &str, out: &[u8], back: &[u8], pieces: &[Piece]) -> bool {
    let bad = pieces
        .iter()
        .filter(|p| out[p.at..p.at + p.len] != back[p.at..p.at + p.len])
        .count();
    let bytes: usize = pieces.iter().map(|p| p.len).sum();
    if bad == 0 {
        println!(
            "{name}: {} requests, {:.1} MB each way: verified",
            pieces.len(),
            bytes as f64 / 1e6
        );
    } else {
        println!(
            "{name}: {bad} of {} requests read back different data",
            pieces.len()
        );
    }
    bad == 0
}

fn expect_err(
    name: &str,
    outcome: Result<impl std::fmt::Debug, Error>,
    want: impl Fn(&Error) -> bool,
) -> bool {
    match outcome {
        Err(e) if want(&e) => {
            println!("{name}: expected error: {e}");
            true
        }
        other => {
            println!("{name}: wrong outcome: {other:?}");
            false
        }
    }
}

fn run(pci: &str, group: &str) -> Result<bool, Error> {
    let device: Arc<dyn Device> = Arc::new(HostDevice::new());
    let config = SpdkConfig {
        group: Some(PathBuf::from(group)),
        threads: 3,
        queue_depth: 16,
        chunk_size: 64 << 10,
        ..SpdkConfig::new(pci)
    };
    let backend = SpdkBackend::new(device.clone(), config)?;
    for (k, v) in backend.info().details {
        println!("{k}: {v}");
    }
    let (target, info) = backend.open(&Target::new(pci))?;
    println!(
        "target: {} bytes, {}-byte alignment",
        info.size, info.offset_align
    );
    let span = info.size / 2;
    let mut ok = true;
    let mut rng = Rng(0xBAC_CE17D);

    // Host memory, many requests in flight over all workers.
    let plan = pieces(&mut rng, 0, span, 300 << 10);
    let size = plan.iter().map(|p| p.at + p.len).max().unwrap_or(0);
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    rng.fill(&mut out);
    let out_mem = MemRef::Host {
        ptr: out.as_mut_ptr(),
        len: size,
    };
    let back_mem = MemRef::Host {
        ptr: back.as_mut_ptr(),
        len: size,
    };
    run_all(&backend, target, IoOp::Write, out_mem, &plan)?;
    backend.flush(target)?;
    run_all(&backend, target, IoOp::Read, back_mem, &plan)?;
    ok &= compare("host memory, any offset and length", &out, &back, &plan);

    // Device memory (staged through the device's stream), from two threads at once.
    let plan_b = pieces(&mut rng, span, span, 1 << 20);
    let size_b = plan_b.iter().map(|p| p.at + p.len).max().unwrap_or(0);
    let src = device.alloc(size_b)?;
    let dst = device.alloc(size_b)?;
    device.fill_pattern(src.ptr(), size_b, 7, 0)?;
    let (first, second) = plan_b.split_at(plan_b.len() / 2);
    std::thread::scope(|s| -> Result<(), Error> {
        let a = s.spawn(|| run_all(&backend, target, IoOp::Write, src.as_mem(), first));
        let b = s.spawn(|| run_all(&backend, target, IoOp::Write, src.as_mem(), second));
        a.join().expect("writer panicked")?;
        b.join().expect("writer panicked")?;
        Ok(())
    })?;
    run_all(&backend, target, IoOp::Read, dst.as_mem(), &plan_b)?;
    let (mut a, mut b) = (vec![0u8; size_b], vec![0u8; size_b]);
    // SAFETY: both buffers are live device allocations of `size_b` bytes.
    unsafe {
        device.copy_to_host_sync(a.as_mut_ptr(), src.ptr(), size_b)?;
        device.copy_to_host_sync(b.as_mut_ptr(), dst.ptr(), size_b)?;
    }
    ok &= compare("device memory, two submitting threads", &a, &b, &plan_b);

    // What a caller can get wrong.
    let tail = Piece {
        offset: info.size - 100,
        at: 0,
        len: 200,
    };
    ok &= expect_err(
        "read past the namespace end",
        run_all(&backend, target, IoOp::Read, back_mem, &[tail]),
        |e| matches!(e, Error::ShortIo { .. }),
    );
    ok &= expect_err(
        "a file path as the target",
        backend.open(&Target::new("/tmp/x")),
        |e| matches!(e, Error::Target { .. }),
    );
    backend.close(target)?;
    ok &= expect_err(
        "I/O on a closed target",
        run_all(&backend, target, IoOp::Read, back_mem, &plan[..1]),
        |e| matches!(e, Error::InvalidArgument(_)),
    );
    drop(backend);
    println!("backend dropped: workers joined, queues deleted, controller shut down");
    Ok(ok)
}

fn main() -> ExitCode {
    match common::controller_args("nvme_backend") {
        Ok((pci, group)) => common::exit_status("nvme_backend", run(&pci, &group), "PASS"),
        Err(code) => code,
    }
}
