"""The Slurm backend against a real two-node cluster (tests/slurm_cluster.py: slurmctld, two slurmd, munged):
a 2-node x 1-rank pipeline run through the launcher and through the runner, verified against the reference;
a cancel that leaves nothing on either node; a restarted runner that re-attaches to the Slurm job it finds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runner import api
from runner.service.launch import REPO_ROOT
from runner.service.launchers.local import CANCEL_GRACE_S
from runner.service.launchers.slurm import EXIT_CODE_NAME, SCRIPT_NAME, SlurmLauncher, scontrol_job
from runner.service.loop import Runner
from runner.service.node_telemetry import NodeFilesSampler
from runner.spec.run_spec import RunSpec
from storage import runs
from storage.db import runs_dir
from tests.jobs import wait_status

pytestmark = pytest.mark.slow
# The session's `slurm_cluster` fixture (skips only when the Slurm or munge binaries are missing).
pytest_plugins = ["tests.slurm_cluster"]

PIPELINE = RunSpec(strategy="pipeline", pp=2, microbatches=2, model="tiny", steps=2, verify=True)
THREE_D = RunSpec(strategy="3d", tp=2, pp=2, microbatches=2, model="tiny", steps=2, verify=True)  # tp inside a node


def prepare(run_dir: Path, spec: RunSpec, run_id: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {**spec.to_dict(), "device": "cpu", "run_id": run_id, "run_dir": str(run_dir)}
    (run_dir / "spec.json").write_text(json.dumps(doc))
    return run_dir


def launcher_for(cluster) -> SlurmLauncher:
    return SlurmLauncher(cluster.partition, nodes=2, env=cluster.env())


def job_processes(cluster, slurm_id: str) -> list[psutil.Process]:
    """Live processes of the job on any node (the batch script, srun, torchrun, the ranks)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == slurm_id and env.get("SLURM_CONF") == str(cluster.conf):
            found.append(proc)
    return found


def rank_nodes(cluster, slurm_id: str) -> dict[str, str]:
    """{RANK: node} of the job's live rank processes."""
    out = {}
    for proc in job_processes(cluster, slurm_id):
        try:
            env = proc.environ()
            if "runner.job" in " ".join(proc.cmdline()) and "RANK" in env and "LOCAL_RANK" in env:
                out[env["RANK"]] = env.get("SLURMD_NODENAME", "")
        except (psutil.Error, OSError):
            continue
    return out


# (a pipeline over the two nodes verifies from the Launch page: tests/browser/test_slurm_browser.py)
@pytest.mark.parametrize("spec", [THREE_D], ids=["3d-2x2"])
def test_a_two_node_run_verifies_against_the_reference(slurm_cluster, tmp_path, spec):
    launcher = launcher_for(slurm_cluster)
    run_dir = prepare(tmp_path / "run", spec, 1)
    job = launcher.submit(1, spec, run_dir, [])
    assert job.backend == "slurm" and job.job_id.isdigit() and launcher.record(job) == {"backend_job_id": job.job_id}
    deadline = time.monotonic() + 180
    while not (state := launcher.poll(job)).done:
        assert time.monotonic() < deadline, f"{state}\n{slurm_cluster.logs()}"
        time.sleep(0.5)
    got = launcher.collect(job)
    log = (run_dir / "torchrun.log").read_text() if (run_dir / "torchrun.log").exists() else ""
    assert (state.exit_code, state.state, got.exit_code, got.note) == (0, "COMPLETED", 0, None), log
    assert got.result is not None and got.result.verify["passed"] is True
    assert [r.rank for r in got.result.ranks] == list(range(spec.world_size))
    # Every rank names its node; the ranks of one tensor-parallel group share a node, the stages do not.
    nodes = [r.host for r in got.result.ranks]
    assert set(nodes) == {"n1", "n2"}, nodes
    tp = spec.degrees.tp
    assert all(len(set(nodes[g : g + tp])) == 1 for g in range(0, len(nodes), tp)), nodes
    assert (run_dir / EXIT_CODE_NAME).read_text().strip() == "0"  # the script's own record of its exit
    assert (run_dir / SCRIPT_NAME).read_text() == launcher.script(1, spec, run_dir)
    assert launcher.logs(job) == ["torchrun", *(f"rank{r}" for r in range(spec.world_size))]
    info = scontrol_job(job.job_id, slurm_cluster.env())
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    # Each node sampled its own rank processes, and only those (runner/service/node_telemetry.py).
    sampled = {}
    for row in NodeFilesSampler(run_dir, 0.0).sample():
        sampled.setdefault(row["host"], set()).add(row["source"])
    assert sampled == {n: {f"rank{r}" for r, h in enumerate(nodes) if h == n} for n in ("n1", "n2")}, sampled


