"""Comparing runs: the side-by-side figures, the guide's comparison table filled with measurements,
ratios to a baseline run, and the spec settings that differ. Pure functions of get_run() dicts."""

from __future__ import annotations

from typing import Any

import pandas as pd

from runner.gpt.config import count_parameters
from runner.spec import RunSpec
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
        "peak_mem_mib_max": max((x["peak_mem_bytes"] for x in ranks), default=float("nan")) / 2**20,
        "peak_rss_mib_max": _max_mib(ranks, "peak_rss_bytes"),
        "params_share_max": max((x["param_count"] for x in ranks), default=float("nan")) / full_params,
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
            "memory efficiency": f"{_level(f['params_share_max'], 0.3, 0.9, False)}: largest rank holds "
                                 f"{f['params_share_max']:.0%} of the parameters",
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
