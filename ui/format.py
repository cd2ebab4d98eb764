"""Human-readable figures: bytes, durations, statuses, and the per-rank table as people read it."""

from __future__ import annotations

import math

import pandas as pd

STATUS_ICONS = {
    "queued": "◷",
    "running": "▶",
    "succeeded": "✔",
    "failed": "✖",
    "cancelled": "■",
    "lost": "?",
}


def human_bytes(n: float | int | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def human_age(seconds: float | None) -> str:
    """How long ago, to the second: a heartbeat 0.09 s old reads "1 s", not "90.0 ms" that flickers every refresh."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    return human_duration(seconds)


def human_rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None or (isinstance(tokens_per_s, float) and math.isnan(tokens_per_s)):
        return "—"
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f} M tok/s"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f} k tok/s"
    return f"{tokens_per_s:.0f} tok/s"


def status_label(status: str) -> str:
    return f"{STATUS_ICONS.get(status, '')} {status}".strip()


MIB = 2**20


def rank_table(ranks: pd.DataFrame) -> pd.DataFrame:
    """rank_results() rows for display: sizes in MiB, seconds rounded, only collectives that moved bytes."""
    out = pd.DataFrame({c: ranks[c] for c in ("rank", "tp", "pp", "dp") if c in ranks})
    if "param_count" in ranks:
        out["parameters"] = ranks["param_count"]
    for col, name in (("param_bytes", "params MiB"), ("optimizer_bytes", "AdamW MiB"), ("peak_mem_bytes", "peak MiB")):
        if col in ranks:
            out[name] = (ranks[col] / MIB).round(2)
    for col in ("compute_s", "comm_s", "idle_s"):
        if col in ranks:
            out[col.removesuffix("_s") + " s"] = ranks[col].round(4)
    for col in sorted(c for c in ranks.columns if c.startswith("comm_bytes_")):
        if ranks[col].fillna(0).any():  # a layer split never all-reduces: no column of zeros
            out[col.removeprefix("comm_bytes_") + " MiB"] = (ranks[col] / MIB).round(3)
    return out
