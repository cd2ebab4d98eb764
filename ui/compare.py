"""Comparing runs: the side-by-side figures, the guide's comparison table filled with measurements,
ratios to a baseline run, the spec settings that differ, and how far each run's loss curve strays from a
baseline run's (runner/job/metrics.py curve_deviation). Pure functions of get_run() dicts and stored series.

Memory efficiency is stated in bytes, not words: the model state the largest rank held between steps
(its parameters, gradients and optimizer state, as the job measured them; a rank without a `grad_bytes`
figure holds one gradient per parameter it holds when training) against what the unsharded run holds --
a compared run of the same model, workload and dtype whose ranks hold the whole model (plain data
parallelism, 'single'), measured; else the whole model's state computed from its parameter count
(parameters, and in training a gradient and AdamW's two moments each, at the run's bytes per element).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from runner.gpt.config import count_parameters
from runner.job.metrics import curve_deviation, relative_deviations
from runner.spec.converge_layouts import judge
from runner.spec.run_spec import RunSpec
from ui.verify import verdict


def _ranks(run: dict) -> list[dict]:
    return run.get("ranks") or []


def payload_bytes(rank: dict) -> int:
    """Payload bytes a rank sent, all kinds: point-to-point counts once, at the sender.

    Runs recorded before that convention also counted the receiving side as `recv`; leaving it out puts
    old and new runs on the same footing.
    """
    return sum(n for kind, n in (rank.get("comm_bytes") or {}).items() if kind != "recv")


def wire_mib_per_step(ranks: list[dict], steps: int) -> float | None:
    """Estimated wire MiB per timed step of the busiest rank; None for runs recorded without wire estimates."""
    wires = [sum(r["comm_wire_bytes"].values()) for r in ranks if r.get("comm_wire_bytes") is not None]
    return max(wires) / steps / 2**20 if wires else None


def run_figures(run: dict) -> dict[str, Any]:
    """One row of measured figures for a finished run (a get_run dict: its stored degrees and world size)."""
    r = run.get("result") or {}
    spec = RunSpec.from_dict(run["spec"])  # the model's dimensions and the schedule
    ranks = _ranks(run)
    busy = sum(x["compute_s"] + x["comm_s"] + x["idle_s"] for x in ranks) or float("nan")
    steps = max(len(r.get("step_times_s") or []), 1)
    full_params = count_parameters(spec.model_config())
    tp, pp, dp = run["tp"], run["pp"], run["dp"]
    return {
        "run": run["id"],
        "strategy": spec.strategy,
        "degrees": f"tp{tp} pp{pp} dp{dp}"
        + (f" m{spec.microbatches} {spec.schedule}" if spec.uses_microbatches else ""),
        "ranks": run["world_size"],
        "model": spec.model,
        "workload": spec.workload,
        "verify": verdict(r.get("verify")),
        "tokens_per_s": r.get("tokens_per_s"),
        "step_time_s_p50": r.get("step_time_s_p50"),
        "peak_tensor_mib_max": _max_mib(ranks, "peak_tensor_bytes"),
        "peak_mem_mib_max": max((x["peak_mem_bytes"] for x in ranks), default=float("nan")) / 2**20,
        "peak_rss_mib_max": _max_mib(ranks, "peak_rss_bytes"),
        "params_share_max": max((x["param_count"] for x in ranks), default=float("nan")) / full_params,
        "state_mib_max": _max_mib([{"state": state_bytes(x, spec.workload)} for x in ranks], "state"),
        "compute_share": sum(x["compute_s"] for x in ranks) / busy,
        "comm_share": sum(x["comm_s"] for x in ranks) / busy,
        "idle_share": sum(x["idle_s"] for x in ranks) / busy,
        "comm_mib_per_step": sum(payload_bytes(x) for x in ranks) / steps / 2**20,
        "wire_mib_per_rank_step": wire_mib_per_step(ranks, steps),
        "messages_per_step": sum(sum((x.get("comm_calls") or {}).values()) for x in ranks) / steps,
        "bubble_measured": r.get("bubble_fraction"),
        "bubble_theory": r.get("bubble_fraction_theory"),
        "mfu": r.get("mfu"),
        "gflops": r.get("achieved_gflops"),
    }


def _max_mib(ranks: list[dict], key: str) -> float | None:
    values = [x[key] for x in ranks if x.get(key) is not None]
    return max(values) / 2**20 if values else None


def state_bytes(rank: dict, workload: str) -> int | None:
    """Model-state bytes a rank held between steps: parameters, gradients and optimizer state (training)."""
    params = rank.get("param_bytes")
    if params is None:
        return None
    if workload != "train":
        return params
    grads = rank.get("grad_bytes")
    # Only sharded gradients (ZeRO 2, 3) differ from the parameters; older runs did not record them.
    return params + (params if grads is None else grads) + (rank.get("optimizer_bytes") or 0)


def _largest_state(run: dict) -> dict | None:
    """The rank holding the most model state, or None without figures."""
    workload = run["spec"].get("workload", "train")
    held = [(state_bytes(x, workload), x) for x in _ranks(run) if state_bytes(x, workload) is not None]
    return max(held, key=lambda h: h[0])[1] if held else None


def _holds_whole_model(run: dict) -> bool:
    spec = RunSpec.from_dict(run["spec"])
    ranks = _ranks(run)
    full = count_parameters(spec.model_config())
    unsharded = all(not x.get("zero_stage") for x in ranks)
    return bool(ranks) and unsharded and all(x.get("param_count") == full for x in ranks)


def unsharded_reference(run: dict, runs: list[dict]) -> tuple[int, str] | None:
    """(bytes, where from) that one rank of the unsharded run holds, for the same model, workload and dtype."""
    spec = RunSpec.from_dict(run["spec"])
    same = (spec.model_config(), spec.workload, spec.dtype)
    for other in runs:
        o = RunSpec.from_dict(other["spec"])
        if other.get("result") and (o.model_config(), o.workload, o.dtype) == same and _holds_whole_model(other):
            rank = _largest_state(other)
            if rank is not None:
                return state_bytes(rank, o.workload), f"#{other['id']} {o.strategy}, measured"
    rank = _largest_state(run)
    if rank is None or not rank.get("param_count"):
        return None
    per_element = rank["param_bytes"] / rank["param_count"]
    copies = 4 if spec.workload == "train" else 1  # parameter, gradient, AdamW's exp_avg and exp_avg_sq
    return round(count_parameters(spec.model_config()) * per_element * copies), "whole model, computed"


def memory_efficiency(run: dict, runs: list[dict]) -> str:
    """The guide table's memory cell: the largest rank's model state against the unsharded run's, in MiB."""
    rank = _largest_state(run)
    ref = unsharded_reference(run, runs)
    if rank is None or ref is None:
        return "—"
    workload = run["spec"].get("workload", "train")
    held = state_bytes(rank, workload)
    parts = f"parameters {rank['param_bytes'] / 2**20:.2f}"
    if workload == "train":
        grads = rank["param_bytes"] if rank.get("grad_bytes") is None else rank["grad_bytes"]
        parts += f" + gradients {grads / 2**20:.2f} + optimizer {(rank.get('optimizer_bytes') or 0) / 2**20:.2f}"
    zero = f", ZeRO-{rank['zero_stage']}" if rank.get("zero_stage") else ""
    return (f"{held / 2**20:.2f} MiB per rank ({parts}{zero}) = {held / ref[0]:.2f}x the unsharded "
            f"{ref[0] / 2**20:.2f} MiB ({ref[1]})")  # fmt: skip


