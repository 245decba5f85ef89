"""The planner: which saved tensors to offload and which blocks to recompute, for a goal.

It works on a :class:`Profile` of one training step measured without offloading (per
segment of the forward pass: forward and backward time, the tensors it saves in order,
the bytes of its input) and the measured bandwidth of each tier, and simulates a step
under a candidate plan:

- **Writes** run one after another in the order the tensors were saved, each starting no
  earlier than its save. The first ``host_bytes`` go at the host tier's write bandwidth,
  the rest at the storage's. A tensor's memory is free once its write is done.
- **Reads** run in backward order from the end of the forward pass, each needed when
  backward reaches it, or earlier where backward rebuilds a tensor from it (see
  ``SegmentProfile.rebuild_inputs``), at most the copy-back window ahead of use; the last
  ``host_bytes`` written come from the host tier, the rest from storage. A read that is
  late stalls the step by the difference.
- **Recompute** (activation checkpointing) of a segment saves its block's input instead
  of what the block saves (its first ``inner`` tensors), which may be offloaded like any
  tensor, and costs the segment's forward time again in backward. What the segment saves
  after the block returned (the head, after the last block) is saved all the same.
- **Rebuild** of one tensor: a tensor made by one cheap operation (a normalization, an
  activation function, a copy) from tensors that are saved anyway is not kept and not
  written; backward runs the operation again, at its measured time. This is recompute at
  the granularity of one saved tensor, for the parts whose bytes cost far more to move
  than to make (a GELU's output: as many bytes as its input, a few hundred microseconds).

The activation memory of a plan is the most forward holds at any moment: tensors kept,
recompute inputs kept, and offloaded tensors whose writes are not done (writes that lag
behind the saves hold memory before the end of forward, too); under a budget, which
holds up to backward's start, also the first tensors read back ahead of use as backward
starts (up to the copy-back window). The offloader lets go of a written tensor at a save
(the only moments it runs in forward), and a tensor exists from the start of the
operation that makes it, before its save: so as each tensor is made, forward holds it
beside every write not done by the save before (a write that ends during the head's
long matrix product frees nothing for the logits it makes). The simulation's timeline
(when each tensor is saved, when each write is done, and up to when each save waits for
writes) goes with the plan: the offloader waits at each save for the writes done by then,
so that forward holds what was predicted. Under a budget, forward waits for the oldest
writes whenever those under way, with the next tensor to be made, pass what the budget
leaves beside the kept bytes and the window, as the offloader does, so the budget holds
throughout. The window depends on the plan, as the offloader's does (under a budget, the
largest tensor the plan offloads: :func:`largest_offloaded`): a plan that keeps its
largest tensor reserves less. The cost of a plan is its extra step time: forward's waits
for writes, read stalls, and recompute.

Goals:

- ``adaptive``: the most memory freed at no extra time (I/O hidden behind compute).
- ``max_slowdown=x``: the most memory freed with the step at most ``x`` times as long.
- ``budget=B``: activation memory at most ``B`` bytes at the least extra time.

Each goal is met by a greedy search over *moves* (offload the next or the smallest
tensor of a segment, or the rest of it, rebuild a tensor, or recompute a segment), taking at each step
the move that frees the most bytes per extra millisecond, from several starts: nothing
done, the cheapest rebuilds the goal's time allows (rebuilt bytes leave the write
bandwidth to others), and for ``max_slowdown`` the adaptive plan. Moves that free
nothing on their own are taken a few at a time where one after them frees something.
``max_slowdown`` also tries the least budget whose plan stays within its time (forward
then waits for writes, which frees the last tensors saved; no plan that never waits can). A
budget also tries recompute sets grown one segment at a time, each with the earliest
saves offloaded until within budget, with and without rebuilds, and keeps the fastest
plan. The tests compare them with brute force on recorded profiles.
"""

from __future__ import annotations

import collections
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

#: A copy-back window that depends on the plan: a function of the largest tensor the plan
#: offloads, giving the bytes backward reads ahead (the offloader's own rule is one).
WindowRule = Callable[[int], int]


def largest_offloaded(largest: int) -> int:
    """The window under a budget: the largest tensor the plan offloads (one tensor's copy
    overlaps the compute that uses the one before), as the offloader reads."""
    return largest


#: Time counted as "no extra time" for the adaptive goal, as a fraction of the step: below
#: what one step differs from the next on a GPU (1-3%), and what a few rebuilds cost.
ADAPTIVE_TOLERANCE = 0.01


