"""Keeping a run's logs bounded: a job that prints without end must not fill the disk.

The runner calls `cap_log` on each log of a running job with the telemetry sample. A log over the cap
keeps its beginning (start-up lines, the first traceback usually comes early) and its most recent
part, with a line in between saying how much was cut. Ranks append with O_APPEND, so after the file
is rewritten their next lines land at its new end.
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_CAP_BYTES = int(os.environ.get("LAB_LOG_CAP_BYTES", 20 * 1024 * 1024))
HEAD_BYTES = 256 * 1024


def cap_log(path: Path, cap: int = LOG_CAP_BYTES) -> int:
    """Shrink `path` to about half of `cap` when it is larger than `cap`; returns the bytes cut (0 if none)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size <= cap:
        return 0
    head_len = min(HEAD_BYTES, cap // 4)
    tail_len = cap // 2 - head_len
    with path.open("rb") as f:
        head = f.read(head_len)
        f.seek(size - tail_len)
        tail = f.read()
    cut = size - head_len - len(tail)
    marker = f"\n[... {cut} bytes cut by the runner to keep this log under {cap} bytes ...]\n".encode()
    with path.open("r+b") as f:
        f.write(head + marker + tail)
        f.truncate()
    return cut


def cap_run_logs(run_dir: Path, cap: int = LOG_CAP_BYTES) -> None:
    for path in [run_dir / "torchrun.log", *run_dir.glob("rank*.log")]:
        cap_log(path, cap)
