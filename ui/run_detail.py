"""What the run and Live pages say about one run, as plain text from its get_run dict: progress (with elapsed
and remaining time on the Live page), the failure line, the captions under its figures (process RSS, MFU,
the data it read, pipeline bubble) and the text a generate run wrote. The pages only lay these out."""

from __future__ import annotations

import functools
import html
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from runner.gpt.config import GPTConfig, describe_model
from runner.job.metrics import step_number
from runner.spec.run_spec import RunSpec
from ui.charts import COLLECTIVES
from ui.format import human_bytes, human_duration, status_label


def progress(run: dict[str, Any]) -> tuple[float, str]:
    """(fraction done, 'step s of n') of a queued or running run."""
    prog = run["progress"]
    frac = prog["step"] / prog["total"] if prog["total"] else 0.0
    return min(frac, 1.0), f"step {prog['step']} of {prog['total']}"


def live_progress(
    started_at: datetime | None, step_times: Sequence[float], done: int, total: int, now: datetime, warmup: int = 0
) -> tuple[float, str]:
    """(fraction done, 'step s of n (w warm-up + t timed) · elapsed … · remaining …') of a running run: n counts the
    warm-up steps too (the user typed the timed ones); the remaining time is the mean step time so far times the
    steps left ('estimating…' before the first step)."""
    elapsed = (now - started_at).total_seconds() if started_at else 0.0
    remaining = sum(step_times) / len(step_times) * (total - done) if len(step_times) and done else None
    frac = min(done / total, 1.0) if total else 0.0
    left = "remaining " + (human_duration(remaining) if remaining is not None else "estimating…")
    if total and done >= total:  # the job still measures its tensor peak and writes its result
        left = "every step done, finishing"
    parts = f" ({warmup} warm-up + {total - warmup} timed)" if 0 < warmup < total else ""
    return frac, f"step {done} of {total}{parts} · elapsed {human_duration(elapsed)} · {left}"


RECENT_S = 15 * 60  # how long the Live page keeps saying how a run ended


def recently_ended(runs: Sequence[dict[str, Any]], now: datetime, within_s: float = RECENT_S) -> list[str]:
    """One line for each run (list_runs rows) that ended within `within_s` of `now`, the latest end first: a run
    leaving the Live page says how it ended instead of vanishing (a cancel read as nothing having happened)."""
    ended = [r for r in runs if r.get("finished_at") is not None and (now - r["finished_at"]).total_seconds() <= within_s]
    ended.sort(key=lambda r: r["finished_at"], reverse=True)
    return [f"{status_label(r['status'])} **[#{r['id']}](/history?run={r['id']})** {r['strategy']} · {r['model']} · "
            f"{r['workload']} — {human_duration((now - r['finished_at']).total_seconds())} ago" for r in ended]  # fmt: skip


def progress_html(frac: float, text: str) -> str:
    """A progress bar and its line as one piece of HTML (st.html). Streamlit's st.progress draws its line at once
    but slides its bar there over half a second, after it, so a page refreshed every second showed "step 6 of 6"
    beside a bar at 58%; this bar is drawn where the line says, in the same update."""
    pct = round(min(max(frac, 0.0), 1.0) * 100, 1)
    return (f'<div style="font-size:0.875rem;margin-bottom:0.25rem">{html.escape(text)}</div>'
            f'<div role="progressbar" aria-valuenow="{pct:g}" aria-valuemin="0" aria-valuemax="100" '
            f'style="height:0.5rem;border-radius:0.25rem;background:rgba(151,166,195,0.25)">'
            f'<div style="width:{pct:g}%;height:100%;border-radius:0.25rem;background:#ff4b4b"></div></div>')  # fmt: skip


def built_model(spec: dict[str, Any]) -> GPTConfig | None:
    """The model a run's spec builds; None where it cannot be read here (a weights folder on the host that ran it,
    a malformed spec). Read once per spec: the run page redraws every second while a run goes, and a Hugging Face
    run's model is its folder's config.json."""
    return _built_model(json.dumps(spec, sort_keys=True, default=str))


@functools.lru_cache(maxsize=256)
def _built_model(spec_json: str) -> GPTConfig | None:
    try:
        return RunSpec.from_dict(json.loads(spec_json)).model_config()
    except (OSError, TypeError, ValueError):
        return None


def model_text(run: dict[str, Any]) -> str | None:
    """The model the run built, in a line: a custom or Hugging Face run's title says only 'custom' or 'checkpoint'.
    Its weights folder, and how tensor parallelism laid its key/value heads where a rank reported it."""
    weights = run["spec"].get("weights")
    cfg = built_model(run["spec"])
    if cfg is None:
        return f"model: from {weights}" if weights else None
    kv = next((r["tp_kv_heads"] for r in run.get("ranks") or [] if r.get("tp_kv_heads")), None)
    return (f"model: {describe_model(cfg)}" + (f" · weights {weights}" if weights else "")
            + (f" · key/value heads {kv} over the tp ranks" if kv else ""))  # fmt: skip


