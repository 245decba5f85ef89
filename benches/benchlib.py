"""Helpers shared by the benchmark scripts: running commands, medians, result files."""

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys


def run_json_lines(cmd):
    """Runs cmd (a list) and returns its stdout parsed as one JSON value per line."""
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def run_json(cmd):
    """Runs cmd and returns its whole stdout parsed as one JSON value."""
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def median(values):
    return statistics.median(values) if values else None


def write_result(out_dir, name, payload):
    """Writes payload (with the command that made it and when) to out_dir/name.json."""
    os.makedirs(out_dir, exist_ok=True)
    payload = {
        "command": shlex.join([sys.executable and "python3"] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        **payload,
    }
    path = os.path.join(out_dir, name + ".json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print("wrote", path, file=sys.stderr)
    return path
