"""ui/charts.py: every chart builds from the frames runner.api returns, and long series are thinned first."""

from __future__ import annotations

import pandas as pd

from ui import charts

RANKS = pd.DataFrame({"run_id": [1, 1, 2, 2], "rank": [0, 1, 0, 1], "tp": [0, 0, 0, 1], "pp": [0, 1, 0, 0],
                      "dp": [0, 0, 0, 0], "peak_mem_bytes": [2**20, 2**21, 2**22, 2**22], "param_bytes": [10] * 4,
                      "compute_s": [1.0] * 4, "comm_s": [0.1, 0.2, 0.3, 0.3], "idle_s": [0.3, 0.0, 0.0, 0.0]})  # fmt: skip


def test_throughput_is_one_bar_per_finished_run_newest_first():
    runs = pd.DataFrame({"id": [3, 2, 1], "strategy": ["layer", "data", "data"], "model": ["tiny"] * 3,
                         "workload": ["train"] * 3, "world_size": [2] * 3, "tokens_per_s": [100.0, None, 50.0]})  # fmt: skip
    chart = charts.throughput_chart(runs)
    spec = chart.to_dict()
    assert spec["mark"]["type"] == "bar" and spec["encoding"]["x"]["field"] == "tokens_per_s"
    assert chart.data["run"].tolist() == ["#3 layer tiny", "#1 data tiny"]


def test_throughput_chart_caps_the_number_of_bars():
    runs = pd.DataFrame({"id": range(500), "strategy": "data", "model": "tiny", "workload": "train",
                         "world_size": 2, "tokens_per_s": 1.0})  # fmt: skip
    assert len(charts.throughput_chart(runs, max_runs=40).data) == 40


def test_rank_memory_groups_bars_by_rank_with_one_offset_per_run():
    chart = charts.rank_memory_chart(RANKS)
    enc = chart.to_dict()["encoding"]
    assert enc["x"]["field"] == "rank" and enc["xOffset"]["field"] == "run"
    assert chart.data["peak_mib"].tolist() == [1.0, 2.0, 4.0, 4.0]
    assert chart.data["rss_mib"].isna().all()  # recorded before peak RSS: no bar and no number made up


def test_rank_memory_names_the_runs_own_peak_and_shows_the_process_rss_beside_it():
    chart = charts.rank_memory_chart(RANKS.assign(peak_rss_bytes=[300 * 2**20] * 4))
    spec = chart.to_dict()
    assert spec["title"]["text"] == "Run's peak memory per rank"
    assert "process peak RSS (MiB)" in [t.get("title") for t in spec["encoding"]["tooltip"]]
    assert chart.data["rss_mib"].tolist() == [300.0] * 4


def test_rank_time_stacks_compute_comm_and_idle():
    data = charts.rank_time_chart(RANKS).data
    assert len(data) == 12 and set(data["part"]) == {"compute", "comm", "idle"}


def test_step_time_marks_warmup_and_thins_long_runs():
    steps = pd.DataFrame({"step": range(5000), "warmup": [True] + [False] * 4999, "step_time_s": 0.01, "loss": 1.0})
    data = charts.step_time_chart(steps).data
    assert len(data) <= charts.MAX_POINTS + 1 and data["phase"].iloc[0] == "warm-up"


def test_telemetry_lines_per_source_in_mib():
    series = pd.DataFrame({"run_id": 1, "source": ["rank0", "rank1"], "t_s": [0.0, 0.0], "util_pct": [50.0, 60.0],
                           "mem_bytes": [2**20, 2**21]})  # fmt: skip
    chart = charts.telemetry_chart(series, "mem_bytes", "memory (MiB)")
    assert chart.to_dict()["encoding"]["y"]["field"] == "mem_mib"
    assert chart.data["line"].tolist() == ["#1 rank0", "#1 rank1"]


def test_thin_keeps_the_last_point_and_bounds_the_size():
    df = pd.DataFrame({"x": range(10_001)})
    out = charts.thin(df, max_points=100)
    assert len(out) <= 101 and out["x"].iloc[-1] == 10_000
    assert charts.thin(df.head(5)).equals(df.head(5))


def test_every_step_chart_numbers_steps_from_1_as_the_rank_logs_do():
    """Steps are stored from index 0; the rank logs print the first as "step 1/3" and the progress counts it as step 1
    of 3, so each chart's first point is step 1 and its last step 3 (thinning none of three)."""
    steps = pd.DataFrame({"step": [0, 1, 2], "warmup": [True, False, False], "step_time_s": 0.01, "loss": [3.0, 2.0, 1.0],
                          "eval_loss": [None, None, 1.5]})  # fmt: skip
    assert charts.step_time_chart(steps).data["step"].tolist() == [1, 2, 3]
    assert charts.step_time_chart(steps).data["step_ms"].tolist() == [10.0, 10.0, 10.0]  # ms, as p50 and p90 read
    assert sorted(set(charts.loss_chart(steps).data["step"])) == [1, 2, 3]
    overlay = charts.loss_overlay_chart(steps.assign(run_id=7), {7: "#7"}).data
    assert sorted(set(overlay["step"])) == [1, 2, 3]
    deviations = pd.DataFrame({"run": "#7", "step": [0, 1, 2], "deviation": [0.0, 1e-6, 2e-6]})
    assert charts.deviation_chart(deviations).data["step"].tolist() == [2, 3]  # index 0 agrees exactly: not drawn