@dataclass
class SegmentProfile:
    """One stretch of the forward pass as measured: times, and what it saves."""

    fwd_ms: float
    bwd_ms: float
    #: Bytes of each eligible tensor it saves, in save order.
    tensors: List[int] = field(default_factory=list)
    #: Bytes of the block's input (what recompute keeps); 0 when it cannot be recomputed.
    input_bytes: int = 0
    #: Of ``tensors``, how many the block itself saves (None: all). Those after it (the
    #: head after the last block) are saved even when the block is recomputed.
    inner: Optional[int] = None
    #: Milliseconds from the segment's forward start to each save of ``tensors``, as
    #: measured (None: spread evenly, the k-th of n at (k+1)/n of ``fwd_ms``).
    save_ms: Optional[List[float]] = None
    #: Per tensor of ``tensors``: milliseconds to rebuild it in backward from other saved
    #: tensors (the one cheap operation that made it, measured), or None where it cannot
    #: be rebuilt. None: no tensor can.
    rebuild_ms: Optional[List[Optional[float]]] = None
    #: Per tensor of ``tensors``: where it can be rebuilt, the tensors saved before it that
    #: rebuilding it reads, as (segment, index) pairs; backward needs them when it rebuilds
    #: the tensor, which may come before their own use. None: not recorded (each tensor
    #: is then needed at its own use only).
    rebuild_inputs: Optional[List[Optional[List[Tuple[int, int]]]]] = None

    def rebuild_cost(self, k: int) -> Optional[float]:
        """Milliseconds to rebuild tensor ``k`` in backward, or None (it cannot be)."""
        if self.rebuild_ms is None or k >= len(self.rebuild_ms) or k >= len(self.tensors):
            return None
        return self.rebuild_ms[k]

    def inputs_of(self, k: int) -> List[Tuple[int, int]]:
        """The tensors rebuilding tensor ``k`` reads (see ``rebuild_inputs``)."""
        if self.rebuild_inputs is None or k >= len(self.rebuild_inputs) or not self.rebuild_inputs[k]:
            return []
        return [(int(i), int(j)) for i, j in self.rebuild_inputs[k]]

    def use_fraction(self, k: int) -> float:
        """How much of the segment's backward is done when backward needs tensor ``k``
        (backward uses a segment's tensors in reverse: the last saved first)."""
        n = len(self.tensors)
        return (n - 1 - k) / max(n, 1)

    def save_at(self, k: int) -> float:
        """When, after the segment's forward starts, its ``k``-th tensor is saved."""
        if self.save_ms is not None and len(self.save_ms) == len(self.tensors):
            return min(max(self.save_ms[k], 0.0), self.fwd_ms)
        return self.fwd_ms * (k + 1) / max(len(self.tensors), 1)

    @property
    def inner_count(self) -> int:
        """How many of ``tensors`` recomputing the segment does away with."""
        return len(self.tensors) if self.inner is None else min(self.inner, len(self.tensors))


@dataclass
class Profile:
    """A step measured without offloading."""

    segments: List[SegmentProfile]

    @property
    def forward_ms(self) -> float:
        return sum(s.fwd_ms for s in self.segments)

    @property
    def backward_ms(self) -> float:
        return sum(s.bwd_ms for s in self.segments)

    @property
    def step_ms(self) -> float:
        return self.forward_ms + self.backward_ms

    @property
    def activation_bytes(self) -> int:
        return sum(sum(s.tensors) for s in self.segments)

    def to_dict(self) -> Dict[str, object]:
        """The profile as plain data (JSON), times rounded to microseconds."""

        def ms(xs: Optional[Sequence[Optional[float]]]) -> Optional[List[Optional[float]]]:
            return None if xs is None else [None if x is None else round(x, 3) for x in xs]

        return dict(
            segments=[
                dict(
                    fwd_ms=round(s.fwd_ms, 3),
                    bwd_ms=round(s.bwd_ms, 3),
                    tensors=list(s.tensors),
                    input_bytes=s.input_bytes,
                    inner=s.inner,
                    save_ms=ms(s.save_ms),
                    rebuild_ms=ms(s.rebuild_ms),
                    **(
                        {}
                        if s.rebuild_inputs is None
                        else dict(rebuild_inputs=[None if x is None else [list(p) for p in x] for x in s.rebuild_inputs])
                    ),
                )
                for s in self.segments
            ]
        )

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "Profile":
        """A profile from :meth:`to_dict`'s data (e.g. a recorded step's)."""
        segs = data.get("segments") if isinstance(data, dict) else None
        if not isinstance(segs, list):
            raise ValueError("a profile holds a list of 'segments' (as Profile.to_dict writes it)")
        out = []
        for i, s in enumerate(segs):
            try:
                out.append(SegmentProfile(**s))
            except TypeError as e:
                raise ValueError(f"segment {i} of the profile: {e} (fields: fwd_ms, bwd_ms, tensors, input_bytes, "
                                 "inner, save_ms, rebuild_ms, rebuild_inputs)") from None
        return cls(out)

    def tensor_ids(self) -> List[Tuple[int, int]]:
        """(segment, index in segment) of every tensor, in save order."""
        return [(i, k) for i, s in enumerate(self.segments) for k in range(len(s.tensors))]

    def rebuildable(self) -> List[Tuple[int, int]]:
        """(segment, index) of every tensor that can be rebuilt, in save order."""
        return [(i, k) for i, k in self.tensor_ids() if self.segments[i].rebuild_cost(k) is not None]


@dataclass
class Tiers:
    """Measured bandwidths (GB/s) and the host tier's size (0: no host tier)."""

    storage_write_gbps: float
    storage_read_gbps: float
    host_bytes: int = 0
    host_write_gbps: float = 0.0
    host_read_gbps: float = 0.0

    @classmethod
    def measured(cls, write_gbps: float, read_gbps: float, host_bytes: int = 0) -> "Tiers":
        """The tiers for the one bandwidth the offloader measures: the host tier's where it
        has a size (storage behind it is reached only by spilling, in the background, and
        not planned on), else the storage's."""
        if host_bytes > 0:
            return cls(0.0, 0.0, host_bytes, write_gbps, read_gbps)
        return cls(write_gbps, read_gbps)


