"""The launcher interface: the local backend on real torchrun jobs (submit, poll to exit 0, cancel, re-attach
from the recorded handle) and the Slurm backend's sbatch script (exact directives and torchrun line) and layout
rules (nodes x ranks per node, tensor parallelism inside a node), which refuse a spec before anything is submitted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runner import api
from runner.service.launch import REPO_ROOT
from runner.service.launchers import Launcher, LocalLauncher, make_launcher
from runner.service.launchers.local import CANCEL_GRACE_S
from runner.service.launchers.slurm import SlurmError, SlurmLauncher, exit_code_of, layout_problems, render_sbatch
from runner.service.loop import Runner
from runner.spec.run_spec import RunSpec
from storage import runs

TINY = RunSpec(strategy="single", model="tiny", steps=1, warmup=0)


def prepare(run_dir: Path, spec: RunSpec, run_id: int = 1) -> Path:
    """The run folder as the runner leaves it before a launch: spec.json with the placed device."""
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {**spec.to_dict(), "device": "cpu", "run_id": run_id, "run_dir": str(run_dir)}
    (run_dir / "spec.json").write_text(json.dumps(doc))
    return run_dir


def poll_until_done(launcher: Launcher, job, timeout: float, cancel: bool = False):
    deadline = time.monotonic() + timeout
    while not (state := launcher.poll(job)).done:
        assert time.monotonic() < deadline, f"still running after {timeout} s: {state}"
        if cancel:
            launcher.cancel(job)
        time.sleep(0.1)
    return state


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- local backend, through the interface ---------------------------------------------------------
def test_the_backends_implement_the_interface():
    assert isinstance(LocalLauncher(), Launcher) and isinstance(SlurmLauncher("p"), Launcher)
    assert make_launcher("local").backend == "local" and make_launcher("slurm", partition="p").backend == "slurm"
    with pytest.raises(ValueError, match="unknown backend 'k8s'"):
        make_launcher("k8s")


@pytest.mark.slow
def test_a_local_job_runs_to_exit_0_and_its_result_and_logs_are_collected(tmp_path):
    launcher = LocalLauncher()
    run_dir = prepare(tmp_path / "run", TINY)
    job = launcher.submit(1, TINY, run_dir, [])
    assert job.backend == "local" and job.job_id == str(job.pid) and launcher.record(job)["pid"] == job.pid
    assert launcher.poll(job).exit_code is None
    state = poll_until_done(launcher, job, timeout=120)
    assert state.exit_code == 0 and not state.lingering
    got = launcher.collect(job)
    assert got.exit_code == 0 and got.result is not None and got.unreadable is None
    assert got.result.tokens_per_s > 0 and [r.rank for r in got.result.ranks] == [0]
    assert launcher.logs(job) == ["torchrun", "rank0"]


@pytest.mark.slow
def test_a_local_job_is_re_attached_from_its_recorded_handle_and_cancelled_through_it(tmp_path):
    """As a restarted runner does: the handle rebuilt from the stored row (pid, rank pids) finds the live job; its
    cancel (SIGTERM, SIGKILL after the grace) leaves no process of it."""
    launcher = LocalLauncher()
    spec = RunSpec(strategy="data", dp=2, model="tiny", steps=100_000)
    run_dir = prepare(tmp_path / "run", spec)
    job = launcher.submit(7, spec, run_dir, [])
    try:
        deadline = time.monotonic() + 60
        while len(job.ranks) < 2:
            assert time.monotonic() < deadline, "torchrun never started its two ranks"
            launcher.track(job)
            time.sleep(0.1)
        row = {"id": 7, "run_dir": str(run_dir), **launcher.record(job)}
        again = launcher.attach(7, row)
        assert (again.pid, again.ranks, again.popen) == (job.pid, job.ranks, None)
        assert not launcher.poll(again).done
        started = time.monotonic()
        state = poll_until_done(launcher, again, timeout=CANCEL_GRACE_S + 20, cancel=True)
        assert state.exit_code is not None and time.monotonic() - started < CANCEL_GRACE_S + 10
        assert not [p for p in (job.pid, *job.ranks) if alive(p)]
        assert launcher.collect(again).result is None
    finally:
        job.popen.kill()
        job.popen.wait()
        for pid in job.ranks:
            if alive(pid):
                psutil.Process(pid).kill()


# ---- Slurm backend: the script -----------------------------------------------------------------------
def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_line(script: str) -> str:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return line


def test_sbatch_for_a_two_node_pipeline_on_cpu(tmp_path):
    spec = RunSpec(strategy="pipeline", pp=2, microbatches=2, model="tiny", time_limit_s=150)
    script = render_sbatch(spec, "/lab/runs/7", nodes=2, partition="lab", run_id=7, python="/venv/bin/python")
    assert script.startswith("#!/bin/bash\n")
    assert directives(script) == [
        "--job-name=lab-run-7", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=3",
        "--output=/lab/runs/7/torchrun.log", "--error=/lab/runs/7/torchrun.log", f"--chdir={REPO_ROOT}",
        "--partition=lab",
    ]  # fmt: skip
    assert srun_line(script) == (
        'srun --kill-on-bad-exit=1 /venv/bin/python -m torch.distributed.run --nnodes "$SLURM_NNODES" '
        '--nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint "$head:$port" --rdzv-id "$SLURM_JOB_ID" '
        "--max-restarts 0 -m runner.job /lab/runs/7/spec.json"
    )
    lines = script.splitlines()
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert "export OMP_NUM_THREADS=1" in lines and "export CUDA_VISIBLE_DEVICES=" in lines
    assert "export SRUN_CPUS_PER_TASK=1" in lines  # srun (Slurm 22.05+) does not inherit --cpus-per-task
    assert "export LAB_NODE_TELEMETRY=1  # each node samples its own ranks or GPUs into the run folder" in lines
    # The rendezvous port: one the first node (where the batch script and the c10d store run) has free.
    (port_line,) = [x for x in lines if x.startswith("port=")]
    got = subprocess.run(["bash", "-c", port_line.replace("/venv/bin/python", sys.executable) + '; echo "$port"'],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert got.isdigit() and 0 < int(got) < 65536
    # the script's own exit code, written after srun, so the outcome survives Slurm forgetting the job
    after = lines[lines.index(srun_line(script)) + 1 :]
    assert after[:3] == ["code=$?", 'echo "$code" > /lab/runs/7/exit_code.part && mv /lab/runs/7/exit_code.part '
                         "/lab/runs/7/exit_code", 'exit "$code"']  # fmt: skip


def test_sbatch_for_a_2x2_3d_run_on_gpus_asks_for_two_gpus_per_node_and_the_account():
    spec = RunSpec(strategy="3d", tp=2, pp=2, model="tiny", device="cuda", time_limit_s=600)
    assert layout_problems(spec, nodes=2, gpus_per_node=2) == []
    script = render_sbatch(spec, "/lab/runs/8", nodes=2, partition="gpu", account="team", gpus_per_node=2, run_id=8,
                           python="/venv/bin/python")  # fmt: skip
    assert directives(script) == [
        "--job-name=lab-run-8", "--nodes=2", "--ntasks-per-node=1", "--gres=gpu:2", "--time=10",
        "--output=/lab/runs/8/torchrun.log", "--error=/lab/runs/8/torchrun.log", f"--chdir={REPO_ROOT}",
        "--partition=gpu", "--account=team",
    ]  # fmt: skip
    assert ' --nnodes "$SLURM_NNODES" --nproc-per-node 2 ' in srun_line(script)
    assert "export CUDA_DEVICE_ORDER=PCI_BUS_ID" in script and "CUDA_VISIBLE_DEVICES" not in script
    assert "cpus-per-task" not in script.lower() and "CPUS_PER_TASK" not in script


def test_tensor_parallelism_across_nodes_and_an_uneven_layout_are_refused_naming_the_field():
    tp4 = RunSpec(strategy="tensor", tp=4, model="tiny")
    (problem,) = layout_problems(tp4, nodes=2)
    assert problem.field == "tp" and problem.message.startswith("tensor parallelism must stay within a node")
    assert "tp=4 does not divide the 2 ranks per node" in problem.message
    assert layout_problems(tp4, nodes=1) == []
    (problem,) = layout_problems(RunSpec(strategy="pipeline", pp=3, model="tiny"), nodes=2)
    assert problem.field == "nodes" and "3 ranks cannot be spread evenly over 2 nodes" in problem.message
    gpu = RunSpec(strategy="data", dp=4, model="tiny", device="cuda")
    (problem,) = layout_problems(gpu, nodes=2, gpus_per_node=1)
    assert problem.field == "nodes" and problem.message == (
        "nodes x GPUs per node must equal the world size: 2 x 1 = 2, the spec has 4 ranks"
    )


def test_a_slurm_launcher_refuses_a_bad_layout_before_calling_sbatch(tmp_path):
    launcher = SlurmLauncher("lab", nodes=2, env={"PATH": "/nonexistent"})  # sbatch could not even be found
    with pytest.raises(SlurmError, match="tp: tensor parallelism must stay within a node"):
        launcher.submit(1, RunSpec(strategy="tensor", tp=4, model="tiny"), prepare(tmp_path, TINY), [])
    assert not (tmp_path / "job.sbatch").exists()
    with pytest.raises(SlurmError, match="sbatch is not installed or not on PATH"):
        launcher.submit(1, RunSpec(strategy="layer", pp=2, model="tiny"), tmp_path, [])
    assert (tmp_path / "job.sbatch").read_text() == launcher.script(1, RunSpec(strategy="layer", pp=2), tmp_path)


def test_slurm_exit_codes_read_as_one_number():
    assert [exit_code_of(x) for x in ("0:0", "3:0", "0:9", "", None, "x:y")] == [0, 3, -9, None, None, None]


def test_a_runner_for_slurm_fails_a_queued_run_whose_tp_would_cross_nodes(engine):
    run_id = api.submit(engine, RunSpec(strategy="tensor", tp=4, model="tiny"))
    Runner(engine, launcher=SlurmLauncher("lab", nodes=2)).place_queued()
    run = runs.get_run(engine, run_id)
    assert run["status"] == "failed" and "tp: tensor parallelism must stay within a node" in run["error"]


def test_a_local_runner_leaves_a_slurm_run_of_its_host_alone_instead_of_marking_it_lost(engine, tmp_path):
    from storage import runner_rows

    run_id = api.submit(engine, TINY)
    assert runner_rows.claim_run(engine, run_id, "slurm-runner", str(tmp_path), [], backend="slurm")
    runner_rows.update_run(engine, run_id, backend_job_id="99")
    runner = Runner(engine)  # local only
    assert runner.acquire()
    runner.recover()
    runner.recover()  # told once, still left alone
    run = runs.get_run(engine, run_id)
    assert run["status"] == "running" and run["backend"] == "slurm" and run["backend_job_id"] == "99"
    assert run_id not in runner.watched and runner.foreign == {run_id}


def test_a_machines_runner_refuses_nodes():
    """A run with nodes that reached a machine's own runner (queued for a host not yet reporting) is refused,
    not run on one machine as if it had its nodes."""
    (problem,) = LocalLauncher().problems(RunSpec(strategy="pipeline", pp=2, microbatches=2, nodes=2))
    assert problem.field == "nodes" and "only apply to a Slurm partition" in problem.message
    assert LocalLauncher().problems(RunSpec(strategy="pipeline", pp=2, microbatches=2)) == []
