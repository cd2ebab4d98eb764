"""Storage: migrations build the schema, claims have one winner, filters and paging and downsampling run in SQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from sqlalchemy import inspect, text

from runner import api
from runner.spec.records import Step
from runner.spec.run_spec import RunSpec, SpecError
from storage import db, hosts, runner_rows, runs, series
from storage.db import database_url

TINY_LAYER = RunSpec(strategy="layer", pp=2, model="tiny", workload="train")


@pytest.fixture
def engine(db_engine):
    """Every test in this module runs on SQLite and on PostgreSQL."""
    return db_engine


def test_migrations_create_every_table(engine):
    tables = set(inspect(engine).get_table_names())
    assert {"runs", "rank_results", "step_metrics", "telemetry_samples", "timeline_spans", "runner_lease",
            "run_logs", "calibrations", "alembic_version"} <= tables  # fmt: skip
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0009"


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(lab_home):
    from storage.db import get_engine

    engine = get_engine()
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        # A writer waits at most a third of the lease's stale limit, so a runner blocked on a lock never looks dead.
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 10000 < db.RUNNER_STALE_S * 1000


def test_fifty_runs_from_four_threads_are_each_claimed_exactly_once(engine):
    """Submitters and claimers race: every run is claimed once, none twice, none lost."""
    submitted, claims = [], []
    lock = threading.Lock()
    done = threading.Event()

    def submit(n):
        for _ in range(n):
            run_id = api.submit(engine, RunSpec(strategy="single", model="tiny"))
            with lock:
                submitted.append(run_id)

    def claim(name):
        while True:
            finished = done.is_set()
            for row in runner_rows.queued_runs(engine):
                if runner_rows.claim_run(engine, row["id"], name, "/tmp/x", []):
                    with lock:
                        claims.append(row["id"])
            if finished:
                return

    claimers = [threading.Thread(target=claim, args=(f"runner-{i}",)) for i in range(4)]
    submitters = [threading.Thread(target=submit, args=(n,)) for n in (13, 13, 12, 12)]
    for t in claimers + submitters:
        t.start()
    for t in submitters:
        t.join()
    done.set()
    for t in claimers:
        t.join()
    assert len(submitted) == len(set(submitted)) == 50
    assert sorted(claims) == sorted(submitted)  # each exactly once
    assert runs.count_runs(engine, runs.RunFilter(status=["running"])) == 50


def test_default_database_lives_under_lab_home(lab_home):
    assert database_url() == f"sqlite:///{lab_home / 'lab.db'}"


def test_submit_refuses_invalid_specs_and_queues_nothing(engine):
    with pytest.raises(SpecError) as err:
        api.submit(engine, RunSpec(strategy="layer", pp=3))
    assert err.value.problems[0].field == "pp"
    assert runs.count_runs(engine) == 0


def test_submitted_run_reads_back_as_the_documented_json(engine):
    run_id = api.submit(engine, TINY_LAYER, user="ada")
    run = runs.get_run(engine, run_id)
    assert run["status"] == "queued" and run["user"] == "ada" and run["spec"] == TINY_LAYER.to_dict()
    assert run["progress"] == {"step": 0, "total": TINY_LAYER.warmup + TINY_LAYER.steps}
    assert datetime.fromisoformat(run["created_at"]).tzinfo is not None
    assert {"id", "status", "error", "spec", "result", "ranks"} <= set(run)
    # The degrees stored at submit come back with the run: readers never re-parse the spec for them.
    assert (run["world_size"], run["tp"], run["pp"], run["dp"]) == (2, 1, 2, 1)


def test_insert_run_stores_what_it_is_given_without_validating(engine):
    """Storage only stores: validation is the API's job (runner/api.py), so an invalid spec is not refused here."""
    from storage.runs import insert_run

    run_id = insert_run(engine, RunSpec(strategy="layer", pp=3), user="ada", run_on="*")
    run = runs.get_run(engine, run_id)
    assert run["status"] == "queued" and run["pp"] == 3 and run["target_host"] is None


