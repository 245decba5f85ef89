#!/usr/bin/env python3
"""Ranks side by side: each rank's offload (write) and fetch (read) bandwidth through the
spillway engine when it runs alone, and when every rank runs at once, in the same job.
Target: with independent storage per rank, each rank's bandwidth together >= 0.9x alone.

Run one process per GPU under a launcher; each rank's storage comes from SPILLWAY_RANK_PATHS
(or --path, a directory every rank shares: each gets an anonymous file there):

    SPILLWAY_RANK_PATHS="0=/dev/shm/r0;1=/dev/shm/r1" \\
        python -m torch.distributed.run --standalone --nproc-per-node 2 benches/ranks.py

Each repetition measures every rank alone in turn (the others wait at a barrier), then all
ranks together (started by one barrier). Figures are medians over --reps; every byte
fetched is checked against what was offloaded."""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import spillway
from benchlib import write_result


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", help="storage directory for every rank (default: SPILLWAY_RANK_PATHS)")
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--tensor-size", default="64MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benches/results")
    ap.add_argument("--name", default="ranks")
    return ap.parse_args()


class Rank:
    """One rank's engine and tensors."""

    def __init__(self, args, device):
        self.device = device
        size = spillway.parse_size(args.tensor_size)
        self.nbytes = size * args.tensors
        self.engine = spillway.Engine(args.path, capacity=2 * self.nbytes)
        g = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
        self.src = [torch.randint(0, 256, (size,), dtype=torch.uint8, device=device, generator=g)
                    for _ in range(args.tensors)]
        self.dst = [torch.empty_like(t) for t in self.src]
        self.stream = torch.cuda.current_stream(device)
        self.version = 0

    def measure(self):
        """Offloads every tensor and waits for the writes; then prefetches and fetches them
        all back and checks them. Returns (write GB/s, read GB/s)."""
        self.version += 1
        s = self.stream.cuda_stream
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        handles = [self.engine.offload((i, self.version), [(t.data_ptr(), t.nbytes)], s)
                   for i, t in enumerate(self.src)]
        self.engine.drain()
        t1 = time.perf_counter()
        for h in handles:
            self.engine.prefetch(h)
        for h, d in zip(handles, self.dst):
            self.engine.fetch(h, [(d.data_ptr(), d.nbytes)], s)
        torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        for h in handles:
            self.engine.release(h)
        bad = [i for i, (a, b) in enumerate(zip(self.src, self.dst)) if not torch.equal(a, b)]
        if bad:
            raise SystemExit(f"rank {dist.get_rank()}: tensors {bad[:5]} came back different")
        for d in self.dst:
            d.zero_()
        return self.nbytes / (t1 - t0) / 1e9, self.nbytes / (t2 - t1) / 1e9


def main():
    args = parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    me = Rank(args, device)
    me.measure()  # warm up: the engine's staging, the file's first extents

    alone, together = [], []
    for _ in range(args.reps):
        for r in range(world):
            dist.barrier()
            if r == rank:
                alone.append(me.measure())
        dist.barrier()
        together.append(me.measure())
    dist.barrier()

    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    mine = dict(
        rank=rank,
        device=me.engine.device,
        backend=me.engine.backend,
        path=me.engine.path,
        notes=list(me.engine.notes),
        alone_gbps=dict(write=med(alone, 0), read=med(alone, 1)),
        together_gbps=dict(write=med(together, 0), read=med(together, 1)),
        runs=dict(alone=alone, together=together),
    )
    mine["ratio_together_over_alone"] = {
        op: mine["together_gbps"][op] / mine["alone_gbps"][op] for op in ("write", "read")
    }
    every = [None] * world
    dist.all_gather_object(every, mine)
    me.engine.close()
    if rank == 0:
        for r in every:
            ratio = r["ratio_together_over_alone"]
            print(f"rank {r['rank']} ({r['device']}, {r['path']}): write {r['alone_gbps']['write']:.2f} alone, "
                  f"{r['together_gbps']['write']:.2f} together ({ratio['write']:.2f}x); read "
                  f"{r['alone_gbps']['read']:.2f} alone, {r['together_gbps']['read']:.2f} together "
                  f"({ratio['read']:.2f}x) GB/s", flush=True)
        env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SPILLWAY_")}
        write_result(args.out, args.name, {
            "launch": " ".join([f"{k}={v!r}" for k, v in env.items()]
                               + [f"python -m torch.distributed.run --standalone --nproc-per-node {world}"]
                               + ["benches/ranks.py"] + sys.argv[1:]),
            "environment": env,
            "what": "each rank's engine offload (write: offload all, drain) and fetch (read: prefetch "
                    "and fetch all, synchronize) bandwidth alone and with every rank at once; medians",
            "world_size": world,
            "settings": {"tensors": args.tensors, "tensor_size": args.tensor_size, "reps": args.reps,
                         "rank_paths": os.environ.get("SPILLWAY_RANK_PATHS"), "path": args.path},
            "torch": torch.__version__,
            "ranks": every,
            "min_ratio": min(min(r["ratio_together_over_alone"].values()) for r in every),
            "target_ratio": 0.9,
        })
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
