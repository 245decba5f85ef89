"""The forward pass cut into segments, and the policy's choice (the planner, in
:mod:`.planner`, decides per tensor)."""

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
    rebuilt_bytes: int = 0
    fwd_start: Optional[torch.cuda.Event] = None
    bwd_start: Optional[torch.cuda.Event] = None
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    #: Bytes of each eligible storage it saved, in save order (first saves only).
    tensors: List[int] = field(default_factory=list)
    #: In profiling steps, a timing mark at each of those saves, and, once measured, the
    #: milliseconds from the segment's forward start to each.
    save_marks: List[Any] = field(default_factory=list)
    save_ms: List[float] = field(default_factory=list)
    #: In profiling steps, per tensor of ``tensors``: the (start, end) events of the cheap
    #: operation that made it where it could be rebuilt (else None), and, once measured,
    #: the milliseconds that operation took (None: it cannot be rebuilt).
    rebuild_events: List[Any] = field(default_factory=list)
    rebuild_ms: List[Optional[float]] = field(default_factory=list)
    #: In profiling steps, per tensor of ``tensors``: where it can be rebuilt, the tensors
    #: saved before it that rebuilding it reads ((segment, index) of each), else None.
    rebuild_inputs: List[Optional[List[Tuple[int, int]]]] = field(default_factory=list)
    #: Bytes of the block's input (0 for the stretch before the first block).
    input_bytes: int = 0
    #: The block (index into the offloader's blocks) whose forward starts it; -1: none.
    block: int = -1
    #: Of ``tensors``, how many the block's forward saved (the rest come after it returned,
    #: before the next block: the head after the last one); None while it runs.
    inner: Optional[int] = None
    #: Decisions made for saves after the block returned (in a recomputed block's segment).
    tail_saves: int = 0


@dataclass
class Plan:
    """The policy's choice: segments ``[0, offload_segments)`` are offloaded, and why."""

    mode: str
    offload_segments: int  # segments [0, n) are offloaded
    reason: str
    details: Dict[str, Any] = field(default_factory=dict)
