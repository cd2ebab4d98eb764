"""One function per chart: each takes a DataFrame from runner.api and returns an Altair chart.

Series are downsampled before drawing (telemetry already per time bucket in SQL; long step series
thinned here) so a chart never ships more than a few thousand points to the browser.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from runner.job.metrics import step_number

MAX_POINTS = 2000
# Tick labels without trailing zeros: a series of one sample (just after launch) has a domain of one value, and
# Vega's default format then printed "0.000000".
READABLE_AXIS = alt.Axis(format=",~r")


def thin(df: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Every k-th row so at most max_points remain (the last row kept)."""
    if len(df) <= max_points:
        return df
    k = -(-len(df) // max_points)
    return pd.concat([df.iloc[::k], df.iloc[[-1]]]).drop_duplicates()


def run_label(df: pd.DataFrame) -> pd.Series:
    return "#" + df["id"].astype(str) + " " + df["strategy"].astype(str) + " " + df["model"].astype(str)


def throughput_chart(runs: pd.DataFrame, max_runs: int = 40) -> alt.Chart:
    """Tokens/s per finished run, newest on top, coloured by strategy (horizontal: run labels stay readable)."""
    data = runs.dropna(subset=["tokens_per_s"]).sort_values("id", ascending=False).head(max_runs).copy()
    data["run"] = run_label(data)
    return (
        alt.Chart(data, title="Throughput per run", height=alt.Step(22))
        .mark_bar()
        .encode(
            y=alt.Y("run:N", sort=alt.EncodingSortField("id", order="descending"), title=None),
            x=alt.X("tokens_per_s:Q", title="tokens / s"),
            color=alt.Color("strategy:N", title="strategy"),
            tooltip=["id", "strategy", "model", "workload", "world_size", alt.Tooltip("tokens_per_s:Q", format=",.0f")],
        )
    )


MEMORY_TITLE = alt.TitleParams(
    "Run's peak memory per rank", subtitle="GPU: allocated by the run; CPU: RSS above the rank's set-up"
)


def rank_memory_chart(ranks: pd.DataFrame, colour: str = "run") -> alt.Chart:
    """The run's own peak memory per rank, grouped by run; the process's absolute peak RSS in the tooltip.
    `colour`: "run", or "strategy" (a column of `ranks`) beside a chart of many runs coloured by strategy."""
    data = ranks.copy()
    data["run"] = "#" + data["run_id"].astype(str)
    data["peak_mib"] = data["peak_mem_bytes"] / 2**20
    data["param_mib"] = data["param_bytes"] / 2**20
    rss = data["peak_rss_bytes"] if "peak_rss_bytes" in data else pd.Series(float("nan"), index=data.index)
    data["rss_mib"] = rss.astype(float) / 2**20
    return (
        alt.Chart(data, title=MEMORY_TITLE)
        .mark_bar()
        .encode(
            x=alt.X("rank:O", title="rank"),
            xOffset="run:N",
            y=alt.Y("peak_mib:Q", title="run's peak memory (MiB)"),
            color=alt.Color(f"{colour}:N", title=colour),
            tooltip=[
                "run",
                *(["strategy"] if colour == "strategy" else []),
                "rank",
                "tp",
                "pp",
                "dp",
                alt.Tooltip("peak_mib:Q", format=",.1f", title="run's peak (MiB)"),
                alt.Tooltip("rss_mib:Q", format=",.1f", title="process peak RSS (MiB)"),
                alt.Tooltip("param_mib:Q", format=",.2f", title="parameters (MiB)"),
            ],  # fmt: skip
        )
    )


def rank_time_chart(ranks: pd.DataFrame) -> alt.Chart:
    """Where each rank's step time went: compute, communication, idle (stacked)."""
    data = ranks.melt(
        id_vars=["run_id", "rank"], value_vars=["compute_s", "comm_s", "idle_s"], var_name="part", value_name="seconds"
    )
    data["part"] = data["part"].str.removesuffix("_s")
    data["label"] = "#" + data["run_id"].astype(str) + " r" + data["rank"].astype(str)
    return (
        alt.Chart(data, title="Time per rank over the timed steps")
        .mark_bar()
        .encode(
            x=alt.X("label:N", title="run / rank", sort=None),
            y=alt.Y("seconds:Q", title="seconds", stack="zero"),
            color=alt.Color(
                "part:N", scale=alt.Scale(domain=["compute", "comm", "idle"], range=["#4c78a8", "#f58518", "#bab0ac"])
            ),
            tooltip=["label", "part", alt.Tooltip("seconds:Q", format=".4f")],
        )
    )


def numbered(steps: pd.DataFrame) -> pd.DataFrame:
    """`steps` with each stored step index replaced by the number a step is shown by (`step_number`: from 1, as the
    rank logs and the progress count them)."""
    return steps.assign(step=step_number(steps["step"]))


def step_time_chart(steps: pd.DataFrame) -> alt.Chart:
    """Each step's time in ms (as the page's step time p50 and p90 above it), warm-up apart from timed."""
    data = thin(numbered(steps).assign(phase=steps["warmup"].map({True: "warm-up", False: "timed"}),
                                       step_ms=steps["step_time_s"] * 1e3))  # fmt: skip
    return (
        alt.Chart(data, title="Step time")
        .mark_line(point=True)
        .encode(
            x=alt.X("step:O", title="step"),
            y=alt.Y("step_ms:Q", title="ms", axis=READABLE_AXIS),
            color=alt.Color("phase:N", scale=alt.Scale(domain=["warm-up", "timed"])),
            tooltip=["step", alt.Tooltip("step_ms:Q", format=",.2f", title="ms"), "loss"],
        )
    )


def telemetry_chart(series: pd.DataFrame, field: str, title: str) -> alt.Chart:
    """util_pct or mem_bytes over time, one line per (run, node, GPU or rank process); the node is named where
    a run's samples come from its nodes (a multi-node run), "#7 n2 rank1"."""
    data = thin(series.copy())
    hosts = data["host"].fillna("") if "host" in data else [""] * len(data)
    data["line"] = [" ".join(p for p in (f"#{r}", str(h), str(s)) if p)
                    for r, h, s in zip(data["run_id"], hosts, data["source"], strict=True)]  # fmt: skip
    y = alt.Y(f"{field}:Q", title=title, axis=READABLE_AXIS, scale=alt.Scale(domainMin=0))
    if field == "mem_bytes":
        data["mem_mib"] = data["mem_bytes"] / 2**20
        y = alt.Y("mem_mib:Q", title=title, axis=READABLE_AXIS, scale=alt.Scale(domainMin=0))
    x = alt.X("t_s:Q", title="seconds since start", axis=READABLE_AXIS)
    return (
        alt.Chart(data, title=title)
        .mark_line(point=len(data) < 3)
        .encode(x=x, y=y, color=alt.Color("line:N", title=None))
    )


# Collectives the step clock timed (runner/gpt/timing.py collective_spans) are drawn in purples, narrower, over the
# pass they ran in.
COLLECTIVES = ["all_reduce", "all_gather", "reduce_scatter", "broadcast"]
PHASE_COLOURS = alt.Scale(
    domain=["forward", "backward", "weight", "send", "recv_wait", *COLLECTIVES],
    range=["#4c78a8", "#e45756", "#54a24b", "#f58518", "#d3d3d3", "#7b3294", "#c2a5cf", "#9e6bbf", "#5e3c99"],
)
COMPUTE_PHASES = ["forward", "backward", "weight"]  # ZB-H1 splits a backward into backward (B) and weight (W)


def _phase_scale(present: set[str]) -> alt.Scale:
    """PHASE_COLOURS narrowed to the phases a chart has, so its legend lists only those (a short chart of two
    lanes has room for few entries) and each phase keeps its colour."""
    pairs = [(d, r) for d, r in zip(PHASE_COLOURS.domain, PHASE_COLOURS.range, strict=True) if d in present]
    return alt.Scale(domain=[d for d, _ in pairs], range=[r for _, r in pairs]) if pairs else PHASE_COLOURS


def timeline_lanes(spans: pd.DataFrame) -> pd.Series:
    """One lane per stage ("stage 1 · rank 1"), or per rank where a rank runs several virtual stages (interleaved
    1F1B: "rank 0 · stages 0, 2"), so each row is one device's time, as in Megatron's figure."""
    per_rank = spans.groupby("rank")["stage"].agg(lambda s: sorted(set(int(x) for x in s)))
    if per_rank.map(len).max() <= 1:
        return "stage " + spans["stage"].astype(str) + " · rank " + spans["rank"].astype(str)
    names = {r: f"rank {r} · stages {', '.join(map(str, st))}" for r, st in per_rank.items()}
    return spans["rank"].map(names)


def timeline_chart(
    spans: pd.DataFrame,
    title: str = "Pipeline timeline",
    bubble: tuple[float | None, float | None] | None = None,
    window_ms: tuple[float, float] | None = None,
) -> alt.LayerChart:
    """The guide's pipeline picture, measured: one row per stage (or per rank holding several virtual stages),
    one bar per microbatch and phase; compute bars are labelled with the microbatch (and the virtual stage when
    a row holds several). `bubble` = (measured, theory) puts the schedule's theory beside the measurement.
    `window_ms` = (from, to) draws only that stretch of the step (bars cut at its edges), so a step of hundreds
    of microbatches keeps bars wide enough to read."""
    data = spans.copy()
    if window_ms is not None:
        lo, hi = window_ms[0] / 1e3, window_ms[1] / 1e3
        data = data[(data["end"] > lo) & (data["start"] < hi)].copy()
        data["start"], data["end"] = data["start"].clip(lower=lo), data["end"].clip(upper=hi)
    data["lane"] = timeline_lanes(data)
    data["order"] = data.groupby("lane")["stage"].transform("min")
    data["start_ms"] = data["start"] * 1e3
    data["end_ms"] = data["end"] * 1e3
    several = data.groupby("lane")["stage"].nunique().max() > 1
    data["label"] = (data["stage"].astype(str) + ":" if several else "") + data["microbatch"].astype(str)
    if bubble is not None and any(x is not None for x in bubble):
        measured, theory = bubble
        parts = [f"measured {measured:.1%}" if measured is not None else None,
                 f"theory {theory:.1%}" if theory is not None else None]  # fmt: skip
        title = alt.TitleParams(title, subtitle="bubble: " + ", ".join(p for p in parts if p))
    lane = alt.Y("lane:N", title=None, sort=alt.EncodingSortField("order"))
    scale = alt.Scale(domain=list(window_ms), nice=False) if window_ms is not None else alt.Undefined
    collective = data["phase"].isin(COLLECTIVES)
    encoding = {
        "y": lane,
        "x": alt.X("start_ms:Q", title="ms since the step started", scale=scale),
        "x2": "end_ms:Q",
        "color": alt.Color("phase:N", scale=_phase_scale(set(data["phase"]))),
        "tooltip": [
            "lane",
            "stage",
            "phase",
            "microbatch",
            alt.Tooltip("start_ms:Q", format=".2f"),
            alt.Tooltip("end_ms:Q", format=".2f"),
        ],  # fmt: skip
    }
    bars = alt.Chart(data[~collective]).mark_bar(height={"band": 0.8}).encode(**encoding)
    if collective.any():  # narrower and on top: the pass they ran in stays visible around them
        bars += alt.Chart(data[collective]).mark_bar(height={"band": 0.4}).encode(**encoding)
    # A label only where it fits: on bars of at least 2% of the time shown (about 16 px of a page's chart)
    shown = (window_ms[1] - window_ms[0]) if window_ms is not None else data["end_ms"].max() - data["start_ms"].min()
    wide = data["end_ms"] - data["start_ms"] >= 0.02 * shown
    text = (
        alt.Chart(data[data["phase"].isin(COMPUTE_PHASES) & wide])
        .mark_text(color="white", fontSize=10)
        .encode(y=lane, x=alt.X("mid:Q"), text="label:N")
        .transform_calculate(mid="(datum.start_ms + datum.end_ms) / 2")
    )
    return (bars + text).properties(title=title)


def compare_bar_chart(table: pd.DataFrame, field: str, title: str) -> alt.Chart:
    """One bar per compared run for one figure of the comparison table."""
    data = table.copy()
    data["label"] = "#" + data["run"].astype(str) + " " + data["strategy"] + " " + data["degrees"]
    return (
        alt.Chart(data, title=title, height=alt.Step(24))
        .mark_bar()
        .encode(
            y=alt.Y("label:N", title=None, sort=None),
            x=alt.X(f"{field}:Q", title=title),
            color=alt.Color("strategy:N"),
            tooltip=["label", alt.Tooltip(f"{field}:Q", format=",.4g")],
        )
    )


def rank_memory_by_coord_chart(ranks: pd.DataFrame, coord: str) -> alt.Chart:
    """Peak memory per rank, grouped by the rank's tp, pp or dp coordinate, one colour per run."""
    data = ranks.copy()
    data["run"] = "#" + data["run_id"].astype(str)
    data["peak_mib"] = data["peak_mem_bytes"] / 2**20
    return (
        alt.Chart(data, title=f"Run's peak memory per rank, grouped by {coord}")
        .mark_bar()
        .encode(
            x=alt.X(f"{coord}:O", title=coord),
            xOffset="run:N",
            y=alt.Y("mean(peak_mib):Q", title="run's peak memory (MiB, mean over ranks)"),
            color=alt.Color("run:N"),
            tooltip=["run", coord, alt.Tooltip("mean(peak_mib):Q", format=",.1f"), "count()"],
        )
    )


# steps are whole: ticks at whole steps only (a short run's axis would otherwise read 0.2, 0.4, ...)
STEP_AXIS = alt.X("step:Q", title="step", axis=alt.Axis(format="d", tickMinStep=1))
LOSS_COLOURS = {"training": "#4c78a8", "held-out": "#e45756"}


def loss_kinds(data: pd.DataFrame) -> alt.Scale:
    """The colours of the loss kinds the data holds: a legend naming "held-out" where no run evaluated one misleads."""
    kinds = [k for k in LOSS_COLOURS if k in set(data["kind"])] if len(data) else list(LOSS_COLOURS)
    return alt.Scale(domain=kinds, range=[LOSS_COLOURS[k] for k in kinds])


def _long_losses(steps: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """(keys..., step, kind, loss): the training and held-out losses of step rows as one tall table."""
    cols = {"loss": "training", "eval_loss": "held-out"}
    data = steps.melt(id_vars=[*keys, "step"], value_vars=[c for c in cols if c in steps], var_name="kind",
                      value_name="value").dropna(subset=["value"])  # fmt: skip
    data["kind"] = data["kind"].map(cols)
    return data


def loss_chart(steps: pd.DataFrame) -> alt.LayerChart:
    """One run's loss per step (warm-up steps train too) and its held-out loss on eval_every's steps."""
    data = _long_losses(thin(numbered(steps)), [])
    base = alt.Chart(data).encode(
        x=STEP_AXIS,
        y=alt.Y("value:Q", title="loss", scale=alt.Scale(zero=False)),
        color=alt.Color("kind:N", scale=loss_kinds(data), title=None),
        tooltip=["step", "kind", alt.Tooltip("value:Q", format=".4f", title="loss")],
    )
    return (base.mark_line() + base.transform_filter(alt.datum.kind == "held-out").mark_point(filled=True)).properties(
        title="Loss"
    )


def run_colours(runs: list[str], shown: pd.Series) -> alt.Color:
    """A colour per run fixed by its place in `runs` (all the runs compared, in order), so one run has one colour
    on every chart of the page; the legend lists the runs `shown` draws, in that order (not #1, #12, #4)."""
    present = set(shown)
    return alt.Color("run:N", title=None, scale=alt.Scale(domain=runs, scheme="tableau10"),
                     legend=alt.Legend(values=[r for r in runs if r in present]))  # fmt: skip


def loss_overlay_chart(curves: pd.DataFrame, labels: dict[int, str]) -> alt.LayerChart:
    """Several runs' loss curves on one chart: training as lines, held-out as points, a colour per run (in the
    order of `labels`, as the deviation chart colours them)."""
    data = _long_losses(numbered(curves), ["run_id"])
    data["run"] = data["run_id"].map(labels)
    data = pd.concat([thin(g) for _, g in data.groupby(["run", "kind"])]) if len(data) else data
    base = alt.Chart(data).encode(
        x=STEP_AXIS,
        y=alt.Y("value:Q", title="loss", scale=alt.Scale(zero=False)),
        color=run_colours(list(labels.values()), data["run"] if len(data) else pd.Series(dtype=str)),
        tooltip=["run", "step", "kind", alt.Tooltip("value:Q", format=".6f", title="loss")],
    )
    training = base.transform_filter(alt.datum.kind == "training").mark_line()
    held_out = base.transform_filter(alt.datum.kind == "held-out").mark_point(shape="diamond", filled=True, size=60)
    return (training + held_out).properties(title="Loss per step (lines: training; diamonds: held-out)")


def deviation_chart(deviations: pd.DataFrame, runs: list[str] | None = None) -> alt.Chart:
    """|loss - baseline| / baseline per step and run, on a log scale (steps where the two agree exactly are left
    out: a log scale has no zero); `runs` in the loss chart's order gives each run that chart's colour."""
    data = numbered(deviations[deviations["deviation"] > 0])
    runs = runs if runs is not None else sorted(set(data["run"]))
    return (
        alt.Chart(data, title="Relative deviation from the baseline's training loss")
        .mark_line(point=True)
        .encode(
            x=STEP_AXIS,
            y=alt.Y("deviation:Q", title="|loss - baseline| / baseline", scale=alt.Scale(type="log"),
                    axis=alt.Axis(format=".0e")),  # one notation across decades (not 0.000003 beside 2e-7)
            color=run_colours(runs, data["run"]),
            tooltip=["run", "step", alt.Tooltip("deviation:Q", format=".2e")],
        )
    )
