"""The runner loop: claim a queued run -> launch -> watch -> ingest -> finalize, one runner per database.

It holds a lease row with a heartbeat (a crashed runner's lease goes stale and another may take
over; each claim checks, in its own transaction, that the lease is still ours), places runs on free
GPUs or CPU slots, tails each job's events.jsonl into storage, samples telemetry, enforces cancel
requests and time limits, and records why a run failed. A run's processes are torchrun and every
rank it started (each in a session of its own, see runner.launch); the run keeps its devices until
the last of them is gone. At start and every few seconds it adopts running runs it does not watch
whose processes still live and marks the others `lost`; a stored row it cannot read fails that run,
never the runner. It is the only writer of results; jobs never touch the database. No torch import
here: the app imports this module.
"""

from __future__ import annotations

import json
import math
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

import psutil
from sqlalchemy import Engine

from runner.launch import (
    JOB_ENTRY,
    REPO_ROOT,
    TORCHRUN_SHUTDOWN_S,
    Job,
    kill_group,
    ranks_from_doc,
    start_job,
    terminate_group,
)
from runner.logs import cap_run_logs
from runner.spec import RunSpec, SpecError
from runner.telemetry import Sampler, detect_gpus
from storage import queries
from storage.db import database_url, get_engine, lab_home, runs_dir

# SIGKILL only after torchrun had its own grace to stop its ranks (it SIGKILLs them after TORCHRUN_SHUTDOWN_S).
CANCEL_GRACE_S = TORCHRUN_SHUTDOWN_S + 5.0
ORPHAN_GRACE_S = 5.0  # ranks left after torchrun exited: SIGTERM, then SIGKILL this much later
TELEMETRY_EVERY_S = 1.0
HEARTBEAT_EVERY_S = 1.0
RESCAN_EVERY_S = 5.0  # running rows are re-read this often, so a job no runner watches is adopted
# A claimed run without a pid is being launched (by a runner that may just have lost its lease): its
# devices stay reserved this long before the run counts as lost.
LAUNCH_GRACE_S = 60.0
FINALIZE_ATTEMPTS = 3
LOG_TAIL_BYTES = (
    64 * 1024
)  # the latest part of each log kept in the database, for members on other machines  # a result that cannot be stored after this many tries fails the run with the reason


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
    kill_at: float | None = None  # monotonic time after which processes that ignored SIGTERM get SIGKILL
    last_sample: float = 0.0
    errors: list[dict] = field(default_factory=list)
    diverged: str | None = None  # "loss became NaN at step 3" once a step reported a non-finite loss
    orphans_stopped: bool = False  # torchrun exited while ranks lived on, and they were told to stop
    stored_ranks: int = -1  # how many rank pids storage holds (-1: pid not stored yet)
    finalize_failures: int = 0
    log_sizes: dict[str, int] = field(default_factory=dict)  # log name -> size when its tail was last stored


