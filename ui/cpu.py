"""How much of a CPU run's idle time (and pipeline bubble) was waiting for a core rather than for a peer, and
whether the run shared its machine with other processes (`shared_machine`, from runner/job/load.py's figures).

Each rank reports `cpu_wait_s`: seconds its main thread was runnable but had no core, over the timed steps.
A rank that waits for a core cannot compute, so its peers wait for it and count that as idle (or bubble).
The sum of the waits over ranks against the sum of the idle times over ranks is therefore an upper bound on
the share of idle time that is contention: it is "up to", because a wait can also stretch a rank's own
compute time instead of a peer's idle time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ui.format import human_duration


@dataclass(frozen=True)
class Contention:
    wait_s: float  # summed over ranks
    idle_s: float  # summed over ranks
    share: float | None  # of the idle time that may be contention, at most 1; None when nothing was idle


def contention(ranks: list[dict[str, Any]]) -> Contention | None:
    """Summed CPU wait against summed idle time; None when any rank has no CPU wait measured (non-Linux)."""
    waits = [r.get("cpu_wait_s") for r in ranks]
    if not ranks or any(w is None for w in waits):
        return None
    wait = float(sum(waits))
    idle = float(sum(r.get("idle_s") or 0.0 for r in ranks))
    return Contention(wait, idle, min(wait / idle, 1.0) if idle > 0 else None)


def contention_text(ranks: list[dict[str, Any]], bubble: bool = False) -> str | None:
    """One sentence with the arithmetic, e.g. 'ranks waited 1.2 s for a CPU core in total against 2.0 s idle:
    up to 60% of the idle time is contention, not the schedule'; None when the wait was not measured."""
    c = contention(ranks)
    if c is None:
        return None
    head = f"ranks waited {human_duration(c.wait_s)} for a CPU core in total against {human_duration(c.idle_s)} idle"
    what = "the idle time and the bubble" if bubble else "the idle time"
    if c.share is None:
        return f"{head}: nothing was idle, so the wait stretched compute time instead"
    if c.wait_s >= c.idle_s:
        return f"{head}: all of {what} may be contention, not the schedule, and compute times are stretched too"
    return f"{head}: up to {c.share:.0%} of {what} is contention, not the schedule"


def oversubscription_warning(result: dict[str, Any], ranks: list[dict[str, Any]]) -> str | None:
    """The run page's warning for a run marked cpu_oversubscribed (more ranks than cores); None otherwise."""
    if not result.get("cpu_oversubscribed"):
        return None
    world = result.get("world_size") or len(ranks)
    cores = result.get("cpu_cores")
    on = f" on {cores} CPU core{'s' if cores != 1 else ''}" if cores else ""
    head = f"Oversubscribed: {world} ranks{on}, so ranks took turns on the cores."
    detail = contention_text(ranks, bubble=result.get("bubble_fraction") is not None)
    if detail is None:
        return (
            f"{head} The CPU wait was not measured on this system: how much of the idle time is contention is unknown."
        )
    return f"{head} {detail[0].upper()}{detail[1:]}."


# A run is flagged as having shared the machine when other processes took at least this share of the job's
# cores during its timed steps, for certain: the measured share less its tick resolution. A rank that is
# descheduled for another process stretches its step by that time, so a tenth of the cores' time taken can
# slow a step by up to a tenth -- the size of the differences between layouts Compare is asked to tell (issue
# 24's pipeline and data runs differed by 10%). Below it sit the lab's own background costs that every run
# pays alike (the runner's 0.25 s poll and 1 s telemetry sample, about 1% of one core).
SHARED_SHARE = 0.10


def shared_machine(result: dict[str, Any]) -> bool | None:
    """Whether the run shared its machine (see SHARED_SHARE); None for a run that did not measure it."""
    share = result.get("others_cpu_share")
    if share is None:
        return None
    return share - (result.get("others_cpu_share_resolution") or 0.0) >= SHARED_SHARE


def load_text(result: dict[str, Any]) -> str | None:
    """'other processes took 35% (+-4%) of the job's cores during its timed steps; load average 3.1 -> 4.0',
    with what that means when the run shared the machine; None for a run that did not measure it."""
    share = result.get("others_cpu_share")
    if share is None:
        return None
    res = result.get("others_cpu_share_resolution") or 0.0
    text = f"other processes took {share:.0%} (±{res:.0%}) of the job's cores during its timed steps"
    if result.get("load_avg_1m_start") is not None:
        text += f"; 1-minute load average {result['load_avg_1m_start']:.1f} → {result['load_avg_1m_end']:.1f}"
    if shared_machine(result):
        return (f"Shared machine: {text}. Its timings include waiting for those processes: compare it with runs "
                "that had the machine to themselves, or repeat it and read the median.")  # fmt: skip
    return f"Machine while it ran: {text}."
