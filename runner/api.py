"""The one module the pages and the CLI call to change or read runs; storage below it only stores.

Changing runs: `submit` parses and validates a spec against the target host's GPUs (its runner's lease; for
this machine without a live runner, a cuda spec is checked against this machine's devices as the runner would
see them, runner.service.device_probe, so it is refused with the reason before queueing), or on a Slurm
runner's partition against its nodes and layout rules (runner.service.cluster; the weights file it names is
read and checked here too) and only then stores it, so a refused spec stores nothing and
its SpecError lists every problem by field; `submit_set` queues K runs of several specs as one comparison set
(interleaved), `repeat_runs` K more of stored runs' specs; `cancel`, `update_meta` and `delete` change a stored run;
`submit_selftest` and `submit_converge` queue the self-test's and the convergence check's runs through
`submit`. Reading runs: `get_run` (one read of the run and its ranks, with its stored `world_size`),
`list_runs` / `count_runs` / `filter_values` with a RunFilter, the measured series the pages chart, `hosts` and
`runner_status`, `export_csv` /
`export_runs`. Logs: `log` reads one log of a run through the one log reader (runner.service.logs): the run
folder when this machine ran it, else the tail its host stored in the database; `follow` streams it. This
host for the planner: `host_calibration`, `calibrate_host` (runner/planner/calibrate.py), `this_host_devices`.

Torch-free: the app imports it. Every function takes the engine first; nothing holds a session.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine

from runner.analysis.same_work import work_differences
from runner.service import logs as log_reader
from runner.service.device_probe import detect_devices
from runner.service.launchers.slurm import SCRIPT_NAME
from runner.service.logs import LogText
from runner.service.targets import HOST_GPUS, problems_on_target, target_gpus, target_partition, target_problems
from runner.spec.converge_layouts import CONVERGE_TAG, DEFAULTS, converge_specs
from runner.spec.records import RunStatus
from runner.spec.run_spec import RunSpec, SpecError, SpecProblem
from runner.spec.selftest_layouts import selftest_specs
from runner.spec.validation import validate_spec
from storage import hosts as host_rows
from storage import runs, series
from storage.db import runs_dir
from storage.hosts import ANY_HOST  # run_on= for "whichever host first has the devices"
from storage.runs import RunFilter

FILTER_COLUMNS = ("status", "strategy", "model", "workload", "user")  # the columns filter_values answers for

__all__ = [
    "ANY_HOST", "HOST_GPUS", "BestRuns", "LogText", "RunFilter", "SpecError", "active_runs", "best_runs", "cancel",
    "count_runs", "default_user", "delete", "ensure_runner", "export_csv", "export_runs", "filter_values",
    "follow", "get_run", "hosts", "is_terminal", "list_runs", "log", "log_tails", "loss_curves", "parse_spec",
    "rank_results", "repeat_problem", "repeat_runs", "runner_status", "step_metrics", "submit", "submit_converge", "submit_selftest",
    "submit_set", "target_gpus", "target_partition", "target_problems", "telemetry_series",
    "this_host", "this_host_gpus", "timeline_spans", "torchrun_command", "update_meta", "wait_for_runner",
]  # fmt: skip


def this_host() -> str:
    """This machine's name in the database: LAB_HOST, else the host name."""
    return host_rows.this_host()


def default_user() -> str:
    """Who launches when nobody says: the OS user."""
    return runs.default_user()


def ensure_runner() -> bool:
    """Start this machine's runner (`python -m runner serve`) unless a live one serves the database; True
    when one was started now. It is its own process session: it outlives the app and the CLI."""
    from runner.service.supervisor import ensure_runner as start

    return start()


def wait_for_runner(engine: Engine, timeout_s: float = 30.0) -> bool:
    """Wait until this machine's runner reports alive; False after `timeout_s`."""
    from runner.service.supervisor import wait_for_runner as wait

    return wait(engine, timeout_s)


def is_terminal(status: str) -> bool:
    """Whether a run in `status` has ended (succeeded, failed, cancelled, lost)."""
    return RunStatus(status).is_terminal


