"""Array objects as the engine's memory regions.

:meth:`spillway.Engine.offload`, :meth:`~spillway.Engine.fetch` and
:meth:`~spillway.Engine.fetch_ahead` take raw ``(address, length)`` regions, or one array
of any library that exposes its memory by a standard protocol, tried in this order:

- a ``torch.Tensor`` (its storage pointer, device and current stream);
- ``__cuda_array_interface__`` (CuPy, Numba, JAX and torch GPU arrays), version 2 or 3;
- ``__array_interface__`` (NumPy and what mimics it);
- ``__dlpack__`` (JAX, CuPy, TensorFlow, torch; the capsule is read through ctypes and kept
  alive with the array);
- the buffer protocol (``bytes``, ``bytearray``, ``memoryview``, ``array.array``).

An array must be C-contiguous (one region), on the engine's device (host memory for a
``device="host"`` engine, that GPU's memory for ``cuda:N``), and writable to be fetched
into. Anything else is refused with the reason and what to pass instead.

Streams. With no ``stream=`` given, a GPU array's producer is waited for: the stream its
interface names (``__cuda_array_interface__`` v3, torch's current stream) is passed to the
engine, and a DLPack producer is asked to make its data ready on the legacy default stream,
which the engine then follows. A host array needs no stream.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

Regions = List[Tuple[int, int]]

# DLPack device types (dlpack.h).
_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST = 1, 2, 3
# The raw handle of CUDA's legacy default stream.
_LEGACY_STREAM = 0


@dataclass
class ArrayRegions:
    """An array's memory as the engine takes it."""

    regions: Regions
    #: The raw CUDA stream its producer queued it on (None: ready now, or host memory).
    stream: Optional[int]
    #: What must stay alive while the engine uses the memory (the array, a DLPack capsule).
    keep: Any


def is_regions(obj: Any) -> bool:
    """Whether ``obj`` is a list or tuple of ``(address, length)`` pairs."""
    return isinstance(obj, (list, tuple)) and all(
        isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r) for r in obj
    )


def array_regions(obj: Any, *, writable: bool, engine_device: str, what: str) -> ArrayRegions:
    """The memory of the array ``obj``; ``what`` names the call in errors."""
    a = _describe(obj, what)
    if writable and a.readonly:
        raise ValueError(f"{what}: the array is read-only; pass a writable array to fetch into")
    if a.device != engine_device:
        raise ValueError(
            f"{what}: the array is in {_memory_name(a.device)}, but this engine works on "
            f"{_memory_name(engine_device)}: pass an array there (or open an engine with "
            f"device=\"{a.device}\")"
        )
    regions = [(a.address, a.nbytes)] if a.nbytes else []
    return ArrayRegions(regions, a.stream, (obj, a.keep))


@dataclass
class _Described:
    address: int
    nbytes: int
    device: str
    readonly: bool
    stream: Optional[int]
    keep: Any = None


def _memory_name(device: str) -> str:
    return "host memory" if device == "host" else f"GPU memory ({device})"


def _describe(obj: Any, what: str) -> _Described:
    torch = _torch_module(obj)
    if torch is not None:
        return _torch(obj, torch, what)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return _cuda_array_interface(cai, obj, what)
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None:
        return _array_interface(ai, what)
    if hasattr(obj, "__dlpack__"):
        return _dlpack(obj, what)
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"{what}: expected (address, length) regions or an array (a torch tensor, or an object with "
            f"__cuda_array_interface__, __array_interface__, __dlpack__ or the buffer protocol), "
            f"got {type(obj).__name__}"
        ) from None
    return _buffer(view, what)


def _torch_module(obj: Any):
    """torch, when ``obj`` is a torch tensor (torch is imported only then)."""
    if type(obj).__module__.split(".")[0] != "torch":
        return None
    import torch

    return torch if isinstance(obj, torch.Tensor) else None


def _torch(t: Any, torch: Any, what: str) -> _Described:
    if not t.is_contiguous():
        raise ValueError(f"{what}: the tensor is not contiguous; pass t.contiguous()")
    if t.layout != torch.strided:
        raise ValueError(f"{what}: a {t.layout} tensor has no single memory region; pass a dense (strided) tensor")
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cuda":
        stream = torch.cuda.current_stream(t.device).cuda_stream
        return _Described(t.data_ptr(), nbytes, f"cuda:{t.device.index}", False, stream)
    if t.device.type == "cpu":
        return _Described(t.data_ptr(), nbytes, "host", False, None)
    raise ValueError(f"{what}: a tensor on {t.device} is neither host nor CUDA memory")


def _c_contiguous(shape, strides, itemsize) -> bool:
    if strides is None:
        return True
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _itemsize(typestr: str) -> int:
    try:
        return int(typestr[2:])
    except (ValueError, IndexError):
        raise ValueError(f"array typestr {typestr!r}: not a plain type") from None


