"""The schedule simulator (runner/planner/simulate.py) against timelines drawn by hand and the papers' formulas.

Every expected number here is derived in the test itself: the small timelines were drawn on paper from the
schedules' definitions, the rest are the closed forms of Huang et al. 2019 (GPipe), Narayanan et al. 2021
(1F1B, interleaved 1F1B) and Qi et al. 2023 (ZB-H1), which assume equal stages and free messages.
"""

from __future__ import annotations

import collections
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from runner.planner.simulate import SPAN_COLUMNS, measured_times, simulate, simulate_from_spans, spans_bubble


def compute_spans(sim) -> list[tuple[int, str, int, float, float]]:
    """(stage, phase initial, microbatch, start, end) of every compute span, by stage then start."""
    rows = sim.spans[sim.spans["phase"] != "recv_wait"].sort_values(["stage", "start"])
    return [(r.stage, r.phase[0].upper(), r.microbatch, r.start, r.end) for r in rows.itertuples()]


def test_gpipe_p2_m2_drawn_by_hand():
    # F = 1, B = 2. Stage 0: F0 [0,1] F1 [1,2], then waits for stage 1's backwards: B1 [5,7] B0 [7,9].
    # Stage 1: F0 [1,2] F1 [2,3] B1 [3,5] B0 [5,7]. Step 9 = (m+p-1)(F+B); each stage computes 6 of it.
    sim = simulate("gpipe", p=2, m=2, forward=1.0, backward=2.0)
    assert compute_spans(sim) == [
        (0, "F", 0, 0, 1), (0, "F", 1, 1, 2), (0, "B", 1, 5, 7), (0, "B", 0, 7, 9),
        (1, "F", 0, 1, 2), (1, "F", 1, 2, 3), (1, "B", 1, 3, 5), (1, "B", 0, 5, 7),
    ]  # fmt: skip
    assert sim.step_time == 9
    assert sim.bubble == pytest.approx([1 / 3, 1 / 3])  # (p-1)/(m+p-1)
    assert list(sim.spans.columns) == SPAN_COLUMNS


def test_1f1b_p2_m2_drawn_by_hand():
    # Stage 0 warms up with p-r-1 = 1 forward: F0 F1 B0 B1; stage 1: F0 B0 F1 B1.
    # Stage 1: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]; stage 0: F0 [0,1] F1 [1,2] B0 [4,6] B1 [7,9].
    sim = simulate("1f1b", p=2, m=2, forward=1.0, backward=2.0)
    assert compute_spans(sim) == [
        (0, "F", 0, 0, 1), (0, "F", 1, 1, 2), (0, "B", 0, 4, 6), (0, "B", 1, 7, 9),
        (1, "F", 0, 1, 2), (1, "B", 0, 2, 4), (1, "F", 1, 4, 5), (1, "B", 1, 5, 7),
    ]  # fmt: skip
    assert sim.step_time == 9
    assert sim.bubble == pytest.approx([1 / 3, 1 / 3])
    # the gaps before a pass are drawn as waits, as the engine records blocked receives: stage 0 waits [2,4]
    # and [6,7], stage 1 [0,1]; stage 1's idle [7,9] at the end is the end-of-step barrier's, not a receive's
    waits = sim.spans[sim.spans["phase"] == "recv_wait"]
    assert sorted(zip(waits["stage"], waits["start"], waits["end"], strict=True)) == [(0, 2, 4), (0, 6, 7), (1, 0, 1)]


