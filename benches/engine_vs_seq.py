#!/usr/bin/env python3
"""Many small tensors through the offload engine against large sequential I/O on the same
target: `spillway bench --workload tensors` (20k tensors of 4 KiB to 256 KiB, no duplicates,
packing on) and the same with --no-pack, against `spillway bench --workload seq` writing and
reading at least as many bytes in 16 MiB requests; queue depth 8 for every run. Runs are
interleaved, and their order alternates from round to round, so all three see the same
machine.

Ratios reported (medians over the rounds):
  tensors offload / seq write, tensors fetch / seq read     (what packing recovers)
  tensors / no-pack, for offload and for fetch              (what packing is worth)

Flags the script does not know go to spillway: --mem, --gpu, --backend, --threads,
--buffered and --seed to every run; engine flags (--staging, --prefetch, --pack-extent,
--pack-threshold, --no-dedup, --trace) to the tensors runs only.

    python3 benches/engine_vs_seq.py --spillway target/release/spillway --path /var/tmp --mem host
    python3 benches/engine_vs_seq.py --path /mnt/nvme --mem gpu --rounds 3 --save
"""

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from benchlib import median, run_json_lines, write_result

# Flags spillway's tensors workload reads and its seq workload refuses.
TENSORS_ONLY = {"--staging", "--prefetch", "--pack-extent", "--pack-threshold", "--no-dedup", "--trace"}
# Flags this script sets itself.
OWN = {"--workload", "--op", "--size", "--block", "--qd", "--json", "--path", "--tensors",
       "--min-size", "--max-size", "--dup", "--no-pack", "--buffer", "--verify"}
UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
         "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text):
    """A size as spillway reads it: 4096, 4K, 4KiB (powers of 1024), 4KB (powers of 1000)."""
    t = text.strip()
    digits = len(t) - len(t.lstrip("0123456789"))
    unit = t[digits:].strip().lower()
    if not digits or unit not in UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 4096, 4KiB, 16MiB)")
    return int(t[:digits]) * UNITS[unit]


def split_forwarded(args):
    """Splits flags for spillway into (to every run, to the tensors runs only)."""
    common, tensors = [], []
    dest = None
    for a in args:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            if flag in OWN:
                sys.exit(f"error: {flag} is set by this script; use its own options (see --help)")
            dest = tensors if flag in TENSORS_ONLY else common
        elif dest is None:
            sys.exit(f"error: unexpected argument '{a}' (see --help)")
        dest.append(a)
    return common, tensors


def seq_size(tensors, lo, hi, block):
    """Bytes for the sequential runs: at least the tensors' total with near certainty (the
    mean plus six standard deviations of a sum of uniform sizes), in whole blocks."""
    mean = tensors * (lo + hi) / 2
    sd = math.sqrt(tensors) * (hi - lo) / math.sqrt(12)
    return max(1, math.ceil((mean + 6 * sd) / block)) * block


