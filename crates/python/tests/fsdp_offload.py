"""FSDP2 and tensor/sequence parallelism with spillway on every rank, checked against the
same training without it. Run under a launcher, one process per GPU (or per CPU rank with
gloo):

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        crates/python/tests/fsdp_offload.py --path /dev/shm/spill.bin --json out.json

Runs (--runs, default all of them):

  fsdp          a GPT, every block and then the model fully_shard()ed over all ranks
                (FSDP2), each rank on batches of its own
  fsdp-ckpt     the same, every block under torch.utils.checkpoint (non-reentrant)
  fsdp-compile  the fsdp GPT with every block compiled (block.compile(): inductor on GPUs,
                aot_eager on CPUs), compiled code dropped before each training
  tp            a residual MLP network, tensor- and sequence-parallel over all ranks
                (the residual stream sharded along the sequence; LayerNorms
                SequenceParallel; up projections ColwiseParallel, down projections
                RowwiseParallel back to sequence shards): activations are DTensors and
                sequence shards; every rank on the same batches
  fsdp+tp       the tp network on a 2-D mesh (data parallel x tensor parallel, tensor
                parallel over 2 ranks where the world size is even), its blocks then
                fully_shard()ed over the data-parallel ranks, under checkpoint

Each run trains from seed 0 without offloading, then again from the same weights with a
spillway Offloader (policy "all"). Every step's loss and every gradient (this rank's shard)
must be bitwise equal to the run without offloading, on every rank; no storage of a
parameter (sharded, or FSDP2's unsharded ones gathered for forward) may reach the engine;
and bytes must have been offloaded and read back. Each rank prints its figures; rank 0
writes them all to --json. Exits 1 on any difference.

The functions are imported by tests/test_fsdp.py, which runs them in one process at world
size 1 and launches this script on two CPU ranks."""

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint

import spillway
import spillway.torch as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "benches"))
from train_gpt import GPT, GPTConfig  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ddp_offload import compare, init_ranks  # noqa: E402  (bitwise comparison, process group)

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
torch.use_deterministic_algorithms(True)

RUNS = ("fsdp", "fsdp-ckpt", "fsdp-compile", "tp", "fsdp+tp")
FSDP_RUNS = ("fsdp", "fsdp-ckpt", "fsdp-compile")
# Small engine on CPU so that packing, staging backpressure and prefetch all happen.
CPU_SETTINGS = dict(staging_bytes="16MiB", prefetch_bytes="8MiB", pack_extent_bytes="2MiB", spread_files=1)


class MLPBlock(nn.Module):
    """LayerNorm, up projection, GELU, down projection, residual: a block that tensor and
    sequence parallelism split without changing its code."""

    def __init__(self, d, hidden):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


