#!/usr/bin/env python3
"""Peak GPU memory and step time of a Llama-style model trained through Hugging Face's
``transformers.Trainer`` and through PyTorch Lightning, with and without spillway's
integrations, beside activation checkpointing.

The model is ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (random
weights, nothing downloaded) in bf16 with the ``sdpa`` attention. With the defaults
(hidden 4096, 8 layers, 32 heads, 8 key/value heads, intermediate 11008, vocabulary 32000,
sequence 2048, micro-batch 8) it has about 1.7 B parameters, and the activations of a step
take most of the memory it needs. The data are random token ids from a seeded generator,
with labels = input_ids.

Frameworks (--frameworks):

  hf          a plain transformers.Trainer (bf16, optim "adamw_torch", constant learning
              rate, no logging, no saving); spillway runs wrap it with
              spillway.integrations.hf.wrap(trainer, path=--path, host_tier=--host-tier)
  lightning   a LightningModule around the same model (automatic optimization, AdamW
              without weight decay, gradients clipped at norm 1.0 as the Trainer does),
              Trainer(devices=1, precision="bf16-true"); spillway runs add
              spillway.integrations.lightning.SpillwayCallback(path=--path, host_tier=...)

Runs (--runs), for each framework:

  baseline                every activation stays in GPU memory
  checkpointing           model.gradient_checkpointing_enable(
                              gradient_checkpointing_kwargs={"use_reentrant": False}),
                          by its transformers 5 name, activation_checkpointing_enable,
                          where it has that (the old one is a deprecated alias there)
  spillway                the integration: adaptive policy, the pinned host tier
                          (--host-tier) in front of a spill file in --path
  spillway+checkpointing  both (the integration then tells the planner not to add
                          recomputation of its own)

Each (framework, run) trains --warmup untimed steps, then --steps timed ones, in a process
of its own (the script runs itself with --child), so that no allocator state or hook
carries from one run to the next. A callback of the framework (TrainerCallback's
on_step_begin/on_step_end; Lightning's on_train_batch_start/on_train_batch_end) measures
each step, with torch.cuda.synchronize() on both sides:

  step_ms          the median time of the timed steps (step_ms_all: each of them)
  peak_mem_bytes   torch.cuda.max_memory_allocated() over the timed steps (the counter
                   is reset at the start of every step)
  act_mem_bytes    the step's peak above its start: the largest over the timed steps of
                   max_memory_allocated() minus memory_allocated() at the step's start.
                   Parameters, optimizer state and the batch are left out; what forward
                   keeps for backward, the gradients and the optimizer's temporaries are
                   in. (The Trainer frees the gradients at a step's end; Lightning in the
                   next step, between its forward and its backward, so its steps start
                   with them allocated: compare runs within a framework.)
  loss             the loss of the last timed step
  spillway         from the integration's stats(): offloaded_bytes_per_step (over the
                   timed steps), fetched_bytes_per_step, stall_ms_per_step, and the
                   policy's mode, offloaded segments and reason
  vs_baseline      against the same framework's baseline: step_time (ratio), peak_mem
                   (ratio), act_mem_saved (1 - act_mem_bytes / baseline's)

A run that fails (out of memory, say) is recorded with ok=false and its error, and the
others still run. A framework whose packages are not installed is recorded as skipped,
with the pip extra that installs them (the lightning runs need transformers as well, for
the model). The exit status is 1 only when no run succeeded.

--out (required) gets a JSON file with the command line, the options, the model's
configuration, the device, the versions of python, torch, transformers, lightning and
spillway, and every run's record; a markdown table is printed at the end.

    python3 benches/integrations.py --out benches/results/integrations-h100.json
    python3 benches/integrations.py --frameworks hf --runs baseline,spillway --layers 16 --out /tmp/hf.json
    python3 benches/integrations.py --small --device cpu --path /tmp --out /tmp/int.json

The first is the full run, on one GPU, with the defaults (--hidden 4096 --layers 8 --seq
2048 --batch 8 --steps 5 --warmup 3 --host-tier 32GiB --path /dev/shm). The last is a
smoke test on the CPU: tiny sizes (--small: hidden 64, 2 layers, 4 heads, sequence 32,
micro-batch 2, vocabulary 128, host tier 64MiB, every saved tensor offloadable); memory
figures are null there (the CPU has no allocator counters), times are the CPU's.
"""

