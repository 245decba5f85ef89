#!/usr/bin/env python3
"""The reliability figures, gathered from result files made on the same machine: the
tensors workload under fault injection (`spillway bench --workload tensors --verify
--faults ... --json`, one file per fault plan) and a soak (`benches/soak.py`).

Reported: operations run under fault injection, faults injected by kind, faults survived
(retried, resubmitted, or kept in GPU memory with training going on), wrong bytes handed
out (must be 0), resources leaked (must be 0), the soak's duration and drift.

    python3 benches/reliability_figures.py --faults benches/results/faults-*.json \\
        --soak benches/results/soak-h200-shm-10min.json --name reliability-h200
"""

import argparse
import json
import sys

from benchlib import write_result

KINDS = ("injected_read_errors", "injected_write_errors", "injected_short", "injected_enospc", "delayed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", nargs="+", required=True, help="bench --json results run with --faults")
    ap.add_argument("--soak", required=True, help="a benches/soak.py result")
    ap.add_argument("--out", default="benches/results")
    ap.add_argument("--name", default="reliability")
    args = ap.parse_args()

    runs, by_kind = [], {k: 0 for k in KINDS}
    ops = wrong = failed = 0
    for path in args.faults:
        with open(path) as f:
            r = json.load(f)
        fs, c = r["faults"]["stats"], r["engine_stats"]
        for k in KINDS:
            by_kind[k] += fs[k]
        ops += fs["requests"]
        wrong += r["mismatched_bytes"]
        # Every injected fault is survived when the run verified: errors and short counts
        # were retried or resubmitted, ENOSPC kept tensors in GPU memory and the run went on.
        failed += 0 if r["verified"] else 1
        runs.append({
            "file": path,
            "command": r["command"],
            "plan": r["faults"]["plan"],
            "storage_requests": fs["requests"],
            "tensors_offloaded": c["offloads"],
            "tensors_fetched": c["fetches"],
            "verified": r["verified"],
            "wrong_bytes": r["mismatched_bytes"],
            "write_retries": c["write_retries"],
            "read_retries": c["read_retries"],
            "write_errors": c["write_errors"],
            "read_errors": c["read_errors"],
            "no_space_errors": c["no_space_errors"],
            "resident_tensors": c["resident_tensors"],
            "checksum_errors": c["checksum_errors"],
            "checksummed_bytes": c["verified_bytes"],
        })
    with open(args.soak) as f:
        soak = json.load(f)
    injected = sum(by_kind[k] for k in KINDS if k != "delayed")
    figures = {
        "operations_under_fault_injection": ops,
        "faults_injected_by_kind": by_kind,
        "faults_injected": injected,
        "faults_survived": injected if failed == 0 else None,
        "runs_failed": failed,
        "wrong_bytes_returned": wrong + soak["wrong"],
        "resources_leaked": len(soak["leaked"]),
        "soak_seconds": soak["seconds"],
        "soak_cycles": soak["cycles"],
        "soak_tensors_right": soak["right"],
        "soak_tensors_wrong": soak["wrong"],
        "soak_drift": {n: w["drift"] for n, w in soak["resources"].items()},
        "soak_leaked": soak["leaked"],
    }
    print(json.dumps(figures, indent=2))
    write_result(args.out, args.name, {"figures": figures, "fault_runs": runs, "soak_file": args.soak,
                                       "soak_settings": soak["settings"]})
    if wrong or soak["wrong"] or soak["leaked"] or failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
