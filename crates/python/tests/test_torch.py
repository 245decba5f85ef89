"""spillway.torch: every behaviour the PyTorch integration promises, checked against plain
PyTorch. Runs where torch is importable: on CPU tensors through the host engine, and on
the GPU when there is one (the GPU suite). Gradients must be bitwise equal to the
baseline's (deterministic algorithms)."""

import dataclasses
import os
import pathlib
import sys

import pytest

# The test command sets SPILLWAY_REQUIRE_TORCH=1: there, no torch is a failure, not a skip.
torch = __import__("torch") if os.environ.get("SPILLWAY_REQUIRE_TORCH") else pytest.importorskip("torch")
import spillway  # noqa: E402
import spillway.torch as st  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "benches"))
from train_gpt import GPT, GPTConfig  # noqa: E402

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
torch.use_deterministic_algorithms(True)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Small engine so that packing, staging backpressure and prefetch all happen.
# One file per directory, whatever filesystem holds the test's temporary directory.
SETTINGS = dict(staging_bytes="16MiB", prefetch_bytes="8MiB", pack_extent_bytes="2MiB", pack_threshold="1MiB",
                spread_files=1)


def offloader(model, tmp_path, **kw):
    opts = dict(policy="all", min_tensor_bytes=64 << 10, keep_last=1)
    opts.update(kw)
    return st.Offloader(model, str(tmp_path), capacity="1GiB", **{**SETTINGS, **opts})


def gpt(device, layers=4):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=64, n_layer=layers, n_head=4, d_model=128)
    return GPT(cfg, device=device)


def gpt_batch(device, n=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (n, 64), generator=g)
    y = torch.randint(0, 512, (n, 64), generator=g)
    return x.to(device), y.to(device)


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(
            *[
                torch.nn.Sequential(
                    torch.nn.Conv2d(3 if i == 0 else 32, 32, 3, padding=1),
                    torch.nn.BatchNorm2d(32),
                    torch.nn.ReLU(),
                )
                for i in range(4)
            ]
        )
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x, y):
        h = self.blocks(x).mean((2, 3))
        return torch.nn.functional.cross_entropy(self.head(h), y)


def cnn(device):
    torch.manual_seed(0)
    return CNN().to(device)


def cnn_batch(device):
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (16,), generator=g).to(device)


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def run_step(model, batch, ctx=None):
    model.zero_grad(set_to_none=True)
    if ctx is None:
        loss = model(*batch)
        loss.backward()
    else:
        with ctx:
            loss = model(*batch)
            loss.backward()
    return loss.detach(), grads(model)


def assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"gradient {i} differs (max abs diff {(x - y).abs().max().item()})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make, batch", [(gpt, gpt_batch), (cnn, cnn_batch)], ids=["gpt", "cnn"])
def test_gradients_are_bitwise_equal_to_the_baseline(tmp_path, device, make, batch):
    model, data = make(device), batch(device)
    loss0, g0 = run_step(model, data)
    with offloader(model, tmp_path) as off:
        for _ in range(3):
            loss, g = run_step(model, data, off.step())
            assert torch.equal(loss, loss0)
            assert_bitwise_equal(g, g0)
        s = off.stats()
    assert s["offloaded_tensors"] > 0 and s["bytes_offloaded"] > 0
    assert s["bytes_fetched"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_buffers_and_their_views_are_never_offloaded(tmp_path, device):
    model = gpt(device)
    data = gpt_batch(device)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_storages |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    off = offloader(model, tmp_path, min_tensor_bytes=0)
    seen = []
    real = off.engine.offload

    def spy(key, regions, stream=None):
        seen.extend(ptr for ptr, _ in regions)
        return real(key, regions, stream)

    off.engine.offload = spy
    run_step(model, data, off.step())
    assert seen, "something was offloaded"
    assert not param_storages & set(seen), "a parameter's storage was offloaded"
    off.close()


@pytest.mark.parametrize("device", DEVICES)
def test_views_of_one_storage_are_stored_once_and_restored_as_views(tmp_path, device):
    torch.manual_seed(3)
    w = torch.randn(256, 256, device=device, requires_grad=True)
    model = torch.nn.Linear(1, 1).to(device)  # only for the offloader's bookkeeping

    def f(w):
        base = w * 3  # one storage, saved through several views
        a = base[:, :128]
        b = base.t()
        c = base[64:192]
        return (a.sin() * 2).sum() + (b.cos() * 3).sum() + (c.sin() * 5).sum() + base.cos().sum()

    f(w).backward()
    g0 = w.grad.clone()
    w.grad = None
    with offloader(model, tmp_path, keep_last=0, min_tensor_bytes=1024) as off:
        with off.step():
            f(w).backward()
        s = off.stats()
    assert torch.equal(w.grad, g0)
    # base (256 KiB) is saved four times as views: written once, deduplicated thrice.
    assert s["bytes_deduplicated"] >= 3 * 256 * 256 * 4
    assert s["bytes_written"] < 2 * 256 * 256 * 4 + (1 << 20)


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_modification_after_save_raises(tmp_path, device):
    model = torch.nn.Linear(1, 1).to(device)
    x = torch.randn(512, 512, device=device, requires_grad=True)
    with offloader(model, tmp_path, keep_last=0, min_tensor_bytes=1024) as off:
        with pytest.raises(st.InPlaceModificationError, match="modified in place"):
            with off.step():
                b = x * 2
                c = b.sin()  # saves b
                b.add_(1)  # and now b is not what was saved
                c.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_producer_and_consumer_streams_are_followed(tmp_path):
    model = torch.nn.Linear(1, 1).cuda()
    x = torch.randn(1024, 1024, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with offloader(model, tmp_path, keep_last=0, min_tensor_bytes=1024) as off:
        with torch.cuda.stream(side):
            with off.step():
                torch.cuda._sleep(200_000_000)  # the stream is busy a while before y exists
                y = x * 3  # saved by sin()
                loss = y.sin().sum()
                loss.backward()
        torch.cuda.current_stream().wait_stream(side)
        assert off.stats()["offloaded_tensors"] == 1
    assert torch.equal(x.grad, torch.cos(x.detach() * 3) * 3)


@pytest.mark.parametrize("device", DEVICES)
def test_small_tensors_and_tensors_of_other_devices_stay_in_memory(tmp_path, device):
    model = torch.nn.Linear(1, 1).to(device)
    small = torch.randn(16, 16, device=device, requires_grad=True)
    big = torch.randn(512, 512, device=device, requires_grad=True)
    other = "cuda" if device == "cpu" and torch.cuda.is_available() else "cpu"
    foreign = torch.randn(512, 512, device=other, requires_grad=True) if other != device else None
    with offloader(model, tmp_path, keep_last=0, min_tensor_bytes=64 << 10) as off:
        with off.step():
            loss = small.sin().sum() + big.sin().sum()
            if foreign is not None:
                loss = loss + foreign.sin().sum().to(device)
            loss.backward()
        s = off.stats()
    assert s["offloaded_tensors"] == 1, s  # big only
    assert s["bytes_offloaded"] == 512 * 512 * 4


@pytest.mark.parametrize("device", DEVICES)
def test_backward_copies_back_ahead_and_the_last_segment_stays(tmp_path, device):
    model, data = gpt(device, layers=6), gpt_batch(device)
    with offloader(model, tmp_path, keep_last=2, prefetch_segments=2) as off:
        run_step(model, data, off.step())
        run_step(model, data, off.step())
        s = off.stats()
    e = s["engine"]
    # Backward finds every offloaded tensor copied back ahead of its use (the window holds
    # the model's largest tensors twice over).
    assert s["bytes_fetched_ahead"] == s["bytes_fetched"] > 0, s
    # Every stored byte is read back once: views share one fetch, nothing is read ahead twice.
    # (On a busy machine backward may copy a tensor back before its write has finished: it
    # is then forwarded from its own memory, and its extent is not read.)
    assert e["bytes_read"] <= e["bytes_written"], e
    assert e["bytes_read"] == e["bytes_written"] or e["forwarded_fetches"] > 0, e
    assert s["bytes_fetched"] == s["bytes_offloaded"], s
    last = s["last_step"]
    assert last["kept_bytes"] > 0 and last["offloaded_bytes"] > 0
    assert s["policy"]["offloaded_segments"] == s["policy"]["segments"] - 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 256 << 10])