def test_cancel_leaves_nothing_of_the_job_on_either_node(slurm_cluster, tmp_path):
    launcher = launcher_for(slurm_cluster)
    spec = RunSpec(strategy="pipeline", pp=2, microbatches=2, model="tiny", steps=100_000)
    job = launcher.submit(2, spec, prepare(tmp_path / "run", spec, 2), [])
    try:
        deadline = time.monotonic() + 120
        while sorted(rank_nodes(slurm_cluster, job.job_id).items(), key=lambda kv: kv[1]) not in (
            [("0", "n1"), ("1", "n2")],
            [("1", "n1"), ("0", "n2")],
        ):  # one rank on each node (which rank is where is the rendezvous's choice)
            assert time.monotonic() < deadline, rank_nodes(slurm_cluster, job.job_id)
            time.sleep(0.3)
        started = time.monotonic()
        while not (state := launcher.poll(job)).done:
            assert time.monotonic() - started < CANCEL_GRACE_S + 30, state
            launcher.cancel(job)
            time.sleep(0.3)
        assert state.state == "CANCELLED" and state.exit_code != 0
        deadline = time.monotonic() + 15
        while job_processes(slurm_cluster, job.job_id):
            assert time.monotonic() < deadline, job_processes(slurm_cluster, job.job_id)
            time.sleep(0.2)
        got = launcher.collect(job)
        assert got.result is None and got.note == f"Slurm job {job.job_id} ended CANCELLED"
    finally:
        slurm_cluster.cancel_all()


def rank_pid(cluster, slurm_id: str, rank: str) -> tuple[int, str]:
    """(pid, node) of one live rank process of the job."""
    for proc in job_processes(cluster, slurm_id):
        try:
            env = proc.environ()
            if "runner.job" in " ".join(proc.cmdline()) and env.get("RANK") == rank and "LOCAL_RANK" in env:
                return proc.pid, env.get("SLURMD_NODENAME", "")
        except (psutil.Error, OSError):
            continue
    raise LookupError(rank)


def running_on_both_nodes(cluster, runner: Runner, engine, run_id: int) -> str:
    """Tick the runner until the run's two ranks live, one on each node; its Slurm job id."""
    deadline = time.monotonic() + 120
    while True:
        runner.tick()
        slurm_id = runs.get_run(engine, run_id)["backend_job_id"]
        if slurm_id and sorted(rank_nodes(cluster, slurm_id).values()) == ["n1", "n2"]:
            return slurm_id
        assert time.monotonic() < deadline, runs.get_run(engine, run_id)
        time.sleep(0.3)


def test_a_runner_cancels_a_slurm_run_and_nothing_is_left_on_either_node(slurm_cluster, engine):
    runner = Runner(engine, launcher=launcher_for(slurm_cluster))
    assert runner.acquire()
    run_id = api.submit(engine, RunSpec(strategy="pipeline", pp=2, microbatches=2, model="tiny", steps=100_000))
    try:
        slurm_id = running_on_both_nodes(slurm_cluster, runner, engine, run_id)
        assert runs.request_cancel(engine, run_id) == "cancelling"
        run = wait_status(engine, run_id, {"cancelled", "failed", "succeeded"}, timeout=CANCEL_GRACE_S + 30,
                          between=runner.tick)  # fmt: skip
        assert run["status"] == "cancelled" and run["error"] == "cancelled by request"
        deadline = time.monotonic() + 15
        while job_processes(slurm_cluster, slurm_id):
            assert time.monotonic() < deadline, job_processes(slurm_cluster, slurm_id)
            time.sleep(0.2)
    finally:
        slurm_cluster.cancel_all()


