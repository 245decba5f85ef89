"""Saved tensors rebuilt in backward instead of kept or moved.

Many of the bytes a decoder block saves are made by one cheap operation from tensors that
are saved anyway: a layer norm's output (from its input, saved by the norm itself), a
GELU's or SiLU's output (from its input, saved by the activation), a contiguous copy (from
its source). Moving such a tensor costs its bytes over PCIe or storage; making it again in
backward costs one pass over memory at HBM speed, a few hundred microseconds at the
largest sizes. This is recompute at the granularity of one tensor: the planner chooses
it per tensor where it frees memory for less than moving the bytes would cost.

:class:`Producers` watches forward (a ``TorchDispatchMode``, so it sees the operations
themselves, whatever module or function called them) and notes, for every output of a
cheap operation, how it was made, referring to its inputs weakly. When autograd saves such
an output, :meth:`Producers.recipe` turns the note into a :class:`Recipe` whose inputs are
the *saved* forms of its input tensors (kept, offloaded, or rebuilt themselves), or, for
parameters and tensors too small to offload, the tensors themselves. A recipe exists only
where every input will still be there in backward, unchanged; anything else is kept or
offloaded as planned. The operation is run again with the same inputs on the same device,
so the rebuilt tensor is bitwise the one saved.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

_aten = torch.ops.aten

#: Operations rebuilt beside the pointwise ones (which torch tags as such): cheap ones
#: whose output is as large as their input or smaller.
_CHEAP = {
    _aten.native_layer_norm.default,
    _aten.clone.default,
    _aten._to_copy.default,
    _aten.mean.dim,
}
for _name in ("_fused_rms_norm", "rms_norm"):
    _op = getattr(_aten, _name, None)
    if _op is not None and hasattr(_op, "default"):
        _CHEAP.add(_op.default)


def is_cheap(func: Any) -> bool:
    """Whether ``func`` (an ATen overload) is one that a tensor may be rebuilt with: cheap,
    deterministic, writing nothing it was given."""
    schema = func._schema
    if schema.is_mutable or any(a.alias_info is not None for a in schema.returns):
        return False  # in place, or a view of an input
    tags = func.tags
    if torch.Tag.nondeterministic_seeded in tags or torch.Tag.nondeterministic_bitwise in tags:
        return False  # random (dropout), or not the same bits twice
    return torch.Tag.pointwise in tags or func in _CHEAP


class _Clock:
    """A point in time on the host with a CUDA event's interface (CPU tensors' operations
    run as they are called)."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, later: "_Clock") -> float:
        return (later.t - self.t) * 1e3


def _marks(device: torch.device) -> Tuple[Any, Any]:
    """A (start, end) pair of timing marks for an operation on ``device``."""
    if device.type == "cuda":
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    return _Clock(), _Clock()