def test_backward_copies_back_within_the_window_and_gradients_stay_bitwise(tmp_path, device, window):
    # The bytes copied back ahead of use never pass the window (beyond a single tensor that
    # is larger than it), whatever its size, and gradients stay bitwise equal.
    model, data = gpt(device, layers=6), gpt_batch(device)
    loss0, g0 = run_step(model, data)
    with offloader(model, tmp_path, fetch_ahead_bytes=window, run_ahead=1) as off:
        seen = []
        start = off._ahead.start

        def start_and_note(key, handle, nbytes, consumer):
            if off._ahead.ahead_bytes > 0:
                assert off._ahead.ahead_bytes + nbytes <= window
            start(key, handle, nbytes, consumer)
            seen.append(off._ahead.ahead_bytes)

        off._ahead.start = start_and_note
        for _ in range(2):
            loss, g = run_step(model, data, off.step())
            assert torch.equal(loss, loss0)
            assert_bitwise_equal(g, g0)
        s = off.stats()
    # With a window of one byte, one tensor at a time (the check in start_and_note).
    assert seen and s["bytes_fetched_ahead"] > 0, s


def test_bad_fetch_ahead_and_run_ahead_are_refused(tmp_path):
    model = gpt("cpu")
    with pytest.raises(ValueError, match="fetch_ahead_bytes must be positive"):
        st.Offloader(model, str(tmp_path), fetch_ahead_bytes=0)
    with pytest.raises(ValueError, match="run_ahead must be >= 0"):
        st.Offloader(model, str(tmp_path), run_ahead=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_retain_graph_and_a_second_backward(tmp_path, device):
    model, data = gpt(device), gpt_batch(device)
    model.zero_grad(set_to_none=True)
    loss = model(*data)
    loss.backward(retain_graph=True)
    loss.backward()
    g0 = grads(model)
    model.zero_grad(set_to_none=True)
    with offloader(model, tmp_path) as off:
        with off.step():
            loss = model(*data)
            loss.backward(retain_graph=True)
            loss.backward()
        assert_bitwise_equal(grads(model), g0)
        del loss
        assert off.engine.live_handles() == 0, "the graph is gone, and with it every handle"


@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing_composes(tmp_path, device):
    model, data = gpt(device), gpt_batch(device)
    model.gradient_checkpointing = True
    _, g0 = run_step(model, data)
    with offloader(model, tmp_path, min_tensor_bytes=1024) as off:
        _, g = run_step(model, data, off.step())
        assert_bitwise_equal(g, g0)
        assert off.stats()["offloaded_tensors"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_no_memory_or_storage_leaks_over_100_steps(tmp_path, device):
    model, data = gpt(device, layers=2), gpt_batch(device, n=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with offloader(model, tmp_path) as off:
        for i in range(100):
            with off.step():
                loss = model(*data)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == 9 and device == "cuda":
                torch.cuda.synchronize()
                mem10 = torch.cuda.memory_allocated()
        del loss
        off.engine.drain()
        assert off.engine.live_handles() == 0
        assert off.engine.storage_usage()["used"] == 0, off.engine.storage_usage()
        assert off.stats()["steps"] == 100
        if device == "cuda":
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() <= mem10


@pytest.mark.parametrize("device", DEVICES)
def test_the_adaptive_policy_profiles_then_reports_its_choice(tmp_path, device):
    model, data = gpt(device), gpt_batch(device)
    _, g0 = run_step(model, data)
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=32 << 20) as off:
        _, g = run_step(model, data, off.step())
        first = off.stats()
        assert first["offloaded_tensors"] == 0, "the first step only measures"
        _, g = run_step(model, data, off.step())
        assert_bitwise_equal(g, g0)
        p = off.stats()["policy"]
    assert p["mode"] == "adaptive" and p["reason"] and p["segments"] == len(model.blocks) + 1
    # The plan touches (offloads from, or recomputes) some of the segments, and says why.
    assert 0 <= p["offloaded_segments"] <= p["segments"]
    assert p["write_gbps"] > 0 and p["forward_ms"] > 0 and p["backward_ms"] > 0
    summary = p["plan_summary"]
    assert summary["goal"] == "adaptive" and summary["reason"] == p["reason"]
    assert summary["predicted_extra_ms"] >= 0


def test_bad_options_are_refused(tmp_path):
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="policy"):
        st.Offloader(model, str(tmp_path), policy="sometimes")
    with pytest.raises(ValueError, match="no storage path given.*rank_paths"):
        st.Offloader(model)
    with pytest.raises(ValueError, match="keep_last"):
        st.Offloader(model, str(tmp_path), keep_last=-1)
    off = st.Offloader(model, str(tmp_path), capacity="1MiB", **SETTINGS)
    with off.step():
        with pytest.raises(RuntimeError, match="do not nest"):
            with off.step():
                pass
    off.close()
    with pytest.raises(RuntimeError, match="closed"):
        with off.step():
            pass


def test_the_one_call_form_keeps_its_offloader(tmp_path):
    model = gpt("cpu")
    data = gpt_batch("cpu")
    _, g0 = run_step(model, data)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with st.offload(model, str(tmp_path), capacity="256MiB", policy="all", min_tensor_bytes=1024, **SETTINGS) as ctx:
            model(*data).backward()
        assert_bitwise_equal(grads(model), g0)
    assert ctx.stats()["steps"] == 2
    ctx.close()


@pytest.mark.parametrize("device", DEVICES)
def test_max_pending_bytes_bounds_the_memory_held_for_writes(tmp_path, device):
    model, data = gpt(device), gpt_batch(device)
    _, g0 = run_step(model, data)
    limit = 1 << 20
    with offloader(model, tmp_path, max_pending_bytes=limit) as off:
        peak = [0]
        real = off._bound_pending

        def watch():
            real()
            peak[0] = max(peak[0], off._pending_bytes)

        off._bound_pending = watch
        _, g = run_step(model, data, off.step())
        assert_bitwise_equal(g, g0)
        assert off.stats()["bytes_offloaded"] > 4 * limit
    assert 0 < peak[0] <= limit


@pytest.mark.parametrize("device", DEVICES)
def test_bytes_under_way_count_a_storage_once_however_many_views_are_saved(tmp_path, device):
    # Attention saves q, k and v, three views of one projection's output: one storage,
    # written once, held once until its write is done (budgets and max_pending_bytes wait on
    # this count).
    model, data = gpt(device), gpt_batch(device)
    _, g0 = run_step(model, data)
    with offloader(model, tmp_path, keep_last=0) as off:
        seen = []
        real = off._note_held

        def watch():
            real()
            recs = [r for r in (ref() for ref in off._order) if r is not None]
            held = {r.key: r.nbytes for r in recs if r.source is not None and not r.kept}
            seen.append((off._pending_bytes, sum(held.values()), len(recs) - len({r.key for r in recs})))

        off._note_held = watch
        _, g = run_step(model, data, off.step())
        assert_bitwise_equal(g, g0)
    assert max(views for _, _, views in seen) > 0, "no storage was saved twice"
    assert all(pending == truth for pending, truth, _ in seen), seen


@pytest.mark.parametrize("device", DEVICES)
def test_full_storage_keeps_tensors_in_memory_and_training_goes_on(tmp_path, device):
    model, data = gpt(device), gpt_batch(device)
    _, g0 = run_step(model, data)
    off = st.Offloader(model, str(tmp_path), capacity="512KiB", policy="all", min_tensor_bytes=64 << 10, **SETTINGS)
    with off:
        for _ in range(2):
            _, g = run_step(model, data, off.step())
            assert_bitwise_equal(g, g0)
        e = off.stats()["engine"]
    assert e["resident_tensors"] > 0, "the storage was too small for every tensor"
    # Nothing is released during a forward pass, so each of the two steps writes at most
    # the capacity (how much depends on when packed extents get flushed).
    assert e["bytes_written"] <= 2 * (512 << 10)


@pytest.mark.parametrize("device", DEVICES)
def test_full_storage_with_max_pending_bytes_does_not_hang(tmp_path, device):
    # With a bound on pending writes the Offloader waits for the oldest write; a tensor kept
    # in memory because the storage is full has none coming, and the wait says so at once.
    model, data = gpt(device), gpt_batch(device)
    _, g0 = run_step(model, data)
    off = st.Offloader(model, str(tmp_path), capacity="512KiB", policy="all", min_tensor_bytes=64 << 10,
                       max_pending_bytes=256 << 10, **SETTINGS)
    with off:
        for _ in range(2):
            _, g = run_step(model, data, off.step())
            assert_bitwise_equal(g, g0)
        e = off.stats()["engine"]
    assert e["resident_tensors"] > 0, "the storage was too small for every tensor"


def _apply_rok(off, offload, recompute):
    """Gives the offloader a planner's choice, as the adaptive policy does after profiling."""
    from spillway.torch.planner import Outcome, RokPlan
    from spillway.torch.policy import Plan

    rok = RokPlan("test", frozenset(offload), frozenset(recompute), Outcome(0, 0, 0, 0, 0, 0, 0), "given")
    off._rok = rok
    off._plan = Plan("adaptive", 0, rok.reason)
    off._set_recompute(sorted(i - 1 for i in recompute))


@pytest.mark.parametrize("device", DEVICES)
def test_a_planned_choice_per_tensor_and_recompute_keep_gradients_bitwise_equal(tmp_path, device):
    model = gpt(device)
    batch = gpt_batch(device)
    loss0, want = run_step(model, batch)
    model2 = gpt(device)
    with offloader(model2, tmp_path, policy="adaptive") as off:
        run_step(model2, batch, off.step())  # a first step: counts what each segment saves
        saved = [list(s.tensors) for s in off._segments]
        assert len(saved) == 5 and all(len(t) > 2 for t in saved[1:]), saved
        # Segment 1: its first and third tensors; block 2 (segment 3) recomputed with its
        # input offloaded; segment 4: its first tensor only.
        _apply_rok(off, {(1, 0), (1, 2), (3, -1), (4, 0)}, {3})
        loss, got = run_step(model2, batch, off.step())
        segs = off._segments
        assert segs[1].offloaded_bytes == saved[1][0] + saved[1][2]
        assert segs[2].offloaded_bytes == 0
        assert segs[3].saved_bytes == segs[3].input_bytes > 0, "a recomputed block saves its input only"
        assert segs[3].offloaded_bytes == segs[3].input_bytes, "and it is offloaded"
        assert segs[4].offloaded_bytes == saved[4][0]
        assert torch.equal(loss, loss0)
        assert_bitwise_equal(got, want)
        # Planned again without recompute: the block saves all it did before.
        _apply_rok(off, set(), set())
        _, again = run_step(model2, batch, off.step())
        assert list(off._segments[3].tensors) == saved[3]
        assert_bitwise_equal(again, want)
    assert all("forward" not in vars(b) for b in model2.blocks), "closing restores the blocks"


def test_goals_are_checked_when_the_offloader_is_made(tmp_path):
    model = gpt("cpu")
    with pytest.raises(ValueError, match="not both"):
        offloader(model, tmp_path, policy="adaptive", budget="1GiB", max_slowdown=1.1)
    with pytest.raises(ValueError, match=">= 1.0"):
        offloader(model, tmp_path, policy="adaptive", max_slowdown=0.5)
    with pytest.raises(ValueError, match="goals of the adaptive policy"):
        offloader(model, tmp_path, policy="all", budget=1 << 30)
    off = offloader(model, tmp_path, policy="adaptive", budget="1MiB")
    assert off.budget == 1 << 20
    off.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["all", "adaptive"])
