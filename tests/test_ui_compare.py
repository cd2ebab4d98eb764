"""Compare and live pages: the comparison figures, the guide's table, baseline ratios, spec differences,
best-of-each-strategy, timelines; and the live view of running and queued runs."""

from __future__ import annotations

import pandas as pd
import pytest

from runner import api
from runner.analysis.same_work import WORK_FIELDS
from runner.spec.run_spec import RunSpec
from storage import runner_rows
from tests.test_ui_pages import page, texts
from ui import charts
from ui.alike import best_note, unlike_baseline
from ui.compare import (
    comparison_table,
    guide_table,
    readable_table,
    spec_differences,
    unsharded_sources,
    with_baseline,
)


def finished(engine, spec: RunSpec, tokens_per_s: float, idle: float = 0.0, spans: bool = False) -> int:
    """A succeeded run with a result shaped like a job's."""
    run_id = api.submit(engine, spec)
    runner_rows.claim_run(engine, run_id, "r", "/tmp/none", [])
    ranks = [{"rank": r, "tp": 0, "pp": r if spec.strategy in ("layer", "pipeline") else 0, "dp": 0,
              "param_count": 100_000, "param_bytes": 400_000, "optimizer_bytes": 800_000,
              "peak_mem_bytes": 2**20 * (r + 1), "compute_s": 1.0, "comm_s": 0.5, "idle_s": idle,
              "comm_bytes": {"send": 1000}, "comm_calls": {"send": 2}} for r in range(spec.world_size)]  # fmt: skip
    result = {"tokens_per_s": tokens_per_s, "step_time_s_p50": 1000 / tokens_per_s, "step_times_s": [0.1, 0.1],
              "bubble_fraction": 0.25 if spans else None, "bubble_fraction_theory": 0.2 if spans else None,
              "ranks": ranks}  # fmt: skip
    runner_rows.finish_run(engine, run_id, "succeeded", result=result)
    if spans:
        runner_rows.add_spans(engine, run_id, [
            {"step": 1, "rank": s, "stage": s, "microbatch": m, "phase": ph, "start": 0.01 * (m + s), "end": 0.01 * (m + s) + 0.005}
            for s in range(2) for m in range(4) for ph in ("forward", "backward")])  # fmt: skip
    return run_id


def test_comparison_figures_ratios_and_differences(engine):
    a = finished(engine, RunSpec(strategy="single", model="tiny"), 1000.0)
    b = finished(engine, RunSpec(strategy="layer", pp=2, model="tiny"), 500.0, idle=1.5)
    runs = [api.get_run(engine, i) for i in (a, b)]
    table = comparison_table(runs)
    assert list(table["tokens_per_s"]) == [1000.0, 500.0]
    assert table["ranks"].tolist() == [1, 2] and table.loc[1, "degrees"] == "tp1 pp2 dp1"  # the stored ones
    assert table.loc[1, "idle_share"] == pytest.approx(1.5 / 3.0)
    assert table.loc[1, "messages_per_step"] == 2 * 2 / 2  # 2 ranks x 2 calls over 2 timed steps
    ratios = with_baseline(table, a)
    assert list(ratios["tokens_per_s"]) == [1.0, 0.5]
    diff = spec_differences(runs)
    assert set(diff.index) == {"strategy", "pp"}
    # train runs never read new_tokens; booleans read on/off and a missing path "—", not True/None
    other = finished(engine, RunSpec(strategy="single", model="tiny", new_tokens=8, verify=True), 900.0)
    diff = spec_differences([runs[0], api.get_run(engine, other)])
    assert "new_tokens" not in diff.index and diff.loc["verify"].tolist() == ["off", "on"]
    guide = guide_table(runs).set_index("run")
    # 'single' computes 1.0 s of its 1.5 (67%: good), a third in communication (poor from 30%), and has no
    # pipeline, which its bubble cell says instead of a blank; the layer split computes 2.0 s of its 6.0
    assert guide.loc[f"#{a} single tp1 pp1 dp1", ["compute", "compute share", "communication", "bubble"]].tolist() == [
        "good", "67%", "poor", "n/a: no pipeline"]  # fmt: skip
    assert guide.loc[f"#{b} layer tp1 pp2 dp1", ["compute", "compute share", "comm share"]].tolist() == [
        "poor", "33%", "17%"]  # fmt: skip
    shown = readable_table(table).set_index("run")
    assert {"layout", "messages/step", "payload MiB/step", "idle share"} <= set(shown.columns)
    assert shown.loc[b, "idle share"] == "50.0%" and shown.loc[b, "MFU"] == "GPU only"
    # in ms as the medians table gives it: 1,000 / 500 tokens/s = 2 s a step
    assert shown.loc[b, "step p50 (ms)"] == 2000.0
    assert readable_table(ratios, ratio=True).set_index("run").loc[b, "tokens/s"] == "0.5x"


