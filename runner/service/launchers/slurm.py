"""The Slurm backend: one sbatch job per run, one torchrun per node, c10d rendezvous on the job's first node.

`render_sbatch` writes the script from the spec: `--nodes N --ntasks-per-node=1`, `--gres=gpu:G` on
GPUs (on CPU no GRES, `--cpus-per-task=R`: a core per rank, as OMP_NUM_THREADS=1 assumes), `--time` from spec.time_limit_s, `--output`/`--error` into the run folder's
torchrun.log (every node's torchrun writes there through srun; each rank writes its own rankR.log),
`--partition` / `--account`. Its body finds the first node's address (`scontrol show hostnames
"$SLURM_JOB_NODELIST"`, then that node's NodeAddr), runs `srun python -m torch.distributed.run --nnodes
$SLURM_NNODES --nproc-per-node R --rdzv-backend c10d --rdzv-endpoint $head:$port --rdzv-id $SLURM_JOB_ID
-m runner.job <run_dir>/spec.json` (the port one the first node's kernel gives as free when the script
starts there: the c10d store listens on that node, and a port derived from the job id would collide
between two clusters, or two job-id sequences, sharing a machine) and finally writes srun's exit status into <run_dir>/exit_code, so the outcome survives
Slurm forgetting the job. The script is kept in the run folder as job.sbatch (the run page reads it
there: the run folders are on the cluster's shared filesystem).

State comes from `squeue -h -j ID -o %T`, then `scontrol show job ID` once squeue no longer lists it
(accounting is not needed); cancel is `scancel ID` (Slurm sends SIGTERM, and SIGKILL after its KillWait),
then `scancel --signal=KILL --full ID` once CANCEL_GRACE_S has passed. The layout rule: nodes x ranks per
node = world size, GPUs per node = ranks per node, and tensor parallelism (innermost in the mesh, so tp
consecutive ranks) inside one node: `layout_problems` says what is wrong, naming the field.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.service.launch import JOB_ENTRY, REPO_ROOT, TORCHRUN_SHUTDOWN_S
from runner.service.launchers.base import Collected, JobState, read_result, run_logs
from runner.service.launchers.local import CANCEL_GRACE_S, ORPHAN_GRACE_S
from runner.service.logs import read_log
from runner.service.node_telemetry import ENV as NODE_TELEMETRY_ENV
from runner.service.node_telemetry import NodeFilesSampler
from runner.spec.run_spec import RunSpec, SpecProblem

SCRIPT_NAME = "job.sbatch"
EXIT_CODE_NAME = "exit_code"
POLL_EVERY_S = 1.0  # squeue/scontrol at most this often per job
COMMAND_TIMEOUT_S = 20.0
# Slurm states in which the job (or its processes, while COMPLETING) may still run.
PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
ACTIVE_STATES = PENDING_STATES | {"RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT",
                                  "STOPPED"}  # fmt: skip


# srun's line for a node whose task failed: "srun: error: n2: task 1: Exited with exit code 1"
SRUN_TASK_ERROR = re.compile(r"^srun: error: (?P<node>[^\s:]+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)$", re.M)


class SlurmError(RuntimeError):
    """A Slurm command failed (its stderr is the message)."""


# ---- layout and validation ------------------------------------------------------------------
def uses_gpus(spec: RunSpec, gpus_per_node: int) -> bool:
    """Whether the job runs on GPUs: device cuda, or auto on a partition whose nodes have GPUs."""
    return spec.device == "cuda" or (spec.device == "auto" and gpus_per_node > 0)


def nodes_for(spec: RunSpec, default: int | None = None, gpus_per_node: int = 0) -> int:
    """How many nodes the run takes: the spec's `nodes` when it has that field, else the runner's default, else
    as many nodes as the GPUs per node need (one node on CPU)."""
    nodes = getattr(spec, "nodes", None) or default
    if nodes:
        return int(nodes)
    if uses_gpus(spec, gpus_per_node) and gpus_per_node > 0:
        return max(1, math.ceil(spec.world_size / gpus_per_node))
    return 1


def layout_problems(spec: RunSpec, nodes: int, gpus_per_node: int | None = None) -> list[SpecProblem]:
    """What keeps `spec` from running on `nodes` Slurm nodes, each problem naming its field and the fix.

    nodes x ranks per node must be the world size; on GPUs, ranks per node = GPUs per node (one rank a GPU),
    so nodes x GPUs per node = world size; tensor parallelism stays inside a node (tp divides the ranks per
    node), since tp groups are tp consecutive ranks and torchrun gives each node consecutive ranks.
    """
    problems: list[SpecProblem] = []
    try:
        world, tp = spec.world_size, spec.degrees.tp
    except ValueError:
        return problems  # the spec's own validation says what is wrong with its degrees
    if nodes < 1:
        return [SpecProblem("nodes", f"must be at least 1, not {nodes}")]
    if world % nodes:
        problems.append(SpecProblem("nodes", f"{world} ranks cannot be spread evenly over {nodes} nodes: choose a "
                                             "number of nodes that divides the world size"))  # fmt: skip
        return problems
    per_node = world // nodes
    if gpus_per_node is not None and uses_gpus(spec, gpus_per_node) and per_node != gpus_per_node:
        problems.append(SpecProblem("nodes", f"nodes x GPUs per node must equal the world size: {nodes} x "
                                             f"{gpus_per_node} = {nodes * gpus_per_node}, the spec has {world} ranks"))  # fmt: skip
    if tp > 1 and per_node % tp:
        problems.append(SpecProblem("tp", f"tensor parallelism must stay within a node: tp={tp} does not divide "
                                          f"the {per_node} ranks per node ({world} ranks on {nodes} nodes); use a tp "
                                          "that divides the ranks per node, or fewer nodes"))  # fmt: skip
    return problems


# ---- the script --------------------------------------------------------------------------------
def slurm_time(seconds: float) -> str:
    """Slurm's --time for a limit in seconds: whole minutes, rounded up (Slurm counts minutes)."""
    return str(max(1, math.ceil(seconds / 60)))


