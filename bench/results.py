"""bench/RESULTS.md: each benchmark script owns one '## ...' section and rewrites only that one.

Also what the scripts share: quick mode, the machine description and ratio summaries, so that every
sentence of a section is written from the numbers measured in the same run."""

from __future__ import annotations

import os
import platform
import re
import statistics
from pathlib import Path


def write_section(heading: str, text: str, path: Path, notes: str = "") -> None:
    """Replace (or add) the section `text` whose first line is `## {heading}`, keeping every other section."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    body = text + (("\n" + notes.strip() + "\n") if notes.strip() else "")
    pattern = re.compile(rf"## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: body + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    path.write_text(new)


# ---- what every benchmark script shares: run size, machine description, ratios with their spread ----


def quick_mode(argv_flag: bool = False) -> bool:
    """Short settings for development (`--quick` or BENCH_QUICK=1): the same code paths, fewer rounds."""
    return argv_flag or os.environ.get("BENCH_QUICK", "") not in ("", "0")


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
    """Markdown bullets: the machine, its load when the section was written, Python and torch versions."""
    import torch

    try:
        load = f" load average (1 min) {os.getloadavg()[0]:.1f} when written;"
    except OSError:
        load = ""
    return [
        f"- machine: {cpu_name()}, {usable_cores()} usable cores,{load} {platform.system()} {platform.release()}; "
        "CPU ranks, gloo, one thread per rank",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
    ]


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def compare_sentence(what: str, ratios: list[float], noun: str = "interleaved pairs") -> str:
    """One sentence from per-trial ratios ours/theirs: which side is faster and by how much, the median,
    and the range; when the range straddles 1.0 it says so, since then this run cannot tell them apart."""
    med, lo, hi = spread(ratios)
    if med < 1:
        verdict = f"ours is {1 - med:.0%} faster"
    elif med > 1:
        verdict = f"ours is {med - 1:.0%} slower"
    else:
        verdict = "ours and theirs tie"
    text = f"{what}: {verdict} (ratio ours/theirs {med:.2f}, median of {len(ratios)} {noun}, range {lo:.2f}..{hi:.2f})"
    if lo < 1 < hi:
        text += f"; the range straddles 1.0: some {noun} favour each side"
    return text + "."