def test_no_ratio_to_a_baseline_of_other_work_and_the_table_says_each_runs_work(engine):
    """A run of twice the batch read "2.5x the tokens/s" of the baseline: the ratio measured the batch. Its row now
    says what differs instead, and every row shows the batch and sequence its figures measured."""
    a = finished(engine, RunSpec(strategy="single", model="tiny"), 1000.0)
    same = finished(engine, RunSpec(strategy="data", dp=2, model="tiny"), 1500.0)
    other = finished(engine, RunSpec(strategy="data", dp=2, model="tiny", batch=16), 2500.0)
    runs = [api.get_run(engine, i) for i in (a, same, other)]
    unlike = unlike_baseline(runs, a, WORK_FIELDS)
    assert unlike == {other: "batch 8 / 16"}
    shown = readable_table(with_baseline(comparison_table(runs), a, unlike), ratio=True).set_index("run")
    assert shown.loc[same, "tokens/s"] == "1.5x" and shown.loc[same, "not compared: differs in"] == ""
    assert shown.loc[other, "tokens/s"] == "not compared" and shown.loc[other, "step p50 (ms)"] == "not compared"
    assert shown.loc[other, "not compared: differs in"] == "batch 8 / 16"
    assert shown["batch x seq"].tolist() == ["8 x 64", "8 x 64", "16 x 64"]
    at = page("pages/compare.py", runs=f"{a},{same},{other}")
    at.selectbox(key="compare_baseline").set_value(a).run()
    assert not at.exception
    assert at.dataframe[0].value.set_index("run").loc[other, "tokens/s"] == "not compared"


def test_compare_reads_verify_as_a_verdict_and_communication_as_payload_and_wire_bytes(engine):
    from tests.test_ui_pages import VERIFY, finished_run

    tp = {"comm_bytes": {"all_reduce": 4 * 2**20}, "comm_wire_bytes": {"all_reduce": 4 * 2**20},
          "comm_calls": {"all_reduce": 8}}  # fmt: skip
    pipe = {"comm_bytes": {"send": 2**20}, "comm_wire_bytes": {"send": 2**20}, "comm_calls": {"send": 4, "recv": 4}}
    legacy = {"comm_bytes": {"send": 2**20, "recv": 2**20}, "comm_calls": {"send": 4, "recv": 4}}
    ids = [
        finished_run(engine, RunSpec(strategy="tensor", tp=2), {"verify": VERIFY, "mfu": None}, [tp, tp]),
        finished_run(engine, RunSpec(strategy="pipeline", pp=2, microbatches=4),
                     {"verify": {**VERIFY, "passed": False}, "bubble_fraction": 0.3, "bubble_fraction_theory": 0.2},
                     [pipe, {}]),  # hand-made: only rank 0 sent
        finished_run(engine, RunSpec(strategy="layer", pp=2), {"verify": None}, [legacy, {}]),
        finished_run(engine, RunSpec(strategy="layer", pp=2), {"verify": {"logits_max_abs_diff": 0.0}}, [legacy, {}]),
    ]  # fmt: skip
    table = comparison_table([api.get_run(engine, i) for i in ids])
    assert table["verify"].tolist() == ["pass", "fail", "off", "no verdict"]
    # payload: all ranks per timed step (2 steps); point-to-point counted once, at the sender, old runs too
    assert table["comm_mib_per_step"].tolist() == [4.0, 0.5, 0.5, 0.5]
    # wire: the busiest rank per timed step; none recorded before wire estimates (blank, not 0)
    assert table["wire_mib_per_rank_step"].iloc[:2].tolist() == [2.0, 0.5]
    assert table["wire_mib_per_rank_step"].iloc[2:].isna().all()
    assert table["bubble_measured"].isna().tolist() == [True, False, True, True]
    assert table["mfu"].isna().all()
    at = page("pages/compare.py", runs=",".join(map(str, ids)))
    assert not at.exception
    assert at.dataframe[0].value["verify"].tolist() == ["pass", "fail", "off", "no verdict"]


