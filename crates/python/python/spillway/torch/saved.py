"""What :class:`~spillway.torch.Offloader` keeps for each tensor autograd saves: the tensor
itself (:class:`Kept`), or what is needed to rebuild it from the engine (:class:`Stored`)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch

if TYPE_CHECKING:
    from .offloader import Offloader


class InPlaceModificationError(RuntimeError):
    """A tensor saved for backward was modified in place before backward used it."""


class Kept:
    """A saved tensor left in memory (recorded only to follow backward's progress)."""

    __slots__ = ("tensor", "segment", "__weakref__")

    def __init__(self, tensor: torch.Tensor, segment: int):
        self.tensor = tensor
        self.segment = segment


class Stored:
    """A saved tensor whose storage went to the engine: what is needed to rebuild it."""

    __slots__ = (
        "owner", "handle", "key", "nbytes", "dtype", "size", "stride", "offset",
        "version", "segment", "source", "alive", "modified", "unpacked", "kept", "dtensor", "due_ms", "__weakref__",
    )

    def __init__(self, owner: "Offloader", handle: int, key: Tuple[int, int], t: torch.Tensor, segment: int):
        self.owner = owner
        self.handle = handle
        self.key = key
        self.nbytes = t.untyped_storage().nbytes()
        self.dtype = t.dtype
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset()
        self.version = t._version
        self.segment = segment
        self.source: Optional[torch.Tensor] = t  # held until the engine has read it
        self.alive = weakref.ref(t)  # to see later in-place changes while it lives
        self.modified = False
        self.unpacked = False  # backward has had it (not prefetched again)
        self.kept = False  # the engine reads it until release (no copy on storage)
        #: (spec, requires_grad) of the DTensor whose local shard this is; None: a tensor.
        self.dtensor: Optional[Tuple[Any, bool]] = None
        #: When the plan has its write done (ms from forward's start); None: not planned.
        self.due_ms: Optional[float] = None

    def drop_source(self) -> None:
        """The engine has read the tensor: let go of it (and of its count as pending)."""
        if self.source is not None:
            self.source = None
            if self.owner is not None and not self.kept:
                self.owner._source_done(self)

    def keep_source(self) -> None:
        """The engine keeps reading the tensor until its handle is released, having no copy
        on storage (the storage was full, or the write failed): it stays held, and no
        longer counts as pending a write."""
        if self.source is not None and not self.kept:
            self.kept = True
            if self.owner is not None:
                self.owner._source_done(self)

    def check_version(self) -> None:
        t = self.source if self.source is not None else self.alive()
        if t is not None and t._version != self.version:
            self.modified = True

    def __del__(self) -> None:
        # Autograd let go of the saved tensor (after backward, or with its graph).
        owner = self.owner
        if owner is not None:
            owner._release(self)
