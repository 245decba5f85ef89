#!/usr/bin/env python3
"""Training a GPT-style decoder with activations offloaded by spillway, against keeping
them in GPU memory, recomputing them, or parking them in pinned host memory.

The model is a standard pre-LN GPT (token and learned position embeddings; per block
LayerNorm -> causal self-attention through scaled_dot_product_attention -> residual,
LayerNorm -> 4x MLP with GELU -> residual; final LayerNorm, LM head, cross-entropy),
randomly initialised, with parameters in --dtype and an AdamW step (fused when this torch
has it) in every training step. The data are random token ids from a seeded generator:
nothing is downloaded. With the defaults (24 layers, d_model 2048, 16 heads, sequence
2048, micro-batch 8, about 1.3 B parameters in bf16) activations take most of the GPU
memory a step needs.

Runs, each in a process of its own, in turn, on the same GPU, the same weights and the
same batches:

  baseline        every activation stays in GPU memory
  spillway-disk   spillway.torch.Offloader spilling to --disk-dir (the directory: the
                  engine's anonymous files there; --spill-file-name: a named file)
  spillway-shm    the same in --shm-dir (/dev/shm; on tmpfs the engine spreads the
                  directory over several files on its own)
  spillway-shm8   the same, striped over 8 named files in --shm-dir (every run on --shm-dir watches
                  its use: tmpfs.peak_used_above_start_bytes)
  spillway-host   the Offloader with the pinned host tier (--host-tier) before the
                  --shm-dir file; -budgetNN: budget= NN% of the activation estimate;
                  -slowNNN: max_slowdown=NNN/100; -all: policy="all" from the first
                  step; -fit: adaptive, its profiling steps offloading as -all does
                  (profile="offload"). The adaptive policy's profiling steps otherwise
                  keep every tensor, so they must fit without offloading: -all and -fit
                  are the runs for a micro-batch that fits only with it
  checkpoint      torch.utils.checkpoint around every transformer block (non-reentrant)
  checkpoint-offload
                  checkpoint as above, with the blocks' inputs (all that checkpointing
                  saves) in pinned host memory through save_on_cpu: torchtune's way
  save_on_cpu     torch.autograd.graph.save_on_cpu(pin_memory=True) around forward+backward

What each run reports (over --steps timed steps, after --warmup untimed ones; every step
is forward, backward, optimizer step and zero_grad(set_to_none=True), timed with
torch.cuda.synchronize() on both sides). After the warmup, a spillway run also takes up to
--settle-steps steps of forward and backward alone (the weights stay the other runs') until
its plan has settled (Offloader.settled: an adaptive offloader profiles, plans, and may plan
again while it sees steps stall), so that the timed steps show the steady state;
settle_steps says how many it took and settled whether it had:

  step_ms            median step time
  peak_mem_bytes     torch.cuda.max_memory_allocated() over the timed steps
  fwd_act_mem_bytes  activation memory: the peak of torch.cuda.max_memory_allocated()
                     during forward, minus memory_allocated() right before it (the largest
                     over the timed steps): what forward holds for backward, the memory
                     offloading and recomputation lower (SSDTrain's measure)
  act_mem_bytes      peak_mem_bytes minus torch.cuda.memory_allocated() right before a
                     forward (the smallest such value over the timed steps): parameters,
                     optimizer state and the batches are left out. Gradients are freed at
                     every zero_grad, so the ones backward materialises count here, in
                     every run alike: with few layers they bound how far this can fall
  offloaded_bytes_per_step, fetched_bytes_per_step, stall_ms_per_step
                     from the Offloader's stats() (differences over the timed steps);
                     0 for baseline and checkpoint, null for save_on_cpu (not counted)
  loss               the loss of the last timed step (losses: every timed step). Runs see
                     the same weights and data, so their losses should agree closely.

and, against baseline: step-time ratio, peak-memory ratio, the activation memory saved,
1 - fwd_act_mem_bytes / baseline fwd_act_mem_bytes, and the step's peak above its start
saved, 1 - act_mem_bytes / baseline act_mem_bytes. A run that fails (out of memory,
spillway not importable, ...) is reported with its error; the others still run, and the
exit status is 1 only when every run failed.

The script prints a markdown table, and with --out writes a JSON file holding the command
line, the options, the device, the torch version, every run's results and the ratios.

    python3 benches/train_gpt.py --out benches/results/train-gpt-h200.json
    python3 benches/train_gpt.py --small --runs baseline,checkpoint,save_on_cpu
    python3 benches/train_gpt.py --runs baseline,spillway-shm --policy all --layers 32

Every size option can be set on its own; --small only changes the defaults of those not
given. The model classes can be imported: `from train_gpt import GPT, GPTConfig`.
"""

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ratios import ratios_to