import argparse
import collections
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

FRAMEWORKS = ("hf", "lightning")
RUNS = ("baseline", "checkpointing", "spillway", "spillway+checkpointing")

# The pip extra that installs each package a framework needs.
EXTRAS = {"transformers": "hf", "lightning": "lightning"}

# --small: the defaults of the options not given, for a smoke test on the CPU.
SMALL = {"hidden": 64, "layers": 2, "heads": 4, "seq": 32, "batch": 2, "vocab": 128,
         "host_tier": "64MiB", "min_tensor_bytes": 0}
FULL = {"hidden": 4096, "layers": 8, "heads": None, "seq": 2048, "batch": 8, "vocab": 32000,
        "host_tier": "32GiB", "min_tensor_bytes": None}

GIB = 1024 ** 3


def log(*parts):
    print("integrations:", *parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Options


def comma_list(choices, what):
    """An argparse type: a comma list of names from choices, in the order given."""

    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError("unknown %s %s; choose from %s"
                                             % (what, ", ".join(unknown) or "(none)", ",".join(choices)))
        return list(dict.fromkeys(names))

    return parse


def size_text(text):
    """A size such as 32GiB, checked by spillway's own parser where spillway is installed;
    the text itself is passed on (the engine takes sizes as text)."""
    try:
        from spillway import parse_size
    except ImportError:
        return text
    try:
        parse_size(text)
    except Exception:
        raise argparse.ArgumentTypeError("not a size: %r (e.g. 32GiB, 512MiB)" % text)
    return text


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = ap.add_argument_group("model and batch")
    model.add_argument("--small", action="store_true",
                       help="tiny defaults for a smoke test: hidden 64, 2 layers, 4 heads, seq 32, batch 2, "
                            "vocab 128, host tier 64MiB, min tensor bytes 0")
    model.add_argument("--hidden", type=int, help="hidden size (default 4096)")
    model.add_argument("--layers", type=int, help="decoder layers (default 8)")
    model.add_argument("--heads", type=int, help="attention heads (default hidden/128)")
    model.add_argument("--kv-heads", type=int, help="key/value heads (default heads/4)")
    model.add_argument("--intermediate", type=int,
                       help="MLP size (default 8/3 hidden, rounded up to a multiple of 256)")
    model.add_argument("--vocab", type=int, help="vocabulary size (default 32000)")
    model.add_argument("--seq", type=int, help="sequence length (default 2048)")
    model.add_argument("--batch", type=int, help="micro-batch size (default 8)")

    train = ap.add_argument_group("training")
    train.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    train.add_argument("--seed", type=int, default=1234, help="seed of the weights and the data (default 1234)")
    train.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                       help="cuda (default), or cpu for a smoke test (with --small)")

    spill = ap.add_argument_group("spillway")
    spill.add_argument("--path", default="/dev/shm",
                       help="directory of spillway's spill file (default /dev/shm)")
    spill.add_argument("--host-tier", type=size_text, default=None,
                       help="pinned host memory in front of the spill file: the offloader's host_tier "
                            "(default 32GiB; 64MiB with --small)")
    spill.add_argument("--min-tensor-bytes", type=int, default=None,
                       help="the offloader's min_tensor_bytes (default: its own, 1 MiB; 0 with --small)")

    runs = ap.add_argument_group("runs and output")
    runs.add_argument("--frameworks", type=comma_list(FRAMEWORKS, "framework(s)"), default=list(FRAMEWORKS),
                      help="comma list of %s (default both)" % ",".join(FRAMEWORKS))
    runs.add_argument("--runs", type=comma_list(RUNS, "run(s)"), default=list(RUNS),
                      help="comma list of %s (default all)" % ",".join(RUNS))
    runs.add_argument("--out", required=True, help="write the results as JSON to this file")
    runs.add_argument("--run-timeout", type=float, default=1800.0,
                      help="seconds one run may take before it is killed (default 1800)")
    runs.add_argument("--child", default=None, help=argparse.SUPPRESS)
    runs.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    return ap


