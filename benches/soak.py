#!/usr/bin/env python3
"""Soak: offload/fetch cycles through one spillway engine for a fixed time, checking every
byte fetched and watching the resources a long training run must not leak: GPU memory,
the process's resident memory, open files, threads, and the storage the engine holds.

    python3 benches/soak.py --path /dev/shm --seconds 600 [--faults write_error=0.01,...]

Each cycle offloads --tensors tensors of random sizes (a --dup fraction offloaded twice),
drains, prefetches and fetches them all back in reverse order into fresh memory, compares
each with its source, and releases every handle. After --warmup cycles the resources are
sampled every cycle; the report gives each one's first, last and largest value and its drift
(the median of the last quarter of the samples less that of the first quarter). With --faults the engine runs under fault injection: failed writes keep their
tensors in memory (fetched by forwarding), failed reads are errors counted per cycle; wrong
bytes are counted and must be 0. Exits 1 on wrong bytes or a resource that drifted."""

import argparse
import os
import random
import statistics
import sys
import time

import torch

import spillway
from benchlib import write_result

MiB = 1 << 20
RSS_SLACK = 16 * MiB


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default="/dev/shm", help="storage directory (an anonymous file is made there)")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--max-size", default="8MiB")
    ap.add_argument("--dup", type=float, default=0.1)
    ap.add_argument("--capacity", default="2GiB")
    ap.add_argument("--faults", default="", help="fault plan (setting faults), e.g. read_error=0.01,write_error=0.01")
    ap.add_argument("--no-checksums", action="store_true",
                    help="leave the engine's checksums off (on by default here: every read checked on the GPU)")
    ap.add_argument("--warmup", type=int, default=10, help="cycles before the first sample")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="benches/results")
    ap.add_argument("--name", default="soak")
    return ap.parse_args()


def resources(engine, device, path):
    """The resources watched, now."""
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    fs = os.statvfs(path)
    r = dict(
        rss_bytes=rss,
        open_files=len(os.listdir("/proc/self/fd")),
        # io_uring's kernel workers (iou-wrk-*) come and go with the load: not ours to count.
        threads=sum(1 for t in os.listdir("/proc/self/task") if not thread_name(t).startswith("iou-")),
        storage_used_bytes=engine.storage_usage()["used"],
        filesystem_used_bytes=(fs.f_blocks - fs.f_bfree) * fs.f_frsize,
        live_handles=engine.live_handles(),
        staging_in_use=engine.staging_in_use(),
    )
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        # torch's caching allocator keeps freed blocks (and grows with the mix of sizes the
        # cycles allocate): what is not in its cache is the CUDA context's and spillway's.
        r.update(gpu_used_bytes=total - free, torch_reserved_bytes=reserved,
                 gpu_used_outside_torch_bytes=total - free - reserved,
                 torch_allocated_bytes=torch.cuda.memory_allocated(device))
    return r


def thread_name(tid):
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:  # it has just ended
        return "iou-"


