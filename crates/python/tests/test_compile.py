"""spillway.torch under torch.compile, and CUDA graphs refused.

The offloader's hooks are never traced (torch.compiler.disable): its forward hook on each
block is a graph break, so a compiled model runs one graph per block, and AOTAutograd's
compiled function saves a block's activations (ctx.save_for_backward, through the
saved-tensor hooks) when the block's graph returns. They are offloaded block by block as
in eager mode, and a block's backward graph unpacks them when it starts. The reference for
the bitwise checks is therefore the same model compiled block by block, with no offloader
anywhere (with aot_eager this equals eager PyTorch too; with inductor, a whole-model graph
fuses across block boundaries and differs from it in the last bits, spillway or not).

CUDA graphs (torch.cuda.graph, mode="reduce-overhead") cannot work with offloading and are
refused with CudaGraphError: tested here through the probes on the CPU, and for real on a
GPU."""

import os
import re

import pytest

# The test command sets SPILLWAY_REQUIRE_TORCH=1: there, no torch is a failure, not a skip.
torch = __import__("torch") if os.environ.get("SPILLWAY_REQUIRE_TORCH") else pytest.importorskip("torch")
import spillway.torch as st  # noqa: E402
from spillway.torch import compat  # noqa: E402
from test_torch import _apply_rok, assert_bitwise_equal, gpt, gpt_batch, offloader, run_step  # noqa: E402

BACKEND = "aot_eager"  # AOTAutograd without code generation: the hooks' path, fast on CPU


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Every test compiles from nothing: compiled code is shared by models of one class."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def compile_as(model, how, **options):
    """``model`` compiled one of the ways people do."""
    if how == "torch.compile(model)":
        return torch.compile(model, **options)
    if how == "model.compile()":
        model.compile(**options)
        return model
    if how == "torch.compile(block)":
        for i, block in enumerate(model.blocks):
            model.blocks[i] = torch.compile(block, **options)
        return model
    if how == "block.compile()":
        for block in model.blocks:
            block.compile(**options)
        return model
    raise ValueError(how)


def reference(layers, data, **options):
    """Loss and gradients of the model compiled block by block, with no offloader."""
    model = compile_as(gpt("cpu", layers=layers), "torch.compile(block)", **options)
    return run_step(model, data)


def check_offloaded_block_by_block(off, blocks):
    """Each block is a segment of its own; every segment but the last (kept) offloaded."""
    segs = off._segments
    assert len(segs) == blocks + 1, [s.name for s in segs]
    for s in segs[1:-1]:
        assert s.offloaded_bytes == s.saved_bytes > 0, (s.index, s.saved_bytes, s.offloaded_bytes)
    assert segs[-1].offloaded_bytes == 0
    stats = off.stats()
    assert stats["bytes_offloaded"] > 0 and stats["bytes_written"] > 0 and stats["bytes_fetched"] > 0


def step_matches(model, data, off, want, blocks=None):
    """One offloaded step of ``model``: its loss and gradients are bitwise the reference's
    (``want``: loss, gradients), and with ``blocks``, each block was offloaded as a segment."""
    loss, g = run_step(model, data, off.step())
    assert torch.equal(loss, want[0])
    assert_bitwise_equal(g, want[1])
    if blocks is not None:
        check_offloaded_block_by_block(off, blocks)


HOWS = ["torch.compile(model)", "model.compile()", "torch.compile(block)", "block.compile()"]


