"""The Planner page's logic (ui/planner.py) and the page under Streamlit's AppTest, against a real database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from runner import api
from runner.planner.devices import cpu_host
from runner.planner.layouts import DEFAULT_ZERO_STAGES, evaluate
from runner.planner.models import Layout, Workload
from runner.spec.validation import validate_spec
from storage.calibration import prediction_of
from ui import planner as P
from ui.format import human_bytes

REPO = Path(__file__).resolve().parent.parent
TWO_CORES = cpu_host(2, 8 * 2**30, 10e9, 1e9)
FOUR_CORES = cpu_host(4, 8 * 2**30, 10e9, 1e9)


def test_guide_table_answers_the_guides_175b_example():
    t = P.guide_table()
    row = t[t.layout == "tp4 pp8 dp16 zero1"].iloc[0]
    assert bool(row.fits) and 40 < row["GiB per GPU"] < 78 and row["step s"] > 0
    unsharded = t[t.layout == "tp4 pp8 dp16"].iloc[0]
    assert not unsharded.fits and "GiB per GPU, you have 78.6 GiB" in unsharded["why not"]
    # the guide's own model-parallel example: 8 GPUs of ~22B parameters do not hold 175B with AdamW
    model_parallel = t[t.layout == "tp1 pp8 dp1"].iloc[0]
    assert not model_parallel.fits and model_parallel["params GiB"] > 80
    assert not t[t.layout == "tp1 pp1 dp1"].iloc[0].fits
    # the planner's own answer heads the table: the fastest layout of all 512 GPUs that fits, at least as fast
    # as every layout of the guide that fits
    best = P.guide_plan().best
    assert t.layout.iloc[0] == best.layout.label() and t.note.iloc[0].startswith("the planner's best")
    assert t["step s"].iloc[0] <= t[t.fits]["step s"].min() and t.layout.is_unique


def test_a_512_gpu_plan_computes_in_under_two_seconds_of_cpu():
    """Every layout of 512 GPUs for the guide's GPT-3 175B (100 layouts; 1F1B replays of up to 1536 microbatches
    on each of up to 32 stages for their memory) took 0.56 s of CPU here; the bound leaves 3.5x for a slower CPU.
    CPU time, not wall time: other processes on a busy machine do not count. The second plan of the same inputs
    comes from the planner's cache."""
    import time

    from runner.planner import layouts

    layouts.evaluate.cache_clear()
    layouts._judged.cache_clear()
    inputs = P.guide_inputs()
    start = time.process_time()
    first = P.run_plan(inputs, P.guide_devices())
    assert time.process_time() - start < 2.0
    assert len(first.feasible) + len(first.infeasible) == 100
    start = time.process_time()
    again = P.run_plan(inputs, P.guide_devices())
    assert time.process_time() - start < 0.01
    assert again.feasible == first.feasible and again.feasible is not first.feasible  # lists of its own


def test_tables_round_for_reading_and_say_device_without_gpus():
    assert [P.readable(x) for x in (1147.3746, 22.1977, 0.0045678, 0.5)] == [1147.0, 22.2, 0.00457, 0.5]
    inputs = P.PlannerInputs("tiny", {}, Workload(batch=8, seq=64, dtype="float32"), (0,), 1.0)
    p = P.plan(inputs.config(), inputs.work, TWO_CORES, use_all=True)
    table = P.feasible_table(p)
    assert list(table.columns[:4]) == ["", "layout", "step s", "MiB per device"]  # the answer before its parts
    assert table[""].tolist() == ["★ best"] + [""] * (len(table) - 1)
    assert P.recommendation(p).startswith(f"{p.best.layout.label()} on {p.best.layout.world_size} devices: step ")
    # a GPU plan says GPU
    gpus = P.plan(inputs.config(), inputs.work, P.devices_described(8, 80, 989, 450, 50, 8), use_all=True)
    assert "MiB per GPU" in P.feasible_table(gpus).columns


def test_predicted_over_measured_says_which_way():
    assert P.ratio_text("step time s", 5.039) == "5.039: predicted 5.0x slower than measured"
    assert P.ratio_text("step time s", 0.25) == "0.250: predicted 4.0x faster than measured"
    assert P.ratio_text("parameter bytes", 1.0) == "1.000: as measured"
    assert P.ratio_text("memory per rank (peak)", 0.8) == "0.800: predicted 20% less than measured"
    assert P.ratio_text("microbatches in flight", 1.5) == "1.500: predicted 50% more than measured"
    assert P.ratio_text("bubble", None) == "—"