def test_the_host_tier_serves_both_policies_with_gradients_bitwise(tmp_path, device, policy):
    # Offloads go into the pinned tier first and come back from it, copied ahead of use; a
    # tier smaller than a step's offloads spills to storage and reads from both.
    model, data = gpt(device, layers=6), gpt_batch(device)
    _, want = run_step(model, data)
    with offloader(model, tmp_path, policy=policy, host_tier="1MiB", probe_bytes=4 << 20) as off:
        for _ in range(4):
            _, got = run_step(model, data, off.step())
            assert_bitwise_equal(got, want)
        s = off.stats()
        tier = off.engine.stats()["host_tier"]
    if policy == "all" or s["bytes_offloaded"] > 0:
        assert s["bytes_fetched_ahead"] > 0, s
        assert tier["bytes_in"] > 0 and tier["bytes_read_arena"] > 0, tier
    if policy == "all":
        assert tier["bytes_spilled"] > 0 and tier["bytes_read_storage"] > 0, tier


def forward_ms(model, batch):
    """Milliseconds of one forward pass (no offloading), timed on the GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        model(*batch)
        start.record()
        model(*batch)
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def copy_out_gbps(nbytes=256 << 20):
    """GB/s of one device-to-pinned-host copy of ``nbytes``, timed on the GPU."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dst.copy_(src, non_blocking=True)
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    torch.cuda.synchronize()
    return nbytes / (start.elapsed_time(end) * 1e6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures GPU memory: needs a CUDA GPU")
def test_the_peak_falls_by_what_the_host_tier_took_before_it(tmp_path):
    # Offloaded tensors whose copies into the host tier are done give their GPU memory back
    # during forward: the peak falls by at least half of what the host tier can take in
    # forward's time at the measured copy bandwidth (all offloaded bytes, where forward is
    # long enough). Nothing given back during forward fails this.
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=512, n_layer=6, n_head=8, d_model=512)
    model = GPT(cfg, device="cuda")
    x = torch.randint(0, 512, (16, 512), device="cuda")
    movable = copy_out_gbps() * 1e6 * forward_ms(model, (x, x))

    def peak_of(ctx=None):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run_step(model, (x, x), ctx)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, grads(model)

    peak_of()
    base, want = peak_of()
    with offloader(model, tmp_path, host_tier="2GiB") as off:
        peak_of(off.step())
        before = off.stats()["bytes_offloaded"]
        peak, got = peak_of(off.step())
        offloaded = off.stats()["bytes_offloaded"] - before
        tier = off.engine.stats()["host_tier"]
    assert_bitwise_equal(got, want)
    assert offloaded > 0 and tier["bytes_in"] > 0
    assert peak <= base - 0.5 * min(offloaded, movable), (base, peak, offloaded, movable)


