"""A training run against the baseline (benches/train_gpt.py's runs): plain Python, so that
the scripts reading results (rok_grid.py --summary) need no torch."""

import importlib.util
import os
import sys

_PLANNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "crates", "python", "python",
                        "spillway", "torch", "planner.py")


def _planner():
    """spillway.torch's planner, loaded once from its file (it is plain Python; the package
    around it needs torch)."""
    name = "spillway_planner_for_benches"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _PLANNER)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


def schedule_bound_bytes(result):
    """The bytes freed at forward's peak by the schedule the measured step allows, forward
    never waiting (the planner's schedule_bound): from the step the run planned from
    (policy.profile) and the bandwidth it measured. None without a profile."""
    policy = result.get("policy") or {}
    data = policy.get("profile")
    write, read = policy.get("write_gbps"), policy.get("read_gbps")
    if not data or not write:
        return None
    p = _planner()
    tiers = p.Tiers.measured(write, read or write, policy.get("host_tier_bytes") or 0)
    return p.schedule_bound(p.Profile.from_dict(data), tiers)


def ratios_to(baseline, result):
    """The run's step time and peak against the baseline's, the memory it saved (forward's
    peak, and the step's peak above its start), what it freed beside the physics bound, and
    its loss's difference; None when either run failed."""
    if not (baseline and baseline.get("ok") and result.get("ok")):
        return None

    def ratio(key):
        b, r = baseline.get(key), result.get(key)
        return r / b if b else None

    def saved(key):
        b, r = baseline.get(key), result.get(key)
        return 1.0 - r / b if b and r is not None else None

    # Measured beside the bound: the bytes this run freed at forward's peak (against the
    # baseline's), as a fraction of the layers' estimated bytes, over the fraction the
    # physics allows at the write bandwidth it measured.
    phys = result.get("physics") or {}
    freed = None
    if phys.get("layer_bytes_estimate") and baseline.get("fwd_act_mem_bytes") is not None \
            and result.get("fwd_act_mem_bytes") is not None:
        freed = (baseline["fwd_act_mem_bytes"] - result["fwd_act_mem_bytes"]) / phys["layer_bytes_estimate"]
    # The same against what can be freed at all: the bound's bytes, but no more than
    # forward's peak above the working-set floor (forward with nothing saved, measured in
    # the baseline run: every tensor still lives while it is used).
    achievable = None
    floor = baseline.get("no_grad_fwd_peak_bytes")
    if freed is not None and phys.get("bound_fraction") and floor is not None:
        above_floor = max(baseline["fwd_act_mem_bytes"] - floor, 0)
        achievable = min(phys["bound_fraction"] * phys["layer_bytes_estimate"], above_floor)
    freed_bytes = None if freed is None else freed * phys["layer_bytes_estimate"]
    schedule = schedule_bound_bytes(result) if freed_bytes is not None else None
    return {
        "step_time": ratio("step_ms"),
        "peak_mem": ratio("peak_mem_bytes"),
        "fwd_act_mem_saved": saved("fwd_act_mem_bytes"),
        "act_mem_saved": saved("act_mem_bytes"),
        "freed_fraction": freed,
        "freed_vs_bound": freed / phys["bound_fraction"] if freed is not None and phys.get("bound_fraction") else None,
        "freed_vs_achievable": freed_bytes / achievable if achievable else None,
        "freed_vs_schedule_bound": freed_bytes / schedule if schedule else None,
        "loss_delta": result["loss"] - baseline["loss"],
    }