RUNS = ("baseline", "spillway-disk", "spillway-shm", "spillway-shm8", "checkpoint", "checkpoint-offload",
        "save_on_cpu", "spillway-host",
        "spillway-host-budget25", "spillway-host-budget50", "spillway-host-budget75", "spillway-host-slow105",
        "spillway-host-all", "spillway-host-fit")

# Model-size defaults: the full run (sized for one H200) and the --small smoke preset.
FULL = {"layers": 24, "d_model": 2048, "heads": 16, "seq": 2048, "batch": 8, "vocab": 32000}
SMALL = {"layers": 4, "d_model": 256, "heads": 4, "seq": 256, "batch": 4, "vocab": 8192}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

GIB = 1024 ** 3


# --------------------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    vocab_size: int = 32000
    seq_len: int = 2048  # the largest sequence the position embedding covers
    n_layer: int = 24
    n_head: int = 16
    d_model: int = 2048
    mlp_ratio: int = 4
    bias: bool = True
    #: "gpt" (LayerNorm, GELU MLP, multi-head attention, learned positions) or "llama"
    #: (RMSNorm, SwiGLU MLP, grouped-query attention with n_kv_head heads, rotary positions).
    arch: str = "gpt"
    n_kv_head: int = 0  # llama: key/value heads (0: n_head / 8, at least 1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError("d_model must be a multiple of n_head")
        kw = {"device": device, "dtype": dtype}
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias, **kw)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias, **kw)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.n_head, c // self.n_head)
        q = q.view(shape).transpose(1, 2)
        k = k.view(shape).transpose(1, 2)
        v = v.view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias, **kw)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias, **kw)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.ln1 = nn.LayerNorm(cfg.d_model, **kw)
        self.attn = CausalSelfAttention(cfg, **kw)
        self.ln2 = nn.LayerNorm(cfg.d_model, **kw)
        self.mlp = MLP(cfg, **kw)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary(x, cos, sin):
    """Rotates pairs of channels of x (b, heads, t, d) by the position's angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.n_head = cfg.n_head
        self.n_kv = cfg.n_kv_head or max(1, cfg.n_head // 8)
        if cfg.d_model % cfg.n_head or cfg.n_head % self.n_kv:
            raise ValueError("d_model must be a multiple of n_head, and n_head of n_kv_head")
        self.head_dim = cfg.d_model // cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False, **kw)
        self.kv = nn.Linear(cfg.d_model, 2 * self.n_kv * self.head_dim, bias=False, **kw)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False, **kw)
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim))
        angles = torch.outer(torch.arange(cfg.seq_len, device=device, dtype=torch.float32), inv)
        self.register_buffer("cos", angles.cos().to(dtype or torch.float32), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype or torch.float32), persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.n_kv, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class SwiGLU(nn.Module):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        hidden = 256 * ((8 * cfg.d_model // 3 + 255) // 256)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False, **kw)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False, **kw)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.ln1 = RMSNorm(cfg.d_model, **kw)
        self.attn = GroupedQueryAttention(cfg, **kw)
        self.ln2 = RMSNorm(cfg.d_model, **kw)
        self.mlp = SwiGLU(cfg, **kw)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT decoder. forward(idx) returns logits; forward(idx, targets) returns the mean
    cross-entropy loss (computed in fp32). Set `gradient_checkpointing = True` to
    recompute every block's activations in backward instead of keeping them."""

    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.gradient_checkpointing = False
        llama = cfg.arch == "llama"
        if cfg.arch not in ("gpt", "llama"):
            raise ValueError("arch must be gpt or llama, not %r" % cfg.arch)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, **kw)
        self.pos_emb = None if llama else nn.Embedding(cfg.seq_len, cfg.d_model, **kw)
        block = LlamaBlock if llama else Block
        self.blocks = nn.ModuleList([block(cfg, **kw) for _ in range(cfg.n_layer)])
        self.ln_f = RMSNorm(cfg.d_model, **kw) if llama else nn.LayerNorm(cfg.d_model, **kw)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        for blk in self.blocks:
            for proj in (blk.attn.proj, blk.mlp.proj):
                proj.weight.normal_(0.0, 0.02 / math.sqrt(2 * self.cfg.n_layer))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError("sequence of %d tokens, longer than seq_len %d" % (t, self.cfg.seq_len))
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------------------
# Options


