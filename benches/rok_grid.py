#!/usr/bin/env python3
"""SSDTrain's recompute-offload-keep (ROK) grid on this GPU: for each decoder shape, the
runs of benches/train_gpt.py (each in a process of its own), their activation memory
against step time (the ROK curve), and the physics bound beside what was measured.

Shapes: (hidden, layers) = (8192, 4), (12288, 3), (16384, 2) at sequence 1024 and 4096,
micro-batch 16 (8 where 16 does not fit: pass --batch), GPT and Llama-style decoders
(--arch). Runs per shape (--runs):

  baseline                 activations kept in GPU memory
  checkpoint               every block recomputed (torch.utils.checkpoint)
  save_on_cpu              torch.autograd.graph.save_on_cpu(pin_memory=True)
  checkpoint-offload       checkpointing with the blocks' inputs in pinned host memory
  spillway-disk / -shm     spillway, adaptive, on a file on the disk / on /dev/shm
  spillway-shm8            spillway, adaptive, striped over 8 files on /dev/shm
  spillway-host            spillway, adaptive, with the pinned host tier (--host-tier)
  spillway-host-budgetNN   spillway with budget= NN% of the baseline's activation memory
  spillway-host-slowNNN    spillway with max_slowdown=NNN/100 (slow105: 1.05)

`--summary` prints one markdown table of every rok-*.json in --out-dir instead.

Writes one JSON per shape under --out-dir (rok-<gpu>-<arch>-h<h>-s<seq>-mb<batch>.json,
with the command that made it) and, where matplotlib is installed, one PNG per shape: step
time against activation memory, one point per run. Where the baseline runs out of memory
at --batch, the shape runs again at half the micro-batch (down to 1). With --resume the grid
goes on where earlier invocations left it (a grid may take several sittings): a shape
whose files already hold every run asked for is skipped, and one that lacks some runs gets
them, with a baseline of their own (ratios stay within one invocation), in a new part file
(...-mb<batch>-part<N>.json); a micro-batch whose baseline ran out of memory is not tried
again.

The bound: a layer saves about 34*s*b*h bytes (bf16, flash attention) and costs
24*b*s*h^2 + 4*b*s^2*h FLOPs forward; offloading a fraction f during forward needs
f*34*R/(24h+4s) bytes/s at R FLOP/s. Bytes rebuilt in backward (a fraction rho, moved
nowhere) need no bandwidth, so the bound is rho plus the fraction of the rest that the
measured write bandwidth moves. Each spillway run reports that bound
(physics.bound_fraction; physics.offload_bound_fraction without rebuilds) beside the
fraction it freed; and, against the baseline's working-set floor (forward's peak with
nothing saved, no_grad_fwd_peak_bytes: no offloader goes below it), what it freed over
the least of the bound's bytes and the baseline's peak above that floor
(freed_vs_achievable); and against the schedule bound (freed_vs_schedule_bound): from the
step the run planned from, what forward's peak sheds with every tensor that can be rebuilt
rebuilt and every other one written in save order at the measured bandwidth, none before
its save, forward never waiting (the last tensors saved cannot be off the GPU by the end of
forward, which the per-layer bound does not see).
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys

from ratios import ratios_to
from shapes import train_gpt_command

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(8192, 4), (12288, 3), (16384, 2)]
DEFAULT_RUNS = ("baseline,checkpoint,save_on_cpu,checkpoint-offload,spillway-disk,spillway-shm,spillway-shm8,"
                "spillway-host,spillway-host-budget25,spillway-host-budget50,spillway-host-budget75")


def shape_list(text):
    out = []
    for part in text.split(","):
        h, layers = part.split("x")
        out.append((int(h), int(layers)))
    return out


def gpu_short_name(device_name):
    """The model in a GPU's name ("NVIDIA H100 80GB HBM3" -> "h100"), else its last word."""
    m = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", device_name, re.IGNORECASE)
    return (m.group(1) if m else device_name.split()[-1]).lower()


