"""bench/RESULTS.md: each benchmark script owns one '## ...' section and rewrites only that one.

Also what the scripts share: launching a script's own torchrun worker, quick mode, the machine
description and ratio summaries, so that every sentence of a section is written from the numbers
measured in the same run. Medians, intervals and verdicts come from runner/analysis/stats.py, the one statistics
helper the pages use too."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

from runner.analysis.stats import direction, median_interval
from runner.analysis.stats import spread as spread  # the scripts' (median, min, max), from the one helper
from runner.service.launch import torchrun_launcher
from runner.spec.run_spec import usable_cores as usable_cores

REPO = Path(__file__).resolve().parent.parent


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


def exit_worker() -> None:
    """End a finished worker rank without interpreter finalisation, as runner/job/rank.py does: gloo's C++
    threads torn down then can abort the process (SIGABRT, "terminate called without an active
    exception") after its result was written, and torchrun would report the benchmark as failed."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_worker(script: str, nproc: int, *args: str) -> dict:
    """Run `script --worker OUT *args` under torchrun with `nproc` ranks (one OMP thread each, as the
    runner starts CPU jobs) and return the JSON its rank 0 wrote to OUT."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        argv = [*torchrun_launcher(nproc), str(Path(script).resolve()), "--worker", str(out), *args]
        subprocess.run(argv, cwd=REPO, env=env, check=True)
        return json.loads(out.read_text())


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


def compare_sentence(what: str, ratios: list[float], noun: str = "interleaved pairs") -> str:
    """One sentence from per-trial ratios ours/theirs: the median, its 95% interval and the range, and a
    verdict (faster / slower) only when the interval reaches 95% and excludes 1.0 (runner.analysis.stats.direction);
    otherwise it says this run cannot tell."""
    med, lo, hi = spread(ratios)
    ci = median_interval(ratios)
    verdict = {
        "lower": f"ours is faster by {1 - med:.0%}",
        "higher": f"ours is slower by {med - 1:.0%}",
        "unresolved": "no difference this run can resolve",
        "too few": f"too few {noun} to resolve a difference",
    }[direction(ci)]
    return (
        f"{what}: {verdict} (ratio ours/theirs: median {med:.2f} of {len(ratios)} {noun}, interval of the "
        f"median {ci.describe('{:.2f}')}, range {lo:.2f}..{hi:.2f})."
    )


def signed(x: float, digits: int = 2) -> str:
    """x with its sign, never '-0.00'."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"