# ---- changing runs --------------------------------------------------------------------------
def parse_spec(data: RunSpec | Mapping[str, Any]) -> RunSpec:
    """A RunSpec from a spec or a field: value mapping; SpecError naming every malformed field (or saying
    that `data` is no mapping at all)."""
    if isinstance(data, RunSpec):
        return data
    return RunSpec.from_dict(dict(data) if isinstance(data, Mapping) else data)


def submit(
    engine: Engine,
    spec: RunSpec | Mapping[str, Any],
    *,
    user: str | None = None,
    run_on: str | None = None,
    gpu_count: int | None = HOST_GPUS,
) -> int:
    """Validate, then queue; returns the new run's id. Raises SpecError with every problem (nothing stored).

    run_on: the host whose runner runs it (default this machine), or ANY_HOST. gpu_count: what the device
    checks assume (default: the target host's, see target_gpus, or on a Slurm partition the run's nodes
    x GPUs per node; None skips them). The target's own problems (target_problems) are added either way. A
    weights file the spec names is read and checked here, on the machine submitting.
    """
    spec = parse_spec(spec)
    problems = problems_on_target(engine, spec, run_on, gpu_count)
    if problems:
        raise SpecError(problems)
    return _store(engine, spec, user=user, run_on=run_on)


MAX_REPEAT = 50  # runs of each spec in one comparison set: 50 already resolve a 1% difference in a quiet machine


def repeat_problem(repeat: object) -> SpecProblem | None:
    """What is wrong with `repeat` runs of a spec in one comparison set, or None."""
    if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= MAX_REPEAT:
        return SpecProblem("repeat", f"must be a whole number from 1 to {MAX_REPEAT} (got {repeat!r})")
    return None


def submit_set(
    engine: Engine,
    specs: list[RunSpec | Mapping[str, Any]],
    repeat: int,
    *,
    user: str | None = None,
    run_on: str | None = None,
    gpu_count: int | None = HOST_GPUS,
) -> list[int]:
    """Queue `repeat` runs of each spec as one comparison set (storage.runs.insert_set: interleaved, A B C A B C
    ..., which the runner keeps, one run at a time); their ids in queue order. Every spec is validated as
    `submit` does first: SpecError with every problem of every spec (each message naming its spec when there
    are several) and nothing stored."""
    if problem := repeat_problem(repeat):
        raise SpecError([problem])
    if not specs:
        raise SpecError([SpecProblem("spec", "no spec given: a set needs at least one")])
    parsed, problems = [], []
    for i, data in enumerate(specs, 1):
        try:
            spec = parse_spec(data)
            check = problems_on_target(engine, spec, run_on, gpu_count)
        except SpecError as exc:
            spec, check = None, exc.problems
        named = f"spec {i} ({spec.strategy if spec else 'unreadable'}): " if len(specs) > 1 else ""
        problems += [SpecProblem(p.field, named + p.message) for p in check]
        parsed.append(spec)
    if problems:
        raise SpecError(problems)
    return runs.insert_set(engine, parsed, repeat, user=user, run_on=run_on)


def repeat_runs(engine: Engine, run_ids: list[int], repeat: int, *, user: str | None = None) -> list[int]:
    """Queue `repeat` more runs of each distinct spec among `run_ids` (RunSpec.comparison_key; tags kept from the
    first run of each) as one comparison set, on the host they all ran on (else this machine). KeyError for an
    unknown id; SpecError as submit_set."""
    specs: dict[str, RunSpec] = {}
    hosts_run = set()
    for run_id in run_ids:
        run = get_run(engine, run_id)
        if run is None:
            raise KeyError(f"no run {run_id}")
        spec = parse_spec(run["spec"])
        specs.setdefault(spec.comparison_key(), spec)
        hosts_run.add(run["runner_host"] or run["target_host"])
    run_on = hosts_run.pop() if len(hosts_run) == 1 and None not in hosts_run else None
    return submit_set(engine, list(specs.values()), repeat, user=user, run_on=run_on)


def _store(engine: Engine, spec: RunSpec, *, user: str | None, run_on: str | None) -> int:
    """Queue an already validated spec (storage only stores)."""
    return runs.insert_run(engine, spec, user=user, run_on=run_on)