def test_a_queued_run_is_claimed_by_exactly_one_of_many_racers(engine):
    run_id = api.submit(engine, TINY_LAYER)
    wins = []
    barrier = threading.Barrier(8)

    def race(i):
        barrier.wait()
        if runner_rows.claim_run(engine, run_id, f"runner-{i}", "/tmp/x", []):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert runs.get_run(engine, run_id)["status"] == "running"


def test_cancel_of_a_queued_run_is_immediate_and_of_a_running_run_is_a_request(engine):
    a = api.submit(engine, TINY_LAYER)
    b = api.submit(engine, TINY_LAYER)
    assert runs.request_cancel(engine, a) == "cancelled"
    assert runs.get_run(engine, a)["status"] == "cancelled"
    runner_rows.claim_run(engine, b, "r", "/tmp/x", [])
    assert runs.request_cancel(engine, b) == "cancelling"
    assert runner_rows.cancel_requested(engine, b)
    with pytest.raises(KeyError):
        runs.request_cancel(engine, 999)


def test_filters_and_paging_happen_in_sql(engine):
    for i in range(30):
        spec = RunSpec(strategy="data" if i % 3 == 0 else "layer", dp=2 if i % 3 == 0 else 1,
                       pp=1 if i % 3 == 0 else 2, tags=("nightly",) if i % 2 else ())  # fmt: skip
        api.submit(engine, spec, user="bob" if i < 10 else "eve")
    everything = runs.list_runs(engine, limit=100)
    assert list(everything["id"]) == sorted(everything["id"], reverse=True)  # newest first
    data = runs.RunFilter(strategy=["data"])
    assert runs.count_runs(engine, data) == 10
    page2 = runs.list_runs(engine, data, limit=4, offset=4)
    assert len(page2) == 4 and set(page2["strategy"]) == {"data"}
    assert runs.count_runs(engine, runs.RunFilter(user=["bob"], tag=["nightly"])) == 5
    future = datetime.now(UTC) + timedelta(days=1)
    assert runs.count_runs(engine, runs.RunFilter(since=future)) == 0
    assert runs.distinct_values(engine, "user") == ["bob", "eve"]


def test_telemetry_is_downsampled_per_bucket_in_sql(engine):
    run_id = api.submit(engine, TINY_LAYER)
    rows = [{"source": f"rank{r}", "t_s": i * 0.1, "util_pct": float(i % 10), "mem_bytes": 1000 + i}
            for r in range(2) for i in range(100)]  # fmt: skip
    runner_rows.add_telemetry(engine, run_id, rows)
    frame = series.telemetry_series(engine, [run_id], bucket_s=1.0)
    assert len(frame) == 2 * 10  # 10 one-second buckets per rank
    first = frame[(frame["source"] == "rank0") & (frame["t_s"] == 0)].iloc[0]
    assert first["util_pct"] == pytest.approx(4.5) and first["mem_bytes"] == 1009


def test_finish_stores_summary_and_ranks_and_delete_removes_everything(engine):
    run_id = api.submit(engine, TINY_LAYER)
    runner_rows.claim_run(engine, run_id, "r", "/tmp/x", [])
    result = {"tokens_per_s": 100.0, "step_time_s_p50": 0.5, "torch_version": "2.13.0", "device_names": ["cpu"],
              "ranks": [{"rank": r, "tp": 0, "pp": r, "dp": 0, "param_count": 10, "param_bytes": 40,
                         "optimizer_bytes": 80, "peak_mem_bytes": 1000 * (r + 1), "compute_s": 1.0, "comm_s": 0.5,
                         "idle_s": 0.1, "comm_bytes": {"send": 64}, "comm_calls": {"send": 1},
                         "bubble_fraction": 0.2} for r in range(2)]}  # fmt: skip
    runner_rows.finish_run(engine, run_id, "succeeded", result=result)
    run = runs.get_run(engine, run_id)
    assert run["status"] == "succeeded" and run["result"]["tokens_per_s"] == 100.0
    assert [r["peak_mem_bytes"] for r in run["ranks"]] == [1000, 2000]
    assert run["ranks"][0]["bubble_fraction"] == 0.2  # strategy figures survive in 'extra'
    listed = runs.list_runs(engine)
    assert listed.loc[0, "peak_mem_bytes_max"] == 2000
    ranks = series.rank_results(engine, [run_id])
    assert list(ranks["comm_bytes_send"]) == [64, 64]
    runs.update_run_meta(engine, run_id, note="fast one", tags=["a", " b "])
    assert runs.get_run(engine, run_id)["tags"] == ["a", "b"]
    runs.delete_run(engine, run_id)
    assert runs.get_run(engine, run_id) is None
    assert series.rank_results(engine, [run_id]).empty


