#!/usr/bin/env python3
"""The largest micro-batch that fits, with and without spillway, and the tokens/s of each:
the memory spillway saves, spent on a larger batch (SSDTrain reports up to +31%).

For one decoder shape, each run of benches/train_gpt.py (`--runs`) is tried at growing
micro-batches (doubling from --start, then a binary search between the last that fit and
the first that did not), every trial in a process of its own. A trial fits when its run
completes its steps (no out-of-memory error). Writes JSON with every trial and, per run,
the largest batch that fit and its tokens/s. The spillway runs use the host tier:
spillway-host-fit (the adaptive policy, its profiling steps offloading every block but the
last: profile="offload") and spillway-host-all (policy="all"). The adaptive policy's
profiling steps otherwise keep every tensor, which a batch that fits only with offloading
cannot do.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

from shapes import train_gpt_command

def trial(args, run, batch):
    """Runs `run` at `batch`; returns its result dict (ok False when it did not fit)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = train_gpt_command(arch=args.arch, layers=args.layers, d_model=args.d_model, seq=args.seq,
                                batch=batch, steps=args.steps, warmup=args.warmup, runs=run,
                                host_tier=args.host_tier, out=out)
        print("max_batch:", shlex.join(cmd), flush=True)
        subprocess.call(cmd, stdout=subprocess.DEVNULL)
        try:
            with open(out) as f:
                r = json.load(f)["runs"][run]
        except (OSError, KeyError, ValueError):
            r = {"ok": False, "error": "no result"}
    r["batch"] = batch
    return r


def largest(args, run):
    trials = []
    fit, fail = None, None
    b = args.start
    while b <= args.limit:
        r = trial(args, run, b)
        trials.append(r)
        if r.get("ok"):
            fit = b
            b *= 2
        else:
            fail = b
            break
    if fit is not None and fail is not None:
        lo, hi = fit, fail
        while hi - lo > args.granularity:
            mid = (lo + hi) // 2
            r = trial(args, run, mid)
            trials.append(r)
            lo, hi = (mid, hi) if r.get("ok") else (lo, mid)
        fit = lo
    best = next((t for t in trials if t.get("ok") and t["batch"] == fit), None)
    return {
        "largest_batch": fit,
        "tokens_per_s": None if best is None else best.get("tokens_per_s"),
        "step_ms": None if best is None else best.get("step_ms"),
        "trials": [{k: t.get(k) for k in ("batch", "ok", "step_ms", "tokens_per_s", "peak_mem_bytes", "error")}
                   for t in trials],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gpt")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--start", type=int, default=8)
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    # The spillway runs offload from the first step: a micro-batch that fits only with
    # offloading cannot be profiled without it.
    ap.add_argument("--runs", default="baseline,spillway-host-fit,spillway-host-all")
    ap.add_argument("--host-tier", default="40GiB")
    ap.add_argument("--granularity", type=int, default=1,
                    help="stop the search once the largest fit is known to within this many (default 1)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    result = {"benchmark": "max_batch", "command": shlex.join([sys.executable] + sys.argv),
              "shape": {k: getattr(args, k) for k in ("arch", "layers", "d_model", "seq")}, "runs": {}}
    for run in args.runs.split(","):
        result["runs"][run] = largest(args, run)
        # The file holds every run so far: a search cut short leaves the earlier ones.
        base = result["runs"].get("baseline", {}).get("tokens_per_s")
        for r in result["runs"].values():
            r["tokens_per_s_vs_baseline"] = None if not base or not r.get("tokens_per_s") else r["tokens_per_s"] / base
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    for run, r in result["runs"].items():
        print("%-16s largest micro-batch %s, %s tokens/s (x%s)" % (
            run, r["largest_batch"], r["tokens_per_s"], r["tokens_per_s_vs_baseline"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
