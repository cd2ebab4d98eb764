"""What the run and Live pages say about one run, as plain text from its get_run dict: progress (with elapsed
and remaining time on the Live page), the failure line, the captions under its figures (process RSS, MFU,
the data it read, pipeline bubble) and the text a generate run wrote. The pages only lay these out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ui.format import human_bytes, human_duration


def progress(run: dict[str, Any]) -> tuple[float, str]:
    """(fraction done, 'step s of n') of a queued or running run."""
    prog = run["progress"]
    frac = prog["step"] / prog["total"] if prog["total"] else 0.0
    return min(frac, 1.0), f"step {prog['step']} of {prog['total']}"


def live_progress(
    started_at: datetime | None, step_times: Sequence[float], done: int, total: int, now: datetime
) -> tuple[float, str]:
    """(fraction done, 'step s of n · elapsed … · remaining …') of a running run; the remaining time is the
    mean step time so far times the steps left ('estimating…' before the first step)."""
    elapsed = (now - started_at).total_seconds() if started_at else 0.0
    remaining = sum(step_times) / len(step_times) * (total - done) if len(step_times) and done else None
    frac = min(done / total, 1.0) if total else 0.0
    left = human_duration(remaining) if remaining is not None else "estimating…"
    return frac, f"step {done} of {total} · elapsed {human_duration(elapsed)} · remaining {left}"


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
    """The lines under a finished run's figures: process peak RSS, MFU (or why there is none), bubble."""
    r = run.get("result") or {}
    out = []
    rss = [x["peak_rss_bytes"] for x in run["ranks"] if x.get("peak_rss_bytes") is not None]
    if rss:
        out.append(f"process peak RSS (max rank, interpreter and torch included): {human_bytes(max(rss))}")
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