def test_csv_export_streams_header_then_rows(engine):
    for _ in range(3):
        api.submit(engine, TINY_LAYER)
    chunks = list(runs.iter_runs_csv(engine))
    assert chunks[0].startswith("id,status,strategy")
    assert len(chunks) == 4


def test_csv_export_tells_runs_of_one_layout_apart(engine):
    """Two runs of one layout at another batch, one failing its verify, read alike in the export without the work,
    the verdict and the reason a run failed."""
    import csv


    ok = api.submit(engine, RunSpec(strategy="data", dp=2, batch=16, dtype="bf16-mixed"))
    runner_rows.claim_run(engine, ok, "r", "/tmp/none", [])
    runner_rows.finish_run(engine, ok, "succeeded", result={"verify": {"passed": True}, "ranks": []})
    bad = api.submit(engine, RunSpec(strategy="data", dp=2))
    runner_rows.claim_run(engine, bad, "r", "/tmp/none", [])
    runner_rows.finish_run(engine, bad, "failed", error="verify failed: grads rel 3e-2 > 1e-5",
                           result={"verify": {"passed": False}, "ranks": []})  # fmt: skip
    queued = api.submit(engine, RunSpec(strategy="data", dp=2, microbatches=2))
    rows = {int(r["id"]): r for r in csv.DictReader("".join(runs.iter_runs_csv(engine)).splitlines())}
    assert [rows[i]["batch"] for i in (ok, bad, queued)] == ["16", "8", "8"]
    assert [rows[i]["dtype"] for i in (ok, bad)] == ["bf16-mixed", "float32"] and rows[queued]["microbatches"] == "2"
    assert [rows[i]["verify"] for i in (ok, bad, queued)] == ["pass", "fail", ""]
    assert rows[bad]["error"] == "verify failed: grads rel 3e-2 > 1e-5" and rows[ok]["error"] == ""