@pytest.mark.parametrize("how", HOWS)
def test_a_compiled_model_offloads_block_by_block_with_gradients_bitwise_equal(tmp_path, how):
    data = gpt_batch("cpu", n=4)
    loss0, g0 = reference(3, data, backend=BACKEND)
    eager_loss, eager_g = run_step(gpt("cpu", layers=3), data)
    assert torch.equal(loss0, eager_loss)
    assert_bitwise_equal(g0, eager_g)
    with offloader(gpt("cpu", layers=3), tmp_path / "eager") as off:
        run_step(off.model, data, off.step())
        eager_offloaded = off.stats()["last_step"]["offloaded_bytes"]

    model = gpt("cpu", layers=3)
    with offloader(model, tmp_path) as off:
        compiled = compile_as(model, how, backend=BACKEND)
        for _ in range(3):
            step_matches(compiled, data, off, (loss0, g0), blocks=3)
        # The memory cut: the activations of every block but the last, as in eager mode.
        assert off.stats()["last_step"]["offloaded_bytes"] >= 0.9 * eager_offloaded


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_inductor_compiled_model_trains_bitwise_with_its_activations_offloaded(tmp_path, mode):
    data = gpt_batch("cpu", n=2)
    loss0, g0 = reference(2, data, mode=mode)
    model = gpt("cpu", layers=2)
    with offloader(model, tmp_path) as off:
        compiled = torch.compile(model, mode=mode)
        for _ in range(2):
            step_matches(compiled, data, off, (loss0, g0), blocks=2)


def test_a_model_compiled_before_the_offloader_is_refused_at_the_first_step(tmp_path):
    data = gpt_batch("cpu", n=2)
    loss0, g0 = reference(2, data, backend=BACKEND)
    torch.compiler.reset()
    model = gpt("cpu", layers=2)
    compiled = torch.compile(model, backend=BACKEND)
    run_step(compiled, data)  # compiled now, without the offloader's hooks
    with offloader(model, tmp_path) as off:
        with pytest.raises(RuntimeError, match=re.escape("torch.compiler.reset()")) as err:
            run_step(compiled, data, off.step())
        assert "none of the 2 modules" in str(err.value) and "(Block)" in str(err.value)
        # What the message says to do.
        torch.compiler.reset()
        step_matches(compiled, data, off, (loss0, g0), blocks=2)


def test_fullgraph_is_refused_by_torch_compile_with_the_reason(tmp_path):
    model = gpt("cpu", layers=2)
    with offloader(model, tmp_path) as off:
        compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
        with pytest.raises(Exception, match="spillway's offloader") as err:
            run_step(compiled, gpt_batch("cpu", n=2), off.step())
        assert "compile each block" in str(err.value)


def test_blocks_compiled_with_fullgraph_before_the_offloader_train_bitwise(tmp_path):
    data = gpt_batch("cpu", n=2)
    loss0, g0 = reference(2, data, backend=BACKEND)
    model = compile_as(gpt("cpu", layers=2), "torch.compile(block)", backend=BACKEND, fullgraph=True)
    with offloader(model, tmp_path) as off:  # its hooks are on the compiled blocks, outside them
        step_matches(model, data, off, (loss0, g0), blocks=2)


def test_planned_offload_and_recompute_under_compile_keep_gradients_bitwise(tmp_path):
    data = gpt_batch("cpu", n=4)
    loss0, g0 = reference(3, data, backend=BACKEND)
    model = gpt("cpu", layers=3)
    with offloader(model, tmp_path, policy="adaptive") as off:
        compiled = torch.compile(model, backend=BACKEND)
        run_step(compiled, data, off.step())  # counts what each segment saves
        saved = [list(s.tensors) for s in off._segments]
        assert len(saved) == 4 and all(len(t) > 2 for t in saved[1:]), saved
        # Segment 1: its first and third tensors; block 1 (segment 2) recomputed, its input
        # offloaded; segment 3: its first tensor.
        for _ in range(2):
            # Given before each step: a step that stalls on a busy machine would otherwise be
            # planned again from measured bandwidths, and this test is about the plan given.
            _apply_rok(off, {(1, 0), (1, 2), (2, -1), (3, 0)}, {2})
            loss, g = run_step(compiled, data, off.step())
            segs = off._segments
            assert segs[1].offloaded_bytes == saved[1][0] + saved[1][2]
            assert segs[2].saved_bytes == segs[2].input_bytes == segs[2].offloaded_bytes > 0
            assert segs[3].offloaded_bytes == saved[3][0]
            assert torch.equal(loss, loss0)
            assert_bitwise_equal(g, g0)