@pytest.mark.parametrize("device", DEVICES)
def test_eight_paths_on_one_tmpfs_share_its_space_and_stay_within_it(device):
    # Eight striped files on one tmpfs: by default they take half of its free space
    # together (not each), and the tmpfs never holds more than that during the steps.
    import shutil
    import subprocess
    import tempfile

    shm = "/dev/shm"
    if not os.path.isdir(shm) or subprocess.run(["findmnt", "-no", "FSTYPE", "-T", shm], capture_output=True,
                                                text=True).stdout.split()[-1:] != ["tmpfs"]:
        pytest.skip("needs /dev/shm on tmpfs")
    model, data = gpt(device, layers=6), gpt_batch(device)
    _, want = run_step(model, data)
    with tempfile.TemporaryDirectory(dir=shm) as d:
        free = shutil.disk_usage(shm).free
        start = shutil.disk_usage(shm).used
        paths = [os.path.join(d, "stripe-%d.bin" % i) for i in range(8)]
        with st.Offloader(model, paths, policy="all", min_tensor_bytes=64 << 10, **SETTINGS) as off:
            assert off.engine.capacity <= free // 2, (off.engine.capacity, free)
            peak = start
            for _ in range(3):
                _, got = run_step(model, data, off.step())
                assert_bitwise_equal(got, want)
                peak = max(peak, shutil.disk_usage(shm).used)
            s = off.stats()
        assert s["bytes_written"] > 0 and len(s["engine"]["members"]) == 8
        assert peak - start <= off.engine.capacity


def profiled(model, data, tmp_path, **kw):
    """The segments an adaptive offloader measured on ``model`` in its profiling steps, and
    the bytes they saved."""
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20, **kw) as off:
        for _ in range(2):
            run_step(model, data, off.step())
        return off._profiled, sum(s.saved_bytes for s in off._profiled)


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_a_budget_bounds_the_saved_bytes_held(tmp_path, fraction):
    # What the budget bounds is measured: saved bytes kept, still being written, or copied
    # back ahead, up to backward's start.
    model, data = gpt("cpu", layers=6), gpt_batch("cpu")
    _, want = run_step(model, data)
    _, total = profiled(model, data, tmp_path, fetch_ahead_bytes=1)
    budget = int(fraction * total)
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20, fetch_ahead_bytes=1, budget=budget) as off:
        for _ in range(3):
            _, got = run_step(model, data, off.step())
            assert_bitwise_equal(got, want)
        s = off.stats()
    assert not s["policy"]["plan_summary"]["reason"].startswith("cannot meet"), s["policy"]
    assert 0 < s["last_step"]["held_peak_bytes"] <= budget, (s["last_step"], budget, total)


class LaggingCopies:
    """An engine whose copies out of memory are seen done by a poll only once the host has
    waited for them: the host as far ahead of the GPU as it can get (a poll at a save sees
    the GPU several saves behind)."""

    def __init__(self, engine):
        self._engine = engine
        self._waited = set()

    def wait_source_released(self, handle):
        self._waited.add(handle)
        return self._engine.wait_source_released(handle)

    def source_released(self, handle):
        return handle in self._waited and self._engine.source_released(handle)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_forward_holds_no_more_at_any_save_than_the_plan_though_the_host_runs_ahead(tmp_path):
    # The plan counts a tensor free once its write is done; the offloader makes it so at
    # every save by waiting for the writes the plan has done by then. Without that wait, a
    # host running ahead sees no write done and holds every offloaded tensor to the end of
    # forward: the peak of a planned step stayed where the plan said it would fall.
    model, data = gpt("cpu", layers=6), gpt_batch("cpu")
    _, want = run_step(model, data)
    with offloader(model, tmp_path, policy="adaptive") as off:
        off._bandwidth = (0.5, 0.5)  # GB/s: each write is planned done a few saves after its own
        for _ in range(2):
            run_step(model, data, off.step())
        rok, segs = off._rok, off._profiled
        assert rok.offload and not rok.recompute, rok.reason
        size = {(i, k): b for i, s in enumerate(segs) for k, b in enumerate(s.tensors)}
        real_engine, real_release = off.engine, off._release_planned
        seen = []

        def watch(key):
            real_release(key)
            at = off._planned_ms(key)
            if at is None:
                return
            before = list(off._positions.values())[:-1]  # saved before this one, in order
            planned = sum(size[t] for t in before if t in rok.offload and rok.outcome.write_done_ms[t] > at)
            seen.append((off._pending_bytes, planned))

        off.engine, off._release_planned = LaggingCopies(real_engine), watch
        try:
            for _ in range(2):
                _, got = run_step(model, data, off.step())
                assert_bitwise_equal(got, want)
        finally:
            off.engine = real_engine
    assert len(seen) >= 2 * sum(len(s.tensors) for s in segs) - 2, seen
    assert max(p for p, _ in seen) > 0, "no write was still under way at a save"
    assert all(pending <= planned for pending, planned in seen), seen


