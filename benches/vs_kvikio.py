#!/usr/bin/env python3
"""GPU memory <-> storage through KvikIO and through spillway, side by side.

The same transfers through both tools, on the same targets: for every target directory,
file size, request size and thread count, each repeat runs spillway then KvikIO (in
alternating order, so drift in the machine's state does not favour one tool), write then
read, and checks the bytes read back. Reported: the median of the repeats, GB/s (10^9
bytes/s), and spillway / KvikIO per point.

- spillway: `spillway bench --mem gpu --path DIR --size S --block R --threads T --qd Q
  --op write,read --verify --json` (O_DIRECT through io_uring with pinned staging, or
  cuFile with --backend cufile). `--verify` reads every byte back, untimed, and compares.
- KvikIO: its own API. `kvikio.defaults.set({"num_threads": T, "task_size": R})`, then
  `kvikio.CuFile(path, "w").pwrite(buf)` and `.pread(buf)` of one S-byte GPU buffer (a
  torch tensor: KvikIO takes `__cuda_array_interface__`), split by KvikIO into R-byte
  tasks over its T threads; a write's time runs until its bytes are on storage (fsync:
  spillway's writes are O_DIRECT); the bytes read are compared with those written, on the
  GPU.
  Where GPUDirect Storage is not usable KvikIO falls back to its compat mode (POSIX I/O
  through host memory), and the result says which mode it ran in.

Before each read on a disk (not tmpfs), the file's pages are dropped from the page cache
(`posix_fadvise(DONTNEED)` after `fsync`) so that neither tool reads from memory;
spillway's reads bypass the cache anyway (O_DIRECT).

On a GPU machine without network, install KvikIO from wheels downloaded beforehand:
  pip download --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
      --only-binary=:all: -d wheels kvikio-cu13 libkvikio-cu13 rapids-logger cuda-pathfinder
  python3 -m pip install --no-deps wheels/*.whl

Example (the issue's grid on the disk and on /dev/shm):
  python3 benches/vs_kvikio.py --dir /var/tmp --dir /dev/shm --sizes 1GiB,8GiB \
      --requests 1MiB,4MiB,16MiB,64MiB --threads 1,4,8,16 --name vs-kvikio-h200
Writes benches/results/NAME.json and, with matplotlib, NAME.png (`benches/plot.py`).
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import run_json_lines, write_result  # noqa: E402

UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}


def parse_size(text):
    t = text.strip().lower()
    digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(digits):]
    if not digits or unit not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 64MiB or 8GiB")
    return int(digits) * UNITS[unit]


def size_list(text):
    return [parse_size(x) for x in text.split(",") if x]


def int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of whole numbers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers >= 1")
    return values


def is_tmpfs(directory):
    """Whether `directory` is on a memory filesystem (the page cache is the storage)."""
    best, fstype = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, kind = line.split()[:3]
            real = os.path.realpath(directory)
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fstype = mnt, kind
    return fstype in ("tmpfs", "ramfs")


def drop_cache(path):
    """Flushes `path` and drops its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Spillway:
    """The `spillway bench` command, one write+read pass per call."""

    name = "spillway"

    def __init__(self, binary, backend, qd, gpu, mem):
        self.binary, self.backend, self.qd, self.gpu, self.mem = binary, backend, qd, gpu, mem

    def describe(self):
        return {"binary": self.binary, "backend": self.backend, "queue_depth": self.qd}

    def run(self, directory, size, request, threads):
        cmd = [
            self.binary, "bench", "--mem", self.mem, *(["--gpu", str(self.gpu)] if self.mem == "gpu" else []),
            "--backend", self.backend,
            "--path", directory, "--size", str(size), "--block", str(request),
            "--threads", str(threads), "--qd", str(self.qd), "--op", "write,read", "--verify", "--json",
        ]
        by_op = {r["op"]: r for r in run_json_lines(cmd)}
        bad = [op for op, r in by_op.items() if r.get("verified") is not True]
        if bad:
            raise RuntimeError(f"spillway: bytes read back differ ({bad}): {shutil.which(self.binary)}")
        return {
            "write_gbps": by_op["write"]["throughput_gbps"],
            "read_gbps": by_op["read"]["throughput_gbps"],
            "verified": True,
            "notes": by_op["write"].get("notes", []),
        }


