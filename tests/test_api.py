"""runner.api, the module pages and the CLI call: validate before storing (a refused spec stores nothing and
names every field), a stored run read back once with its world_size, and logs through the one reader
(runner.service.logs): a rank log's tail from the run folder, the database's stored tails where the folder is not
this machine's, and following either until the run ends."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import text

from runner import api
from runner.service.logs import cap_run_logs, follow_log, follow_stored, log_names, read_log, read_log_tail
from runner.spec.run_spec import RunSpec, SpecError
from storage import hosts as leases
from storage import runner_rows


def fields(exc: pytest.ExceptionInfo[SpecError]) -> dict[str, str]:
    return {p.field: p.message for p in exc.value.problems}


# ---- submit ---------------------------------------------------------------------------------
def test_a_bad_spec_stores_nothing_and_names_every_field(engine):
    with pytest.raises(SpecError) as exc:
        api.submit(engine, {"strategy": "layer", "pp": 3, "seq": 4096, "weights": "/nope/model.safetensors"})
    got = fields(exc)
    assert "needs n_layer divisible by 3" in got["pp"] and "exceeds the model's block_size" in got["seq"], got
    assert "no file at" in got["weights"]
    with pytest.raises(SpecError) as exc:
        api.submit(engine, {"strategy": "single", "colour": 1})
    assert "is not a spec field" in fields(exc)["colour"]
    with pytest.raises(SpecError) as exc:
        api.submit(engine, [1, 2])  # type: ignore[arg-type]  # what a JSON document that is no object gives
    assert fields(exc) == {"spec": "must be a JSON object of field: value pairs"}
    assert api.count_runs(engine) == 0


def test_a_good_spec_is_stored_and_read_back_once_with_its_world_size(engine):
    run_id = api.submit(engine, {"strategy": "data", "dp": 2, "model": "tiny", "tags": ["a"]}, user="ada")
    run = api.get_run(engine, run_id)
    assert (run["status"], run["world_size"], run["user"], run["tags"]) == ("queued", 2, "ada", ["a"])
    assert RunSpec.from_dict(run["spec"]) == RunSpec(strategy="data", dp=2, model="tiny", tags=("a",))
    assert run["ranks"] == [] and api.get_run(engine, run_id + 1) is None
    three_d = api.submit(engine, RunSpec(strategy="3d", tp=2, pp=2, dp=2, microbatches=2))
    assert api.get_run(engine, three_d)["world_size"] == 8


def test_a_comparison_set_is_queued_interleaved_with_one_set_id_or_not_at_all(engine):
    single, data = RunSpec(strategy="single", tags=("a",)), RunSpec(strategy="data", dp=2)
    ids = api.submit_set(engine, [single, data], 3, user="ada")
    runs = [api.get_run(engine, i) for i in ids]
    assert [r["spec"]["strategy"] for r in runs] == ["single", "data"] * 3  # A B A B A B in queue order
    assert ids == sorted(ids) and {r["set_id"] for r in runs} == {ids[0]} and {r["user"] for r in runs} == {"ada"}
    assert api.get_run(engine, api.submit(engine, single))["set_id"] is None  # queued alone: no set
    before = api.count_runs(engine)
    with pytest.raises(SpecError) as exc:
        api.submit_set(engine, [single, {"strategy": "layer", "pp": 3}], 2)
    got = fields(exc)["pp"]
    assert got.startswith("spec 2 (layer): ") and "needs n_layer divisible by 3" in got
    for repeat in (0, 51, True):
        with pytest.raises(SpecError) as exc:
            api.submit_set(engine, [single], repeat)
        assert fields(exc) == {"repeat": f"must be a whole number from 1 to 50 (got {repeat!r})"}
    assert api.count_runs(engine) == before


def test_repeat_queues_each_distinct_spec_of_the_chosen_runs_again_as_one_set(engine):
    first = api.submit(engine, RunSpec(strategy="single", tags=("x",)))
    again = api.submit(engine, RunSpec(strategy="single", tags=("y",), time_limit_s=60))  # the same measurement
    other = api.submit(engine, RunSpec(strategy="data", dp=2))
    ids = api.repeat_runs(engine, [first, again, other], 2)
    runs = [api.get_run(engine, i) for i in ids]
    assert [(r["spec"]["strategy"], r["tags"]) for r in runs] == [("single", ["x"]), ("data", [])] * 2
    with pytest.raises(KeyError):
        api.repeat_runs(engine, [first, 999], 2)


def test_a_missing_weights_file_is_refused_before_anything_is_stored(engine, monkeypatch):
    def store(*args, **kwargs):
        raise AssertionError("storage was asked to store a refused spec")

    monkeypatch.setattr(api, "_store", store)
    with pytest.raises(SpecError) as exc:
        api.submit(engine, {"strategy": "single", "weights": "/nope/model.safetensors"})
    assert "no file at '/nope/model.safetensors'" in fields(exc)["weights"]
    assert api.count_runs(engine) == 0


def test_devices_are_checked_against_the_target_hosts_gpus(engine, monkeypatch):
    monkeypatch.setenv("LAB_HOST", "alpha")
    h100 = {"index": 0, "name": "H100", "memory_total": 80 * 2**30}
    no_gpu = "no NVIDIA GPU: NVML lists no GPU and torch 2.13.0+cpu is a CPU-only build"
    assert leases.acquire_lease(engine, "runner-alpha", os.getpid(), [], no_gpu, host="alpha")
    assert leases.acquire_lease(engine, "runner-beta", os.getpid(), [h100, {**h100, "index": 1}], "2", host="beta")
    try:
        cuda = {"strategy": "data", "dp": 2, "model": "tiny", "device": "cuda"}
        with pytest.raises(SpecError) as exc:
            api.submit(engine, cuda)  # this machine, alpha, has no GPU
        assert fields(exc)["device"] == f"is 'cuda' but {no_gpu}; choose 'cpu' or 'auto'"  # alpha's runner's words
        assert api.get_run(engine, api.submit(engine, cuda, run_on="beta"))["target_host"] == "beta"
        assert api.get_run(engine, api.submit(engine, cuda, run_on=api.ANY_HOST))["target_host"] is None
        assert api.submit(engine, cuda, gpu_count=None)  # None: device checks skipped
        assert api.submit_selftest(engine, device="cuda") == []  # alpha's runner reports no GPU: nothing fits
        assert api.count_runs(engine) == 3
    finally:
        leases.release_lease(engine, "runner-alpha")
        leases.release_lease(engine, "runner-beta")


A100 = {  # what a Slurm runner publishes (runner.service.cluster.Partition.to_dict): 2 nodes x 4 GPUs
    "partition": "a100", "account": "ml", "default_nodes": None, "error": None,
    "nodes": [{"name": f"g{i}", "cpus": 64, "gpus": 4, "state": "idle"} for i in (1, 2)],
}  # fmt: skip


@pytest.fixture
def slurm_lab(engine, monkeypatch):
    """alpha (this machine, no GPU) and a Slurm runner for partition a100 serving host slurm-lab."""
    monkeypatch.setenv("LAB_HOST", "alpha")
    assert leases.acquire_lease(engine, "runner-alpha", os.getpid(), [], "no GPU", host="alpha")
    assert leases.acquire_lease(engine, "runner-slurm", os.getpid(), [], "no GPU", host="slurm-lab", cluster=A100)
    yield engine
    leases.release_lease(engine, "runner-alpha")
    leases.release_lease(engine, "runner-slurm")


def test_a_slurm_target_is_judged_by_its_partition_before_anything_is_stored(slurm_lab):
    engine = slurm_lab
    # 8 ranks = 2 nodes x 4 GPUs, tp=4 inside each node: accepted (alpha itself has no GPU at all)
    good = {"strategy": "3d", "tp": 4, "pp": 2, "microbatches": 2, "model": "small", "device": "cuda", "nodes": 2}
    run_id = api.submit(engine, good, run_on="slurm-lab")
    assert api.get_run(engine, run_id)["spec"]["nodes"] == 2
    assert api.submit(engine, {**good, "nodes": None}, run_on="slurm-lab")  # the runner decides: 8 / 4 = 2 nodes
    with pytest.raises(SpecError) as exc:
        api.submit(engine, {**good, "nodes": 4}, run_on="slurm-lab")
    got = {f: " | ".join(p.message for p in exc.value.problems if p.field == f) for f in fields(exc)}
    assert "must be <= the partition's nodes: a100 has 2, the run asks for 4; choose 2 or fewer" in got["nodes"]
    assert "tensor parallelism must stay within a node: tp=4 does not divide the 2 ranks per node" in got["tp"]
    with pytest.raises(SpecError) as exc:
        api.submit(engine, {**good, "nodes": 1}, run_on="slurm-lab")
    assert "nodes x GPUs per node must equal the world size: 1 x 4 = 4, the spec has 8 ranks" in fields(exc)["nodes"]
    with pytest.raises(SpecError) as exc:  # nodes where there is no partition
        api.submit(engine, {"strategy": "pipeline", "pp": 2, "microbatches": 2, "nodes": 2})
    assert fields(exc) == {"nodes": "nodes only apply to a Slurm partition: leave it empty for this machine"}
    leases.release_lease(engine, "runner-alpha")  # this machine's runner not started yet: still a machine
    with pytest.raises(SpecError) as exc:
        api.submit(engine, {"strategy": "pipeline", "pp": 2, "microbatches": 2, "nodes": 2})
    assert "nodes only apply to a Slurm partition" in fields(exc)["nodes"]
    assert api.submit(engine, {"strategy": "single", "nodes": 1}, run_on="gamma")  # never reported: judged there
    assert api.count_runs(engine) == 3


def test_the_cli_submit_to_a_slurm_host_gets_the_same_messages(slurm_lab, lab_home):
    import subprocess
    import sys

    env = {**os.environ, "LAB_HOME": str(lab_home), "LAB_HOST": "alpha"}
    argv = [sys.executable, "-m", "runner", "submit", "--strategy", "tensor", "--tp", "2", "--nodes", "2",
            "--host", "slurm-lab", "--json"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    problems = {p["field"]: p["message"] for p in __import__("json").loads(proc.stdout)["problems"]}
    assert "nodes x GPUs per node must equal the world size: 2 x 4 = 8, the spec has 2 ranks" in problems["nodes"]
    assert api.count_runs(slurm_lab) == 0


def test_filters_cancel_notes_and_delete_go_through_the_api(engine):
    layer = api.submit(engine, RunSpec(strategy="layer", pp=2, tags=("nightly",)), user="ada")
    single = api.submit(engine, RunSpec(strategy="single"), user="bob")
    assert api.list_runs(engine, api.RunFilter(tag=["nightly"]))["id"].tolist() == [layer]
    assert api.filter_values(engine, "user") == ["ada", "bob"]
    with pytest.raises(ValueError, match="no filter on 'spec'"):
        api.filter_values(engine, "spec")
    assert api.cancel(engine, single) == "cancelled" and api.is_terminal("cancelled")
    api.update_meta(engine, layer, note="baseline", tags=["x", " "])
    assert (api.get_run(engine, layer)["note"], api.get_run(engine, layer)["tags"]) == ("baseline", ["x"])
    assert [r["id"] for r in api.export_runs(engine)] == [single, layer]
    assert "".join(api.export_csv(engine)).count("\n") == 3
    api.delete(engine, single)
    assert api.get_run(engine, single) is None and api.count_runs(engine) == 1


# ---- the one log reader ---------------------------------------------------------------------
def test_the_reader_gives_a_rank_logs_tail_from_a_whole_line(tmp_path):
    lines = [f"step {i}\n" for i in range(1000)]
    (tmp_path / "rank1.log").write_text("".join(lines))
    (tmp_path / "rank10.log").write_text("")
    (tmp_path / "rank2.log").write_text("x\n")
    (tmp_path / "torchrun.log").write_text("t\n")
    assert log_names(tmp_path) == ["torchrun", "rank1", "rank2", "rank10"]
    assert read_log(tmp_path, "rank1") == "".join(lines)
    tail, size = read_log_tail(tmp_path, "rank1", 100)
    assert size == len("".join(lines)) and tail.startswith("step ") and "".join(lines).endswith(tail)
    assert len(tail) <= 100 and tail.splitlines()[-1] == "step 999"
    assert read_log(tmp_path, "rank7") is None and read_log(tmp_path / "nowhere", "rank0") is None


def test_capping_a_run_folder_caps_torchruns_and_every_ranks_log(tmp_path):
    for name in ("torchrun", "rank0", "rank11"):
        (tmp_path / f"{name}.log").write_text(("x" * 99 + "\n") * 1000)  # 100 kB each
    (tmp_path / "notes.log").write_text("y" * 200_000)  # not a run's log: left alone
    cap_run_logs(tmp_path, cap=40_000)
    assert all((tmp_path / f"{n}.log").stat().st_size < 40_000 for n in ("torchrun", "rank0", "rank11"))
    assert (tmp_path / "notes.log").stat().st_size == 200_000


def ran_elsewhere(engine, run_dir) -> int:
    """A run that host beta ran (its folder there), with its log tails stored in the database."""
    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2), gpu_count=None)
    with engine.begin() as conn:
        conn.execute(text("UPDATE runs SET status = 'running', runner_host = 'beta', run_dir = :d WHERE id = :i"),
                     {"d": str(run_dir), "i": run_id})  # fmt: skip
    runner_rows.store_log_tail(engine, run_id, "rank1", "step 2/3\nstep 3/3\n", 100)
    return run_id


def test_a_log_comes_from_this_machines_folder_else_from_the_stored_tails(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_HOST", "alpha")
    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2))
    runner_rows.claim_run(engine, run_id, "r", str(tmp_path), [])  # claimed by this machine, alpha
    (tmp_path / "rank0.log").write_text("rank 0 here\n" * 100)
    log = api.log(engine, api.get_run(engine, run_id), "rank0", tail_bytes=30)
    assert (log.source, log.text, log.size, log.cut) == ("folder", "rank 0 here\nrank 0 here\n", 1200, True)
    assert log.path == str(tmp_path / "rank0.log")
    runner_rows.store_log_tail(engine, run_id, "rank1", "stored by alpha's runner\n", 25)
    assert api.log(engine, api.get_run(engine, run_id), "rank1").text == "stored by alpha's runner\n"

    # beta ran this one: a file at the same path here is another run's, the stored tail is the log
    other = ran_elsewhere(engine, tmp_path)
    (tmp_path / "rank1.log").write_text("another run's log on alpha\n")
    log = api.log(engine, api.get_run(engine, other), "rank1")
    assert (log.source, log.text, log.size, log.path, log.cut) == ("database", "step 2/3\nstep 3/3\n", 100, None, True)
    assert api.log(engine, api.get_run(engine, other), "rank1", tail_bytes=10).text == "step 3/3\n"
    missing = api.log(engine, api.get_run(engine, other), "rank0")
    assert (missing.source, missing.text) == ("none", None)


def test_following_a_folder_log_streams_appended_lines_until_the_run_ends(tmp_path):
    path = tmp_path / "rank0.log"
    path.write_text("first\n")
    ended = threading.Event()

    def writer():
        with path.open("a") as f:
            for line in ("second\n", "third ü\n"):
                time.sleep(0.2)
                f.write(line)
                f.flush()
        f.close()
        with path.open("a") as f:
            f.write("last words\n")
        ended.set()

    threading.Thread(target=writer).start()
    assert "".join(follow_log(tmp_path, "rank0", ended.is_set, poll_s=0.05)) == "first\nsecond\nthird ü\nlast words\n"
    assert "".join(follow_log(tmp_path, "rank0", lambda: True, start=6)) == "second\nthird ü\nlast words\n"


def test_following_a_stored_tail_prints_what_each_refresh_added_and_marks_a_gap():
    looks = iter(
        [
            {"text": "a\nb\n", "size": 4},  # nothing new after the first 4 bytes
            {"text": "a\nb\nc\n", "size": 6},
            {"text": "z\n", "size": 20},  # 14 bytes more, only the last 2 kept
        ]
    )
    ends = iter([False, False, True])
    got = "".join(follow_stored(lambda: next(looks), lambda: next(ends), size=4, poll_s=0))
    assert got == "c\n\n[... 12 bytes not kept in the database ...]\nz\n"


def test_what_the_app_imports_of_h4s_modules_imports_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "import runner.api, runner.service.logs, runner.selftest, runner.__main__\n"
        "import ui.charts, ui.compare, ui.compare_sets, ui.cpu, ui.filters, ui.format, ui.hosts, ui.run_detail\n"
        "import ui.verify, runner.analysis.stats\n"
        "print('torch' in sys.modules)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_slurm_runs_job_script_is_read_from_its_folder_and_a_local_run_has_none(tmp_path):
    (tmp_path / "job.sbatch").write_text("#!/bin/bash\n#SBATCH --nodes=2\n")
    slurm = {"backend": "slurm", "backend_job_id": "17", "run_dir": str(tmp_path)}
    assert api.job_script(slurm) == "#!/bin/bash\n#SBATCH --nodes=2\n"
    assert api.job_script({**slurm, "backend": "local"}) is None
    assert api.job_script({**slurm, "run_dir": str(tmp_path / "elsewhere")}) is None  # folder not on this machine