def render_sbatch(spec: RunSpec, run_dir: Path | str, *, nodes: int, partition: str, account: str | None = None,
                  gpus_per_node: int = 0, run_id: int | None = None, python: str | None = None,
                  entry: Sequence[str] = JOB_ENTRY) -> str:  # fmt: skip
    """The sbatch script for `spec` on `nodes` nodes (its layout checked by layout_problems first)."""
    run_dir = Path(run_dir)
    gpu = uses_gpus(spec, gpus_per_node)
    per_node = spec.world_size // nodes
    q = shlex.quote
    directives = [
        f"--job-name=lab-run-{run_id}" if run_id is not None else "--job-name=lab-run",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        *([f"--gres=gpu:{per_node}"] if gpu else [f"--cpus-per-task={per_node}"]),
        f"--time={slurm_time(spec.time_limit_s)}",
        f"--output={run_dir / 'torchrun.log'}",
        f"--error={run_dir / 'torchrun.log'}",
        f"--chdir={REPO_ROOT}",
        f"--partition={partition}",
        *([f"--account={account}"] if account else []),
    ]
    env = [
        f"export PYTHONPATH={q(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export PYTHONUNBUFFERED=1",
        f"export {NODE_TELEMETRY_ENV}=1  # each node samples its own ranks or GPUs into the run folder",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={TORCHRUN_SHUTDOWN_S}",
        *(["export CUDA_DEVICE_ORDER=PCI_BUS_ID"] if gpu else ["export OMP_NUM_THREADS=1", "export CUDA_VISIBLE_DEVICES=",
                                                            f"export SRUN_CPUS_PER_TASK={per_node}"]),
    ]  # fmt: skip
    torchrun = " ".join([
        "srun", "--kill-on-bad-exit=1", q(python or sys.executable), "-m", "torch.distributed.run",
        "--nnodes", '"$SLURM_NNODES"', "--nproc-per-node", str(per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", '"$head:$port"', "--rdzv-id", '"$SLURM_JOB_ID"',
        "--max-restarts", "0", *map(q, entry), q(str(run_dir / "spec.json")),
    ])  # fmt: skip
    exit_file = q(str(run_dir / EXIT_CODE_NAME))
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        "",
        *env,
        "# c10d rendezvous on the first node of the allocation (its address as Slurm knows it)",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "head=$(scontrol show node \"$head_node\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' | head -n1)",
        'head=${head:-$head_node}',
        "# the batch script runs on that first node, where torchrun's c10d store will listen: a port free there",
        f"port=$({q(python or sys.executable)} -c " + q("import socket; s = socket.socket(); s.bind(('', 0)); "
                                                         "print(s.getsockname()[1])") + ")",
        torchrun,
        "code=$?",
        f'echo "$code" > {exit_file}.part && mv {exit_file}.part {exit_file}',
        'exit "$code"',
        "",
    ])  # fmt: skip