def test_a_budget_holds_the_copy_back_window_to_one_tensor(tmp_path):
    # Under a budget, backward copies back one tensor ahead of use, not two: every byte of
    # the window counts against the budget. The default budget bounds held bytes all the same.
    # The window is the largest tensor the plan offloads (a plan that keeps its largest
    # tensor, the logits here, reserves less).
    model, data = gpt("cpu", layers=6), gpt_batch("cpu")
    _, want = run_step(model, data)
    segments, total = profiled(model, data, tmp_path)
    largest = max(b for s in segments for b in s.tensors)
    with offloader(model, tmp_path, policy="adaptive") as off:
        assert off._fetch_window(largest) == max(2 * largest, 64 << 20)
    budget = int(0.6 * total)
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20, budget=budget) as off:
        assert off._fetch_window(largest) == largest
        for _ in range(3):
            _, got = run_step(model, data, off.step())
            assert_bitwise_equal(got, want)
        s = off.stats()
        segs = off._profiled
        offloaded = [segs[i].tensors[k] if k >= 0 else segs[i].input_bytes for i, k in off._rok.offload]
    assert s["policy"]["fetch_ahead_bytes"] == max(offloaded) <= largest
    assert 0 < s["last_step"]["held_peak_bytes"] <= budget, (s["last_step"], budget, total)


def test_recomputed_blocks_keep_what_the_plan_says_the_head_included(tmp_path):
    # The last block's segment also holds the head (final norm, logits, loss), saved after
    # the block returns. Recomputing blocks keeps their inputs and, as planned, the head's
    # tensors: the bytes kept in a step are those the plan predicted, and gradients stay
    # bitwise equal.
    model, data = gpt("cpu", layers=4), gpt_batch("cpu")
    _, want = run_step(model, data)
    segments, total = profiled(model, data, tmp_path)
    last = segments[-1]
    assert last.block >= 0 and last.inner is not None and last.inner < len(last.tensors), last
    with offloader(model, tmp_path, policy="adaptive", budget=int(0.15 * total)) as off:
        off._bandwidth = (0.005, 0.005)  # storage planned at 5 MB/s: recomputing is cheaper
        for _ in range(3):
            _, got = run_step(model, data, off.step())
            assert_bitwise_equal(got, want)
        s, rok = off.stats(), off._rok
    assert len(off._profiled) - 1 in rok.recompute, rok.reason
    assert s["last_step"]["kept_bytes"] == rok.outcome.kept_bytes, (s["last_step"], rok.summary())


def test_a_step_is_planned_again_only_when_its_io_made_it_slower(tmp_path):
    # Host waits alone do not revise the plan (the host runs ahead of the GPU, and its
    # waits may cost the step nothing): the step must also run past the plan's prediction.
    model, data = gpt("cpu"), gpt_batch("cpu")
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20) as off:
        for _ in range(2):
            run_step(model, data, off.step())
        segments_ms = sum(s.fwd_ms + s.bwd_ms for s in off._profiled)
        assert off._profiled_seconds > 0
        predicted = max(segments_ms, off._profiled_seconds * 1e3) + off._rok.outcome.extra_ms
        on_time, late = predicted * 1.01 / 1e3, predicted * 1.2 / 1e3
        assert not off._step_overran(on_time, stall=0.5 * on_time)
        assert not off._step_overran(late, stall=0.0)
        assert off._step_overran(late, stall=0.1 * late)
        # What runs between the segments counts: the profiled step took 10% more than its
        # segments' sum, and a step 5% over that sum (with host waits) is on time.
        off._profiled_seconds = 1.1 * segments_ms / 1e3
        busy = (1.05 * segments_ms + off._rok.outcome.extra_ms) / 1e3
        assert not off._step_overran(busy, stall=0.1 * busy)
        off._profiled_seconds = 0.0
        assert off._step_overran(busy, stall=0.1 * busy)
        # A step that overran is planned again with less of the bandwidth it waited on, and
        # says why: here reads (backward), then writes (forward), then both. (Each revision
        # made the step faster, though not yet on time.)
        off._profiling = False
        for i, (write_share, scales) in enumerate([(0.0, (1.0, 0.8)), (1.0, (0.8, 0.8)), (0.5, (0.64, 0.64))]):
            seconds = late * (1 - 0.01 * i)
            warm_up(off, seconds)
            off._step_write_wait = write_share * 0.1 * seconds
            off._end_step(seconds, 0.1 * seconds)
            assert (off._write_scale, off._read_scale) == pytest.approx(scales)
            reason = off.stats()["policy"]["reason"]
            assert "planned again with write bandwidth x%.2f, read x%.2f" % scales in reason, reason


def test_settled_says_when_the_plan_has_stopped_changing(tmp_path):
    # Benchmarks time steps once the plan has settled: planned after the profiling steps,
    # then its first step (warm-up) and one judged without a revision. A revision starts
    # it over.
    model, data = gpt("cpu"), gpt_batch("cpu")
    with offloader(model, tmp_path, policy="adaptive") as off:
        off._bandwidth = (1e-6, 1e-6)  # GB/s: the plan rebuilds, and no write makes a step wait
        seen = []
        for _ in range(5):
            assert not off.settled or off._rok is not None
            run_step(model, data, off.step())
            seen.append((off._rok is not None, off.settled))
        first = next(i for i, (planned, _) in enumerate(seen) if planned)
        assert [settled for _, settled in seen[first:first + 3]] == [False, False, True], seen
        assert off.stats()["policy"]["reason"] == off._plan.reason
        off._revise_plan(1.0, 0.1)
        assert not off.settled
        for _ in range(3):
            run_step(model, data, off.step())
        assert off.settled


def warm_up(off, seconds):
    """Ends a new plan's first step, late and stalled: it is not judged (it warms the plan
    up), and nothing changes."""
    scales, reason = (off._write_scale, off._read_scale), off.stats()["policy"]["reason"]
    off._step_write_wait = 0.1 * seconds
    off._end_step(seconds * 2, 0.2 * seconds)
    assert (off._write_scale, off._read_scale) == scales and off.stats()["policy"]["reason"] == reason