def test_best_of_each_strategy_picks_the_fastest_succeeded_run(engine):
    finished(engine, RunSpec(strategy="layer", pp=2), 100.0)
    fast = finished(engine, RunSpec(strategy="layer", pp=2), 300.0)
    single = finished(engine, RunSpec(strategy="single"), 200.0)
    finished(engine, RunSpec(strategy="single", workload="forward"), 900.0)  # another workload
    assert api.best_runs(engine, "tiny", "train").ids == sorted([fast, single])
    # Only runs of the newest one's work are picked, so the picks can be ranked: a faster single run at another
    # batch is not "the best single run" beside them, until a run of that batch is the newest.
    other = finished(engine, RunSpec(strategy="single", batch=4), 5000.0)
    newest = finished(engine, RunSpec(strategy="layer", pp=2), 100.0)
    assert api.best_runs(engine, "tiny", "train").ids == sorted([fast, single])
    assert newest not in api.best_runs(engine, "tiny", "train").ids  # slower than the earlier layer run of that work
    finished(engine, RunSpec(strategy="data", dp=2, batch=4), 10.0)
    picked = api.best_runs(engine, "tiny", "train")
    assert picked.ids == sorted([other, newest + 1]) and picked.work_of == newest + 1
    assert picked.left_out == {"layer": ["batch"]}  # its runs are all of batch 8: named, not dropped unsaid
    assert best_note(picked) == (f"The fastest run of each strategy among those that did run #{newest + 1}'s work "
                                 "(the newest). Left out, their runs differ in batch: layer.")  # fmt: skip
    at = page("pages/compare.py")
    at.button(key="compare_best").click().run()  # the page says so beside its pick
    assert not at.exception and best_note(picked) in texts(at.caption)


def test_timeline_chart_draws_one_bar_per_stage_microbatch_and_phase():
    spans = pd.DataFrame([{"step": 1, "rank": s, "stage": s, "microbatch": m, "phase": "forward",
                           "start": 0.001 * m, "end": 0.001 * m + 0.0005} for s in range(2) for m in range(3)])  # fmt: skip
    chart = charts.timeline_chart(spans).to_dict()
    assert chart["layer"][0]["mark"]["type"] == "bar"
    assert chart["layer"][0]["encoding"]["x2"]["field"] == "end_ms"


def test_compare_page_from_a_shared_link(engine):
    a = finished(engine, RunSpec(strategy="single"), 1000.0)
    b = finished(engine, RunSpec(strategy="pipeline", pp=2, microbatches=4), 800.0, spans=True)
    at = page("pages/compare.py", runs=f"{a},{b}")
    assert not at.exception
    assert at.multiselect(key="compare_runs").value == [a, b]
    assert any("theory (p-1)/(m+p-1) = 20.0%" in c for c in texts(at.caption))
    at.selectbox(key="compare_baseline").set_value(a).run()
    assert not at.exception


def test_compare_page_empty_state(engine):
    at = page("pages/compare.py")
    assert any("No finished runs yet" in i for i in texts(at.info))


def test_live_page_lists_running_and_queued_runs_with_wait_reasons(engine):
    running = api.submit(engine, RunSpec(strategy="layer", pp=2))
    runner_rows.claim_run(engine, running, "r", "/tmp/none", [])
    runner_rows.update_run(engine, running, progress_step=2)
    waiting = api.submit(engine, RunSpec(strategy="single"))
    runner_rows.set_wait_reason(engine, waiting, "waiting for a CPU slot (1 of 1 CPU jobs running)")
    at = page("pages/live.py")
    assert not at.exception
    assert any("waiting for a CPU slot" in m for m in texts(at.markdown))
    at.button(key=f"live_cancelq_{waiting}").click().run()
    assert api.get_run(engine, waiting)["status"] == "cancelled"
    at.button(key=f"live_cancel_{running}").click().run()
    assert api.get_run(engine, running)["cancel_requested"] is True
    # the cancelled queued run says how it ended instead of vanishing; an hour-old run has left the list
    from datetime import UTC, datetime, timedelta

    old = finished(engine, RunSpec(strategy="single"), 100.0)
    runner_rows.update_run(engine, old, finished_at=datetime.now(UTC) - timedelta(hours=1))
    at.run()
    ended = [m for m in texts(at.markdown) if f"(/history?run={waiting})" in m]
    assert len(ended) == 1 and f"cancelled **[#{waiting}](/history?run={waiting})** single" in ended[0]
    assert "ago" in ended[0] and f"(/history?run={old})" not in ended[0]