def test_zb_h1_p2_m2_drawn_by_hand():
    # F = B = W = 1. Stage 0 runs F0 F1 B0 W0 B1 W1 (its W right behind its B); stage 1 (rank 1) leaves its first
    # W for later: F0 B0 F1 B1 W0 W1. Stage 1: F0 [1,2] B0 [2,3] F1 [3,4] B1 [4,5] W0 [5,6] W1 [6,7];
    # stage 0: F0 [0,1] F1 [1,2] B0 [3,4] W0 [4,5] B1 [5,6] W1 [6,7]. Step 7 of which each computes 6.
    sim = simulate("zb-h1", p=2, m=2, forward=1.0, backward=1.0, weight=1.0)
    assert compute_spans(sim) == [
        (0, "F", 0, 0, 1), (0, "F", 1, 1, 2), (0, "B", 0, 3, 4), (0, "W", 0, 4, 5), (0, "B", 1, 5, 6),
        (0, "W", 1, 6, 7),
        (1, "F", 0, 1, 2), (1, "B", 0, 2, 3), (1, "F", 1, 3, 4), (1, "B", 1, 4, 5), (1, "W", 0, 5, 6),
        (1, "W", 1, 6, 7),
    ]  # fmt: skip
    assert sim.bubble == pytest.approx([1 / 7, 1 / 7])  # (p-1)/(3m+p-1)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (3, 5), (4, 8), (4, 2)])
def test_gpipe_and_1f1b_match_the_closed_form(schedule, p, m):
    f, b = 0.7, 1.9
    sim = simulate(schedule, p=p, m=m, forward=f, backward=b)
    assert sim.step_time == pytest.approx((m + p - 1) * (f + b))  # Huang et al. 2019
    assert sim.bubble == pytest.approx([(p - 1) / (m + p - 1)] * p)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (2, 8, 2), (4, 8, 2), (2, 4, 4), (4, 4, 3)])
def test_interleaved_matches_megatron_bubble(p, m, v):
    # Each chunk holds 1/v of a stage's layers, so its passes take 1/v of a stage's: the ramp shrinks v-fold
    # (Narayanan et al. 2021, 2.2): bubble time (p-1)(F+B)/v against m(F+B) of work.
    f, b = 1.0, 2.0
    sim = simulate("interleaved-1f1b", p=p, m=m, forward=f / v, backward=b / v, v=v)
    assert sim.bubble == pytest.approx([(p - 1) / (v * m + p - 1)] * p)
    assert sim.step_time == pytest.approx(m * (f + b) + (p - 1) * (f + b) / v)


def test_interleaved_p2_v2_m4_beats_1f1b_on_the_same_work():
    one = simulate("1f1b", p=2, m=4, forward=1.0, backward=2.0)
    inter = simulate("interleaved-1f1b", p=2, m=4, forward=0.5, backward=1.0, v=2)
    assert inter.bubble_mean == pytest.approx(1 / 9)  # (p-1)/(vm+p-1) = 1/9 against 1f1b's 1/5
    assert one.bubble_mean == pytest.approx(1 / 5)
    assert one.step_time - inter.step_time == pytest.approx(1.5)  # half the (p-1)(F+B) = 3 ramp


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 6)])
def test_zb_h1_bubble_is_a_third_of_1f1b_with_equal_passes(p, m):
    # Qi et al. 2023, 3.1: with F = B = W = t, ZB-H1 idles (p-1)t per stage, 1F1B (whose backward is B+W = 2t)
    # idles (p-1)3t; the work is the same 3mt.
    t = 1.0
    zb = simulate("zb-h1", p=p, m=m, forward=t, backward=t, weight=t)
    one = simulate("1f1b", p=p, m=m, forward=t, backward=2 * t)
    assert zb.step_time == pytest.approx(3 * m * t + (p - 1) * t)
    assert zb.bubble == pytest.approx([(p - 1) / (3 * m + p - 1)] * p)
    idle_zb, idle_one = zb.step_time - 3 * m * t, one.step_time - 3 * m * t
    assert idle_zb / idle_one == pytest.approx(1 / 3)


def test_zb_h1_runs_every_weight_pass_after_its_backward():
    sim = simulate("zb-h1", p=3, m=5, forward=1.0, backward=1.0, weight=0.5)
    spans = sim.spans.set_index(["stage", "microbatch", "phase"])
    for s in range(3):
        for i in range(5):
            assert spans.loc[(s, i, "weight"), "start"] >= spans.loc[(s, i, "backward"), "end"]
    assert (sim.spans["phase"] == "weight").sum() == 15


