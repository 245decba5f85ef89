#!/usr/bin/env python3
"""Striping over independent targets: each target alone, then all of them as one striped
set, runs interleaved, same sizes. Target: the set's throughput >= 0.9x the sum of the
members' own throughputs measured in the same run.

    python3 benches/striping.py --spillway dist/spillway --target disk=/var/tmp/x --target shm=/dev/shm/x
"""

import argparse
import os

from benchlib import median, run_json_lines, write_result

OPS = ("write", "read")


def bench(args, paths, size):
    cmd = [args.spillway, "bench", "--mem", args.mem, "--backend", args.backend, "--op", "write,read",
           "--size", size, "--block", args.block, "--qd", str(args.qd), "--threads", str(args.threads),
           "--json"]
    for p in paths:
        cmd += ["--path", p]
    if len(paths) > 1:
        cmd += ["--stripe", args.stripe]
        if args.weights:
            cmd += ["--stripe-weights", args.weights]
    return {r["op"]: r for r in run_json_lines(cmd)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spillway", default="dist/spillway")
    ap.add_argument("--target", action="append", required=True, help="name=directory (two or more)")
    ap.add_argument("--size", default="8G", help="bytes per member (the set moves members x size)")
    ap.add_argument("--block", default="4M")
    ap.add_argument("--stripe", default="1M")
    ap.add_argument("--weights", default="", help="--stripe-weights of the set, e.g. 2,5")
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mem", default="gpu")
    ap.add_argument("--backend", default="uring")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benches/results")
    ap.add_argument("--name", default="striping")
    args = ap.parse_args()
    if len(args.target) < 2:
        ap.error("striping needs two or more --target")

    names, paths = [], []
    for spec in args.target:
        name, directory = spec.split("=", 1)
        os.makedirs(directory, exist_ok=True)
        names.append(name)
        paths.append(os.path.join(directory, "spillway-stripe.dat"))
    size_bytes = parse_size(args.size)
    set_size = str(size_bytes * len(paths))

    runs = {name: [] for name in names}
    runs["striped"] = []
    try:
        for _ in range(args.reps):
            for name, path in zip(names, paths):
                runs[name].append(bench(args, [path], args.size))
            runs["striped"].append(bench(args, paths, set_size))
    finally:
        for p in paths:
            if os.path.exists(p):
                os.remove(p)

    med = {k: {op: median([r[op]["throughput_gbps"] for r in v]) for op in OPS} for k, v in runs.items()}
    ratio = {op: med["striped"][op] / sum(med[n][op] for n in names) for op in OPS}
    last = runs["striped"][-1]
    write_result(args.out, args.name, {
        "what": "each target alone, then all striped as one set (spillway bench --path A --path B "
                "--stripe), interleaved; throughput_gbps medians; ratio = set / sum of members",
        "targets": dict(zip(names, paths)),
        "settings": {"mem": args.mem, "backend": args.backend, "size_per_member": args.size,
                     "block": args.block, "stripe": args.stripe, "weights": args.weights or None,
                     "qd": args.qd,
                     "threads": args.threads, "reps": args.reps},
        "median_gbps": med,
        "ratio_set_over_sum": ratio,
        "target_ratio": 0.9,
        "members_last_run": {op: last[op].get("members") for op in OPS},
        "runs": runs,
    })
    for op in OPS:
        parts = ", ".join(f"{n} {med[n][op]:.2f}" for n in names)
        print(f"{op}: {parts}; striped {med['striped'][op]:.2f} GB/s = {ratio[op]:.2f}x the sum")


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


if __name__ == "__main__":
    main()
