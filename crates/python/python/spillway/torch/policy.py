"""How much to offload: the forward pass cut into segments, and the plan that decides how
many of them can be offloaded with their I/O hidden behind compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclass
class Segment:
    """One stretch of the forward pass (a block's forward call, or what lies between)."""

    index: int
    name: str
    saved_bytes: int = 0  # eligible for offloading
    kept_bytes: int = 0
    offloaded_bytes: int = 0
    fwd_start: Optional[torch.cuda.Event] = None
    bwd_start: Optional[torch.cuda.Event] = None
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    #: Bytes of each eligible storage it saved, in save order (first saves only).
    tensors: List[int] = field(default_factory=list)
    #: Bytes of the block's input (0 for the stretch before the first block).
    input_bytes: int = 0
    #: The block (index into the offloader's blocks) whose forward starts it; -1: none.
    block: int = -1


@dataclass
class Plan:
    """The policy's choice: segments ``[0, offload_segments)`` are offloaded, and why."""

    mode: str
    offload_segments: int  # segments [0, n) are offloaded
    reason: str
    details: Dict[str, Any] = field(default_factory=dict)


def plan_offload(
    fwd_ms: List[float],
    bwd_ms: List[float],
    seg_bytes: List[int],
    write_gbps: float,
    read_gbps: float,
    keep_last: int,
    margin: float = 0.8,
) -> Tuple[int, str]:
    """How many leading segments can be offloaded with their I/O hidden behind compute.

    A simple model of one step: segment ``i``'s tensors are written one after another,
    starting once the segment has run; in backward, segments run last to first and the
    offloaded ones are read in that order, a read starting once its write is done. All
    of it must finish within ``margin`` of the compute it overlaps: the writes within the
    step, each read before its segment's backward starts.
    """
    n = len(fwd_ms)
    limit = max(0, n - keep_last)
    fwd_total = sum(fwd_ms)
    best, why = 0, "no segment's I/O fits behind compute"
    for k in range(1, limit + 1):
        # Forward: write completion times (ms from the step's start).
        t, write_done = 0.0, []
        clock = 0.0
        for i in range(k):
            clock += fwd_ms[i]
            t = max(t, clock) + seg_bytes[i] / (write_gbps * 1e6)
            write_done.append(t)
        # Backward starts after the forward; segment i's backward starts once every later
        # segment's has run.
        bwd_start = {}
        clock = fwd_total
        for i in reversed(range(n)):
            bwd_start[i] = clock
            clock += bwd_ms[i]
        ok = True
        r = fwd_total
        for i in reversed(range(k)):
            r = max(r, write_done[i]) + seg_bytes[i] / (read_gbps * 1e6)
            budget = fwd_total + margin * (bwd_start[i] - fwd_total) if i < n - 1 else fwd_total
            if r > budget + 1e-9 and seg_bytes[i] > 0:
                ok = False
                why = (
                    f"offloading segment {i} too would need its read done {r - fwd_total:.1f} ms into backward, "
                    f"but its backward starts {bwd_start[i] - fwd_total:.1f} ms in (margin {margin})"
                )
                break
        if not ok:
            break
        best = k
    if best == limit:
        why = f"the I/O of every segment but the last {keep_last} fits behind compute"
    return best, why
