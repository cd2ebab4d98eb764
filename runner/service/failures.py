"""Why a run failed: the rank at fault, a one-line error and its traceback, from torchrun.log, error events and rank logs.

When one rank dies its peers fail too (a closed connection, a collective timeout) and torchrun stops
the rest; diagnose_failure() finds the root cause among those. Logs are read through runner.service.logs
(the one log reader). On a run over several nodes, `rank_nodes` tells which node the failing rank ran on
(each rank's `started` event names it). No torch import: the runner imports this.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from runner.service.logs import log_names, read_log
from runner.spec.records import Error, Started, parse_event

_TORCHRUN_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
_CONSEQUENCES = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe")

Diagnosis = tuple[int | None, str, str | None]  # (failing rank, one-line error, its first traceback)


def diagnose_failure(run_dir: Path, errors: list[Error]) -> Diagnosis:
    """(failing rank, one-line error, first traceback of that rank) from torchrun.log, error events and rank logs.

    When one rank dies, its peers fail too (a closed connection, a collective timeout) and torchrun
    stops the rest with SIGTERM; the root cause is, in order: torchrun's root-cause rank when a signal
    killed it, a rank that raised something other than such a consequence, then any rank that raised,
    then the rank torchrun reports first.
    """
    log = read_log(run_dir, "torchrun") or ""
    # torchrun names the first observed failure under "Root Cause" and lists the others it saw; the ranks
    # it stopped itself got SIGTERM. When several are observed at once the root cause can be a peer that
    # merely lost its connection, so a rank killed by any other signal is the cause wherever it is listed.
    root = log[log.find("Root Cause") :] if "Root Cause" in log else log
    exits = [(int(m.group(1)), int(m.group(2))) for m in _TORCHRUN_FAILURE.finditer(root)]
    every = [(int(m.group(1)), int(m.group(2))) for m in _TORCHRUN_FAILURE.finditer(log)]
    killed = [(r, c) for r, c in exits if c < 0 and c != -signal.SIGTERM]
    killed += [(r, c) for r, c in every if c < 0 and c != -signal.SIGTERM]
    killed += [(r, c) for r, c in exits if c < 0]
    if killed:
        rank, code = killed[0]
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else "?"
        return rank, f"rank {rank} was killed by signal {-code} ({name})", rank_traceback(run_dir, rank)
    ordered = sorted(errors, key=lambda e: e.t)
    causes = [e for e in ordered if not any(c in e.error for c in _CONSEQUENCES)]
    if causes:
        return _raised(causes[0])
    silent = [(r, c) for r, c in every if r not in {e.rank for e in errors}]
    if ordered and silent:  # the others only lost their peer: the rank that died without a word is the cause
        rank, code = silent[0]
        return rank, f"rank {rank} exited with code {code} without an error", rank_traceback(run_dir, rank)
    if ordered:
        return _raised(ordered[0])
    if exits:
        rank, code = exits[0]
        return rank, f"rank {rank} exited with code {code}", rank_traceback(run_dir, rank)
    for name in log_names(run_dir):
        if name == "torchrun":
            continue
        tb = first_traceback(read_log(run_dir, name))
        if tb:
            rank = int(name.removeprefix("rank"))
            return rank, f"rank {rank} failed: {tb.strip().splitlines()[-1]}", tb
    tail = log.strip().splitlines()[-1] if log.strip() else "torchrun exited without a result"
    return None, tail[:500], None


def _raised(event: Error) -> Diagnosis:
    return event.rank, f"rank {event.rank} raised {event.error or 'an exception'}", event.traceback


def rank_traceback(run_dir: Path, rank: int) -> str | None:
    """The first traceback in rank<R>.log, None when there is none (or no such log)."""
    return first_traceback(read_log(run_dir, f"rank{rank}"))


def first_traceback(text: str | None) -> str | None:
    """The first Python traceback in a log's text, up to and including its exception line."""
    if not text:
        return None
    start = text.find("Traceback (most recent call last)")
    if start < 0:
        return None
    lines = text[start:].splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        out.append(line)
        if line and not line.startswith((" ", "\t", "Traceback", "During handling", "The above")):
            break  # the exception line closes the traceback
    return "\n".join(out)


def rank_nodes(run_dir: Path) -> dict[int, str]:
    """The node each rank ran on, from the ranks' `started` events ({} for runs written before they named it)."""
    try:
        text = (run_dir / "events.jsonl").read_text(errors="replace")
    except OSError:
        return {}
    events = (parse_event(line) for line in text.splitlines())
    return {e.rank: e.host for e in events if isinstance(e, Started) and e.host}


def with_node(error: str, run_dir: Path, rank: int | None) -> str:
    """`error` naming the failing rank's node, where the run spanned several nodes (on one it says nothing)."""
    nodes = rank_nodes(run_dir)
    if rank is None or rank not in nodes or len(set(nodes.values())) < 2:
        return error
    return f"{error} (rank {rank} ran on node {nodes[rank]})"