def fill_defaults(args):
    """The defaults that depend on --small and on other sizes."""
    preset = SMALL if args.small else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.heads is None:
        args.heads = max(1, args.hidden // 128)
    if args.kv_heads is None:
        args.kv_heads = max(1, args.heads // 4)
    if args.intermediate is None:
        args.intermediate = 256 * math.ceil(8 * args.hidden / 3 / 256)


def check_args(ap, args):
    sizes = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch")
    bad = ["--" + n.replace("_", "-") for n in sizes if getattr(args, n) < 1]
    if bad:
        ap.error("%s must be >= 1" % ", ".join(bad))
    if args.hidden % args.heads or args.heads % args.kv_heads:
        ap.error("--hidden (%d) must be a multiple of --heads (%d), and --heads of --kv-heads (%d)"
                 % (args.hidden, args.heads, args.kv_heads))
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if any(r.startswith("spillway") for r in args.runs) and not os.path.isdir(args.path):
        ap.error("--path %s is not a directory (spillway's spill file is made there)" % args.path)


def check_device(ap, args):
    """The driver's check that the GPU asked for is there (the children would all fail)."""
    if args.device != "cuda":
        return
    try:
        import torch
    except ImportError:
        ap.error("torch is not installed (pip install torch)")
    if not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU (torch %s); --small --device cpu runs a smoke test on the CPU"
                 % torch.__version__)


def parse_args(argv):
    ap = build_parser()
    args = ap.parse_args(argv)
    fill_defaults(args)
    check_args(ap, args)
    if args.child is None:
        check_device(ap, args)
    return args


# --------------------------------------------------------------------------------------
# One run (child process)


class FrameworkMissing(Exception):
    """A package the framework needs cannot be imported: the run is skipped."""


def import_transformers():
    """``transformers``; raises ImportError saying which pip extra installs it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("transformers cannot be imported (%s): pip install 'spillway[%s]'"
                          % (e, EXTRAS["transformers"])) from e
    return transformers


def import_lightning():
    """``lightning.pytorch``, or the older ``pytorch_lightning`` (the integration's order),
    and the name of the package; raises ImportError saying which pip extra installs it."""
    try:
        import lightning.pytorch as pl
        return pl, "lightning"
    except ImportError as e:
        first = e
    try:
        import pytorch_lightning as pl
        return pl, "pytorch_lightning"
    except ImportError:
        raise ImportError("lightning cannot be imported (%s): pip install 'spillway[%s]'"
                          % (first, EXTRAS["lightning"])) from first


def import_framework(framework):
    """The packages of the framework: (transformers, Lightning's module or None, its
    package name or None). Raises FrameworkMissing naming every one missing."""
    found, missing = [], []
    for load in (import_transformers,) + ((import_lightning,) if framework == "lightning" else ()):
        try:
            found.append(load())
        except ImportError as e:
            missing.append(str(e))
    if missing:
        raise FrameworkMissing("; ".join(missing))
    transformers = found[0]
    pl, package = found[1] if framework == "lightning" else (None, None)
    return transformers, pl, package


def build_model(args, transformers, torch, device):
    """The Llama model of the options, random weights, bf16, on device, in train mode
    (checkpointing is enabled by the caller, as the run says)."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq, use_cache=False, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.train()
    return model


def enable_checkpointing(model):
    """Non-reentrant activation checkpointing of every decoder layer. transformers 5
    names the method activation_checkpointing_enable (gradient_checkpointing_enable, the
    name of 4.x, is its deprecated alias there); returns the name called."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return "activation_checkpointing_enable"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return "gradient_checkpointing_enable"


class RandomTokens:
    """count samples of seq random token ids (seeded), each {"input_ids", "labels"}."""

    def __init__(self, torch, count, seq, vocab, seed):
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (count, seq), generator=gen)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class StepMeter:
    """What a framework's callback measures around each training step: its time (with the
    GPU synchronised on both sides), the memory allocated at its start and its peak (the
    allocator's peak counter is reset at the start), its loss, and the integration's stats
    when the timed steps begin."""

    def __init__(self, torch, cuda, warmup, spillway_stats=None):
        self.torch = torch
        self.cuda = cuda
        self.warmup = warmup
        self.spillway_stats = spillway_stats or (lambda: None)
        self.stats_before = None  # the integration's stats when the timed steps begin
        self.stats_after = None  # and after the last one (set by the caller)
        self.steps = []  # (ms, bytes allocated at the start, peak bytes) per step
        self.losses = []
        self.loss = None  # the loss of the step running
        self._start = None

    def begin(self):
        if len(self.steps) == self.warmup:
            self.stats_before = self.spillway_stats()
        allocated = None
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            allocated = self.torch.cuda.memory_allocated()
        self.loss = None
        self._start = (time.perf_counter(), allocated)

    def end(self):
        if self.cuda:
            self.torch.cuda.synchronize()
        t0, allocated = self._start
        ms = (time.perf_counter() - t0) * 1e3
        peak = self.torch.cuda.max_memory_allocated() if self.cuda else None
        self.steps.append((ms, allocated, peak))
        self.losses.append(None if self.loss is None else float(self.loss))

    def results(self):
        timed = self.steps[self.warmup:]
        if len(timed) < 1:
            raise RuntimeError("%d step(s) measured, none after the %d warmup step(s)"
                               % (len(self.steps), self.warmup))
        times = [ms for ms, _, _ in timed]
        cuda = self.cuda
        return {
            "step_ms": statistics.median(times),
            "step_ms_all": times,
            "peak_mem_bytes": max(p for _, _, p in timed) if cuda else None,
            "act_mem_bytes": max(p - a for _, a, p in timed) if cuda else None,
            "loss": self.losses[-1],
            "losses": self.losses[self.warmup:],
        }


def spillway_summary(before, after, steps):
    """What a spillway run reports from the integration's stats before and after the timed
    steps: bytes per step and the policy's choice with its reason."""
    if after is None:
        return None
    before = before or {}

    def per_step(key, scale=1.0):
        return (after.get(key, 0) - before.get(key, 0)) * scale / steps

    policy = after.get("policy") or {}
    return {
        "offloaded_bytes_per_step": per_step("bytes_offloaded"),
        "fetched_bytes_per_step": per_step("bytes_fetched"),
        "stall_ms_per_step": per_step("stall_s", 1e3),
        "last_step_offloaded_bytes": (after.get("last_step") or {}).get("offloaded_bytes"),
        "policy": {k: policy.get(k) for k in ("mode", "offloaded_segments", "segments", "reason")},
    }


def spillway_options(args):
    """The offloader options of the spillway runs (the integrations' keyword arguments)."""
    options = {"policy": "adaptive", "host_tier": args.host_tier}
    if args.min_tensor_bytes is not None:
        options["min_tensor_bytes"] = args.min_tensor_bytes
    return options


def train_hf(args, torch, device, workdir):
    """Trains through a transformers.Trainer; returns the StepMeter and the record's fields
    about the model and the packages."""
    transformers, _, _ = import_framework("hf")
    model = build_model(args, transformers, torch, device)
    checkpointing = enable_checkpointing(model) if "checkpointing" in args.run else None
    total = args.warmup + args.steps
    training_args = transformers.TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=args.batch, max_steps=total, bf16=True,
        optim="adamw_torch", learning_rate=args.lr, lr_scheduler_type="constant", logging_strategy="no",
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
        use_cpu=device == "cpu",
    )
    data = RandomTokens(torch, args.batch * total, args.seq, args.vocab, args.seed + 1)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=data)
    stats = lambda: None  # noqa: E731
    if args.run.startswith("spillway"):
        import spillway.integrations.hf

        spillway.integrations.hf.wrap(trainer, path=args.path, **spillway_options(args))
        stats = trainer.spillway.stats
    meter = StepMeter(torch, device == "cuda", args.warmup, stats)

    class Meter(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            meter.begin()

        def on_step_end(self, *_, **__):
            meter.end()

    trainer.add_callback(Meter())
    # The loss of each step, as training_step (spillway's, where wrapped) returns it.
    inner = trainer.training_step

    def training_step(*a, **kw):
        meter.loss = inner(*a, **kw).detach()
        return meter.loss

    trainer.training_step = training_step
    trainer.train()
    meter.stats_after = stats()
    if getattr(trainer, "spillway", None) is not None:
        trainer.spillway.close()
    return meter, model_record(model, transformers, checkpointing)


def train_lightning(args, torch, device, workdir):
    """Trains through a Lightning Trainer; returns what train_hf does."""
    transformers, pl, package = import_framework("lightning")
    model = build_model(args, transformers, torch, device)
    checkpointing = enable_checkpointing(model) if "checkpointing" in args.run else None
    lr = args.lr

    class LlamaModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)

    spill = None
    stats = lambda: None  # noqa: E731
    if args.run.startswith("spillway"):
        from spillway.integrations.lightning import SpillwayCallback

        spill = SpillwayCallback(path=args.path, **spillway_options(args))
        stats = spill.stats
    meter = StepMeter(torch, device == "cuda", args.warmup, stats)

    class Meter(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            meter.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            meter.end()

    # The meter first: its step opens before spillway's and closes after it.
    callbacks = [Meter()] + ([spill] if spill is not None else [])
    total = args.warmup + args.steps
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="bf16-true", max_steps=total,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=workdir,
    )
    data = RandomTokens(torch, args.batch * total, args.seq, args.vocab, args.seed + 1)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)
    trainer.fit(LlamaModule(), train_dataloaders=loader)
    meter.stats_after = stats()
    if spill is not None:
        spill.close()
    return meter, dict(model_record(model, transformers, checkpointing), lightning_package=package,
                       lightning=pl.__version__)