def test_strategy_for_each_layout():
    assert P.strategy_for(Layout(), 1) == "single"
    assert P.strategy_for(Layout(tp=2), 1) == "tensor"
    assert P.strategy_for(Layout(pp=2), 1) == "layer"
    assert P.strategy_for(Layout(pp=2), 4) == "pipeline"
    assert P.strategy_for(Layout(dp=2, zero_stage=3), 1) == "data"
    assert P.strategy_for(Layout(tp=2, dp=2), 1) == "3d"


@pytest.mark.parametrize("microbatch_size", [0, 2])  # 2: gradient accumulation over microbatches of 2 everywhere
def test_every_feasible_tiny_layout_becomes_a_valid_spec(microbatch_size):
    work = Workload(batch=8, seq=64, dtype="float32", microbatch_size=microbatch_size)
    inputs = P.PlannerInputs("tiny", {}, work, (0, 1, 2, 3), 1.0)
    p = P.plan(inputs.config(), inputs.work, TWO_CORES, zero_stages=inputs.zero_stages, use_all=False)
    assert len(p.feasible) >= 7  # single, tensor, pipeline, data and data with ZeRO 1-3
    for c in p.feasible:
        spec = P.spec_for(inputs, c, "cpu")
        assert validate_spec(spec, gpu_count=0) == [], (c.layout.label(), spec)
        assert tuple(spec.degrees) == (c.layout.tp, c.layout.pp, c.layout.dp) and "plan" in spec.tags
        assert spec.zero_stage == c.layout.zero_stage and spec.microbatches == c.microbatches
        if microbatch_size:
            assert spec.batch // c.layout.dp // spec.microbatches == microbatch_size


def test_a_sequence_parallel_plan_launches_sequence_parallel():
    """The prediction stored with a launched plan counts sequence parallelism wherever tp > 1: the spec must run
    it there too (tensor and 3d), and never ask it of a layout without tensor parallelism."""
    work = Workload(batch=8, seq=64, dtype="float32", microbatches=2, sequence_parallel=True)
    inputs = P.PlannerInputs("tiny", {}, work, (0,), 1.0)
    for lay in (Layout(tp=2), Layout(tp=2, pp=2), Layout(tp=2, dp=2), Layout(pp=2), Layout(dp=2)):
        c = evaluate(inputs.config(), lay, work, FOUR_CORES)
        spec = P.spec_for(inputs, c, "cpu")
        assert validate_spec(spec, gpu_count=0) == [], (lay.label(), spec)
        assert spec.sequence_parallel == (lay.tp > 1), lay.label()


def test_reduce_fp32_reaches_the_spec_where_the_prediction_counted_it():
    """The page's reduce_fp32 prices data parallelism's reductions in float32; a launch must run them so, and only
    where there are replicas (validate_spec refuses it without dp)."""
    work = Workload(batch=8, seq=64, dtype="bf16-master", reduce_fp32=True)
    inputs = P.PlannerInputs("tiny", {}, work, (0,), 1.0)
    for lay in (Layout(dp=2), Layout(tp=2), Layout(tp=2, dp=2)):
        spec = P.spec_for(inputs, evaluate(inputs.config(), lay, work, FOUR_CORES), "cpu")
        assert spec.reduce_fp32 == (lay.dp > 1) and validate_spec(spec, gpu_count=0) == [], lay.label()


def test_custom_dimensions_reach_the_spec():
    inputs = P.PlannerInputs("tiny", {"n_layer": 2, "n_embd": 32}, Workload(batch=4, seq=32, dtype="float32"))
    c = P.plan(inputs.config(), inputs.work, TWO_CORES, use_all=False).feasible[0]
    spec = P.spec_for(inputs, c, "cpu")
    assert (spec.model_config().n_layer, spec.model_config().n_embd) == (2, 32)
    parts = {"family": "llama", "n_kv_head": 2, "ffn_hidden": 96, "rope_theta": 1e6, "tie_head": False}
    inputs = P.PlannerInputs("tiny", parts, Workload(batch=4, seq=32, dtype="float32"))
    c = P.plan(inputs.config(), inputs.work, TWO_CORES, use_all=False).feasible[0]
    assert P.spec_for(inputs, c, "cpu").model_config() == inputs.config()


