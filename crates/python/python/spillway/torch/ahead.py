"""Backward's reads, ahead of their use: a thread that copies offloaded tensors back into
fresh memory within a window of bytes, so that backward finds them in place (the copies
overlap compute) while GPU memory holds at most the window more than it needs."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Dict, Optional, Tuple

import torch

from .._engine import Engine


class Job:
    """One tensor's storage being copied back: the memory, and when and how it ended."""

    __slots__ = ("buf", "nbytes", "done", "fetched", "error")

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.nbytes = buf.numel()
        self.done = threading.Event()
        self.fetched: Any = None  # the engine's Fetched once the copy is under way
        self.error: Optional[BaseException] = None


class FetchAhead:
    """Copies storages back on a thread of its own, in the order asked, at most
    ``window`` bytes ahead of backward (memory handed out and not yet taken).

    The memory comes from torch's allocator on a side stream and is marked as used by the
    consumer's stream, so the copies wait for nothing and the memory is reused only after
    the consumer is done with it."""

    def __init__(self, engine: Engine, device: torch.device):
        self.engine = engine
        self.device = device
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.jobs: Dict[Tuple[int, int], Job] = {}
        self.ahead_bytes = 0  # copies started and not yet taken
        self._queue: "queue.SimpleQueue[Optional[Tuple[Job, int, int]]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, handle, stream = item
            try:
                job.fetched = self.engine.fetch_ahead(handle, [(job.buf.data_ptr(), job.nbytes)], stream)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                job.error = e
            finally:
                job.done.set()

    def start(self, key: Tuple[int, int], handle: int, nbytes: int, consumer: Any) -> None:
        """Starts copying ``handle``'s ``nbytes`` back for storage ``key``; ``consumer`` is
        the stream that will read it (None on the host)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spillway-fetch-ahead", daemon=True)
            self._thread.start()
        if self.cuda:
            with torch.cuda.stream(self.side):
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            buf.record_stream(consumer)
            stream = self.side.cuda_stream
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            stream = None
        job = Job(buf)
        self.jobs[key] = job
        self.ahead_bytes += nbytes
        self._queue.put((job, handle, stream))

    def take(self, key: Tuple[int, int], consumer: Any) -> Tuple[Optional[torch.UntypedStorage], float]:
        """The storage copied back for ``key`` (None when no copy was started), with the
        seconds the host waited for it; ``consumer``'s later work waits for the copy."""
        job = self.jobs.pop(key, None)
        if job is None:
            return None, 0.0
        self.ahead_bytes -= job.nbytes
        t0 = time.perf_counter()
        job.done.wait()
        if job.error is not None:
            raise job.error
        job.fetched.wait(consumer.cuda_stream if consumer is not None else None)
        return job.buf.untyped_storage(), time.perf_counter() - t0

    def settle(self, key: Tuple[int, int]) -> None:
        """Waits until the copy for ``key`` (if any) has stopped, and drops it: its handle
        may then be released."""
        job = self.jobs.pop(key, None)
        if job is None:
            return
        self.ahead_bytes -= job.nbytes
        job.done.wait()
        if job.fetched is not None:
            job.fetched.wait(None)

    def settle_all(self) -> None:
        """Settles every copy still held (the step ended without using them)."""
        for key in list(self.jobs):
            self.settle(key)

    def close(self) -> None:
        """Settles every copy and stops the thread."""
        self.settle_all()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
