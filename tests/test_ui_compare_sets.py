"""Compare's repeated runs (ui/compare_sets.py): grouped by spec, medians with intervals, differences in words."""

from __future__ import annotations

from runner import api
from runner.spec.run_spec import RunSpec
from storage import runner_rows
from tests.test_ui_compare import finished
from ui.compare_sets import comparison, group_runs, medians_table, verdicts

SINGLE, DATA = RunSpec(strategy="single"), RunSpec(strategy="data", dp=2)


def runs_of(engine, *pairs) -> list[dict]:
    return [api.get_run(engine, finished(engine, spec, tps)) for spec, tps in pairs]


def test_runs_group_by_spec_apart_from_tags_and_time_limit_and_labels_name_what_differs(engine):
    runs = runs_of(engine, (SINGLE, 1000.0), (RunSpec(strategy="single", tags=("x",), time_limit_s=60), 1100.0),
                   (DATA, 2000.0), (RunSpec(strategy="single", batch=4), 500.0))  # fmt: skip
    groups = group_runs(runs)
    assert [len(g.runs) for g in groups] == [2, 1, 1]
    # each labelled by what it does not share with most: the batch-4 run by its batch
    assert [g.label for g in groups] == ["single · tp1 pp1 dp1", "data · tp1 pp1 dp2", "single · tp1 pp1 dp1 · batch 4"]
    custom = RunSpec(strategy="single", model="custom", n_layer=2, n_head=2, n_embd=32, vocab_size=256, block_size=64,
                     eval_every=0, warmup=0, seed=7)  # fmt: skip
    labels = [g.label for g in group_runs([*runs, *runs_of(engine, (custom, 900.0))])]
    assert labels[:3] == ["single · tp1 pp1 dp1", "data · tp1 pp1 dp2", "single · tp1 pp1 dp1 · batch 4"]
    assert "None" not in labels[3] and labels[3].startswith("single · tp1 pp1 dp1 · block_size 64")  # its own only
    queued = api.submit(engine, SINGLE)  # no result yet: not in any group
    assert len(group_runs([*runs, api.get_run(engine, queued)])) == 3


def test_a_groups_median_interval_and_spread_with_the_confidence_three_runs_give(engine):
    runs = runs_of(engine, (SINGLE, 1000.0), (SINGLE, 1250.0), (SINGLE, 800.0))
    table = medians_table(group_runs(runs)).set_index("figure")
    row = table.loc["tokens/s"]
    # 3 runs: the median is the middle one; the interval is min..max, covering the median with 1 - 2/8.
    assert (row["runs"], row["median"], row["interval"]) == (3, "1,000", "800..1,250")
    assert row["confidence"] == "75%: 6 runs reach 95%" and row["spread (min..max)"] == "800..1,250"
    assert table.loc["step time p50 (ms)", "median"] == "1000.00"  # 1000 / 1000 tokens/s in ms
    one = medians_table(group_runs(runs[:1])).set_index("figure").loc["tokens/s"]
    assert (one["runs"], one["interval"]) == (1, "none: one run")  # not 1,000..1,000, read as a certainty
    # One spec only: its spread is the noise, (1250 - 800) / 2 = 225 = 22.5% of the median 1000.
    assert comparison(runs)["noise"].startswith("All 3 runs are of one spec, so their spread is the machine's "
                                                "noise alone: tokens/s from 800 to 1,250, ±22% around the median 1,000.")  # fmt: skip


def test_four_clearly_apart_runs_each_are_resolved_and_identical_ones_are_not(engine):
    fast = [(DATA, t) for t in (2000.0, 2100.0, 1900.0, 2050.0)]
    slow = [(SINGLE, t) for t in (1000.0, 1050.0, 980.0, 1020.0)]
    same = [(RunSpec(strategy="layer", pp=2), t) for t in (1000.0, 1050.0, 980.0, 1020.0)]
    got = {(v.faster.split()[0], v.slower.split()[0]): v for v in verdicts(group_runs(runs_of(engine, *fast, *slow,
                                                                                              *same)))}  # fmt: skip
    data_single, data_layer = got["data", "single"], got["data", "layer"]
    single_layer = got.get(("single", "layer")) or got["layer", "single"]
    assert data_single.outcome == "higher" and data_single.faster.startswith("data")
    # 16 ratios, 4 and 4 runs: min..max of them, 1900/1050 .. 2100/980, with 1 - 2/70 = 97% confidence.
    assert data_single.sentence == (
        "data · tp1 pp1 dp2 is faster than single · tp1 pp1 dp1: 2.00x the tokens/s (median of the 16 run-to-run ratios; "
        "97% interval 1.81..2.14, "
        "4 and 4 runs; resolved)."
    )
    assert single_layer.outcome == "unresolved" and "no difference these runs can resolve" in single_layer.sentence
    assert data_layer.outcome == "higher"


