#!/usr/bin/env python3
"""The adaptive policy's bandwidth probe, round by round: CHUNKS of MiB each offloaded
through a spillway.Engine, drained, prefetched and fetched back, released, three times,
each round reusing the space the one before released. The first round also pays for
what only a run's first writes pay for (on tmpfs, a page allocation per page written),
which is why the Offloader times its second round.

    python3 benches/probe_rounds.py PATH[,PATH...] CHUNK_MIB TOTAL_MIB [cpu|cuda]

e.g. ``probe_rounds.py /dev/shm 16 256 cuda``; several comma-separated paths are striped.
"""

import sys
import time

import torch

import spillway


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    paths = sys.argv[1].split(",")
    chunk = int(sys.argv[2]) << 20
    total = int(sys.argv[3]) << 20
    dev = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    cuda = dev != "cpu"
    eng = spillway.Engine(paths if len(paths) > 1 else paths[0], "8GiB", device="cuda:0" if cuda else "host")
    n = max(1, total // chunk)
    bufs = [torch.empty(chunk, dtype=torch.uint8, device=dev) for _ in range(n)]
    stream = torch.cuda.current_stream().cuda_stream if cuda else None
    for rnd in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        handles = [eng.offload((7, i + 1000 * rnd), [(b.data_ptr(), chunk)], stream) for i, b in enumerate(bufs)]
        eng.drain()
        t1 = time.perf_counter()
        for h in handles:
            eng.prefetch(h)
        for h, b in zip(handles, bufs):
            eng.fetch(h, [(b.data_ptr(), chunk)], stream)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        for h in handles:
            eng.release(h)
        print(f"chunk {chunk >> 20} MiB x{n} rep {rnd}: write {n * chunk / (t1 - t0) / 1e9:.2f} GB/s "
              f"read {n * chunk / (t2 - t1) / 1e9:.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