def parse_size(text):
    """Bytes from "64G", "512MiB", "1.5GB", "4096": K/M/G/T and KiB..TiB are powers of
    1024, KB/MB/GB/TB powers of 1000."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError("not a size: %r" % text)
    number, unit, suffix = float(m.group(1)), m.group(2), m.group(3)
    if not unit and suffix not in ("", "B"):
        raise argparse.ArgumentTypeError("not a size: %r" % text)
    base = 1000 if suffix == "B" and unit else 1024
    return int(number * base ** " KMGT".index(unit or " "))


#: Goal runs beyond the named ones: spillway-host-budgetNN (NN% of the activation
#: estimate, 1-100) and spillway-host-slowNNN (max_slowdown=NNN/100, 101-300).
GOAL_RUN = re.compile(r"spillway-host-(budget(\d{1,3})|slow(\d{3}))$")


def known_run(name):
    m = GOAL_RUN.match(name)
    if m and m.group(2):
        return 1 <= int(m.group(2)) <= 100
    if m and m.group(3):
        return 101 <= int(m.group(3)) <= 300
    return name in RUNS


def parse_runs(text):
    runs = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in runs if not known_run(r)]
    if unknown or not runs:
        raise argparse.ArgumentTypeError(
            "unknown run(s) %s; choose from %s, or spillway-host-budgetNN (NN%% of the activation estimate, "
            "1-100) or spillway-host-slowNNN (max_slowdown NNN/100, 101-300)"
            % (", ".join(unknown) or "(none)", ",".join(RUNS)))
    return runs


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_argument_group("model and batch (defaults: full run / --small)")
    size.add_argument("--small", action="store_true", help="smoke-test sizes for the options below")
    for name, help_text in (("layers", "transformer blocks"), ("d_model", "model width"),
                            ("heads", "attention heads"), ("seq", "sequence length"),
                            ("batch", "micro-batch size"), ("vocab", "vocabulary size")):
        size.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None,
                          help="%s (%d / %d)" % (help_text, FULL[name], SMALL[name]))
    size.add_argument("--arch", choices=("gpt", "llama"), default="gpt",
                      help="gpt (LayerNorm, GELU, MHA) or llama (RMSNorm, SwiGLU, GQA, rotary); default gpt")
    size.add_argument("--kv-heads", type=int, default=0, help="llama: key/value heads (default heads/8)")
    size.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                      help="parameter and activation dtype (default bf16)")

    train = ap.add_argument_group("training")
    train.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    train.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    train.add_argument("--weight-decay", type=float, default=0.1,
                       help="AdamW weight decay on matrices and embeddings (default 0.1)")
    train.add_argument("--compile", default=None, metavar="MODE",
                       help="torch.compile the model in this mode (default, max-autotune-no-cudagraphs, ...) "
                            "after spillway's offloader is made; warmup steps then include compiling")
    train.add_argument("--seed", type=int, default=1234, help="seed for weights and data (default 1234)")

    spill = ap.add_argument_group("spillway")
    spill.add_argument("--disk-dir", default="/var/tmp",
                       help="directory of the spillway-disk spill file (default /var/tmp)")
    spill.add_argument("--shm-dir", default="/dev/shm",
                       help="directory of the spillway-shm spill file (default /dev/shm)")
    spill.add_argument("--spill-file-name", default=None,
                       help="spill file name in those directories (default: the directories themselves, "
                            "in which the engine makes anonymous files; spillway-shm8: "
                            "spillway-train-PID.bin.0..7)")
    spill.add_argument("--policy", choices=("adaptive", "all"), default="adaptive",
                       help="Offloader policy (default adaptive)")
    spill.add_argument("--max-pending", type=parse_size, default=None,
                       help="bound on offloaded bytes still in GPU memory while their "
                            "writes run: saves beyond it wait (default: no bound)")
    spill.add_argument("--host-tier", type=parse_size, default=32 * GIB,
                       help="pinned host memory of the spillway-host* runs' host tier (default 32GiB)")
    spill.add_argument("--activation-bytes", type=parse_size, default=None,
                       help="the baseline's activation memory, for the budget runs (default: 34*s*b*h per layer)")
    spill.add_argument("--capacity", type=parse_size, default=None,
                       help="Offloader capacity, e.g. 64G (default: the Offloader's own)")

    run = ap.add_argument_group("runs and output")
    run.add_argument("--runs", type=parse_runs, default=list(RUNS),
                     help="comma list of runs (default %s)" % ",".join(RUNS))
    run.add_argument("--settle-steps", type=int, default=10,
                     help="spillway runs: at most this many more steps after the warmup, forward and "
                     "backward only, until the Offloader's plan has settled (default 10)")
    run.add_argument("--out", default=None, help="write the results as JSON to this file")
    run.add_argument("--run-timeout", type=float, default=3600.0,
                     help="seconds one run may take before it is killed (default 3600)")
    run.add_argument("--run", type=lambda r: parse_runs(r)[0], default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    preset = SMALL if args.small else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.settle_steps < 0:
        raise SystemExit("train_gpt.py: --settle-steps must be >= 0")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("train_gpt.py: --steps must be >= 1 and --warmup >= 0")
    return args


def model_config(args):
    return GPTConfig(vocab_size=args.vocab, seq_len=args.seq, n_layer=args.layers,
                     n_head=args.heads, d_model=args.d_model, arch=args.arch, n_kv_head=args.kv_heads)


def require_cuda():
    if not torch.cuda.is_available():
        print("train_gpt.py needs a CUDA GPU (torch.cuda.is_available() is False; torch %s)"
              % torch.__version__, file=sys.stderr)
        sys.exit(2)


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# One run (child process)


def make_optimizer(model, lr, weight_decay):
    """AdamW with decay on matrices and embeddings only; fused when torch has it."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True), "adamw-fused"
    except (TypeError, RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95)), "adamw"