def comparison_table(runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([run_figures(r) for r in runs if r.get("result")])


def with_baseline(table: pd.DataFrame, baseline: int) -> pd.DataFrame:
    """Every numeric figure divided by the baseline run's (1.0 is the baseline itself)."""
    if table.empty or baseline not in set(table["run"]):
        return table
    numeric = table.select_dtypes("number").columns.drop(["run", "ranks"], errors="ignore")
    base = table.loc[table["run"] == baseline, numeric].iloc[0]
    out = table.copy()
    out[numeric] = table[numeric] / base.where(base != 0)
    return out


def _level(value: float, good: float, bad: float, higher_is_better: bool) -> str:
    if value != value:  # NaN
        return "—"
    if not higher_is_better:
        value, good, bad = -value, -good, -bad
    return "excellent" if value >= good else "poor" if value <= bad else "good"


def guide_table(runs: list[dict]) -> pd.DataFrame:
    """The guide's table (memory efficiency, compute efficiency, communication, complexity), one row per
    run, each cell a measured figure with the guide's word for it."""
    rows = []
    for f in (run_figures(r) for r in runs if r.get("result")):
        kinds = max((sum(1 for v in (x.get("comm_calls") or {}).values() if v) for x in _ranks(_find(runs, f["run"]))),
                    default=0)  # fmt: skip
        rows.append({
            "run": f"#{f['run']} {f['strategy']} ({f['degrees']})",
            "memory efficiency": memory_efficiency(_find(runs, f["run"]), runs),
            "compute efficiency": f"{_level(f['compute_share'], 0.75, 0.5, True)}: ranks compute "
                                  f"{f['compute_share']:.0%} of the time, idle {f['idle_share']:.0%}",
            "communication": f"{_level(f['comm_share'], 0.1, 0.3, False)}: {f['comm_mib_per_step']:.2f} MiB "
                             f"payload per step{_wire(f['wire_mib_per_rank_step'])}, {f['comm_share']:.0%} of the time",
            "complexity": f"{kinds} kind(s) of collective, {f['messages_per_step']:.0f} messages per step",
        })  # fmt: skip
    return pd.DataFrame(rows)


def _wire(mib: float | None) -> str:
    return f" ({mib:.2f} MiB on the wire from the busiest rank)" if mib is not None else ""


def _find(runs: list[dict], run_id: int) -> dict:
    return next(r for r in runs if r["id"] == run_id)


def spec_differences(runs: list[dict]) -> pd.DataFrame:
    """Spec fields (rows) that differ between the runs (columns); empty when all specs are equal."""
    if not runs:
        return pd.DataFrame()
    keys = sorted({k for r in runs for k in r["spec"]})
    rows = {}
    for k in keys:
        values = [r["spec"].get(k) for r in runs]
        if len({repr(v) for v in values}) > 1:
            rows[k] = [", ".join(v) if isinstance(v, list) else v for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"#{r['id']}" for r in runs])