def out_of_memory(result):
    """Whether the baseline of a grid file ran out of GPU memory (the shape does not fit at
    its micro-batch)."""
    base = (result or {}).get("runs", {}).get("baseline") or {}
    return not base.get("ok", True) and "out of memory" in str(base.get("error", "")).lower()


def shape_files(out_dir, stem):
    """The grid files of one shape and micro-batch: stem.json, then its parts in order."""
    names = [stem + ".json"] + sorted(
        (n for n in os.listdir(out_dir) if re.fullmatch(re.escape(stem) + r"-part\d+\.json", n)),
        key=lambda n: int(n[len(stem) + len("-part"):-len(".json")]))
    return [os.path.join(out_dir, n) for n in names if os.path.exists(os.path.join(out_dir, n))]


def load(path):
    with open(path) as f:
        return json.load(f)


def runs_done(out_dir, stem):
    """The runs that completed in any file of the shape, and whether a baseline there ran
    out of memory."""
    done, oom = set(), False
    for path in shape_files(out_dir, stem):
        result = load(path)
        done |= {name for name, r in result.get("runs", {}).items() if r.get("ok")}
        oom = oom or out_of_memory(result)
    return done, oom


def next_part(out_dir, stem):
    """Where a new part of the shape goes: stem.json when there is none yet."""
    files = shape_files(out_dir, stem)
    if not files:
        return os.path.join(out_dir, stem + ".json")
    return os.path.join(out_dir, "%s-part%d.json" % (stem, len(files) + 1))


