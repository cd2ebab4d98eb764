"""A run's logs: the one reader every part uses, and keeping the logs bounded.

Reading. Each rank writes `rank<R>.log` and torchrun `torchrun.log` into the run folder on the host that
ran it; that host's runner also stores the latest LOG_TAIL_BYTES of each in the database, so a teammate
on another machine can read them. Everything that reads a log goes through this module: `read_log` /
`read_log_tail` / `follow_log` for a file in a run folder (the CLI's `logs`, failure diagnosis, the
runner's stored tails), and `run_log` / `follow_stored` for "this run's log, wherever it is readable from
here": the folder when this machine ran the run, else the stored tail (`log_source` decides). Nothing
here touches the database: callers hand in the stored tails (runner.api does).

Capping. The runner calls `cap_log` on each log of a running job with the telemetry sample. A log over
the cap keeps its beginning (start-up lines, the first traceback usually comes early) and its most recent
part, with a line in between saying how much was cut. Ranks keep appending (O_APPEND) while the runner
trims, so the middle is cut out in place with fallocate(FALLOC_FL_COLLAPSE_RANGE) on Linux file systems
that have it (ext4, XFS): the kernel holds the file's lock for the cut, so a line a rank writes
meanwhile lands after it and is never lost. Elsewhere (tmpfs, other systems) the file is rewritten,
and whatever was appended while the runner read it is copied after the kept part; a line written in
the instant between that copy and the truncation can still be lost there.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_CAP_BYTES = int(os.environ.get("LAB_LOG_CAP_BYTES", 20 * 1024 * 1024))
HEAD_BYTES = 256 * 1024
_FALLOC_FL_COLLAPSE_RANGE = 0x08
_FALLOC_FL_INSERT_RANGE = 0x20
LOG_TAIL_BYTES = 64 * 1024  # what a runner keeps of each log in the database (the run_logs table)


# ---- reading a log in a run folder ----------------------------------------------------------
# What PyTorch's profiler prints into a rank's log while the job measures its tensor peak on a CPU
# (runner/job/resources.py): its USDT probe lines and the allocator's notice of blocks allocated before it started.
# The log keeps them; tails shown beside a run's progress leave them out (`without_profiler_noise`).
PROFILER_NOISE = re.compile(r"^USDT:.*profiler_(start|stop)|CPUAllocator\.cpp:\d+\] Memory block of unknown size")


def without_profiler_noise(text: str) -> tuple[str, int]:
    """`text` without the profiler's lines, and how many were left out."""
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not PROFILER_NOISE.search(line)]
    return "".join(kept), len(lines) - len(kept)


def log_path(run_dir: Path | str, name: str) -> Path:
    """The file of log `name` ('torchrun', 'rank0', ...) in a run folder."""
    return Path(run_dir) / f"{name}.log"


def log_names(run_dir: Path | str) -> list[str]:
    """The logs present in a run folder: 'torchrun' first, then the ranks' in rank order."""
    folder = Path(run_dir)
    ranks = sorted(
        (int(m.group(1)), p.stem) for p in folder.glob("rank*.log") if (m := re.fullmatch(r"rank(\d+)", p.stem))
    )
    return (["torchrun"] if log_path(folder, "torchrun").exists() else []) + [stem for _, stem in ranks]


def read_log_tail(run_dir: Path | str, name: str, tail_bytes: int | None = LOG_TAIL_BYTES) -> tuple[str, int] | None:
    """(text, the file's size in bytes) of log `name`: the whole file, or with `tail_bytes` its last part
    starting at a whole line when it is longer; None when the file is not there."""
    try:
        with log_path(run_dir, name).open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if tail_bytes is None or size <= tail_bytes:
                data = f.read()
            else:
                f.seek(size - tail_bytes)
                data = f.read(tail_bytes)
                data = data[data.find(b"\n") + 1 :]  # start at a whole line (all of it when there is none)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return data.decode(errors="replace"), size


def read_log(run_dir: Path | str, name: str, tail_bytes: int | None = None) -> str | None:
    """Log `name`'s text (its last `tail_bytes`, from a whole line, when given); None when the file is not there."""
    got = read_log_tail(run_dir, name, tail_bytes)
    return got[0] if got is not None else None