@dataclass
class Outcome:
    """What the simulation predicts for a plan."""

    activation_bytes: int  # held at forward's peak
    extra_ms: float  # stalls + recompute + write wait
    write_wait_ms: float  # forward's waits for writes (under a budget)
    read_stall_ms: float
    recompute_ms: float
    host_bytes: int  # offloaded bytes placed in the host tier
    storage_bytes: int  # offloaded bytes placed on storage
    kept_bytes: int = 0  # bytes not offloaded (kept tensors, recompute inputs kept)
    rebuilt_bytes: int = 0  # bytes rebuilt in backward instead of kept or written
    window_bytes: Optional[int] = None  # the copy-back window it was planned with
    #: Milliseconds from forward's start to the save of each tensor (segment, index; -1:
    #: a recomputed segment's input), forward's waits included, as simulated.
    save_ms: Dict[Tuple[int, int], float] = field(default_factory=dict)
    #: Milliseconds from forward's start to the end of each offloaded tensor's write, as
    #: simulated: the plan's memory counts the tensor free from the first save whose
    #: release time (``release_ms``) is at or after it (see ``Offloader``).
    write_done_ms: Dict[Tuple[int, int], float] = field(default_factory=dict)
    #: At the first save of each tensor, the offloader waits for the writes done by this
    #: time (milliseconds from forward's start) and lets go of their tensors: the save's own
    #: time, or under a budget later, where the next tensor needs room before it is made.
    release_ms: Dict[Tuple[int, int], float] = field(default_factory=dict)


@dataclass
class RokPlan:
    """Which tensors to offload and to rebuild (by (segment, index)) and which segments to
    recompute."""

    goal: str
    offload: FrozenSet[Tuple[int, int]]
    recompute: FrozenSet[int]
    outcome: Outcome
    reason: str
    rebuild: FrozenSet[Tuple[int, int]] = frozenset()
    #: The bytes forward holds saved tensors under, waiting for writes where it must (a
    #: budget's, or the one a time goal's plan was found under); None: forward never waits.
    budget: Optional[int] = None

    def summary(self) -> Dict[str, object]:
        o = self.outcome
        return dict(
            goal=self.goal,
            offloaded_tensors=len(self.offload),
            recomputed_segments=sorted(self.recompute),
            rebuilt_tensors=len(self.rebuild),
            predicted_rebuilt_bytes=o.rebuilt_bytes,
            predicted_activation_bytes=o.activation_bytes,
            predicted_extra_ms=round(o.extra_ms, 3),
            predicted_write_wait_ms=round(o.write_wait_ms, 3),
            predicted_read_stall_ms=round(o.read_stall_ms, 3),
            predicted_recompute_ms=round(o.recompute_ms, 3),
            planned_host_bytes=o.host_bytes,
            planned_storage_bytes=o.storage_bytes,
            held_under_bytes=self.budget,
            reason=self.reason,
        )


def _gbps_ms(nbytes: int, gbps: float) -> float:
    """Milliseconds to move ``nbytes`` at ``gbps`` GB/s (infinite for no bandwidth)."""
    if nbytes <= 0:
        return 0.0
    if gbps <= 0:
        return float("inf")
    return nbytes / (gbps * 1e6)


def plan_window(window: Union[int, WindowRule, None], offloaded: Sequence[int]) -> Optional[int]:
    """The copy-back window in bytes for a plan offloading tensors of the given sizes:
    None for None; a number of bytes, or a rule (such as :func:`largest_offloaded`) applied
    to the largest of them, and never less than that largest tensor (backward reads at
    least one ahead); None when the plan offloads nothing."""
    if window is None:
        return None
    if not callable(window) and not isinstance(window, numbers.Integral):
        raise ValueError(f"window={window!r}: a number of bytes, None, or a rule of the largest offloaded tensor")
    largest = max(offloaded, default=0)
    if largest <= 0:
        return None
    return max(int(window(largest) if callable(window) else window), largest)