# ---- the handle and the launcher ------------------------------------------------------------
@dataclass
class SlurmJob:
    """The Slurm handle: the job id sbatch gave, and what the last poll saw."""

    run_id: int
    slurm_id: str
    run_dir: Path
    kill_at: float | None = None
    ranks: dict[int, float] = field(default_factory=dict)  # rank processes run on the nodes, not here
    last_poll: float = 0.0
    last_state: JobState | None = None
    slurm_state: str = ""  # the last state Slurm reported
    exit_code: int | None = None  # from scontrol's ExitCode, once the job ended
    backend = "slurm"

    @property
    def job_id(self) -> str:
        return self.slurm_id

    def add_rank(self, pid: int, reported_at: float) -> bool:
        return False  # a pid on another node means nothing to this machine


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=env)
    except FileNotFoundError as exc:
        raise SlurmError(f"{argv[0]} is not installed or not on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(argv)} did not answer within {COMMAND_TIMEOUT_S:g} s") from exc


def _unknown_job(proc: subprocess.CompletedProcess) -> bool:
    return "invalid job id" in (proc.stderr + proc.stdout).lower()


def scontrol_job(slurm_id: str, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """`scontrol show job ID` as key=value pairs; None when Slurm no longer knows the job."""
    proc = _run(["scontrol", "show", "job", "-o", slurm_id], env)
    if proc.returncode != 0:
        if _unknown_job(proc):
            return None
        raise SlurmError(proc.stderr.strip() or f"scontrol exited {proc.returncode}")
    out: dict[str, str] = {}
    for word in proc.stdout.split():
        key, sep, value = word.partition("=")
        if sep and key not in out:
            out[key] = value
    return out or None


def first_failed_node(run_dir: Path) -> tuple[str, str] | None:
    """The node srun reported first as failing, and what it said ("task 1: Exited with exit code 1"), from the job's
    output (torchrun.log); None when srun reported no failing task."""
    text = read_log(run_dir, "torchrun") or ""
    m = SRUN_TASK_ERROR.search(text)
    return (m["node"], f"task {m['tasks']}: {m['what'].strip()}") if m else None


def exit_code_of(scontrol_exit: str | None) -> int | None:
    """scontrol's ExitCode "code:signal" as one number: -signal when a signal ended it."""
    if not scontrol_exit or ":" not in scontrol_exit:
        return None
    code, _, sig = scontrol_exit.partition(":")
    try:
        return -int(sig) if int(sig) else int(code)
    except ValueError:
        return None


class SlurmLauncher:
    """Runs each run as one sbatch job on `partition`; Slurm, not the runner, places it on nodes."""

    backend = "slurm"
    submit_failure = "could not submit to Slurm"
    places_locally = False

    def __init__(self, partition: str, account: str | None = None, *, gpus_per_node: int = 0,
                 nodes: int | None = None, entry: Sequence[str] = JOB_ENTRY, python: str | None = None,
                 env: dict[str, str] | None = None):  # fmt: skip
        self.partition = partition
        self.account = account
        self.gpus_per_node = gpus_per_node
        self.nodes = nodes  # the default when the spec does not say
        self.entry: tuple[str, ...] = tuple(entry)
        self.python = python
        self.env = env  # for the Slurm commands, and so for the jobs (sbatch exports it); None: this process's own

    # ---- what the runner asks before launching ----
    def nodes_for(self, spec: RunSpec) -> int:
        return nodes_for(spec, self.nodes, self.gpus_per_node)

    def gpu_count(self, spec: RunSpec) -> int:
        """The GPUs a run on this partition can have (validation checks the spec against them)."""
        return self.nodes_for(spec) * self.gpus_per_node

    def problems(self, spec: RunSpec) -> list[SpecProblem]:
        return layout_problems(spec, self.nodes_for(spec), self.gpus_per_node)

    def script(self, run_id: int, spec: RunSpec, run_dir: Path) -> str:
        return render_sbatch(spec, run_dir, nodes=self.nodes_for(spec), partition=self.partition,
                             account=self.account, gpus_per_node=self.gpus_per_node, run_id=run_id,
                             python=self.python, entry=self.entry)  # fmt: skip

    # ---- the interface ----
    def submit(self, run_id: int, spec: RunSpec, run_dir: Path, gpus: list[str]) -> SlurmJob:
        problems = self.problems(spec)
        if problems:
            raise SlurmError("; ".join(str(p) for p in problems))
        path = Path(run_dir) / SCRIPT_NAME
        path.write_text(self.script(run_id, spec, Path(run_dir)))
        proc = _run(["sbatch", "--parsable", str(path)], self.env)
        if proc.returncode != 0:
            raise SlurmError(proc.stderr.strip() or f"sbatch exited {proc.returncode}")
        slurm_id = proc.stdout.strip().split(";")[0]
        if not slurm_id.isdigit():
            raise SlurmError(f"sbatch answered {proc.stdout.strip()!r}, not a job id")
        return SlurmJob(run_id=run_id, slurm_id=slurm_id, run_dir=Path(run_dir))

    def attach(self, run_id: int, row: dict[str, Any]) -> SlurmJob:
        return SlurmJob(run_id=run_id, slurm_id=str(row.get("backend_job_id") or ""),
                        run_dir=Path(row.get("run_dir") or "."))  # fmt: skip

    def record(self, job: SlurmJob) -> dict[str, Any]:
        return {"backend_job_id": job.slurm_id}

    def track(self, job: SlurmJob) -> None:
        pass

    def poll(self, job: SlurmJob) -> JobState:
        now = time.monotonic()
        if job.last_state is not None and now - job.last_poll < POLL_EVERY_S:
            return job.last_state
        job.last_poll = now
        job.last_state = self._poll(job)
        return job.last_state

    def _poll(self, job: SlurmJob) -> JobState:
        if not job.slurm_id:
            return JobState(-1, state="never submitted")
        try:
            proc = _run(["squeue", "-h", "-j", job.slurm_id, "-o", "%T"], self.env)
            state = proc.stdout.strip().split("\n")[0].strip() if proc.returncode == 0 else ""
            if proc.returncode != 0 and not _unknown_job(proc):
                raise SlurmError(proc.stderr.strip())
            if state in ACTIVE_STATES:
                job.slurm_state = state
                return JobState(None, pending=state in PENDING_STATES, state=state)
            info = scontrol_job(job.slurm_id, self.env)
        except SlurmError as exc:
            # Cannot tell (the controller does not answer): it still runs as far as we know.
            print(f"run {job.run_id}: Slurm job {job.slurm_id}: {exc}", flush=True)
            return job.last_state or JobState(None, state="unknown")
        if info is not None:
            state = info.get("JobState", "")
            job.slurm_state = state or job.slurm_state
            if state in ACTIVE_STATES:
                return JobState(None, pending=state in PENDING_STATES, state=state)
            job.exit_code = exit_code_of(info.get("ExitCode"))
        code = self._written_exit_code(job)
        if code is None:
            code = job.exit_code if job.exit_code is not None else -1
        return JobState(code, state=job.slurm_state or "gone")

    def _written_exit_code(self, job: SlurmJob) -> int | None:
        try:
            return int((job.run_dir / EXIT_CODE_NAME).read_text().strip())
        except (OSError, ValueError):
            return None

    def cancel(self, job: SlurmJob) -> None:
        """`scancel ID` first (Slurm's SIGTERM to every step, its SIGKILL after KillWait), then, on a call
        CANCEL_GRACE_S later, `scancel --signal=KILL --full ID` for whatever still runs. Never blocks long."""
        if not job.slurm_id:
            return
        now = time.monotonic()
        try:
            if job.kill_at is None:
                job.kill_at = now + CANCEL_GRACE_S
                _run(["scancel", job.slurm_id], self.env)
            elif now >= job.kill_at:
                job.kill_at = now + ORPHAN_GRACE_S
                _run(["scancel", "--signal=KILL", "--full", job.slurm_id], self.env)
        except SlurmError as exc:
            print(f"run {job.run_id}: {exc}", flush=True)
        job.last_state = None  # look again on the next poll

    def logs(self, job: SlurmJob) -> list[str]:
        return run_logs(job.run_dir)

    def collect(self, job: SlurmJob) -> Collected:
        state = job.last_state if job.last_state is not None and job.last_state.done else self._poll(job)
        code = state.exit_code if state.exit_code is not None else -1
        got = read_result(job.run_dir, code)
        if job.slurm_state and job.slurm_state not in ("COMPLETED", "gone"):
            note = f"Slurm job {job.slurm_id} ended {job.slurm_state}"
            node = first_failed_node(job.run_dir) if not job.slurm_state.startswith("CANCELLED") else None
            if node:  # a cancelled job's tasks all fail: no node to name
                note += f"; srun saw node {node[0]} fail first ({node[1]})"
            return Collected(got.exit_code, got.result, got.unreadable, note=note)
        return got

    def sampler(self, job: SlurmJob, started: float, gpus: list[str]) -> NodeFilesSampler:
        """The nodes sample themselves (runner/service/node_telemetry.py); the runner reads their files in the run folder."""
        return NodeFilesSampler(job.run_dir, started)