def make_batches(cfg, batch, count, seed, device):
    """count (inputs, targets) pairs of random token ids, made on the CPU from a seeded
    generator (so every run sees the same ones) and moved to the GPU once."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (count, batch, cfg.seq_len + 1), generator=gen)
    tokens = tokens.to(device)
    return [(tokens[i, :, :-1], tokens[i, :, 1:]) for i in range(count)]


def saved_bytes_estimate(cfg, batch):
    """The physics' estimate of the bytes a step's layers save: 34*s*b*h per layer (bf16,
    flash attention)."""
    return 34 * cfg.seq_len * batch * cfg.d_model * cfg.n_layer


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def stats_delta(before, after, key):
    if before is None or after is None or key not in after:
        return None
    return after[key] - before.get(key, 0)


class SaveTrace:
    """What the offloader did in one step (a diagnosis aid, on with the environment
    variable TRAIN_GPT_SAVE_TRACE=<file prefix>), as rows of JSON in host milliseconds from
    the step's start: at each save, the bytes kept, still being written, allocated, and the
    most allocated since the step began (the row where it jumps follows the moment forward's
    peak was reached); each wait of forward for writes; the start of backward (allocated and
    the most allocated then, after the loss); and each use in backward of an
    offloaded tensor with the time the host waited for its copy. With SPILLWAY_TIMELINE=1
    the engine's timeline (every copy, per tier) is written beside it as Chrome trace JSON."""

    def __init__(self, offloader):
        self.off = offloader
        self.rows = []
        self.events = []
        self.t0 = None
        self._own = (offloader._note_held, offloader._bound_pending, offloader._on_backward_start,
                     offloader._ahead.take)

    def _ms(self):
        return round((time.perf_counter() - self.t0) * 1e3, 3)

    def start(self):
        self.t0 = time.perf_counter()
        note_held, bound_pending, on_backward_start, take = self._own
        off = self.off

        def note_held_traced():
            note_held()
            self.rows.append((self._ms(), len(off._segments), off._kept_step, off._pending_bytes,
                              torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))

        def bound_pending_traced():
            at, before = self._ms(), off._pending_bytes
            bound_pending()
            self.events.append(dict(event="write_wait", ms=at, wait_ms=round(self._ms() - at, 3),
                                    pending_before=before, pending_after=off._pending_bytes))

        def on_backward_start_traced():
            self.events.append(dict(event="backward_start", ms=self._ms(), pending=off._pending_bytes,
                                    allocated=torch.cuda.memory_allocated(),
                                    max_allocated=torch.cuda.max_memory_allocated()))
            on_backward_start()

        def take_traced(key, consumer):
            at = self._ms()
            storage, waited = take(key, consumer)
            self.events.append(dict(event="use", ms=at, segment=off._bwd_segment, wait_ms=round(waited * 1e3, 3),
                                    nbytes=None if storage is None else storage.nbytes(),
                                    ahead_bytes=off._ahead.ahead_bytes))
            return storage, waited

        off._note_held, off._bound_pending = note_held_traced, bound_pending_traced
        off._on_backward_start, off._ahead.take = on_backward_start_traced, take_traced

    def write(self, prefix, memory):
        """Writes the trace to <prefix>.json; `memory`: the step's (allocated before it,
        forward's peak, the step's peak), as the run measured them."""
        off = self.off
        off._note_held, off._bound_pending, off._on_backward_start, off._ahead.take = self._own
        with open(prefix + ".json", "w") as f:
            json.dump({"columns": ["ms", "segments", "kept", "pending", "allocated", "max_allocated"],
                       "rows": self.rows, "events": self.events, "last_step": off.stats().get("last_step"),
                       "step_memory": dict(zip(("before", "forward_peak", "step_peak"), memory))}, f)
        if os.environ.get("SPILLWAY_TIMELINE") == "1":
            off.engine.write_trace(prefix + "-engine.json")