def test_live_page_empty_state(engine):
    at = page("pages/live.py")
    assert any("Nothing is running or queued" in i for i in texts(at.info))


def test_launch_records_who_launched_it(engine):
    at = page("pages/launch.py")
    assert at.text_input(key="launch_user").value == api.default_user()
    at.text_input(key="launch_user").set_value("ada").run()
    at.button(key="launch_submit").click().run()
    (run,) = api.list_runs(engine).to_dict("records")
    assert run["user"] == "ada"


def test_history_date_filter_lives_in_the_query_string(engine):
    from datetime import UTC, datetime, timedelta

    old = api.submit(engine, RunSpec(strategy="single"))
    runner_rows.update_run(engine, old, created_at=datetime.now(UTC) - timedelta(days=10))
    api.submit(engine, RunSpec(strategy="single"))
    today = datetime.now(UTC).date().isoformat()
    at = page("pages/history.py", since=today, until=today)
    assert not at.exception
    assert any("1 run matches the filters" in c for c in texts(at.caption)), texts(at.caption)


def test_guide_table_states_memory_as_bytes_per_rank_against_the_unsharded_run(engine):
    """ZeRO-3 over 2 ranks of the tiny GPT (figures as the job measured them, tests/test_zero.py) holds half
    the model state of the unsharded run: measured against a compared 'single' run when there is one,
    else against the whole model's state computed from its 241024 parameters (4 + 4 + 8 bytes each)."""
    from tests.test_ui_pages import finished_run

    psi = 241024
    single = {"param_count": psi, "param_bytes": 4 * psi, "optimizer_bytes": 8 * psi + 4 * 52}
    zero3 = {"param_count": psi // 2, "param_bytes": 2 * psi, "grad_bytes": 2 * psi, "optimizer_bytes": 4 * psi + 20,
             "zero_stage": 3}  # fmt: skip
    a = finished_run(engine, RunSpec(strategy="single"), {}, [single])
    b = finished_run(engine, RunSpec(strategy="data", dp=2, zero_stage=3), {}, [zero3, zero3])
    both = guide_table([api.get_run(engine, i) for i in (a, b)])
    held, unsharded = (8 * psi + 20) / 2**20, (16 * psi + 208) / 2**20
    assert both["MiB per rank"].tolist() == [f"{unsharded:.2f}", f"{held:.2f}"]
    assert both["vs unsharded"].tolist() == ["1.00x", f"{held / unsharded:.2f}x"]  # 0.50x
    # single holds it all on its one rank (1 / (1 x 1.00) = 1); ZeRO-3 splits it over 2 (1 / (2 x 0.50) = 1.00)
    assert both["memory"].tolist() == ["excellent", "excellent"]
    assert unsharded_sources([api.get_run(engine, i) for i in (a, b)]) == [f"#{a}, #{b} against #{a} single, measured"]
    alone = guide_table([api.get_run(engine, b)])
    assert alone["MiB per rank"].iloc[0] == f"{held:.2f}"
    assert unsharded_sources([api.get_run(engine, b)]) == [f"#{b} against whole model, computed"]
    assert alone["vs unsharded"].iloc[0] == f"{(8 * psi + 20) / (16 * psi):.2f}x"
    # plain data parallelism: each of the 2 replicas holds the whole state, 1 / (2 x 1.00) = 0.5: poor
    c = finished_run(engine, RunSpec(strategy="data", dp=2), {}, [single, single])
    assert guide_table([api.get_run(engine, i) for i in (a, c)])["memory"].tolist() == ["excellent", "poor"]