class MLPNet(nn.Module):
    """Token embedding, MLP blocks, final LayerNorm, LM head, mean cross-entropy."""

    def __init__(self, vocab, d, hidden, layers):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([MLPBlock(d, hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.gradient_checkpointing = False

    def forward(self, idx, targets):
        x = self.emb(idx)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.gradient_checkpointing else blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def sizes(cuda):
    """(vocab, sequence, batch, d_model, layers, heads) of the runs on GPUs or on CPUs."""
    return (8192, 512, 8, 512, 6, 8) if cuda else (512, 64, 4, 128, 4, 4)


def tp_size(world):
    """Ranks of a tensor-parallel group in the fsdp+tp run."""
    return 2 if world % 2 == 0 else 1


def meshes(run, device, world):
    """(data-parallel mesh, tensor-parallel mesh) of a run (None where it has none)."""
    kind = device.type
    if run in FSDP_RUNS:
        return init_device_mesh(kind, (world,)), None
    if run == "tp":
        return None, init_device_mesh(kind, (world,))
    tp = tp_size(world)
    mesh = init_device_mesh(kind, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return mesh["dp"], mesh["tp"]


def build(run, device, dp_mesh, tp_mesh):
    """The run's model on ``device`` from seed 0, sharded as the run says."""
    vocab, seq, _, d, layers, heads = sizes(device.type == "cuda")
    torch.manual_seed(0)
    if run in FSDP_RUNS:
        model = GPT(GPTConfig(vocab_size=vocab, seq_len=seq, n_layer=layers, n_head=heads, d_model=d), device=device)
        model.gradient_checkpointing = run == "fsdp-ckpt"
    else:
        model = MLPNet(vocab, d, 4 * d, layers).to(device)
        model.gradient_checkpointing = run == "fsdp+tp"
    if tp_mesh is not None:
        parallelize_module(model, tp_mesh, {
            "emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "ln_f": SequenceParallel(),
            "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        })
        for blk in model.blocks:
            parallelize_module(blk, tp_mesh, {
                "ln": SequenceParallel(),
                "fc": ColwiseParallel(input_layouts=Shard(1)),
                "proj": RowwiseParallel(output_layouts=Shard(1)),
            })
    if dp_mesh is not None:
        for blk in model.blocks:
            fully_shard(blk, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    if run == "fsdp-compile":
        for blk in model.blocks:
            blk.compile(**({} if device.type == "cuda" else dict(backend="aot_eager")))
    return model


def batches(run, device, steps, rank, world):
    """This rank's batches: those of its data-parallel group, the same in both trainings."""
    vocab, seq, n, *_ = sizes(device.type == "cuda")
    dp_rank = rank if run in FSDP_RUNS else {"tp": 0, "fsdp+tp": rank // tp_size(world)}[run]
    g = torch.Generator().manual_seed(1000 + dp_rank)
    out = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (n, seq), generator=g)
        y = torch.randint(0, vocab, (n, seq), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def local(t):
    """This rank's part of a tensor (a DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def parameter_ranges(model):
    """[start, end) of the memory of every parameter now allocated: sharded ones, and
    FSDP2's unsharded ones while they are set on their modules (during forward)."""
    out = []
    for p in model.parameters():
        s = local(p).untyped_storage()
        if s.nbytes():
            out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return out


def train(run, device, data, dp_mesh, tp_mesh, offloader_opts=None):
    """Trains from seed 0 on ``data``; returns each step's loss and gradients (this rank's
    shards, on the CPU) and, with an offloader, its statistics."""
    if run == "fsdp-compile":
        # Compiled code serves every model of its class and does not call hooks added
        # after it was compiled: each training compiles its own.
        torch.compiler.reset()
    model = build(run, device, dp_mesh, tp_mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    off = None if offloader_opts is None else st.Offloader(model, **offloader_opts)
    touched = []  # parameter memory that reached the engine: must stay empty
    if off is not None:
        offload = off.engine.offload

        def spy(key, regions, stream=None):
            ranges = parameter_ranges(model)
            for ptr, n in regions:
                if any(ptr < end and start < ptr + n for start, end in ranges):
                    touched.append((ptr, n))
            return offload(key, regions, stream)

        off.engine.offload = spy
    record = []
    try:
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            with off.step() if off is not None else contextlib.nullcontext():
                loss = model(x, y)
                loss.backward()
            record.append((local(loss).detach().cpu(), [local(p.grad).detach().cpu() for p in model.parameters()]))
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if off is None:
            return record, None
        s = off.stats()
        return record, dict(
            engine_path=off.engine.path,
            engine_device=off.engine.device,
            offloaded_tensors=s["offloaded_tensors"],
            offloaded_dtensors=s["offloaded_dtensors"],
            bytes_offloaded=s["bytes_offloaded"],
            bytes_written=s["bytes_written"],
            bytes_fetched=s["bytes_fetched"],
            segments=s["last_step"]["segments"],
            stall_s=s["stall_s"],
            parameter_regions_offloaded=len(touched),
        )
    finally:
        if off is not None:
            off.close()


def run_both(run, device, steps, rank, world, offloader_opts):
    """One run without and with offloading: the offloaded run's statistics, with its
    differences from the other and whether it passed."""
    dp_mesh, tp_mesh = meshes(run, device, world)
    data = batches(run, device, steps, rank, world)
    base, _ = train(run, device, data, dp_mesh, tp_mesh)
    t0 = time.perf_counter()
    offl, stats = train(run, device, data, dp_mesh, tp_mesh, offloader_opts)
    stats.update(seconds=time.perf_counter() - t0, differences=compare(base, offl))
    stats["ok"] = (
        not stats["differences"]
        and stats["parameter_regions_offloaded"] == 0
        and stats["bytes_written"] > 0
        and stats["bytes_fetched"] > 0
    )
    return stats


def offloader_options(path, capacity, cuda):
    opts = dict(path=path, capacity=capacity, policy="all", keep_last=1, min_tensor_bytes=64 << 10)
    if not cuda:
        opts.update(CPU_SETTINGS)
    return opts


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", help="storage for every rank: a directory, or a file name (each rank gets its "
                    "own); without it, SPILLWAY_RANK_PATHS must name each rank's")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {','.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--capacity", help="storage each rank's engine may use (default: 8GiB on GPUs, 256MiB on CPUs)")
    ap.add_argument("--json", help="rank 0 writes every rank's results here")
    args = ap.parse_args()
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or not args.runs:
        ap.error(f"unknown run(s) {unknown}; choose from {','.join(RUNS)}")
    return args


def main():
    args = parse_args()
    cuda, device, rank, world = init_ranks()
    opts = offloader_options(args.path, args.capacity or ("8GiB" if cuda else "256MiB"), cuda)
    results = {}
    for run in args.runs:
        s = results[run] = run_both(run, device, args.steps, rank, world, opts)
        print(
            f"rank {rank} {run} ({s['engine_device']}, {s['engine_path']}): {s['offloaded_tensors']} tensors "
            f"({s['offloaded_dtensors']} DTensors), "
            f"{s['bytes_written'] / 2**20:.1f} MiB written, {s['bytes_fetched'] / 2**20:.1f} MiB fetched, "
            f"{s['segments']} segments, parameter regions offloaded {s['parameter_regions_offloaded']}; "
            f"bitwise equal: {not s['differences']}",
            flush=True,
        )
        for d in s["differences"][:10]:
            print(f"rank {rank} {run}: {d}", flush=True)
    mine = dict(rank=rank, local_rank=int(os.environ["LOCAL_RANK"]), world_size=world, device=str(device), runs=results)
    every = [None] * world
    dist.all_gather_object(every, mine)
    ok = all(r["ok"] for m in every for r in m["runs"].values())
    if rank == 0 and args.json:
        out = dict(
            command=" ".join(["torchrun", f"--nproc-per-node {world}"] + sys.argv),
            torch=torch.__version__,
            spillway=spillway.__version__,
            ranks=every,
            all_ok=ok,
        )
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