def unfinished_steps_text(run: dict[str, Any], steps: Any) -> str | None:
    """What a run that ended without a result (cancelled, failed, lost) measured before it ended: its timed steps'
    median time from the steps it recorded (step_metrics rows), where a finished run's figures would stand; None
    for a run with a result, one still going, or one that timed no step."""
    if run.get("result") or run["status"] not in ("cancelled", "failed", "lost") or not len(steps):
        return None
    timed = [float(t) for t, w in zip(steps["step_time_s"], steps["warmup"], strict=True) if not w and t == t]
    if not timed:
        return None
    return (f"Before it ended, {len(timed)} timed step{'s' if len(timed) > 1 else ''} of "
            f"{run['spec'].get('steps', '?')}: step time p50 {human_duration(statistics.median(timed))} (from the steps it "
            f"recorded; a run that does not finish stores no throughput or memory figures).")  # fmt: skip


def failure_text(run: dict[str, Any]) -> str | None:
    """The error of a failed, lost or cancelled run with the failing rank and its exit code; None otherwise."""
    if run["status"] not in ("failed", "lost", "cancelled") or not run.get("error"):
        return None
    where = f" (rank {run['failed_rank']}, exit code {run['exit_code']})" if run.get("failed_rank") is not None else ""
    return f"{run['error']}{where}"


def peak_memory(run: dict[str, Any]) -> int | None:
    """The run's peak memory: its largest rank's."""
    return max((r["peak_mem_bytes"] for r in run["ranks"] if r.get("peak_mem_bytes") is not None), default=None)


def result_captions(run: dict[str, Any]) -> list[str]:
    """The lines under a finished run's figures: process peak RSS, what the tensor peak holds on CUDA, MFU (or why
    there is none), bubble."""
    r = run.get("result") or {}
    out = []
    rss = [x["peak_rss_bytes"] for x in run["ranks"] if x.get("peak_rss_bytes") is not None]
    if rss:
        out.append(f"process peak RSS (max rank, interpreter and torch included): {human_bytes(max(rss))}")
    if r.get("device") == "cuda" and any(x.get("peak_tensor_bytes") is not None for x in run["ranks"]):
        spaces = [x["cublas_workspace_bytes"] for x in run["ranks"] if x.get("cublas_workspace_bytes") is not None]
        if spaces:
            out.append(f"tensor peak: the allocator's peak without cuBLAS's workspaces (up to {human_bytes(max(spaces))} "
                       "a rank, in the run's peak, not tensors), the figure the planner's prediction is compared "
                       "with")  # fmt: skip
        else:
            out.append("tensor peak: the allocator's whole peak, cuBLAS's workspaces included (recorded before they "
                       "were measured apart): above what the planner predicts by their size")  # fmt: skip
    devices = ", ".join(r.get("device_names") or [])
    if r.get("mfu") is not None:
        peak = f" of {r['peak_flops'] / 1e12:.1f} TFLOP/s peak" if r.get("peak_flops") else ""
        out.append(f"MFU {r['mfu']:.1%}{peak} on {devices}")
    elif r.get("device") == "cuda":
        out.append(f"no MFU: the peak FLOP/s of {devices or 'this GPU'} is not known")
    spec = run.get("spec") or {}
    if spec.get("data", "synthetic") != "synthetic":
        every = spec.get("eval_every") or 0
        out.append(f"data: {spec['data']}" + (f"; held-out loss every {every} steps" if every else ""))
    if r.get("bubble_fraction") is not None:
        theory = r.get("bubble_fraction_theory") or 0
        out.append(f"pipeline bubble measured {r['bubble_fraction']:.1%}, theory {theory:.1%}")
    return out


TIMELINE_NAMES = {"single": "Single-device", "layer": "Layer split", "pipeline": "Pipeline", "tensor": "Tensor-parallel",
                  "data": "Data-parallel", "3d": "3D-parallel"}  # fmt: skip


def timeline_title(spec: dict[str, Any], step: int, spans: Any) -> str:
    """The measured timeline's title, named for the run's strategy, saying what its lanes and colours are: stages
    of a pipeline (grey: waiting for a neighbour), ranks otherwise, purple: the collectives the step clock timed."""
    strategy = spec.get("strategy", "")
    name = TIMELINE_NAMES.get(strategy, strategy.capitalize())
    lanes = "stage x microbatch" if int(spec.get("pp") or 1) > 1 else "one lane per rank"
    phases = set(spans["phase"])
    notes = [lanes]
    if "recv_wait" in phases:
        notes.append("grey: waiting for a neighbour")
    if phases & set(COLLECTIVES):
        notes.append("purple: collectives, inside the pass they ran in")
    return f"{name} timeline, step {step_number(step)} ({'; '.join(notes)})"


@dataclass(frozen=True)
class Generation:
    """What a generate run on text produced for its first row: the prompt and the continuation, as text."""

    prompt: str
    continuation: str
    tokens: int


def generation(result: dict[str, Any] | None) -> Generation | None:
    """The decoded prompt and continuation a generate run on text recorded; None for every other run."""
    r = result or {}
    if r.get("generated_text") is None:
        return None
    return Generation(r.get("prompt") or "", r["generated_text"], len(r.get("generated_ids") or []))