def revised_once(model, data, off):
    """Plans from the profiled steps, then ends a step 1.2x its prediction with forward
    stalled on writes: planned again at write bandwidth x0.8. Returns the first plan's
    summary and that step's seconds."""
    for _ in range(2):
        run_step(model, data, off.step())
    first = off._rok.summary()
    predicted = sum(s.fwd_ms + s.bwd_ms for s in off._profiled) + off._rok.outcome.extra_ms
    late = predicted * 1.2 / 1e3
    off._profiling = False
    warm_up(off, late)
    off._step_write_wait = 0.1 * late
    off._end_step(late, 0.1 * late)
    assert (off._write_scale, off._read_scale) == pytest.approx((0.8, 1.0))
    warm_up(off, late)  # the revision's first step
    return first, late


def test_a_revision_that_made_steps_slower_is_undone_and_the_plan_then_stays(tmp_path):
    # Lowering a bandwidth trades offloading for keeping or recomputing; where the stall was
    # not the bandwidth's (a budget's bound on bytes in flight, say), each revision costs
    # more. A revised plan whose step is slower than a plan before it goes back to the
    # fastest plan tried, says so, and is not revised again.
    model, data = gpt("cpu"), gpt_batch("cpu")
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20) as off:
        first, late = revised_once(model, data, off)
        off._step_write_wait = 0.1 * late
        off._end_step(late * 1.1, 0.1 * late)  # slower than the first plan: back to it
        assert (off._write_scale, off._read_scale) == (1.0, 1.0)
        reason = off.stats()["policy"]["reason"]
        assert "slower than the %.1f ms of the plan with write bandwidth x1.00, read x1.00" % (late * 1e3) in reason
        assert "back to that plan, which stays" in reason, reason
        assert off._rok.summary() == first
        # It stays: a later stall plans nothing new.
        off._end_step(late * 1.3, 0.1 * late)
        assert (off._write_scale, off._read_scale) == (1.0, 1.0)
        assert off.stats()["policy"]["reason"] == reason
        # And training goes on under it.
        run_step(model, data, off.step())


@pytest.mark.parametrize("faster", [False, True])
def test_a_revision_is_judged_by_its_step_even_where_it_did_not_stall(tmp_path, faster):
    # A revision that stalls no more may still be slower (it recomputes what it no longer
    # offloads): its step is compared with the plan's before it all the same. Slower: that
    # plan comes back; faster: the revision stays. Either way nothing is revised again.
    model, data = gpt("cpu"), gpt_batch("cpu")
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20) as off:
        first, late = revised_once(model, data, off)
        revised = off.stats()["policy"]["reason"]
        off._step_write_wait = 0.0
        off._end_step(late * (0.9 if faster else 1.1), 0.0)  # no stall
        assert off._settled
        reason = off.stats()["policy"]["reason"]
        if faster:
            assert (off._write_scale, off._read_scale) == pytest.approx((0.8, 1.0))
            assert reason == revised
        else:
            assert (off._write_scale, off._read_scale) == (1.0, 1.0)
            assert "slower than the %.1f ms of the plan with write bandwidth x1.00" % (late * 1e3) in reason, reason
            assert off._rok.summary() == first
        off._end_step(late * 1.3, 0.1 * late)
        assert off.stats()["policy"]["reason"] == reason
        run_step(model, data, off.step())


@pytest.mark.parametrize("goal", [dict(budget="256KiB"), dict(max_slowdown=1.5), dict(budget="1MiB", recompute=False)])
def test_goals_plan_from_the_measured_step_and_keep_gradients_bitwise_equal(tmp_path, goal):
    model, data = gpt("cpu"), gpt_batch("cpu")
    _, want = run_step(model, data)
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20, **goal) as off:
        for _ in range(3):
            _, got = run_step(model, data, off.step())
            assert_bitwise_equal(got, want)
        p = off.stats()["policy"]
    s = p["plan_summary"]
    assert s["goal"].startswith(next(iter(goal))), s
    if "budget" in goal and not s["reason"].startswith("cannot meet"):
        assert s["predicted_activation_bytes"] <= spillway.parse_size(goal["budget"]), s
    if goal.get("recompute") is False:
        assert s["recomputed_segments"] == []


def test_a_time_goal_plan_found_under_a_budget_holds_forward_to_it(tmp_path, monkeypatch):
    # Where a time goal's best plan is one that makes forward wait for writes, the plan
    # carries the budget it was found under: the offloader bounds the writes under way by
    # it (less the kept bytes and the one-tensor window) as it does for budget=, and
    # gradients stay bitwise equal.
    import spillway.torch.offloader as offloader_module
    import spillway.torch.planner as planner_module

    model, data = gpt("cpu"), gpt_batch("cpu")
    _, want = run_step(model, data)
    real = offloader_module.plan_rok
    held = {}

    def under_a_budget(profile, tiers, **kw):
        got = real(profile, tiers, **kw)
        if kw.get("max_slowdown") is None:
            return got
        budget = int(0.5 * profile.activation_bytes)
        found = real(profile, tiers, budget=budget, window=planner_module.largest_offloaded,
                     allow_recompute=kw["allow_recompute"], prefetch_segments=kw["prefetch_segments"])
        held["budget"] = budget
        return dataclasses.replace(found, goal=got.goal)

    monkeypatch.setattr(offloader_module, "plan_rok", under_a_budget)
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20, max_slowdown=2.0) as off:
        for _ in range(3):
            _, got = run_step(model, data, off.step())
            assert_bitwise_equal(got, want)
        rok = off._rok
        assert rok.budget == held["budget"]
        assert off._plan_pending_limit == max(rok.budget - rok.outcome.kept_bytes - (rok.outcome.window_bytes or 0), 0)
        assert off._fetch_window(12345) == 12345  # one tensor, as under budget=
        assert off.stats()["policy"]["plan_summary"]["held_under_bytes"] == rok.budget
        assert 0 < off.stats()["last_step"]["held_peak_bytes"] <= rok.budget