class Runner:
    def __init__(self, engine: Engine, max_cpu_jobs: int = 1, poll_s: float = 0.25):
        self.engine = engine
        self.max_cpu_jobs = max_cpu_jobs
        self.poll_s = poll_s
        self.host = queries.this_host()
        self.runner_id = f"{self.host[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.gpus = detect_gpus()
        self.gpu_note = self.gpus.reason
        self.watched: dict[int, Watched] = {}
        # Runs claimed (by a replaced runner) whose processes are not known yet: run id -> devices reserved.
        self.pending: dict[int, list[int]] = {}
        self.job_entry: tuple[str, ...] = JOB_ENTRY
        self.stop = False
        self.torch_version = _torch_version()

    # ---- lifecycle -------------------------------------------------------------------------
    def acquire(self) -> bool:
        """Take the lease; a holder on this host whose process is gone is taken over without waiting."""
        args = (self.engine, self.runner_id, os.getpid(), list(self.gpus), self.gpu_note)
        if queries.acquire_lease(*args):
            return True
        status = queries.runner_status(self.engine, self.host) or {}
        if status.get("pid") and not _process_runs(status["pid"]):
            return queries.acquire_lease(*args, takeover_from=status["runner_id"])
        return False

    def serve(self) -> int:
        if not self.acquire():
            status = queries.runner_status(self.engine, self.host) or {}
            print(f"another runner (pid {status.get('pid')}) serves this database for host {self.host}; exiting")
            return 3
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        print(f"runner {self.runner_id} serving {self.engine.url.render_as_string()} as host {self.host} "
              f"({self.gpu_note})", flush=True)  # fmt: skip
        last_beat = time.monotonic()
        last_scan: float | None = None
        try:
            while not self.stop:
                now = time.monotonic()
                try:
                    if now - last_beat >= HEARTBEAT_EVERY_S:
                        if not queries.heartbeat(self.engine, self.runner_id, list(self.gpus)):
                            print("lost the runner lease to another runner; exiting", flush=True)
                            return 4
                        last_beat = now
                    if last_scan is None or now - last_scan >= RESCAN_EVERY_S:
                        last_scan = now
                        self.recover()
                    self.tick()
                except Exception:  # a database hiccup or one odd run must not take the runner down
                    traceback.print_exc()
                    sys.stdout.flush()
                    time.sleep(1.0)
                time.sleep(self.poll_s)
        finally:
            # Jobs keep running without us: a restarted runner adopts them.
            try:
                queries.release_lease(self.engine, self.runner_id)
            except Exception:
                traceback.print_exc()
        return 0

    def _on_signal(self, *_args) -> None:
        self.stop = True

    def recover(self) -> None:
        """Take over running runs nobody here watches: adopt those whose processes live, close the rest.

        Runs at start and every RESCAN_EVERY_S. A run whose stored row cannot be read is failed with the
        reason (its processes stopped); one run's trouble never stops the scan or the runner.
        """
        self.pending.clear()
        for run_id in queries.lose_runs_of_silent_hosts(self.engine, host_lost_s()):
            print(f"run {run_id}: lost (its host stopped reporting)", flush=True)
        queries.explain_runs_for_absent_hosts(self.engine)
        for row in queries.running_runs(self.engine, host=self.host):
            if row["id"] in self.watched:
                continue
            try:
                self._take_over(row)
            except (SpecError, TypeError, ValueError, KeyError, AttributeError) as exc:
                queries.finish_run(self.engine, row["id"], "failed",
                                   error=f"the runner could not read this run's stored row: {exc}")  # fmt: skip
                print(f"run {row['id']}: failed, unreadable row ({exc})", flush=True)

    def _take_over(self, row: dict) -> None:
        run_id, pid, run_dir = row["id"], row["pid"], row["run_dir"]
        gpus = [int(g) for g in row["gpus"] or []]
        job = Job(run_id=run_id, pid=pid or 0, run_dir=Path(run_dir or "."), ranks=ranks_from_doc(row["rank_pids"]))
        alive = bool(run_dir) and bool(pid) and job.alive()
        try:
            spec, unreadable = RunSpec.from_dict(row["spec"]), None
        except SpecError as exc:
            spec, unreadable = RunSpec(), f"its stored spec cannot be read ({exc})"
        started = row["started_at"].timestamp() if row["started_at"] else time.time()
        if alive:
            w = Watched(job, spec, gpus, started, Sampler(pid, started, gpus), events_offset=row["events_offset"] or 0,
                        stored_ranks=len(job.ranks))  # fmt: skip
            if unreadable:  # it cannot be watched against its limits: stop it and say why
                w.stopping, w.stop_reason = "failed", unreadable + "; its processes were stopped"
            self.watched[run_id] = w
            queries.update_run(self.engine, run_id, runner_id=self.runner_id)
            print(f"run {run_id}: adopted its live processes (torchrun pid {pid}, ranks {sorted(job.ranks)})",
                  flush=True)  # fmt: skip
        elif unreadable:
            queries.finish_run(self.engine, run_id, "failed", error=unreadable)
            print(f"run {run_id}: failed, {unreadable}", flush=True)
        elif run_dir and (Path(run_dir) / "result.json").exists():
            # It finished while no runner watched: its result is complete, keep it.
            self.watched[run_id] = Watched(job, spec, [], time.time(), Sampler(pid or 0, time.time()),
                                           events_offset=row["events_offset"] or 0, stored_ranks=len(job.ranks))  # fmt: skip
        elif not pid and time.time() - started < LAUNCH_GRACE_S:
            self.pending[run_id] = gpus  # being launched right now by the runner that claimed it
        else:
            queries.finish_run(
                self.engine, run_id, "lost",
                error="its processes vanished while no runner was watching (runner or machine restarted)",
            )  # fmt: skip
            print(f"run {run_id}: lost", flush=True)

    # ---- one pass of the loop ----------------------------------------------------------------
    def tick(self) -> None:
        for run_id in list(self.watched):
            try:
                self.watch(run_id)
            except Exception:  # one run's trouble (say, a result that cannot be stored) must not stall the rest
                traceback.print_exc()
                sys.stdout.flush()
        self.place_queued()

    def free_gpus(self) -> list[int]:
        busy = {g for w in self.watched.values() for g in w.gpus} | {g for gs in self.pending.values() for g in gs}
        return [g["index"] for g in self.gpus if g["index"] not in busy]

    def place_queued(self) -> None:
        for row in queries.queued_runs(self.engine, host=self.host):
            try:
                spec = RunSpec.from_dict(row["spec"])
                problems = spec.validate(gpu_count=len(self.gpus), check_weights=False)  # checked at submit
            except SpecError as exc:
                problems = exc.problems
            except Exception as exc:  # a stored row no code path expected: fail that run, serve the others
                problems = [f"its stored spec cannot be read ({type(exc).__name__}: {exc})"]
            if (
                problems
                and row["target_host"] is None
                and any(h["alive"] and h["host"] != self.host for h in queries.hosts(self.engine))
            ):
                # Aimed at any host: another one may have what this one lacks.
                queries.set_wait_reason(self.engine, row["id"], "waiting for a host that can run it (not "
                                        f"{self.host}: {'; '.join(str(p) for p in problems)})"[:200])  # fmt: skip
                continue
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
                cpu_jobs += sum(1 for gs in self.pending.values() if not gs)
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
        if not queries.claim_run(self.engine, run_id, self.runner_id, str(run_dir), gpus, require_lease=True):
            return  # cancelled meanwhile, or this runner lost its lease: it launches nothing
        try:
            # A folder already there is stale (SQLite reuses the id of a deleted newest run): ranks append to
            # events.jsonl, so old lines would be read as this run's.
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            # The device the runner placed it on, so 'auto' cannot resolve differently inside the ranks.
            device = "cuda" if gpus else "cpu"
            doc = {**spec.to_dict(), "device": device, "run_id": run_id, "run_dir": str(run_dir)}
            (run_dir / "spec.json").write_text(json.dumps(doc))
            job = start_job(run_id, spec, run_dir, gpus, entry=self.job_entry)
        except Exception as exc:  # claimed but not started: the run must not stay 'running' with no process
            queries.finish_run(self.engine, run_id, "failed", error=f"could not start torchrun: {exc}")
            return
        started = time.time()
        # Watched before anything else can fail: the pid is stored (again) by watch() until it is.
        self.watched[run_id] = Watched(job, spec, gpus, started, Sampler(job.pid, started, gpus))
        queries.update_run(self.engine, run_id, pid=job.pid, torch_version=self.torch_version,
                           device_names=[g["name"] for g in self.gpus if g["index"] in gpus] or ["cpu"])  # fmt: skip
        self.watched[run_id].stored_ranks = 0
        print(f"run {run_id}: started {spec.strategy} on {len(gpus) or spec.world_size} {'GPUs' if gpus else 'CPU ranks'}",
              flush=True)  # fmt: skip

    def watch(self, run_id: int) -> None:
        w = self.watched[run_id]
        job = w.job
        self.ingest_events(run_id, w)
        job.discover_ranks()
        if len(job.ranks) != w.stored_ranks:
            queries.update_run(self.engine, run_id, pid=job.pid, rank_pids=job.rank_pids_doc())
            w.stored_ranks = len(job.ranks)
        code = job.returncode()
        lingering = job.live_ranks()
        if code is None or lingering:
            now = time.time()
            if now - w.last_sample >= TELEMETRY_EVERY_S:
                w.last_sample = now
                queries.add_telemetry(self.engine, run_id, w.sampler.sample())
                cap_run_logs(job.run_dir)
                self.store_log_tails(run_id, w)
            if w.stopping is None and not w.orphans_stopped:
                if queries.cancel_requested(self.engine, run_id):
                    w.stopping, w.stop_reason = "cancelled", "cancelled by request"
                elif now - w.started > w.spec.time_limit_s:
                    w.stopping = "failed"
                    w.stop_reason = f"exceeded its time limit of {w.spec.time_limit_s:g} s and was stopped"
                elif code is not None:
                    # torchrun is gone (killed, crashed) while ranks live on: they can only hold their devices.
                    print(f"run {run_id}: torchrun exited ({code}) but ranks {lingering} still run; stopping them",
                          flush=True)  # fmt: skip
                    w.orphans_stopped = True
                    job.signal_ranks(signal.SIGTERM)
                    w.kill_at = time.monotonic() + ORPHAN_GRACE_S
            if w.stopping and w.kill_at is None:
                # SIGTERM to torchrun (which stops its ranks, SIGKILL after its own grace) and to every rank
                # (each in its own session, out of torchrun's group); our SIGKILL comes on a later tick,
                # so heartbeats and other runs go on meanwhile.
                if code is None:
                    terminate_group(job.pid)
                job.signal_ranks(signal.SIGTERM)
                w.kill_at = time.monotonic() + CANCEL_GRACE_S
            elif w.kill_at is not None and time.monotonic() >= w.kill_at:
                if code is None:
                    kill_group(job.pid)
                job.signal_ranks(signal.SIGKILL)
                w.kill_at = time.monotonic() + ORPHAN_GRACE_S  # again later if something is still left
            return
        if w.stopping:
            kill_group(job.pid)  # torchrun is gone; take anything left in its group along
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
                kind = e.get("kind")
                if kind == "step":
                    loss = e.get("loss")
                    row = {"step": int(e["step"]), "warmup": bool(e.get("warmup")),
                           "step_time_s": _finite(e["step_time_s"]), "loss": loss, "t": _finite(e["t"])}  # fmt: skip
                    steps.append(row)
                    progress = int(e["step"]) + 1
                    if isinstance(loss, float) and not math.isfinite(loss) and w.diverged is None:
                        # The step as the rank logs print it ("step 3/5"), counting from 1.
                        w.diverged = f"loss became {_number_name(loss)} at step {int(e['step']) + 1}"
                elif kind == "span":
                    span = {k: e[k] for k in ("step", "rank", "stage", "microbatch", "phase", "start", "end")}
                    span["start"], span["end"] = _finite(span["start"]), _finite(span["end"])
                    spans.append(span)
                elif kind == "error":
                    w.errors.append(e)
                elif kind == "started" and e.get("pid"):
                    w.job.add_rank(int(e["pid"]), float(e.get("t") or time.time()))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # a line no rank of ours wrote in this shape: not a reason to stop reading
        w.events_offset += end + 1
        queries.add_step_metrics(self.engine, run_id, steps)
        queries.add_spans(self.engine, run_id, spans)
        values = {"events_offset": w.events_offset}
        if progress is not None:
            values["progress_step"] = progress
        queries.update_run(self.engine, run_id, **values)

    def store_log_tails(self, run_id: int, w: Watched) -> None:
        """The latest LOG_TAIL_BYTES of each log that grew, into the database (teammates read them there)."""
        for path in [w.job.run_dir / "torchrun.log", *sorted(w.job.run_dir.glob("rank*.log"))]:
            try:
                size = path.stat().st_size
                if w.log_sizes.get(path.stem) == size:
                    continue
                with path.open("rb") as f:
                    f.seek(max(0, size - LOG_TAIL_BYTES))
                    tail = f.read(LOG_TAIL_BYTES)
            except OSError:
                continue
            if size > LOG_TAIL_BYTES:
                tail = tail[tail.find(b"\n") + 1 :]  # start at a whole line
            queries.store_log_tail(self.engine, run_id, path.stem, tail.decode(errors="replace").replace("\x00", ""),
                                   size)  # fmt: skip
            w.log_sizes[path.stem] = size

    def outcome(self, w: Watched, code: int) -> tuple[str, dict]:
        """The terminal status and stored fields for a job whose every process is gone."""
        result_path = w.job.run_dir / "result.json"
        result, unreadable = None, None
        if result_path.exists():
            try:
                result = json.loads(result_path.read_text())
                if not isinstance(result, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                result, unreadable = None, f"its result.json cannot be read ({exc})"
        if w.stopping == "cancelled":
            return "cancelled", dict(result=None, error=w.stop_reason, exit_code=code)
        if w.stopping == "failed":
            return "failed", dict(error=w.stop_reason, exit_code=code)
        if result is not None and code in (0, -1):
            loss = result.get("loss")
            diverged = w.diverged
            if diverged is None and isinstance(loss, float) and not math.isfinite(loss):
                diverged = f"loss became {_number_name(loss)} by the last step"
            if diverged:
                # The timings are real, so the result is kept; the run still did not train.
                return "failed", dict(result=result, exit_code=0,
                                      error=f"{diverged}: training diverged (try a smaller learning rate)")  # fmt: skip
            return "succeeded", dict(result=result, exit_code=0)
        if unreadable and code in (0, -1):
            return "failed", dict(error=unreadable, exit_code=code)
        failed_rank, error, tb = diagnose_failure(w.job.run_dir, w.errors)
        if w.orphans_stopped:
            error = f"torchrun ended (exit {code}) while ranks still ran; the runner stopped them ({error})"
        if w.diverged:
            error = f"{error} (after its {w.diverged})"
        return "failed", dict(error=error, traceback=tb, exit_code=code, failed_rank=failed_rank)

    def finalize(self, run_id: int, w: Watched, code: int) -> None:
        """Store the final status, then forget the run (a failure to store keeps it watched for a retry)."""
        self.ingest_events(run_id, w)
        self.store_log_tails(run_id, w)
        status, fields = self.outcome(w, code)
        try:
            queries.finish_run(self.engine, run_id, status, **fields)
        except Exception as exc:
            w.finalize_failures += 1
            if w.finalize_failures < FINALIZE_ATTEMPTS:
                raise
            queries.finish_run(self.engine, run_id, "failed", exit_code=code,
                               error=f"its outcome ({status}) could not be stored: {type(exc).__name__}: {exc}"[:2000])  # fmt: skip
        del self.watched[run_id]
        print(f"run {run_id}: {status} (exit {code})", flush=True)


def host_lost_s() -> float:
    """How long a host's runner may stay silent before its running runs are `lost` (LAB_HOST_LOST_S; default
    four stale limits, at least 2 minutes): long enough for a restart, short enough to see."""
    return float(os.environ.get("LAB_HOST_LOST_S") or max(120.0, 4 * queries.runner_stale_s()))


def _finite(value) -> float:
    """A number a column cannot hold empty; ValueError (the line is skipped) when it is not a finite number."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value}")
    return number


def _number_name(x: float) -> str:
    return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _process_runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


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
