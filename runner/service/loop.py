"""The runner loop: claim a queued run -> launch -> watch -> ingest -> finalize, one runner per database.

It holds a lease row with a heartbeat (a crashed runner's lease goes stale and another may take
over; each claim checks, in its own transaction, that the lease is still ours), places runs on free
GPUs or CPU slots, tails each job's events.jsonl into storage, samples telemetry, enforces cancel
requests and time limits, and records why a run failed. It starts, polls, cancels and collects jobs
through a launcher (runner.service.launchers: local torchrun, or Slurm); each run records its backend and the
backend's job id, so a restarted runner re-attaches through the same backend. A local run's processes
are torchrun and every rank it started (each in a session of its own); the run keeps its devices until
the last of them is gone. At start and every few seconds it adopts running runs it does not watch
whose processes still live and marks the others `lost`; a stored row it cannot read fails that run,
never the runner. It is the only writer of results; jobs never touch the database. No torch import
here: the app imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback
import uuid
from importlib import metadata
from pathlib import Path

import psutil
from sqlalchemy import Engine

from runner.service.cluster import partition_or_error
from runner.service.gpu_pool import GpuPool
from runner.service.launchers import Launcher, LocalLauncher
from runner.service.logs import cap_run_logs
from runner.service.watched import Watched
from runner.spec.records import RunStatus
from runner.spec.run_spec import RunSpec, SpecError
from runner.spec.validation import validate_spec
from storage import hosts as hosts_db
from storage import runner_rows as rows
from storage.db import runner_stale_s, runs_dir

TELEMETRY_EVERY_S = 1.0
HEARTBEAT_EVERY_S = 1.0
# A Slurm runner re-reads its partition (sinfo) this often and publishes it in its lease: node states change
# on the scale of jobs, and sinfo asks slurmctld, which every runner tick would load for nothing.
CLUSTER_EVERY_S = 30.0
RESCAN_EVERY_S = 5.0  # running rows are re-read this often, so a job no runner watches is adopted
# A claimed run without a pid is being launched (by a runner that may just have lost its lease): its
# devices stay reserved this long before the run counts as lost.
LAUNCH_GRACE_S = 60.0
FINALIZE_ATTEMPTS = 3  # a result that cannot be stored after this many tries fails the run with the reason


class LeaseLost(Exception):
    """Another runner holds this host's lease now (this one was frozen or cut off past the stale limit)."""