def simulate(
    profile: Profile,
    tiers: Tiers,
    offload: FrozenSet[Tuple[int, int]],
    recompute: FrozenSet[int],
    budget: Optional[int] = None,
    window: Union[int, WindowRule, None] = None,
    rebuild: FrozenSet[Tuple[int, int]] = frozenset(),
    prefetch_segments: Optional[int] = None,
) -> Outcome:
    """Predicts activation memory (under a ``budget``, up to backward's start) and extra
    step time for a plan (see the module documentation for the model). ``window`` bounds
    the bytes read back ahead of use in backward: a number of bytes, a rule of the largest
    tensor the plan offloads (:func:`largest_offloaded`: that tensor), or None (no bound,
    and under a budget reads ahead are not counted as held). Under a ``budget``, forward
    waits for the oldest writes whenever the bytes still being written
    pass what the budget leaves beside the kept ones and the window (as the offloader
    does). Tensors in ``rebuild`` are neither held nor written, and cost their rebuild
    time in backward. ``prefetch_segments``: how many segments before the one backward
    runs a tensor may be read from (None: any), as the offloader's setting."""
    segs = profile.segments
    rebuilt_bytes = 0
    rebuild_ms = 0.0
    # Forward: what is saved when, in order. A recomputed segment saves its input only,
    # at its start; offloading it is the move (i, -1). A rebuilt tensor is saved too, and
    # holds nothing: its entry (0 bytes, not offloaded) only marks the moment.
    # (time, bytes, segment, offloaded, fraction of the segment's backward done when needed,
    # the tensor)
    saves: List[Tuple[float, int, int, bool, float, Tuple[int, int]]] = []
    rebuilt: List[Tuple[int, int]] = []
    clock = 0.0
    for i, s in enumerate(segs):
        n = len(s.tensors)
        first = 0
        if i in recompute:
            # Recompute needs its input first thing in the segment's backward; what comes
            # after the block (the head) is saved all the same.
            saves.append((clock, s.input_bytes, i, (i, -1) in offload, 0.0, (i, -1)))
            first = s.inner_count
        for k in range(first, n):
            at = clock + s.save_at(k)
            if (i, k) in rebuild:
                cost = s.rebuild_cost(k)
                if cost is not None:
                    rebuilt_bytes += s.tensors[k]
                    rebuild_ms += cost
                    rebuilt.append((i, k))
                    saves.append((at, 0, i, False, 0.0, (i, k)))
                    continue
            saves.append((at, s.tensors[k], i, (i, k) in offload, s.use_fraction(k), (i, k)))
        clock += s.fwd_ms
    t_forward = clock
    kept_total = sum(b for _, b, _, off, _, _ in saves if not off or b == 0)
    window = plan_window(window, [b for _, b, _, off, _, _ in saves if off and b > 0])
    limit = None if budget is None else max(budget - kept_total - (window or 0), 0)
    # Forward, save by save. A tensor exists from the start of the operation that makes it,
    # before its save: the offloader lets go of written tensors only at saves, so at that
    # moment forward holds it beside the kept bytes and every write not done by the save
    # before. Writes run one after another in save order, none before its save.
    delay = 0.0  # forward's waits for writes so far (under a budget)
    chan = 0.0
    written = 0
    kept = 0
    pending = 0
    inflight: Deque[Tuple[float, int]] = collections.deque()  # (end, bytes), in end order
    held = 0
    # (segment, bytes, in host tier, due fraction, the tensor)
    placed: List[Tuple[int, int, bool, float, Tuple[int, int]]] = []
    save_ms: Dict[Tuple[int, int], float] = {}
    release_ms: Dict[Tuple[int, int], float] = {}
    write_done_ms: Dict[Tuple[int, int], float] = {}
    last: Optional[Tuple[int, int]] = None  # the save before, whose hook makes room
    t_last = 0.0  # its time

    def wait_oldest(room: Optional[int], hook: Tuple[int, int], since: float) -> float:
        """Under a budget, the save ``hook`` (at ``since``) waits for the oldest writes
        until at most ``room`` bytes are under way; forward waits with it. Returns the
        time it goes on (``since`` without a budget)."""
        nonlocal pending, delay
        while room is not None and pending > room and inflight:
            end, done = inflight.popleft()
            pending -= done
            if end > since:
                delay += end - since
                since = end
            release_ms[hook] = max(release_ms[hook], end)
        return since

    for t0, b, i, off, frac, tensor in saves:
        if off and b > 0 and last is not None:
            # Room for this tensor is made before it is, by the save before.
            t_last = wait_oldest(None if limit is None else limit - b, last, t_last)
        t = t0 + delay
        held = max(held, kept + pending + b)
        save_ms[tensor] = release_ms[tensor] = t
        last = tensor
        while inflight and inflight[0][0] <= t:
            pending -= inflight.popleft()[1]
        if not off or b == 0:
            kept += b  # kept, or a rebuilt tensor's moment (0 bytes)
        else:
            in_host = written + b <= tiers.host_bytes
            gbps = tiers.host_write_gbps if in_host else tiers.storage_write_gbps
            chan = max(chan, t) + _gbps_ms(b, gbps)
            written += b
            placed.append((i, b, in_host, frac, tensor))
            inflight.append((chan, b))
            write_done_ms[tensor] = chan
            pending += b
            t = wait_oldest(limit, tensor, t)
        t_last = t
    t_end = t_forward + delay
    pending_end = sum(b for end, b in inflight if end > t_end)
    # The host tier keeps the newest bytes: those placed past it were written after
    # older ones spilled, so count the last host_bytes written as in the host tier.
    host_left = tiers.host_bytes
    in_host_at_bwd: List[bool] = [False] * len(placed)
    for j in range(len(placed) - 1, -1, -1):
        b = placed[j][1]
        if b <= host_left:
            in_host_at_bwd[j] = True
            host_left -= b
    # Backward: segments last to first, from the end of forward; reads in that order, at
    # most `window` bytes ahead of their use.
    start = t_forward + delay
    need: Dict[int, float] = {}
    clock = start
    recompute_ms = rebuild_ms
    for i in range(len(segs) - 1, -1, -1):
        need[i] = clock
        extra = segs[i].fwd_ms if i in recompute else 0.0
        recompute_ms += extra
        clock += segs[i].bwd_ms + extra
    stall = 0.0
    chan = start
    ahead: Deque[Tuple[float, int]] = collections.deque()  # (when used, bytes) read, not yet used
    ahead_bytes = 0
    def readable_from(i: int) -> int:
        """The segment whose backward start lets segment ``i``'s tensors be read."""
        if prefetch_segments is None:
            return len(segs) - 1
        return min(i + prefetch_segments, len(segs) - 1)

    early = _needed_by_rebuilds(segs, rebuilt, need)
    if budget is not None and window is not None and placed:
        # Under a budget, which holds up to backward's start: as backward starts, the first
        # reads ahead (those it may read then, within the window) join what forward still
        # holds. (The other goals free memory at forward's peak, its end.)
        first, j = 0, len(placed) - 1
        while j >= 0 and readable_from(placed[j][0]) == len(segs) - 1 and (first == 0 or first + placed[j][1] <= window):
            first += placed[j][1]
            j -= 1
        held = max(held, kept_total + pending_end + first)
    for j in range(len(placed) - 1, -1, -1):
        i, b, _, frac, tensor = placed[j]
        if window is not None:
            while ahead and ahead_bytes + b > window:  # room comes as earlier ones are used
                used, nbytes = ahead.popleft()
                ahead_bytes -= nbytes
                chan = max(chan, used)
        gbps = tiers.host_read_gbps if in_host_at_bwd[j] else tiers.storage_read_gbps
        # Needed at its own use, or earlier where a rebuild reads it (then readable from
        # the rebuild's segment on).
        own = need[i] + frac * segs[i].bwd_ms + stall
        due, readable = own, readable_from(i)
        if tensor in early:
            at, user = early[tensor]
            due, readable = min(own, at + stall), max(readable, readable_from(user))
        chan = max(chan, need[readable] + stall) + _gbps_ms(b, gbps)
        if chan > due:
            stall += chan - due
            own += chan - due
        ahead.append((max(own, chan), b))
        ahead_bytes += b
    host_b = sum(b for _, b, h, _, _ in placed if h)
    return Outcome(
        activation_bytes=held,
        extra_ms=delay + stall + recompute_ms,
        write_wait_ms=delay,
        read_stall_ms=stall,
        recompute_ms=recompute_ms,
        host_bytes=host_b,
        storage_bytes=written - host_b,
        kept_bytes=kept_total,
        rebuilt_bytes=rebuilt_bytes,
        window_bytes=window,
        save_ms=save_ms,
        write_done_ms=write_done_ms,
        release_ms=release_ms,
    )