class KvikIO:
    """KvikIO's CuFile on one GPU buffer of the whole size."""

    name = "kvikio"

    def __init__(self, gpu):
        import kvikio  # noqa: F401 (fails here, clearly, when KvikIO is not installed)
        import kvikio.defaults
        import torch

        self.kvikio, self.torch = kvikio, torch
        self.device = torch.device("cuda", gpu)
        self.buffers = {}

    def describe(self):
        d = {"version": getattr(self.kvikio, "__version__", "?")}
        with contextlib.suppress(Exception):
            d["compat_mode_setting"] = str(self.kvikio.defaults.get("compat_mode"))
        return d

    def _buffers(self, size):
        if size not in self.buffers:
            self.buffers.clear()
            torch = self.torch
            g = torch.Generator(device=self.device).manual_seed(size)
            src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=self.device, generator=g)
            self.buffers[size] = (src, torch.empty_like(src))
        return self.buffers[size]

    def run(self, directory, size, request, threads):
        kvikio, torch = self.kvikio, self.torch
        src, dst = self._buffers(size)
        dst.zero_()
        torch.cuda.synchronize(self.device)
        fd, path = tempfile.mkstemp(prefix="kvikio-", dir=directory)
        os.close(fd)
        try:
            with kvikio.defaults.set({"num_threads": threads, "task_size": request}):
                f = kvikio.CuFile(path, "w")
                compat = None
                with contextlib.suppress(Exception):
                    compat = bool(f.is_compat_mode_preferred())
                t0 = time.perf_counter()
                written = f.pwrite(src, size).get()
                f.close()
                # On storage, as spillway's O_DIRECT writes are (a buffered write that is
                # only in the page cache would not be): fsync counts in the time.
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                t_write = time.perf_counter() - t0
                if not is_tmpfs(directory):
                    drop_cache(path)
                f = kvikio.CuFile(path, "r")
                t0 = time.perf_counter()
                read = f.pread(dst, size).get()
                torch.cuda.synchronize(self.device)
                t_read = time.perf_counter() - t0
                f.close()
        finally:
            os.unlink(path)
        if written != size or read != size:
            raise RuntimeError(f"kvikio: moved {written} / {read} of {size} bytes")
        if not torch.equal(src, dst):
            raise RuntimeError("kvikio: bytes read back differ from those written")
        return {
            "write_gbps": size / t_write / 1e9,
            "read_gbps": size / t_read / 1e9,
            "verified": True,
            "compat_mode": compat,
        }


def sweep(tools, dirs, sizes, requests, thread_counts, repeats, log=print):
    """Every point, `repeats` times, tools alternating in order; returns the points."""
    points = []
    total = len(dirs) * len(sizes) * len(requests) * len(thread_counts)
    done = 0
    for directory in dirs:
        for size in sizes:
            for request in requests:
                for threads in thread_counts:
                    done += 1
                    runs = {t.name: [] for t in tools}
                    for rep in range(repeats):
                        order = tools if rep % 2 == 0 else list(reversed(tools))
                        for tool in order:
                            runs[tool.name].append(tool.run(directory, size, request, threads))
                    point = {
                        "dir": directory, "tmpfs": is_tmpfs(directory), "size": size,
                        "request": request, "threads": threads, "tools": {},
                    }
                    for name, rs in runs.items():
                        point["tools"][name] = {
                            "write_gbps": statistics.median(r["write_gbps"] for r in rs),
                            "read_gbps": statistics.median(r["read_gbps"] for r in rs),
                            "runs": rs,
                        }
                    if {"spillway", "kvikio"} <= set(runs):
                        s, k = point["tools"]["spillway"], point["tools"]["kvikio"]
                        point["ratio"] = {
                            op: s[f"{op}_gbps"] / k[f"{op}_gbps"] for op in ("write", "read") if k[f"{op}_gbps"] > 0
                        }
                    line = "  ".join(
                        f"{n} W {v['write_gbps']:6.2f} R {v['read_gbps']:6.2f}" for n, v in point["tools"].items()
                    )
                    log(f"[{done}/{total}] {directory} {size >> 20} MiB, requests {request >> 10} KiB, "
                        f"{threads} threads: {line} GB/s")
                    points.append(point)
    return points