def fmt_bytes(n):
    """A byte count with a binary unit, as spillway prints it: "4 KiB", "2.48 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.2f} {unit}"
        n /= 1024


class Runner:
    def __init__(self, binary):
        self.binary = binary
        self.commands = []

    def bench(self, args):
        cmd = [self.binary, "bench"] + args + ["--json"]
        self.commands.append(shlex.join(cmd))
        try:
            return run_json_lines(cmd)
        except subprocess.CalledProcessError as e:
            sys.stderr.write(e.stderr or "")
            sys.exit(f"error: {shlex.join(cmd)} failed with status {e.returncode}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spillway", default="target/release/spillway", help="the spillway binary")
    ap.add_argument("--path", help="target: a directory (a file is made in it and removed after), "
                    "or a file or block device used as is; default: a new temporary directory")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the three runs (order alternates)")
    ap.add_argument("--tensors", type=int, default=20000)
    ap.add_argument("--min-size", default="4KiB", type=parse_size)
    ap.add_argument("--max-size", default="256KiB", type=parse_size)
    ap.add_argument("--block", default="16MiB", type=parse_size, help="request size of the seq runs")
    ap.add_argument("--qd", type=int, default=8, help="queue depth of every run")
    ap.add_argument("--save", action="store_true", help="write the JSON report to --out/--name.json")
    ap.add_argument("--out", default="benches/results")
    ap.add_argument("--name", default="engine-vs-seq")
    ap.add_argument("--json", action="store_true", help="also print the JSON report")
    args, rest = ap.parse_known_args()
    if args.rounds < 1:
        sys.exit("error: --rounds must be at least 1")
    if not (os.path.isfile(args.spillway) and os.access(args.spillway, os.X_OK)):
        sys.exit(f"error: no spillway binary at {args.spillway}; build it (cargo build --release) "
                 "or pass --spillway")
    common, tensors_only = split_forwarded(rest)

    made_dir = None
    if args.path is None:
        made_dir = tempfile.mkdtemp(prefix="spillway-engine-vs-seq-")
        path = os.path.join(made_dir, "target.dat")
    elif os.path.isdir(args.path):
        path = os.path.join(args.path, "spillway-engine-vs-seq.dat")
    else:
        path = args.path
    remove_file = args.path is None or os.path.isdir(args.path)

    size = seq_size(args.tensors, args.min_size, args.max_size, args.block)
    qd = ["--qd", str(args.qd)]
    seq_cmd = ["--workload", "seq", "--op", "write,read", "--size", str(size),
               "--block", str(args.block), "--path", path] + qd + common
    tensors_cmd = ["--workload", "tensors", "--tensors", str(args.tensors),
                   "--min-size", str(args.min_size), "--max-size", str(args.max_size),
                   "--dup", "0", "--path", path] + qd + common + tensors_only
    kinds = {
        "seq": seq_cmd,
        "tensors": tensors_cmd,
        "no_pack": tensors_cmd + ["--no-pack"],
    }
    runner = Runner(args.spillway)
    runs = {k: [] for k in kinds}
    try:
        for r in range(args.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for kind in order:
                out = runner.bench(kinds[kind])
                if kind == "seq":
                    by_op = {o["op"]: o for o in out}
                    runs[kind].append({"write": by_op["write"], "read": by_op["read"]})
                else:
                    runs[kind].append(out[0])
    finally:
        if remove_file and os.path.exists(path):
            os.remove(path)
        if made_dir:
            shutil.rmtree(made_dir, ignore_errors=True)

    def phase(run, op):
        return next(p for p in run["phases"] if p["op"] == op)

    gbps = {
        "seq_write": median([r["write"]["throughput_gbps"] for r in runs["seq"]]),
        "seq_read": median([r["read"]["throughput_gbps"] for r in runs["seq"]]),
    }
    for kind in ("tensors", "no_pack"):
        for op in ("offload", "fetch"):
            gbps[f"{kind}_{op}"] = median([phase(r, op)["throughput_gbps"] for r in runs[kind]])
    ratios = {
        "tensors_offload_to_seq_write": gbps["tensors_offload"] / gbps["seq_write"],
        "tensors_fetch_to_seq_read": gbps["tensors_fetch"] / gbps["seq_read"],
        "tensors_to_no_pack_offload": gbps["tensors_offload"] / gbps["no_pack_offload"],
        "tensors_to_no_pack_fetch": gbps["tensors_fetch"] / gbps["no_pack_fetch"],
    }
    total = runs["tensors"][0]["total_bytes"]
    verified = all(r["verified"] for k in ("tensors", "no_pack") for r in runs[k])
    first = runs["tensors"][0]
    payload = {
        "path": path,
        "spillway": args.spillway,
        "backend": first["backend"],
        "memory": first["memory"],
        "device": first["device"],
        "direct_io": first["direct_io"],
        "host_staging": first["host_staging"],
        "rounds": args.rounds,
        "tensors": args.tensors,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "tensor_bytes": total,
        "seq": {"size": size, "block": args.block, "queue_depth": args.qd,
                "covers_tensor_bytes": size >= total},
        "forwarded": {"all": common, "tensors_only": tensors_only},
        "commands": runner.commands,
        "median_gbps": gbps,
        "ratios": ratios,
        "verified": verified,
        "runs": runs,
    }

    device = f" ({first['device']})" if first["memory"] == "gpu" else ""
    print(f"engine vs seq: {first['backend']} backend, {first['memory']} memory{device}, "
          f"{path}, {args.rounds} round(s)")
    print(f"  tensors: {args.tensors} of {fmt_bytes(args.min_size)} to {fmt_bytes(args.max_size)} "
          f"({fmt_bytes(total)}); seq: {fmt_bytes(size)} in {fmt_bytes(args.block)} requests, "
          f"queue depth {args.qd}")
    rows = [
        ("seq write", gbps["seq_write"], ""),
        ("seq read", gbps["seq_read"], ""),
        ("tensors offload", gbps["tensors_offload"],
         f"{ratios['tensors_offload_to_seq_write']:.3f} x seq write, "
         f"{ratios['tensors_to_no_pack_offload']:.3f} x no-pack"),
        ("tensors fetch", gbps["tensors_fetch"],
         f"{ratios['tensors_fetch_to_seq_read']:.3f} x seq read, "
         f"{ratios['tensors_to_no_pack_fetch']:.3f} x no-pack"),
        ("no-pack offload", gbps["no_pack_offload"], ""),
        ("no-pack fetch", gbps["no_pack_fetch"], ""),
    ]
    print(f"{'run':<17} {'GB/s':>7}  ratio")
    for name, value, note in rows:
        print(f"{name:<17} {value:>7.3f}  {note}")
    if not payload["seq"]["covers_tensor_bytes"]:
        print(f"warning: the seq runs moved {size} bytes, fewer than the tensors' {total}",
              file=sys.stderr)
    if not verified:
        print("error: a tensors run did not verify", file=sys.stderr)
    if args.save:
        write_result(args.out, args.name, payload)
    if args.json:
        print(json.dumps(payload, indent=2))
    sys.exit(0 if verified else 3)


if __name__ == "__main__":
    main()