def model_record(model, transformers, checkpointing):
    return {"params": sum(p.numel() for p in model.parameters()), "transformers": transformers.__version__,
            "checkpointing_call": checkpointing}


TRAIN = {"hf": train_hf, "lightning": train_lightning}


def device_name(torch, device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return "cpu: %s, %d cores" % (platform.processor() or platform.machine(), os.cpu_count() or 0)


def run_child(args):
    """Trains args.framework/args.run and returns its record."""
    import warnings

    import torch

    # Lightning's advice about dataloader workers is noise here: the data are in memory.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    record = {"framework": args.framework, "run": args.run, "ok": False,
              "device": device_name(torch, args.device), "torch": torch.__version__,
              "checkpointing": "checkpointing" in args.run}
    if args.run.startswith("spillway"):
        record["spillway_options"] = dict(spillway_options(args), path=args.path)
    with tempfile.TemporaryDirectory(prefix="spillway-integrations-") as workdir:
        t0 = time.perf_counter()
        meter, extra = TRAIN[args.framework](args, torch, args.device, workdir)
        record.update(extra)
        record.update(meter.results())
        record["spillway"] = spillway_summary(meter.stats_before, meter.stats_after, args.steps)
        record["wall_s"] = time.perf_counter() - t0
    record["ok"] = True
    return record