def targets(points):
    """The issue's targets per point: on tmpfs writes >= 1.2x and reads >= 1.0x KvikIO's;
    on a disk >= 1.0x each way. A point without both tools has none."""
    out = []
    for p in points:
        r = p.get("ratio")
        if not r:
            continue
        want = {"write": 1.2, "read": 1.0} if p["tmpfs"] else {"write": 1.0, "read": 1.0}
        for op, bound in want.items():
            if op in r:
                out.append({
                    "dir": p["dir"], "size": p["size"], "request": p["request"], "threads": p["threads"],
                    "op": op, "ratio": r[op], "target": bound, "met": r[op] >= bound,
                })
    return out


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", action="append", required=True, help="a target directory (repeat: disk, /dev/shm)")
    ap.add_argument("--sizes", type=size_list, default=size_list("1GiB"), help="file sizes (1GiB,8GiB)")
    ap.add_argument("--requests", type=size_list, default=size_list("1MiB,4MiB,16MiB,64MiB"))
    ap.add_argument("--threads", type=int_list, default=int_list("1,4,8,16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qd", type=int, default=16, help="spillway's requests in flight per thread")
    ap.add_argument("--backend", default="uring", choices=["uring", "cufile", "auto"])
    ap.add_argument("--spillway", default=os.environ.get("SPILLWAY_BIN", "spillway"),
                    help="the spillway binary (default: $SPILLWAY_BIN, else spillway on PATH)")
    ap.add_argument("--tools", default="spillway,kvikio", help="which tools (spillway,kvikio)")
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--mem", default="gpu", choices=["gpu", "host"],
                    help="spillway's memory (host: the harness without a GPU; KvikIO always uses the GPU)")
    ap.add_argument("--out-dir", default=os.path.join(here, "results"))
    ap.add_argument("--name", default="vs-kvikio")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats: at least 1")
    for d in args.dir:
        if not os.path.isdir(d):
            ap.error(f"--dir {d}: not a directory")
    wanted = [t for t in args.tools.split(",") if t]
    unknown = set(wanted) - {"spillway", "kvikio"}
    if unknown:
        ap.error(f"--tools: unknown {sorted(unknown)}; the tools are spillway and kvikio")
    tools = []
    for name in wanted:
        if name == "spillway":
            if not shutil.which(args.spillway):
                ap.error(f"--spillway {args.spillway}: not found; build it (cargo build --release) and pass its path")
            tools.append(Spillway(args.spillway, args.backend, args.qd, args.gpu, args.mem))
        else:
            try:
                tools.append(KvikIO(args.gpu))
            except ImportError as e:
                ap.error(f"KvikIO is not installed ({e}): see this script's help for the wheels to install")
    points = sweep(tools, args.dir, args.sizes, args.requests, args.threads, args.repeats)
    checks = targets(points)
    info = {}
    with contextlib.suppress(Exception):
        info = json.loads(subprocess.run([args.spillway, "info", "--json"], capture_output=True, text=True).stdout)
    path = write_result(args.out_dir, args.name, {
        "what": "GPU memory <-> storage, spillway bench vs KvikIO CuFile, medians of repeats, GB/s",
        "gpus": info.get("gpus"),
        "tools": {t.name: t.describe() for t in tools},
        "repeats": args.repeats,
        "points": points,
        "targets": checks,
        "targets_met": all(c["met"] for c in checks) if checks else None,
    })
    missed = [c for c in checks if not c["met"]]
    for c in missed:
        print(f"below target: {c['dir']} {c['op']} request {c['request'] >> 10} KiB, {c['threads']} threads: "
              f"{c['ratio']:.2f}x (target {c['target']}x)", file=sys.stderr)
    try:
        from plot import plot_file

        for png in plot_file(path):
            print("wrote", png, file=sys.stderr)
    except ImportError as e:
        print(f"no plot ({e}): pip install matplotlib, then python3 benches/plot.py {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