def test_profiling_steps_may_offload_for_a_batch_that_fits_only_so(tmp_path):
    # profile="offload": the steps the plan is made from offload every segment but the last
    # (as policy="all"), so a micro-batch that fits only with offloading can be planned;
    # the plan follows, and gradients stay bitwise equal throughout.
    model, data = gpt("cpu", layers=4), gpt_batch("cpu")
    _, want = run_step(model, data)
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20, profile="offload") as off:
        _, got = run_step(model, data, off.step())
        assert_bitwise_equal(got, want)
        first = off.stats()
        assert first["bytes_offloaded"] > 0 and "offload every segment but the last 1" in first["policy"]["reason"]
        for _ in range(3):
            _, got = run_step(model, data, off.step())
            assert_bitwise_equal(got, want)
        s, held = off.stats(), off._profiled_held
    # The plan keeps no more than the profiling steps held (which fit): held to it if need be.
    plan = s["policy"]["plan_summary"]
    assert 0 < plan["predicted_activation_bytes"] <= held, (plan, held)
    # With storage too slow to hide much, the plan that hides its I/O would keep more than
    # the profiling steps held: it is held to that instead, as a budget.
    with offloader(model, tmp_path, policy="adaptive", profile="offload") as off:
        off._bandwidth = (0.005, 0.005)
        for _ in range(3):
            _, got = run_step(model, data, off.step())
            assert_bitwise_equal(got, want)
        s, held = off.stats(), off._profiled_held
    plan = s["policy"]["plan_summary"]
    assert "held to what the profiling steps held" in plan["reason"], plan
    assert plan["predicted_activation_bytes"] <= held and s["last_step"]["held_peak_bytes"] <= held
    with pytest.raises(ValueError, match='profile=.everything.: expected "keep"'):
        offloader(model, tmp_path, policy="adaptive", profile="everything")


def test_the_profiling_step_measures_when_each_tensor_is_saved(tmp_path):
    # The planner places each write at its tensor's measured save time: one per tensor, in
    # save order, within its segment's forward.
    model, data = gpt("cpu", layers=3), gpt_batch("cpu")
    segments, _ = profiled(model, data, tmp_path)
    assert any(s.tensors for s in segments)
    for s in segments:
        assert len(s.save_ms) == len(s.tensors), s
        assert all(0.0 <= t <= s.fwd_ms for t in s.save_ms), s
        assert s.save_ms == sorted(s.save_ms), s
        assert s.save_marks == []


# -- tensors rebuilt in backward ----------------------------------------------------------


def planned_with(model, data, tmp_path, bandwidth, **kw):
    """An adaptive offloader on ``model`` whose storage is taken to run at ``bandwidth``
    GB/s (instead of probing it), after its profiling steps."""
    off = offloader(model, tmp_path, policy="adaptive", **kw)
    off._bandwidth = (bandwidth, bandwidth)
    for _ in range(2):
        run_step(model, data, off.step())
    return off


def force_plan(off, offload_rest):
    """Sets ``off``'s plan to rebuild every tensor it can (but in the last segment) and to
    offload the others there (``offload_rest``) or keep them; returns the rebuilt ids."""
    segs = off._profiled
    rebuild = frozenset((s.index, k) for s in segs[:-1] for k, ms in enumerate(s.rebuild_ms) if ms is not None)
    offload = frozenset((s.index, k) for s in segs[:-1] for k in range(len(s.tensors))) - rebuild
    off._set_recompute([])
    off._rok = dataclasses.replace(off._rok, offload=offload if offload_rest else frozenset(),
                                   recompute=frozenset(), rebuild=rebuild)
    return rebuild


def test_the_measured_step_records_what_each_rebuild_reads(tmp_path):
    # The planner needs a rebuilt tensor's inputs back when backward rebuilds it, which
    # can come before their own use: the profile says which saved tensors each rebuild
    # reads. In the GPT block: a layer norm's output reads the norm's input, the GELU's
    # output the MLP's first product (as large as it, saved just before it).
    model, data = gpt("cpu"), gpt_batch("cpu")
    with planned_with(model, data, tmp_path, 1.0) as off:
        segs = off._profiled
        profile = off.stats()["policy"]["profile"]["segments"]
    found = 0
    for s in segs:
        assert len(s.rebuild_inputs) == len(s.tensors), s
        for k, (ms, inputs) in enumerate(zip(s.rebuild_ms, s.rebuild_inputs)):
            assert (ms is None) == (inputs is None), (s.index, k, ms, inputs)
            if inputs is None:
                continue
            assert inputs and all((i, j) < (s.index, k) for i, j in inputs), (s.index, k, inputs)
            if [(s.index, k - 1)] == inputs and s.tensors[k - 1] == s.tensors[k]:
                found += 1
    assert found >= len(off._blocks) - 1, [(s.rebuild_ms, s.rebuild_inputs) for s in segs]
    assert [[None if x is None else [tuple(p) for p in x] for x in seg["rebuild_inputs"]] for seg in profile] == [
        [None if x is None else list(x) for x in s.rebuild_inputs] for s in segs
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_made_by_cheap_operations_are_rebuilt_bitwise(tmp_path, device):
    # Storage too slow to matter: what the plan frees, it frees by rebuilding the norms' and
    # the GELUs' outputs from their saved inputs; gradients are the baseline's to the bit.
    model, data = gpt(device), gpt_batch(device)
    loss0, g0 = run_step(model, data)
    with planned_with(model, data, tmp_path, 1e-6, max_slowdown=1.5) as off:
        assert off._rok.rebuild and not off._rok.offload, off._rok.reason
        # Per block but the last: the two layer norms' outputs and the GELU's.
        assert len(force_plan(off, offload_rest=False)) >= 3 * 3, off._profiled
        rok = off._rok
        for _ in range(2):
            loss, g = run_step(model, data, off.step())
            assert torch.equal(loss, loss0)
            assert_bitwise_equal(g, g0)
        s = off.stats()
    assert s["rebuild_missed"] == 0, s
    want = sum(off._profiled[i].tensors[k] for i, k in rok.rebuild)
    assert s["last_step"]["rebuilt_bytes"] == want > 0, (s["last_step"], want)
    # The rebuilt bytes are neither kept nor written.
    assert s["last_step"]["kept_bytes"] + s["last_step"]["rebuilt_bytes"] == sum(x.saved_bytes for x in off._profiled)


@pytest.mark.parametrize("device", DEVICES)
def test_rebuilt_tensors_read_their_offloaded_inputs_back_once(tmp_path, device):
    # Every input offloaded, every cheap output rebuilt from it: the input is read back for
    # the rebuild and shared with its own use later (one fetch per offloaded tensor).
    model, data = gpt(device), gpt_batch(device)
    loss0, g0 = run_step(model, data)
    with planned_with(model, data, tmp_path, 1000.0) as off:
        force_plan(off, offload_rest=True)
        for _ in range(2):
            before = off.stats()
            loss, g = run_step(model, data, off.step())
            after = off.stats()
            assert torch.equal(loss, loss0)
            assert_bitwise_equal(g, g0)
        assert after["rebuilt_tensors"] > before["rebuilt_tensors"]
        assert after["offloaded_tensors"] > before["offloaded_tensors"]
        assert after["bytes_fetched"] - before["bytes_fetched"] == after["bytes_offloaded"] - before["bytes_offloaded"]


def test_a_tensor_changed_after_it_was_made_is_not_rebuilt():
    from spillway.torch.rebuild import Producers

    class Rec:
        pass

    def pack(t):
        r = Rec()
        r.t = t
        prod.saved(t, r)
        return r

    prod = Producers(torch.device("cpu"), 1024, lambda t: False)
    prod.recording = True
    x = torch.randn(64, 64, requires_grad=True) * 1
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda r: r.t), prod:
        y = torch.nn.functional.gelu(x)
        assert prod.recipe(y) is not None  # x was saved (by gelu): y can be rebuilt
        z = torch.nn.functional.gelu(x)
        z.add_(1)  # changed in place after it was made
        w = torch.nn.functional.silu(y.detach() * 1)  # input not saved by anyone
    assert prod.recipe(z) is None
    assert prod.recipe(w) is None
    # The recipe gives back the same bits.
    rec = prod.recipe(y)
    got = rec.run(lambda ref: ref.view(ref.saved.t.untyped_storage(), x.device) if hasattr(ref, "saved") else ref.tensor)
    assert torch.equal(torch.empty(0).set_(got, 0, y.shape, y.stride()), y.detach())