def test_unequal_stages_follow_the_slowest_stage_formula():
    # GPipe with unequal stages and free messages: forwards end on the last stage after sum_s f_s + (m-1) max f,
    # backwards then take sum_s b_s + (m-1) max b (the slowest stage paces each pass).
    f, b, m = [1.0, 3.0, 2.0], [2.0, 1.0, 4.0], 4
    sim = simulate("gpipe", p=3, m=m, forward=f, backward=b)
    expected = sum(f) + (m - 1) * max(f) + sum(b) + (m - 1) * max(b)
    assert sim.step_time == pytest.approx(expected)
    assert sim.busy == pytest.approx([m * (f[s] + b[s]) for s in range(3)])


def test_transfer_delays_each_dependent_pass_by_exactly_that_much():
    f, b, tx = 1.0, 2.0, 0.25
    free = simulate("gpipe", p=2, m=1, forward=f, backward=b)
    slow = simulate("gpipe", p=2, m=1, forward=f, backward=b, transfer=tx)
    starts = slow.spans.set_index(["stage", "phase"])["start"]
    assert starts[(1, "forward")] == pytest.approx(f + tx)  # stage 1's forward waits for the activation
    assert starts[(1, "backward")] == pytest.approx(f + tx + f)  # its own forward: no message, no delay
    assert starts[(0, "backward")] == pytest.approx(f + tx + f + b + tx)  # the gradient's trip back
    assert slow.step_time - free.step_time == pytest.approx(2 * tx)
    # with m microbatches GPipe crosses each of the p-1 links once forward and once backward on its ramp
    p, m = 3, 4
    base = simulate("gpipe", p=p, m=m, forward=f, backward=b)
    with_tx = simulate("gpipe", p=p, m=m, forward=f, backward=b, transfer=tx)
    assert with_tx.step_time - base.step_time == pytest.approx(2 * (p - 1) * tx)


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1)])
def test_every_operation_runs_once_in_its_rank_order(schedule, v):
    p, m = 4, 8
    sim = simulate(schedule, p=p, m=m, forward=1.0, backward=1.5, weight=0.5, transfer=0.1, v=v)
    compute = sim.spans[sim.spans["phase"] != "recv_wait"]
    kinds = 3 if schedule == "zb-h1" else 2
    assert len(compute) == p * v * m * kinds
    for _rank, lane in sim.spans.groupby("rank"):  # one operation at a time per rank
        lane = lane.sort_values("start")
        assert (lane["start"].to_numpy()[1:] >= lane["end"].to_numpy()[:-1] - 1e-12).all()
    assert sim.spans["end"].max() == pytest.approx(sim.step_time)


def hand_measured_spans() -> pd.DataFrame:
    """A measured-looking GPipe p=2 m=2 step drawn by hand: stage 0 F 1.0/1.2, B 2.0/2.2; stage 1 F 1.5/1.5,
    B 3.0/3.0; every message 0.1 from the sender's end to the receive's end; a send posting span too."""
    rows = [  # rank, stage, microbatch, phase, start, end
        (0, 0, 0, "forward", 0.0, 1.0), (0, 0, 0, "send", 1.0, 1.01), (0, 0, 1, "forward", 1.01, 2.21),
        (1, 1, 0, "recv_wait", 0.0, 1.1), (1, 1, 0, "forward", 1.1, 2.6), (1, 1, 1, "forward", 2.6, 4.1),
        (1, 1, 1, "backward", 4.1, 7.1), (1, 1, 0, "backward", 7.1, 10.1),
        (0, 0, 1, "recv_wait", 2.21, 7.2), (0, 0, 1, "backward", 7.2, 9.2),
        (0, 0, 0, "recv_wait", 9.2, 10.2), (0, 0, 0, "backward", 10.2, 12.4),
    ]  # fmt: skip
    return pd.DataFrame([(3, *r) for r in rows], columns=SPAN_COLUMNS)


