"""Two ranks under torchrun, each offloading with spillway (ddp_offload.py): gradients
bitwise equal to training without offloading, each rank on storage of its own. Runs on
CPU ranks with gloo; the GPU suite runs the same script on two GPUs with NCCL."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

# The test command sets SPILLWAY_REQUIRE_TORCH=1: there, no torch is a failure, not a skip.
torch = __import__("torch") if os.environ.get("SPILLWAY_REQUIRE_TORCH") else pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

SCRIPT = pathlib.Path(__file__).with_name("ddp_offload.py")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


def torchrun(tmp_path, *args, env=None):
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), "--json", str(out), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPILLWAY_")}
    full_env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **(env or {}))
    run = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    for r in report["ranks"]:
        assert f"rank {r['rank']} (host, {r['engine_path']})" in run.stdout, run.stdout
    return report


def check_trained_alike(report):
    assert report["all_bitwise_equal"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    for r in report["ranks"]:
        assert r["differences"] == []
        assert r["bytes_written"] > 0 and r["bytes_fetched"] > 0 and r["offloaded_tensors"] > 0


def test_a_shared_file_name_becomes_one_file_per_rank(tmp_path):
    report = torchrun(tmp_path, "--path", str(tmp_path / "spill.bin"))
    check_trained_alike(report)
    paths = [r["engine_path"] for r in report["ranks"]]
    assert paths == [str(tmp_path / "spill.rank0.bin"), str(tmp_path / "spill.rank1.bin")]
    assert all(pathlib.Path(p).is_file() for p in paths), "named files are kept"
    assert not (tmp_path / "spill.bin").exists()
    for r in report["ranks"]:
        assert any(f"local rank {r['local_rank']} (LOCAL_RANK)" in n for n in r["notes"]), r["notes"]


def test_rank_paths_give_each_rank_its_directory_and_leave_nothing(tmp_path):
    dirs = [tmp_path / "nvme0", tmp_path / "nvme1"]
    for d in dirs:
        d.mkdir()
    report = torchrun(tmp_path, env={"SPILLWAY_RANK_PATHS": f"0={dirs[0]};1={dirs[1]}"})
    check_trained_alike(report)
    assert [r["engine_path"] for r in report["ranks"]] == [str(d) for d in dirs]
    assert all(not any(d.iterdir()) for d in dirs), "anonymous files leave nothing behind"


def test_a_rank_missing_from_rank_paths_is_refused_by_name(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPILLWAY_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", SPILLWAY_RANK_PATHS=f"0={tmp_path}")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "rank_paths has no entry for local rank 1" in run.stdout + run.stderr