def _needed_by_rebuilds(
    segs: Sequence[SegmentProfile], rebuilt: Sequence[Tuple[int, int]], need: Dict[int, float]
) -> Dict[Tuple[int, int], Tuple[float, int]]:
    """For each tensor that a rebuild reads, the earliest time backward rebuilds a tensor
    from it (from the same clock as ``need``, each segment's backward start) and that
    tensor's segment. A rebuilt input is no read: the rebuild reads its inputs then."""
    rebuilt_set = set(rebuilt)
    out: Dict[Tuple[int, int], Tuple[float, int]] = {}

    def mark(u: Tuple[int, int], at: float, user: int, depth: int) -> None:
        if u in rebuilt_set:
            if depth < 8:  # a chain of rebuilds: what the first one reads, then
                for v in segs[u[0]].inputs_of(u[1]):
                    mark(v, at, user, depth + 1)
            return
        if u not in out or at < out[u][0]:
            out[u] = (at, user)

    for i, k in rebuilt:
        s = segs[i]
        at = need[i] + s.use_fraction(k) * s.bwd_ms
        for u in s.inputs_of(k):
            mark(u, at, i, 0)
    return out


#: A plan under search: (offloaded tensors, recomputed segments, rebuilt tensors).
State = Tuple[FrozenSet[Tuple[int, int]], FrozenSet[int], FrozenSet[Tuple[int, int]]]


def _moves(profile: Profile, state: State) -> List[Tuple[str, object]]:
    """Moves from a plan: offload the next tensor (in save order) of a segment neither
    offloaded nor rebuilt, or its smallest such tensor, or all of them (one tensor at a time may free nothing until
    several have gone: the first reads ahead in backward hold as many bytes as the last
    offloads free), offload a recomputed segment's input, rebuild a segment's cheapest
    tensor per byte, or recompute a segment."""
    offload, recompute, rebuild = state
    out: List[Tuple[str, object]] = []
    for i, s in enumerate(profile.segments):
        first = 0
        if i in recompute:
            if (i, -1) not in offload and s.input_bytes > 0:
                out.append(("offload", (i, -1)))
            first = s.inner_count
        rest = [(i, k) for k in range(first, len(s.tensors)) if (i, k) not in offload and (i, k) not in rebuild]
        # The next in save order has the most time to be written, but a large one there
        # can hold the channel up for the smaller ones after it: the smallest is a move too.
        if rest:
            out.append(("offload", rest[0]))
            smallest = min(rest, key=lambda t: s.tensors[t[1]])
            if smallest != rest[0]:
                out.append(("offload", smallest))
        if len(rest) > 1:
            out.append(("offload_rest", i))
        # Of the segment's rebuilds, the one that frees the most bytes per millisecond (a
        # rebuild moves nothing, so within a segment the others only come after it).
        ks = [k for k in range(first, len(s.tensors)) if (i, k) not in rebuild and s.rebuild_cost(k) is not None]
        if ks:
            out.append(("rebuild", (i, max(ks, key=lambda k: s.tensors[k] / max(s.rebuild_cost(k) or 0.0, 1e-9)))))
        if i not in recompute and _recomputable(s):
            out.append(("recompute", i))
    return out


def _recomputable(s: SegmentProfile) -> bool:
    """Whether recomputing the segment saves bytes: its block saves more than its input."""
    return s.input_bytes > 0 and sum(s.tensors[: s.inner_count]) > s.input_bytes


def _apply(profile: Profile, move: Tuple[str, object], state: State) -> State:
    offload, recompute, rebuild = state
    kind, what = move
    if kind == "offload":
        return offload | {what}, recompute, rebuild
    if kind == "offload_rest":
        s = profile.segments[what]
        first = s.inner_count if what in recompute else 0
        rest = {(what, k) for k in range(first, len(s.tensors)) if (what, k) not in rebuild}
        return offload | rest, recompute, rebuild
    if kind == "rebuild":
        return offload - {what}, recompute, rebuild | {what}
    i = what
    # The block's own tensors are no longer saved; those after it stay as planned.
    inner = profile.segments[i].inner_count
    return (
        frozenset(t for t in offload if t[0] != i or t[1] >= inner),
        recompute | {i},
        frozenset(t for t in rebuild if t[0] != i or t[1] >= inner),
    )


def _move_segment(move: Tuple[str, object]) -> int:
    kind, what = move
    return what if kind in ("recompute", "offload_rest") else what[0]  # type: ignore[index]


