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


# benches/integrations.py: Hugging Face's Trainer and Lightning, with and without spillway,
# on the CPU with --small (every run of both frameworks), with a framework's package made
# unimportable (a stand-in package on PYTHONPATH whose import fails), and with bad options.

INTEGRATIONS = BENCHES / "integrations.py"


def integrations_need(*names):
    """Skips without the packages (found, not imported: importing transformers takes
    seconds); where the test command asks every test to run, a missing one fails."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing and os.environ.get("SPILLWAY_REQUIRE_TORCH"):
        pytest.fail(f"{', '.join(missing)} not installed (scripts/test.sh installs them)")
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


def run_integrations(tmp_path, *args, env=None):
    """Runs the bench at --small on the CPU; returns (the process, its JSON or None)."""
    out = tmp_path / "int.json"
    cmd = [sys.executable, str(INTEGRATIONS), "--small", "--device", "cpu", "--path", str(tmp_path),
           "--out", str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return r, (json.loads(out.read_text()) if out.exists() else None)


def blocking(tmp_path, *packages):
    """An environment where the packages look uninstalled: a sitecustomize module on
    PYTHONPATH puts None in sys.modules for each, so importing one fails and
    importlib.util.find_spec finds none (packages that probe for them go on without)."""
    site = tmp_path / "blocked"
    site.mkdir(parents=True)  # tmp_path too, where it is a new directory
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({list(packages)!r}))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_the_integrations_bench_runs_every_run_of_both_frameworks_on_the_cpu(tmp_path):
    import math

    integrations_need("torch", "transformers", "lightning", "spillway")
    r, data = run_integrations(tmp_path, "--steps", "3", "--warmup", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr

    assert data["benchmark"] == "integrations"
    assert "integrations.py --small --device cpu" in data["command"] and "--steps 3" in data["command"]
    assert data["model"] == {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 1, "intermediate": 256,
                             "vocab": 128, "seq": 32, "batch": 2, "dtype": "bf16", "attn_implementation": "sdpa",
                             "params": data["model"]["params"]} and data["model"]["params"] > 0
    assert data["spillway_options"] == {"policy": "adaptive", "host_tier": "64MiB", "min_tensor_bytes": 0,
                                        "path": str(tmp_path)}
    assert data["device"].startswith("cpu")
    assert all(data["versions"][p] for p in ("python", "torch", "transformers", "lightning", "spillway"))
    assert data["skipped"] == {}

    runs = data["runs"]
    order = [(f, run) for f in ("hf", "lightning")
             for run in ("baseline", "checkpointing", "spillway", "spillway+checkpointing")]
    assert [(x["framework"], x["run"]) for x in runs] == order
    for x in runs:
        name = "%s %s" % (x["framework"], x["run"])
        assert x["ok"], (name, x.get("error"))
        assert len(x["step_ms_all"]) == 3 and x["step_ms"] == sorted(x["step_ms_all"])[1] > 0, name
        assert x["peak_mem_bytes"] is None and x["act_mem_bytes"] is None, name  # no allocator counters on CPU
        assert math.isfinite(x["loss"]) and len(x["losses"]) == 3, name
        assert (x["checkpointing_call"] is not None) == x["run"].endswith("checkpointing"), name
        base = next(b for b in runs if b["framework"] == x["framework"] and b["run"] == "baseline")
        # Same weights, same data: spillway and checkpointing change no loss.
        assert x["loss"] == pytest.approx(base["loss"], rel=1e-3), name
        assert x["vs_baseline"]["step_time"] == pytest.approx(x["step_ms"] / base["step_ms"]), name
        assert x["vs_baseline"]["peak_mem"] is None and x["vs_baseline"]["act_mem_saved"] is None, name
        if x["run"].startswith("spillway"):
            s = x["spillway"]
            # --small offloads every saved tensor it may: bytes go out and come back each step.
            assert s["offloaded_bytes_per_step"] > 0 and s["fetched_bytes_per_step"] > 0, name
            assert s["policy"]["mode"] == "adaptive" and s["policy"]["reason"], name
            assert s["policy"]["segments"] == 3, name  # before the first layer, and one per layer
        else:
            assert x["spillway"] is None, name
    lightning = next(x for x in runs if x["framework"] == "lightning")
    assert lightning["lightning_package"] in ("lightning", "pytorch_lightning")

    table = r.stdout.splitlines()  # the table alone: the runs' output goes to stderr
    assert table[0].startswith("| framework | run | step ms |") and table[1].startswith("|---|")
    assert len(table) == 2 + len(order) and all(line.startswith("| ") for line in table[2:])
    assert "| hf | spillway+checkpointing | " in r.stdout and "failed" not in r.stdout


def test_the_integrations_bench_skips_a_framework_it_cannot_import(tmp_path):
    integrations_need("torch")
    # The first run says why; the framework's other runs are not started.
    r, data = run_integrations(tmp_path / "hf", "--frameworks", "hf", "--runs", "baseline,spillway",
                               env=blocking(tmp_path / "hf", "transformers"))
    assert r.returncode == 1, r.stderr[-3000:]  # no run succeeded
    assert "Traceback" not in r.stderr
    assert r.stderr.count("--child ") == 1
    assert [(x["framework"], x["run"], x["ok"], x["skipped"]) for x in data["runs"]] == [
        ("hf", "baseline", False, True), ("hf", "spillway", False, True)]
    reason = data["skipped"]["hf"]
    assert reason.startswith("transformers cannot be imported") and reason.endswith("pip install 'spillway[hf]'")
    assert all(x["error"] == reason for x in data["runs"])
    assert "| hf | baseline | skipped: transformers cannot be imported" in r.stdout

    integrations_need("transformers")
    r, data = run_integrations(tmp_path / "lightning", "--frameworks", "lightning", "--runs", "baseline",
                               env=blocking(tmp_path / "lightning", "lightning", "pytorch_lightning"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (x,) = data["runs"]
    assert x["skipped"] and not x["ok"]
    reason = data["skipped"]["lightning"]
    assert reason.startswith("lightning cannot be imported") and reason.endswith("pip install 'spillway[lightning]'")
    assert "spillway[hf]" not in reason  # transformers is there


def test_bad_integrations_options_are_refused(tmp_path):
    import importlib.util

    def run(*args):
        return subprocess.run([sys.executable, str(INTEGRATIONS), *args], capture_output=True, text=True, timeout=120)

    out = ("--out", str(tmp_path / "x.json"))
    r = run("--runs", "baseline,fast", *out)
    assert r.returncode == 2
    assert "unknown run(s) fast; choose from baseline,checkpointing,spillway,spillway+checkpointing" in r.stderr
    r = run("--frameworks", "hf,jax", *out)
    assert r.returncode == 2 and "unknown framework(s) jax; choose from hf,lightning" in r.stderr
    r = run("--small")
    assert r.returncode == 2 and "the following arguments are required: --out" in r.stderr
    r = run("--hidden", "100", "--heads", "3", *out)
    assert r.returncode == 2 and "--hidden (100) must be a multiple of --heads (3)" in r.stderr
    r = run("--small", "--steps", "0", *out)
    assert r.returncode == 2 and "--steps must be >= 1" in r.stderr
    r = run("--small", "--path", str(tmp_path / "missing"), *out)
    assert r.returncode == 2 and "is not a directory" in r.stderr
    if importlib.util.find_spec("spillway"):
        r = run("--small", "--host-tier", "lots", *out)
        assert r.returncode == 2 and "not a size: 'lots'" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_the_integrations_bench_records_a_failed_run_with_its_error(tmp_path):
    integrations_need("torch", "transformers", "spillway")
    # A host tier larger than any host: the engine refuses it when the first step makes it.
    r, data = run_integrations(tmp_path, "--frameworks", "hf", "--runs", "spillway", "--host-tier", "1000TiB")
    assert r.returncode == 1, r.stderr[-3000:]  # its only run failed
    (x,) = data["runs"]
    assert not x["ok"] and not x.get("skipped") and x["oom"] is False and x["vs_baseline"] is None
    assert x["error"].startswith("ValueError: host_tier=") and "pinned host memory" in x["error"]
    assert "| hf | spillway | failed: ValueError: host_tier=" in r.stdout


def test_freed_memory_is_set_beside_the_bound_and_the_working_set_floor():
    from ratios import ratios_to

    gib = 2**30
    base = {"ok": True, "step_ms": 100.0, "peak_mem_bytes": 30 * gib, "fwd_act_mem_bytes": 20 * gib,
            "act_mem_bytes": 22 * gib, "loss": 1.0, "no_grad_fwd_peak_bytes": 6 * gib}
    run = {"ok": True, "step_ms": 102.0, "peak_mem_bytes": 20 * gib, "fwd_act_mem_bytes": 9 * gib,
           "act_mem_bytes": 12 * gib, "loss": 1.0,
           "physics": {"layer_bytes_estimate": 16 * gib, "bound_fraction": 1.0}}
    q = ratios_to(base, run)
    assert q["freed_fraction"] == 11 / 16 and q["freed_vs_bound"] == 11 / 16
    # The bound's 16 GiB exceed the 14 GiB the baseline holds above its floor.
    assert q["freed_vs_achievable"] == 11 / 14
    # Without the floor measured, nothing is claimed against it.
    assert ratios_to({**base, "no_grad_fwd_peak_bytes": None}, run)["freed_vs_achievable"] is None


def test_the_grid_halves_the_micro_batch_where_the_baseline_does_not_fit_and_resumes(tmp_path, monkeypatch, capsys):
    # train_gpt.py stood in for: at micro-batch 16 the baseline runs out of memory, at 8
    # every run completes.
    import types

    import rok_grid

    calls = []

    def fake_call(cmd):
        arg = dict(zip(cmd[2::2], cmd[3::2]))
        calls.append((int(arg["--batch"]), arg["--runs"], os.path.basename(arg["--out"])))
        fits = int(arg["--batch"]) <= 8
        runs = {r: ({"ok": True, "run": r} if fits else {"ok": False, "run": r, "error": "OutOfMemoryError: CUDA out of memory."})
                for r in arg["--runs"].split(",")}
        with open(arg["--out"], "w") as f:
            json.dump({"benchmark": "train_gpt", "runs": runs}, f)
        return 0

    monkeypatch.setattr(rok_grid.subprocess, "call", fake_call)
    monkeypatch.setitem(sys.modules, "plot", types.SimpleNamespace(plot_file=lambda path: None))
    grid = ["--gpu-name", "x", "--out-dir", str(tmp_path), "--shapes", "8192x4", "--seqs", "1024"]
    assert rok_grid.main(grid + ["--runs", "baseline,checkpoint"]) == 0
    assert calls == [(16, "baseline,checkpoint", "rok-x-gpt-h8192-s1024-mb16.json"),
                     (8, "baseline,checkpoint", "rok-x-gpt-h8192-s1024-mb8.json")]
    # Resumed with one more run: mb16 is not tried again; the missing run goes to a part
    # file of its own, with a baseline.
    calls.clear()
    assert rok_grid.main(grid + ["--runs", "baseline,checkpoint,spillway-host", "--resume"]) == 0
    assert calls == [(8, "baseline,spillway-host", "rok-x-gpt-h8192-s1024-mb8-part2.json")]
    assert rok_grid.runs_done(str(tmp_path), "rok-x-gpt-h8192-s1024-mb8") == ({"baseline", "checkpoint", "spillway-host"}, False)
    # Everything there: nothing runs.
    calls.clear()
    assert rok_grid.main(grid + ["--runs", "baseline,checkpoint,spillway-host", "--resume"]) == 0
    assert calls == [] and "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        rok_grid.main(grid + ["--batch", "0"])


@pytest.mark.parametrize("flags, message", [
    (["--settle-steps", "-1"], "--settle-steps must be >= 0"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_train_gpt_refuses_bad_step_counts_by_name(flags, message):
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, str(BENCHES / "train_gpt.py"), *flags], capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr, (out.returncode, out.stderr)