# -- CUDA graphs --------------------------------------------------------------------------


def test_a_step_begun_during_cuda_graph_capture_is_refused(tmp_path, monkeypatch):
    model = gpt("cpu", layers=2)
    with offloader(model, tmp_path) as off:
        monkeypatch.setattr(compat, "cuda_capturing", lambda: True)
        with pytest.raises(st.CudaGraphError, match="while a CUDA graph is being captured") as err:
            with off.step():
                pass
        assert 'mode="max-autotune-no-cudagraphs"' in str(err.value)
        assert not off._active


def test_a_save_or_a_use_during_capture_is_refused(tmp_path, monkeypatch):
    model, data = gpt("cpu", layers=2), gpt_batch("cpu", n=2)
    capturing = [False]
    monkeypatch.setattr(compat, "cuda_capturing", lambda: capturing[0])
    with offloader(model, tmp_path) as off:
        # Capture begins inside the step: the first save is refused.
        with pytest.raises(st.CudaGraphError, match="saved for backward"):
            with off.step():
                capturing[0] = True
                model(*data)
        capturing[0] = False
        # Capture of backward: the first use of a saved tensor is refused.
        with pytest.raises(st.CudaGraphError, match="being captured"):
            with off.step():
                loss = model(*data)
                capturing[0] = True
                loss.backward()
        capturing[0] = False
        del loss
        # Outside capture, steps train as before: the refused steps changed nothing.
        loss0, g0 = run_step(gpt("cpu", layers=2), data)
        step_matches(model, data, off, (loss0, g0), blocks=2)


def test_a_tensor_of_a_cuda_graph_pool_is_refused(tmp_path, monkeypatch):
    model, data = gpt("cpu", layers=2), gpt_batch("cpu", n=2)
    monkeypatch.setattr(compat, "in_cudagraph_pool", lambda t: True)
    with offloader(model, tmp_path) as off:
        with pytest.raises(st.CudaGraphError, match='mode="reduce-overhead"') as err:
            run_step(model, data, off.step())
        assert "private memory pool" in str(err.value)
        assert off.stats()["offloaded_tensors"] == 0


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs, inductor on the GPU)")


@CUDA
def test_real_cuda_graph_capture_is_refused(tmp_path):
    model, data = gpt("cuda", layers=2), gpt_batch("cuda", n=2)
    with offloader(model, tmp_path) as off:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graph needs
            run_step(model, data)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(st.CudaGraphError, match="being captured"):
            with torch.cuda.graph(graph):
                with off.step():
                    model(*data)
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(st.CudaGraphError, match="saved for backward"):
            with off.step():
                with torch.cuda.graph(graph):
                    model(*data)
        assert off.stats()["offloaded_tensors"] == 0


@CUDA
def test_reduce_overhead_is_refused_and_never_trains_wrong(tmp_path):
    data = gpt_batch("cuda", n=2)
    model = gpt("cuda", layers=2)
    with offloader(model, tmp_path) as off:
        compiled = torch.compile(model, mode="reduce-overhead")
        with pytest.raises(st.CudaGraphError, match="private memory pool"):
            for _ in range(3):  # warm-up, recording, replay
                run_step(compiled, data, off.step())


@CUDA
def test_inductor_on_the_gpu_offloads_block_by_block_bitwise(tmp_path):
    data = gpt_batch("cuda", n=8)
    model = compile_as(gpt("cuda", layers=3), "torch.compile(block)")
    loss0, g0 = run_step(model, data)
    model = gpt("cuda", layers=3)
    with offloader(model, tmp_path) as off:
        compiled = torch.compile(model)
        for _ in range(3):
            step_matches(compiled, data, off, (loss0, g0), blocks=3)
