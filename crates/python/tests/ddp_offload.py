"""Data-parallel training with spillway on every rank, checked against the same training
without it. Run under a launcher, one process per GPU (or per CPU rank with gloo):

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        crates/python/tests/ddp_offload.py --path /dev/shm/spill.bin --json out.json

Each rank trains a GPT wrapped in DistributedDataParallel on batches of its own, first
without offloading, then again from the same initial weights with a spillway Offloader
(policy "all"). Every step's loss and every gradient (after DDP's all-reduce) must be
bitwise equal to the run without offloading, on every rank. spillway finds the rank
itself: the GPU from LOCAL_RANK, and the rank's own storage (a shared file name becomes
one per rank; SPILLWAY_RANK_PATHS gives each rank its drives). Each rank prints its
offload statistics; rank 0 writes them all to --json. Exits 1 on any difference."""

import argparse
import json
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import spillway
import spillway.torch as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "benches"))
from train_gpt import GPT, GPTConfig  # noqa: E402

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
torch.use_deterministic_algorithms(True)

# Small engine on CPU so that packing, staging backpressure and prefetch all happen.
CPU_SETTINGS = dict(staging_bytes="16MiB", prefetch_bytes="8MiB", pack_extent_bytes="2MiB")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", help="storage for every rank: a directory, or a file name (each rank gets its "
                    "own); without it, SPILLWAY_RANK_PATHS must name each rank's")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--capacity", help="storage each rank's engine may use (default: 8GiB on GPUs, 256MiB on CPUs)")
    ap.add_argument("--json", help="rank 0 writes every rank's results here")
    return ap.parse_args()


def model_config(cuda):
    if cuda:
        return GPTConfig(vocab_size=8192, seq_len=512, n_layer=8, n_head=8, d_model=512), 8
    return GPTConfig(vocab_size=512, seq_len=64, n_layer=4, n_head=4, d_model=128), 4


def batches(cfg, n, steps, rank, device):
    """This rank's batches: different on every rank, the same in both runs."""
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (n, cfg.seq_len), generator=g)
        y = torch.randint(0, cfg.vocab_size, (n, cfg.seq_len), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def train(cfg, data, device, offloader_opts=None):
    """Trains from seed 0 on `data`; returns each step's loss and gradients (on the CPU),
    and the offloader's statistics when one was used."""
    torch.manual_seed(0)
    model = GPT(cfg, device=device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    off = None if offloader_opts is None else st.Offloader(model, **offloader_opts)
    record = []
    try:
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            if off is None:
                loss = ddp(x, y)
                loss.backward()
            else:
                with off.step():
                    loss = ddp(x, y)
                    loss.backward()
            record.append((loss.detach().cpu(), [p.grad.detach().cpu() for p in model.parameters()]))
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats = None
        if off is not None:
            s = off.stats()
            stats = dict(
                engine_path=off.engine.path,
                engine_device=off.engine.device,
                engine_backend=off.engine.backend,
                notes=list(off.engine.notes),
                offloaded_tensors=s["offloaded_tensors"],
                bytes_offloaded=s["bytes_offloaded"],
                bytes_written=s["bytes_written"],
                bytes_read=s["bytes_read"],
                bytes_fetched=s["bytes_fetched"],
                bytes_deduplicated=s["bytes_deduplicated"],
                stall_s=s["stall_s"],
                step_s=s["step_s"],
                policy=s["policy"]["reason"],
            )
        return record, stats
    finally:
        if off is not None:
            off.close()


def compare(base, offl):
    """Differences between two runs' records, as messages (none when bitwise equal)."""
    diffs = []
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(base, offl)):
        if not torch.equal(l0, l1):
            diffs.append(f"step {step}: loss {l1.item()} != {l0.item()}")
        for i, (a, b) in enumerate(zip(g0, g1)):
            if not torch.equal(a, b):
                diffs.append(f"step {step}: gradient {i} differs (max abs {(a - b).abs().max().item():.3e})")
    return diffs


def init_ranks():
    """Joins the process group torchrun set up: NCCL on this rank's GPU, gloo on CPUs.
    Returns (cuda, device, rank, world size)."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return cuda, device, dist.get_rank(), dist.get_world_size()


def main():
    args = parse_args()
    cuda, device, rank, world = init_ranks()
    cfg, n = model_config(cuda)
    data = batches(cfg, n, args.steps, rank, device)

    base, _ = train(cfg, data, device)
    # Without --path the rank's entry in SPILLWAY_RANK_PATHS is its storage.
    capacity = args.capacity or ("8GiB" if cuda else "256MiB")
    opts = dict(path=args.path, capacity=capacity, policy="all", keep_last=1, min_tensor_bytes=64 << 10)
    if not cuda:
        opts.update(CPU_SETTINGS)
    t0 = time.perf_counter()
    offl, stats = train(cfg, data, device, opts)
    stats.update(
        rank=rank,
        local_rank=int(os.environ["LOCAL_RANK"]),
        world_size=world,
        device=str(device),
        steps=args.steps,
        seconds=time.perf_counter() - t0,
        differences=compare(base, offl),
    )
    stats["bitwise_equal"] = not stats["differences"]
    print(
        f"rank {rank} ({stats['engine_device']}, {stats['engine_path']}): "
        f"{stats['offloaded_tensors']} tensors, {stats['bytes_written'] / 2**20:.1f} MiB written, "
        f"{stats['bytes_read'] / 2**20:.1f} MiB read, {stats['bytes_fetched'] / 2**20:.1f} MiB fetched, "
        f"stall {stats['stall_s'] * 1e3:.1f} ms; gradients bitwise equal: {stats['bitwise_equal']}",
        flush=True,
    )
    for d in stats["differences"][:10]:
        print(f"rank {rank}: {d}", flush=True)

    every = [None] * world
    dist.all_gather_object(every, stats)
    if rank == 0 and args.json:
        out = dict(
            command=" ".join(["torchrun", f"--nproc-per-node {world}"] + sys.argv),
            torch=torch.__version__,
            spillway=spillway.__version__,
            ranks=every,
            all_bitwise_equal=all(s["bitwise_equal"] for s in every),
        )
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    ok = all(s["bitwise_equal"] and s["bytes_written"] > 0 and s["bytes_fetched"] > 0 for s in every)
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