def test_a_killed_rank_on_a_slurm_node_fails_the_run_naming_the_rank_and_the_node(slurm_cluster, engine):
    runner = Runner(engine, launcher=launcher_for(slurm_cluster))
    assert runner.acquire()
    run_id = api.submit(engine, RunSpec(strategy="pipeline", pp=2, microbatches=2, model="tiny", steps=100_000))
    try:
        slurm_id = running_on_both_nodes(slurm_cluster, runner, engine, run_id)
        pid, node = rank_pid(slurm_cluster, slurm_id, "1")
        # Killed once both ranks have started (not while still importing torch), so each named its node.
        events = runs_dir() / str(run_id) / "events.jsonl"
        deadline = time.monotonic() + 60
        while not (events.exists() and events.read_text().count('"kind": "started"') == 2):
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.2)
        psutil.Process(pid).kill()
        run = wait_status(engine, run_id, {"failed", "cancelled", "succeeded"}, timeout=90, between=runner.tick)
        assert run["status"] == "failed" and run["failed_rank"] == 1, run
        assert run["error"].startswith("rank 1 was killed by signal 9 (SIGKILL)"), run["error"]
        assert f"(rank 1 ran on node {node})" in run["error"], run["error"]  # from the rank's own started event
        # and what srun said: the first task it saw fail, on either node (the killed rank's torchrun, or the peer's
        # torchrun that lost its connection -- whichever exited first)
        assert re.search(r"Slurm job \d+ ended FAILED; srun saw node n[12] fail first \(task \d+: ", run["error"]), run[
            "error"
        ]
        assert run["exit_code"] != 0
    finally:
        slurm_cluster.cancel_all()


def serve_slurm(cluster, engine, *extra: str) -> subprocess.Popen:
    """`python -m runner serve --backend slurm --partition lab --nodes 2` against this cluster, once it holds the lease."""
    from storage import hosts

    proc = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--backend", "slurm", "--partition",
                             cluster.partition, "--nodes", "2", *extra], cwd=REPO_ROOT, env=cluster.env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while not ((status := hosts.runner_status(engine)) and status["alive"] and status["pid"] == proc.pid):
        assert time.monotonic() < deadline and proc.poll() is None, "the Slurm runner did not come up"
        time.sleep(0.2)
    return proc


def test_serve_backend_slurm_runs_a_submitted_run_and_a_killed_runner_is_replaced_without_losing_it(
    slurm_cluster, engine
):
    """The CLI's Slurm runner submits through the Slurm launcher and records the backend and job id; SIGKILLed while
    its run's Slurm job runs, a new one re-attaches to the job from the stored row (the run is neither lost nor
    started twice) and stores the verified result, with both nodes' samples, each tagged with its node."""
    from tests.conftest import stop_runner

    missing = subprocess.run([sys.executable, "-m", "runner", "serve", "--backend", "slurm"], cwd=REPO_ROOT,
                             capture_output=True, text=True, env=slurm_cluster.env(), timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "--backend slurm needs --partition" in missing.stderr
    before = set(slurm_cluster.jobs())
    first = serve_slurm(slurm_cluster, engine)
    second = None
    try:
        run_id = api.submit(engine, PIPELINE)
        deadline = time.monotonic() + 30
        while not (run := runs.get_run(engine, run_id))["backend_job_id"]:
            assert time.monotonic() < deadline, run
            time.sleep(0.1)
        assert run["backend"] == "slurm" and run["backend_job_id"].isdigit()
        assert Path(run["run_dir"], SCRIPT_NAME).exists()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        second = serve_slurm(slurm_cluster, engine)
        run = wait_status(engine, run_id, {"succeeded", "failed", "cancelled", "lost"}, timeout=180)
        assert run["status"] == "succeeded", run
        assert run["backend"] == "slurm" and run["result"]["verify"]["passed"] is True
        new = {job: state for job, state in slurm_cluster.jobs().items() if job not in before}
        assert new == {run["backend_job_id"]: "COMPLETED"}  # one Slurm job: never submitted twice
        assert [r["rank"] for r in run["ranks"]] == [0, 1]
        samples = api.telemetry_series(engine, [run_id])
        assert set(zip(samples["host"], samples["source"], strict=True)) == {
            (r["host"], f"rank{r['rank']}") for r in run["ranks"]
        }, samples
    finally:
        stop_runner(engine)
        if first.poll() is None:
            first.kill()
        slurm_cluster.cancel_all()
    if second is not None:
        second.wait(timeout=10)