TRAINING_FIELDS = ("model", "data", "seed", "batch", "seq", "lr", "dtype", "workload")


def shared_training(runs: list[dict]) -> str | None:
    """The dtype of runs that trained the same model on the same data, seed, batch and learning rate -- whose
    curves the convergence bound judges (runner/spec/converge_layouts.py) -- else None."""
    specs = [RunSpec.from_dict(r["spec"]) for r in runs]
    keys = {tuple(getattr(s, f) for f in TRAINING_FIELDS) for s in specs}
    return specs[0].dtype if len(keys) == 1 and specs[0].workload == "train" else None


def curve_baseline(runs: list[dict], chosen: int | None) -> int | None:
    """The run the loss curves are measured against: the one chosen, else the first single-device run, else
    the first run."""
    if chosen is not None or not runs:
        return chosen
    return next((r["id"] for r in runs if r["spec"].get("strategy") == "single"), runs[0]["id"])


def loss_deviations(curves: pd.DataFrame, baseline: int, labels: dict[int, str],
                    dtype: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """(one row per run: steps compared, largest relative deviation of its training loss from the baseline's
    in the dtype's early window (float32 without a dtype) and overall with the step of it, the same for the held-out loss, its last
    losses, and with `dtype` (runs that trained alike, shared_training) the convergence check's verdict; one row
    per run and step: the training loss's relative deviation), from api.loss_curves."""
    by_run = {int(k): g for k, g in curves.groupby("run_id")}

    def series(run_id: int, column: str) -> dict[int, float | None]:
        g = by_run.get(run_id)
        if g is None:
            return {}
        return {int(s): (None if pd.isna(v) else float(v)) for s, v in zip(g["step"], g[column], strict=True)}

    rows, steps = [], []
    base_train, base_eval = series(baseline, "loss"), series(baseline, "eval_loss")
    for run_id in by_run:
        judged = judge(base_train, series(run_id, "loss"), dtype or "float32")
        train = judged.whole
        held = curve_deviation(base_eval, series(run_id, "eval_loss"))
        last = by_run[run_id].dropna(subset=["loss"]).tail(1)
        last_eval = by_run[run_id].dropna(subset=["eval_loss"]).tail(1)
        rows.append({
            "run": labels.get(run_id, f"#{run_id}"), "baseline": run_id == baseline, "steps compared": train.steps,
            "early deviation": judged.early_judged if judged.early.steps else None,
            "largest deviation": train.largest if train.steps else None, "at step": train.at_step,
            "held-out deviation": held.largest if held.steps else None,
            "last loss": float(last["loss"].iloc[0]) if len(last) else None,
            "last held-out loss": float(last_eval["eval_loss"].iloc[0]) if len(last_eval) else None,
            **({"verdict": "baseline" if run_id == baseline else judged.verdict} if dtype else {}),
        })  # fmt: skip
        if run_id != baseline:
            for step, dev in relative_deviations(base_train, series(run_id, "loss")).items():
                steps.append({"run": labels.get(run_id, f"#{run_id}"), "step": step, "deviation": dev})
    return pd.DataFrame(rows), pd.DataFrame(steps, columns=["run", "step", "deviation"])