def _cuda_array_interface(cai: dict, obj: Any, what: str) -> _Described:
    shape, itemsize = tuple(cai["shape"]), _itemsize(cai["typestr"])
    if not _c_contiguous(shape, cai.get("strides"), itemsize):
        raise ValueError(f"{what}: the array is not C-contiguous; pass a contiguous copy")
    if cai.get("mask") is not None:
        raise ValueError(f"{what}: masked arrays are not supported; pass the data without its mask")
    address, readonly = cai["data"]
    nbytes = math.prod(shape) * itemsize
    # Version 3 names the producer's stream: 1 the legacy default, 2 the per-thread default.
    s = cai.get("stream")
    stream = None if s is None else (_LEGACY_STREAM if s == 1 else s)
    if s == 2:
        raise ValueError(f"{what}: the array's producer uses the per-thread default stream; pass stream= explicitly")
    return _Described(address, nbytes, f"cuda:{_cuda_device_of(address, obj)}", bool(readonly), stream)


def _cuda_device_of(address: int, obj: Any) -> int:
    """The ordinal of the GPU holding ``address``: from the array's ``device`` when it has
    one, else from the CUDA driver."""
    dev = getattr(obj, "device", None)
    for attr in ("id", "index"):  # CuPy: device.id; torch: device.index
        v = getattr(dev, attr, None)
        if isinstance(v, int):
            return v
    if hasattr(obj, "__dlpack_device__"):
        kind, ordinal = obj.__dlpack_device__()
        if int(kind) == _KDL_CUDA:
            return int(ordinal)
    return _driver_device_of(address)


def _driver_device_of(address: int) -> int:
    cuda = ctypes.CDLL("libcuda.so.1")
    ordinal = ctypes.c_int(-1)
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
    rc = cuda.cuPointerGetAttribute(ctypes.byref(ordinal), CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ctypes.c_uint64(address))
    if rc != 0:
        raise ValueError(f"the CUDA driver does not know the address {address:#x} (CUresult {rc})")
    return ordinal.value


def _array_interface(ai: dict, what: str) -> _Described:
    shape, itemsize = tuple(ai["shape"]), _itemsize(ai["typestr"])
    if not _c_contiguous(shape, ai.get("strides"), itemsize):
        raise ValueError(f"{what}: the array is not C-contiguous; pass a contiguous copy (numpy.ascontiguousarray)")
    if ai.get("mask") is not None:
        raise ValueError(f"{what}: masked arrays are not supported; pass the data without its mask")
    data = ai.get("data")
    if not isinstance(data, tuple):
        raise ValueError(f"{what}: the array interface gives its data as a buffer, not an address; pass regions")
    address, readonly = data
    return _Described(address, math.prod(shape) * itemsize, "host", bool(readonly), None)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


def _dlpack(obj: Any, what: str) -> _Described:
    kind, ordinal = obj.__dlpack_device__()
    kind = int(kind)
    if kind == _KDL_CUDA:
        # The producer makes the data ready on the legacy default stream, which the engine
        # then follows.
        capsule, stream, device = obj.__dlpack__(stream=1), _LEGACY_STREAM, f"cuda:{int(ordinal)}"
    elif kind in (_KDL_CPU, _KDL_CUDA_HOST):
        capsule, stream, device = obj.__dlpack__(), None, "host"
    else:
        raise ValueError(f"{what}: DLPack device type {kind} is neither host nor CUDA memory")
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    # The capsule owns the tensor until consumed: reading it leaves it unconsumed, so its
    # destructor frees it (and lets go of the producer's memory) when the capsule goes.
    t = _DLTensor.from_address(get(capsule, b"dltensor"))
    shape = [t.shape[i] for i in range(t.ndim)]
    itemsize = t.dtype.bits * t.dtype.lanes // 8
    strides = None if not t.strides else [t.strides[i] * itemsize for i in range(t.ndim)]
    if not _c_contiguous(shape, strides, itemsize):
        raise ValueError(f"{what}: the array is not C-contiguous; pass a contiguous copy")
    address = (t.data or 0) + t.byte_offset
    return _Described(address, math.prod(shape) * itemsize, device, False, stream, keep=capsule)


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def _buffer(view: memoryview, what: str) -> _Described:
    if not view.c_contiguous:
        raise ValueError(f"{what}: the buffer is not C-contiguous; pass a contiguous copy")
    # The memoryview holds the exporter's buffer for as long as it lives; its address is
    # read through the C API, which works for read-only buffers (bytes) too.
    buf = _PyBuffer()
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    PyBUF_SIMPLE = 0
    if get(view, ctypes.byref(buf), PyBUF_SIMPLE) != 0:
        raise ValueError(f"{what}: the buffer could not be read")
    try:
        address, nbytes = buf.buf or 0, buf.len
    finally:
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = [ctypes.POINTER(_PyBuffer)]
        release(ctypes.byref(buf))
    return _Described(address, nbytes, "host", bool(view.readonly), None, keep=view)