def submit_selftest(
    engine: Engine, device: str = "auto", user: str | None = None, gpus: int | None = None, data: str = "synthetic"
) -> list[int]:
    """Queue the self-test runs (tag 'selftest') on `data` and return their ids; skipped layouts are not queued.

    gpus: GPUs the runner sees (default: the live runner's report, else 0); 'auto' picks cuda when any.
    Raises SpecError (nothing more queued) when a run does not fit, e.g. cuda where no GPU is seen.
    """
    if gpus is None:
        status = runner_status(engine)
        gpus = len(status["gpus"]) if status and status["alive"] else 0
    chosen = device if device != "auto" else ("cuda" if gpus else "cpu")
    return [submit(engine, spec, user=user, gpu_count=gpus) for spec, _ in selftest_specs(chosen, gpus, data=data) if spec]


def submit_converge(engine: Engine, strategies: list[str] | None = None, device: str = "auto",
                    user: str | None = None, gpus: int | None = None,
                    settings: Mapping[str, Any] | None = None) -> tuple[str, list[tuple[str, int | None]]]:  # fmt: skip
    """Queue the convergence check (runner/spec/converge_layouts.py): the chosen strategies (default every one)
    at their smallest layouts on the same data, seed and model, under one new tag; returns (the tag, [(label,
    run id or None where the devices cannot hold it)]). `settings` overrides the check's defaults (steps, data,
    model, dtype, seed, batch, seq, lr, eval_every). Every spec is validated first: a SpecError (each problem
    prefixed with its strategy) queues nothing; an unknown strategy is a problem of the field `strategy`."""
    from datetime import UTC, datetime

    if gpus is None:
        status = runner_status(engine)
        gpus = len(status["gpus"]) if status and status["alive"] else 0
    chosen = device if device != "auto" else ("cuda" if gpus else "cpu")
    tag = f"{CONVERGE_TAG}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    given = dict(settings or {})
    if given.get("data") == "synthetic" and "eval_every" not in given:
        given["eval_every"] = 0  # synthetic tokens have no held-out split: the default's evaluation, not the user's
    base = parse_spec({**DEFAULTS.to_dict(), **given})
    try:
        planned = converge_specs(strategies, chosen, gpus, base=base, tag=tag)
    except ValueError as exc:
        raise SpecError([SpecProblem("strategy", str(exc))]) from exc
    # One problem once, with the strategies it holds for (none named when it holds for all): a bad data path was
    # one sentence six times, "data: data: no file ..." among them.
    strategies_of: dict[tuple[str, str], list[str]] = {}
    for spec, _ in planned:
        for p in validate_spec(spec, gpu_count=gpus) if spec else []:
            strategies_of.setdefault((p.field, p.message), []).append(spec.strategy)
    every = [spec.strategy for spec, _ in planned if spec]
    problems = [SpecProblem(field, message if names == every else f"{message} (for {', '.join(names)})")
                for (field, message), names in strategies_of.items()]  # fmt: skip
    if problems:
        raise SpecError(problems)
    return tag, [(label, submit(engine, spec, user=user, gpu_count=gpus) if spec else None) for spec, label in planned]


def cancel(engine: Engine, run_id: int) -> str:
    """'cancelled' for a queued run (at once), 'cancelling' for a running one (its runner stops it), else its
    status as it is; KeyError when there is no such run."""
    return runs.request_cancel(engine, run_id)


def update_meta(engine: Engine, run_id: int, *, note: str | None = None, tags: list[str] | None = None) -> None:
    """Change a run's note and/or tags (blank tags dropped); KeyError when there is no such run."""
    runs.update_run_meta(engine, run_id, note=note, tags=tags)


def delete(engine: Engine, run_id: int) -> None:
    """Delete a run that is not running, everything measured for it and its folder on this machine."""
    runs.delete_run(engine, run_id)


# ---- reading runs ---------------------------------------------------------------------------
def get_run(engine: Engine, run_id: int) -> dict[str, Any] | None:
    """One run with its ranks, in one read; None when there is no such run. Carries the stored world_size
    and degrees (tp, pp, dp): nothing needs to parse the spec again for them."""
    return runs.get_run(engine, run_id)


