#!/usr/bin/env python3
"""PNG plots of spillway's results files.

    python3 benches/plot.py FILE.json [FILE.json ...] [--out-dir DIR]

Each file becomes one PNG beside it (or in --out-dir), named after it. The kind of file is
told from its shape:

- `spillway bench --sweep --json` (or `--out`): GB/s against queue depth, one line per
  block size, one panel per thread count and op.
- `benches/vs_kvikio.py`: GB/s against threads, one line per tool (and request size), one
  panel per target and op.
- `spillway bench --json` (one object per op, per line) and `benches/*` files with a `runs`
  list of such objects: GB/s per op.
- `benches/train_gpt.py` and `benches/rok_grid.py`: the ROK curve, step time against
  activation memory, one point per run, with its ratios to the baseline.

Needs matplotlib (`pip install matplotlib`). A file of any other shape is refused, naming
the shapes known.
"""

import argparse
import json
import os
import sys

KNOWN = "a sweep (bench --sweep), vs_kvikio.py, bench --json, train_gpt.py / rok_grid.py"


def load(path):
    """The JSON value in `path`: one document, or one object per line (bench --json)."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON, nor one JSON value per line ({e})")


def kind_of(data):
    """Which plot `data` takes, or None."""
    if isinstance(data, dict) and "sweep" in data and "points" in data:
        return "sweep"
    if isinstance(data, dict) and isinstance(data.get("points"), list) and data["points"] and "tools" in data["points"][0]:
        return "tools"
    if isinstance(data, list) and data and all(isinstance(r, dict) and "throughput_gbps" in r for r in data):
        return "bench"
    if isinstance(data, dict) and isinstance(data.get("runs"), dict) and any(
        isinstance(r, dict) and "step_ms" in r for r in data["runs"].values()
    ):
        return "training"
    return None


def gbps_panel(ax, xs, xlabel, title):
    """A panel of GB/s against `xs` (powers of two, on a log scale, each marked)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("GB/s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_sweep(data, plt):
    points = data["points"]
    threads = sorted({p["threads"] for p in points})
    ops = sorted({r["op"] for p in points for r in p["results"]}, key=lambda o: (o != "write", o))
    fig, axes = plt.subplots(len(threads), len(ops), figsize=(5 * len(ops), 3.5 * len(threads)), squeeze=False)
    for i, t in enumerate(threads):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            for block in sorted({p["block"] for p in points}):
                xs, ys = [], []
                for p in sorted((p for p in points if p["threads"] == t and p["block"] == block), key=lambda p: p["qd"]):
                    for r in p["results"]:
                        if r["op"] == op:
                            xs.append(p["qd"])
                            ys.append(r["throughput_gbps"])
                if xs:
                    ax.plot(xs, ys, marker="o", label=f"block {human(block)}")
            gbps_panel(ax, sorted({p["qd"] for p in points}), "queue depth", f"{op}, {t} thread{'s' if t > 1 else ''}")
    s = data["sweep"]
    fig.suptitle(f"spillway bench --sweep: {s.get('memory', '')} ↔ {s.get('path', '')}, {s.get('backend', '')}")
    fig.tight_layout()
    return fig


def plot_tools(data, plt):
    points = data["points"]
    panels = sorted({(p["dir"], p["size"]) for p in points})
    ops = ["write", "read"]
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.8 * len(panels)), squeeze=False)
    tools = sorted({t for p in points for t in p["tools"]})
    requests = sorted({p["request"] for p in points})
    styles = ["-", "--", ":", "-."]
    for i, (d, size) in enumerate(panels):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            for ti, tool in enumerate(tools):
                for ri, req in enumerate(requests):
                    sel = sorted(
                        (p for p in points if p["dir"] == d and p["size"] == size and p["request"] == req and tool in p["tools"]),
                        key=lambda p: p["threads"],
                    )
                    if sel:
                        ax.plot(
                            [p["threads"] for p in sel],
                            [p["tools"][tool][f"{op}_gbps"] for p in sel],
                            linestyle=styles[ri % len(styles)],
                            color=f"C{ti}",
                            marker="o",
                            label=f"{tool}, {human(req)} requests",
                        )
            gbps_panel(ax, sorted({p["threads"] for p in points}), "threads", f"{op}: {d}, {human(size)}")
    fig.suptitle(data.get("what", "throughput against threads"))
    fig.tight_layout()
    return fig


