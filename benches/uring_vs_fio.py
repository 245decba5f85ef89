#!/usr/bin/env python3
"""Host memory through the uring backend against fio (io_uring engine, O_DIRECT) on the same
file, same block size and queue depth, runs interleaved so both see the same machine.
Target: spillway's throughput >= 0.9x fio's for sequential write and read.

spillway runs with the same memory footprint as fio (--buffer = queue depth x block: fio
reuses one buffer per request in flight); that ratio is the one the target is about. A
second spillway run with its default buffer (all of --size) is recorded beside it: on some
virtual disks, cycling through a large buffer is much faster than reusing a small one.

    python3 benches/uring_vs_fio.py --spillway target/release/spillway --dir /var/tmp
"""

import argparse
import os

from benchlib import median, run_json, run_json_lines, write_result

CASES = [
    # (name, spillway op, fio rw, block, queue depth)
    ("seq-write-1M", "write", "write", "1M", 16),
    ("seq-read-1M", "read", "read", "1M", 16),
    ("rand-write-4K", "randwrite", "randwrite", "4K", 32),
    ("rand-read-4K", "randread", "randread", "4K", 32),
]


def fio(path, rw, block, qd, size):
    cmd = [
        "fio", "--name=ref", f"--filename={path}", f"--rw={rw}", f"--bs={block}",
        f"--iodepth={qd}", "--ioengine=io_uring", "--direct=1", f"--size={size}",
        "--numjobs=1", "--output-format=json", "--norandommap=0", "--randrepeat=0",
    ]
    job = run_json(cmd)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return {"throughput_gbps": side["bw_bytes"] / 1e9, "iops": side["iops"]}


def spillway(binary, path, op, block, qd, size, buffer=None):
    cmd = [binary, "bench", "--mem", "host", "--backend", "uring", "--op", op, "--size", size,
           "--block", block, "--qd", str(qd), "--path", path, "--json"]
    if buffer:
        cmd += ["--buffer", buffer]
    r = run_json_lines(cmd)[0]
    return {"throughput_gbps": r["throughput_gbps"], "iops": r["iops"], "direct_io": r["direct_io"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spillway", default="target/release/spillway")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--size", default="2G", help="bytes per sequential run")
    ap.add_argument("--rand-size", default="256M", help="bytes per 4K random run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benches/results")
    ap.add_argument("--name", default="uring-vs-fio")
    args = ap.parse_args()

    path = os.path.join(args.dir, "spillway-fio-compare.dat")
    cases = {}
    try:
        for name, op, rw, block, qd in CASES:
            size = args.rand_size if block == "4K" else args.size
            if op in ("read", "randread"):
                fio(path, "write", "1M", 16, size)  # lay the file out once for both tools
            footprint = f"{qd * int(block[:-1])}{block[-1]}"  # queue depth x block, as fio
            runs = {"fio": [], "spillway": [], "spillway-default-buffer": []}
            for _ in range(args.reps):
                runs["fio"].append(fio(path, rw, block, qd, size))
                runs["spillway"].append(spillway(args.spillway, path, op, block, qd, size, footprint))
                runs["spillway-default-buffer"].append(spillway(args.spillway, path, op, block, qd, size))
            med = {k: median([r["throughput_gbps"] for r in v]) for k, v in runs.items()}
            cases[name] = {
                "block": block, "queue_depth": qd, "size": size, "spillway_buffer": footprint,
                "runs": runs, "median_gbps": med,
                "ratio_spillway_to_fio": med["spillway"] / med["fio"],
                "ratio_spillway_default_buffer_to_fio": med["spillway-default-buffer"] / med["fio"],
            }
            print(f"{name:15} fio {med['fio']:.3f} GB/s  spillway {med['spillway']:.3f} GB/s "
                  f"(buffer {footprint})  ratio {cases[name]['ratio_spillway_to_fio']:.3f}   "
                  f"default buffer {med['spillway-default-buffer']:.3f} GB/s")
    finally:
        if os.path.exists(path):
            os.remove(path)
    target = {n: cases[n]["ratio_spillway_to_fio"] >= 0.9 for n in ("seq-write-1M", "seq-read-1M")}
    write_result(args.out, args.name, {"dir": args.dir, "cases": cases,
                                       "target": "sequential write and read >= 0.9x fio",
                                       "target_met": target})


if __name__ == "__main__":
    main()