def job_script(run: Mapping[str, Any]) -> str | None:
    """The sbatch script a Slurm run was submitted with (a get_run dict), read from its run folder on the
    cluster's shared filesystem; None for a local run or where the folder is not readable from here."""
    if run.get("backend") != "slurm" or not run.get("run_dir"):
        return None
    try:
        return (Path(run["run_dir"]) / SCRIPT_NAME).read_text()
    except OSError:
        return None


def list_runs(engine: Engine, filters: RunFilter | None = None, limit: int = 50, offset: int = 0) -> pd.DataFrame:
    """A page of runs, newest first, filtered in SQL (one row per run, the History table's columns)."""
    return runs.list_runs(engine, filters, limit=limit, offset=offset)


def count_runs(engine: Engine, filters: RunFilter | None = None) -> int:
    return runs.count_runs(engine, filters)


def filter_values(engine: Engine, column: str) -> list[str]:
    """The values present in one of FILTER_COLUMNS, sorted (a filter's choices)."""
    if column not in FILTER_COLUMNS:
        raise ValueError(f"no filter on {column!r}; one of {', '.join(FILTER_COLUMNS)}")
    return runs.distinct_values(engine, column)


def active_runs(engine: Engine) -> pd.DataFrame:
    """Running and queued runs, oldest first, with progress and why a queued one waits."""
    return runs.active_runs(engine)


@dataclass(frozen=True)
class BestRuns:
    """What `best_runs` picked: `ids` ascending, the run whose work they all did (`work_of`, the newest), and each
    strategy left out because none of its runs did that work, with the fields its newest run differs in."""

    ids: list[int]
    work_of: int | None = None
    left_out: dict[str, list[str]] = field(default_factory=dict)


def best_runs(engine: Engine, model: str, workload: str) -> BestRuns:
    """The fastest succeeded run (tokens/s) of each strategy for one model and workload, among the runs that did the
    same work as the newest of them (the model as built, batch, sequence, new tokens: runner.analysis.same_work), so
    that what is picked can be ranked; the strategies that ran only other work are named, not dropped unsaid."""
    candidates = runs.succeeded_runs(engine, model, workload)
    if not candidates:
        return BestRuns([])
    newest = RunSpec.from_dict(candidates[0][3])
    best: dict[str, tuple[float, int]] = {}
    other: dict[str, list[str]] = {}  # strategy -> what its newest run's work differs in
    for run_id, strategy, tokens_per_s, spec in candidates:
        if differs := work_differences(newest, RunSpec.from_dict(spec)):
            other.setdefault(strategy, differs)
            continue
        if strategy not in best or (tokens_per_s, run_id) > best[strategy]:
            best[strategy] = (tokens_per_s, run_id)
    left_out = {s: d for s, d in other.items() if s not in best}
    return BestRuns(sorted(run_id for _, run_id in best.values()), candidates[0][0], left_out)


def step_metrics(engine: Engine, run_id: int) -> pd.DataFrame:
    return series.step_metrics(engine, run_id)


def loss_curves(engine: Engine, run_ids: list[int]) -> pd.DataFrame:
    """The training and held-out loss per step of each run (run_id, step, loss, eval_loss)."""
    return series.loss_curves(engine, run_ids)


def timeline_spans(engine: Engine, run_id: int) -> pd.DataFrame:
    return series.timeline_spans(engine, run_id)


def telemetry_series(engine: Engine, run_ids: list[int], bucket_s: float = 1.0) -> pd.DataFrame:
    return series.telemetry_series(engine, run_ids, bucket_s)


def rank_results(engine: Engine, run_ids: list[int]) -> pd.DataFrame:
    """Per-rank figures of the runs, one row per (run, rank), flat for charts."""
    return series.rank_results(engine, run_ids)


def hosts(engine: Engine) -> list[dict[str, Any]]:
    """Every host whose runner serves or served the database, alive first, with its devices."""
    return host_rows.hosts(engine)


def runner_status(engine: Engine, host: str | None = None) -> dict[str, Any] | None:
    """The lease of the runner serving `host` (default this machine); None when none ever did."""
    return host_rows.runner_status(engine, host)