def plot_bench(data, plt):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['op']}\n{human(r.get('block_size', 0))}, qd {r.get('queue_depth')}, {r.get('threads')} thr" for r in data]
    ax.bar(range(len(data)), [r["throughput_gbps"] for r in data], color="C0")
    ax.set_xticks(range(len(data)), labels, fontsize=7)
    ax.set_ylabel("GB/s")
    first = data[0]
    ax.set_title(f"spillway bench: {first.get('memory', '')} ↔ {first.get('path', '')} ({first.get('backend', '')})")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_training(data, plt):
    """The ROK curve: step time against activation memory, one point per run, with each
    run's ratios to the baseline and the 1.05x step-time line."""
    runs = {k: r for k, r in data["runs"].items() if isinstance(r, dict) and r.get("ok", True) and "step_ms" in r}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    base = runs.get("baseline")
    # Activation memory: the forward peak where recorded (older files: the step's peak).
    key = "fwd_act_mem_bytes" if all("fwd_act_mem_bytes" in r for r in runs.values()) else "act_mem_bytes"
    for name, r in runs.items():
        x, y = r.get(key, 0) / 2**30, r["step_ms"]
        ax.scatter([x], [y], s=40)
        label = name
        if base and base.get(key) and base["step_ms"]:
            label += f" ({y / base['step_ms']:.2f}x time, {r.get(key, 0) / base[key]:.2f}x mem)"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if base:
        ax.axhline(base["step_ms"] * 1.05, color="grey", linestyle="--", linewidth=0.8)
        ax.text(0, base["step_ms"] * 1.05, " 1.05x baseline", fontsize=7, va="bottom")
    ax.set_xlabel("activation memory: forward's peak above its start (GiB)" if key == "fwd_act_mem_bytes"
                  else "activation memory: the step's peak above its start (GiB)")
    ax.set_ylabel("step time (ms)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    m, o = data.get("model", {}), data.get("options", {})
    shape = (
        f"{o.get('arch', '')} hidden {m.get('d_model')}, {m.get('n_layer')} layers, seq {m.get('seq_len')}, "
        f"micro-batch {o.get('batch', '?')}"
        if m
        else data.get("benchmark", "")
    )
    ax.set_title(f"{data.get('device', '')}: {shape}", fontsize=9)
    fig.tight_layout()
    return fig


PLOTS = {"sweep": plot_sweep, "tools": plot_tools, "bench": plot_bench, "training": plot_training}


def human(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def plot_file(path, out_dir=None):
    """Draws the plot of the results file `path`; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load(path)
    if isinstance(data, dict) and isinstance(data.get("runs"), list) and kind_of(data["runs"]) == "bench":
        data = data["runs"]
    kind = kind_of(data)
    if kind is None:
        keys = sorted(data)[:12] if isinstance(data, dict) else f"a list of {len(data)}"
        raise ValueError(f"{path}: no plot known for this shape (keys: {keys}); known: {KNOWN}")
    fig = PLOTS[kind](data, plt)
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    png = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [png]


def main(argv=None):
    ap = argparse.ArgumentParser(description="PNG plots of spillway's results files (see the module help).")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out-dir", help="where the PNGs go (default: beside each file)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        ap.error("matplotlib is not installed: pip install matplotlib")
    failed = 0
    for f in args.files:
        try:
            for png in plot_file(f, args.out_dir):
                print("wrote", png)
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