def _cheap_rebuilds(profile: Profile, frozen: set, allowed: float) -> FrozenSet[Tuple[int, int]]:
    """The rebuilds that free the most bytes per millisecond, as many as ``allowed``
    milliseconds pay for."""
    cands = [(i, k) for i, k in profile.rebuildable() if i not in frozen]
    cost = {t: profile.segments[t[0]].rebuild_cost(t[1]) or 0.0 for t in cands}
    cands.sort(key=lambda t: -profile.segments[t[0]].tensors[t[1]] / max(cost[t], 1e-9))
    out, spent = [], 0.0
    for t in cands:
        if spent + cost[t] <= allowed + 1e-9:
            out.append(t)
            spent += cost[t]
    return frozenset(out)


def plan(
    profile: Profile,
    tiers: Tiers,
    *,
    budget: Optional[int] = None,
    max_slowdown: Optional[float] = None,
    allow_recompute: bool = True,
    keep_last: int = 0,
    window: Union[int, WindowRule, None] = None,
    prefetch_segments: Optional[int] = None,
) -> RokPlan:
    """The plan for a goal: ``budget`` (bytes), ``max_slowdown`` (a ratio ≥ 1), or neither
    (adaptive). The last ``keep_last`` segments are never touched; ``window`` is the most
    bytes backward reads ahead of use and ``prefetch_segments`` how far back (see
    :func:`simulate`). ``allow_recompute=False`` neither
    recomputes segments nor rebuilds tensors."""
    if budget is not None and max_slowdown is not None:
        raise ValueError("give budget= or max_slowdown=, not both")
    if max_slowdown is not None and max_slowdown < 1.0:
        raise ValueError(f"max_slowdown={max_slowdown}: a step cannot be faster than without offloading (>= 1.0)")
    if budget is not None and budget < 0:
        raise ValueError(f"budget={budget}: a number of bytes >= 0")
    step = profile.step_ms
    frozen = set(range(max(0, len(profile.segments) - keep_last), len(profile.segments)))

    def sim(state: State) -> Outcome:
        offload, recompute, rebuild = state
        return simulate(profile, tiers, offload, recompute, budget, window, rebuild, prefetch_segments)

    if budget is not None:
        goal = f"budget={budget}"
        allowed = float("inf")
    elif max_slowdown is not None:
        goal = f"max_slowdown={max_slowdown}"
        allowed = (max_slowdown - 1.0) * step
    else:
        goal = "adaptive"
        allowed = ADAPTIVE_TOLERANCE * step

    def better(a: Outcome, b: Outcome) -> bool:
        """Whether ``a`` serves the goal better than ``b``."""
        if budget is not None:
            if (a.activation_bytes <= budget) != (b.activation_bytes <= budget):
                return a.activation_bytes <= budget
            if a.activation_bytes > budget:
                return a.activation_bytes < b.activation_bytes
            return a.extra_ms < b.extra_ms - 1e-9
        return (a.activation_bytes, a.extra_ms) < (b.activation_bytes, b.extra_ms - 1e-9)

    def greedy(state: State) -> Tuple[State, Outcome]:
        cur = sim(state)
        found = (state, cur)
        flat_steps = 0
        # Each move's key when last simulated. A move's worth mostly falls as others are
        # taken (they free its bytes' moment, or take the bandwidth it needed), so moves are
        # simulated in the order of their last keys, and once the best fresh key is above
        # every last key left, the rest are not simulated again (a lazy greedy search:
        # planning a deep model's step is otherwise cubic in its saved tensors).
        last: Dict[Tuple[str, object], Tuple[bool, float]] = {}
        unseen = (True, math.inf)
        while True:
            if budget is not None and cur.activation_bytes <= budget:
                break
            best, flat = None, None
            moves = [
                mv
                for mv in _moves(profile, state)
                if _move_segment(mv) not in frozen and (mv[0].startswith("offload") or allow_recompute)
            ]
            moves.sort(key=lambda mv: last.get(mv, unseen), reverse=True)
            for mv in moves:
                if best is not None and best[0] >= last.get(mv, unseen):
                    break
                s2 = _apply(profile, mv, state)
                out = sim(s2)
                freed = cur.activation_bytes - out.activation_bytes
                if out.extra_ms > allowed + 1e-9:
                    last[mv] = (False, -1.0)
                    continue
                if freed <= 0:
                    # Frees nothing yet: a step across a plateau (several tensors in a
                    # saturated write channel, or the first reads ahead, free nothing
                    # one by one), the one that costs least.
                    last[mv] = (False, 0.0)
                    if freed == 0 and mv[0] == "offload" and (flat is None or out.extra_ms < flat[1].extra_ms - 1e-9):
                        flat = (s2, out)
                    continue
                cost = max(out.extra_ms - cur.extra_ms, 0.0)
                # Free moves first (most bytes), then the most bytes per extra millisecond.
                key = (cost <= 1e-9, freed / max(cost, 1e-9))
                last[mv] = key
                if best is None or key > best[0]:
                    best = (key, s2, out)
            if best is not None:
                _, state, cur = best
                flat_steps = 0
                if better(cur, found[1]):
                    found = (state, cur)
            elif flat is not None and flat_steps < _PLATEAU_STEPS:
                state, cur = flat
                flat_steps += 1
            else:
                break
        state, cur = found
        if budget is None:
            # Drop offloads and rebuilds that free nothing (writes not done by the peak):
            # they cost bandwidth or time.
            offload, recompute, rebuild = state
            for t in sorted(offload, reverse=True):
                s2 = (offload - {t}, recompute, rebuild)
                out = sim(s2)
                if out.activation_bytes <= cur.activation_bytes and out.extra_ms <= cur.extra_ms + 1e-9:
                    offload, cur = s2[0], out
            for t in sorted(rebuild, reverse=True):
                s2 = (offload, recompute, rebuild - {t})
                out = sim(s2)
                if out.activation_bytes <= cur.activation_bytes and out.extra_ms <= cur.extra_ms + 1e-9:
                    rebuild, cur = s2[2], out
            state = (offload, recompute, rebuild)
        return state, cur

    empty: FrozenSet = frozenset()
    starts: List[State] = [(empty, empty, empty)]
    if allow_recompute:
        cheap = _cheap_rebuilds(profile, frozen, allowed if budget is None else step)
        if cheap:
            starts.append((empty, empty, cheap))
    if max_slowdown is not None:
        # What frees memory at no extra time is a start for what may take more: the
        # search from nothing can spend the time on a recompute before the free moves.
        free = plan(
            profile,
            tiers,
            allow_recompute=allow_recompute,
            keep_last=keep_last,
            window=window,
            prefetch_segments=prefetch_segments,
        )
        starts.append((free.offload, free.recompute, free.rebuild))
    state, cur = None, None
    for start in starts:
        if budget is None and sim(start).extra_ms > allowed + 1e-9:
            continue  # a start over the goal's time (the adaptive plan, for a ratio under 1.01)
        s2, out = greedy(start)
        if cur is None or better(out, cur):
            state, cur = s2, out
    assert state is not None and cur is not None
    if budget is not None:
        # The moves above are weighed while the budget is still exceeded, where every write
        # holds forward up: that undervalues offloading. Plans that recompute some segments
        # and offload the earliest saves until within budget compete with theirs.
        alt = _budget_search(profile, sim, budget, frozen, allow_recompute)
        if alt is not None and better(alt[1], cur):
            state, cur = alt
    hold = budget
    if max_slowdown is not None:
        # Making forward wait for writes frees what no plan that never waits can (the
        # last tensors saved): the least budget whose plan stays within the time competes.
        tight = _least_budget_within(
            profile, tiers, allowed, cur.activation_bytes, allow_recompute, keep_last, window, prefetch_segments
        )
        if tight is not None and tight.outcome.activation_bytes < cur.activation_bytes:
            state, cur, hold = (tight.offload, tight.recompute, tight.rebuild), tight.outcome, tight.budget
    offload, recompute, rebuild = state
    total = profile.activation_bytes
    cut = 1 - cur.activation_bytes / total if total else 0.0
    if budget is not None and cur.activation_bytes > budget:
        reason = (
            f"cannot meet the budget: the least activation memory found is {cur.activation_bytes / 2**30:.2f} GiB "
            f"(of {total / 2**30:.2f} GiB), at +{cur.extra_ms:.1f} ms"
        )
    else:
        reason = (
            f"{goal}: {cut:.0%} of {total / 2**30:.2f} GiB activation memory freed at the peak, "
            f"{len(offload)} tensors offloaded ({cur.host_bytes / 2**30:.2f} GiB host tier, "
            f"{cur.storage_bytes / 2**30:.2f} GiB storage), {len(rebuild)} tensors rebuilt "
            f"({cur.rebuilt_bytes / 2**30:.2f} GiB), {len(recompute)} segments recomputed, "
            f"predicted +{cur.extra_ms:.1f} ms on a {step:.1f} ms step"
        )
        if hold is not None and budget is None:
            reason += f", forward waiting for writes to hold {hold / 2**30:.2f} GiB"
    return RokPlan(goal, offload, recompute, cur, reason, rebuild, hold)


