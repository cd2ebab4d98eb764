"""Telemetry of a multi-node run, taken on every node where its ranks run and read back by the runner.

The runner samples a local job itself (runner.service.telemetry.Sampler on its own machine). A Slurm job's ranks
run on other machines, so each node samples its own: the job script sets LAB_NODE_TELEMETRY=1, and on
every node the rank with LOCAL_RANK 0 starts one sampler process (`start_node_sampler`). That process
samples the node's rank processes (psutil: every child of this node's torchrun that is a rank) or the
job's GPUs on this node (NVML, matched by UUID: Slurm's CUDA_VISIBLE_DEVICES numbers a job's GPUs from 0,
NVML numbers all of the node's) once a second and appends one JSON line per GPU or rank process to
<run_dir>/telemetry/<node>.jsonl. The run folder is on the cluster's shared filesystem, so the runner
(`NodeFilesSampler`, the Slurm launcher's sampler) reads every node's file and stores the rows tagged
with the node.

The sampler process dies with the rank that started it (PR_SET_PDEATHSIG, and it checks its parent each
second), so it never outlives the run; the rank also stops it when the job ends. What goes wrong in it -- NVML
failing (backed off, runner/service/nvml.py), a GPU refused (a MIG instance), any exception -- is written, once
per distinct trouble, to <run_dir>/telemetry/<node>.log, where its stderr goes too: it never dies silently, and
one bad sample never ends the sampling.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.service.telemetry import Sampler

ENV = "LAB_NODE_TELEMETRY"  # set by the Slurm job script: sample on every node
FOLDER = "telemetry"
SAMPLE_EVERY_S = 1.0
# torchrun's and the rank's identity: the sampler must not look like a rank to psutil scans (or to itself).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def node_file(run_dir: Path | str, host: str) -> Path:
    """Where the sampler of `host` writes: <run_dir>/telemetry/<host>.jsonl."""
    return Path(run_dir) / FOLDER / f"{host}.jsonl"


def node_log(run_dir: Path | str, host: str) -> Path:
    """Where the sampler of `host` says what went wrong: <run_dir>/telemetry/<host>.log."""
    return Path(run_dir) / FOLDER / f"{host}.log"


def start_node_sampler(run_dir: Path, host: str, launcher_pid: int, gpu_uuids: list[str]) -> subprocess.Popen:
    """Start this node's sampler (called by the node's LOCAL_RANK 0 when LAB_NODE_TELEMETRY is set).

    launcher_pid: this node's torchrun, whose rank children are sampled; gpu_uuids: the job's GPUs on this node in
    CUDA order, as torch prints their UUIDs (the sampler finds each whole GPU by UUID and refuses a MIG instance),
    [] for a CPU run.
    """
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    argv = [sys.executable, "-m", "runner.service.node_telemetry", str(run_dir), "--host", host, "--root", str(launcher_pid),
            *(a for u in gpu_uuids for a in ("--gpu-uuid", u))]  # fmt: skip
    log = node_log(run_dir, host)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as err:  # a sampler that cannot even start says why there
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=_die_with_parent)  # fmt: skip


def stop_node_sampler(proc: subprocess.Popen | None) -> None:
    """Stop the sampler at the end of the job (SIGTERM: it finishes the line it writes)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _die_with_parent() -> None:
    """In the child before exec: the kernel SIGKILLs it when the rank that started it dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def sample_node(run_dir: Path, host: str, root_pid: int, gpu_uuids: list[str], parent_pid: int) -> None:
    """The sampler's loop: one line per GPU or rank process a second, until the rank that started it is gone."""
    path = node_file(run_dir, host)
    path.parent.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(root_pid=root_pid, started=0.0, gpu_uuids=gpu_uuids)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with path.open("a") as out, node_log(run_dir, host).open("a") as log:
        told = Told(log)
        while not stop and os.getppid() == parent_pid:
            write_samples(sampler, out, host, told)
            time.sleep(SAMPLE_EVERY_S)


@dataclass
class Told:
    """The sampler's log: each distinct trouble written once, with the time, so a failing NVML is one line."""

    out: Any
    said: set[str] = field(default_factory=set)

    def __call__(self, message: str) -> None:
        if message in self.said:
            return
        self.said.add(message)
        self.out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.out.flush()


def write_samples(sampler: Sampler, out, host: str, told: Told) -> int:
    """One round: the sampler's rows as whole JSON lines on `out` (how many), its troubles told instead of raised."""
    try:
        rows = sampler.sample()  # started=0: t_s is the wall-clock time
    except Exception as exc:  # noqa: BLE001 -- one bad sample must not end the sampling
        told(f"sampling failed: {type(exc).__name__}: {exc}")
        return 0
    if sampler.gpu_uuids and sampler.nvml.error:
        told(f"NVML: {sampler.nvml.error}; GPU telemetry is retried after a back-off")
    for source, why in sampler.refused.items():
        told(f"{source}: {why}")
    lines = []
    for row in rows:
        t = row.pop("t_s")
        lines.append(json.dumps({"host": host, "t": t, **row}) + "\n")
    if lines:
        out.write("".join(lines))  # whole lines at once: the reader skips a partial last line
        out.flush()
    return len(lines)


@dataclass
class NodeFilesSampler:
    """The runner's side: rows from every node's telemetry file written since the last call, for storage.

    Each row is {host, source, t_s, util_pct, mem_bytes}, t_s from the run's start (the nodes' clocks are the
    cluster's, kept in step by NTP). Only complete lines are read; a partial last line waits for the next call.
    """

    run_dir: Path
    started: float
    _offsets: dict[str, int] = field(default_factory=dict)

    def sample(self) -> list[dict]:
        rows: list[dict] = []
        folder = Path(self.run_dir) / FOLDER
        try:
            files = sorted(folder.glob("*.jsonl"))
        except OSError:
            return rows
        for path in files:
            offset = self._offsets.get(path.name, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]
            self._offsets[path.name] = offset + len(complete)
            for line in complete.splitlines():
                try:
                    d = json.loads(line)
                    rows.append({"host": str(d["host"])[:128], "source": str(d["source"])[:16],
                                 "t_s": float(d["t"]) - self.started, "util_pct": d.get("util_pct"),
                                 "mem_bytes": d.get("mem_bytes")})  # fmt: skip
                except (ValueError, KeyError, TypeError):
                    continue  # a line damaged by a crash mid-write: skip it, keep the rest
        return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.service.node_telemetry", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--host", required=True)
    parser.add_argument("--root", type=int, required=True, help="this node's torchrun pid")
    parser.add_argument("--gpu-uuid", action="append", default=[], dest="gpu_uuids")
    args = parser.parse_args(argv)
    sample_node(args.run_dir, args.host, args.root, args.gpu_uuids, os.getppid())


if __name__ == "__main__":
    main()
