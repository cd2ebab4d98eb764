"""Human-readable figures: bytes, durations, statuses."""

from __future__ import annotations

import math

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