#: Halvings of the range of budgets tried for a time goal.
_BUDGET_STEPS = 6


def _least_budget_within(
    profile: Profile,
    tiers: Tiers,
    allowed: float,
    above: int,
    allow_recompute: bool,
    keep_last: int,
    window: Union[int, WindowRule, None],
    prefetch_segments: Optional[int],
) -> Optional[RokPlan]:
    """The plan for the least budget below ``above`` bytes (found by halving the range)
    whose extra time is within ``allowed`` milliseconds, or None. Its window is one tensor
    (:func:`largest_offloaded`), as the offloader reads under a budget, unless ``window`` is a fixed
    number of bytes."""
    rule = window if isinstance(window, numbers.Integral) else largest_offloaded
    lo, hi, found = 0, above, None
    for _ in range(_BUDGET_STEPS if above > 0 else 0):
        mid = (lo + hi) // 2
        got = plan(
            profile,
            tiers,
            budget=mid,
            allow_recompute=allow_recompute,
            keep_last=keep_last,
            window=rule,
            prefetch_segments=prefetch_segments,
        )
        if got.outcome.activation_bytes <= mid and got.outcome.extra_ms <= allowed + 1e-9:
            found, hi = got, mid
        else:
            lo = mid
    return found


#: Moves that free nothing the greedy search takes in a row, looking for one that frees
#: something after them, before it stops.
_PLATEAU_STEPS = 4

#: Offload prefixes tried per recompute set in the budget search, beyond the shortest.
_PREFIXES = 8