def test_groups_that_did_different_work_are_not_ranked(engine):
    """Forward against train, or one model against another, is not a way of doing the same work: tokens/s of the
    two is no verdict, however far apart (the train runs here are 3x faster). Each pair says what differs."""
    train = [(SINGLE, t) for t in (3000.0, 3100.0, 2900.0, 3050.0)]
    forward = [(RunSpec(strategy="single", workload="forward"), t) for t in (1000.0, 1050.0, 980.0, 1020.0)]
    llama = [(RunSpec(strategy="single", model="llama-tiny", workload="forward"), t) for t in (990.0, 1010.0)]
    data = [(RunSpec(strategy="data", dp=2, workload="forward"), t) for t in (2000.0, 2100.0, 1900.0, 2050.0)]
    found = verdicts(group_runs(runs_of(engine, *train, *forward, *llama, *data)))
    ranked = [v for v in found if v.outcome != "unlike"]
    assert [(v.faster.split()[0], v.slower.split()[0], v.outcome) for v in ranked] == [("data", "single", "higher")]
    unlike = [v.sentence for v in found if v.outcome == "unlike"]
    assert len(unlike) == 5 and found[-5:] == [v for v in found if v.outcome == "unlike"]  # listed last
    assert any("they did different work (workload train / forward)" in s for s in unlike)
    assert any("(model tiny / llama-tiny: bias True / False, family gpt2 / llama, n_kv_head None / 2)" in s
               for s in unlike)  # fmt: skip
    assert all(v["ratio"] is None for v in comparison(runs_of(engine, *train[:1], *forward[:1]))["verdicts"])


def test_one_run_each_is_too_few_and_a_run_that_shared_the_machine_is_named(engine):
    runs = runs_of(engine, (SINGLE, 9335.0), (DATA, 18974.0))
    shared = api.submit(engine, SINGLE)
    runner_rows.claim_run(engine, shared, "r", "/tmp/none", [])
    result = {**runs[0]["result"], "others_cpu_share": 0.5, "others_cpu_share_resolution": 0.01,
              "ranks": runs[0]["ranks"]}  # fmt: skip
    runner_rows.finish_run(engine, shared, "succeeded", result=result)
    got = comparison([*runs, api.get_run(engine, shared)])
    (verdict,) = got["verdicts"]
    assert verdict["outcome"] == "too few" and verdict["runs"] == [2, 1]
    assert "too few runs to resolve a difference" in verdict["sentence"] and "4 runs of each reach 95%" in verdict[
        "sentence"]
    assert got["groups"][0] == {"spec": "single · tp1 pp1 dp1", "runs": [runs[0]["id"], shared], "shared_machine": 1}
    assert got["shared"].startswith("Shared the machine (other processes took a tenth or more of the job's cores): "
                                    f"1 of 2 runs of single · tp1 pp1 dp1 (#{shared}).")  # fmt: skip
    first = got["medians"][0]
    assert (first["figure"], first["median"], first["low"], first["high"]) == ("tokens_per_s", 9335.0, 9335.0, 9335.0)


def test_the_compare_page_shows_medians_and_verdicts_and_repeat_queues_a_set(engine):
    from tests.test_ui_pages import page, texts

    ids = [finished(engine, spec, t) for spec, t in ((SINGLE, 1000.0), (DATA, 2000.0), (SINGLE, 1100.0))]
    at = page("pages/compare.py", runs=",".join(map(str, ids)))
    assert not at.exception
    table = at.table[0].value
    assert table.loc["tokens/s", "median"].tolist() == ["1,050", "2,000"]
    assert any("too few runs to resolve a difference" in m for m in texts(at.markdown))
    at.number_input(key="compare_repeat_k").set_value(2).run()
    at.button(key="compare_repeat").click().run()
    queued = api.list_runs(engine, api.RunFilter(status=["queued"])).sort_values("id")
    assert queued["strategy"].tolist() == ["single", "data", "single", "data"]
    assert "Queued comparison set" in at.success[0].value