def test_measured_times_read_mean_passes_and_the_transfer_from_spans():
    t = measured_times(hand_measured_spans(), p=2)
    assert t.forward == pytest.approx([1.1, 1.5])
    assert t.backward == pytest.approx([2.1, 3.0])
    # receives blocked before the sender finished: F(1,0) (1.1 - 1.0), B(0,1) (7.2 - 7.1), B(0,0) (10.2 - 10.1)
    assert t.transfer == pytest.approx(0.1)
    assert t.transfer_samples == 3


def test_simulate_from_spans_runs_the_schedule_alone_on_those_times():
    spans = hand_measured_spans()
    sim = simulate_from_spans(spans, "gpipe", p=2, m=2)
    # By hand: stage 0 forwards [0,1.1] [1.1,2.2]; stage 1 F0 [1.2,2.7], F1 [2.7,4.2] (its input came at 2.3),
    # B1 [4.2,7.2], B0 [7.2,10.2]; stage 0 B1 [7.3,9.4] (the gradient left at 7.2), B0 [10.3,12.4].
    assert sim.step_time == pytest.approx(12.4)
    assert sim.spans["step"].unique().tolist() == [3]
    measured = spans_bubble(spans)
    # measured: stage 0 computes 1.0+1.2+2.0+2.2 = 6.4, stage 1 9.0, of a 12.4 step
    assert measured == pytest.approx(1 - (6.4 + 9.0) / (2 * 12.4))
    assert math.isclose(sim.bubble_mean, 1 - (2 * 1.1 + 2 * 2.1 + 2 * 1.5 + 2 * 3.0) / (2 * 12.4))


def test_deadlocked_lists_are_reported_not_looped(monkeypatch):
    from runner.planner import simulate as module

    Op = collections.namedtuple("Op", "kind chunk microbatch")
    # a list where each rank starts with a backward, which needs its forward later in the list: cannot run
    monkeypatch.setattr(module, "schedule_ops", lambda *a, **k: [Op("B", 0, 0), Op("F", 0, 0)])
    with pytest.raises(ValueError, match="deadlock"):
        module.simulate("gpipe", p=2, m=1, forward=1.0, backward=1.0)


# ---- the run page: simulated beside measured ------------------------------------------------------------
PIPELINE_SPEC = {"strategy": "pipeline", "model": "tiny", "pp": 2, "microbatches": 2, "schedule": "gpipe"}


def test_timeline_pair_of_a_finished_pipeline_run():
    from ui.simulated import timeline_pair, timeline_pair_charts

    pair = timeline_pair(hand_measured_spans(), PIPELINE_SPEC, {"bubble_fraction": 0.4})
    assert pair is not None and pair.step == 3
    assert pair.sim.step_time == pytest.approx(12.4)  # the hand-drawn simulation above
    assert set(pair.simulated["rank"]) == {0, 1} and set(pair.measured["stage"]) == {0, 1}
    assert "forward 1100.0 / 1500.0 ms, backward 2100.0 / 3000.0 ms per stage" in pair.caption
    assert "transfer 100.00 ms (median of 3 receives)" in pair.caption
    assert f"idles {1 - 15.4 / 24.8:.1%}" in pair.caption and "job's own figure" in pair.caption
    measured, simulated = (c.to_dict() for c in timeline_pair_charts(pair))  # two charts: each takes the width
    domains = [c["layer"][0]["encoding"]["x"]["scale"]["domain"] for c in (measured, simulated)]
    later = 1e3 * max(pair.measured["end"].max(), pair.simulated["end"].max())
    assert domains[0] == domains[1] == [0.0, pytest.approx(later)]  # one time axis, to the later end of the two


