"""The :class:`Offloader`: saved-tensor hooks that offload a model's activations during a
training step, and :func:`offload`, its one-call form."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .._engine import Engine
from .ahead import FetchAhead
from . import compat
from .compat import CAPTURE_MESSAGE, POOL_MESSAGE, CudaGraphError
from .planner import Profile, RokPlan, SegmentProfile, Tiers, plan as plan_rok
from .policy import Plan, Segment
from .rebuild import Fixed, Producers, Rebuilt, Recipe, SavedRef, check_fixed, elapsed_ms
from .saved import InPlaceModificationError, Kept, Stored

_log = logging.getLogger("spillway.torch")

#: Storage id of the bandwidth probe's buffers (tensor ids count up from 1).
_PROBE_ID = (1 << 64) - 1
#: A planned step that takes longer than this times its prediction (and waited on I/O)
#: is planned again with less bandwidth.
STEP_OVERRUN = 1.03


class _HostMark:
    """A point in time on the host, with a CUDA event's ``elapsed_time`` (for CPU tensors,
    whose work runs on the host as it is called)."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, later: "_HostMark") -> float:
        return (later.t - self.t) * 1e3


def _scale_down(predicted_ms: float, measured_ms: float) -> float:
    """How much of a bandwidth the next plan takes after a step waited ``measured_ms`` on
    it where the plan predicted ``predicted_ms``: the ratio of the two where the plan
    predicted a wait (a budget's waits for writes, say: bytes moved at that ratio of the
    bandwidth would have waited as measured), between 0.25 and 0.8; 0.8 where it
    predicted none."""
    if predicted_ms <= 0 or measured_ms <= 0:
        return 0.8
    return min(0.8, max(0.25, predicted_ms / measured_ms))


