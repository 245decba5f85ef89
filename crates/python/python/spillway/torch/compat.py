"""What :class:`~spillway.torch.Offloader` needs to know about the ways people train beyond
eager PyTorch on one device: CUDA graphs (which it refuses), DTensor (whose local shards
it offloads) and parameters that appear only during forward (FSDP2's unsharded ones).

The probes are module functions so that a test without a GPU can stand in for them."""

from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import torch


class CudaGraphError(RuntimeError):
    """A saved tensor reached the offloader while a CUDA graph is being captured, or from a
    CUDA graph's private memory: offloading cannot work there (see the message)."""


CAPTURE_MESSAGE = (
    "spillway cannot offload activations while a CUDA graph is being captured: a tensor was "
    "saved for backward (or used by backward) while the current CUDA stream is capturing "
    "(torch.cuda.graph, torch.cuda.make_graphed_callables, or torch.compile with CUDA graphs). "
    "A captured graph replays fixed memory addresses, which offloading would hand back to the "
    "allocator, and the engine's copies happen outside the graph, so a replay would compute "
    "with memory that no longer holds the activations. Capture outside Offloader.step(), or "
    'compile with mode="default" or mode="max-autotune-no-cudagraphs" to train with spillway.'
)

POOL_MESSAGE = (
    "spillway cannot offload the activations of torch.compile's CUDA graphs "
    '(mode="reduce-overhead", mode="max-autotune" or options={"triton.cudagraphs": True}): '
    "a saved tensor lives in the private memory pool of a CUDA graph, which offloading does not "
    "give back (the graph keeps its memory) and which the next replay overwrites. Compile with "
    'mode="default" or mode="max-autotune-no-cudagraphs" to train with spillway, or leave this '
    "model out of Offloader.step()."
)


#: Why torch.compile does not trace the offloader's hooks (shown in its graph-break logs,
#: and in its error under fullgraph=True).
NOT_TRACED = (
    "spillway's offloader: its hooks run as written, outside compiled graphs, and its forward "
    "hook on each block is a graph break, so that each block's activations are saved (and "
    "offloaded) when the block ends. A whole-model graph (fullgraph=True) would save them all "
    "at its end, with nothing left to offload in time: compile without fullgraph=True, or "
    "compile each block (torch.compile(block) or block.compile())."
)


def not_traced(fn: Any, recursive: bool = True) -> Any:
    """``fn`` marked for torch.compile as never traced (``recursive=False``: the functions it
    calls still are)."""
    try:
        return torch.compiler.disable(fn, recursive=recursive, reason=NOT_TRACED)
    except TypeError:  # a torch without reason=
        return torch.compiler.disable(fn, recursive=recursive)


def cuda_capturing() -> bool:
    """Whether work on the current CUDA stream is being captured into a CUDA graph (never,
    while CUDA is not initialized)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def in_cudagraph_pool(t: torch.Tensor) -> bool:
    """Whether ``t`` is an output of a CUDA graph that torch.compile manages (cudagraph
    trees: mode="reduce-overhead"). The graph's outputs, the activations it saves among
    them, live in its private memory pool; outside capture this is how they are told apart."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None or t.device.type != "cuda":
        return False
    try:
        manager = trees.get_manager(t.device.index, create_if_none_exists=False)
        return manager is not None and bool(manager._get_cuda_graph_recorded_tensor_checker()(t))
    except Exception:  # noqa: BLE001 - internals of another torch version: not a cudagraph tree
        return False


def _dtensor_class() -> Optional[type]:
    """DTensor's class, when torch.distributed.tensor is in use (imported by someone)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def split_dtensor(t: torch.Tensor) -> Tuple[torch.Tensor, Any]:
    """(local tensor, DTensor spec) of a DTensor, or (t, None) for any other tensor.

    A DTensor's memory is its local shard (a plain tensor): that is what is offloaded, and
    the spec (device mesh, placements, global shape) rebuilds the DTensor around the shard
    read back."""
    if type(t) is torch.Tensor:
        return t, None
    cls = _dtensor_class()
    if cls is not None and isinstance(t, cls):
        return t._local_tensor, t._spec
    return t, None


def join_dtensor(local: torch.Tensor, spec: Any, requires_grad: bool) -> torch.Tensor:
    """The DTensor of ``spec`` around ``local`` (no autograd history: a saved tensor)."""
    cls = _dtensor_class()
    if cls is None:  # pragma: no cover - a DTensor was saved, so its module is imported
        from torch.distributed.tensor import DTensor as cls
    return cls(local, spec, requires_grad=requires_grad)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding ``t``'s memory on this rank: a DTensor's local shard, else ``t``."""
    return split_dtensor(t)[0]
