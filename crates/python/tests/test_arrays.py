"""Arrays as the engine's memory: NumPy (``__array_interface__``), torch tensors, DLPack
producers, the buffer protocol, and (on a GPU) CUDA arrays; round trips byte for byte, the
engine keeping an offloaded array alive, and every refusal naming what to pass instead."""

import array
import gc
import os

import numpy as np
import pytest

import spillway
from test_engine import SMALL  # one set of small engine settings

torch = __import__("torch") if os.environ.get("SPILLWAY_REQUIRE_TORCH") else pytest.importorskip("torch")



@pytest.fixture
def engine(tmp_path):
    with spillway.Engine(tmp_path, capacity="64MiB", **SMALL) as e:
        yield e


def blob(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)


class DLPackOnly:
    """Exposes an array through DLPack alone (as JAX and TensorFlow arrays do)."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, stream=None):
        return self.t.__dlpack__()

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


def round_trip(engine, key, src, dst):
    h = engine.offload(key, src)
    assert engine.wait_source_released(h)
    engine.fetch(h, dst)
    engine.release(h)


def test_numpy_arrays_go_in_and_come_back(engine):
    a = blob(300_000, 1).reshape(300, 1000)
    out = np.zeros_like(a)
    round_trip(engine, (1, 0), a, out)
    np.testing.assert_array_equal(out, a)


def test_torch_tensors_go_in_and_come_back(engine):
    t = torch.arange(100_000, dtype=torch.float32).reshape(100, 1000)
    out = torch.zeros_like(t)
    round_trip(engine, (2, 0), t, out)
    assert torch.equal(out, t)
    # An offset view: its own bytes, not its storage's start.
    view = t[10:20]
    part = torch.zeros_like(view)
    round_trip(engine, (3, 0), view, part)
    assert torch.equal(part, view)


def test_a_dlpack_producer_goes_in_and_comes_back(engine):
    t = torch.arange(50_000, dtype=torch.int64)
    out = torch.zeros_like(t)
    round_trip(engine, (4, 0), DLPackOnly(t[1000:]), DLPackOnly(out[1000:]))
    assert torch.equal(out[1000:], t[1000:]) and not out[:1000].any()


def test_buffers_go_in_and_read_only_ones_are_not_fetched_into(engine):
    data = bytes(blob(70_000, 2))
    out = bytearray(len(data))
    round_trip(engine, (5, 0), data, out)
    assert bytes(out) == data
    doubles = array.array("d", range(10_000))
    back = array.array("d", bytes(80_000))
    round_trip(engine, (6, 0), memoryview(doubles), back)
    assert back == doubles
    h = engine.offload((7, 0), data)
    with pytest.raises(ValueError, match="read-only; pass a writable array"):
        engine.fetch(h, bytes(len(data)))
    ro = np.zeros(len(data), np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        engine.fetch(h, ro)
    engine.release(h)


def test_the_engine_keeps_an_offloaded_array_alive_until_it_has_read_it(engine):
    want = blob(2 << 20, 3)
    h = engine.offload((8, 0), want.copy())  # no reference kept by the caller
    gc.collect()
    np.full(2 << 20, 0x55, np.uint8)  # memory the freed array would have gone back to
    assert engine.wait_source_released(h)
    out = np.zeros_like(want)
    engine.fetch(h, out)
    np.testing.assert_array_equal(out, want)
    assert not engine._sources  # let go once read
    engine.release(h)


def test_arrays_that_cannot_be_used_are_refused_saying_what_to_pass(engine):
    a = blob(1 << 16, 4).reshape(256, 256)
    with pytest.raises(ValueError, match="not C-contiguous"):
        engine.offload((9, 0), a[:, ::2])
    with pytest.raises(ValueError, match="not contiguous; pass t.contiguous"):
        engine.offload((9, 0), torch.zeros(64, 64).t())
    with pytest.raises(TypeError, match="expected \\(address, length\\) regions or an array.*got object"):
        engine.offload((9, 0), object())

    class OnTheGpu:  # what a CUDA array of another library shows
        __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (1 << 40, False), "version": 3,
                                    "strides": None, "stream": None}

        class device:
            id = 0

    with pytest.raises(ValueError, match="in GPU memory \\(cuda:0\\), but this engine works on host memory"):
        engine.offload((9, 0), OnTheGpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA arrays: needs a CUDA GPU")
def test_cuda_arrays_of_every_protocol_round_trip_on_the_gpu(tmp_path):
    settings = {**SMALL, "device": "cuda:0"}
    with spillway.Engine(tmp_path, capacity="256MiB", **settings) as e:
        t = torch.randint(0, 1 << 30, (1 << 20,), device="cuda", dtype=torch.int32)
        for key, wrap in enumerate([lambda x: x, DLPackOnly]):
            out = torch.zeros_like(t)
            round_trip(e, (100 + key, 0), wrap(t), wrap(out))
            assert torch.equal(out, t)
        try:
            import cupy
        except ImportError:
            return
        c = cupy.arange(1 << 20, dtype=cupy.float32)
        back = cupy.zeros_like(c)
        round_trip(e, (110, 0), c, back)
        assert bool((back == c).all())
        with pytest.raises(ValueError, match="in host memory, but this engine works on GPU memory"):
            e.offload((111, 0), np.zeros(16, np.uint8))
