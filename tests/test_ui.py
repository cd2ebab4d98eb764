"""Page logic: form values -> spec and per-field problems, formatting, charts, and the pages under AppTest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from runner.spec import RunSpec
from storage import queries
from ui import charts
from ui.format import human_bytes, human_duration, human_rate, status_label
from ui.forms import problems_by_field, spec_from_form

FORM = {"strategy": "layer", "tp": 2, "pp": 2, "dp": 2, "microbatches": 4, "model": "tiny", "workload": "train",
        "batch": 8, "seq": 64, "steps": 5, "warmup": 1, "tags": "a, b", "weights": ""}  # fmt: skip


def test_form_sets_unused_degrees_neutral_so_they_never_nag():
    spec, problems = spec_from_form(FORM)
    assert problems == []
    assert (spec.tp, spec.pp, spec.dp, spec.microbatches) == (1, 2, 1, 1)
    assert spec.tags == ("a", "b") and spec.weights is None


def test_form_problems_are_keyed_by_field():
    _, problems = spec_from_form({**FORM, "pp": 3, "batch": 0})
    by_field = problems_by_field(problems)
    assert set(by_field) == {"batch"}  # positivity is checked first; the split follows once batch is fixed
    _, problems = spec_from_form({**FORM, "pp": 3})
    assert "needs n_layer divisible by 3" in problems_by_field(problems)["pp"][0]


def test_custom_dims_only_count_for_a_custom_model():
    spec, problems = spec_from_form({**FORM, "n_layer": 7})
    assert problems == [] and spec.n_layer is None
    _, problems = spec_from_form({**FORM, "model": "custom", "n_layer": 3, "n_head": 4, "n_embd": 64,
                                  "vocab_size": 100, "block_size": 64})  # fmt: skip
    assert "pp" in problems_by_field(problems)


def test_gpu_count_reaches_validation():
    _, problems = spec_from_form({**FORM, "device": "cuda", "_gpu_count": 0})
    assert "device" in problems_by_field(problems)


@pytest.mark.parametrize(("value", "text"), [(None, "—"), (512, "512 B"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB")])
def test_human_bytes(value, text):
    assert human_bytes(value) == text


def test_human_duration_and_rate():
    assert human_duration(0.0123) == "12.3 ms"
    assert human_duration(75) == "1 min 15 s"
    assert human_duration(None) == "—"
    assert human_rate(12345) == "12.3 k tok/s"
    assert status_label("failed").endswith("failed")


def test_charts_build_from_query_frames():
    runs = pd.DataFrame({"id": [1, 2], "strategy": ["layer", "data"], "model": ["tiny", "tiny"],
                         "workload": ["train", "train"], "world_size": [2, 2], "tokens_per_s": [100.0, None]})  # fmt: skip
    spec = charts.throughput_chart(runs).to_dict()
    assert spec["mark"]["type"] == "bar"
    ranks = pd.DataFrame({"run_id": [1, 1], "rank": [0, 1], "tp": [0, 0], "pp": [0, 1], "dp": [0, 0],
                          "peak_mem_bytes": [2**20, 2**21], "param_bytes": [10, 10], "compute_s": [1.0, 1.0],
                          "comm_s": [0.1, 0.2], "idle_s": [0.3, 0.0]})  # fmt: skip
    assert charts.rank_memory_chart(ranks).to_dict()["encoding"]["xOffset"]["field"] == "run"
    time_data = charts.rank_time_chart(ranks).data
    assert len(time_data) == 6 and set(time_data["part"]) == {"compute", "comm", "idle"}


def test_thin_keeps_the_last_point_and_bounds_the_size():
    df = pd.DataFrame({"x": range(10_001)})
    out = charts.thin(df, max_points=100)
    assert len(out) <= 101 and out["x"].iloc[-1] == 10_000


# ---- pages under AppTest (no browser; the runner is not started by page scripts) -------------
REPO = Path(__file__).resolve().parent.parent


def page(path: str, **query) -> AppTest:
    at = AppTest.from_file(str(REPO / path), default_timeout=30)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def test_launch_page_shows_a_bad_degree_under_its_field_and_disables_launch(engine):
    at = page("pages/launch.py")
    assert not at.exception
    at.number_input(key="launch_pp").set_value(3).run()
    errors = [e.value for e in at.error]
    assert any("layer split over 3 ranks needs n_layer divisible by 3" in e for e in errors), errors
    assert at.button(key="launch_submit").disabled
    assert queries.count_runs(engine) == 0


def test_launch_page_previews_the_torchrun_command_and_memory(engine):
    at = page("pages/launch.py")
    code = [c.value for c in at.code]
    assert any("torch.distributed.run --nproc-per-node 2" in c and "-m runner.job" in c for c in code), code
    assert [m.label for m in at.metric][:2] == ["ranks", "parameters per rank (largest)"]


def test_launch_button_queues_the_run(engine):
    at = page("pages/launch.py")
    at.button(key="launch_submit").click().run()
    (run,) = queries.list_runs(engine).to_dict("records")
    assert run["strategy"] == "layer" and run["status"] == "queued"


def test_history_empty_state_offers_a_first_run(engine):
    at = page("pages/history.py")
    assert any("No runs yet" in i.value for i in at.info)
    at.button(key="history_first").click().run()
    assert queries.count_runs(engine) == 1
    assert at.query_params["run"] == "1"


def test_history_filters_live_in_the_query_string(engine):
    queries.submit_run(engine, RunSpec(strategy="layer", pp=2))
    queries.submit_run(engine, RunSpec(strategy="data", dp=2))
    at = page("pages/history.py", strategy="data")
    assert at.multiselect(key="history_strategy").value == ["data"]
    assert any("1 runs" in n.label for n in at.number_input)


def test_run_detail_shows_the_failure_reason_and_traceback(engine):
    run_id = queries.submit_run(engine, RunSpec(strategy="layer", pp=2))
    queries.claim_run(engine, run_id, "r", "/tmp/none", [])
    queries.finish_run(engine, run_id, "failed", error="rank 1 was killed by signal 9 (SIGKILL)", failed_rank=1,
                       exit_code=1, traceback="Traceback (most recent call last):\n  boom")  # fmt: skip
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    assert any("rank 1 was killed by signal 9" in e.value for e in at.error)
    assert any("Traceback" in c.value for c in at.code)


def test_run_detail_of_a_missing_run_says_so(engine):
    at = page("pages/history.py", run="42")
    assert any("There is no run 42" in e.value for e in at.error)