def child_main(args):
    args.framework, _, args.run = args.child.partition(":")
    if args.framework not in FRAMEWORKS or args.run not in RUNS:
        raise SystemExit("integrations.py: --child %r: expected FRAMEWORK:RUN" % args.child)
    try:
        record = run_child(args)
    except FrameworkMissing as e:
        log("%s: skipped: %s" % (args.child, e))
        record = {"framework": args.framework, "run": args.run, "ok": False, "skipped": True, "error": str(e)}
    except Exception as e:  # the run's result, for the driver to report
        traceback.print_exc(file=sys.stderr)
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e)
        record = {"framework": args.framework, "run": args.run, "ok": False,
                  "error": "%s: %s" % (type(e).__name__, e), "oom": oom}
    with open(args.child_result, "w") as f:
        json.dump(record, f, default=str)
    return 0 if record["ok"] else 1


# --------------------------------------------------------------------------------------
# Driver (parent process)


def spawn(framework, run, argv, timeout):
    """Runs one (framework, run) in a child process, its output passed on to stderr;
    returns the child's record, or a failed one saying why there is none."""
    with tempfile.TemporaryDirectory(prefix="spillway-integrations-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__)] + list(argv) + [
            "--child", "%s:%s" % (framework, run), "--child-result", result_path]
        log("+", shlex.join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed = threading.Event()

        def kill():
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        tail = collections.deque(maxlen=20)
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                tail.append(line.rstrip("\n"))
            code = proc.wait()
        finally:
            timer.cancel()
        try:
            with open(result_path) as f:
                record = json.load(f)
            record["exit_code"] = code
            return record
        except (OSError, ValueError):
            pass
    if killed.is_set():
        error = "killed after %.0f s (--run-timeout)" % timeout
    else:
        last = next((line for line in reversed(tail) if line.strip()), "")
        error = "exit code %d without a result%s" % (code, ": " + last if last else "")
    return {"framework": framework, "run": run, "ok": False, "error": error, "exit_code": code}


def vs_baseline(baseline, record):
    """The run against its framework's baseline; None when either failed."""
    if not (baseline and baseline.get("ok") and record.get("ok")):
        return None

    def ratio(key):
        b, r = baseline.get(key), record.get(key)
        return r / b if b and r is not None else None

    b, r = baseline.get("act_mem_bytes"), record.get("act_mem_bytes")
    return {"step_time": ratio("step_ms"), "peak_mem": ratio("peak_mem_bytes"),
            "act_mem_saved": 1.0 - r / b if b and r is not None else None}


def add_ratios(records):
    baselines = {r["framework"]: r for r in records if r["run"] == "baseline"}
    for r in records:
        r["vs_baseline"] = vs_baseline(baselines.get(r["framework"]), r)


def versions():
    """The installed versions of the packages the runs use (None: not installed)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lightning", "pytorch_lightning", "accelerate", "spillway"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_fields(args, records):
    fields = {k: getattr(args, k) for k in
              ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch")}
    fields.update(dtype="bf16", attn_implementation="sdpa",
                  params=next((r["params"] for r in records if r.get("params")), None))
    return fields


def write_results(args, argv, records):
    device = next((r["device"] for r in records if r.get("device")), None)
    payload = {
        "benchmark": "integrations",
        "command": shlex.join([sys.executable, sys.argv[0]] + list(argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "options": {k: v for k, v in vars(args).items() if k not in ("child", "child_result")},
        "model": model_fields(args, records),
        "spillway_options": dict(spillway_options(args), path=args.path),
        "device": device,
        "versions": versions(),
        "env": {k: os.environ[k] for k in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "skipped": {r["framework"]: r["error"] for r in records if r.get("skipped")},
        "runs": records,
    }
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    log("wrote", args.out)


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return "%.2f %s" % (n / scale, unit)
    return "%d B" % n


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def percent(fraction):
    return "-" if fraction is None else "%.0f%%" % (100 * fraction)


def markdown_table(records):
    head = ("framework", "run", "step ms", "x base", "peak", "x base", "step peak above start", "saved",
            "offloaded/step", "loss")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if not r.get("ok"):
            what = "skipped" if r.get("skipped") else "failed"
            error = r.get("error", "").replace("|", "/").replace("\n", " ")
            if len(error) > 100:
                error = error[:97] + "..."
            rows.append("| %s | %s | %s: %s |%s" % (r["framework"], r["run"], what, error, " |" * (len(head) - 3)))
            continue
        q = r.get("vs_baseline") or {}
        spill = r.get("spillway") or {}
        cells = (r["framework"], r["run"], fmt(r["step_ms"], ".1f"), fmt(q.get("step_time"), ".2f"),
                 fmt_bytes(r["peak_mem_bytes"]), fmt(q.get("peak_mem"), ".2f"), fmt_bytes(r["act_mem_bytes"]),
                 percent(q.get("act_mem_saved")), fmt_bytes(spill.get("offloaded_bytes_per_step")),
                 fmt(r.get("loss"), ".4f"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def skipped_like(record, run):
    """The record of a run not started: its framework was skipped for the same reason."""
    return {"framework": record["framework"], "run": run, "ok": False, "skipped": True, "error": record["error"]}


def driver_main(args, argv):
    plan = [(f, r) for f in args.frameworks for r in args.runs]
    log("%d run(s): %s; hidden %d, %d layers, seq %d, batch %d, on %s"
        % (len(plan), ", ".join("%s:%s" % p for p in plan), args.hidden, args.layers, args.seq, args.batch,
           args.device))
    records = []
    skipped = {}
    for i, (framework, run) in enumerate(plan):
        if framework in skipped:
            records.append(skipped_like(skipped[framework], run))
        else:
            log("[%d/%d] %s %s" % (i + 1, len(plan), framework, run))
            records.append(spawn(framework, run, argv, args.run_timeout))
            if records[-1].get("skipped"):
                skipped[framework] = records[-1]
        add_ratios(records)
        # The file holds every run so far: a run cut short leaves the earlier ones.
        write_results(args, argv, records)
    print(markdown_table(records))
    return 0 if any(r.get("ok") for r in records) else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    return child_main(args) if args.child else driver_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
