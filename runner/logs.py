"""Keeping a run's logs bounded: a job that prints without end must not fill the disk.

The runner calls `cap_log` on each log of a running job with the telemetry sample. A log over the cap
keeps its beginning (start-up lines, the first traceback usually comes early) and its most recent
part, with a line in between saying how much was cut. Ranks keep appending (O_APPEND) while the runner
trims, so the middle is cut out in place with fallocate(FALLOC_FL_COLLAPSE_RANGE) on Linux file systems
that have it (ext4, XFS): the kernel holds the file's lock for the cut, so a line a rank writes
meanwhile lands after it and is never lost. Elsewhere (tmpfs, other systems) the file is rewritten,
and whatever was appended while the runner read it is copied after the kept part; a line written in
the instant between that copy and the truncation can still be lost there.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

LOG_CAP_BYTES = int(os.environ.get("LAB_LOG_CAP_BYTES", 20 * 1024 * 1024))
HEAD_BYTES = 256 * 1024
_FALLOC_FL_COLLAPSE_RANGE = 0x08
_FALLOC_FL_INSERT_RANGE = 0x20


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
    for path in [run_dir / "torchrun.log", *run_dir.glob("rank*.log")]:
        cap_log(path, cap)