def summary_rows(result):
    """Markdown rows of one grid file: per run, step time and activation memory against the
    baseline, bytes per tier, stall, and the fraction offloaded beside the bound."""
    m = result["model"]
    shape = "%s h%d L%d s%d mb%d" % (m.get("arch", "gpt"), m["d_model"], m["n_layer"], m["seq_len"], m["batch"])
    rows = []
    for name, r in result["runs"].items():
        if not r.get("ok"):
            rows.append("| %s | %s | failed: %s ||||||||||" % (shape, name, str(r.get("error", ""))[:60].replace("|", "/")))
            continue
        q = ratios_to(result["runs"].get("baseline"), r) or {}
        tier = ((r.get("spillway_stats") or {}).get("engine") or {}).get("host_tier") or {}
        phys = r.get("physics") or {}
        cells = [
            shape, name, "%.0f" % r["step_ms"],
            "-" if q.get("step_time") is None else "%.3f" % q["step_time"],
            "-" if r.get("fwd_act_mem_bytes") is None else "%.2f" % (r["fwd_act_mem_bytes"] / 2**30),
            "-" if q.get("fwd_act_mem_saved") is None else "%.0f%%" % (100 * q["fwd_act_mem_saved"]),
            "%.2f" % (r["act_mem_bytes"] / 2**30),
            "-" if q.get("act_mem_saved") is None else "%.0f%%" % (100 * q["act_mem_saved"]),
            "-" if r.get("offloaded_bytes_per_step") is None else "%.2f" % (r["offloaded_bytes_per_step"] / 2**30),
            "-" if not tier else "%.2f / %.2f" % (tier.get("bytes_in", 0) / 2**30, tier.get("bytes_spilled", 0) / 2**30),
            "-" if r.get("stall_ms_per_step") is None else "%.1f" % r["stall_ms_per_step"],
            "-" if not phys else "%.0f%% / %.0f%%" % (100 * phys.get("offloaded_fraction", 0), 100 * phys["bound_fraction"]),
            "-" if q.get("freed_fraction") is None else "%.0f%% (%.2fx)" % (100 * q["freed_fraction"], q["freed_vs_bound"] or 0),
            "-" if q.get("freed_vs_achievable") is None else "%.2fx" % q["freed_vs_achievable"],
            "-" if q.get("freed_vs_schedule_bound") is None else "%.2fx" % q["freed_vs_schedule_bound"],
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def print_summary(out_dir):
    head = ["file", "shape", "run", "step ms", "x base", "fwd act GiB", "act saved", "step peak above start GiB",
            "saved", "offloaded GiB/step",
            "host tier in / spilled GiB (run)", "stall ms/step", "offloaded / bound",
            "freed at the peak (x bound)", "x bound above the working-set floor", "x schedule bound"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("rok-") and name.endswith(".json"):
            result = load(os.path.join(out_dir, name))
            if result.get("benchmark") != "train_gpt":
                continue  # e.g. max_batch.py's results beside the grid
            for row in summary_rows(result):
                print("| " + name[len("rok-"):-len(".json")] + " " + row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=shape_list, default=SHAPES, help="hidden x layers, e.g. 8192x4,16384x2")
    ap.add_argument("--seqs", default="1024,4096", help="sequence lengths (default 1024,4096)")
    ap.add_argument("--batch", type=int, default=16,
                    help="micro-batch (default 16; halved per shape while the baseline runs out of memory)")
    ap.add_argument("--arch", default="gpt", help="gpt, llama, or both comma-separated")
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--host-tier", default="40GiB")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--gpu-name", default=None, help="name in the file names (default: from torch)")
    ap.add_argument("--summary", action="store_true", help="print the table of the results in --out-dir and stop")
    ap.add_argument("--resume", action="store_true",
                    help="skip what --out-dir already holds; add missing runs as part files")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch %d: a micro-batch of 1 or more" % args.batch)
    if args.summary:
        print_summary(args.out_dir)
        return 0
    gpu = args.gpu_name
    if gpu is None:
        import torch

        gpu = gpu_short_name(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out_dir, exist_ok=True)
    failed = 0
    for arch in args.arch.split(","):
        for seq in (int(s) for s in args.seqs.split(",")):
            for h, layers in args.shapes:
                if not run_shape(args, gpu, arch, seq, h, layers):
                    failed += 1
    return 1 if failed else 0


def run_shape(args, gpu, arch, seq, h, layers):
    """Runs one shape of the grid at the largest micro-batch from --batch down (halving)
    whose baseline fits. Returns False when a run of train_gpt.py failed as a whole."""
    batch = args.batch
    while batch >= 1:
        stem = "rok-%s-%s-h%d-s%d-mb%d" % (gpu, arch, h, seq, batch)
        runs = args.runs.split(",")
        out = os.path.join(args.out_dir, stem + ".json")
        if args.resume:
            done, oom = runs_done(args.out_dir, stem)
            if oom:
                print("rok_grid: %s: its baseline ran out of memory before; half the micro-batch" % stem, flush=True)
                batch //= 2
                continue
            missing = [r for r in runs if r not in done]
            if not missing:
                print("rok_grid: %s: every run asked for is there; skipped" % stem, flush=True)
                return True
            runs = ["baseline"] + [r for r in missing if r != "baseline"]
            out = next_part(args.out_dir, stem)
        cmd = train_gpt_command(arch=arch, layers=layers, d_model=h, seq=seq, batch=batch,
                                steps=args.steps, warmup=args.warmup, runs=",".join(runs),
                                host_tier=args.host_tier, out=out)
        print("rok_grid:", shlex.join(cmd), flush=True)
        rc = subprocess.call(cmd)
        if not os.path.exists(out):
            return False
        result = load(out)
        result["grid_command"] = shlex.join([sys.executable] + sys.argv)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
            f.write("\n")
        if out_of_memory(result) and batch > 1:
            print("rok_grid: %s: the baseline ran out of memory; half the micro-batch" % stem, flush=True)
            batch //= 2
            continue
        try:
            from plot import plot_file

            plot_file(out)  # the ROK curve, beside the JSON
        except ImportError as e:
            print(f"rok_grid: no plot ({e}): pip install matplotlib", file=sys.stderr)
        return rc == 0
    return False


if __name__ == "__main__":
    sys.exit(main())
