"""Loss curves: the relative deviation one curve has from a baseline's (runner/job/metrics.py), the table and
per-step series Compare draws from stored steps (ui/compare.py), the charts, and the run and Compare pages."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from runner import api
from runner.job.metrics import curve_deviation, relative_deviations
from runner.spec.records import Step
from runner.spec.run_spec import RunSpec
from storage import runner_rows
from tests.test_ui_pages import page, texts
from ui import charts
from ui.alike import unlike_baseline
from ui.compare import curve_baseline, loss_deviations


def test_the_largest_relative_deviation_is_over_the_steps_both_curves_hold():
    base = {0: 5.0, 1: 4.0, 2: 2.0, 3: None}
    other = {0: 5.0, 1: 4.004, 2: 2.001, 3: 1.0, 4: 0.5}
    assert relative_deviations(base, other) == pytest.approx({0: 0.0, 1: 1e-3, 2: 5e-4})
    d = curve_deviation(base, other)
    assert d.largest == pytest.approx(1e-3) and d.at_step == 1 and d.steps == 3


def test_a_diverged_curve_deviates_infinitely_and_identical_curves_not_at_all():
    assert curve_deviation({0: 1.0, 1: 2.0}, {0: 1.0, 1: float("nan")}).largest == math.inf
    assert curve_deviation({0: float("nan")}, {0: float("nan")}).largest == 0.0
    same = curve_deviation({0: 3.0, 1: 2.0}, {0: 3.0, 1: 2.0})
    assert (same.largest, same.at_step, same.steps) == (0.0, None, 2)  # no step stands out
    assert curve_deviation({}, {0: 1.0}).steps == 0


def curves_frame() -> pd.DataFrame:
    rows = []
    for run_id, scale in ((1, 1.0), (2, 1.0 + 2e-6), (3, 1.01)):
        for step in range(6):
            rows.append({"run_id": run_id, "step": step, "loss": (5.5 - 0.3 * step) * (scale if step else 1.0),
                         "eval_loss": (5.0 - 0.3 * step) * scale if step % 3 == 2 else None})  # fmt: skip
    return pd.DataFrame(rows)


def test_compare_tables_each_runs_largest_deviation_from_the_baseline_and_its_steps():
    labels = {1: "#1 single", 2: "#2 pipeline", 3: "#3 data"}
    table, per_step = loss_deviations(curves_frame(), 1, labels)
    by_run = table.set_index("run")
    assert by_run.loc["#1 single", "largest deviation"] == 0.0 and by_run.loc["#1 single", "baseline"]
    assert by_run.loc["#2 pipeline", "largest deviation"] == pytest.approx(2e-6)
    assert by_run.loc["#3 data", "largest deviation"] == pytest.approx(0.01)
    assert by_run.loc["#3 data", "held-out deviation"] == pytest.approx(0.01)
    assert by_run.loc["#3 data", "steps compared"] == 6 and by_run.loc["#3 data", "at step"] >= 2  # step 1 agrees
    assert by_run.loc["#2 pipeline", "last loss"] == pytest.approx(4.0 * (1 + 2e-6))
    assert set(per_step["run"]) == {"#2 pipeline", "#3 data"} and len(per_step) == 12  # 6 steps each


def test_a_curve_of_other_work_is_not_held_against_the_baseline():
    """Run 3 trained another model: its deviation from run 1's curve would measure the models' difference, not the
    layout's. It keeps its last loss and says why it is not compared; run 2 (another layout, same work) is."""
    runs = [{"id": 1, "spec": {"strategy": "single"}}, {"id": 2, "spec": {"strategy": "data", "dp": 2}},
            {"id": 3, "spec": {"strategy": "single", "model": "llama-tiny", "data": "stdlib"}}]  # fmt: skip
    unlike = unlike_baseline(runs, 1)
    assert unlike == {3: "model tiny / llama-tiny: vocab_size 512 / 256, bias True / False, family gpt2 / llama, "
                         "data synthetic / stdlib"}  # stdlib is read byte by byte: 256 symbols
    table, per_step = loss_deviations(curves_frame(), 1, {1: "#1", 2: "#2", 3: "#3"}, unlike=unlike)
    row = table.set_index("run").loc["#3"]
    assert row["not compared: differs in"] == unlike[3] and row["steps compared"] == 0
    assert list(table.columns[:2]) == ["run", "not compared: differs in"]  # seen first, on any width
    assert pd.isna(row["largest deviation"]) and row["last loss"] == pytest.approx(4.0 * 1.01)
    assert set(per_step["run"]) == {"#2"}
    # the same model under another name is the same model: a custom model built as the preset is
    tiny = RunSpec(model="tiny").model_config()
    same = {"model": "custom", "n_layer": tiny.n_layer, "n_head": tiny.n_head, "n_embd": tiny.n_embd,
            "vocab_size": tiny.vocab_size, "block_size": tiny.block_size}  # fmt: skip
    assert unlike_baseline([runs[0], {"id": 4, "spec": {"strategy": "single", **same}}], 1) == {}


def test_the_baseline_is_the_one_chosen_else_the_first_single_device_run():
    runs = [{"id": 4, "spec": {"strategy": "data"}}, {"id": 7, "spec": {"strategy": "single"}}]
    assert curve_baseline(runs, None) == 7 and curve_baseline(runs, 4) == 4
    assert curve_baseline(runs[:1], None) == 4