def test_one_runner_lease_and_it_goes_stale(engine):
    assert hosts.acquire_lease(engine, "a", 1, [], "no GPU")
    assert not hosts.acquire_lease(engine, "b", 2, [], "no GPU")
    assert hosts.heartbeat(engine, "a") and not hosts.heartbeat(engine, "b")
    status = hosts.runner_status(engine)
    assert status["alive"] and status["runner_id"] == "a"
    stale = datetime.now(UTC) - timedelta(seconds=db.RUNNER_STALE_S + 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE runner_lease SET heartbeat_at = :t"), {"t": stale})
    assert not hosts.runner_status(engine)["alive"]
    assert hosts.acquire_lease(engine, "b", 2, [], "no GPU")  # a crashed runner does not hold it forever
    assert not hosts.heartbeat(engine, "a")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_six_processes_starting_on_a_fresh_database_all_get_the_schema(kind, tmp_path, request):
    """An app, a runner and CLI calls may all start at once on an empty database: migrations take a lock."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LAB_HOME": str(tmp_path / "fresh")}
    env.pop("LAB_DB_URL", None)
    if kind == "postgres":
        env["LAB_DB_URL"] = request.getfixturevalue("pg_server").new_database()
    code = "from storage.db import get_engine; from storage import runs; print(runs.count_runs(get_engine()))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]  # fmt: skip
    outcomes = [(p.wait(timeout=120), p.stdout.read().strip(), p.stderr.read()[-500:]) for p in procs]
    assert all(rc == 0 and out == "0" for rc, out, _ in outcomes), outcomes


def test_tag_filter_matches_whole_tags_only_even_with_like_wildcards(engine):
    ids = {tag: api.submit(engine, RunSpec(tags=(tag,))) for tag in ("a_b", "axb", "a%", "a_b2")}
    for tag in ids:
        found = runs.list_runs(engine, runs.RunFilter(tag=[tag]))
        assert list(found["id"]) == [ids[tag]], tag


def test_delete_removes_the_run_folder_under_lab_home_but_nothing_outside_it(engine, tmp_path):
    from storage.db import runs_dir

    inside, outside = (api.submit(engine, TINY_LAYER) for _ in range(2))
    folder = runs_dir() / str(inside)
    elsewhere = tmp_path / "elsewhere" / str(outside)
    for run_id, path in ((inside, folder), (outside, elsewhere)):
        path.mkdir(parents=True)
        (path / "events.jsonl").write_text("{}\n")
        runner_rows.claim_run(engine, run_id, "r", str(path), [])
        runner_rows.finish_run(engine, run_id, "failed", error="x")
    runs.delete_run(engine, inside)
    runs.delete_run(engine, outside)
    assert not folder.exists()
    assert (elsewhere / "events.jsonl").exists()  # e.g. a teammate's host path: never ours to remove


def test_a_deleted_runs_id_is_never_given_to_a_new_run(engine):
    first = api.submit(engine, TINY_LAYER)
    newest = api.submit(engine, TINY_LAYER)
    runs.delete_run(engine, newest)
    again = api.submit(engine, TINY_LAYER)
    assert again not in (first, newest) and again > newest


def test_upgrading_a_version_0001_database_keeps_its_runs(lab_home):
    """A team's history survives the upgrade: build the 0001 schema, add runs, then upgrade to head."""
    from sqlalchemy import MetaData, Table, create_engine, insert

    from storage.migrate import upgrade

    lab_home.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{lab_home / 'old.db'}"
    old = create_engine(url)
    upgrade(old, "0001")
    runs_table = Table("runs", MetaData(), autoload_with=old)  # the table as 0001 made it, not as the models are now

    def submit_then(user: str) -> int:
        row = dict(status="queued", strategy="layer", model="tiny", workload="train", world_size=2, tp=1, pp=2, dp=1,
                   device="auto", spec=TINY_LAYER.to_dict(), tags=[], note="", user=user, host="h",
                   created_at=datetime.now(UTC), cancel_requested=False, progress_step=0, total_steps=6, gpus=[],
                   events_offset=0, device_names=[])  # fmt: skip
        with old.begin() as conn:
            return conn.execute(insert(runs_table).values(**row)).inserted_primary_key[0]

    first = submit_then("ada")
    second = submit_then("bob")
    runs.update_run_meta(old, first, note="keep me")
    with old.begin() as conn:  # a run a runner had started: its torchrun pid becomes its local job id
        conn.execute(runs_table.update().where(runs_table.c.id == second).values(pid=4242))
    upgrade(old, "head")
    run = runs.get_run(old, first)
    assert run["user"] == "ada" and run["note"] == "keep me" and runs.get_run(old, second)
    assert run["backend"] == "local" and run["backend_job_id"] is None  # launched locally, as every run before 0005
    assert (runs.get_run(old, second)["backend"], runs.get_run(old, second)["backend_job_id"]) == ("local", "4242")
    runs.delete_run(old, second)
    assert api.submit(old, TINY_LAYER) > second


def test_postgres_lock_waits_end_before_a_runner_lease_goes_stale(pg_server, lab_home, monkeypatch):
    from storage.db import get_engine

    monkeypatch.setenv("LAB_DB_URL", pg_server.new_database())
    with get_engine().connect() as conn:
        assert conn.execute(text("SHOW lock_timeout")).scalar() == "10s"


def test_non_finite_numbers_are_stored_as_null_with_a_note_and_an_ended_run_keeps_its_ending(engine):
    """A diverged run's NaN loss: PostgreSQL's JSON refuses NaN, SQLite's would store a token no reader accepts."""
    nan, inf = float("nan"), float("inf")
    run_id = api.submit(engine, TINY_LAYER)
    runner_rows.claim_run(engine, run_id, "r", "/tmp/x", [])
    runner_rows.add_step_metrics(engine, run_id, [Step(rank=0, t=1.0, step=0, warmup=False, step_time_s=0.1, loss=nan)])
    result = {"loss": nan, "tokens_per_s": 10.0, "step_time_s_p50": 0.1, "verify": {"loss_abs_diff": inf},
              "ranks": [{"rank": 0, "loss": nan, "compute_s": nan, "peak_mem_bytes": 1}]}  # fmt: skip
    assert runner_rows.finish_run(engine, run_id, "failed", result=result, error="loss became NaN at step 1")
    run = runs.get_run(engine, run_id)
    assert run["status"] == "failed" and run["error"] == "loss became NaN at step 1"
    assert run["result"]["loss"] is None and run["result"]["verify"] == {"loss_abs_diff": None}
    assert run["result"]["non_finite"] == ["loss = nan", "verify.loss_abs_diff = inf", "ranks[0].loss = nan",
                                           "ranks[0].compute_s = nan"]  # fmt: skip
    assert run["ranks"][0]["loss"] is None and run["result"]["tokens_per_s"] == 10.0
    assert series.step_metrics(engine, run_id)["loss"].isna().all()
    assert not runner_rows.finish_run(engine, run_id, "succeeded")  # a second finaliser changes nothing
    assert runs.get_run(engine, run_id)["status"] == "failed"


def test_a_claim_needs_the_lease_when_asked_and_a_dead_holder_is_taken_over_at_once(engine):
    run_id = api.submit(engine, TINY_LAYER)
    assert hosts.acquire_lease(engine, "a", 1, [], "no GPU")
    assert not runner_rows.claim_run(engine, run_id, "b", "/tmp/x", [], require_lease=True)
    assert runs.get_run(engine, run_id)["status"] == "queued"
    assert not hosts.acquire_lease(engine, "b", 2, [], "no GPU")
    assert hosts.acquire_lease(engine, "b", 2, [], "no GPU", takeover_from="a")  # 'a' is known to be dead
    assert not runner_rows.claim_run(engine, run_id, "a", "/tmp/x", [], require_lease=True)
    assert runner_rows.claim_run(engine, run_id, "b", "/tmp/x", [], require_lease=True)


def test_each_host_holds_its_own_lease_and_sees_only_the_runs_it_may_run(engine):
    assert hosts.acquire_lease(engine, "ra", 1, [{"index": 0, "name": "H100"}], "1 GPU", host="alpha")
    assert hosts.acquire_lease(engine, "rb", 2, [], "no GPU", host="beta")  # another host: its own lease
    assert not hosts.acquire_lease(engine, "rb2", 3, [], "no GPU", host="beta")
    assert [(h["host"], h["alive"], len(h["gpus"])) for h in hosts.hosts(engine)] == [("alpha", True, 1),
                                                                                        ("beta", True, 0)]  # fmt: skip
    assert hosts.runner_status(engine, "alpha")["runner_id"] == "ra"
    here = api.submit(engine, TINY_LAYER)  # default: the submitting host (LAB_HOST or its name)
    anywhere = api.submit(engine, TINY_LAYER, run_on=hosts.ANY_HOST)
    on_beta = api.submit(engine, TINY_LAYER, run_on="beta")
    assert runs.get_run(engine, here)["target_host"] == hosts.this_host()
    assert [r["id"] for r in runner_rows.queued_runs(engine, host="beta")] == [anywhere, on_beta]
    assert [r["id"] for r in runner_rows.queued_runs(engine, host="alpha")] == [anywhere]
    hosts.release_lease(engine, "ra")
    assert [h["host"] for h in hosts.hosts(engine)] == ["beta"]
    on_alpha = api.submit(engine, TINY_LAYER, run_on="alpha")
    hosts.explain_runs_for_absent_hosts(engine)
    assert runs.get_run(engine, on_alpha)["wait_reason"] == "waiting for a runner on host alpha (none is running there)"
    assert runs.get_run(engine, on_beta)["wait_reason"] is None


def test_a_silent_hosts_running_runs_are_lost_with_the_host_named_and_log_tails_are_kept(engine, monkeypatch):
    monkeypatch.setenv("LAB_HOST", "gamma")
    assert hosts.acquire_lease(engine, "rg", 1, [], "no GPU")
    run_id = api.submit(engine, TINY_LAYER)
    assert runner_rows.claim_run(engine, run_id, "rg", "/x", [], require_lease=True)
    runner_rows.store_log_tail(engine, run_id, "rank0", "step 1/3\n", 9)
    runner_rows.store_log_tail(engine, run_id, "rank0", "step 1/3\nstep 2/3\n", 18)  # replaced, not added
    assert series.run_logs(engine, run_id)["rank0"]["text"].endswith("step 2/3\n")
    assert hosts.lose_runs_of_silent_hosts(engine, 60) == []
    with engine.begin() as conn:
        conn.execute(text("UPDATE runner_lease SET heartbeat_at = :t"), {"t": datetime.now(UTC) - timedelta(hours=1)})
    assert hosts.lose_runs_of_silent_hosts(engine, 60) == [run_id]
    run = runs.get_run(engine, run_id)
    assert run["status"] == "lost" and "its host gamma stopped reporting" in run["error"]
    runs.delete_run(engine, run_id)
    assert series.run_logs(engine, run_id) == {}


def test_the_list_carries_each_runs_verify_record(db_engine):
    """The History list's verdict column: the verify part of the stored result, read in SQL on both databases."""
    from tests.test_ui_pages import VERIFY, finished_run

    checked = finished_run(db_engine, RunSpec(strategy="single", verify=True), {"verify": VERIFY}, [{}])
    unchecked = finished_run(db_engine, RunSpec(strategy="single"), {"verify": None}, [{}])
    queued = api.submit(db_engine, RunSpec(strategy="single"))
    listed = runs.list_runs(db_engine).set_index("id")["verify"]
    assert listed[checked] == VERIFY and listed[unchecked] is None and listed[queued] is None


def test_the_run_lists_carry_each_specs_weights_so_a_folders_runs_are_named_by_it(db_engine):
    """The JSON path reads the same on SQLite and PostgreSQL: a Hugging Face folder's run lists as "checkpoint
    <folder>", a preset's run (weights None) by its preset alone."""
    from runner.spec.run_spec import model_label
    from storage.runs import insert_run

    folder = insert_run(db_engine, RunSpec(strategy="single", model="checkpoint", weights="/models/hf-llama/"))
    preset = insert_run(db_engine, RunSpec(strategy="single"))
    listed = runs.list_runs(db_engine).set_index("id")
    active = runs.active_runs(db_engine).set_index("id")
    for table in (listed, active):
        assert table.loc[folder, "weights"] == "/models/hf-llama/" and pd.isna(table.loc[preset, "weights"])
    assert model_label("checkpoint", listed.loc[folder, "weights"]) == "checkpoint hf-llama"
    assert model_label("tiny", listed.loc[preset, "weights"]) == "tiny"
    assert model_label("checkpoint", float("nan")) == "checkpoint"  # a table's missing path names no folder