@pytest.mark.parametrize(
    "spec",
    [
        {"strategy": "layer", "model": "tiny", "pp": 2},  # no schedule: stages run one after another
        {**PIPELINE_SPEC, "workload": "forward"},  # no backward to schedule
        {**PIPELINE_SPEC, "pp": 1},
        {**PIPELINE_SPEC, "pp": 4},  # spans of stages 2 and 3 missing: nothing honest to simulate
    ],
)
def test_no_simulated_timeline_where_no_schedule_made_the_spans(spec):
    from ui.simulated import timeline_pair

    assert timeline_pair(hand_measured_spans(), spec, None) is None


def test_run_page_draws_the_simulated_timeline_under_the_measured_one(engine, tmp_path):
    from runner import api
    from runner.spec.run_spec import RunSpec
    from storage import runner_rows
    from tests.test_ui_pages import page

    run_id = api.submit(engine, RunSpec.from_dict(PIPELINE_SPEC))
    runner_rows.claim_run(engine, run_id, "r", str(tmp_path), [])
    runner_rows.finish_run(engine, run_id, "succeeded", result={"bubble_fraction": 0.4, "ranks": []})
    runner_rows.add_spans(engine, run_id, hand_measured_spans().to_dict("records"))
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    charts = [c.proto.spec for c in at.get("vega_lite_chart")]
    measured = [i for i, c in enumerate(charts) if "Pipeline timeline, step 4, measured" in c]
    simulated = [i for i, c in enumerate(charts) if "Simulated: the schedule alone" in c]
    assert len(measured) == len(simulated) == 1 and simulated[0] == measured[0] + 1  # the simulation right under it
    assert any("Simulated from this run's own mean pass times" in c.value for c in at.caption)


def test_a_simulated_step_alone_is_drawn_with_the_measured_chart():
    from ui.simulated import simulated_chart

    sim = simulate("interleaved-1f1b", p=2, m=4, forward=0.5, backward=1.0, v=2)
    spec = simulated_chart(sim).to_dict()
    assert "interleaved-1f1b, v = 2: p = 2, m = 4" in str(spec) and "bubble 11.1%" in str(spec)


def test_the_simulator_and_its_page_part_import_without_torch():
    code = "import sys, runner.planner.simulate, ui.simulated; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


# ---- against the real engine ----------------------------------------------------------------------------
@pytest.mark.slow  # a torchrun job each (a few seconds on a quiet machine)
@pytest.mark.parametrize("schedule,v", [("interleaved-1f1b", 2), ("zb-h1", 1)])
def test_simulated_ranks_run_the_same_passes_in_the_same_order_as_the_engine(tmp_path, schedule, v):
    """A real tiny pipeline job (torchrun, gloo): per rank, the simulated compute spans are the measured ones --
    the same (stage, microbatch, phase) in the same order -- and the times are read from its spans."""
    from tests.jobs import read_events, run_torchrun

    p, m = 2, 4
    spec = {"strategy": "pipeline", "model": "tiny", "batch": 8, "seq": 16, "steps": 1, "warmup": 1, "pp": p,
            "microbatches": m, "schedule": schedule, "virtual_stages": v, "workload": "train"}  # fmt: skip
    run_torchrun(spec, tmp_path)
    spans = pd.DataFrame([e for e in read_events(tmp_path) if e["kind"] == "span"])[SPAN_COLUMNS]
    sim = simulate_from_spans(spans, schedule, p, m, v)

    def order(frame: pd.DataFrame, rank: int) -> list[tuple[int, int, str]]:
        rows = frame[(frame["rank"] == rank) & frame["phase"].isin(["forward", "backward", "weight"])]
        return [(r.stage, r.microbatch, r.phase) for r in rows.sort_values("start").itertuples()]

    for rank in range(p):
        assert order(sim.spans, rank) == order(spans, rank)
    t = measured_times(spans, p, v)
    assert all(x > 0 for x in t.forward) and t.transfer_samples > 0
    assert 0 < sim.bubble_mean < 1
