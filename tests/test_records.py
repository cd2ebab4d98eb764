"""Records (runner/spec/records.py): events round-trip through their one line format, result.json files written
by the previous version load, the terminal states are the ones storage and the runner treat as final, and
runs stored by the previous version read back as the same records."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest

from runner.spec.records import Error, Finished, RankFigures, Result, RunStatus, Span, Started, Step, parse_event
from runner.spec.run_spec import RunSpec
from storage import runner_rows, runs, series

# Written by the job before records existed (commit 6d3e754, a 2-stage pipeline on CPU; one rank kept).
PREVIOUS_RESULT_JSON = '{"run_id": 7, "world_size": 2, "device": "cpu", "backend": "gloo", "device_names": ["cpu"], "torch_version": "2.13.0+cpu", "hostname": "vm", "step_time_s_p50": 0.02385720250003942, "step_time_s_p90": 0.024108175699620916, "step_time_s_mean": 0.02385720250003942, "step_times_s": [0.02417091899951629, 0.023543486000562552], "tokens_per_s": 21461.024191715438, "flops_per_step": 815923200, "achieved_gflops": 34.20028815191772, "peak_flops": null, "mfu": null, "loss": 6.260825157165527, "bubble_fraction": 0.28527581855441686, "bubble_fraction_theory": 0.3333333333333333, "verify": null, "cpu_oversubscribed": false, "cpu_cores": 2, "cpu_pinned": true, "ranks": [{"rank": 0, "tp": 0, "pp": 0, "dp": 0, "param_count": 140928, "param_bytes": 563712, "optimizer_bytes": 1127528, "peak_mem_bytes": 13271040, "peak_rss_bytes": 336506880, "mem_baseline_bytes": 323235840, "peak_rss_scope": "timed steps", "cpu_wait_s": 0.000597799, "cpu_core": 0, "cpu_oversubscribed": false, "cpu_cores": 2, "compute_s": 0.022668786004942376, "comm_bytes": {"all_reduce": 262144, "all_gather": 0, "reduce_scatter": 0, "broadcast": 0, "send": 262144}, "comm_wire_bytes": {"all_reduce": 262144, "all_gather": 0, "reduce_scatter": 0, "broadcast": 0, "send": 262144}, "comm_calls": {"all_reduce": 2, "all_gather": 0, "reduce_scatter": 0, "broadcast": 0, "send": 4, "recv": 4}, "comm_s": 0.008631584998511244, "idle_s": 0.01641403399662522, "loss": null, "device_name": "cpu", "max_inflight_microbatches": 2, "peak_activation_bytes": 4236288, "activation_bytes_per_microbatch": 2118144, "bubble_fraction_theory": 0.3333333333333333, "bubble_fraction": 0.3440058405129038}]}'
PREVIOUS_EVENT_LINES = [
    '{"kind": "started", "rank": 1, "t": 1795541184.703322, "world_size": 2, "device": "cpu", "backend": "gloo", "pid": 14263}',
    '{"kind": "step", "rank": 0, "t": 1795541185.816888, "step": 0, "total_steps": 3, "warmup": true, "step_time_s": 0.024378918000365957, "loss": null}',
    '{"kind": "span", "rank": 0, "t": 1795541185.841489, "step": 1, "stage": 0, "microbatch": 0, "phase": "forward", "start": 0.00016468499961774796, "end": 0.0022086440003477037}',
    '{"kind": "error", "rank": 1, "t": 5.0, "error": "ValueError: shapes do not match", "traceback": "Traceback ..."}',
    '{"kind": "finished", "rank": 0, "t": 1795541186.0}',
]  # fmt: skip

EVENTS = [
    Started(rank=1, t=1.5, world_size=4, device="cpu", backend="gloo", pid=4242),
    Step(rank=0, t=2.0, step=3, total_steps=5, warmup=False, step_time_s=0.25, loss=3.5),
    Step(rank=0, t=2.0, step=0, total_steps=5, warmup=True, step_time_s=0.25, loss=None),
    Step(rank=0, t=2.0, step=9, total_steps=10, warmup=False, step_time_s=0.25, loss=2.5, eval_loss=2.75),
    Span(rank=2, t=3.0, step=4, stage=1, microbatch=3, phase="backward", start=0.01, end=0.02),
    Error(rank=3, t=4.0, error="RuntimeError: boom", traceback="Traceback (most recent call last):\n..."),
    Finished(rank=0, t=5.0),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{e.kind}")
def test_every_event_kind_round_trips_through_its_line(event):
    line = event.to_json_line()
    assert line.endswith("\n") and line.count("\n") == 1  # one line: one write on the shared O_APPEND file
    assert json.loads(line)["kind"] == event.kind
    assert parse_event(line) == event
    assert parse_event(line.encode()) == event  # the runner reads bytes


def test_a_diverged_loss_survives_the_round_trip():
    back = parse_event(Step(rank=0, t=1.0, step=2, total_steps=3, step_time_s=0.1, loss=float("nan")).to_json_line())
    assert isinstance(back, Step) and math.isnan(back.loss)


def test_lines_the_previous_job_wrote_parse_to_the_same_facts():
    started, step, span, error, finished = (parse_event(line) for line in PREVIOUS_EVENT_LINES)
    assert started == Started(rank=1, t=1795541184.703322, world_size=2, device="cpu", backend="gloo", pid=14263)
    assert step == Step(rank=0, t=1795541185.816888, step=0, total_steps=3, warmup=True,
                        step_time_s=0.024378918000365957, loss=None)  # fmt: skip
    assert (span.rank, span.step, span.stage, span.microbatch, span.phase) == (0, 1, 0, 0, "forward")
    assert span.end == pytest.approx(0.0022086440003477037)
    assert (error.rank, error.error, error.traceback) == (1, "ValueError: shapes do not match", "Traceback ...")
    assert finished == Finished(rank=0, t=1795541186.0)


@pytest.mark.parametrize(
    "line",
    [
        "", "not json", "[1, 2]", '{"kind": "telepathy", "rank": 0, "t": 1}', '{"rank": 0, "t": 1}',
        '{"kind": "step", "rank": 0, "t": 1, "step": 99}',  # no step time
        '{"kind": "step", "rank": 0, "t": 1, "step": 1, "step_time_s": NaN}',  # a column that cannot be empty
        '{"kind": "span", "rank": 0, "t": 1, "step": 1, "stage": 0, "microbatch": 0, "phase": "f", "start": 0}',
        '{"kind": "started", "t": 1}',
    ],
)  # fmt: skip
def test_a_line_in_none_of_our_shapes_is_none_not_an_exception(line):
    assert parse_event(line) is None


def without_new_empty_figures(new: dict, old: dict) -> dict:
    """`new` without the keys `old` lacks whose value is None (figures this version declares that an older
    job did not write); recursive into the ranks list."""
    out = {k: v for k, v in new.items() if k in old or v is not None}
    if isinstance(out.get("ranks"), list) and isinstance(old.get("ranks"), list):
        out["ranks"] = [without_new_empty_figures(r, o) for r, o in zip(out["ranks"], old["ranks"], strict=True)]
    return out


def test_a_result_json_from_the_previous_version_loads_and_writes_back_unchanged():
    old = json.loads(PREVIOUS_RESULT_JSON)
    result = Result.from_dict(old)
    assert result.run_id == 7 and result.world_size == 2 and result.device_names == ["cpu"]
    assert result.tokens_per_s == pytest.approx(21461.024191715438) and result.loss == pytest.approx(6.260825157165527)
    assert result.other == {}  # every key it wrote is a declared one
    rank = result.ranks[0]
    assert isinstance(rank, RankFigures) and (rank.rank, rank.pp, rank.peak_mem_bytes) == (0, 0, 13271040)
    assert rank.comm_calls["send"] == 4 and rank.bubble_fraction == pytest.approx(0.3440058405129038)
    assert rank.strategy == {"max_inflight_microbatches": 2, "peak_activation_bytes": 4236288,
                             "activation_bytes_per_microbatch": 2118144, "bubble_fraction_theory": 1 / 3}  # fmt: skip
    # Nothing lost, nothing changed; the only keys added are figures declared since (host), left empty.
    assert without_new_empty_figures(result.to_dict(), old) == old
    assert without_new_empty_figures(json.loads(result.to_json()), old) == old
    assert set(result.to_dict()["ranks"][0]) - set(old["ranks"][0]) == {
        "host", "peak_tensor_bytes", "timed_cpu_s", "host_busy_cpu_s", "host_cpu_cores", "load_window_s", "load_avg_1m",
        "cublas_workspace_bytes",
    }  # fmt: skip


def test_an_older_or_newer_result_json_keeps_what_it_has_and_reads_missing_keys_as_none():
    old = json.loads(PREVIOUS_RESULT_JSON)
    for key in ("cpu_pinned", "mfu", "bubble_fraction_theory"):
        del old[key]
    del old["ranks"][0]["comm_wire_bytes"]
    old["from_the_future"] = {"x": 1}
    result = Result.from_dict(old)
    assert result.cpu_pinned is None and result.mfu is None and result.ranks[0].comm_wire_bytes is None
    assert result.other == {"from_the_future": {"x": 1}}
    assert result.to_dict()["from_the_future"] == {"x": 1}
    assert Result.from_dict({}).ranks == [] and Result.from_dict({}).loss is None
    with pytest.raises(ValueError):
        Result.from_dict([1, 2])  # type: ignore[arg-type]


def test_is_terminal_is_exactly_what_storage_and_the_runner_treat_as_final(engine):
    from storage.models import RUN_STATES, TERMINAL_STATES

    assert {s.value for s in RunStatus if s.is_terminal} == set(TERMINAL_STATES) == {"succeeded", "failed",
                                                                                       "cancelled", "lost"}  # fmt: skip
    assert set(RUN_STATES) == {s.value for s in RunStatus}
    spec = RunSpec(strategy="single", model="tiny")
    for status in RunStatus:
        run_id = runs.insert_run(engine, spec)
        runner_rows.claim_run(engine, run_id, "r", "/tmp/x", [])
        if not status.is_terminal:
            with pytest.raises(ValueError):
                runner_rows.finish_run(engine, run_id, status)  # only a terminal state ends a run
            runner_rows.finish_run(engine, run_id, RunStatus.CANCELLED)
            continue
        assert runner_rows.finish_run(engine, run_id, status)
        # Final: nothing moves it again, and the runner neither places nor watches it.
        for again in RunStatus:
            if again.is_terminal:
                assert not runner_rows.finish_run(engine, run_id, again)
        assert runs.request_cancel(engine, run_id) == status
        assert runs.get_run(engine, run_id)["status"] == status
        assert run_id not in [r["id"] for r in runner_rows.queued_runs(engine) + runner_rows.running_runs(engine)]


def test_a_run_stored_by_the_previous_version_at_revision_0004_upgrades_and_reads_as_records(lab_home):
    """Rows written by the previous finish_run (figures split into columns plus `extra` at revision 0004)
    read back, after the upgrade to head, as the figures the job wrote."""
    from sqlalchemy import MetaData, Table, create_engine, insert

    from storage.migrate import upgrade

    old_result = json.loads(PREVIOUS_RESULT_JSON)
    old_rank = old_result["ranks"][0]
    lab_home.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{lab_home / 'previous.db'}"
    old = create_engine(url)
    upgrade(old, "0004")
    meta = MetaData()
    runs_table = Table("runs", meta, autoload_with=old)
    rank_results = Table("rank_results", meta, autoload_with=old)
    core = ("rank", "tp", "pp", "dp", "param_count", "param_bytes", "optimizer_bytes", "peak_mem_bytes", "compute_s",
            "comm_s", "idle_s", "comm_bytes", "comm_calls")  # fmt: skip
    now = datetime.now(UTC)
    with old.begin() as conn:
        run_id = conn.execute(insert(runs_table).values(
            status="succeeded", strategy="pipeline", model="tiny", workload="train", world_size=2, tp=1, pp=2, dp=1,
            device="cpu", spec={"strategy": "pipeline", "pp": 2, "model": "tiny"}, tags=[], note="", user="ada",
            host="h", created_at=now, finished_at=now, cancel_requested=False, progress_step=3, total_steps=3,
            gpus=[], events_offset=0, device_names=["cpu"], tokens_per_s=old_result["tokens_per_s"],
            result={k: v for k, v in old_result.items() if k != "ranks"},
        )).inserted_primary_key[0]  # fmt: skip
        conn.execute(insert(rank_results).values(
            run_id=run_id, **{k: old_rank[k] for k in core},
            extra={k: v for k, v in old_rank.items() if k not in core},
        ))  # fmt: skip
    upgrade(old, "head")
    run = runs.get_run(old, run_id)
    assert run["status"] == "succeeded" and run["world_size"] == 2 and run["pp"] == 2
    assert [without_new_empty_figures(r, old_rank) for r in run["ranks"]] == [old_rank]  # the same figures
    assert (
        without_new_empty_figures(Result.from_dict({**run["result"], "ranks": run["ranks"]}).to_dict(), old_result)
        == old_result
    )
    frame = series.rank_results(old, [run_id])
    assert frame.loc[0, "comm_bytes_send"] == 262144 and frame.loc[0, "max_inflight_microbatches"] == 2


def test_a_started_event_names_its_node_and_the_failing_ranks_node_is_found_on_a_multi_node_run(tmp_path):
    from runner.service.failures import rank_nodes, with_node

    lines = [Started(r, 1.0, world_size=2, device="cpu", backend="gloo", pid=10 + r, host=h).to_json_line()
             for r, h in ((0, "n1"), (1, "n2"))]  # fmt: skip
    assert parse_event(lines[1]) == Started(1, 1.0, world_size=2, device="cpu", backend="gloo", pid=11, host="n2")
    (tmp_path / "events.jsonl").write_text("".join(lines))
    assert rank_nodes(tmp_path) == {0: "n1", 1: "n2"}
    assert with_node("rank 1 raised X", tmp_path, 1) == "rank 1 raised X (rank 1 ran on node n2)"
    # One node (a local run), an unknown rank, or events from before ranks named their node: nothing added.
    (tmp_path / "events.jsonl").write_text(lines[0])
    assert with_node("rank 0 raised X", tmp_path, 0) == "rank 0 raised X"
    assert with_node("torchrun failed", tmp_path, None) == "torchrun failed"
    (tmp_path / "events.jsonl").write_text('{"kind": "started", "rank": 0, "t": 1, "pid": 5}\n')
    assert rank_nodes(tmp_path) == {}