def test_loss_charts_draw_training_lines_and_held_out_points():
    steps = curves_frame().query("run_id == 1").drop(columns="run_id")
    spec = charts.loss_chart(steps).to_dict()
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]]
    assert marks == ["line", "point"]
    assert spec["layer"][0]["encoding"]["color"]["scale"]["domain"] == ["training", "held-out"]
    unevaluated = charts.loss_chart(steps.assign(eval_loss=None)).to_dict()  # eval every 0: no held-out in the legend
    assert unevaluated["layer"][0]["encoding"]["color"]["scale"]["domain"] == ["training"]
    overlay = charts.loss_overlay_chart(curves_frame(), {1: "a", 2: "b", 3: "c"}).to_dict()
    assert len(overlay["layer"]) == 2
    dev = charts.deviation_chart(pd.DataFrame({"run": ["b", "b"], "step": [0, 1], "deviation": [0.0, 1e-6]}),
                                 ["a", "b", "c"]).to_dict()  # fmt: skip
    assert dev["encoding"]["y"]["scale"]["type"] == "log"
    # one colour per run on both charts: the same domain in the same order; each legend lists what it draws
    loss_colour, dev_colour = overlay["layer"][0]["encoding"]["color"], dev["encoding"]["color"]
    assert loss_colour["scale"] == dev_colour["scale"] == {"domain": ["a", "b", "c"], "scheme": "tableau10"}
    assert loss_colour["legend"]["values"] == ["a", "b", "c"] and dev_colour["legend"]["values"] == ["b"]


def trained(engine, spec: RunSpec, losses: list[float], evals: dict[int, float], result: dict | None = None) -> int:
    run_id = api.submit(engine, spec)
    runner_rows.claim_run(engine, run_id, "r", "/tmp/none", [])
    runner_rows.add_step_metrics(engine, run_id, [
        Step(rank=0, t=float(i), step=i, total_steps=len(losses), step_time_s=0.1, loss=x, eval_loss=evals.get(i))
        for i, x in enumerate(losses)])  # fmt: skip
    base = {"rank": 0, "tp": 0, "pp": 0, "dp": 0, "peak_mem_bytes": 2**20, "compute_s": 0.5, "comm_s": 0.0,
            "idle_s": 0.0, "comm_bytes": {}, "comm_calls": {}}  # fmt: skip
    runner_rows.finish_run(engine, run_id, "succeeded", result={"tokens_per_s": 100.0, "step_time_s_p50": 0.1,
                                                                "ranks": [base], **(result or {})})  # fmt: skip
    return run_id


def test_the_run_page_draws_the_loss_and_a_generate_run_shows_its_text(engine):
    run_id = trained(engine, RunSpec(data="stdlib", eval_every=2), [5.5, 5.0, 4.6, 4.4], {1: 4.9, 3: 4.5})
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    assert any('"title": "Loss"' in c.proto.spec for c in at.get("vega_lite_chart"))
    assert any("data: stdlib; held-out loss every 2 steps" in c for c in texts(at.caption))
    gen = trained(engine, RunSpec(data="stdlib", workload="generate", prompt="def f", seq=5), [], {},
                  {"prompt": "def f", "generated_ids": [40, 41], "generated_text": "()"})  # fmt: skip
    at = page("pages/history.py", run=str(gen))
    assert not at.exception and {"def f", "()"} <= set(texts(at.code))
    assert any("its continuation: 2 tokens" in c for c in texts(at.caption))


def test_compare_overlays_the_chosen_runs_curves_with_their_deviation_from_the_single_device_run(engine):
    a = trained(engine, RunSpec(data="stdlib"), [5.5, 5.0, 4.6], {})
    b = trained(engine, RunSpec(strategy="layer", pp=2, data="stdlib"), [5.5, 5.0 * (1 + 3e-6), 4.6], {})
    at = page("pages/compare.py", runs=f"{b},{a}")
    assert not at.exception
    assert any(h.value == "Loss curves" for h in at.subheader)
    table = next(d.value for d in at.dataframe if "largest deviation" in d.value)
    assert table.set_index("run").loc[f"#{b} layer", "largest deviation"] == pytest.approx(3e-6)
    assert any(f"against #{a} single" in c for c in texts(at.caption))
    # two of the layer run's three steps equal the baseline's: not on the log chart, which says so
    assert "2 of 3 run-steps equal the baseline's loss exactly and are not drawn: a log scale has no zero." in texts(
        at.caption)  # fmt: skip


def test_compare_names_the_curves_that_draw_one_line_with_the_baseline():
    """The frame's losses run from 5.5 down to 4.0 and run 3's up to 1.01 x 5.2: a range of about 1.55, 1% of it
    0.0155. Run 2 differs from run 1 by at most 2e-6 x 5.2 = 1.04e-5 (step 1): one line; run 3 by 0.052: seen."""
    from ui.compare import coinciding_curves

    labels = {1: "#1 single", 2: "#2 pipeline", 3: "#3 data"}
    text = coinciding_curves(curves_frame(), 1, labels)
    assert text == ("#1 single and #2 pipeline draw one line: its training loss is within 1.0e-05 of the baseline's "
                    "at every step, less than 1% of the loss range drawn.")  # fmt: skip
    assert coinciding_curves(curves_frame().query("run_id != 2"), 1, labels) is None
