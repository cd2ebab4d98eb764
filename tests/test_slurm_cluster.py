"""The two-node Slurm cluster the Slurm tests run against: real daemons (slurmctld, two slurmd, munged).

Both nodes come up idle; a batch job's `srun` runs one task on each node; scancel leaves no process of the
job on either node; stop() leaves no process of the cluster at all.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import psutil
import pytest

if TYPE_CHECKING:
    from tests.slurm_cluster import SlurmCluster

# The session's `slurm_cluster` fixture. The module is imported by this registration, not before it (an
# earlier `import` would keep pytest from rewriting its asserts, with a warning).
pytest_plugins = ["tests.slurm_cluster"]


def job_processes(cluster: SlurmCluster, job_id: str) -> list[psutil.Process]:
    """Live processes of one job of this cluster: its slurmstepd ("slurmstepd: [ID.step]") and every
    process whose environment names the job (the batch script, srun, the tasks)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["name"] == "slurmstepd":
                if f"[{job_id}." in cmdline and proc in cluster.processes():
                    found.append(proc)
                continue
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_CONF") == str(cluster.conf):
            found.append(proc)
    return found


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.2)


def test_both_nodes_idle_in_one_partition(slurm_cluster):
    # another test's job may still be completing on the shared cluster: idle within a few seconds
    wait_for(lambda: slurm_cluster.node_states() == {"n1": "idle", "n2": "idle"}, 15, "n1 and n2 idle")
    out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%n %t %P %c").stdout
    cpus = slurm_cluster.cpus
    assert sorted(out.splitlines()) == [f"n1 idle lab* {cpus}", f"n2 idle lab* {cpus}"]
    assert slurm_cluster.partition == "lab"


def test_batch_job_runs_one_task_on_each_node(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"'\n")
    output = tmp_path / "job.out"
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", "-N2", "--ntasks-per-node=1", f"--output={output}", f"--chdir={tmp_path}", str(script)
    ).stdout.strip()
    assert slurm_cluster.wait_job(job_id, timeout=60) == "COMPLETED", output.read_text() if output.exists() else ""
    assert sorted(output.read_text().splitlines()) == ["task 0 on n1", "task 1 on n2"]


def test_scancel_leaves_nothing_on_either_node(slurm_cluster, tmp_path):
    job_id = slurm_cluster.run(
        "sbatch",
        "--parsable",
        "-N2",
        "--ntasks-per-node=1",
        "--output=/dev/null",
        f"--chdir={tmp_path}",
        "--wrap",
        "srun sleep 300",
    ).stdout.strip()

    def sleeping_on_both_nodes():
        sleeps = [p for p in job_processes(slurm_cluster, job_id) if p.name() == "sleep"]
        nodes = sorted(p.environ().get("SLURMD_NODENAME", "") for p in sleeps)
        parents = {p.parent().name() for p in sleeps}
        return nodes == ["n1", "n2"] and parents == {"slurmstepd"}

    wait_for(sleeping_on_both_nodes, 30, f"job {job_id}'s sleep (a child of slurmstepd) running on n1 and n2")
    slurm_cluster.run("scancel", job_id)
    assert slurm_cluster.wait_job(job_id, timeout=30) == "CANCELLED"
    wait_for(lambda: not job_processes(slurm_cluster, job_id), 15, f"no process of job {job_id} left")
    wait_for(lambda: set(slurm_cluster.node_states().values()) == {"idle"}, 15, "both nodes idle again")


def test_stop_leaves_no_process_of_the_cluster(tmp_path):
    from tests.slurm_cluster import SlurmCluster, missing_binaries

    if missing_binaries():
        pytest.skip(f"Slurm binaries missing ({', '.join(missing_binaries())})")
    cluster = SlurmCluster(tmp_path / "c").start()
    try:
        daemons = cluster.processes()
        assert sorted(p.name() for p in daemons) == ["munged", "slurmctld", "slurmd", "slurmd", "slurmscriptd"]
        job_id = cluster.run(
            "sbatch", "--parsable", "-N2", "--output=/dev/null", f"--chdir={tmp_path}", "--wrap", "srun sleep 300"
        ).stdout.strip()
        wait_for(
            lambda: len([p for p in job_processes(cluster, job_id) if p.name() == "sleep"]) == 2,
            30,
            "the job's two sleeps",
        )
        everything = cluster.processes()
        assert {"slurmstepd", "sleep"} <= {p.name() for p in everything}
    finally:
        cluster.stop()
    assert not cluster.running()
    left = [p for p in everything if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running after stop(): {[(p.pid, p.name()) for p in left]}"
    assert not cluster.processes()
    mentioning = []  # any process still naming this cluster's folder (a daemon's -f slurm.conf, a socket, ...)
    for proc in psutil.process_iter(["cmdline"]):
        if str(cluster.root) in " ".join(proc.info["cmdline"] or []):
            mentioning.append(proc)
    assert not mentioning