def test_launch_stores_the_prediction_and_compare_reads_it(engine):
    inputs = P.PlannerInputs("tiny", {}, Workload(batch=4, seq=32, dtype="float32", microbatches=2), (0,), 1.0)
    p = P.plan(inputs.config(), inputs.work, TWO_CORES, use_all=False)
    c = next(c for c in p.feasible if c.layout == Layout(pp=2))
    run_id = P.launch(engine, inputs, c, TWO_CORES, steps=2)
    run = api.get_run(engine, run_id)
    assert run["status"] == "queued" and "plan" in run["tags"]
    pred = prediction_of(engine, run_id)
    assert pred["layout"] == {"tp": 1, "pp": 2, "dp": 1, "zero_stage": 0} and len(pred["stages"]) == 2
    # what Compare shows: the rank's measured figures beside the prediction
    measured = [{"rank": r, "pp": r, "param_bytes": s["param_bytes"], "optimizer_bytes": s["optimizer_bytes"] + 4,
                 "max_inflight_microbatches": s["in_flight"], "bubble_fraction": 0.4,
                 "peak_activation_bytes": s["activation_bytes"] // 2, "peak_tensor_bytes": 2 * s["total"]}
                for r, s in enumerate(pred["stages"])]  # fmt: skip
    t = P.predicted_vs_measured(pred, measured, step_time_s=0.2)
    params = t[t.figure == "parameter bytes"]
    assert list(params.ratio) == [1.0, 1.0]
    assert set(t.figure) == {"parameter bytes", "optimizer bytes", "saved activation bytes", "memory per rank (peak)",
                             "microbatches in flight", "bubble", "step time s"}  # fmt: skip
    assert list(t[t.figure == "memory per rank (peak)"].ratio) == [0.5, 0.5]
    assert list(t[t.figure == "saved activation bytes"].ratio) == pytest.approx([2.0, 2.0], rel=1e-5)
    # a pipeline of 2 with 2 microbatches: (p-1)/(m+p-1) = 1/3 predicted
    assert t[t.figure == "bubble"].predicted.iloc[0] == 1 / 3
    # as Compare shows it: bytes in binary units, the step time in seconds, ratios to three decimals
    shown = P.readable_comparison(t)
    row = shown[(shown.figure == "parameter bytes") & (shown["rank"] == "0")].iloc[0]
    assert row.predicted == human_bytes(pred["stages"][0]["param_bytes"])
    assert row["predicted / measured"] == "1.000: as measured"
    step = shown[shown.figure == "step time s"].iloc[0]
    assert (step["rank"], step.measured) == ("all", "0.200 s")
    assert step["predicted / measured"] == P.ratio_text("step time s", pred["step"]["total"] / 0.2)
    assert shown[shown.figure == "bubble"]["predicted / measured"].iloc[0] == "—"


def calibrated(engine, flops: float = 40e9) -> None:
    """A stored calibration of this host's CPU, as `python -m runner calibrate` would store it."""
    from runner.planner.calibrate import Calibration
    from storage.hosts import this_host

    Calibration(this_host(), "cpu", "test CPU", {"float32": flops, "bfloat16": flops / 4}, 2e9, 2, "gloo").store(engine)


def test_planner_page_answers_first_and_launches(engine):
    calibrated(engine)
    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()
    assert not at.exception
    assert "`0`" not in [m.value for m in at.markdown]  # no bare expression shown by Streamlit's magic
    # the answer on top: gpt2 on 8 H100 (the default), the recommendation and its figures
    assert at.markdown[0].value.startswith("**Recommended: ")
    assert [m.label for m in at.metric] == ["layout", "step time", "memory per GPU"]
    assert at.metric[0].value == at.dataframe[0].value.layout.iloc[0]
    assert "peak at" in at.dataframe[0].value.columns  # the feasible layouts: the moment each one peaks
    assert any("GPT-3 175B" in e.label for e in at.expander)
    assert "tp4 pp8 dp16 zero1" in list(at.dataframe[-1].value.layout)
    assert at.get("vega_lite_chart")  # the predicted pipeline timeline of a pipelined gpt2 layout
    # 'use every GPU' follows the count: 8 -> all counts up to 8; 512 -> only layouts of all 512
    assert not at.checkbox(key="planner_all_8").value
    at.number_input(key="planner_count").set_value(512).run()
    assert at.checkbox(key="planner_all_512").value and not at.exception
    # (gpt2's batch of 8 fills no 512 GPUs: every layout is refused, each of all 512)
    assert at.error and len(at.dataframe[0].value) == 0
    refused = at.dataframe[1].value
    assert set(refused.tp * refused.pp * refused.dp) == {512}
    at.selectbox(key="planner_model").set_value("tiny")
    at.number_input(key="planner_seq").set_value(64)
    at.selectbox(key="planner_dtype").set_value("float32")
    at.radio(key="planner_source").set_value("this host")
    at.run()
    assert not at.exception
    assert "MiB per device" in at.dataframe[0].value.columns  # no GPU here: devices
    assert at.slider(key="planner_eff_measured").value == 1.0  # a measured rate: no share of a peak
    at.button(key="planner_launch").click().run()
    assert not at.exception
    (run,) = api.list_runs(engine).itertuples()
    (message,) = [s.value for s in at.success]
    assert f"(/history?run={run.id})" in message and f"(/compare?runs={run.id})" in message
    assert prediction_of(engine, int(run.id))["efficiency"] == 1.0


@pytest.mark.slow
def test_the_first_plan_of_this_host_calibrates_it_once(engine):
    """No calibration stored: the page measures this host for real (a matmul process, a 2-rank all-reduce under
    torchrun) and plans with it; the next visit reads the stored one."""
    from storage.calibration import calibrations

    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=180).run()
    assert not at.exception
    (cal,) = {r["measured_at"] for r in calibrations(engine)}
    assert any("This host: " in c.value and "calibrated" in c.value for c in at.caption)
    AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()
    assert {r["measured_at"] for r in calibrations(engine)} == {cal}


