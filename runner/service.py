"""The runner loop: claim a queued run -> launch -> watch -> ingest -> finalize, one runner per database.

It holds a lease row with a heartbeat (a crashed runner's lease goes stale and another may take
over), places runs on free GPUs or CPU slots, tails each job's events.jsonl into storage, samples
telemetry, enforces cancel requests and time limits, and records why a run failed. On start it
adopts runs whose processes still live and marks the others `lost`. It is the only writer of
results; jobs never touch the database. No torch import here: the app imports this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from sqlalchemy import Engine

from runner.launch import REPO_ROOT, Job, group_alive, kill_group, start_job, terminate_group
from runner.logs import cap_run_logs
from runner.spec import RunSpec, SpecError
from runner.telemetry import Sampler, detect_gpus
from storage import queries
from storage.db import database_url, get_engine, lab_home, runs_dir

CANCEL_GRACE_S = 5.0
TELEMETRY_EVERY_S = 1.0
HEARTBEAT_EVERY_S = 1.0


@dataclass
class Watched:
    job: Job
    spec: RunSpec
    gpus: list[int]
    started: float
    sampler: Sampler
    events_offset: int = 0
    stopping: str | None = None  # 'cancelled' or 'failed' once we decided to stop it
    stop_reason: str | None = None
    kill_at: float | None = None  # monotonic time after which a group that ignored SIGTERM gets SIGKILL
    last_sample: float = 0.0
    errors: list[dict] = field(default_factory=list)


class Runner:
    def __init__(self, engine: Engine, max_cpu_jobs: int = 1, poll_s: float = 0.25):
        self.engine = engine
        self.max_cpu_jobs = max_cpu_jobs
        self.poll_s = poll_s
        self.runner_id = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.gpus = detect_gpus()
        self.gpu_note = self.gpus.reason
        self.watched: dict[int, Watched] = {}
        self.stop = False
        self.torch_version = _torch_version()

    # ---- lifecycle -------------------------------------------------------------------------
    def serve(self) -> int:
        if not queries.acquire_lease(self.engine, self.runner_id, os.getpid(), list(self.gpus), self.gpu_note):
            status = queries.runner_status(self.engine) or {}
            print(f"another runner (pid {status.get('pid')} on {status.get('host')}) serves this database; exiting")
            return 3
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        print(f"runner {self.runner_id} serving {self.engine.url.render_as_string()} ({self.gpu_note})", flush=True)
        self.recover()
        last_beat = 0.0
        try:
            while not self.stop:
                now = time.monotonic()
                try:
                    if now - last_beat >= HEARTBEAT_EVERY_S:
                        if not queries.heartbeat(self.engine, self.runner_id, list(self.gpus)):
                            print("lost the runner lease to another runner; exiting", flush=True)
                            return 4
                        last_beat = now
                    self.tick()
                except Exception:  # a database hiccup or one odd run must not take the runner down
                    traceback.print_exc()
                    sys.stdout.flush()
                    time.sleep(1.0)
                time.sleep(self.poll_s)
        finally:
            # Jobs keep running without us: a restarted runner adopts them.
            queries.release_lease(self.engine, self.runner_id)
        return 0

    def _on_signal(self, *_args) -> None:
        self.stop = True

    def recover(self) -> None:
        """Adopt running runs whose process group lives; the rest are `lost`."""
        for row in queries.running_runs(self.engine):
            pid, run_dir = row["pid"], row["run_dir"]
            if pid and run_dir and group_alive(pid):
                spec = RunSpec.from_dict(row["spec"])
                started = row["started_at"].timestamp() if row["started_at"] else time.time()
                job = Job(run_id=row["id"], pid=pid, run_dir=Path(run_dir))
                self.watched[row["id"]] = Watched(
                    job, spec, list(row["gpus"] or []), started, Sampler(pid, started, list(row["gpus"] or [])),
                    events_offset=row["events_offset"] or 0,
                )  # fmt: skip
                print(f"run {row['id']}: adopted its live processes (pgid {pid})", flush=True)
            elif run_dir and (Path(run_dir) / "result.json").exists():
                # It finished while no runner watched: its result is complete, keep it.
                self.watched[row["id"]] = Watched(
                    Job(row["id"], pid or 0, Path(run_dir)), RunSpec.from_dict(row["spec"]), [], time.time(),
                    Sampler(pid or 0, time.time()), events_offset=row["events_offset"] or 0,
                )  # fmt: skip
            else:
                queries.finish_run(
                    self.engine, row["id"], "lost",
                    error="its processes vanished while no runner was watching (runner or machine restarted)",
                )  # fmt: skip
                print(f"run {row['id']}: lost", flush=True)

    # ---- one pass of the loop ----------------------------------------------------------------
    def tick(self) -> None:
        for run_id in list(self.watched):
            self.watch(run_id)
        self.place_queued()

    def free_gpus(self) -> list[int]:
        busy = {g for w in self.watched.values() for g in w.gpus}
        return [g["index"] for g in self.gpus if g["index"] not in busy]

    def place_queued(self) -> None:
        for row in queries.queued_runs(self.engine):
            try:
                spec = RunSpec.from_dict(row["spec"])
                problems = spec.validate(gpu_count=len(self.gpus), check_weights=False)  # checked at submit
            except SpecError as exc:
                problems = exc.problems
            if problems:
                # Queued without knowing this machine's GPUs (no runner was up), or by an older version:
                # it can never run here, so say why instead of letting it wait forever.
                queries.finish_run(self.engine, row["id"], "failed",
                                   error="cannot run on this runner: " + "; ".join(str(p) for p in problems))  # fmt: skip
                continue
            want_gpu = spec.resolved_device(len(self.gpus)) == "cuda"
            if want_gpu:
                free = self.free_gpus()
                if len(free) < spec.world_size:
                    queries.set_wait_reason(
                        self.engine, row["id"], f"waiting for {spec.world_size} free GPUs ({len(free)} free now)"
                    )
                    continue
                gpus = free[: spec.world_size]
            else:
                cpu_jobs = sum(1 for w in self.watched.values() if not w.gpus)
                if cpu_jobs >= self.max_cpu_jobs:
                    queries.set_wait_reason(
                        self.engine, row["id"],
                        f"waiting for a CPU slot ({cpu_jobs} of {self.max_cpu_jobs} CPU jobs running)",
                    )  # fmt: skip
                    continue
                gpus = []
            self.launch(row["id"], spec, gpus)

    def launch(self, run_id: int, spec: RunSpec, gpus: list[int]) -> None:
        run_dir = runs_dir() / str(run_id)
        if not queries.claim_run(self.engine, run_id, self.runner_id, str(run_dir), gpus):
            return  # cancelled meanwhile, or another runner (should not exist) won
        # A folder already there is stale (SQLite reuses the id of a deleted newest run): ranks append to
        # events.jsonl, so old lines would be read as this run's.
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        # The device the runner placed it on, so 'auto' cannot resolve differently inside the ranks.
        device = "cuda" if gpus else "cpu"
        doc = {**spec.to_dict(), "device": device, "run_id": run_id, "run_dir": str(run_dir)}
        (run_dir / "spec.json").write_text(json.dumps(doc))
        try:
            job = start_job(run_id, spec, run_dir, gpus)
        except OSError as exc:
            queries.finish_run(self.engine, run_id, "failed", error=f"could not start torchrun: {exc}")
            return
        started = time.time()
        queries.update_run(self.engine, run_id, pid=job.pid, torch_version=self.torch_version,
                           device_names=[g["name"] for g in self.gpus if g["index"] in gpus] or ["cpu"])  # fmt: skip
        self.watched[run_id] = Watched(job, spec, gpus, started, Sampler(job.pid, started, gpus))
        print(f"run {run_id}: started {spec.strategy} on {len(gpus) or spec.world_size} {'GPUs' if gpus else 'CPU ranks'}",
              flush=True)  # fmt: skip

    def watch(self, run_id: int) -> None:
        w = self.watched[run_id]
        self.ingest_events(run_id, w)
        code = w.job.returncode()
        if code is None:
            now = time.time()
            if now - w.last_sample >= TELEMETRY_EVERY_S:
                w.last_sample = now
                queries.add_telemetry(self.engine, run_id, w.sampler.sample())
                cap_run_logs(w.job.run_dir)
            if w.stopping is None:
                if queries.cancel_requested(self.engine, run_id):
                    w.stopping, w.stop_reason = "cancelled", "cancelled by request"
                elif now - w.started > w.spec.time_limit_s:
                    w.stopping = "failed"
                    w.stop_reason = f"exceeded its time limit of {w.spec.time_limit_s:g} s and was stopped"
                if w.stopping:
                    # SIGTERM now, SIGKILL on a later tick: the loop never blocks, so heartbeats and
                    # other runs go on during the grace period.
                    terminate_group(w.job.pid)
                    w.kill_at = time.monotonic() + CANCEL_GRACE_S
            elif w.kill_at is not None and time.monotonic() >= w.kill_at:
                kill_group(w.job.pid)
                w.kill_at = time.monotonic() + CANCEL_GRACE_S  # again later if something is still left
            return
        if w.stopping:
            kill_group(w.job.pid)  # torchrun is gone; take any rank that outlived it along
        self.finalize(run_id, w, code)

    def ingest_events(self, run_id: int, w: Watched) -> None:
        """Read the new complete lines of events.jsonl since the stored offset."""
        path = w.job.run_dir / "events.jsonl"
        if not path.exists():
            return
        with path.open("rb") as f:
            f.seek(w.events_offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        steps, spans, progress = [], [], None
        for line in chunk[: end + 1].splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = e.get("kind")
            if kind == "step":
                steps.append({"step": e["step"], "warmup": bool(e.get("warmup")), "step_time_s": e["step_time_s"],
                              "loss": e.get("loss"), "t": e["t"]})  # fmt: skip
                progress = e["step"] + 1
            elif kind == "span":
                spans.append({k: e[k] for k in ("step", "rank", "stage", "microbatch", "phase", "start", "end")})
            elif kind == "error":
                w.errors.append(e)
        w.events_offset += end + 1
        queries.add_step_metrics(self.engine, run_id, steps)
        queries.add_spans(self.engine, run_id, spans)
        values = {"events_offset": w.events_offset}
        if progress is not None:
            values["progress_step"] = progress
        queries.update_run(self.engine, run_id, **values)

    def finalize(self, run_id: int, w: Watched, code: int) -> None:
        self.ingest_events(run_id, w)
        del self.watched[run_id]
        result_path = w.job.run_dir / "result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        if w.stopping == "cancelled":
            queries.finish_run(self.engine, run_id, "cancelled", result=None, error=w.stop_reason, exit_code=code)
        elif w.stopping == "failed":
            queries.finish_run(self.engine, run_id, "failed", error=w.stop_reason, exit_code=code)
        elif result is not None and code in (0, -1):
            queries.finish_run(self.engine, run_id, "succeeded", result=result, exit_code=0)
        else:
            failed_rank, error, tb = diagnose_failure(w.job.run_dir, w.errors)
            queries.finish_run(self.engine, run_id, "failed", error=error, traceback=tb, exit_code=code,
                               failed_rank=failed_rank)  # fmt: skip
        print(f"run {run_id}: finished (exit {code})", flush=True)


_TORCHRUN_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


_CONSEQUENCES = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe")


def diagnose_failure(run_dir: Path, errors: list[dict]) -> tuple[int | None, str, str | None]:
    """(failing rank, one-line error, first traceback of that rank) from torchrun.log, events and rank logs.

    When one rank dies, its peers fail too (a closed connection, a collective timeout) and torchrun
    stops the rest with SIGTERM; the root cause is, in order: torchrun's root-cause rank when a signal
    killed it, a rank that raised something other than such a consequence, then any rank that raised,
    then the rank torchrun reports first.
    """
    log = (run_dir / "torchrun.log").read_text(errors="replace") if (run_dir / "torchrun.log").exists() else ""
    # torchrun names the first observed failure under "Root Cause" and lists the others it saw; the ranks
    # it stopped itself got SIGTERM. When several are observed at once the root cause can be a peer that
    # merely lost its connection, so a rank killed by any other signal is the cause wherever it is listed.
    root = log[log.find("Root Cause") :] if "Root Cause" in log else log
    exits = [(int(m.group(1)), int(m.group(2))) for m in _TORCHRUN_FAILURE.finditer(root)]
    every = [(int(m.group(1)), int(m.group(2))) for m in _TORCHRUN_FAILURE.finditer(log)]
    killed = [(r, c) for r, c in exits if c < 0 and c != -signal.SIGTERM]
    killed += [(r, c) for r, c in every if c < 0 and c != -signal.SIGTERM]
    killed += [(r, c) for r, c in exits if c < 0]
    if killed:
        rank, code = killed[0]
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else "?"
        return rank, f"rank {rank} was killed by signal {-code} ({name})", first_traceback(run_dir / f"rank{rank}.log")
    ordered = sorted(errors, key=lambda e: e.get("t", 0))
    causes = [e for e in ordered if not any(c in e.get("error", "") for c in _CONSEQUENCES)]
    if causes:
        first = causes[0]
        return _raised(first)
    silent = [(r, c) for r, c in every if r not in {e["rank"] for e in errors}]
    if ordered and silent:  # the others only lost their peer: the rank that died without a word is the cause
        rank, code = silent[0]
        return (
            rank,
            f"rank {rank} exited with code {code} without an error",
            first_traceback(run_dir / f"rank{rank}.log"),
        )
    if ordered:
        first = ordered[0]
        return _raised(first)
    if exits:
        rank, code = exits[0]
        return rank, f"rank {rank} exited with code {code}", first_traceback(run_dir / f"rank{rank}.log")
    for path in sorted(run_dir.glob("rank*.log")):
        tb = first_traceback(path)
        if tb:
            rank = int(path.stem.removeprefix("rank"))
            return rank, f"rank {rank} failed: {tb.strip().splitlines()[-1]}", tb
    tail = log.strip().splitlines()[-1] if log.strip() else "torchrun exited without a result"
    return None, tail[:500], None


def _raised(event: dict) -> tuple[int, str, str | None]:
    return event["rank"], f"rank {event['rank']} raised {event.get('error', 'an exception')}", event.get("traceback")


def first_traceback(path: Path) -> str | None:
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    start = text.find("Traceback (most recent call last)")
    if start < 0:
        return None
    lines = text[start:].splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        out.append(line)
        if line and not line.startswith((" ", "\t", "Traceback", "During handling", "The above")):
            break  # the exception line closes the traceback
    return "\n".join(out)


def _torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def ensure_runner(db_url: str | None = None) -> bool:
    """Start `python -m runner serve` for the database unless a live runner already serves it.

    Returns True when a runner was started now. The runner is its own process session, so it
    outlives the app; a second one started by a race exits at once (the lease decides).
    """
    url = db_url or database_url()
    status = queries.runner_status(get_engine(url))
    if status and status["alive"]:
        return False
    env = dict(os.environ)
    env["LAB_DB_URL"] = url
    env["LAB_HOME"] = str(lab_home())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(lab_home() / "runner.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "runner", "serve"],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return True


def wait_for_runner(engine: Engine, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = queries.runner_status(engine)
        if status and status["alive"]:
            return True
        time.sleep(0.2)
    return False