class _Input:
    """One large tensor argument of a noted operation: referred to weakly until autograd
    saves it, then bound to the offloader's record of it (which outlives the tensor when
    the tensor is offloaded)."""

    __slots__ = ("storage", "version", "ptr", "dtype", "shape", "stride", "offset", "saved")

    def __init__(self, t: torch.Tensor):
        st = t.untyped_storage()
        self.storage = weakref.ref(st)  # torch keeps one Python object per live storage
        self.version = t._version
        self.ptr = st.data_ptr()
        self.dtype = t.dtype
        self.shape = t.shape
        self.stride = t.stride()
        self.offset = t.storage_offset()
        self.saved: Optional[weakref.ref] = None

    def bind(self, storage: torch.UntypedStorage, version: int, saved: Any) -> bool:
        """Binds to ``saved``, the record of a tensor of ``storage`` saved at ``version``,
        if that is this input's storage as the operation read it."""
        if self.storage() is not storage or version != self.version:
            return False
        self.saved = weakref.ref(saved)
        return True

    def view(self, storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
        """The input as the operation took it, over ``storage``."""
        out = torch.empty(0, dtype=self.dtype, device=device)
        return out.set_(storage, self.offset, self.shape, self.stride)


class Fixed:
    """An input held as it is, with its version when used (None: not checked). A
    parameter is held by reference (optimizers change it after backward; FSDP2 gathers
    it again keeping its version), and a change before backward is an error there, as
    autograd's own. A buffer or a tensor below the offload size is held in a recipe as a
    copy taken when its output is saved: a buffer that forward updates in place later
    (running statistics, say) does not change what backward rebuilds."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: Optional[int]):
        self.tensor = tensor
        self.version = version  # None: a parameter, not checked


class _Made:
    """How one output of a cheap operation was made (noted in forward)."""

    __slots__ = ("func", "spec", "leaves", "index", "out", "version", "dtype", "shape", "stride", "offset", "nbytes", "events")

    def __init__(self, func: Any, spec: Any, leaves: List[Any], index: Optional[int], out: torch.Tensor, events: Any):
        self.func = func
        self.spec = spec
        self.leaves = leaves
        self.index = index  # which output of a tuple (None: the only one)
        self.out = weakref.ref(out.untyped_storage())
        self.version = out._version
        self.dtype = out.dtype
        self.shape = out.shape
        self.stride = out.stride()
        self.offset = out.storage_offset()
        self.nbytes = out.untyped_storage().nbytes()
        self.events = events  # (start, end) CUDA events in a measured step


class SavedRef:
    """A recipe's input that autograd saved too: the offloader's record of it (kept,
    offloaded or rebuilt), and the view of its storage that the operation took."""

    __slots__ = ("saved", "input")

    def __init__(self, saved: Any, inp: _Input):
        self.saved = saved
        self.input = inp

    def view(self, storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
        return self.input.view(storage, device)


class Recipe:
    """How to make a saved tensor's storage again: an operation and its inputs, each a
    :class:`Fixed` tensor, a :class:`SavedRef`, or a plain value."""

    __slots__ = ("func", "spec", "leaves", "index", "dtype", "shape", "stride", "offset", "nbytes", "events")

    def __init__(self, made: _Made, leaves: List[Any]):
        self.func = made.func
        self.spec = made.spec
        self.leaves = leaves
        self.index = made.index
        self.dtype = made.dtype
        self.shape = made.shape
        self.stride = made.stride
        self.offset = made.offset
        self.nbytes = made.nbytes
        self.events = made.events

    def run(self, value: Callable[[Any], torch.Tensor]) -> torch.UntypedStorage:
        """Runs the operation again, each input given by ``value`` (of a :class:`Fixed` or
        :class:`SavedRef`); returns the storage of its output, laid out as the first time."""
        leaves = [value(x) if isinstance(x, (Fixed, SavedRef)) else x for x in self.leaves]
        args, kwargs = tree_unflatten(leaves, self.spec)
        with torch.no_grad():
            out = self.func(*args, **kwargs)
        if self.index is not None:
            out = out[self.index]
        if out.dtype != self.dtype or out.shape != self.shape:
            raise RuntimeError(
                f"spillway rebuilt a saved tensor with {self.func} and got {out.dtype} {tuple(out.shape)}, "
                f"not the {self.dtype} {tuple(self.shape)} it saved; pass recompute=False to the Offloader "
                "to keep such tensors instead"
            )
        if out.stride() != self.stride or out.storage_offset() != self.offset or out.untyped_storage().nbytes() != self.nbytes:
            laid = torch.empty(self.nbytes // self.dtype.itemsize, dtype=self.dtype, device=out.device)
            laid = laid.as_strided(self.shape, self.stride, self.offset)
            laid.copy_(out)
            out = laid
        return out.untyped_storage()


class Producers(TorchDispatchMode):
    """Notes how each output of a cheap operation was made while ``recording`` (forward of
    a step), by the address of its storage; :meth:`recipe` makes a :class:`Recipe` of a
    note when its output is saved. Large inputs are referred to weakly until autograd saves
    them (:meth:`saved`); notes hold only parameters and small inputs alive."""

    def __init__(self, device: torch.device, min_bytes: int, is_param: Callable[[torch.Tensor], bool]):
        super().__init__()
        self.device = device
        self.min_bytes = min_bytes
        self.is_param = is_param
        self.recording = False
        self.timing = False  # a measured step: each noted operation is timed
        self.notes: Dict[int, _Made] = {}
        # Large inputs not yet saved, by storage address; and what was saved, by address:
        # (storage, record, version), the first two referred to weakly.
        self._waiting: Dict[int, List[_Input]] = {}
        self._saved: Dict[int, Tuple[weakref.ref, weakref.ref, int]] = {}
        self._cheap: Dict[Any, bool] = {}

    def clear(self) -> None:
        self.notes, self._waiting, self._saved = {}, {}, {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.recording:
            return func(*args, **kwargs)
        cheap = self._cheap.get(func)
        if cheap is None:
            cheap = self._cheap[func] = is_cheap(func)
        if not cheap:
            return func(*args, **kwargs)
        events = None
        if self.timing:
            events = _marks(self.device)
            events[0].record()
        out = func(*args, **kwargs)
        if events is not None:
            events[1].record()
        self._note(func, args, kwargs, out, events)
        return out

    def _plain(self, t: Any) -> bool:
        return type(t) is torch.Tensor and t.device == self.device and t.layout == torch.strided

    def _note(self, func: Any, args: Any, kwargs: Any, out: Any, events: Any) -> None:
        if isinstance(out, torch.Tensor):
            outs: List[Tuple[Optional[int], Any]] = [(None, out)]
        elif isinstance(out, (tuple, list)):
            outs = list(enumerate(out))
        else:
            return
        big = [(i, o) for i, o in outs if self._plain(o) and o.untyped_storage().nbytes() >= self.min_bytes]
        if not big:
            return
        leaves, spec = tree_flatten((args, kwargs))
        noted: List[Any] = []
        for x in leaves:
            if not isinstance(x, torch.Tensor):
                noted.append(x)
            elif isinstance(x, torch.nn.Parameter):
                noted.append(Fixed(x, x._version))  # there in backward
            elif not self._plain(x):
                return  # a tensor subclass or another device: not rebuilt
            elif self.is_param(x) or x.untyped_storage().nbytes() < self.min_bytes:
                noted.append(Fixed(x, x._version))  # a buffer, or small: copied if saved
            else:
                inp = _Input(x)
                known = self._saved.get(inp.ptr)
                st, rec = (known[0](), known[1]()) if known is not None else (None, None)
                if st is None or rec is None or not inp.bind(st, known[2], rec):
                    self._waiting.setdefault(inp.ptr, []).append(inp)
                noted.append(inp)
        for i, o in big:
            self.notes[o.untyped_storage().data_ptr()] = _Made(func, spec, noted, i, o, events)

    def saved(self, t: torch.Tensor, record: Any) -> None:
        """Autograd saved ``t`` as the offloader's ``record``: inputs of noted operations
        that are ``t``'s storage now refer to it."""
        if not self.recording:
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        waiting = [inp for inp in self._waiting.pop(ptr, ()) if not inp.bind(st, t._version, record)]
        if waiting:
            self._waiting[ptr] = waiting  # another version of the storage: saved later, maybe
        self._saved[ptr] = (weakref.ref(st), weakref.ref(record), t._version)

    def recipe(self, t: torch.Tensor) -> Optional[Recipe]:
        """A recipe for ``t``'s storage, or None where it cannot be rebuilt: not made by a
        noted operation, changed since, or an input that backward will not have."""
        st = t.untyped_storage()
        made = self.notes.get(st.data_ptr())
        if made is None:
            return None
        if made.out() is not st or made.nbytes != st.nbytes():
            return None  # another storage at the same address
        if t._version != made.version:
            return None  # changed in place after it was made
        leaves: List[Any] = []
        for x in made.leaves:
            if isinstance(x, _Input):
                rec = x.saved() if x.saved is not None else None
                if rec is None:
                    return None  # not saved by autograd (or let go since)
                leaves.append(SavedRef(rec, x))
            elif isinstance(x, Fixed):
                if x.tensor._version != x.version:
                    return None  # changed since it was used
                if isinstance(x.tensor, torch.nn.Parameter):
                    leaves.append(x)
                elif x.tensor.untyped_storage().nbytes() < self.min_bytes:
                    leaves.append(Fixed(x.tensor.clone(), None))
                else:
                    return None  # a large buffer: not copied
            else:
                leaves.append(x)
        return Recipe(made, leaves)


def elapsed_ms(events: Any) -> Optional[float]:
    """Milliseconds between a noted operation's (start, end) events (None: not timed)."""
    if events is None:
        return None
    start, end = events
    return start.elapsed_time(end)


class Rebuilt:
    """A saved tensor to be rebuilt in backward from its recipe (what autograd holds)."""

    __slots__ = ("recipe", "dtype", "size", "stride", "offset", "segment", "version", "__weakref__")

    def __init__(self, recipe: Recipe, t: torch.Tensor, segment: int):
        self.recipe = recipe
        self.dtype = t.dtype
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset()
        self.segment = segment
        self.version = t._version


def check_fixed(x: Fixed) -> torch.Tensor:
    """The tensor of a fixed input, unchanged since forward (else a clear error)."""
    from .saved import InPlaceModificationError

    if x.version is not None and x.tensor._version != x.version:
        raise InPlaceModificationError(
            "a parameter that spillway needs to rebuild a saved activation in backward (of shape "
            f"{tuple(x.tensor.shape)}) was modified in place between forward and backward; avoid the "
            "in-place change before backward, or pass recompute=False to the Offloader"
        )
    return x.tensor


