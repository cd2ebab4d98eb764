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
from runner.job.metrics import curve_deviation, relative_deviations, step_number
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
        # a pipeline's microbatches and schedule; elsewhere microbatches only where gradients accumulate
        "degrees": f"tp{tp} pp{pp} dp{dp}"
        + ("" if not spec.uses_microbatches else f" m{spec.microbatches} {spec.schedule}" if pp > 1
            else f" m{spec.microbatches}" if spec.microbatches > 1 else ""),
        "ranks": run["world_size"],
        "model": spec.model,
        "workload": spec.workload,
        # the work the figures measured, beside the layout: two runs alike but for it read alike without it
        "work": f"{spec.batch} x {spec.seq}" + (f" +{spec.new_tokens}" if spec.workload == "generate" else ""),
        "device": r.get("device"),
        "pipeline": pp > 1,
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


def memory_figures(run: dict, runs: list[dict]) -> tuple[int, float, str] | None:
    """(bytes of model state the largest rank holds, that over the unsharded run's, where the unsharded figure
    comes from); None without figures."""
    rank = _largest_state(run)
    ref = unsharded_reference(run, runs)
    if rank is None or ref is None:
        return None
    held = state_bytes(rank, run["spec"].get("workload", "train"))
    assert held is not None  # _largest_state only returns ranks with a figure
    return held, held / ref[0], ref[1]


