"""ui/format.py: bytes, durations, heartbeat ages, rates, statuses and the per-rank table as people read them."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ui.format import human_age, human_bytes, human_duration, human_rate, rank_table, rank_tables, status_label


@pytest.mark.parametrize(
    ("value", "text"), [(None, "—"), (math.nan, "—"), (512, "512 B"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB")]
)
def test_human_bytes(value, text):
    assert human_bytes(value) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "—"),
        (5e-6, "5 µs"),
        (0.0123, "12.3 ms"),
        (2.25, "2.2 s"),
        (75, "1 min 15 s"),
        (7260, "2 h 01 min"),
        (0.4 + 0.3 + 0.2 + 0.1, "1.0 s"),
        (0.0009999, "1.0 ms"),
        (59.97, "1 min 00 s"),
    ],
)
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.09, "1 s"), (-0.2, "1 s"), (1.4, "1 s"), (2.6, "3 s"), (125, "2 min 05 s")]
)
def test_a_heartbeat_age_reads_in_whole_seconds(seconds, text):
    assert human_age(seconds) == text


def test_human_rate_and_status():
    assert human_rate(None) == "—"
    assert human_rate(950) == "950 tok/s" and human_rate(1.37) == "1.37 tok/s" and human_rate(12.34) == "12.3 tok/s"
    assert human_rate(12345) == "12.3 k tok/s"
    assert human_rate(2.5e6) == "2.50 M tok/s"
    assert status_label("failed") == "✖ failed"
    assert status_label("odd") == "odd"


def test_rank_table_shows_mib_and_only_collectives_that_moved_bytes():
    ranks = pd.DataFrame({"run_id": [1, 1], "rank": [0, 1], "tp": [0, 0], "pp": [0, 1], "dp": [0, 0],
                          "param_count": [10, 12], "param_bytes": [2**20, 2**21], "optimizer_bytes": [0, 0],
                          "peak_mem_bytes": [3 * 2**20, 2**22], "compute_s": [0.123456, 1.0], "comm_s": [0.1, 0.2],
                          "idle_s": [0.3, 0.0], "comm_bytes_send": [2**20, 0], "comm_bytes_all_reduce": [0, 0]})  # fmt: skip
    table = rank_table(ranks)
    assert "run_id" not in table and "all_reduce MiB" not in table
    assert table["send MiB"].tolist() == [1.0, 0.0]
    assert table["run's peak MiB"].tolist() == [3.0, 4.0]
    assert table["compute s"].iloc[0] == 0.1235
    # recorded before peak RSS, CPU wait, wire estimates and nodes: no empty columns for them
    assert not {"process peak RSS MiB", "cpu wait s", "node"} & set(table) and not any("wire" in c for c in table)


def test_rank_table_names_the_node_each_rank_ran_on_beside_its_rank():
    ranks = pd.DataFrame({"run_id": [1, 1], "rank": [0, 1], "tp": [0, 0], "pp": [0, 1], "dp": [0, 0],
                          "host": ["n1", "n2"], "compute_s": [1.0, 1.0]})  # fmt: skip
    table = rank_table(ranks)
    assert list(table.columns[:2]) == ["rank", "node"] and table["node"].tolist() == ["n1", "n2"]


def test_rank_table_puts_absolute_rss_beside_the_runs_peak_and_wire_bytes_beside_payload():
    ranks = pd.DataFrame({"run_id": [1, 1], "rank": [0, 1], "peak_mem_bytes": [2**20, 2**20],
                          "peak_rss_bytes": [300 * 2**20, 301 * 2**20], "compute_s": [1.0, 1.0], "comm_s": [0.1, 0.1],
                          "idle_s": [0.2, 0.2], "cpu_wait_s": [0.05, 0.0], "comm_bytes_all_reduce": [2**20, 2**20],
                          "comm_wire_bytes": [{"all_reduce": 2**20, "send": 0}, {"all_reduce": 2**20, "send": 0}]})  # fmt: skip
    table = rank_table(ranks)
    assert table["run's peak MiB"].tolist() == [1.0, 1.0]
    assert table["process peak RSS MiB"].tolist() == [300.0, 301.0]
    assert table["cpu wait s"].tolist() == [0.05, 0.0]
    assert table["all_reduce wire MiB"].tolist() == [1.0, 1.0] and "send wire MiB" not in table


def test_rank_table_shows_zero_sharding_checkpointing_and_precision_where_the_run_recorded_them():
    ranks = pd.DataFrame({"run_id": [1, 1], "rank": [0, 1], "param_bytes": [2**21, 2**21], "grad_bytes": [2**20, 2**20],
                          "optimizer_bytes": [2**21, 2**21], "zero_stage": [2, 2], "precision": ["bf16-mixed"] * 2,
                          "activation_bytes_saved_peak": [3 * 2**20, 2**20], "recompute_s": [0.01234, 0.02],
                          "compute_s": [1.0, 1.0]})  # fmt: skip
    table = rank_table(ranks)
    assert table["grads MiB"].tolist() == [1.0, 1.0] and table["ZeRO"].tolist() == [2, 2]
    assert table["checkpointing saved MiB"].tolist() == [3.0, 1.0] and table["recompute s"].tolist() == [0.0123, 0.02]
    assert table["precision"].tolist() == ["bf16-mixed", "bf16-mixed"]
    plain = rank_table(ranks.assign(zero_stage=0).drop(columns=["precision", "grad_bytes", "recompute_s"]))
    assert not {"ZeRO", "precision", "grads MiB", "recompute s", "weights read MiB"} & set(plain)
    # a Hugging Face folder's run: each rank's own slices read (tp 2: about half the model each)
    read = rank_table(ranks.assign(weights_bytes_read=[251008, 251008]))
    assert read["weights read MiB"].tolist() == [0.24, 0.24]


def test_rank_tables_split_what_each_rank_held_from_where_its_time_and_bytes_went():
    ranks = pd.DataFrame({"run_id": [1, 1], "rank": [0, 1], "tp": [0, 0], "pp": [0, 1], "dp": [0, 0],
                          "param_count": [140928, 132864], "param_bytes": [563712, 531456], "peak_rss_bytes":
                          [415_000_000, 418_000_000], "zero_stage": [1, 1], "compute_s": [0.95134, 1.4424],
                          "comm_bytes_send": [2**20, 0], "comm_wire_bytes": [{"send": 2**20}, {"send": 0}]})  # fmt: skip
    held, spent = rank_tables(ranks)
    assert list(held.columns) == ["rank", "tp", "pp", "dp", "parameters", "params MiB", "process peak RSS MiB", "ZeRO"]
    assert list(spent.columns) == ["rank", "tp", "pp", "dp", "compute s", "send MiB", "send wire MiB"]
    assert held["parameters"].tolist() == ["140,928", "132,864"] and held["params MiB"].tolist() == ["0.54", "0.51"]
    assert held["process peak RSS MiB"].tolist() == ["395.8", "398.6"] and spent["compute s"].tolist() == [
        "0.9513",
        "1.442",
    ]