def _budget_search(profile: Profile, sim, budget: int, frozen, allow_recompute: bool):
    """The least extra time under ``budget`` among plans that recompute a set of segments
    (grown one segment at a time, the best first), rebuild every tensor they can or none,
    and offload a prefix of the remaining saves in save order: the shortest prefix within
    budget and a few longer ones (more offloaded leaves more room for writes under way).
    Returns (state, outcome), or None when no such plan meets the budget."""
    segs = profile.segments

    def rebuilds(recompute: FrozenSet) -> FrozenSet:
        return frozenset(
            (i, k) for i, k in profile.rebuildable() if i not in frozen and (i not in recompute or k >= segs[i].inner_count)
        )

    def candidates(recompute: FrozenSet, rebuild: FrozenSet) -> List[Tuple[Tuple[int, int], int]]:
        out: List[Tuple[Tuple[int, int], int]] = []
        for i, s in enumerate(segs):
            if i in frozen:
                continue
            first = 0
            if i in recompute:
                if s.input_bytes > 0:
                    out.append(((i, -1), s.input_bytes))
                first = s.inner_count
            out.extend(((i, k), s.tensors[k]) for k in range(first, len(s.tensors)) if (i, k) not in rebuild)
        return out

    def kept(recompute: FrozenSet, rebuild: FrozenSet) -> int:
        total = 0
        for i, s in enumerate(segs):
            first = 0
            if i in recompute:
                total += s.input_bytes
                first = s.inner_count
            total += sum(b for k, b in enumerate(s.tensors) if k >= first and (i, k) not in rebuild)
        return total

    def best_for(recompute: FrozenSet):
        found = None
        for rebuild in {frozenset(), rebuilds(recompute) if allow_recompute else frozenset()}:
            cands = candidates(recompute, rebuild)
            left = kept(recompute, rebuild)
            n = 0
            while left > budget and n < len(cands):
                left -= cands[n][1]
                n += 1
            if left > budget:
                continue
            step = max(1, (len(cands) - n) // _PREFIXES)
            for m in sorted({*range(n, len(cands) + 1, step), len(cands)}):
                state = (frozenset(c for c, _ in cands[:m]), recompute, rebuild)
                out = sim(state)
                if out.activation_bytes <= budget and (found is None or out.extra_ms < found[1].extra_ms - 1e-9):
                    found = (state, out)
        return found

    best = best_for(frozenset())
    recompute: FrozenSet = frozenset()
    choices = [i for i, s in enumerate(segs) if allow_recompute and i not in frozen and _recomputable(s)]
    while True:
        step_best = None
        for i in choices:
            if i in recompute:
                continue
            got = best_for(recompute | {i})
            if got is not None and (step_best is None or got[1].extra_ms < step_best[1].extra_ms - 1e-9):
                step_best = got
        if step_best is None or (best is not None and step_best[1].extra_ms >= best[1].extra_ms - 1e-9):
            return best
        best, recompute = step_best, step_best[0][1]


def schedule_bound(profile: Profile, tiers: Tiers) -> int:
    """The most bytes any plan can free at forward's peak without forward waiting, on this
    step and these tiers: every tensor that can be rebuilt is rebuilt, every other one is
    written in save order, none before its save, and only writes done by forward's end
    count, each freeing its bytes at the first save after it. Tighter than a per-layer
    bound (each layer's bytes over its compute time): the last tensors saved cannot be off
    the GPU by the end of forward. Not strict: leaving tensors out lets the ones after them
    finish sooner and be seen done at an earlier save."""
    rebuild = frozenset(profile.rebuildable())
    offload = frozenset(t for t in profile.tensor_ids() if t not in rebuild)
    held = simulate(profile, tiers, offload, frozenset(), rebuild=rebuild).activation_bytes
    return profile.activation_bytes - held


def brute_force(
    profile: Profile,
    tiers: Tiers,
    *,
    budget: Optional[int] = None,
    max_slowdown: Optional[float] = None,
    allow_recompute: bool = True,
) -> Tuple[FrozenSet, FrozenSet, Outcome, FrozenSet]:
    """Every plan tried (small profiles only): the best for the goal, for testing.
    Returns (offload, recompute, outcome, rebuild)."""
    import itertools

    def subsets(items: Sequence) -> List[FrozenSet]:
        return [frozenset(c) for n in range(len(items) + 1) for c in itertools.combinations(items, n)]

    ids: List[Tuple[int, int]] = profile.tensor_ids()
    segs = range(len(profile.segments))
    allowed = (
        float("inf")
        if budget is not None
        else ((max_slowdown - 1.0) * profile.step_ms if max_slowdown is not None else ADAPTIVE_TOLERANCE * profile.step_ms)
    )
    best = None
    rsets: Sequence = subsets(list(segs)) if allow_recompute else [frozenset()]
    for rec in rsets:
        live = [t for t in ids if t[0] not in rec or t[1] >= profile.segments[t[0]].inner_count]
        rebuildable = [t for t in live if profile.segments[t[0]].rebuild_cost(t[1]) is not None]
        for rb in subsets(rebuildable) if allow_recompute else [frozenset()]:
            cand = [t for t in live if t not in rb]
            cand += [(i, -1) for i in rec if profile.segments[i].input_bytes > 0]
            for n in range(len(cand) + 1):
                for c in itertools.combinations(cand, n):
                    o = simulate(profile, tiers, frozenset(c), rec, budget, rebuild=rb)
                    if budget is not None:
                        if o.activation_bytes > budget:
                            continue
                        key = (-o.extra_ms, -o.activation_bytes)
                    else:
                        if o.extra_ms > allowed + 1e-9:
                            continue
                        key = (-o.activation_bytes, -o.extra_ms)
                    if best is None or key > best[0]:
                        best = (key, frozenset(c), rec, o, rb)
    if best is None:
        raise ValueError("no plan meets the goal")
    return best[1], best[2], best[3], best[4]
