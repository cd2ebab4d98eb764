"""TEMPORARY re-export shim: the storage functions now live in modules of one job each (issue 12).

storage/runs.py (run rows the app and CLI read and change), storage/series.py (measurements read for
charts), storage/hosts.py (hosts and runner leases), storage/runner_rows.py (what the runner writes),
storage/ranks.py (per-rank figures <-> rows). Callers switch to those (pages and the CLI to
runner/api.py); then this file goes. submit_run stays here, with its old behaviour (validate, then
insert_run), until runner/api.py replaces it.
"""

from __future__ import annotations

from runner.spec import RunSpec, SpecError
from storage.db import RUNNER_STALE_S, runner_stale_s
from storage.hosts import (
    ANY_HOST,
    acquire_lease,
    explain_runs_for_absent_hosts,
    heartbeat,
    hosts,
    lose_runs_of_silent_hosts,
    release_lease,
    runner_status,
    this_host,
)
from storage.runner_rows import (
    add_spans,
    add_step_metrics,
    add_telemetry,
    cancel_requested,
    claim_run,
    finish_run,
    finite_json,
    queued_runs,
    running_runs,
    set_wait_reason,
    store_log_tail,
    update_run,
)
from storage.runs import (
    LIST_COLUMNS,
    RunFilter,
    active_runs,
    best_runs,
    count_runs,
    default_user,
    delete_run,
    distinct_values,
    get_run,
    insert_run,
    iter_runs_csv,
    list_runs,
    request_cancel,
    update_run_meta,
)
from storage.series import rank_results, run_logs, step_metrics, telemetry_series, timeline_spans

__all__ = [
    "ANY_HOST", "LIST_COLUMNS", "RUNNER_STALE_S", "RunFilter", "acquire_lease", "active_runs", "add_spans",
    "add_step_metrics", "add_telemetry", "best_runs", "cancel_requested", "claim_run", "count_runs",
    "default_user", "delete_run", "distinct_values", "explain_runs_for_absent_hosts", "finish_run", "finite_json",
    "get_run", "heartbeat", "hosts", "insert_run", "iter_runs_csv", "list_runs", "lose_runs_of_silent_hosts",
    "queued_runs", "rank_results", "release_lease", "request_cancel", "run_logs", "runner_stale_s", "runner_status",
    "running_runs", "set_wait_reason", "step_metrics", "store_log_tail", "submit_run", "telemetry_series",
    "this_host", "timeline_spans", "update_run", "update_run_meta",
]  # fmt: skip


def submit_run(
    engine, spec: RunSpec, *, user: str | None = None, gpu_count: int | None = None, run_on: str | None = None
) -> int:
    """Validate and queue; raises SpecError (nothing queued) when the spec has any problem. (Moves to runner/api.py.)"""
    problems = spec.validate(gpu_count=gpu_count)
    if problems:
        raise SpecError(problems)
    return insert_run(engine, spec, user=user, run_on=run_on)