def _compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` or a module in it is compiled (``torch.compile``/``.compile()``)."""
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule"
        for m in model.modules()
    )


def _find_segments(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The model's repeated blocks: the children of its largest ModuleList/Sequential, or
    its own children."""
    best: List[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len(m) > len(best):
            best = list(m)
    if len(best) >= 2:
        return best
    return list(model.children())


class Offloader:
    """Offloads a model's saved activations to storage during training steps.

    Args:
        model: the module trained; its parameters and buffers are never offloaded.
        path: directory (an anonymous file is used there), file or block device on fast
            storage; None when the ``rank_paths`` setting names this rank's (under a
            launcher, a file name is made the rank's own: see :class:`spillway.Engine`).
        capacity: bytes the engine may use there (default: half the free space).
        policy: ``"adaptive"`` (default) or ``"all"``; see the module's documentation.
        budget: a memory goal: saved activation bytes (int or size text) to hold at most
            up to backward's start (kept, still being written, or copied back ahead of
            use: ``stats()["last_step"]["held_peak_bytes"]``), at the least extra step time
            (the planner chooses what to offload and which blocks to recompute). Implies
            the adaptive policy.
        max_slowdown: a time goal: the most activation memory freed with the step at most
            this many times as long (e.g. 1.05). Implies the adaptive policy.
        recompute: whether the planner may recompute blocks (activation checkpointing of a
            block, its input offloaded) and rebuild single tensors (a norm's or an
            activation's output, made again in backward from its saved input: see
            :mod:`spillway.torch.rebuild`) where that is cheaper than moving their bytes.
            Tensors are rebuilt in eager mode only, not in a compiled model.
        min_tensor_bytes: storages smaller than this stay in memory (default 1 MiB).
        keep_last: with ``policy="all"``, forward segments at the end kept in memory
            (default 1); the adaptive policy's planner decides per tensor instead.
        prefetch_segments: in backward, how many segments before the one running may
            have their tensors copied back ahead of use (default 2).
        fetch_ahead_bytes: the most bytes copied back ahead of use in backward (memory
            backward holds beyond what it needs now; default: twice the largest tensor
            offloaded in the step, at least 64 MiB, or under a budget the largest tensor).
        run_ahead: in steps that offload, the host queues work at most this many saved
            (or, in backward, used) tensors ahead of the GPU (default 3; 0: no bound).
            Memory comes back when the GPU has copied a tensor out, so a host far ahead
            would have allocated the rest of forward before any of it came back.
        segments: modules whose forward calls cut the forward pass into segments (default:
            the model's repeated blocks).
        device: the device whose tensors are offloaded (default: the model's). A CPU
            model's CPU tensors go through the host engine.
        probe_bytes: bytes written and read at start to measure the storage's bandwidth
            for the adaptive policy (default 256 MiB; twice, the first round untimed).
        profile_steps: steps the adaptive policy runs before it decides, the last one
            measured (default 2: the first step of a run is slower than the others).
        profile: what those steps do with saved tensors: ``"keep"`` (default) keeps them
            all, so the steps must fit in GPU memory; ``"offload"`` offloads every segment
            but the last ``keep_last``, as ``policy="all"`` does, for a micro-batch that
            fits only with offloading.
        max_pending_bytes: most bytes of offloaded tensors still held in GPU memory
            because their writes are not done; a save beyond it waits for the writes.
            This bounds GPU memory when storage is slower than compute, at the cost of
            time (default: no bound).
        engine: an :class:`spillway.Engine` to use instead of making one.
        **settings: engine settings (see ``spillway.SETTINGS``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        path: Optional[str] = None,
        *,
        capacity: "int | str | None" = None,
        policy: str = "adaptive",
        budget: "int | str | None" = None,
        max_slowdown: Optional[float] = None,
        recompute: bool = True,
        min_tensor_bytes: int = 1 << 20,
        keep_last: int = 1,
        prefetch_segments: int = 2,
        segments: Optional[List[torch.nn.Module]] = None,
        device: "torch.device | str | None" = None,
        probe_bytes: int = 256 << 20,
        profile_steps: int = 2,
        profile: str = "keep",
        max_pending_bytes: Optional[int] = None,
        fetch_ahead_bytes: Optional[int] = None,
        run_ahead: int = 3,
        engine: Optional[Engine] = None,
        **settings: Any,
    ):
        if policy not in ("adaptive", "all"):
            raise ValueError(f'policy={policy!r}: expected "adaptive" or "all"')
        if budget is not None and max_slowdown is not None:
            raise ValueError("give budget= (a memory goal) or max_slowdown= (a time goal), not both")
        if (budget is not None or max_slowdown is not None) and policy != "adaptive":
            raise ValueError(f'budget= and max_slowdown= are goals of the adaptive policy, not of policy={policy!r}')
        if isinstance(budget, str):
            from .. import parse_size

            budget = parse_size(budget)
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget={budget!r}: activation bytes to stay under (an int >= 0, or text like '20GiB')")
        if max_slowdown is not None and not (isinstance(max_slowdown, (int, float)) and max_slowdown >= 1.0):
            raise ValueError(f"max_slowdown={max_slowdown!r}: a step-time ratio >= 1.0, e.g. 1.05")
        if keep_last < 0 or prefetch_segments < 0 or min_tensor_bytes < 0:
            raise ValueError("keep_last, prefetch_segments and min_tensor_bytes must be >= 0")
        if profile_steps < 1:
            raise ValueError("profile_steps must be at least 1")
        if profile not in ("keep", "offload"):
            raise ValueError(f'profile={profile!r}: expected "keep" (the profiling steps keep every tensor) or '
                             f'"offload" (they offload all but the last keep_last segments)')
        if max_pending_bytes is not None and max_pending_bytes <= 0:
            raise ValueError("max_pending_bytes must be positive (or None: no bound)")
        if fetch_ahead_bytes is not None and fetch_ahead_bytes <= 0:
            raise ValueError("fetch_ahead_bytes must be positive (or None: twice the largest tensor offloaded)")
        if run_ahead < 0:
            raise ValueError("run_ahead must be >= 0 (0: no bound on how far the host runs ahead of the GPU)")
        self.model = model
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"device {self.device}: spillway offloads CUDA (or CPU) tensors")
        self._cuda = self.device.type == "cuda"
        if engine is None:
            dev = f"cuda:{self.device.index}" if self._cuda else "host"
            engine = Engine(path, capacity, device=dev, **settings)
            self._own_engine = True
        else:
            self._own_engine = False
        if engine.device != (f"cuda:{self.device.index}" if self._cuda else "host"):
            raise ValueError(f"the engine works on {engine.device}, but the tensors to offload are on {self.device}")
        self.engine = engine
        self.policy = policy
        self.budget = budget
        self.max_slowdown = max_slowdown
        self.allow_recompute = recompute
        self.min_tensor_bytes = min_tensor_bytes
        self.keep_last = keep_last
        self.prefetch_segments = prefetch_segments
        self.probe_bytes = probe_bytes
        self.profile_steps = profile_steps
        self.profile = profile
        self.max_pending_bytes = max_pending_bytes
        self.fetch_ahead_bytes = fetch_ahead_bytes
        self.run_ahead = run_ahead
        self._pending_bytes = 0  # offloaded, source still held (once per storage)
        self._pending_records: Dict[Tuple[int, int], int] = {}  # per storage: records holding it
        self._ahead = FetchAhead(engine, self.device)
        # This step's offloaded records in save order (backward copies them back from the
        # end), the next one to copy back, and the window in bytes.
        self._order: List[weakref.ref] = []
        self._cursor = -1
        self._window = 0
        self._bwd_segment = 0
        # Events of the last saves/uses, for keeping the host near the GPU.
        self._pace_events: "collections.deque" = collections.deque()
        self._pacing = False
        self._step_stall = 0.0  # seconds the host waited for bytes this step
        self._step_write_wait = 0.0  # of them, waiting in forward for writes to finish
        # Saved bytes held this step (kept, still being written, copied back ahead), and
        # the most up to backward's start: what a budget bounds.
        self._kept_step = 0
        self._held_peak = 0
        self._blocks = segments if segments is not None else _find_segments(model)
        # How cheap operations made their outputs (forward of eager steps), for rebuilding
        # saved tensors in backward; the storage keys this step's plan rebuilds.
        self._producers = Producers(self.device, min_tensor_bytes, self._is_param_tensor) if recompute else None
        self._producing = False
        self._rebuild_keys: set = set()
        # Under torch.compile the hooks are never traced: each is a graph break, so a
        # compiled model runs one graph per block, whose saves come when the block ends
        # (see docs/integrations-compile-fsdp.md), and the hooks run as written.
        self._pack_hook = compat.not_traced(self._pack)
        self._unpack_hook = compat.not_traced(self._unpack)
        on_block = compat.not_traced(self._on_block_forward)
        self._hooks = [b.register_forward_pre_hook(on_block) for b in self._blocks]
        on_block_end = compat.not_traced(self._on_block_forward_end)
        self._hooks += [b.register_forward_hook(on_block_end) for b in self._blocks]
        # The model's own forward: parameters that exist only while it runs (FSDP2 gathers
        # them in its pre-forward hooks, which run before these) are noted there.
        self._hooks.append(model.register_forward_pre_hook(compat.not_traced(self._on_model_forward)))
        self._block_calls = 0  # this step's block forward calls seen
        # Planned per tensor: this step's eligible first saves counted per segment, and the
        # decision taken for each storage key (its other views follow it).
        self._saves_in_segment: Dict[int, int] = {}
        self._decisions: Dict[Tuple[int, int], bool] = {}
        # Each storage key's tensor in the plan's profile: (segment, index; -1 a recomputed
        # block's input), for the plan's timing of its save and of its write.
        self._positions: Dict[Tuple[int, int], Tuple[int, int]] = {}
        # In a profiling step, each storage key's tensor: (segment, index).
        self._profiled_at: Dict[Tuple[int, int], Tuple[int, int]] = {}
        self._rok: Optional[RokPlan] = None
        # Blocks recomputed: index -> the forward set on the instance before (None: none).
        self._recomputed: Dict[int, Any] = {}
        self._plan_pending_limit: Optional[int] = None
        # Per step.
        self._active = False
        self._segments: List[Segment] = []
        # Records are held by autograd's graph; the offloader only refers to them weakly,
        # so a record (and its handle) goes when autograd frees the saved tensor.
        self._inflight: List[weakref.ref] = []  # still holding their source tensors
        # Storages of the model's parameters and buffers, by storage object (``_cdata``):
        # each to a weak reference to its tensor, alive while the storage can be trusted.
        self._param_storages: Dict[int, weakref.ref] = {}
        self._storage_ids: Dict[int, Tuple[int, int, weakref.ref]] = {}
        self._keys_seen: set = set()
        self._next_storage_id = 1
        # Storages fetched and shared by several saved views: key -> (storage, ids of the
        # records still to use it). Records of earlier steps (retain_graph) stay findable.
        self._fetched: Dict[Tuple[int, int], Tuple[torch.UntypedStorage, set]] = {}
        self._by_key: Dict[Tuple[int, int], List[weakref.ref]] = {}
        self._in_backward = False
        self._profiling = False
        # Across steps.
        self._steps = 0
        self._plan: Optional[Plan] = None
        if policy == "all":
            self._plan = Plan("all", self._offload_all_segments(), f"policy='all': every segment but the last {keep_last}")
        self._bandwidth: Optional[Tuple[float, float]] = None
        # What later plans take of the measured write and read bandwidths: lowered, each on
        # its own, when steps stall on that direction.
        self._write_scale = 1.0
        self._read_scale = 1.0
        # Each plan that overran: its bandwidth scales and the step time it measured. A
        # revision that made the step slower is undone (back to the fastest plan tried),
        # and the plan then stays: lowering the bandwidths further would not help.
        self._overran: List[Tuple[Tuple[float, float], float]] = []
        self._settled = False
        self._plan_fresh = False  # a plan made or revised, whose first step has not ended
        self._plan_steps = 0  # steps that ended under the plan in force
        self._profiled: List[Segment] = []  # the measured step's segments
        self._profiled_held = 0  # saved bytes it held at most
        self._profiled_seconds = 0.0  # its wall time, measured as every step's
        self._totals = dict(
            offloaded_tensors=0, offloaded_dtensors=0, kept_tensors=0, rebuilt_tensors=0, bytes_offloaded=0, bytes_kept=0,
            bytes_rebuilt=0, rebuild_missed=0, bytes_fetched=0, bytes_fetched_ahead=0, stall_s=0.0, step_s=0.0,
        )
        self._last_step: Dict[str, Any] = {}
        self._closed = False

    # -- the public surface ---------------------------------------------------------------

    @contextlib.contextmanager
    def step(self) -> Iterator["Offloader"]:
        """Context manager around one training step's forward and backward."""
        if self._closed:
            raise RuntimeError("this Offloader is closed")
        if self._active:
            raise RuntimeError("Offloader.step() is already active: steps do not nest")
        if compat.cuda_capturing():
            raise CudaGraphError(CAPTURE_MESSAGE)
        if self.policy == "adaptive" and self._bandwidth is None:
            self._bandwidth = self._probe_bandwidth()
        self._begin_step()
        t0 = time.perf_counter()
        completed = False
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack_hook, self._unpack_hook))
                if self._producing:
                    stack.enter_context(self._producers)
                yield self
            completed = True
        finally:
            self._active = False
            if self._producers is not None:
                self._producers.recording = False
                self._producers.clear()
            # A step that failed, or that is refused below, does not shape the plan.
            self._end_step(time.perf_counter() - t0, self._step_stall, completed and not self._blocks_missed())
        self._check_blocks_ran()

    @property
    def settled(self) -> bool:
        """Whether the plan has stopped changing, so that steps from here on show the
        steady state: the plan in force has run two steps (its first, which warms it up,
        and one judged without a revision), or stays for good. An adaptive offloader's
        first steps profile, plan and may plan again; a benchmark times steps once this
        is true."""
        if self._plan is None:
            return False
        if self.policy != "adaptive" or self._rok is None or self._settled:
            return self._plan_steps >= 1
        return self._plan_steps >= 2

    def stats(self) -> Dict[str, Any]:
        """Totals since the offloader started, the last step's figures, the engine's
        counters and the policy's choice with its reason."""
        e = self.engine.stats()
        plan = self._plan
        return dict(
            steps=self._steps,
            **self._totals,
            bytes_written=e["bytes_written"],
            bytes_read=e["bytes_read"],
            bytes_deduplicated=e["dedup_bytes"],
            bytes_forwarded=e["forwarded_bytes"],
            resident_tensors=e["resident_tensors"],
            last_step=dict(self._last_step),
            policy=dict(
                mode=self.policy,
                offloaded_segments=None if plan is None else plan.offload_segments,
                segments=len(self._segments),
                keep_last=self.keep_last,
                reason=(
                    (
                        f"the first {self.profile_steps} step(s) run without offloading, the last one measured"
                        if self.profile == "keep"
                        else f"the first {self.profile_steps} step(s) offload every segment but the last "
                        f"{self.keep_last}, the last one measured"
                    )
                    if plan is None
                    else plan.reason
                ),
                **({} if plan is None else plan.details),
                **({} if self._rok is None else dict(plan_summary=self._rok.summary())),
            ),
            engine=e,
        )

    def close(self) -> None:
        """Removes the hooks and closes the engine (if the offloader made it)."""
        if self._closed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._set_recompute([])
        self._closed = True
        self._drop_step_state()
        self._ahead.close()
        if self._own_engine:
            self.engine.close()

    def __enter__(self) -> "Offloader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- steps ----------------------------------------------------------------------------

    def _begin_step(self) -> None:
        self._drop_step_state()
        self._active = True
        self._in_backward = False
        # Adaptive: the first steps run without offloading; the last of them is measured.
        self._profiling = self._plan is None and self._steps + 1 >= self.profile_steps
        self._segments = [Segment(0, "start")]
        self._block_calls = 0
        self._param_storages = {}
        self._note_params(self.model)
        self._storage_ids = {}
        self._keys_seen = set()
        self._saves_in_segment = {}
        self._decisions = {}
        self._positions = {}
        self._profiled_at = {}
        self._rebuild_keys = set()
        # Notes of cheap operations are taken in eager steps that may rebuild: the step
        # measured for the plan, and planned steps that rebuild something.
        wanted = self._profiling or (self._rok is not None and bool(self._rok.rebuild))
        self._producing = self._producers is not None and wanted and not _compiled(self.model)
        if self._producers is not None:
            self._producers.clear()
            self._producers.recording = self._producing
            self._producers.timing = self._producing and self._profiling
        self._order = []
        self._cursor = -1
        self._bwd_segment = 0
        self._step_stall = 0.0
        self._step_write_wait = 0.0
        self._kept_step = 0
        self._held_peak = 0
        self._pace_events.clear()
        offloads = self._profiling_offloads() or (self._plan is not None and self._plan.offload_segments > 0)
        self._pacing = self._cuda and self.run_ahead > 0 and offloads
        self._mark_segment_start(self._segments[0], forward=True)

    def _end_step(self, seconds: float, stall: float, plan: bool = True) -> None:
        self._steps += 1
        self._totals["stall_s"] += stall
        self._totals["step_s"] += seconds
        segs = self._segments
        self._measure_segments()
        self._last_step = dict(
            seconds=seconds,
            stall_s=stall,
            write_wait_s=self._step_write_wait,
            segments=len(segs),
            offloaded_bytes=sum(s.offloaded_bytes for s in segs),
            kept_bytes=sum(s.kept_bytes for s in segs),
            rebuilt_bytes=sum(s.rebuilt_bytes for s in segs),
            held_peak_bytes=self._held_peak,
        )
        if plan and self.policy == "all" and self._plan is not None:
            self._plan.offload_segments = max(0, len(segs) - self.keep_last)
        if plan and not self._profiling and self._plan is not None:
            self._plan_steps += 1
        if plan and self.policy == "adaptive":
            if self._profiling:
                # The measured step is what every later plan is made from.
                self._profiled = list(segs)
                self._profiled_held = self._held_peak
                self._profiled_seconds = seconds
                self._plan = self._make_plan()
                self._plan_fresh = True
                self._plan_steps = 0
                self._plan.details["profiled_step"] = self._steps
                _log.info("spillway plan after step %d: %s", self._steps, self._plan.reason)
            elif self._plan is not None and self._rok is not None and not self._settled:
                if self._plan_fresh:
                    # A plan's first step warms it up (pinned buffers, the allocator, a
                    # compiled model's graphs for a new set of recomputed blocks): it is
                    # neither revised nor judged.
                    self._plan_fresh = False
                elif self._step_overran(seconds, stall):
                    self._revise_plan(seconds, stall)
                elif self._overran:
                    self._keep_or_go_back(seconds)
        self._poll_sources()

    def _revise_plan(self, seconds: float, stall: float) -> None:
        """A planned step stalled and ran past its prediction: a bandwidth was optimistic.
        Plans again with less of the one it waited on (writes in forward, reads in
        backward; both if both: see :func:`_scale_down`), unless the last revision made
        steps slower than a plan before it: then back to the fastest plan tried, for
        good."""
        scales = (self._write_scale, self._read_scale)
        best = min(self._overran, key=lambda tried: tried[1], default=None)
        self._overran.append((scales, seconds))
        head = f"step {self._steps} stalled {stall * 1e3:.1f} ms of {seconds * 1e3:.1f} ms"
        if best is not None and seconds >= best[1]:
            self._go_back(head, *best)
            return
        write_wait = self._step_write_wait
        read_wait = stall - write_wait
        o = self._rok.outcome
        if write_wait >= 0.25 * stall:
            self._write_scale *= _scale_down(o.write_wait_ms, write_wait * 1e3)
        if read_wait >= 0.25 * stall:
            self._read_scale *= _scale_down(o.read_stall_ms, read_wait * 1e3)
        self._plan = self._make_plan()
        self._plan_fresh = True
        self._plan_steps = 0
        self._plan.reason = (
            f"{head} ({write_wait * 1e3:.1f} on writes, {read_wait * 1e3:.1f} on reads): planned again "
            f"with write bandwidth x{self._write_scale:.2f}, read x{self._read_scale:.2f}; " + self._plan.reason
        )
        _log.info("spillway plan revised: %s", self._plan.reason)

    def _keep_or_go_back(self, seconds: float) -> None:
        """A revised plan ran without stalling: it stays if its step was no slower than
        the fastest plan tried before it, else that one comes back (a revision that waits
        less may still cost more, recomputing say), and stays."""
        scales, best = min(self._overran, key=lambda tried: tried[1])
        self._settled = True
        if seconds > best:
            self._go_back(f"step {self._steps} took {seconds * 1e3:.1f} ms", scales, best)

    def _go_back(self, head: str, scales: Tuple[float, float], seconds: float) -> None:
        """Back to the plan made with bandwidth ``scales``, the fastest tried (its step took
        ``seconds``), for good; ``head`` says what the step that brought it back did."""
        self._write_scale, self._read_scale = scales
        self._settled = True
        self._plan = self._make_plan()
        self._plan_steps = 0
        self._plan.reason = (
            f"{head}, slower than the {seconds * 1e3:.1f} ms of the plan with write bandwidth "
            f"x{scales[0]:.2f}, read x{scales[1]:.2f}: back to that plan, which stays; " + self._plan.reason
        )
        _log.info("spillway plan revised: %s", self._plan.reason)

    def _step_overran(self, seconds: float, stall: float) -> bool:
        """Whether a planned step was slowed by its I/O: the host waited for it (more than
        2% of the step) and the step took longer than the plan predicted (by more than
        3%). Host waits alone are not enough: the host runs ahead of the GPU, and a wait
        while the GPU still has work queued costs the step nothing. The prediction starts
        from the profiled step's wall time, measured as this one was: its segments' times
        leave out what runs between them (the loss, hooks, launches), a few percent of a
        step."""
        profiled_ms = max(sum(s.fwd_ms + s.bwd_ms for s in self._profiled), self._profiled_seconds * 1e3)
        predicted_ms = profiled_ms + self._rok.outcome.extra_ms
        return stall > 0.02 * seconds and seconds * 1e3 > STEP_OVERRUN * predicted_ms

    def _drop_step_state(self) -> None:
        # Saved tensors of earlier steps live on in their graphs (retain_graph) and release
        # their handles when autograd frees them; the step's bookkeeping goes.
        self._segments = []
        self._ahead.settle_all()
        self._order = []
        self._pace_events.clear()
        self._poll_sources()

    def _mark(self) -> Any:
        """A timing mark: a CUDA event on the current stream, or the host's clock."""
        if not self._cuda:
            return _HostMark()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _mark_segment_start(self, seg: Segment, forward: bool) -> None:
        if not self._profiling:
            return
        ev = self._mark()
        if forward:
            seg.fwd_start = ev
        else:
            seg.bwd_start = ev

    def _measure_segments(self) -> None:
        """Forward and backward time of each segment (profiling steps)."""
        segs = self._segments
        if not (self._profiling and segs):
            return
        end = self._mark()
        if self._cuda:
            end.synchronize()
        fwd_end = segs[-1].bwd_start or end
        for i, s in enumerate(segs):
            nxt = segs[i + 1].fwd_start if i + 1 < len(segs) else fwd_end
            if s.fwd_start is not None and nxt is not None:
                s.fwd_ms = s.fwd_start.elapsed_time(nxt)
                # When each tensor was saved, within the segment's forward.
                s.save_ms = [min(max(s.fwd_start.elapsed_time(m), 0.0), s.fwd_ms) for m in s.save_marks]
            s.save_marks = []
            s.rebuild_ms = [elapsed_ms(ev) if ev is not None else None for ev in s.rebuild_events]
            s.rebuild_events = []
        # Backward runs last to first: segment i's backward lasts until segment i-1's starts.
        for i, s in enumerate(segs):
            if s.bwd_start is None:
                continue
            prev = next((segs[j].bwd_start for j in range(i - 1, -1, -1) if segs[j].bwd_start is not None), None)
            s.bwd_ms = s.bwd_start.elapsed_time(prev if prev is not None else end)

    def _host_tier_bytes(self) -> int:
        tier = self.engine.stats().get("host_tier")
        return int(tier["capacity"]) if tier else 0

    def _make_plan(self) -> Plan:
        segs = self._profiled
        write_gbps, read_gbps = self._bandwidth or (0.0, 0.0)
        tier_bytes = self._host_tier_bytes()
        details = dict(
            write_gbps=round(write_gbps, 3),
            read_gbps=round(read_gbps, 3),
            host_tier_bytes=tier_bytes,
            forward_ms=round(sum(s.fwd_ms for s in segs), 3),
            backward_ms=round(sum(s.bwd_ms for s in segs), 3),
            offloadable_bytes=sum(s.saved_bytes for s in segs),
        )
        if write_gbps <= 0 or read_gbps <= 0:
            return Plan("adaptive", 0, "the storage bandwidth could not be measured", details)
        profile = Profile(
            [
                SegmentProfile(
                    s.fwd_ms,
                    s.bwd_ms,
                    list(s.tensors),
                    s.input_bytes if s.block >= 0 else 0,
                    s.inner,
                    list(s.save_ms) if len(s.save_ms) == len(s.tensors) else None,
                    list(s.rebuild_ms) if len(s.rebuild_ms) == len(s.tensors) else None,
                    list(s.rebuild_inputs) if len(s.rebuild_inputs) == len(s.tensors) else None,
                )
                for s in segs
            ]
        )
        # What the plan is made from, for replanning away from the GPU (Profile.from_dict).
        details["profile"] = profile.to_dict()
        # The probe measured the host tier where there is one, else the storage.
        tiers = Tiers.measured(write_gbps * self._write_scale, read_gbps * self._read_scale, tier_bytes)
        # Backward copies tensors back ahead of use, up to the window: a budget holds it too.
        # (A tensor larger than the window still goes, alone.) The window follows from the
        # largest tensor a plan offloads, by the rule backward applies: the planner weighs
        # keeping that one.
        budget = self.budget

        def rule(largest: int) -> int:
            return self._fetch_window(largest, tight=budget is not None)

        # A window the user fixed is the same number for every plan (the time goal's
        # budget plans included).
        window: Any = self.fetch_ahead_bytes if self.fetch_ahead_bytes is not None else rule

        rok = plan_rok(
            profile,
            tiers,
            budget=budget,
            max_slowdown=self.max_slowdown,
            allow_recompute=self.allow_recompute,
            window=window,
            prefetch_segments=self.prefetch_segments,
        )
        # (What the profiling steps held counts the reads ahead as backward started: so
        # does this comparison.)
        if budget is None and self.profile == "offload" and (
            rok.outcome.activation_bytes + (rok.outcome.window_bytes or 0) > self._profiled_held
        ):
            # Profiled offloading everything: what was held then is known to fit, a plan
            # that keeps more may not. Hold it to that.
            budget = self._profiled_held
            rok = plan_rok(
                profile,
                tiers,
                budget=budget,
                allow_recompute=self.allow_recompute,
                window=window,
                prefetch_segments=self.prefetch_segments,
            )
            rok.reason = f"held to what the profiling steps held ({self._profiled_held / 2**30:.2f} GiB): {rok.reason}"
        self._rok = rok
        self._set_recompute(sorted(segs[i].block for i in rok.recompute if segs[i].block >= 0))
        self._plan_pending_limit = None
        if rok.budget is not None:
            # Bytes still being written are held too: bound them by what the budget (the
            # goal's, or the one a time goal's plan was found under) has left, so that the
            # peak stays within it (a save beyond it waits for writes; with nothing left,
            # each write finishes before forward goes on). The window's reads join them as
            # backward starts.
            self._plan_pending_limit = max(rok.budget - rok.outcome.kept_bytes - (rok.outcome.window_bytes or 0), 0)
        details["fetch_ahead_bytes"] = rok.outcome.window_bytes
        details["planned_bytes"] = rok.outcome.host_bytes + rok.outcome.storage_bytes
        touched = len({i for i, _ in rok.offload} | set(rok.recompute))
        return Plan("adaptive", touched, rok.reason, details)

    def _set_recompute(self, blocks: List[int]) -> None:
        """Recomputes the given blocks in backward (activation checkpointing, their input
        saved through the hooks like any tensor); the others run as they are."""
        for b, own in self._recomputed.items():
            if own is None:
                del self._blocks[b].forward  # back to the class's forward
            else:
                self._blocks[b].forward = own
        self._recomputed = {}
        from torch.utils.checkpoint import checkpoint

        for b in blocks:
            block = self._blocks[b]
            own = block.forward

            def forward(*args: Any, __own: Any = own, **kwargs: Any) -> Any:
                if not self._active or self._in_backward or not torch.is_grad_enabled():
                    return __own(*args, **kwargs)
                if kwargs:
                    return checkpoint(__own, *args, use_reentrant=False, **kwargs)
                # Reentrant: the input is saved through the hooks, so it can be offloaded.
                return checkpoint(__own, *args, use_reentrant=True)

            self._recomputed[b] = vars(block).get("forward")
            # Not traced by torch.compile (the block's own forward still is).
            block.forward = compat.not_traced(forward, recursive=False)

    def _probe_bandwidth(self) -> Tuple[float, float]:
        """Writes and reads ``probe_bytes`` through the engine twice; returns the second
        round's (write, read) GB/s.

        The first round is not timed: it touches what training reuses in every step but
        the first (the storage's space, which on tmpfs is allocated page by page on its
        first write, and the engine's staging buffers), and measured, it read as half the
        rate or less of what the steps get."""
        if self.probe_bytes <= 0:
            return (0.0, 0.0)
        chunk = 16 << 20
        n = max(1, self.probe_bytes // chunk)
        bufs = [torch.empty(chunk, dtype=torch.uint8, device=self.device) for _ in range(n)]
        stream = torch.cuda.current_stream(self.device).cuda_stream if self._cuda else None
        rates = (0.0, 0.0)
        for round_ in range(2):
            if self._cuda:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            handles = [
                self.engine.offload((_PROBE_ID, round_ * n + i), [(b.data_ptr(), chunk)], stream)
                for i, b in enumerate(bufs)
            ]
            self.engine.drain()
            t1 = time.perf_counter()
            for h in handles:
                self.engine.prefetch(h)
            for h, b in zip(handles, bufs):
                self.engine.fetch(h, [(b.data_ptr(), chunk)], stream)
            if self._cuda:
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            for h in handles:
                self.engine.release(h)
            total = n * chunk
            rates = (total / (t1 - t0) / 1e9, total / (t2 - t1) / 1e9)
        return rates

    # -- forward --------------------------------------------------------------------------

    def _note_params(self, module: torch.nn.Module) -> None:
        """Notes the storages of ``module``'s parameters and buffers as they are now (a
        DTensor's by its local shard): saved tensors in them stay in memory."""
        for t in module.parameters():
            self._note_param(compat.local_tensor(t))
        for t in module.buffers():
            self._note_param(compat.local_tensor(t))

    def _note_param(self, t: torch.Tensor) -> None:
        if t.device == self.device:
            self._param_storages[t.untyped_storage()._cdata] = weakref.ref(t)

    def _is_param_tensor(self, t: torch.Tensor) -> bool:
        return isinstance(t, torch.nn.Parameter) or self._is_param_storage(t.untyped_storage())

    def _is_param_storage(self, st: torch.UntypedStorage) -> bool:
        ref = self._param_storages.get(st._cdata)
        # A parameter still alive holds its storage, so no other storage has its address.
        return ref is not None and ref() is not None

    def _on_model_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self._active and not self._in_backward:
            self._note_params(module)

    def _blocks_missed(self) -> bool:
        """Whether this step saved activations but none of the blocks ran their forward
        hooks: everything fell in one segment, which the policy keeps, so nothing would
        ever be offloaded, without a word."""
        first = self._segments[0] if self._segments else None
        return bool(self._blocks) and not self._block_calls and first is not None and first.saved_bytes > 0

    def _check_blocks_ran(self) -> None:
        """Refuses a step in which the blocks' hooks did not run (see _blocks_missed)."""
        if not self._blocks_missed():
            return
        first = self._segments[0]
        names = sorted({type(b).__name__ for b in self._blocks})
        raise RuntimeError(
            f"spillway: none of the {len(self._blocks)} modules that cut the forward pass into "
            f"segments ({', '.join(names)}) ran its forward hooks in this step, though the step "
            f"saved {first.saved_bytes / 2**20:.1f} MiB of activations for backward: as one "
            "segment, they would stay in memory. Usually the model was compiled (torch.compile) "
            "before this Offloader added its hooks: compiled code does not call forward hooks added "
            "after it was compiled, and the code compiled for one model serves the other models "
            "of its class. Call torch.compiler.reset() after making the Offloader (or make it "
            "before anything of this class is compiled). Otherwise, give segments= the modules "
            "that the forward pass calls."
        )

    def _on_block_forward(self, module: torch.nn.Module, args: Any) -> None:
        if self._active:
            self._block_calls += 1
        # A block whose forward runs without grad still starts a segment: reentrant
        # checkpointing around a block's call (transformers 4.x's default) runs it so, and
        # the input it saves belongs to that block. A forward that saves nothing leaves
        # an empty segment.
        if not self._active or self._in_backward:
            return
        self._note_params(module)
        seg = Segment(len(self._segments), type(module).__name__)
        seg.block = next((i for i, b in enumerate(self._blocks) if b is module), -1)
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            seg.input_bytes = compat.local_tensor(x).untyped_storage().nbytes()
        self._segments.append(seg)
        self._mark_segment_start(seg, forward=True)
        self._poll_sources()

    def _on_block_forward_end(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """A block's forward returned: what its segment saves from here on comes after it."""
        if not self._active or self._in_backward or not self._segments:
            return
        seg = self._segments[-1]
        if seg.inner is None and 0 <= seg.block < len(self._blocks) and self._blocks[seg.block] is module:
            seg.inner = len(seg.tensors)

    def _offloading(self, seg: Segment, key: Tuple[int, int]) -> bool:
        """Whether the storage ``key`` (saved in ``seg``) is offloaded: as planned for its
        first save, and the same for every other view of it."""
        known = self._decisions.get(key)
        if known is not None:
            return known
        plan, rok = self._plan, self._rok
        if plan is None:
            decided = self._profiling_offloads() and seg.index < self._offload_all_segments()
        elif rok is None:
            decided = seg.index < plan.offload_segments
        else:
            k = self._saves_in_segment.get(seg.index, 0)
            self._saves_in_segment[seg.index] = k + 1
            if seg.index in rok.recompute and seg.inner is None:
                tensor = (seg.index, -1)  # the block's input, saved by recompute
            elif seg.index in rok.recompute:
                # After the recomputed block returned (the head after the last block): as
                # planned for that tensor, counted after the block's own in the profile.
                inner = self._profiled[seg.index].inner if seg.index < len(self._profiled) else None
                tensor = (seg.index, (inner or 0) + seg.tail_saves)
                seg.tail_saves += 1
            else:
                tensor = (seg.index, k)
            decided = tensor in rok.offload
            if tensor in rok.rebuild:
                self._rebuild_keys.add(key)
            self._positions[key] = tensor
        self._decisions[key] = decided
        return decided

    def _profiling_offloads(self) -> bool:
        """Whether the steps before the plan offload (``profile="offload"``)."""
        return self._plan is None and self.policy == "adaptive" and self.profile == "offload"

    def _offload_all_segments(self) -> int:
        """Segments offloaded where everything is (``policy="all"``, or profiling with
        ``profile="offload"``): all but the last ``keep_last``."""
        return max(0, len(self._blocks) + 1 - self.keep_last)

    def _eligible(self, t: torch.Tensor) -> bool:
        if type(t) is not torch.Tensor or t.device != self.device or t.layout != torch.strided:
            return False  # parameters, tensor subclasses, other devices, sparse layouts
        if t.is_quantized or t.is_nested or t.is_conj() or t.is_neg():
            return False
        st = t.untyped_storage()
        if st.nbytes() < self.min_tensor_bytes:
            return False
        if t._base is not None and isinstance(t._base, torch.nn.Parameter):
            self._note_param(t._base)  # a view of a parameter not seen yet
            return False
        return not self._is_param_storage(st)

    def _storage_key(self, t: torch.Tensor) -> Tuple[int, int]:
        """(storage id, version): one id per storage, however many views of it are saved.

        Storages are told apart by address, which the allocator reuses once a storage is
        freed; so an id is reused only for the very storage it was given to, alive: torch
        keeps one Python object per live storage, and a weak reference to it dies with
        the storage (not with the view that was saved, which may go while other views of
        the storage live on)."""
        st = t.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        known = self._storage_ids.get(ptr)
        if known is not None:
            sid, size, ref = known
            if size == nbytes and ref() is st:
                return (sid, t._version)
        sid = self._next_storage_id
        self._next_storage_id += 1
        self._storage_ids[ptr] = (sid, nbytes, weakref.ref(st))
        return (sid, t._version)

    def _pack(self, t: torch.Tensor) -> Any:
        if not self._active:
            return t  # saved outside the step's forward (e.g. in backward): left alone
        if compat.cuda_capturing():
            # Nothing the offloader does (events, copies, freeing memory) belongs in a graph.
            raise CudaGraphError(CAPTURE_MESSAGE)
        seg = self._segments[-1] if self._segments else Segment(0, "start")
        if isinstance(t, torch.nn.Parameter):
            self._note_param(compat.local_tensor(t))  # e.g. FSDP2's unsharded parameters
            return Kept(t, seg.index)
        if self._in_backward:
            return Kept(t, seg.index)
        # A DTensor (tensor parallelism, sequence-parallel shards) is offloaded by its local
        # shard, and rebuilt around it with the same spec at unpack.
        whole, (t, spec) = t, compat.split_dtensor(t)
        if not self._eligible(t):
            return Kept(whole, seg.index)
        if compat.in_cudagraph_pool(t):
            raise CudaGraphError(POOL_MESSAGE)
        self._pace()
        nbytes = t.untyped_storage().nbytes()
        key = self._storage_key(t)
        first = key not in self._keys_seen
        if first:  # counted once per storage and version, however many views are saved
            self._keys_seen.add(key)
            seg.saved_bytes += nbytes
            seg.tensors.append(nbytes)
            if self._profiling:
                self._profiled_at[key] = (seg.index, len(seg.tensors) - 1)
                seg.save_marks.append(self._mark())
                if self._producing:
                    recipe = self._producers.recipe(t) if spec is None else None
                    seg.rebuild_events.append(recipe.events if recipe is not None else None)
                    seg.rebuild_inputs.append(self._recipe_inputs(recipe) if recipe is not None else None)
        offloading = self._offloading(seg, key)
        if first:
            self._release_planned(key)
        if not offloading and key in self._rebuild_keys and spec is None:
            recipe = self._producers.recipe(t) if self._producing else None
            if recipe is not None:
                rebuilt = Rebuilt(recipe, t, seg.index)
                if first:
                    seg.rebuilt_bytes += nbytes
                    self._totals["bytes_rebuilt"] += nbytes
                self._totals["rebuilt_tensors"] += 1
                return self._note_saved(t, rebuilt)
            if first:
                self._totals["rebuild_missed"] += 1
        if not offloading:
            if first:
                seg.kept_bytes += nbytes
                self._kept_step += nbytes
                self._totals["bytes_kept"] += nbytes
            self._totals["kept_tensors"] += 1
            # Writes that finished since the last save give their memory back now, before
            # forward allocates more: kept stretches (the last blocks, the head) are where
            # forward's peak comes.
            if self._inflight:
                self._poll_sources()
            self._note_held()
            return self._note_saved(t, Kept(whole, seg.index))
        stream = torch.cuda.current_stream(self.device).cuda_stream if self._cuda else None
        st = t.untyped_storage()
        handle = self.engine.offload(key, [(st.data_ptr(), st.nbytes())], stream)
        rec = Stored(self, handle, key, t, seg.index)
        rec.due_ms = self._planned_ms(key, write=True)
        if spec is not None:
            rec.dtensor = (spec, whole.requires_grad)
            self._totals["offloaded_dtensors"] += 1
        self._by_key.setdefault(key, []).append(weakref.ref(rec))
        self._inflight.append(weakref.ref(rec))
        self._order.append(weakref.ref(rec))
        self._totals["offloaded_tensors"] += 1
        if first:
            seg.offloaded_bytes += nbytes
            self._totals["bytes_offloaded"] += nbytes
        self._source_held(rec)
        # Memory goes back as soon as its write is done: a tensor held longer than that
        # still counts at the peak.
        self._poll_sources()
        self._bound_pending()
        self._note_held()
        return self._note_saved(t, rec)

    def _recipe_inputs(self, recipe: Recipe) -> List[Tuple[int, int]]:
        """Where the saved tensors that ``recipe`` reads were saved in this (profiling)
        step: (segment, index) of each; rebuilding needs them in backward by then."""
        out = []
        for x in recipe.leaves:
            if not isinstance(x, SavedRef):
                continue
            known = self._storage_ids.get(x.input.ptr)
            pos = None if known is None else self._profiled_at.get((known[0], x.input.version))
            if pos is not None and pos not in out:
                out.append(pos)
        return out

    def _source_held(self, rec: Stored) -> None:
        """``rec`` holds its storage until its write is done: pending, once per storage
        however many views of it were saved (q, k and v of one projection)."""
        n = self._pending_records.get(rec.key, 0)
        if n == 0:
            self._pending_bytes += rec.nbytes
        self._pending_records[rec.key] = n + 1

    def _source_done(self, rec: Stored) -> None:
        """``rec`` no longer holds its storage as pending (written, or kept for good)."""
        n = self._pending_records.get(rec.key, 0) - 1
        if n > 0:
            self._pending_records[rec.key] = n
            return
        self._pending_records.pop(rec.key, None)
        self._pending_bytes -= rec.nbytes

    def _note_saved(self, t: torch.Tensor, saved: Any) -> Any:
        """Tells the notes of cheap operations that ``t`` was saved as ``saved``: tensors
        rebuilt from it find it there. Returns ``saved``."""
        if self._producing:
            self._producers.saved(t, saved)
        return saved

    def _note_held(self) -> None:
        held = self._kept_step + self._pending_bytes + self._ahead.ahead_bytes
        if held > self._held_peak:
            self._held_peak = held

    def _planned_ms(self, key: Tuple[int, int], write: bool = False) -> Optional[float]:
        """When the plan lets go, at the save of the tensor of storage ``key``, of the
        writes done by then (or, with ``write``, when its own write is done), in
        milliseconds from forward's start; None where the plan does not say (no plan per
        tensor, a tensor it did not see)."""
        pos = self._positions.get(key)
        if pos is None or self._rok is None:
            return None
        o = self._rok.outcome
        return (o.write_done_ms if write else o.release_ms).get(pos)

    def _release_planned(self, key: Tuple[int, int]) -> None:
        """At the first save of storage ``key``: waits for the writes the plan has done by
        this save (under a budget, also those it needs gone to make room for the next
        tensor before that is made), and lets go of their tensors.

        The plan counts a tensor's memory free from the end of its write, but memory comes
        back only when the host sees the write done, and the host runs ahead of the GPU
        (up to ``run_ahead`` saves, which in a long matrix product is tens of
        milliseconds). Seen only at the saves after it, a write done in time for the peak
        would hold its memory through the peak (the head's logits and loss, allocated
        between the last saves). Waiting here costs the step nothing while the writes keep
        to the plan: the host waits for what the GPU has already done or is about to do,
        with the work launched before this save still queued. A write later than planned
        shows as a write wait, and a step it slows is planned again with less bandwidth."""
        at = self._planned_ms(key)
        if at is None or not self._inflight:
            return
        due = []
        for ref in self._inflight:
            rec = ref()
            if rec is not None and rec.source is not None and not rec.kept and rec.due_ms is not None:
                if rec.due_ms <= at:
                    due.append(rec)
        if not due:
            return
        t0 = time.perf_counter()
        for rec in due:
            self._wait_write(rec)
        self._poll_sources()
        self._count_write_wait(t0)

    def _wait_write(self, rec: Stored) -> None:
        """Waits for ``rec``'s write and lets go of its tensor; one that no write will
        copy (the storage was full, the write failed) stays held until release."""
        if rec.source is None or rec.handle is None:
            return
        if self.engine.wait_source_released(rec.handle):
            rec.check_version()
            rec.drop_source()
        else:
            rec.keep_source()  # waiting would never end

    def _count_write_wait(self, since: float) -> None:
        """Counts the host's wait for writes since ``since`` (perf_counter seconds)."""
        waited = time.perf_counter() - since
        self._step_stall += waited
        self._step_write_wait += waited

    def _bound_pending(self) -> None:
        """Waits for the oldest writes while more than ``max_pending_bytes`` are held."""
        limits = [x for x in (self.max_pending_bytes, self._plan_pending_limit) if x is not None]
        limit = min(limits) if limits else None
        if limit is None or self._pending_bytes <= limit:
            return
        self._poll_sources()
        t0 = time.perf_counter()
        while self._pending_bytes > limit and self._inflight:
            rec = self._inflight[0]()
            if rec is not None:
                self._wait_write(rec)
            self._poll_sources()
        self._count_write_wait(t0)

    def _pace(self) -> None:
        """Keeps the host at most ``run_ahead`` saves (or uses) ahead of the GPU in steps
        that offload: a tensor's memory comes back once the GPU has copied it out, and only
        what came back before the host allocates the rest of forward lowers the peak."""
        if not self._pacing:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._pace_events.append(ev)
        while len(self._pace_events) > self.run_ahead:
            self._pace_events.popleft().synchronize()

    def _poll_sources(self) -> None:
        """Lets go of source tensors the engine has finished reading."""
        still = []
        for ref in self._inflight:
            rec = ref()
            if rec is None or rec.source is None or rec.kept:
                continue
            try:
                done = rec.handle is None or self.engine.source_released(rec.handle)
            except ValueError:  # released already
                done = True
            if done:
                rec.check_version()
                rec.drop_source()
            else:
                still.append(ref)
        self._inflight = still

    # -- backward -------------------------------------------------------------------------

    def _unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if self._active and compat.cuda_capturing():
            raise CudaGraphError(CAPTURE_MESSAGE)
        if not self._in_backward and self._active:
            self._in_backward = True
            self._on_backward_start()
        if self._active:
            self._pace()
        if isinstance(saved, Kept):
            self._progress(saved.segment)
            return saved.tensor
        if isinstance(saved, Rebuilt):
            self._progress(saved.segment)
            out = torch.empty(0, dtype=saved.dtype, device=self.device)
            out.set_(saved.recipe.run(self._input_value), saved.offset, saved.size, saved.stride)
            self._top_up()
            return out
        rec: Stored = saved
        self._progress(rec.segment)
        rec.check_version()
        if rec.modified:
            raise InPlaceModificationError(
                "a tensor saved for backward was modified in place after it was saved "
                f"(its version went from {rec.version} to a later one); spillway cannot return "
                "its saved value. Avoid the in-place operation (use its out-of-place form) or "
                "clone the tensor before modifying it."
            )
        out = torch.empty(0, dtype=rec.dtype, device=self.device)
        out.set_(self._fetch_storage(rec), rec.offset, rec.size, rec.stride)
        rec.unpacked = True
        self._top_up()
        if rec.dtensor is not None:
            return compat.join_dtensor(out, *rec.dtensor)
        return out

    def _fetch_storage(self, rec: Stored) -> torch.UntypedStorage:
        """The storage behind ``rec``: fetched once, then shared with the other saved
        views of it (kept until each of them has been unpacked or freed)."""
        shared = self._fetched.get(rec.key)
        if shared is not None:
            storage, waiting = shared
            self._stop_waiting(rec)
            return storage
        consumer = torch.cuda.current_stream(self.device) if self._cuda else None
        storage, waited = self._ahead.take(rec.key, consumer)
        if storage is None:  # not copied ahead: read now
            t0 = time.perf_counter()
            buf = torch.empty(rec.nbytes, dtype=torch.uint8, device=self.device)
            self.engine.fetch(rec.handle, [(buf.data_ptr(), rec.nbytes)], None if consumer is None else consumer.cuda_stream)
            storage = buf.untyped_storage()
            waited = time.perf_counter() - t0
        else:
            self._totals["bytes_fetched_ahead"] += rec.nbytes
        self._step_stall += waited
        self._totals["bytes_fetched"] += rec.nbytes
        others = {id(o) for o in (r() for r in self._by_key.get(rec.key, ())) if o is not None and o is not rec}
        if others:
            self._fetched[rec.key] = (storage, others)
        return storage

    def _input_value(self, x: Any) -> torch.Tensor:
        """The value of a rebuilt tensor's input: a fixed tensor, or a saved one (kept,
        offloaded: read back and shared with its own use later, or rebuilt in turn)."""
        if isinstance(x, Fixed):
            return check_fixed(x)
        assert isinstance(x, SavedRef)
        saved = x.saved
        if isinstance(saved, Kept):
            storage = compat.local_tensor(saved.tensor).untyped_storage()  # a DTensor: its shard
        elif isinstance(saved, Rebuilt):
            storage = saved.recipe.run(self._input_value)
        else:
            storage = self._shared_storage(saved)
        return x.view(storage, self.device)

    def _shared_storage(self, rec: Stored) -> torch.UntypedStorage:
        """``rec``'s storage, read back for a rebuild before backward uses ``rec`` itself:
        kept with the other views of it until ``rec`` is unpacked (or freed)."""
        rec.check_version()
        if rec.modified:
            raise InPlaceModificationError(
                "a tensor saved for backward was modified in place after it was saved; spillway cannot "
                "rebuild from it. Avoid the in-place operation or pass recompute=False to the Offloader."
            )
        shared = self._fetched.get(rec.key)
        if shared is not None:
            shared[1].add(id(rec))
            return shared[0]
        storage = self._fetch_storage(rec)
        waiting = self._fetched[rec.key][1] if rec.key in self._fetched else set()
        waiting.add(id(rec))
        self._fetched[rec.key] = (storage, waiting)
        return storage

    def _stop_waiting(self, rec: "Stored") -> None:
        """``rec`` no longer needs the shared fetched copy of its storage."""
        shared = self._fetched.get(rec.key)
        if shared is not None:
            shared[1].discard(id(rec))
            if not shared[1]:
                del self._fetched[rec.key]

    def _on_backward_start(self) -> None:
        if self._producers is not None:
            # Forward is over: no more notes (recipes made hold what they need).
            self._producers.recording = False
            self._producers.clear()
        self._poll_sources()
        if self._profiling and self._segments:
            self._mark_segment_start(self._segments[-1], forward=False)
        self._bwd_segment = len(self._segments) - 1
        self._cursor = len(self._order) - 1
        largest = max((r.nbytes for r in (ref() for ref in self._order) if r is not None), default=0)
        self._window = self._fetch_window(largest)
        self._top_up()
        self._note_held()

    def _fetch_window(self, largest: int, tight: Optional[bool] = None) -> int:
        """The bytes backward copies back ahead of use, given the largest offloaded tensor:
        ``fetch_ahead_bytes`` when given; under a budget (``tight``; by default, where the
        plan holds one), whose every byte counts, one tensor (its copy overlaps the compute
        that uses the one before); otherwise two tensors, at least 64 MiB."""
        if self.fetch_ahead_bytes is not None:
            return self.fetch_ahead_bytes
        if tight is None:
            tight = self.budget is not None or (self._rok is not None and self._rok.budget is not None)
        if tight:
            return largest
        return max(2 * largest, 64 << 20)

    def _progress(self, segment: int) -> None:
        """Backward reached ``segment``: note its start, and copy back what comes next."""
        segs = self._segments
        if self._profiling and 0 <= segment < len(segs) and segs[segment].bwd_start is None:
            self._mark_segment_start(segs[segment], forward=False)
        if segment < self._bwd_segment:
            self._bwd_segment = segment
            self._top_up()

    def _top_up(self) -> None:
        """Starts copying back the offloaded tensors backward needs next (last saved first),
        while fewer than the window's bytes are copied ahead and not yet used, and no
        further than ``prefetch_segments`` segments back from the one running."""
        if not self._in_backward or not self._active:
            return
        consumer = torch.cuda.current_stream(self.device) if self._cuda else None
        while self._cursor >= 0:
            rec = self._order[self._cursor]()
            if rec is None or rec.unpacked or rec.handle is None or rec.key in self._fetched or rec.key in self._ahead.jobs:
                self._cursor -= 1
                continue
            if rec.segment < self._bwd_segment - self.prefetch_segments:
                return
            ahead = self._ahead.ahead_bytes
            if ahead > 0 and ahead + rec.nbytes > self._window:
                return
            self._ahead.start(rec.key, rec.handle, rec.nbytes, consumer)
            self._cursor -= 1

    def _release(self, rec: Stored) -> None:
        self._stop_waiting(rec)
        refs = self._by_key.get(rec.key)
        if refs is not None:
            refs[:] = [r for r in refs if r() is not None and r() is not rec]
            if not refs:
                del self._by_key[rec.key]
        if rec.key not in self._by_key:
            # Nothing else will use a copy under way: let it end before the handle goes.
            self._ahead.settle(rec.key)
        handle, rec.handle = rec.handle, None
        if handle is None or self.engine.closed:
            return
        try:
            self.engine.release(handle)
        except Exception:  # noqa: BLE001 - the engine is going away; nothing to give back
            pass
        rec.drop_source()


_offloaders: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[Any, Offloader]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def offload(model: torch.nn.Module, path: str, **options: Any) -> Iterator[Offloader]:
    """``with spillway.torch.offload(model, path=...) as ctx:`` around one step's forward
    and backward. The :class:`Offloader` (engine, measurements, policy) is made on first
    use and kept for later calls with the same model, path and options."""
    per_model = _offloaders.setdefault(model, {})
    key = (path, tuple(sorted((k, repr(v)) for k, v in options.items())))
    off = per_model.get(key)
    if off is None or off._closed:
        off = per_model[key] = Offloader(model, path, **options)
    with off.step():
        yield off