class UsageWatch:
    """Samples a filesystem's used bytes every 20 ms on a thread: the most it held above
    its use at start (tmpfs space is RAM, so this is host memory the run took there)."""

    def __init__(self, directory):
        self.directory = directory
        self.start = shutil.disk_usage(directory).used
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, shutil.disk_usage(self.directory).used)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return {"directory": self.directory, "used_at_start_bytes": self.start,
                "peak_used_above_start_bytes": self.peak - self.start,
                "filesystem_bytes": shutil.disk_usage(self.directory).total}


def run_one(args):
    """Trains args.run for warmup + steps steps and returns its results as a dict."""
    name = args.run
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    torch.cuda.manual_seed_all(args.seed)

    cfg = model_config(args)
    model = GPT(cfg, device=device, dtype=dtype)
    model.train()
    optimizer, optimizer_kind = make_optimizer(model, args.lr, args.weight_decay)
    total = args.warmup + args.steps
    batches = make_batches(cfg, args.batch, total, args.seed + 1, device)

    result = {
        "run": name,
        "ok": False,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "params": model.num_params(),
        "param_bytes": tensor_bytes(model.parameters()),
        "optimizer": optimizer_kind,
    }

    offloader = None
    spill_path = None
    context = contextlib.nullcontext
    if name in ("checkpoint", "checkpoint-offload"):
        model.gradient_checkpointing = True
    if name in ("save_on_cpu", "checkpoint-offload"):
        def context():
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
    elif name.startswith("spillway-"):
        directory = args.disk_dir if name == "spillway-disk" else args.shm_dir
        # The directory itself, as a user gives it: the engine makes anonymous files
        # there (on tmpfs spread over several, which it takes one write at a time).
        spill_path = os.path.join(directory, args.spill_file_name) if args.spill_file_name else directory
        if name == "spillway-shm8":
            base = os.path.join(directory, args.spill_file_name or "spillway-train-%d.bin" % os.getpid())
            spill_path = [base + ".%d" % i for i in range(8)]
        result["spill_path"] = spill_path

    watch = UsageWatch(args.shm_dir) if spill_path is not None and name != "spillway-disk" else None
    try:
        if spill_path is not None:
            import spillway
            import spillway.torch as st

            result["spillway_version"] = getattr(spillway, "__version__", None)
            # The planner says what it chose and why (logged at INFO).
            import logging

            logging.basicConfig(stream=sys.stderr, format="%(name)s: %(message)s")
            logging.getLogger("spillway.torch").setLevel(logging.INFO)
            os.makedirs(directory, exist_ok=True)
            goal = {}
            settings = {}
            if name.startswith("spillway-host"):
                settings["host_tier"] = args.host_tier
                act = args.activation_bytes or saved_bytes_estimate(cfg, args.batch)
                if "-budget" in name:
                    goal["budget"] = int(act * int(name.rsplit("budget", 1)[1]) / 100)
                elif "-slow" in name:
                    goal["max_slowdown"] = int(name.rsplit("slow", 1)[1]) / 100
                elif name.endswith("-fit"):
                    settings["profile"] = "offload"
            result["goal"] = goal
            offloader = st.Offloader(model, path=spill_path, capacity=args.capacity,
                                     policy="all" if name.endswith("-all") else args.policy,
                                     max_pending_bytes=args.max_pending,
                                     **goal, **settings)
            context = offloader.step

        if args.compile:
            # After the offloader: it refuses a model compiled before its hooks were added.
            model.compile(mode=None if args.compile == "default" else args.compile)
            result["compile"] = args.compile

        def train_step(x, y):
            # Peaks per step: during forward (the saved activations: what offloading
            # lowers) and over the whole step (gradients and optimizer step too). Reading
            # the allocator's counters needs no synchronisation.
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with context():
                loss = model(x, y)
                fwd_peak = torch.cuda.max_memory_allocated()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach(), (before, fwd_peak, torch.cuda.max_memory_allocated())

        for i in range(args.warmup):
            loss, _ = train_step(*batches[i])
            log("%s: warmup %d/%d loss %.4f" % (name, i + 1, args.warmup, loss.item()))
        if offloader is not None:
            # Until the plan settles: forward and backward only, so that the weights, and
            # the timed steps' losses, stay those of the runs without an offloader.
            settle = 0
            while not offloader.settled and settle < args.settle_steps:
                x, y = batches[settle % max(args.warmup, 1)]
                with context():
                    model(x, y).backward()
                optimizer.zero_grad(set_to_none=True)
                settle += 1
            result["settle_steps"] = settle
            result["settled"] = offloader.settled
            log("%s: %d steps to settle the plan (%s)" % (name, settle, "settled" if offloader.settled else "not settled"))

        torch.cuda.synchronize()
        stats_before = offloader.stats() if offloader is not None else None

        times_ms, losses, mems = [], [], []
        trace = SaveTrace(offloader) if offloader is not None and os.environ.get("TRAIN_GPT_SAVE_TRACE") else None
        for i in range(args.steps):
            x, y = batches[args.warmup + i]
            if trace is not None and i == args.steps - 1:
                trace.start()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, mem = train_step(x, y)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            times_ms.append((t1 - t0) * 1e3)
            mems.append(mem)
            losses.append(loss.item())
            log("%s: step %d/%d %.1f ms loss %.4f" % (name, i + 1, args.steps, times_ms[-1], losses[-1]))

        if trace is not None:
            trace.write(os.environ["TRAIN_GPT_SAVE_TRACE"] + "-" + name, mems[-1])
        if name == "baseline":
            # The working-set floor: forward's peak with nothing saved for backward (no
            # grad). No offloader lowers forward's peak below it: every tensor is made, and
            # lives while it is used, whatever happens to it afterwards.
            x, y = batches[0]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with torch.no_grad():
                model(x, y)
            result["no_grad_fwd_peak_bytes"] = torch.cuda.max_memory_allocated() - before
        result["optimizer_state_bytes"] = tensor_bytes(
            t for state in optimizer.state.values() for t in state.values())
        base = min(m[0] for m in mems)
        peak = max(m[2] for m in mems)
        step_ms = statistics.median(times_ms)
        result.update({
            "step_ms": step_ms,
            "step_ms_all": times_ms,
            "tokens_per_s": args.batch * args.seq / (step_ms / 1e3),
            "peak_mem_bytes": peak,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "mem_before_forward_bytes": base,
            "fwd_act_mem_bytes": max(m[1] - m[0] for m in mems),
            "act_mem_bytes": peak - base,
            "loss": losses[-1],
            "losses": losses,
        })

        if offloader is not None:
            stats_after = offloader.stats()
            offloaded = stats_delta(stats_before, stats_after, "bytes_offloaded")
            fetched = stats_delta(stats_before, stats_after, "bytes_fetched")
            stall = stats_delta(stats_before, stats_after, "stall_s")
            result.update({
                "offloaded_bytes_per_step": None if offloaded is None else offloaded / args.steps,
                "fetched_bytes_per_step": None if fetched is None else fetched / args.steps,
                "stall_ms_per_step": None if stall is None else stall * 1e3 / args.steps,
                "policy": stats_after.get("policy"),
                "spillway_stats": stats_after,
            })
            # The physics bound: offloading a fraction f of a layer's 34*s*b*h bytes during
            # its forward needs f*34*R/(24h+4s) bytes/s at R FLOP/s achieved. Only writes
            # done by the end of forward lower its peak, so R is forward's: the model's
            # forward FLOPs over the forward time the planner measured (without it, a third
            # of the step).
            h, seq, b = cfg.d_model, args.seq, args.batch
            flops = (24 * b * seq * h * h + 4 * b * seq * seq * h) * cfg.n_layer
            saved = saved_bytes_estimate(cfg, b)
            policy = stats_after.get("policy") or {}
            forward_s = (policy.get("forward_ms") or step_ms / 3) / 1e3
            achieved = flops / forward_s
            gbps = policy.get("write_gbps") or 0.0
            # Rebuilt bytes need no bandwidth: with a fraction rho of the layers' bytes
            # rebuilt, the bound is rho plus what the bandwidth moves of the rest.
            rebuilt = stats_delta(stats_before, stats_after, "bytes_rebuilt") or 0
            rho = min(1.0, rebuilt / args.steps / saved) if saved else 0.0
            moved = min(1.0, gbps * 1e9 * (24 * h + 4 * seq) / (34 * achieved))
            result["rebuilt_bytes_per_step"] = rebuilt / args.steps
            result["physics"] = {
                "achieved_tflops": 3 * flops / (step_ms / 1e3) / 1e12,
                "forward_tflops": achieved / 1e12,
                "forward_ms": forward_s * 1e3,
                "measured_write_gbps": gbps,
                "offload_bound_fraction": moved,
                "rebuilt_fraction": rho,
                "bound_fraction": min(1.0, rho + moved),
                "needed_gbps_all": 34 * achieved / (24 * h + 4 * seq) / 1e9,
                # Measured beside the bound: the fraction of the layers' estimated bytes
                # (34*s*b*h each) that this run offloaded per step.
                "layer_bytes_estimate": saved,
                "offloaded_fraction": (offloaded or 0) / args.steps / saved,
            }
        elif name == "save_on_cpu":
            result.update({"offloaded_bytes_per_step": None, "fetched_bytes_per_step": None,
                           "stall_ms_per_step": None})
        else:
            result.update({"offloaded_bytes_per_step": 0, "fetched_bytes_per_step": 0,
                           "stall_ms_per_step": 0.0})
        result["ok"] = True
        return result
    finally:
        if watch is not None:
            result["tmpfs"] = watch.stop()
        try:
            if offloader is not None:
                offloader.close()
        finally:
            for p in spill_path if isinstance(spill_path, list) else [spill_path]:
                if p is not None and os.path.isfile(p):
                    os.remove(p)