def test_a_run_launched_from_a_plan_is_compared_with_its_prediction(engine, tmp_path):
    # plan -> launch (queued, prediction stored) -> the same spec run for real by torchrun -> stored result ->
    # plan_comparisons: the measured bytes equal the predicted ones, and the bubble and step time sit beside
    from storage import runner_rows
    from tests.jobs import run_torchrun

    inputs = P.PlannerInputs("tiny", {}, Workload(batch=4, seq=32, dtype="float32", microbatches=4), (0,), 1.0)
    p = P.plan(inputs.config(), inputs.work, TWO_CORES, use_all=False)
    c = next(c for c in p.feasible if c.layout == Layout(pp=2))
    run_id = P.launch(engine, inputs, c, TWO_CORES, steps=2)
    spec = api.get_run(engine, run_id)["spec"]
    runner_rows.claim_run(engine, run_id, "r", str(tmp_path), [])
    result = run_torchrun({**spec, "warmup": 0}, tmp_path / "run")
    runner_rows.finish_run(engine, run_id, "succeeded", result=result)
    t = P.plan_comparisons(engine, [run_id])[run_id]
    exact = t[t.figure.isin(["parameter bytes", "optimizer bytes", "microbatches in flight"])]
    assert len(exact) == 6 and list(exact.ratio) == [1.0] * 6
    saved = t[t.figure == "saved activation bytes"]
    assert len(saved) == 2 and all(0.9 <= x <= 1.1 for x in saved.ratio), saved
    assert len(t[t.figure == "memory per rank (peak)"]) == 2  # shown; on CPU RSS, not held to a bound (README)
    assert {"bubble", "step time s"} <= set(t.figure)
    assert P.plan_comparisons(engine, [run_id + 1]) == {}


def test_simulated_pipeline_step_meets_the_bubble_theory():
    # with messages that cost nothing (a huge link) the simulated 1F1B step idles (p-1)/(m+p-1) of the time
    from runner.planner.devices import described

    fast = described(8, 80, 100, 1e9, 1e9, 8)
    inputs = P.PlannerInputs("tiny", {}, Workload(batch=8, seq=64, microbatches=4), (0,))
    c = P.evaluate(inputs.config(), Layout(pp=4, dp=2), inputs.work, fast)
    sim = P.simulated_step(inputs, c, fast)
    assert abs(sim.bubble_mean - 3 / 7) < 1e-6 and c.step.bubble_fraction == 3 / 7
    assert P.simulated_step(inputs, P.evaluate(inputs.config(), Layout(dp=8), inputs.work, fast), fast) is None


