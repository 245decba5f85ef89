#!/usr/bin/env python3
"""GPU memory against host memory through the same backend on the same target, runs
interleaved: the cost of staging GPU data through pinned host buffers (uring) and what
cuFile does on the same storage. Target: uring GPU throughput >= 0.9x uring host throughput.

    python3 benches/gpu_vs_host.py --spillway dist/spillway --storage disk=/var/tmp/x --storage shm=/dev/shm/x
"""

import argparse
import os

from benchlib import median, run_json, run_json_lines, write_result

CONFIGS = [("host", "uring"), ("gpu", "uring"), ("gpu", "cufile")]


def bench(binary, mem, backend, path, size, block, qd, threads):
    cmd = [binary, "bench", "--mem", mem, "--backend", backend, "--op", "write,read",
           "--size", size, "--block", block, "--qd", str(qd), "--threads", str(threads),
           "--path", path, "--json"]
    return {r["op"]: r for r in run_json_lines(cmd)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spillway", default="dist/spillway")
    ap.add_argument("--storage", action="append", required=True, help="name=directory")
    ap.add_argument("--size", default="4G")
    ap.add_argument("--block", default="1M")
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benches/results")
    ap.add_argument("--name", default="gpu-vs-host")
    args = ap.parse_args()

    info = run_json([args.spillway, "info", "--json"])
    storages = {}
    for spec in args.storage:
        name, directory = spec.split("=", 1)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "spillway-perf.dat")
        runs = {f"{m}-{b}": [] for m, b in CONFIGS}
        errors = {}
        for _ in range(args.reps):
            for mem, backend in CONFIGS:
                key = f"{mem}-{backend}"
                try:
                    runs[key].append(bench(args.spillway, mem, backend, path, args.size,
                                           args.block, args.qd, args.threads))
                except Exception as e:  # a backend unavailable here is reported, not fatal
                    errors[key] = str(e)
        if os.path.exists(path):
            os.remove(path)
        med = {k: {op: median([r[op]["throughput_gbps"] for r in v]) for op in ("write", "read")}
               for k, v in runs.items() if v}
        ratios = {}
        for key in med:
            if key != "host-uring" and "host-uring" in med:
                for op in ("write", "read"):
                    ratios[f"{key}/host-uring {op}"] = med[key][op] / med["host-uring"][op]
        gds = {k: v[0]["write"]["gds_mode"] for k, v in runs.items() if v}
        storages[name] = {"dir": directory, "median_gbps": med, "ratios": ratios,
                          "gds_mode": gds, "errors": errors, "runs": runs}
        for k, v in med.items():
            print(f"{name:5} {k:12} write {v['write']:.3f} GB/s  read {v['read']:.3f} GB/s")
        for k, v in ratios.items():
            print(f"{name:5} {k:28} {v:.3f}")
    target = {f"{n} {op}": s["ratios"].get(f"gpu-uring/host-uring {op}", 0) >= 0.9
              for n, s in storages.items() for op in ("write", "read")}
    write_result(args.out, args.name, {
        "gpus": info.get("gpus"), "cuda_driver": info.get("cuda_driver"),
        "cufile": info.get("cufile"), "gds_mode": info.get("gds_mode"),
        "size": args.size, "block": args.block, "queue_depth": args.qd, "threads": args.threads,
        "storages": storages,
        "target": "uring: GPU-memory throughput >= 0.9x host-memory throughput, same target",
        "target_met": target,
    })


if __name__ == "__main__":
    main()