def child_main(args):
    require_cuda()
    try:
        result = run_one(args)
        code = 0
    except BaseException as e:  # reported to the parent as this run's result
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        result = {"run": args.run, "ok": False, "error": "%s: %s" % (type(e).__name__, e),
                  "oom": isinstance(e, getattr(torch.cuda, "OutOfMemoryError", MemoryError))
                  or "out of memory" in str(e)}
        code = 1
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)
    return code


# --------------------------------------------------------------------------------------
# Driver (parent process)


def _pump(stream, sink, keep):
    for line in iter(stream.readline, ""):
        keep.append(line)
        if sink is not None:
            sink.write(line)
            sink.flush()
    stream.close()


def spawn_run(name, argv, timeout):
    """Runs this script with the options argv plus --run NAME; returns the child's result."""
    cmd = [sys.executable, os.path.abspath(__file__)] + list(argv) + ["--run", name]
    log("+", shlex.join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_lines, err_lines = [], collections.deque(maxlen=20)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, None, out_lines), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, err_lines), daemon=True)]
    for t in pumps:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    for t in pumps:
        t.join()

    for line in reversed(out_lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            if isinstance(result, dict) and result.get("run") == name:
                result["exit_code"] = proc.returncode
                return result
    if timed_out:
        error = "killed after %.0f s (--run-timeout)" % timeout
    else:
        tail = "".join(err_lines).strip().splitlines()
        error = "exit code %d without a result%s" % (
            proc.returncode, (": " + tail[-1]) if tail else "")
    return {"run": name, "ok": False, "error": error, "exit_code": proc.returncode}


def fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value / scale, spec)