def test_a_long_pipeline_is_drawn_a_window_at_a_time():
    """pp 16 with 192 microbatches: 6,144 passes in one step. The chart draws 16 microbatch slots of the
    m + p - 1 = 207 at once: per lane at most a forward, a backward and a wait before each of them a slot, and a
    cut bar at each edge -- 16 lanes x (16 x 4 + 2) bars at most."""
    from runner.planner.devices import described
    from ui.simulated import WINDOW_MICROBATCHES, timeline_window, windowed_chart

    devices = described(16, 80, 989, 450, 50, 8)
    inputs = P.PlannerInputs("gpt2", {"n_layer": 16}, Workload(batch=192, seq=128, microbatches=192), (0,))
    c = P.evaluate(inputs.config(), Layout(pp=16), inputs.work, devices)
    sim = P.simulated_step(inputs, c, devices)
    assert len(sim.spans[sim.spans.phase.isin(["forward", "backward"])]) == 16 * 192 * 2
    width = timeline_window(sim)
    assert width == pytest.approx(sim.step_time * 1e3 * WINDOW_MICROBATCHES / (192 + 15))
    for start in (0.0, sim.step_time * 1e3 / 2, sim.step_time * 1e3):  # the last is held to the step's end
        chart = windowed_chart(sim, start).to_dict()
        bars = next(iter(chart["datasets"].values()))
        assert 0 < len(bars) <= 16 * (WINDOW_MICROBATCHES * 4 + 2)
        lo, hi = chart["layer"][0]["encoding"]["x"]["scale"]["domain"]
        assert hi - lo == pytest.approx(width) and 0 <= lo and hi <= sim.step_time * 1e3 + 1e-9
    assert timeline_window(P.simulated_step(P.guide_inputs(), P.guide_plan().best, P.guide_devices())) is not None


def test_planner_page_names_a_bad_input_and_plans_nothing(engine):
    calibrated(engine)  # (measuring the host first is the test above's)
    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()
    at.number_input(key="planner_v").set_value(2)  # virtual stages without the interleaved schedule
    at.run()
    assert not at.exception
    errors = " ".join(e.value for e in at.error)
    assert "virtual_stages" in errors and "interleaved-1f1b" in errors
    assert len(at.dataframe) == 0  # no plan was drawn (the guide's example sits below the plan, not reached)


def plan_args(*argv: str):
    import argparse

    from runner.planner.cli import add_plan_parser

    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


def test_plan_this_host_predicts_what_the_page_does(engine, capsys):
    """A calibrated CPU computes at the rate it measured, in `plan --this-host` as on the page: the same step time
    for every layout (the CLI once ran its matmuls at the 80% share of a GPU's peak: 25% slower)."""
    from runner.planner.cli import run_plan

    calibrated(engine)
    here = api.this_host_devices(engine)
    assert here.measured_rate
    argv = ("--this-host", "--model", "tiny", "--seq", "64", "--dtype", "float32", "--batch", "8", "--fewer")
    assert run_plan(plan_args(*argv, "--json")) == 0
    cli = json.loads(capsys.readouterr().out)
    inputs = P.here_inputs(P.PlannerInputs("tiny", {}, Workload(batch=8, seq=64, dtype="float32")), here)
    page = {c.layout.label(): c for c in P.plan(inputs.config(), inputs.work, here, DEFAULT_ZERO_STAGES,
                                                efficiency=inputs.efficiency, use_all=False).feasible}  # fmt: skip
    assert cli["efficiency"] == 1.0 and {c["label"] for c in cli["feasible"]} == set(page)
    for c in cli["feasible"]:
        assert c["step_s"] == pytest.approx(page[c["label"]].step.total, rel=1e-9), c["label"]
    assert run_plan(plan_args(*argv)) == 0  # the table says devices and the measured rate, not GPUs and shapes
    text = capsys.readouterr().out
    heading = text.split("\nadamw: ")[0]  # the devices, the model and the table
    assert "MiB/device" in heading and "rate one rank measured" in heading and "GPU" not in heading
    assert run_plan(plan_args(*argv, "--efficiency", "0.5")) == 2  # a share of a GPU's peak means nothing here
    assert capsys.readouterr().err.startswith("plan: --efficiency: this host's CPU ranks compute at the matmul rate")


