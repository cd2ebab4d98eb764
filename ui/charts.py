"""One function per chart: each takes a DataFrame from storage.queries and returns an Altair chart.

Series are downsampled before drawing (telemetry already per time bucket in SQL; long step series
thinned here) so a chart never ships more than a few thousand points to the browser.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

MAX_POINTS = 2000


def thin(df: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Every k-th row so at most max_points remain (the last row kept)."""
    if len(df) <= max_points:
        return df
    k = -(-len(df) // max_points)
    return pd.concat([df.iloc[::k], df.iloc[[-1]]]).drop_duplicates()


def run_label(df: pd.DataFrame) -> pd.Series:
    return "#" + df["id"].astype(str) + " " + df["strategy"].astype(str) + " " + df["model"].astype(str)


def throughput_chart(runs: pd.DataFrame) -> alt.Chart:
    """Tokens/s per finished run, coloured by strategy."""
    data = runs.dropna(subset=["tokens_per_s"]).copy()
    data["run"] = run_label(data)
    return (
        alt.Chart(data, title="Throughput per run")
        .mark_bar()
        .encode(
            x=alt.X("run:N", sort=alt.EncodingSortField("id", order="descending"), title=None),
            y=alt.Y("tokens_per_s:Q", title="tokens / s"),
            color=alt.Color("strategy:N", title="strategy"),
            tooltip=["id", "strategy", "model", "workload", "world_size", alt.Tooltip("tokens_per_s:Q", format=",.0f")],
        )
    )


def rank_memory_chart(ranks: pd.DataFrame) -> alt.Chart:
    """Peak memory per rank, grouped by run."""
    data = ranks.copy()
    data["run"] = "#" + data["run_id"].astype(str)
    data["peak_mib"] = data["peak_mem_bytes"] / 2**20
    data["param_mib"] = data["param_bytes"] / 2**20
    return (
        alt.Chart(data, title="Peak memory per rank")
        .mark_bar()
        .encode(
            x=alt.X("rank:O", title="rank"),
            xOffset="run:N",
            y=alt.Y("peak_mib:Q", title="peak memory (MiB)"),
            color=alt.Color("run:N", title="run"),
            tooltip=[
                "run",
                "rank",
                "tp",
                "pp",
                "dp",
                alt.Tooltip("peak_mib:Q", format=",.1f"),
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


def step_time_chart(steps: pd.DataFrame) -> alt.Chart:
    data = thin(steps.assign(phase=steps["warmup"].map({True: "warm-up", False: "timed"})))
    return (
        alt.Chart(data, title="Step time")
        .mark_line(point=True)
        .encode(
            x=alt.X("step:O", title="step"),
            y=alt.Y("step_time_s:Q", title="seconds"),
            color=alt.Color("phase:N", scale=alt.Scale(domain=["warm-up", "timed"])),
            tooltip=["step", alt.Tooltip("step_time_s:Q", format=".4f"), "loss"],
        )
    )


def telemetry_chart(series: pd.DataFrame, field: str, title: str) -> alt.Chart:
    """util_pct or mem_bytes over time, one line per (run, GPU or rank process)."""
    data = thin(series.copy())
    data["line"] = "#" + data["run_id"].astype(str) + " " + data["source"].astype(str)
    y = alt.Y(f"{field}:Q", title=title)
    if field == "mem_bytes":
        data["mem_mib"] = data["mem_bytes"] / 2**20
        y = alt.Y("mem_mib:Q", title=title)
    return (
        alt.Chart(data, title=title)
        .mark_line()
        .encode(x=alt.X("t_s:Q", title="seconds since start"), y=y, color=alt.Color("line:N", title=None))
    )