def test_compiled_models_are_not_watched_for_rebuilds():
    from spillway.torch.offloader import _compiled

    model = gpt("cpu", layers=1)
    assert not _compiled(model)
    model.blocks[0].compile()
    assert _compiled(model)


def test_a_storage_saved_through_views_is_one_tensor_after_its_first_view_was_written(tmp_path):
    # Rotary embeddings save two strided views of one storage in two operations: the first
    # view may be offloaded, written and let go before the second is saved. The storage is
    # still one tensor (the plan's indices stay those of the measured step), and what the
    # plan rebuilds is rebuilt.
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, seq_len=64, n_layer=3, n_head=4, d_model=128, arch="llama")
    model, data = GPT(cfg, device="cpu"), gpt_batch("cpu")
    loss0, g0 = run_step(model, data)
    with planned_with(model, data, tmp_path, 1000.0) as off:
        force_plan(off, offload_rest=True)
        for _ in range(2):
            loss, g = run_step(model, data, off.step())
            assert torch.equal(loss, loss0)
            assert_bitwise_equal(g, g0)
            assert [s.tensors for s in off._segments] == [s.tensors for s in off._profiled]
        s = off.stats()
    assert s["rebuilt_tensors"] > 0 and s["rebuild_missed"] == 0, s


def test_a_buffer_updated_later_in_forward_rebuilds_with_its_value_then(tmp_path):
    # Running statistics change in place during forward, after an operation used them: the
    # rebuilt tensor uses the value the operation saw (a copy taken when its output was
    # saved), and gradients stay bitwise equal.
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(256, 256)
            self.fc2 = torch.nn.Linear(256, 256)

        def forward(self, x, scale):
            h = torch.sigmoid(self.fc1(x))  # saved by sigmoid's backward
            # The sum is saved (by fc2), made from the saved h and the buffer, which no
            # backward needs: autograd lets forward change it in place afterwards.
            return self.fc2(h + scale)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])
            self.register_buffer("scale", torch.full((256,), 0.5))

        def forward(self, x, y):
            for blk in self.blocks:
                x = blk(x, self.scale)
                with torch.no_grad():
                    self.scale.mul_(1.01)
            return torch.nn.functional.mse_loss(x, y)

    torch.manual_seed(0)
    model = Net()
    data = (torch.randn(512, 256), torch.randn(512, 256))
    model.scale.fill_(0.5)
    loss0, g0 = run_step(model, data)
    with planned_with(model, data, tmp_path, 1e-6, min_tensor_bytes=64 << 10) as off:
        force_plan(off, offload_rest=False)
        assert any(ms is not None for s in off._profiled for ms in s.rebuild_ms)
        model.scale.fill_(0.5)
        loss, g = run_step(model, data, off.step())
        assert torch.equal(loss, loss0)
        assert_bitwise_equal(g, g0)
        assert off.stats()["rebuilt_tensors"] > 0


def test_a_parameter_changed_before_backward_is_a_clear_error_not_a_wrong_rebuild(tmp_path):
    # A bias used by an addition (whose backward does not save it) changed in place between
    # forward and backward: plain autograd would not notice; a rebuild from it must not use
    # the new value silently.
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(256, 256)
            self.shift = torch.nn.Parameter(torch.zeros(256))

        def forward(self, x):
            return self.fc(torch.sigmoid(x) + self.shift)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])

        def forward(self, x, y):
            for blk in self.blocks:
                x = blk(x)
            return torch.nn.functional.mse_loss(x, y)

    torch.manual_seed(0)
    model = Net()
    data = (torch.randn(512, 256), torch.randn(512, 256))
    with planned_with(model, data, tmp_path, 1e-6, min_tensor_bytes=64 << 10) as off:
        force_plan(off, offload_rest=False)
        with pytest.raises(st.InPlaceModificationError, match="modified in place between forward and backward"):
            with off.step():
                loss = model(*data)
                with torch.no_grad():
                    model.blocks[1].shift.add_(1.0)  # block 0 saves no sigmoid: its input needs no grad
                loss.backward()


def test_a_revision_takes_the_bandwidth_a_predicted_wait_implies():
    # A budget's plan predicted 20 ms of waits for writes; the step waited 80: the writes
    # ran at about a quarter of the bandwidth planned with, and the next plan takes that.
    # A wait the plan did not predict at all lowers the bandwidth by the usual fifth.
    from spillway.torch.offloader import _scale_down

    assert _scale_down(20.0, 80.0) == pytest.approx(0.25)
    assert _scale_down(30.0, 50.0) == pytest.approx(0.6)
    assert _scale_down(45.0, 50.0) == pytest.approx(0.8)  # at most 0.8: each revision lowers it
    assert _scale_down(1.0, 500.0) == pytest.approx(0.25)  # at least a quarter per revision
    assert _scale_down(0.0, 14.0) == pytest.approx(0.8)


def test_a_budget_revision_scales_the_write_bandwidth_by_the_measured_wait(tmp_path):
    model, data = gpt("cpu"), gpt_batch("cpu")
    _, total = profiled(model, data, tmp_path)
    with offloader(model, tmp_path, policy="adaptive", probe_bytes=8 << 20, budget=int(0.3 * total)) as off:
        for _ in range(2):
            run_step(model, data, off.step())
        off._rok.outcome.write_wait_ms = 10.0
        predicted = sum(s.fwd_ms + s.bwd_ms for s in off._profiled) + off._rok.outcome.extra_ms
        late = predicted * 1.5 / 1e3
        off._profiling = False
        warm_up(off, late)
        off._step_write_wait = 0.02  # 20 ms waited where 10 were predicted
        off._end_step(late, 0.02)
        assert off._write_scale == pytest.approx(0.5) and off._read_scale == 1.0
        assert "planned again with write bandwidth x0.50" in off.stats()["policy"]["reason"]