def test_gpus_a_node_follows_the_gpu_kind_unless_changed(engine):
    state: dict = {}
    P.follow_kind(state, "per", "h100-80gb")
    assert state["per"] == 8
    P.follow_kind(state, "per", "a10")
    assert state["per"] == 4  # the a10 preset's node
    state["per"] = 2  # the user's own
    P.follow_kind(state, "per", "h100-80gb")
    assert state["per"] == 2
    calibrated(engine)  # the page: switching the kind moves the field (it once kept the first kind's 8)
    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()
    assert at.number_input(key="planner_per").value == 8
    at.selectbox(key="planner_kind").set_value("a10").run()
    assert at.number_input(key="planner_per").value == 4 and not at.exception
    at.radio(key="planner_source").set_value("described").run()  # away and back: both fields are drawn anew
    at.radio(key="planner_source").set_value("known GPU").run()
    kind = at.selectbox(key="planner_kind").value
    assert at.number_input(key="planner_per").value == P.KINDS[kind].gpus_per_node and not at.exception


def _path(node, key: str, trail: tuple = ()) -> tuple | None:
    """The blocks from the page down to the widget `key`."""
    for child in getattr(node, "children", {}).values():
        if getattr(child, "key", None) == key:
            return (*trail, child)
        if found := _path(child, key, (*trail, child)):
            return found
    return None


def test_custom_model_fields_are_readable_and_say_what_empty_keeps(engine):
    """The ten fields of a custom model take the page's width, in columns of their own (nested in the quarter-wide
    model column they cut '14335' to '1433'); the workload's fields say what 0 and empty mean, and the CLI's
    microbatch_size and reduce_fp32 are there, validated as the CLI validates them."""
    calibrated(engine)
    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()
    at.selectbox(key="planner_model").set_value("llama-3.1-8b")
    at.checkbox(key="planner_custom").check().run()
    assert any(c.value.startswith("custom llama (from llama-3.1-8b) · train") for c in at.caption)  # not the preset
    for key in ("planner_ffn_hidden", "planner_family", "planner_n_layer"):
        assert [type(b).__name__ for b in _path(at.main, key)].count("Column") == 1, key  # no column in a column
    assert _path(at.main, "planner_ffn_hidden")[0] is not _path(at.main, "planner_model")[0]  # below the row
    assert at.number_input(key="planner_ffn_hidden").help.endswith("empty: llama-3.1-8b's 14336")
    assert at.number_input(key="planner_n_kv_head").help.endswith("empty: llama-3.1-8b's 8")
    mb = at.number_input(key="planner_mb")
    assert "0: one sequence each when pipelined, else the whole batch as one" in mb.help
    at.number_input(key="planner_mb").set_value(2)
    at.number_input(key="planner_mbs").set_value(2)
    at.checkbox(key="planner_reduce_fp32").check().run()  # under bf16-mixed: float32 already
    errors = " ".join(e.value for e in at.error)
    assert "microbatch_size: give microbatches (a count) or microbatch_size" in errors
    assert "reduce_fp32: reduces 16-bit gradients in float32" in errors and not at.exception


def test_infeasible_reasons_are_shown_whole_with_the_engines_own_step_named(engine):
    """70B on 16 A100-80GB under ZeRO-3 and bf16-master: the reasons read whole (the "why not" column as wide as
    its longest reason at Streamlit's ~7 px a character; the reserve said once above the table, not in every row),
    and the part of the peak that is the lab engine's AdamW step is named with how other engines differ."""
    work = Workload(batch=8, seq=2048, dtype="bf16-master", checkpoint="blocks")
    inputs = P.PlannerInputs("llama-3.1-70b", {}, work, (3,))
    p = P.run_plan(inputs, P.preset("a100-80gb", 16, 8))
    table = P.infeasible_table(p)
    longest = table["why not"].str.len().max()
    config = P.column_config(table)
    assert config["why not"]["width"] >= P.REASON_PX_PER_CHAR * longest
    assert all("reserved" not in r for r in table["why not"])
    step = [r for r in table["why not"] if "AdamW's step" in r]
    assert step and all("the lab engine's step buffers" in r for r in step)
    assert "DeepSpeed and Megatron-LM step differently" in config["AdamW step GiB"]["help"]
    assert table["AdamW step GiB"].max() > 30  # 8 bytes a stepped parameter of a 70B shard