class Runner:
    def __init__(self, engine: Engine, max_cpu_jobs: int = 1, poll_s: float = 0.25, launcher: Launcher | None = None,
                 share_gpus: bool | None = None):  # fmt: skip
        self.engine = engine
        # New runs go to `launcher` (local torchrun by default); a run is re-attached through the launcher
        # of the backend it recorded.
        self.launcher: Launcher = launcher or LocalLauncher()
        self.launchers: dict[str, Launcher] = {"local": LocalLauncher(), self.launcher.backend: self.launcher}
        self.max_cpu_jobs = max_cpu_jobs
        self.poll_s = poll_s
        self.host = hosts_db.this_host()
        self.runner_id = f"{self.host[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # The GPUs runs may use: torch's CUDA (probed in a subprocess) intersected with NVML, the inherited
        # CUDA_VISIBLE_DEVICES honoured, MIG refused, other users' GPUs busy (runner/service/devices.py).
        self.pool = GpuPool(share_gpus)
        self.cluster: dict | None = None  # a Slurm runner's partition as published in its lease
        self.cluster_read_at: float | None = None
        self.watched: dict[int, Watched] = {}
        # Runs claimed (by a replaced runner) whose processes are not known yet: run id -> devices reserved.
        self.pending: dict[int, list[int]] = {}
        self.foreign: set[int] = set()  # running runs of a backend this runner has no launcher for (told once)
        self.stop = False
        self.torch_version = _torch_version()

    @property
    def job_entry(self) -> tuple[str, ...]:
        """What torchrun runs per rank in new runs (runner.job; a test may give a script of its own)."""
        return self.launcher.entry

    @job_entry.setter
    def job_entry(self, entry: tuple[str, ...]) -> None:
        self.launcher.entry = tuple(entry)

    def launcher_of(self, job) -> Launcher:
        return self.launchers[job.backend]

    # ---- lifecycle -------------------------------------------------------------------------
    def read_cluster(self) -> dict | None:
        """A Slurm runner's partition read now with sinfo (nodes, CPUs, GPUs, states; or the error sinfo gave),
        as its lease publishes it; None for a runner whose launcher places runs on this machine."""
        partition = getattr(self.launcher, "partition", None)
        if self.launcher.places_locally or not partition:
            return None
        self.cluster_read_at = time.monotonic()
        self.cluster = partition_or_error(partition, getattr(self.launcher, "account", None),
                                          default_nodes=getattr(self.launcher, "nodes", None),
                                          env=getattr(self.launcher, "env", None)).to_dict()  # fmt: skip
        return self.cluster

    def cluster_due(self) -> dict | None:
        """The partition re-read when CLUSTER_EVERY_S has passed since the last read, else None (unchanged)."""
        if self.cluster_read_at is None or time.monotonic() - self.cluster_read_at < CLUSTER_EVERY_S:
            return None
        return self.read_cluster()

    def acquire(self) -> bool:
        """Take the lease; a holder on this host whose process is gone is taken over without waiting."""
        if self.cluster_read_at is None:
            self.read_cluster()
        args = (self.engine, self.runner_id, os.getpid(), self.pool.report.lease_gpus(), self.pool.report.note())
        if hosts_db.acquire_lease(*args, cluster=self.cluster):
            return True
        status = hosts_db.runner_status(self.engine, self.host) or {}
        if status.get("pid") and not _process_runs(status["pid"]):
            return hosts_db.acquire_lease(*args, takeover_from=status["runner_id"], cluster=self.cluster)
        return False

    def serve(self) -> int:
        if not self.acquire():
            status = hosts_db.runner_status(self.engine, self.host) or {}
            print(f"another runner (pid {status.get('pid')}) serves this database for host {self.host}; exiting")
            return 3
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        print(f"runner {self.runner_id} serving {self.engine.url.render_as_string()} as host {self.host} "
              f"({self.pool.report.note()})", flush=True)  # fmt: skip
        if self.cluster is not None:
            print(f"Slurm partition {self.cluster['partition']}: " + (self.cluster["error"] or ", ".join(
                f"{n['name']} ({n['cpus']} CPUs, {n['gpus']} GPUs, {n['state']})" for n in self.cluster["nodes"])),
                flush=True)  # fmt: skip
        last_beat = time.monotonic()
        last_scan: float | None = None
        try:
            while not self.stop:
                now = time.monotonic()
                try:
                    if now - last_beat >= HEARTBEAT_EVERY_S:
                        self.pool.refresh(self.job_pids())  # busy GPUs change as other users come and go
                        if not hosts_db.heartbeat(self.engine, self.runner_id, self.pool.report.lease_gpus()):
                            raise LeaseLost
                        last_beat = now
                        # Right after a heartbeat: a slow sinfo (bounded by SINFO_TIMEOUT_S) delays the next one,
                        # never this one.
                        cluster = self.cluster_due()
                        if cluster is not None:
                            hosts_db.heartbeat(self.engine, self.runner_id, cluster=cluster)
                    if last_scan is None or now - last_scan >= RESCAN_EVERY_S:
                        last_scan = now
                        self.recover()
                    self.tick()
                except LeaseLost:
                    print("lost the runner lease to another runner; exiting", flush=True)
                    return 4
                except Exception:  # a database hiccup or one odd run must not take the runner down
                    traceback.print_exc()
                    sys.stdout.flush()
                    time.sleep(1.0)
                time.sleep(self.poll_s)
        finally:
            # Jobs keep running without us: a restarted runner adopts them.
            try:
                hosts_db.release_lease(self.engine, self.runner_id)
            except Exception:
                traceback.print_exc()
        return 0

    def _on_signal(self, *_args) -> None:
        self.stop = True

    def recover(self) -> None:
        """Take over running runs nobody here watches: adopt those whose processes live, close the rest.

        Runs at start and every RESCAN_EVERY_S. A run whose stored row cannot be read is failed with the
        reason (its processes stopped); one run's trouble never stops the scan or the runner. Only the lease's
        holder scans: a runner frozen past the stale limit may wake up here, and the runs it would find are its
        successor's (LeaseLost; adoption itself checks the lease again in its own transaction).
        """
        if not hosts_db.heartbeat(self.engine, self.runner_id):
            raise LeaseLost
        self.pending.clear()
        for run_id in hosts_db.lose_runs_of_silent_hosts(self.engine, host_lost_s()):
            print(f"run {run_id}: lost (its host stopped reporting)", flush=True)
        hosts_db.explain_runs_for_absent_hosts(self.engine)
        for row in rows.running_runs(self.engine, host=self.host):
            if row["id"] in self.watched:
                continue
            try:
                self._take_over(row)
            except (SpecError, TypeError, ValueError, KeyError, AttributeError) as exc:
                rows.finish_run(self.engine, row["id"], RunStatus.FAILED,
                                error=f"the runner could not read this run's stored row: {exc}")  # fmt: skip
                print(f"run {row['id']}: failed, unreadable row ({exc})", flush=True)

    def _take_over(self, row: dict) -> None:
        run_id, run_dir = row["id"], row["run_dir"]
        backend = row.get("backend") or "local"
        launcher = self.launchers.get(backend)
        if launcher is None:  # a Slurm run seen by a local runner of the same host: said once, left alone
            if run_id not in self.foreign:
                self.foreign.add(run_id)
                print(f"run {run_id}: runs on {backend}, which this runner does not serve; left to a {backend} "
                      "runner", flush=True)  # fmt: skip
            return
        gpus = [int(g) for g in row["gpus"] or []]
        job = launcher.attach(run_id, row)
        alive = bool(run_dir) and bool(job.job_id) and not launcher.poll(job).done
        try:
            spec, unreadable = RunSpec.from_dict(row["spec"]), None
        except SpecError as exc:
            spec, unreadable = RunSpec(), f"its stored spec cannot be read ({exc})"
        started = row["started_at"].timestamp() if row["started_at"] else time.time()
        if alive:
            w = Watched(job, spec, gpus, started, launcher.sampler(job, started, self.pool.uuids(gpus)),
                        events_offset=row["events_offset"] or 0, stored_ranks=len(job.ranks))  # fmt: skip
            if unreadable:  # it cannot be watched against its limits: stop it and say why
                w.stopping, w.stop_reason = RunStatus.FAILED, unreadable + "; its processes were stopped"
            if not rows.adopt_run(self.engine, run_id, self.runner_id):
                if not hosts_db.heartbeat(self.engine, self.runner_id):
                    raise LeaseLost
                return  # it ended meanwhile
            self.watched[run_id] = w
            print(f"run {run_id}: adopted its live job ({backend} job {job.job_id}, ranks {sorted(job.ranks)})",
                  flush=True)  # fmt: skip
        elif unreadable:
            rows.finish_run(self.engine, run_id, RunStatus.FAILED, error=unreadable)
            print(f"run {run_id}: failed, {unreadable}", flush=True)
        elif run_dir and ((Path(run_dir) / "result.json").exists() or (job.job_id and not launcher.places_locally)):
            # It finished while no runner watched: its result is complete, keep it (a scheduler's job also left
            # its exit code, and its logs say why it failed).
            self.watched[run_id] = Watched(job, spec, [], time.time(), launcher.sampler(job, time.time(), []),
                                           events_offset=row["events_offset"] or 0, stored_ranks=len(job.ranks))  # fmt: skip
        elif not job.job_id and time.time() - started < LAUNCH_GRACE_S:
            self.pending[run_id] = gpus  # being launched right now by the runner that claimed it
        else:
            rows.finish_run(
                self.engine, run_id, RunStatus.LOST,
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

    def booked_gpus(self) -> set[int]:
        return {g for w in self.watched.values() for g in w.gpus} | {g for gs in self.pending.values() for g in gs}

    def free_gpus(self) -> list[int]:
        return self.pool.free(self.booked_gpus())

    def job_pids(self) -> set[int]:
        """The processes of the jobs this runner watches (their use of a GPU never makes it busy)."""
        return {pid for w in self.watched.values() for pid in (getattr(w.job, "pid", 0), *getattr(w.job, "ranks", {}))}

    def place_queued(self) -> None:
        # A comparison set runs one run at a time in queue order (round-robin over its specs: storage.runs.
        # insert_set), so every spec meets the same machine: a set's run waits for the set's running run, and
        # for its set's earlier queued runs, whatever keeps those waiting.
        turn = rows.running_sets(self.engine)
        for row in rows.queued_runs(self.engine, host=self.host):
            if (set_id := row.get("set_id")) is not None:
                if set_id in turn:
                    rows.set_wait_reason(self.engine, row["id"], f"waiting for run {turn[set_id]} of its comparison "
                                         "set: a set's runs run one at a time, in turn")  # fmt: skip
                    continue
                turn[set_id] = row["id"]
            try:
                spec = RunSpec.from_dict(row["spec"])
                local = self.launcher.places_locally
                gpu_count = self.pool.count if local else self.launcher.gpu_count(spec)
                problems = validate_spec(spec, gpu_count=gpu_count, check_weights=False,  # weights checked at submit
                                         no_gpu_reason=self.pool.report.no_gpu_reason() if local else None)  # fmt: skip
                problems = problems or self.launcher.problems(spec)
            except SpecError as exc:
                problems = exc.problems
            except Exception as exc:  # a stored row no code path expected: fail that run, serve the others
                problems = [f"its stored spec cannot be read ({type(exc).__name__}: {exc})"]
            if (
                problems
                and row["target_host"] is None
                and any(h["alive"] and h["host"] != self.host for h in hosts_db.hosts(self.engine))
            ):
                # Aimed at any host: another one may have what this one lacks.
                rows.set_wait_reason(self.engine, row["id"], "waiting for a host that can run it (not "
                                     f"{self.host}: {'; '.join(str(p) for p in problems)})"[:200])  # fmt: skip
                continue
            if problems:
                # Queued without knowing this machine's GPUs (no runner was up), or by an older version:
                # it can never run here, so say why instead of letting it wait forever.
                rows.finish_run(self.engine, row["id"], RunStatus.FAILED,
                                error="cannot run on this runner: " + "; ".join(str(p) for p in problems))  # fmt: skip
                continue
            if not self.launcher.places_locally:  # the scheduler places it and queues it meanwhile
                self.launch(row["id"], spec, [], device=spec.resolved_device(gpu_count))
                continue
            want_gpu = spec.resolved_device(self.pool.count) == "cuda"
            if want_gpu:
                free = self.free_gpus()
                if len(free) < spec.world_size:
                    reason = self.pool.wait_reason(spec.world_size, self.booked_gpus())
                    rows.set_wait_reason(self.engine, row["id"], reason[:200])
                    continue
                gpus = free[: spec.world_size]
            else:
                cpu_jobs = sum(1 for w in self.watched.values() if not w.gpus)
                cpu_jobs += sum(1 for gs in self.pending.values() if not gs)
                if cpu_jobs >= self.max_cpu_jobs:
                    rows.set_wait_reason(
                        self.engine, row["id"],
                        f"waiting for a CPU slot ({cpu_jobs} of {self.max_cpu_jobs} CPU jobs running)",
                    )  # fmt: skip
                    continue
                gpus = []
            self.launch(row["id"], spec, gpus)

    def launch(self, run_id: int, spec: RunSpec, gpus: list[int], device: str | None = None) -> None:
        run_dir = runs_dir() / str(run_id)
        launcher = self.launcher
        if not rows.claim_run(self.engine, run_id, self.runner_id, str(run_dir), gpus, require_lease=True,
                              backend=launcher.backend):  # fmt: skip
            return  # cancelled meanwhile, or this runner lost its lease: it launches nothing
        try:
            # A folder already there is stale (SQLite reuses the id of a deleted newest run): ranks append to
            # events.jsonl, so old lines would be read as this run's.
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            # The device the runner placed it on, so 'auto' cannot resolve differently inside the ranks.
            device = device or ("cuda" if gpus else "cpu")
            doc = {**spec.to_dict(), "device": device, "run_id": run_id, "run_dir": str(run_dir)}
            (run_dir / "spec.json").write_text(json.dumps(doc))
            job = launcher.submit(run_id, spec, run_dir, self.pool.uuids(gpus))
        except Exception as exc:  # claimed but not started: the run must not stay 'running' with no process
            rows.finish_run(self.engine, run_id, RunStatus.FAILED, error=f"{launcher.submit_failure}: {exc}")
            return
        started = time.time()
        # Watched before anything else can fail: the job id is stored (again) by watch() until it is.
        self.watched[run_id] = Watched(job, spec, gpus, started, launcher.sampler(job, started, self.pool.uuids(gpus)))
        names = self.pool.names(gpus) or [device if device == "cuda" else "cpu"]
        rows.update_run(self.engine, run_id, **launcher.record(job), torch_version=self.torch_version,
                        device_names=names)  # fmt: skip
        self.watched[run_id].stored_ranks = 0
        where = f"{launcher.backend} job {job.job_id}"
        print(f"run {run_id}: started {spec.strategy} on {len(gpus) or spec.world_size} "
              f"{'GPUs' if device == 'cuda' else 'CPU ranks'} ({where})", flush=True)  # fmt: skip

    def watch(self, run_id: int) -> None:
        w = self.watched[run_id]
        job = w.job
        launcher = self.launcher_of(job)
        w.ingest_events(self.engine, run_id)
        launcher.track(job)
        if len(job.ranks) != w.stored_ranks:
            rows.update_run(self.engine, run_id, **launcher.record(job))
            w.stored_ranks = len(job.ranks)
        state = launcher.poll(job)
        if not state.done:
            now = time.time()
            if state.pending:
                w.started = now  # its time limit counts from when the scheduler starts it
            if now - w.last_sample >= TELEMETRY_EVERY_S:
                w.last_sample = now
                rows.add_telemetry(self.engine, run_id, w.samples(run_id))
                cap_run_logs(job.run_dir)
                w.store_log_tails(self.engine, run_id)
            if w.stopping is None and not w.orphans_stopped:
                if rows.cancel_requested(self.engine, run_id):
                    w.stopping, w.stop_reason = RunStatus.CANCELLED, "cancelled by request"
                elif now - w.started > w.spec.time_limit_s:
                    w.stopping = RunStatus.FAILED
                    w.stop_reason = f"exceeded its time limit of {w.spec.time_limit_s:g} s and was stopped"
                elif state.lingering:
                    # torchrun is gone (killed, crashed) while ranks live on: they can only hold their devices.
                    print(f"run {run_id}: torchrun exited ({state.exit_code}) but ranks still run; stopping them",
                          flush=True)  # fmt: skip
                    w.orphans_stopped = True
            if w.stopping or w.orphans_stopped:
                # SIGTERM on the first call, SIGKILL on a later tick once the backend's grace has passed, so
                # heartbeats and other runs go on meanwhile.
                launcher.cancel(job)
            return
        self.finalize(run_id, w, launcher)

    def finalize(self, run_id: int, w: Watched, launcher: Launcher) -> None:
        """Store the final status, then forget the run (a failure to store keeps it watched for a retry)."""
        w.ingest_events(self.engine, run_id)
        rows.add_telemetry(self.engine, run_id, w.samples(run_id))  # the nodes' last samples (Slurm runs)
        w.store_log_tails(self.engine, run_id)
        collected = launcher.collect(w.job)
        code = collected.exit_code
        status, fields = w.outcome(collected)
        try:
            rows.finish_run(self.engine, run_id, status, **fields)
        except Exception as exc:
            w.finalize_failures += 1
            if w.finalize_failures < FINALIZE_ATTEMPTS:
                raise
            rows.finish_run(self.engine, run_id, RunStatus.FAILED, exit_code=code,
                            error=f"its outcome ({status}) could not be stored: {type(exc).__name__}: {exc}"[:2000])  # fmt: skip
        del self.watched[run_id]
        print(f"run {run_id}: {status} (exit {code})", flush=True)


def host_lost_s() -> float:
    """How long a host's runner may stay silent before its running runs are `lost` (LAB_HOST_LOST_S; default
    four stale limits, at least 2 minutes): long enough for a restart, short enough to see."""
    return float(os.environ.get("LAB_HOST_LOST_S") or max(120.0, 4 * runner_stale_s()))


def _process_runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
