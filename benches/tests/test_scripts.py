"""Tests of the benchmark scripts that run without a GPU: benches/plot.py on every shape of
results file it knows, and the harness of benches/vs_kvikio.py with spillway alone on host
memory (KvikIO itself needs a GPU)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
BENCHES = HERE.parent
ROOT = BENCHES.parent
sys.path.insert(0, str(BENCHES))

import plot  # noqa: E402
import vs_kvikio  # noqa: E402

# The test command installs matplotlib and asks every test to run (SPILLWAY_REQUIRE_TORCH):
# there a missing matplotlib fails; elsewhere these tests skip, saying why.
if os.environ.get("SPILLWAY_REQUIRE_TORCH"):
    import matplotlib  # noqa: F401
else:
    pytest.importorskip("matplotlib")


def spillway_bin():
    path = os.environ.get("SPILLWAY_BIN") or str(ROOT / "target" / "debug" / "spillway")
    if not os.path.exists(path):
        pytest.fail(f"{path} not built: run cargo build first (scripts/test.sh does)")
    return path


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_bench_json_lines_are_plotted(tmp_path):
    out = subprocess.run(
        [spillway_bin(), "bench", "--mem", "host", "--size", "2M", "--path", str(tmp_path), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    f = tmp_path / "bench.json"
    f.write_text(out)
    (png,) = plot.plot_file(str(f))
    assert is_png(png)


def test_a_sweep_is_plotted(tmp_path):
    def result(op, gbps):
        return {"op": op, "throughput_gbps": gbps}

    points = [
        {"block": b, "qd": q, "threads": t, "results": [result("write", b / 1e6 * q), result("read", q * t)]}
        for b in (65536, 1 << 20) for q in (1, 16) for t in (1, 2)
    ]
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps({"sweep": {"memory": "host", "path": "/tmp", "backend": "uring"}, "points": points}))
    (png,) = plot.plot_file(str(f))
    assert is_png(png) and png.endswith("sweep.png")


def test_a_training_result_is_plotted(tmp_path):
    src = BENCHES / "results" / "train-gpt-h200.json"
    data = json.loads(src.read_text())
    f = tmp_path / "train.json"
    f.write_text(json.dumps(data))
    (png,) = plot.plot_file(str(f))
    assert is_png(png)


def test_an_unknown_shape_is_refused_naming_the_known_ones(tmp_path):
    f = tmp_path / "other.json"
    f.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="no plot known.*sweep"):
        plot.plot_file(str(f))
    r = subprocess.run([sys.executable, str(BENCHES / "plot.py"), str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "no plot known" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = subprocess.run([sys.executable, str(BENCHES / "plot.py"), str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "not JSON" in r.stderr


def test_the_kvikio_harness_runs_spillway_checks_bytes_and_plots(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, str(BENCHES / "vs_kvikio.py"), "--dir", str(tmp_path), "--sizes", "2MiB",
         "--requests", "1MiB", "--threads", "1,2", "--repeats", "2", "--tools", "spillway", "--mem", "host",
         "--spillway", spillway_bin(), "--out-dir", str(out), "--name", "harness"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "harness.json").read_text())
    assert [p["threads"] for p in data["points"]] == [1, 2]
    for p in data["points"]:
        s = p["tools"]["spillway"]
        assert len(s["runs"]) == 2 and all(run["verified"] for run in s["runs"])
        assert s["write_gbps"] > 0 and s["read_gbps"] > 0
    assert data["targets"] == [] and data["targets_met"] is None  # one tool: nothing to compare
    assert is_png(out / "harness.png")


def test_the_kvikio_targets_follow_the_issue():
    def point(tmpfs, w, r):
        return {"dir": "/x", "tmpfs": tmpfs, "size": 1, "request": 1, "threads": 4, "ratio": {"write": w, "read": r}}

    # tmpfs: writes >= 1.2x, reads >= 1.0x; a disk: >= 1.0x each way.
    checks = vs_kvikio.targets([point(True, 1.25, 0.99), point(False, 1.0, 1.0), point(True, 1.1, 1.5)])
    assert [(c["op"], c["target"], c["met"]) for c in checks] == [
        ("write", 1.2, True), ("read", 1.0, False),
        ("write", 1.0, True), ("read", 1.0, True),
        ("write", 1.2, False), ("read", 1.0, True),
    ]


def test_bad_harness_arguments_are_refused(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(BENCHES / "vs_kvikio.py"), *args], capture_output=True, text=True)

    r = run("--dir", str(tmp_path / "missing"), "--tools", "spillway")
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run("--dir", str(tmp_path), "--tools", "spillway,fio")
    assert r.returncode == 2 and "unknown ['fio']" in r.stderr
    r = run("--dir", str(tmp_path), "--threads", "0")
    assert r.returncode == 2 and "numbers >= 1" in r.stderr
    r = run("--dir", str(tmp_path), "--sizes", "lots")
    assert r.returncode == 2 and "a size such as" in r.stderr


def test_the_grid_summary_reads_grid_files_and_skips_others(tmp_path):
    import rok_grid

    src = BENCHES / "results" / "rok-h100-gpt-h16384-s1024.json"
    (tmp_path / "rok-h100-gpt-h16384-s1024.json").write_text(src.read_text())
    (tmp_path / "rok-max-batch-h100.json").write_text(json.dumps({"benchmark": "max_batch", "runs": {}}))
    out = subprocess.run([sys.executable, str(BENCHES / "rok_grid.py"), "--summary", "--out-dir", str(tmp_path)],
                         check=True, capture_output=True, text=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| h100-gpt-h16384-s1024 ")]
    data = json.loads(src.read_text())
    assert len(rows) == len(data["runs"]), out
    base = next(r for r in rows if "| baseline |" in r)
    assert "| 0% |" in base  # the baseline saves nothing against itself
    assert rok_grid.gpu_short_name("NVIDIA H100 80GB HBM3") == "h100"
    assert rok_grid.gpu_short_name("NVIDIA A100-SXM4-80GB") == "a100"
