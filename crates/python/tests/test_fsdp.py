"""spillway.torch with FSDP2 (fully_shard) and tensor/sequence parallelism (DTensor).

Parameters are never offloaded, FSDP2's unsharded ones (new storage at every all-gather)
included: the offloader knows them by storage object, noted when a block's forward begins
(after FSDP2's hooks gathered them), and a saved view of a parameter by its base. A saved
DTensor is offloaded by its local shard and rebuilt with the same spec. Every check is
bitwise against the same training without spillway (fsdp_offload.py's runs): in this
process at world size 1 (gloo, a FileStore in the test's directory, a CPU DeviceMesh),
and on two CPU ranks under torchrun; the GPU suite runs the script on two GPUs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

# The test command sets SPILLWAY_REQUIRE_TORCH=1: there, no torch is a failure, not a skip.
torch = __import__("torch") if os.environ.get("SPILLWAY_REQUIRE_TORCH") else pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

if not dist.is_available():
    pytest.skip("torch.distributed is not built in", allow_module_level=True)

import fsdp_offload as fo  # noqa: E402
import spillway.torch as st  # noqa: E402
from test_torch import _apply_rok, force_plan, offloader  # noqa: E402

SCRIPT = pathlib.Path(__file__).with_name("fsdp_offload.py")
CPU = torch.device("cpu")


@pytest.fixture
def one_rank(tmp_path):
    """A process group of this process alone."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def options(tmp_path):
    return fo.offloader_options(str(tmp_path), "256MiB", cuda=False)


@pytest.mark.parametrize("run", fo.RUNS)
def test_one_rank_trains_bitwise_and_never_offloads_a_parameter(tmp_path, one_rank, run):
    s = fo.run_both(run, CPU, 2, rank=0, world=1, offloader_opts=options(tmp_path))
    assert s["differences"] == []
    assert s["parameter_regions_offloaded"] == 0
    assert s["offloaded_tensors"] > 0 and s["bytes_written"] > 0 and s["bytes_fetched"] > 0
    layers = fo.sizes(False)[4]
    assert s["segments"] == layers + 1, "every block (fully_shard()ed or not) is a segment"
    if run == "tp":
        assert s["offloaded_dtensors"] > 0, "sequence-parallel activations are DTensors"
    assert s["ok"]


def test_without_knowing_parameters_fsdp2_would_offload_them(tmp_path, one_rank, monkeypatch):
    """The check above is real: an offloader that takes every large plain tensor offloads
    FSDP2's unsharded parameters (views of them saved by the linear layers)."""

    def eligible(self, t):
        return type(t) is torch.Tensor and t.untyped_storage().nbytes() >= self.min_tensor_bytes

    monkeypatch.setattr(st.Offloader, "_eligible", eligible)
    s = fo.run_both("fsdp", CPU, 1, rank=0, world=1, offloader_opts=options(tmp_path))
    assert s["parameter_regions_offloaded"] > 0
    assert not s["ok"]


def train_planned(tmp_path, steps, give_plan, **opts):
    """The "fsdp" run trained without spillway and with an adaptive offloader whose plan
    ``give_plan(off)`` sets after every step; returns (base, record, the last step's
    segments, offloader stats)."""
    dp, tp = fo.meshes("fsdp", CPU, 1)
    data = fo.batches("fsdp", CPU, steps, 0, 1)
    base, _ = fo.train("fsdp", CPU, data, dp, tp)
    model = fo.build("fsdp", CPU, dp, tp)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    record = []
    with offloader(model, tmp_path, policy="adaptive", **opts) as off:
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            with off.step():
                loss = model(x, y)
                loss.backward()
            record.append((loss.detach(), [fo.local(p.grad).detach().clone() for p in model.parameters()]))
            opt.step()
            give_plan(off)
        return base, record, list(off._segments), off.stats()


def test_planned_recompute_composes_with_fsdp2(tmp_path, one_rank):
    # Segment 1: its first tensor; block 1 (segment 2) recomputed (reentrant checkpoint,
    # its input offloaded), under FSDP2's hooks. Given again after every step: a step that
    # stalls on a busy machine would be planned again otherwise.
    base, record, segs, _ = train_planned(tmp_path, 2, lambda off: _apply_rok(off, {(1, 0), (2, -1), (3, 0)}, {2}))
    assert segs[2].saved_bytes == segs[2].input_bytes == segs[2].offloaded_bytes > 0
    assert segs[1].offloaded_bytes > 0 and segs[3].offloaded_bytes > 0
    assert fo.compare(base, record) == []


def test_a_dtensor_is_offloaded_by_its_local_shard_and_comes_back_with_its_spec(tmp_path, one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(5)
    full = torch.randn(512, 256) * 0.1
    x = distribute_tensor(full, mesh, [Shard(0)]).requires_grad_()

    def f(x):
        y = (x * 2).exp()  # a DTensor; exp saves its output
        z = y.t()  # a view of it, saved by the product (so is y.t())
        return (z.tanh() * y.t()).sum()  # tanh saves its output, another DTensor

    want = f(x)
    want.backward()
    want_grad = x.grad.to_local().clone()
    x.grad = None
    back = []
    with offloader(torch.nn.Linear(1, 1), tmp_path, keep_last=0, min_tensor_bytes=1024) as off:
        unpack = off._unpack_hook
        off._unpack_hook = lambda saved: back.append(unpack(saved)) or back[-1]
        with off.step():
            loss = f(x)
            loss.backward()
        s = off.stats()
    assert s["offloaded_tensors"] == s["offloaded_dtensors"] == 4
    # exp(2x) and tanh of its transpose: two storages, written once each.
    assert s["bytes_offloaded"] == 2 * 512 * 256 * 4 and s["bytes_fetched"] == 2 * 512 * 256 * 4
    assert all(isinstance(t, DTensor) and t.device_mesh == mesh for t in back)
    (y,) = [t for t in back if t.placements == (Shard(0),)]  # exp's output, as it was
    assert torch.equal(y.to_local(), (full * 2).exp())
    assert {t.placements for t in back} == {(Shard(0),), (Shard(1),)}
    assert torch.equal(loss, want)
    assert torch.equal(x.grad.to_local(), want_grad)


def test_two_cpu_ranks_train_every_run_bitwise(tmp_path):
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), "--path", str(tmp_path), "--steps", "2", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPILLWAY_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["all_ok"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    for r in report["ranks"]:
        assert sorted(r["runs"]) == sorted(fo.RUNS)
        for name, s in r["runs"].items():
            assert s["differences"] == [] and s["parameter_regions_offloaded"] == 0, (name, s)
            assert s["bytes_written"] > 0 and s["bytes_fetched"] > 0, (name, s)
            assert s["engine_path"] == str(tmp_path)  # an anonymous file each: nothing left
        assert r["runs"]["tp"]["offloaded_dtensors"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.json"]


def test_rebuilds_compose_with_fsdp2(tmp_path, one_rank):
    # Rebuilding a norm's or an activation's output needs the norm's weight in backward:
    # FSDP2's unsharded parameter, gathered again before the block's backward (its version
    # kept). Every tensor that can be rebuilt is, the rest offloaded; bitwise equal.
    def rebuild_all(off):
        if off._profiled:  # else still profiling
            assert force_plan(off, offload_rest=True), "the blocks' norms and activations can be rebuilt"

    base, record, _, s = train_planned(tmp_path, 4, rebuild_all, probe_bytes=8 << 20)
    assert s["rebuilt_tensors"] > 0 and s["rebuild_missed"] == 0, s
    assert fo.compare(base, record) == []