def cycle(engine, device, stream, rng, args, max_size, version):
    """One offload/fetch cycle; returns (tensors fetched right, wrong, failed fetches)."""
    sizes = [rng.randint(1, max_size) for _ in range(args.tensors)]
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, device=device) for n in sizes]
    s = stream.cuda_stream if stream is not None else None
    handles = []
    for i, t in enumerate(srcs):
        key = (i, version)
        handles.append((engine.offload(key, [(t.data_ptr(), t.nbytes)], s), t))
        if rng.random() < args.dup:  # the same storage saved twice: stored once
            handles.append((engine.offload(key, [(t.data_ptr(), t.nbytes)], s), t))
    engine.drain()
    for h, _ in handles:
        engine.prefetch(h)
    right = wrong = failed = 0
    for h, t in reversed(handles):
        out = torch.empty_like(t)
        try:
            engine.fetch(h, [(out.data_ptr(), out.nbytes)], s)
        except spillway.SpillwayError:
            failed += 1
            continue
        if stream is not None:
            stream.synchronize()
        if torch.equal(out, t):
            right += 1
        else:
            wrong += 1
    for h, _ in handles:
        engine.release(h)
    return right, wrong, failed


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    max_size = spillway.parse_size(args.max_size)
    settings = dict(device=f"cuda:{device.index}" if device.type == "cuda" else "host")
    if args.faults:
        settings["faults"] = args.faults
    settings["checksums"] = not args.no_checksums
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    engine = spillway.Engine(args.path, capacity=args.capacity, **settings)

    samples, totals = [], dict(cycles=0, right=0, wrong=0, failed_fetches=0)
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.seconds or totals["cycles"] <= args.warmup:
        right, wrong, failed = cycle(engine, device, stream, rng, args, max_size, totals["cycles"])
        totals.update(cycles=totals["cycles"] + 1, right=totals["right"] + right,
                      wrong=totals["wrong"] + wrong, failed_fetches=totals["failed_fetches"] + failed)
        if totals["cycles"] > args.warmup:
            samples.append(resources(engine, device, args.path))
    seconds = time.monotonic() - t0
    stats = engine.stats()
    engine.close()

    # Drift: the median of the last quarter of the samples against the median of the first
    # quarter, so that one cycle's passing allocation is not taken for a trend.
    watched = {}
    q = max(1, len(samples) // 4)
    for name in samples[0]:
        values = [s[name] for s in samples]
        drift = statistics.median(values[-q:]) - statistics.median(values[:q])
        watched[name] = dict(first=values[0], last=values[-1], max=max(values), drift=drift)
    # Between cycles nothing is held: the engine's storage, handles and staging are back to 0;
    # GPU memory outside torch's cache, files and threads stay where the first quarter left
    # them (torch's cache is reported, not judged: it is torch's); resident memory
    # within RSS_SLACK (the allocators' own caching moves it by a few MiB).
    leaks = {n: w for n, w in watched.items()
             if (n in ("storage_used_bytes", "live_handles", "staging_in_use") and w["max"] != 0)
             or (n in ("open_files", "threads", "gpu_used_outside_torch_bytes", "torch_allocated_bytes")
                 and w["drift"] > 0)
             or (n == "rss_bytes" and w["drift"] > RSS_SLACK)}
    result = dict(
        what="offload/fetch cycles through one engine for a fixed time; every fetched byte checked; "
             "resources sampled after each cycle once warmed up",
        settings=dict(path=args.path, seconds=args.seconds, tensors=args.tensors, max_size=args.max_size,
                      dup=args.dup, capacity=args.capacity, faults=args.faults or None, device=str(device),
                      checksums=not args.no_checksums,
                      seed=args.seed),
        seconds=seconds,
        **totals,
        bytes_written=stats["bytes_written"],
        bytes_read=stats["bytes_read"],
        engine_errors=dict(write_errors=stats["write_errors"], read_errors=stats["read_errors"],
                           write_retries=stats.get("write_retries"), read_retries=stats.get("read_retries"),
                           no_space_errors=stats.get("no_space_errors"),
                           resident_tensors=stats["resident_tensors"],
                           checksum_errors=stats.get("checksum_errors")),
        verified_bytes=stats.get("verified_bytes"),
        faults=stats.get("faults"),
        resources=watched,
        leaked=sorted(leaks),
    )
    write_result(args.out, args.name, result)
    print(f"{totals['cycles']} cycles in {seconds:.0f} s: {totals['right']} tensors right, {totals['wrong']} wrong, "
          f"{totals['failed_fetches']} fetches failed; {stats['bytes_written'] / 2**30:.1f} GiB written, "
          f"{stats['bytes_read'] / 2**30:.1f} GiB read")
    for n, w in watched.items():
        print(f"  {n}: first {w['first']}, last {w['last']}, max {w['max']}, drift {w['drift']}")
    if totals["wrong"] or leaks:
        print(f"FAILED: {totals['wrong']} wrong tensors; drifted: {', '.join(sorted(leaks)) or 'nothing'}")
        sys.exit(1)


if __name__ == "__main__":
    main()