def percent(fraction):
    return "-" if fraction is None else "%.0f%%" % (100 * fraction)


def markdown_table(runs, ratios):
    head = ("run", "step ms", "x base", "peak GiB", "x base", "fwd act GiB", "act saved",
            "step peak above start GiB", "saved", "offload GiB/step", "stall ms/step", "freed / bound", "loss")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in runs.items():
        if not r.get("ok"):
            error = r.get("error", "failed").replace("|", "/").replace("\n", " ")
            if len(error) > 100:
                error = error[:97] + "..."
            rows.append("| %s | failed: %s |%s" % (name, error, " |" * (len(head) - 2)))
            continue
        q = ratios.get(name) or {}
        cells = (name, fmt(r["step_ms"], ".1f"), fmt(q.get("step_time"), ".2f"),
                 fmt(r["peak_mem_bytes"], ".2f", GIB), fmt(q.get("peak_mem"), ".2f"),
                 fmt(r.get("fwd_act_mem_bytes"), ".2f", GIB), percent(q.get("fwd_act_mem_saved")),
                 fmt(r["act_mem_bytes"], ".2f", GIB), percent(q.get("act_mem_saved")),
                 fmt(r.get("offloaded_bytes_per_step"), ".2f", GIB),
                 fmt(r.get("stall_ms_per_step"), ".1f"),
                 "-" if not r.get("physics") else "%s / %.0f%%" % (percent(q.get("freed_fraction")),
                                                                   100 * r["physics"]["bound_fraction"]),
                 fmt(r.get("loss"), ".4f"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def driver_main(args, argv):
    require_cuda()
    cfg = model_config(args)
    log("train_gpt: %s, batch %d, dtype %s, runs %s"
        % (asdict(cfg), args.batch, args.dtype, ",".join(args.runs)))
    runs = collections.OrderedDict()
    for i, name in enumerate(args.runs):
        log("[%d/%d] %s" % (i + 1, len(args.runs), name))
        runs[name] = spawn_run(name, argv, args.run_timeout)
        r = runs[name]
        log("[%d/%d] %s: %s" % (i + 1, len(args.runs), name,
                                "%.1f ms/step, peak %.2f GiB" % (r["step_ms"], r["peak_mem_bytes"] / GIB)
                                if r.get("ok") else "failed: " + r.get("error", "")))
        # The file holds every run so far: a run cut short leaves the earlier ones.
        write_results(args, argv, cfg, runs)

    ratios = write_results(args, argv, cfg, runs)
    print(markdown_table(runs, ratios))
    # Failed runs are results too (a baseline that runs out of memory, say): the exit
    # status is 1 only when no run succeeded.
    return 0 if any(r.get("ok") for r in runs.values()) else 1


def write_results(args, argv, cfg, runs):
    """Writes the runs so far (with the ratios to the baseline) to --out; returns the ratios."""
    baseline = runs.get("baseline")
    ratios = collections.OrderedDict((n, ratios_to(baseline, r)) for n, r in runs.items())

    device = next((r["device"] for r in runs.values() if r.get("device")), None)
    if device is None:
        device = torch.cuda.get_device_name(0)
    options = {k: v for k, v in vars(args).items() if k != "run"}
    payload = {
        "benchmark": "train_gpt",
        "command": shlex.join([sys.executable, sys.argv[0]] + list(argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "options": options,
        "model": dict(asdict(cfg), batch=args.batch, dtype=args.dtype,
                      params=next((r["params"] for r in runs.values() if "params" in r), None)),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "env": {k: os.environ[k] for k in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
        "runs": runs,
        "ratios": ratios,
    }
    if args.out:
        parent = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(parent, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        log("wrote", args.out)
    return ratios


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    return child_main(args) if args.run else driver_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
