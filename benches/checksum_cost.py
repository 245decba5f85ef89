#!/usr/bin/env python3
"""What the `checksums` setting costs: `spillway bench --workload tensors` with and without
--verify (which turns the engine's checksums on: a CRC-32C of every 32 KiB, computed on the
device as each tensor is written and again on the bytes read back), on the same target,
interleaved, with the order alternating from round to round.

Reported (medians over the rounds): offload and fetch GB/s with and without checksums and
their ratios (checksums / none: 1.0 is free), and the bytes checked and mismatches counted.
Flags the script does not know go to every spillway run (--mem, --backend, --tensors, ...).

    python3 benches/checksum_cost.py --spillway dist/spillway --path /dev/shm/x --mem gpu --rounds 3 --save
"""

import argparse
import sys

from benchlib import median, run_json, write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spillway", default="target/release/spillway", help="the spillway binary")
    ap.add_argument("--path", required=True, help="storage path (file or directory) for every run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both runs (default 3)")
    ap.add_argument("--save", action="store_true", help="write the result JSON to --out")
    ap.add_argument("--out", default="benches/results", help="directory of the result JSON")
    ap.add_argument("--name", default="checksum-cost", help="result file name (without .json)")
    args, forwarded = ap.parse_known_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if "--verify" in forwarded:
        ap.error("--verify is what the script switches on and off; drop it")

    base = [args.spillway, "bench", "--workload", "tensors", "--json", "--path", args.path, *forwarded]
    runs = {"none": [], "checksums": []}
    for r in range(args.rounds):
        order = ["none", "checksums"] if r % 2 == 0 else ["checksums", "none"]
        for kind in order:
            cmd = base + (["--verify"] if kind == "checksums" else [])
            res = run_json(cmd)
            if not res.get("verified"):
                sys.exit(f"{kind} run {r}: fetched tensors differ from what was offloaded: {res}")
            runs[kind].append(res)

    def gbps(kind, op):
        return median([next(p["throughput_gbps"] for p in res["phases"] if p["op"] == op) for res in runs[kind]])

    summary = {}
    for op in ("offload", "fetch"):
        none, with_sums = gbps("none", op), gbps("checksums", op)
        summary[op] = {
            "none_gbps": none,
            "checksums_gbps": with_sums,
            "ratio": with_sums / none if none else None,
        }
    counters = [res["engine_stats"] for res in runs["checksums"]]
    summary["verified_bytes_per_run"] = median([c["verified_bytes"] for c in counters])
    summary["checksum_errors"] = sum(c["checksum_errors"] for c in counters)
    summary["checksums_off_verified_bytes"] = sum(
        res["engine_stats"]["verified_bytes"] for res in runs["none"]
    )
    for op in ("offload", "fetch"):
        s = summary[op]
        print(
            f"{op:8} none {s['none_gbps']:.3f} GB/s, checksums {s['checksums_gbps']:.3f} GB/s: ratio {s['ratio']:.3f}"
        )
    print(
        f"checked {summary['verified_bytes_per_run'] / 2**30:.2f} GiB per run, "
        f"{summary['checksum_errors']} mismatches"
    )
    if args.save:
        first = runs["checksums"][0]
        write_result(
            args.out,
            args.name,
            {
                "what": "checksums on (--verify) against off, same target, interleaved",
                "device": first.get("device"),
                "backend": first.get("backend"),
                "memory": first.get("memory"),
                "path": args.path,
                "rounds": args.rounds,
                "summary": summary,
                "runs": runs,
            },
        )


if __name__ == "__main__":
    main()
