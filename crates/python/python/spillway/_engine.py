"""The engine as Python sees it: a thin layer over the native ``Engine`` that turns its
JSON answers into dicts and documents every setting in one place (:data:`SETTINGS`)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from . import _native
from ._arrays import array_regions, is_regions

Regions = Sequence[Tuple[int, int]]

#: Every keyword setting of :class:`Engine`: name -> (default, meaning), from the native
#: settings table (docs/settings.md lists the same, with each setting's environment
#: variable). Sizes take bytes or a string with a unit ("512MiB").
SETTINGS: Dict[str, Tuple[Any, str]] = {
    name: (default, meaning) for name, default, meaning, _env_var in _native.SETTINGS_TABLE
}


class Engine:
    """The offload engine on one device and one storage target.

    ``Engine(path, capacity=None, **settings)``. ``path`` is a directory (the data then
    lives in a new file there that is unlinked at once, so nothing is left behind even
    after a crash), a file (created if missing, kept afterwards) or a block device.
    Under a launcher (``LOCAL_RANK``, ``SLURM_LOCALID``, ``OMPI_COMM_WORLD_LOCAL_RANK``) a
    file name becomes the rank's own (``spill.bin`` → ``spill.rank1.bin``), and the
    ``rank_paths`` setting, when set, gives each rank its paths (``path`` may then be None).
    ``capacity`` is the most bytes it may store: reserved up front when given; by default
    half of the filesystem's free space, used as needed. See :data:`SETTINGS`. A setting
    not given here comes from its ``SPILLWAY_*`` environment variable, else from the TOML
    file named by ``SPILLWAY_CONFIG``, else its default (docs/settings.md).

    Memory crosses as ``(address, length)`` regions, or as one array of any library
    (torch, CuPy, JAX, NumPy…: ``__cuda_array_interface__``, ``__array_interface__``,
    ``__dlpack__`` or the buffer protocol; see :mod:`spillway._arrays`), and CUDA streams as
    raw handles (``torch.cuda.Stream.cuda_stream``). The engine reads an offloaded tensor's
    memory until :meth:`source_released` says otherwise: keep it allocated and unmodified
    until then (an array given to :meth:`offload` is kept alive by the engine until then).
    Every call releases the GIL.
    """

    def __init__(
        self,
        path: "os.PathLike[str] | str | Sequence[os.PathLike[str] | str] | None",
        capacity: "int | str | None" = None,
        **settings: Any,
    ):
        # Several paths: the engine stripes over them (``stripe_bytes`` units), each with a
        # backend of its own.
        if isinstance(path, (list, tuple)):
            path = [os.fspath(p) for p in path]
        elif isinstance(path, (str, bytes, os.PathLike)):
            path = os.fspath(path)
        self._native = _native.Engine(path, capacity, **settings)
        # Arrays given to offload, kept alive until the engine has read them.
        self._sources: Dict[int, Any] = {}

    @staticmethod
    def resolve_settings(**settings: Any) -> Dict[str, Tuple[Any, str]]:
        """The settings an ``Engine(path, **settings)`` would run with, without opening
        anything: name -> (value, source), the source being "default", "file PATH" (the
        TOML file named by ``SPILLWAY_CONFIG``), "environment variable SPILLWAY_NAME" or
        "argument". Raises ``ValueError`` as ``Engine`` would."""
        return {name: (value, source) for name, value, source in _native.resolve_settings(**settings)}

    # The data path.
    def _memory(self, what: str, memory: Any, stream: Optional[int], writable: bool):
        """``(regions, stream, keep)`` for raw regions or an array."""
        if is_regions(memory):
            return list(memory), stream, None
        a = array_regions(memory, writable=writable, engine_device=self.device, what=what)
        return a.regions, (stream if stream is not None else a.stream), a.keep

    def offload(self, key: Tuple[int, int], regions: "Regions | Any", stream: Optional[int] = None) -> int:
        """Offloads the bytes of ``regions`` (``(address, length)`` pieces, or an array)
        under ``key = (storage_id, version)`` after the work queued on ``stream`` so far (for
        a GPU array without ``stream``: its producer's stream); returns a handle at once.
        An array is kept alive until :meth:`source_released` is true."""
        storage, version = key
        regions, stream, keep = self._memory("Engine.offload", regions, stream, writable=False)
        handle = self._native.offload(storage, version, regions, stream)
        if keep is not None:
            self._sources[handle] = keep
        return handle

    def source_released(self, handle: int) -> bool:
        """True once the engine no longer reads the memory offloaded as ``handle``."""
        done = self._native.source_released(handle)
        if done:
            self._sources.pop(handle, None)
        return done

    def wait_source_released(self, handle: int) -> bool:
        """Waits until the engine no longer reads the memory offloaded as ``handle``: True.
        Returns False at once when the engine keeps reading that memory until the handle is
        released, having no copy on storage (the storage was full, the write failed, or
        every handle fetched the tensor before its write started): waiting would never end."""
        done = self._native.wait_source_released(handle)
        if done:
            self._sources.pop(handle, None)
        return done

    def prefetch(self, handle: int) -> None:
        """Starts reading ``handle``'s bytes ahead into staging memory."""
        self._native.prefetch(handle)

    def fetch(self, handle: int, regions: "Regions | Any", stream: Optional[int] = None) -> None:
        """Copies ``handle``'s bytes into ``regions`` (``(address, length)`` pieces, or a
        writable array). With ``stream``, the copy is ordered on it (after its earlier work,
        before its later work) and the call does not wait for the GPU; without, it returns
        once the bytes are in place (for a GPU array, after its producer's queued work)."""
        regions, array_stream, keep = self._memory("Engine.fetch", regions, None, writable=True)
        if stream is None and keep is not None and array_stream is not None:
            # A GPU array: after its users so far, and back only once the bytes are there.
            self._native.fetch_ahead(handle, regions, array_stream).wait(None)
            return
        self._native.fetch(handle, regions, stream)

    def fetch_ahead(self, handle: int, regions: "Regions | Any", stream: Optional[int] = None) -> Any:
        """Copies ``handle``'s bytes into ``regions`` (pieces, or a writable array) ahead of
        their use: the copy waits for the work queued on ``stream`` so far (for a GPU array
        without ``stream``: its producer's), and nothing waits for it. Returns a ``Fetched``
        whose ``wait(stream)`` orders the consumer's later work after the copy (without a
        stream: waits for it). Returns once the bytes have left storage or the host tier:
        call it from a thread of its own to overlap it with compute. Keep an array alive
        until the copy is waited for."""
        regions, stream, _ = self._memory("Engine.fetch_ahead", regions, stream, writable=True)
        return self._native.fetch_ahead(handle, regions, stream)

    def release(self, handle: int) -> None:
        """Drops a handle; the stored copy goes with its last handle."""
        self._native.release(handle)
        self._sources.pop(handle, None)

    def drain(self) -> None:
        """Waits for every accepted write."""
        self._native.drain()

    def close(self) -> None:
        """Waits for outstanding writes and frees everything; later calls raise."""
        self._native.close()
        self._sources.clear()

    # What it did.
    def stats(self) -> Dict[str, Any]:
        """Counters (bytes offloaded, written, read, deduplicated, forwarded; stall time…),
        latency percentiles per operation, and ``members``: for a list of paths, what each
        one moved (path, backend, bytes_written, bytes_read, requests, errors,
        busy_seconds), in the order given (empty for one path).

        ``faults`` is there only while the ``faults`` setting injects faults (for testing
        resilience only; ``stats().get("faults")`` is ``None`` otherwise): then it is
        ``{"plan": ..., "stats": {...}}``, ``stats`` counting over all paths the requests,
        those passed through whole, and the injected faults (``requests``, ``passed``,
        ``injected_read_errors``, ``injected_write_errors``, ``injected_enospc``,
        ``injected_short``, ``delayed``, ``bytes_written``); for a list of paths,
        ``members`` gives each path's own plan (its seed) and stats. A write that failed
        keeps its tensors in their own memory (``write_errors``); they are forwarded at
        fetch."""
        return json.loads(self._native.stats_json())

    def storage_usage(self) -> Dict[str, Any]:
        """Capacity, bytes used, free ranges and fragmentation of the storage."""
        return json.loads(self._native.storage_usage_json())

    @property
    def settings(self) -> Dict[str, Any]:
        """The settings in force."""
        return json.loads(self._native.settings_json())

    def live_handles(self) -> int:
        return self._native.live_handles()

    def staging_in_use(self) -> int:
        return self._native.staging_in_use()

    def write_trace(self, path: "os.PathLike[str] | str") -> None:
        """Writes the timeline (needs ``timeline=True``) as Chrome trace JSON."""
        self._native.write_trace(os.fspath(path))

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def backend(self) -> str:
        return self._native.backend

    @property
    def path(self) -> str:
        return self._native.path

    @property
    def capacity(self) -> int:
        return self._native.capacity

    @property
    def notes(self) -> Iterable[str]:
        return self._native.notes

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._native)