def follow_log(
    run_dir: Path | str, name: str, ended: Callable[[], bool], start: int = 0, poll_s: float = 0.3
) -> Iterator[str]:
    """Log `name` from byte `start` on: what is there now, then each line appended, until `ended()` says the
    run is over (what was written up to then included). Raises FileNotFoundError when the log is not there."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    with log_path(run_dir, name).open("rb") as f:
        f.seek(start)
        yield decode(f.read())
        while True:
            line = f.readline()
            if line:
                yield decode(line)
                continue
            if ended():
                yield decode(f.read(), final=True)
                return
            time.sleep(poll_s)


# ---- a run's log, wherever this machine can read it from ------------------------------------
@dataclass(frozen=True)
class LogText:
    """One log of a run as read from here. source: 'folder' (this machine's run folder), 'database' (the tail
    the run's host stored) or 'none' (neither has it; text is None then)."""

    name: str
    text: str | None
    source: str
    size: int | None = None  # the whole log's size in bytes, where known
    path: str | None = None  # the file read, for source 'folder'

    @property
    def cut(self) -> bool:
        """Only the latest part of a longer log is shown."""
        return self.text is not None and self.size is not None and self.size > len(self.text.encode())


def ran_here(run: dict[str, Any], here: str) -> bool:
    """Whether this machine has the run's folder: it exists and no other host ran the run.

    A folder at the recorded path on this machine is another run's when the run ran elsewhere (two hosts
    may use the same LAB_HOME path, and run ids restart in a fresh database).
    """
    return bool(run.get("run_dir")) and Path(run["run_dir"]).is_dir() and run.get("runner_host") in (None, here)


def log_source(run: dict[str, Any], stored: dict[str, dict[str, Any]], here: str) -> str:
    """Where this machine reads a run's logs: 'folder' when it has the run's folder (it ran here),
    'database' when only the tails stored in the database can be read (it ran on another host), 'none'
    when neither has anything yet."""
    if ran_here(run, here):
        return "folder"
    if stored:
        return "database"
    return "folder" if run.get("run_dir") and Path(run["run_dir"]).is_dir() else "none"


def run_log(
    run: dict[str, Any], name: str, stored: dict[str, dict[str, Any]], here: str, tail_bytes: int | None = None
) -> LogText:
    """Log `name` of `run` from its folder when this machine ran it, else from the stored tails (`stored`:
    name -> {text, size}); with `tail_bytes`, the last part only."""
    if log_source(run, stored, here) == "folder":
        got = read_log_tail(run["run_dir"], name, tail_bytes)
        if got is not None:
            return LogText(name, got[0], "folder", got[1], str(log_path(run["run_dir"], name)))
    entry = stored.get(name)  # also where this machine's folder lacks the file: its runner's own stored tail
    if entry is None:
        return LogText(name, None, "none")
    text = entry["text"]
    if tail_bytes is not None and len(text.encode()) > tail_bytes:
        data = text.encode()[-tail_bytes:]
        text = data[data.find(b"\n") + 1 :].decode(errors="replace")
    return LogText(name, text, "database", entry.get("size"))


def follow_stored(
    fetch: Callable[[], dict[str, Any] | None], ended: Callable[[], bool], size: int, poll_s: float = 1.0
) -> Iterator[str]:
    """What each refresh of a stored tail added after the first `size` bytes (judged by the log's size),
    until `ended()`; the runner stores the tails once more before it records the end, so the last look
    after `ended()` is complete. A gap larger than the stored tail is marked."""
    while True:
        done = ended()
        entry = fetch()
        grown = entry["size"] - size if entry else 0
        if entry and grown > 0:
            data = entry["text"].encode()
            if grown > len(data):  # more was written between two looks than the stored tail holds
                yield f"\n[... {grown - len(data)} bytes not kept in the database ...]\n"
            yield data[-grown:].decode(errors="replace")
            size = entry["size"]
        if done:
            return
        time.sleep(poll_s)


# ---- keeping logs bounded --------------------------------------------------------------------


def _marker(cut: int, cap: int) -> bytes:
    return f"\n[... {cut} bytes cut by the runner to keep this log under {cap} bytes ...]\n".encode()


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
    cut = _collapse(path, size, head_len, tail_len, cap)
    return cut if cut is not None else _rewrite(path, size, head_len, tail_len, cap)


def _fallocate():
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate


def _collapse(path: Path, size: int, head_len: int, tail_len: int, cap: int) -> int | None:
    """Cut the middle out in place, block-aligned, and put a block with the marker where it was.

    None when the file system cannot (then the caller rewrites the file).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    try:
        block = os.fstat(fd).st_blksize or 4096
        start = -(-head_len // block) * block  # the head, rounded up to whole blocks
        length = (size - tail_len - start) // block * block  # the middle, whole blocks, ending before the tail
        if length <= block:
            return 0  # not worth a cut: the cap is too close to the block size
        fallocate = _fallocate()
        if fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, start, length) != 0:
            return None
        # One block for the marker where the cut was (appends meanwhile went to the end: nothing moves them).
        if fallocate(fd, _FALLOC_FL_INSERT_RANGE, start, block) == 0:
            marker = _marker(length, cap)[: block - 1]
            os.pwrite(fd, marker + b" " * (block - 1 - len(marker)) + b"\n", start)
        return length
    finally:
        os.close(fd)


def _rewrite(path: Path, size: int, head_len: int, tail_len: int, cap: int) -> int:
    with path.open("rb") as f:
        head = f.read(head_len)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    cut = size - head_len - len(tail)
    kept = head + _marker(cut, cap) + tail
    with path.open("r+b") as f:
        f.write(kept)
        f.seek(size)
        late = f.read()  # appended by a rank while we read and wrote: keep it after the tail
        f.seek(len(kept))
        f.write(late)
        f.truncate()
    return cut


def cap_run_logs(run_dir: Path, cap: int = LOG_CAP_BYTES) -> None:
    """cap_log on torchrun.log and every rank's log of a run folder."""
    for name in log_names(run_dir):
        cap_log(log_path(run_dir, name), cap)