def this_host_gpus(engine: Engine | None) -> tuple[list[dict[str, Any]], str]:
    """(this machine's GPUs runs may use, as lease entries {index, uuid, name, memory_total, busy_pids}; the note
    saying why and what was excluded): its live runner's report, else read here exactly as that runner will read
    them (runner.service.device_probe). The dashboard, the self-test and `plan --this-host` all see this."""
    status = None
    if engine is not None:
        try:
            status = runner_status(engine)
        except Exception:  # noqa: BLE001 -- no database here: this machine's devices as read now
            status = None
    if status and status["alive"] and not status.get("cluster"):
        return list(status["gpus"]), status["gpu_note"]
    report = detect_devices()
    return report.lease_gpus(), report.note()


def export_csv(engine: Engine, filters: RunFilter | None = None) -> Iterator[str]:
    """The filtered runs as CSV text, streamed (header first)."""
    return runs.iter_runs_csv(engine, filters)


def export_runs(engine: Engine, filters: RunFilter | None = None) -> list[dict[str, Any]]:
    """Every filtered run in full (as get_run gives it), newest first."""
    ids = list_runs(engine, filters, limit=1_000_000)["id"].tolist()
    return [run for run in (get_run(engine, int(i)) for i in ids) if run is not None]


def torchrun_command(spec: RunSpec) -> str:
    """The command line the runner will start for `spec` (its folder shown as runs/<id>)."""
    from runner.service.launch import torchrun_argv

    return shlex.join(torchrun_argv(spec, str(runs_dir() / "<id>" / "spec.json")))


# ---- logs -----------------------------------------------------------------------------------
def log_tails(engine: Engine, run_id: int) -> dict[str, dict[str, Any]]:
    """The log tails the run's host stored in the database, by name: {text, size, updated_at}."""
    return series.run_logs(engine, run_id)


def log(
    engine: Engine,
    run: dict[str, Any],
    name: str,
    *,
    tail_bytes: int | None = None,
    stored: dict[str, dict[str, Any]] | None = None,
) -> LogText:
    """Log `name` ('rank0', 'torchrun') of `run` (a get_run dict): from its folder when this machine ran it,
    else the tail its host stored (`stored`: log_tails, read here when not given and needed)."""
    here = this_host()
    if stored is None:
        if log_reader.ran_here(run, here):
            got = log_reader.run_log(run, name, {}, here, tail_bytes)
            if got.text is not None:
                return got
        stored = log_tails(engine, run["id"])
    return log_reader.run_log(run, name, stored, here, tail_bytes)


def follow(engine: Engine, run: dict[str, Any], first: LogText, poll_s: float | None = None) -> Iterator[str]:
    """What log `first.name` gains after `first` (a whole log as `log` read it), until the run ends."""

    def ended() -> bool:
        now = get_run(engine, run["id"])
        return now is None or is_terminal(now["status"])

    if first.source == "folder":
        yield from log_reader.follow_log(run["run_dir"], first.name, ended, first.size or 0, poll_s or 0.3)
    elif first.source == "database":
        fetch = lambda: log_tails(engine, run["id"]).get(first.name)  # noqa: E731
        yield from log_reader.follow_stored(fetch, ended, first.size or 0, poll_s or 1.0)


# ---- this host for the planner: its calibration (runner/planner/calibrate.py) ----------------------------------
def host_calibration(engine: Engine) -> Any:
    """This host's newest stored calibration (a runner.planner.calibrate.Calibration) for the devices it runs on
    (its GPUs, else its CPU), or None before the first."""
    from runner.planner.calibrate import stored

    return stored(engine, device="cuda" if this_host_gpus(engine)[0] else "cpu")


def calibrate_host(engine: Engine) -> Any:
    """Measure this host (matmul rate of one device per dtype, all-reduce bandwidth between 2 local ranks: a few
    seconds, in processes of their own) and store it; returns the Calibration the planner now reads."""
    from runner.planner.calibrate import calibrate_and_store

    return calibrate_and_store(engine=engine)


def this_host_devices(engine: Engine | None) -> Any:
    """This host's devices as the planner sees them (runner.planner.devices.Devices): its GPUs or CPU ranks, at the
    newest calibration's rates when there is one (its `source` says which). Without a database (engine None), from
    published figures."""
    from runner.planner.calibrate import this_host_devices as devices

    return devices(this_host_gpus(engine)[0], engine)