def comparison_table(runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([run_figures(r) for r in runs if r.get("result")])


# The comparison table's columns as people read them, with a help line where the name alone is not enough.
FIGURES: dict[str, tuple[str, str]] = {
    "run": ("run", ""),
    "not_compared": ("not compared: differs in", "the baseline's work is not this run's, so no ratio is shown"),
    "strategy": ("strategy", ""),
    "degrees": ("layout", "tensor, pipeline and data-parallel degrees; microbatches and schedule of a pipeline"),
    "ranks": ("ranks", ""),
    "model": ("model", ""),
    "workload": ("workload", ""),
    "work": ("batch x seq", "global batch (sequences) x sequence length; generate: + new tokens"),
    "verify": ("verify", "the job's verdict against the single-device reference"),
    "tokens_per_s": ("tokens/s", ""),
    "step_time_s_p50": ("step p50 (ms)", "median time of a timed step"),  # in ms: SCALE
    "peak_tensor_mib_max": (
        "tensor peak MiB",
        "the most bytes a rank's tensors held at once in a step, largest "
        "rank, on GPU and CPU alike (what the planner predicts); on a GPU without cuBLAS's workspaces, which the "
        "run's peak includes",
    ),
    "peak_mem_mib_max": ("run's peak MiB", "largest rank. GPU: allocated by the run; CPU: RSS above set-up"),
    "peak_rss_mib_max": ("process peak RSS MiB", "largest rank: the whole process, interpreter and torch included"),
    "params_share_max": ("parameters share", "the largest rank's parameters over the whole model's"),
    "state_mib_max": ("model state MiB", "parameters, gradients and optimizer state of the largest rank"),
    "compute_share": ("compute share", "of all ranks' time over the timed steps"),
    "comm_share": ("comm share", "of all ranks' time over the timed steps"),
    "idle_share": ("idle share", "of all ranks' time over the timed steps: waiting for a neighbour or a barrier"),
    "comm_mib_per_step": ("payload MiB/step", "logical tensor bytes of every collective and send, all ranks"),
    "wire_mib_per_rank_step": (
        "wire MiB/step",
        "estimated bytes the busiest rank puts on the wire: ring all-reduce 2(n-1)/n·S, gather/scatter (n-1)/n·S",
    ),
    "messages_per_step": ("messages/step", "collective and point-to-point calls per timed step, all ranks"),
    "bubble_measured": ("bubble", "the measured share a pipeline stage stood idle, mean over stages"),
    "bubble_theory": ("bubble theory", "the schedule's idle share with equal stages and free messages"),
    "mfu": ("MFU", "model FLOP/s over the GPUs' published peak"),
    "gflops": ("GFLOP/s", "model FLOPs per second achieved, all ranks"),
}
SHARES = ("params_share_max", "compute_share", "comm_share", "idle_share", "bubble_measured", "bubble_theory", "mfu")


SCALE = {"step_time_s_p50": 1e3}  # figures shown in another unit than stored: step time in ms (Compare's tables)
LABELS = ("run", "strategy", "degrees", "ranks", "model", "workload", "work", "not_compared", "verify")  # shown as they are


def _figure_text(value: Any, key: str, ratio: bool) -> str | None:
    if value is None or value != value:  # None or NaN
        return None
    if ratio:
        return f"{value:.3g}x"
    return f"{value:.1%}" if key in SHARES else f"{value:.4g}"


def readable_table(table: pd.DataFrame, ratio: bool = False) -> pd.DataFrame:
    """comparison_table (or with_baseline's ratios: `ratio`) as people read it: named columns, numbers to four
    significant digits, shares as percentages, and a missing figure saying why (na_reason) instead of None. A
    figure every run has stays a number (it sorts); one with a gap or a share is text."""
    out = pd.DataFrame(index=table.index)
    rows = table.to_dict("records")
    for key, (name, _) in FIGURES.items():
        if key not in table:
            continue
        col = table[key] * SCALE.get(key, 1) if not ratio else table[key]
        if key in LABELS:
            out[name] = col
        elif col.notna().all() and key not in SHARES and not ratio:
            out[name] = [float(f"{v:.4g}") for v in col]
        else:
            texts = [_figure_text(v, key, ratio) for v in col]
            out[name] = [t if t is not None else na_reason(r, key) for t, r in zip(texts, rows, strict=True)]
    return out


def figure_help() -> dict[str, str]:
    """{column name as shown: its help line} for the columns that have one."""
    return {name: why for name, why in FIGURES.values() if why}


def with_baseline(table: pd.DataFrame, baseline: int, unlike: dict[int, str] | None = None) -> pd.DataFrame:
    """Every numeric figure divided by the baseline run's (1.0 is the baseline itself), except for the runs in
    `unlike` (ui.alike.unlike_baseline: run -> what its work differs in), which get no ratio and say why."""
    if table.empty or baseline not in set(table["run"]):
        return table
    numeric = table.select_dtypes("number").columns.drop(["run", "ranks"], errors="ignore")
    base = table.loc[table["run"] == baseline, numeric].iloc[0]
    out = table.copy()
    out[numeric] = table[numeric] / base.where(base != 0)
    if unlike:
        differs = table["run"].map(unlike)
        out.loc[differs.notna(), numeric] = float("nan")
        out.insert(out.columns.get_loc("run") + 1, "not_compared", differs.fillna(""))
    return out


def _level(value: float, good: float, bad: float, higher_is_better: bool) -> str:
    if value != value:  # NaN
        return "—"
    if not higher_is_better:
        value, good, bad = -value, -good, -bad
    return "excellent" if value >= good else "poor" if value <= bad else "good"


# The guide's words, each from one measured share: (good at or above, poor at or below, higher is better).
# Memory: the unsharded state over (ranks x the largest rank's), 1 when the ranks split the state evenly with no
# copy (ZeRO-3, tensor parallelism), 1/n for n plain data-parallel replicas.
LEVELS = {"memory": (0.75, 0.5, True), "compute": (0.75, 0.5, True), "communication": (0.1, 0.3, False)}
GUIDE_COLUMNS = ["run", "memory", "MiB per rank", "vs unsharded", "compute", "compute share", "communication",
                 "MiB per step", "comm share", "bubble", "collectives", "messages per step"]  # fmt: skip
GUIDE_NOTES = (
    "memory: the model state (parameters, gradients, optimizer) the largest rank held between steps, and that "
    "over what one rank of the unsharded run holds. Its word weighs that against the ranks used (1 / (ranks x "
    "vs unsharded)): excellent from 0.75, the ranks split the state nearly evenly (ZeRO-3, tensor "
    "parallelism); poor at 0.5 or less, as plain data parallelism, where every replica holds it all. "
    "compute: the share of the ranks' time spent computing (excellent from 75%, poor at 50% or less). "
    "communication: payload MiB of every collective and send per timed step, all ranks, and the share of the "
    "time spent in them (excellent up to 10%, poor from 30%). bubble: the measured share a pipeline stage "
    "stood idle. collectives: the kinds used; messages: calls per timed step, all ranks."
)


def level(value: float | None, kind: str) -> str:
    """The guide's word (excellent, good, poor) for a measured share; '—' without one."""
    if value is None or value != value:  # NaN
        return "—"
    good, bad, higher_is_better = LEVELS[kind]
    return _level(value, good, bad, higher_is_better)


def na_reason(figures: dict[str, Any], key: str) -> str:
    """Why a run has no figure for `key`, in a table cell: the bubble of a run without a pipeline, the MFU of a
    CPU run, a figure recorded only by later versions, a ratio to a baseline of other work."""
    if figures.get("not_compared"):
        return "not compared"
    if key in ("bubble_measured", "bubble_theory") and not figures.get("pipeline"):
        return "n/a: no pipeline"
    if key in ("bubble_measured", "bubble_theory") and figures.get("workload") != "train":
        return "n/a: not training"  # the bubble is measured where a pipeline trains
    if key == "mfu":
        return "GPU only" if figures.get("device") != "cuda" else "n/a: GPU peak unknown"
    return "not recorded"


def guide_table(runs: list[dict]) -> pd.DataFrame:
    """The guide's table (memory, compute, communication, complexity), one row per run: the guide's word for each
    as a one-word column beside the short measured figures it comes from (GUIDE_NOTES says how). Text cells, so
    a missing figure says why."""
    rows = []
    for f in (run_figures(r) for r in runs if r.get("result")):
        run = _find(runs, f["run"])
        kinds = max((sum(1 for v in (x.get("comm_calls") or {}).values() if v) for x in _ranks(run)), default=0)
        mem = memory_figures(run, runs)
        spread = 1 / (mem[1] * f["ranks"]) if mem else None  # 1: the ranks split the state evenly
        rows.append({
            "run": f"#{f['run']} {f['strategy']} {f['degrees']}",
            "memory": level(spread, "memory"),
            "MiB per rank": f"{mem[0] / 2**20:.2f}" if mem else na_reason(f, "state"),
            "vs unsharded": f"{mem[1]:.2f}x" if mem else na_reason(f, "state"),
            "compute": level(f["compute_share"], "compute"),
            "compute share": f"{f['compute_share']:.0%}",
            "communication": level(f["comm_share"], "communication"),
            "MiB per step": f"{f['comm_mib_per_step']:.2f}",
            "comm share": f"{f['comm_share']:.0%}",
            "bubble": f"{f['bubble_measured']:.0%}" if f["bubble_measured"] is not None
                      else na_reason(f, "bubble_measured"),
            "collectives": str(kinds),
            "messages per step": f"{f['messages_per_step']:.0f}",
        })  # fmt: skip
    return pd.DataFrame(rows, columns=GUIDE_COLUMNS)


def unsharded_sources(runs: list[dict]) -> list[str]:
    """Where each run's unsharded figure comes from, one line per distinct source: '#3 single, measured'."""
    sources = {}
    for run in runs:
        mem = memory_figures(run, runs) if run.get("result") else None
        if mem:
            sources.setdefault(mem[2], []).append(f"#{run['id']}")
    return [f"{', '.join(ids)} against {source}" for source, ids in sources.items()]


def _find(runs: list[dict], run_id: int) -> dict:
    return next(r for r in runs if r["id"] == run_id)


def _setting(value: Any) -> str:
    """A spec value as the differences table shows it: lists joined, on/off, "—" for none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "—"
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def spec_differences(runs: list[dict]) -> pd.DataFrame:
    """Spec fields (rows) that differ between the runs (columns), as text; empty when all specs are equal.
    new_tokens only where a run generates: the other workloads never read it, so its default differing says
    nothing."""
    if not runs:
        return pd.DataFrame()
    keys = sorted({k for r in runs for k in r["spec"]})
    if not any(r["spec"].get("workload") == "generate" for r in runs):
        keys = [k for k in keys if k != "new_tokens"]
    rows = {}
    for k in keys:
        values = [r["spec"].get(k) for r in runs]
        if len({repr(v) for v in values}) > 1:
            rows[k] = [_setting(v) for v in values]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"#{r['id']}" for r in runs])


def curve_baseline(runs: list[dict], chosen: int | None) -> int | None:
    """The run the loss curves are measured against: the one chosen, else the first single-device run, else
    the first run."""
    if chosen is not None or not runs:
        return chosen
    return next((r["id"] for r in runs if r["spec"].get("strategy") == "single"), runs[0]["id"])


UNLIKE_COLUMN = "not compared: differs in"


def loss_deviations(curves: pd.DataFrame, baseline: int, labels: dict[int, str],
                    dtype: str | None = None, unlike: dict[int, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """(one row per run: steps compared, largest relative deviation of its training loss from the baseline's
    in the dtype's early window (float32 without a dtype) and overall with the step of it, the same for the held-out loss, its last
    losses, and with `dtype` (runs that trained alike, shared_training) the convergence check's verdict; one row
    per run and step: the training loss's relative deviation), from api.loss_curves. Runs in `unlike`
    (unlike_baseline) keep their last losses but are not compared: their row says what differs."""
    unlike = unlike or {}
    by_run = {int(k): g for k, g in curves.groupby("run_id")}

    def series(run_id: int, column: str) -> dict[int, float | None]:
        g = by_run.get(run_id)
        if g is None:
            return {}
        return {int(s): (None if pd.isna(v) else float(v)) for s, v in zip(g["step"], g[column], strict=True)}

    rows, steps = [], []
    base_train, base_eval = series(baseline, "loss"), series(baseline, "eval_loss")
    for run_id in by_run:
        last = by_run[run_id].dropna(subset=["loss"]).tail(1)
        last_eval = by_run[run_id].dropna(subset=["eval_loss"]).tail(1)
        lasts = {"last loss": float(last["loss"].iloc[0]) if len(last) else None,
                 "last held-out loss": float(last_eval["eval_loss"].iloc[0]) if len(last_eval) else None}  # fmt: skip
        if run_id in unlike:
            rows.append({"run": labels.get(run_id, f"#{run_id}"), "baseline": False, "steps compared": 0,
                         UNLIKE_COLUMN: unlike[run_id], **lasts})  # fmt: skip
            continue
        judged = judge(base_train, series(run_id, "loss"), dtype or "float32")
        train = judged.whole
        held = curve_deviation(base_eval, series(run_id, "eval_loss"))
        rows.append({
            "run": labels.get(run_id, f"#{run_id}"), "baseline": run_id == baseline, "steps compared": train.steps,
            "early deviation": judged.early_judged if judged.early.steps else None,
            "largest deviation": train.largest if train.steps else None, "at step": step_number(train.at_step) if train.at_step is not None else None,
            "held-out deviation": held.largest if held.steps else None, **lasts,
            **({"verdict": "baseline" if run_id == baseline else judged.verdict} if dtype else {}),
        })  # fmt: skip
        if run_id != baseline:
            for step, dev in relative_deviations(base_train, series(run_id, "loss")).items():
                steps.append({"run": labels.get(run_id, f"#{run_id}"), "step": step, "deviation": dev})
    table = pd.DataFrame(rows)
    if UNLIKE_COLUMN in table:  # beside the run's name, where a narrow page still shows it
        table.insert(1, UNLIKE_COLUMN, table.pop(UNLIKE_COLUMN).fillna(""))
    return table, pd.DataFrame(steps, columns=["run", "step", "deviation"])


def coinciding_curves(curves: pd.DataFrame, baseline: int, labels: dict[int, str]) -> str | None:
    """A caption naming the runs whose training-loss line the overlay chart draws over the baseline's: at every
    step both recorded, they are within 1% of the loss range drawn (about 3 px of the chart's 300, a line's width),
    so the legend names a colour the chart does not show. None where no run is hidden."""
    loss = curves.dropna(subset=["loss"])
    if baseline not in set(loss["run_id"]):
        return None
    span = float(loss["loss"].max() - loss["loss"].min())
    base = loss[loss["run_id"] == baseline].set_index("step")["loss"]
    hidden, widest = [], 0.0
    for run_id, g in loss.groupby("run_id"):
        ours, theirs = g.set_index("step")["loss"].align(base, join="inner")
        if run_id != baseline and len(ours) and (gap := float((ours - theirs).abs().max())) <= 0.01 * span:
            hidden.append(labels.get(int(run_id), f"#{run_id}"))
            widest = max(widest, gap)
    if not hidden:
        return None
    runs = [labels.get(baseline, f"#{baseline}"), *hidden]
    return (f"{', '.join(runs[:-1])} and {runs[-1]} draw one line: "
            f"{'their' if len(hidden) > 1 else 'its'} training loss is within {widest:.1e} of the baseline's at every "
            "step, less than 1% of the loss range drawn.")  # fmt: skip
