"""Pipeline schedules as plain lists of operations per rank, and the lockstep plan of their messages (torch-free).

A schedule says, for pipeline rank r of p, holding v model chunks (virtual stages), in which order it runs
its operations on m microbatches. An operation is an `Op(kind, chunk, microbatch)`:
- `F`: the forward of one microbatch through one local chunk;
- `B`: its backward -- the whole backward, or, in a schedule that also has `W` operations, only the
  gradient with respect to the chunk's input (what the previous stage waits for);
- `W`: the rest of a split backward, the gradients of the chunk's weights (nobody waits for them).
Local chunk c of rank r is virtual stage c*p + r (Megatron's layout: rank r holds chunks r, r+p, r+2p, ...),
so a microbatch goes round the ranks v times; with v = 1 the chunk is the stage.

- `gpipe` (Huang et al., 2019): every forward, then every backward, last in first out;
- `1f1b` (PipeDream-Flush, Narayanan et al., 2021): p - r - 1 warm-up forwards, then one forward and one
  backward in turn, then the remaining backwards;
- `interleaved-1f1b` (Narayanan et al., 2021, section 2.2; Megatron-LM's
  forward_backward_pipelining_with_interleaving): the rank's v*m chunk-microbatches in "virtual microbatch"
  order k -- groups of p microbatches, chunk by chunk: forward k runs chunk (k // p) % v on microbatch
  (k // (p*v))*p + k % p, backward k the chunks in reverse -- with 2(p - r - 1) + (v - 1)p warm-up forwards
  (capped at v*m), then forward k + warm-up and backward k in turn, then the remaining backwards;
- `zb-h1` (Qi et al., 2023, "Zero Bubble Pipeline Parallelism", section 3.1): 1F1B with every backward split
  into B and W; rank r runs its W passes r microbatches behind its B passes (torch.distributed.pipelining's
  ZB1P places them the same way), so the B passes travel down the pipeline unhindered and the W passes left
  over fill the cool-down, where 1F1B idles. Every stage then holds at most p microbatches (a microbatch's
  activations live until its W), as 1F1B's first stage does.

The theory of each is runner/job/metrics.py `bubble_fraction_theory` (re-exported here). runner/gpt/pipeline.py
runs these lists as they are (the split backward itself is runner/gpt/schedules.py), and the planner's
simulator (runner/planner/simulate.py) runs the same lists with durations.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

from runner.job.metrics import bubble_fraction_theory

__all__ = ["SCHEDULE_NAMES", "Key", "Op", "RankPlan", "bubble_fraction_theory", "gpipe_ops", "interleaved_ops",
           "lockstep_plan", "message_of", "one_f_one_b_ops", "schedule_ops", "splits_backward", "zb_h1_ops"]  # fmt: skip

SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")


@dataclass(frozen=True)
class Op:
    """One operation of a rank's schedule: kind 'F', 'B' or 'W' on local `chunk` for `microbatch`."""

    kind: str
    chunk: int
    microbatch: int

    def __repr__(self) -> str:  # short, so a failing order comparison reads like the paper's figures
        return f"{self.kind}{self.chunk}.{self.microbatch}"


def gpipe_ops(m: int) -> list[Op]:
    return [Op("F", 0, i) for i in range(m)] + [Op("B", 0, i) for i in reversed(range(m))]


def one_f_one_b_ops(m: int, p: int, rank: int) -> list[Op]:
    warmup = min(p - rank - 1, m)
    ops = [Op("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    return ops + [Op("B", 0, i) for i in range(m - warmup, m)]


def interleaved_ops(m: int, p: int, v: int, rank: int) -> list[Op]:
    """Megatron's interleaved 1F1B for rank `rank` (needs m % p == 0, as Megatron does)."""
    if m % p:
        raise ValueError(f"interleaved-1f1b needs microbatches ({m}) to be a multiple of the pipeline ranks ({p})")
    total = m * v

    def chunk_mb(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k // p) % v
        return (chunk if forward else v - 1 - chunk), (k // (p * v)) * p + k % p

    warmup = min(2 * (p - rank - 1) + (v - 1) * p, total)
    ops = [Op("F", *chunk_mb(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [Op("F", *chunk_mb(warmup + k, True)), Op("B", *chunk_mb(k, False))]
    return ops + [Op("B", *chunk_mb(k, False)) for k in range(total - warmup, total)]


def zb_h1_ops(m: int, p: int, rank: int) -> list[Op]:
    """1F1B whose backwards are split; rank r's W passes run r microbatches behind its B passes."""
    ops: list[Op] = []
    pending_w: collections.deque[int] = collections.deque()
    for op in one_f_one_b_ops(m, p, rank):
        ops.append(op)
        if op.kind == "B":
            pending_w.append(op.microbatch)
            if op.microbatch >= rank:  # the first r backwards leave their W for later
                ops.append(Op("W", 0, pending_w.popleft()))
    return ops + [Op("W", 0, i) for i in pending_w]


def schedule_ops(schedule: str, m: int, p: int, rank: int, v: int = 1) -> list[Op]:
    """Rank `rank`'s operations, in order, for `schedule` over m microbatches, p ranks, v chunks per rank."""
    if schedule != "interleaved-1f1b" and v != 1:
        raise ValueError(f"{schedule} runs one chunk per rank (virtual_stages 1), got {v}")
    if schedule == "gpipe":
        return gpipe_ops(m)
    if schedule == "1f1b":
        return one_f_one_b_ops(m, p, rank)
    if schedule == "interleaved-1f1b":
        return interleaved_ops(m, p, v, rank)
    if schedule == "zb-h1":
        return zb_h1_ops(m, p, rank)
    raise ValueError(f"unknown schedule {schedule!r}; one of {SCHEDULE_NAMES}")


def splits_backward(schedule: str) -> bool:
    """True where the schedule's B computes input gradients only and a W pass the weights'."""
    return schedule == "zb-h1"


# ---- messages and a lockstep plan for them ----------------------------------------------------------------
Key = tuple[str, int, int]  # ("act" | "grad", receiving virtual stage, microbatch)


def message_of(op: Op, p: int, v: int, rank: int) -> tuple[int, Key] | None:
    """(destination pipeline rank, message) that `op` of rank `rank` sends, if any: a forward sends its output
    to the next virtual stage, a backward (B) its input gradient to the previous one, W nothing."""
    j, total = op.chunk * p + rank, p * v
    if op.kind == "F" and j < total - 1:
        return (j + 1) % p, ("act", j + 1, op.microbatch)
    if op.kind == "B" and j > 0:
        return (j - 1) % p, ("grad", j - 1, op.microbatch)
    return None


@dataclass
class RankPlan:
    """One rank's part of a lockstep plan: its operations, and the message exchanges (ticks) it takes part in
    right before each operation and after the last; at each tick the messages it sends and receives."""

    ops: list[Op]
    ticks_before: list[list[int]]
    ticks_after: list[int]
    sends: dict[int, list[tuple[int, Key]]]  # tick -> [(destination pipeline rank, message)]
    recvs: dict[int, list[tuple[int, Key]]]  # tick -> [(source pipeline rank, message)]


@functools.lru_cache(maxsize=64)  # the same plan every step; the engine only reads it
def lockstep_plan(schedule: str, m: int, p: int, v: int = 1) -> list[RankPlan]:
    """Every rank's plan: the schedules run on a model clock (F = 1, B = 2, or B = W = 1 when split), each
    operation as early as its input allows; a message belongs to the tick its producer ends at, and both ends
    exchange it in one batch at that tick -- the sender right after producing it, the receiver before its first
    operation that starts at or after it (Megatron's lockstep send/receive, whatever the real durations).
    Why this cannot deadlock on unbuffered, in-order links: by induction over ticks, once every batch of the
    ticks before t has completed, every rank reaches its batch of tick t (its operations before it need only
    earlier messages), and the batches of tick t match pairwise, so they complete."""
    ops = {r: schedule_ops(schedule, m, p, r, v) for r in range(p)}
    total = p * v
    split = splits_backward(schedule)
    cost = {"F": 1, "B": 1 if split else 2, "W": 1}
    end: dict[tuple[str, int, int], int] = {}
    start_at: dict[int, list[int]] = {r: [] for r in range(p)}
    pc, clock = dict.fromkeys(range(p), 0), dict.fromkeys(range(p), 0)
    while any(pc[r] < len(ops[r]) for r in range(p)):
        moved = False
        for r in range(p):
            while pc[r] < len(ops[r]):
                op = ops[r][pc[r]]
                j, i = op.chunk * p + r, op.microbatch
                dep = {"F": ("F", j - 1, i), "B": ("B", j + 1, i) if j < total - 1 else ("F", j, i),
                       "W": ("B", j, i)}[op.kind]  # fmt: skip
                if op.kind == "F" and j == 0:
                    dep = None
                if dep is not None and dep not in end:
                    break
                start = max(clock[r], end[dep] if dep is not None else 0)
                start_at[r].append(start)
                clock[r] = end[(op.kind, j, i)] = start + cost[op.kind]
                pc[r] += 1
                moved = True
        if not moved:
            raise RuntimeError(f"{schedule} (m={m}, p={p}, v={v}) waits in a cycle at {pc}")
    plans = [RankPlan(ops[r], [[] for _ in ops[r]], [], {}, {}) for r in range(p)]
    for r in range(p):
        for k, op in enumerate(ops[r]):
            msg = message_of(op, p, v, r)
            if msg is not None:
                tick = start_at[r][k] + cost[op.kind]
                plans[r].sends.setdefault(tick, []).append(msg)
                plans[msg[0]].recvs.setdefault(tick, []).append((r, msg[1]))
    for plan in plans:
        ticks = sorted(set(plan.sends) | set(plan.recvs))
        starts = start_at[plans.index(plan)]
        t = 0
        for k in range(len(plan.ops)):
            while t < len(ticks) and ticks[t] <= starts[k]:
                plan.ticks_before[k].append(ticks[t])
                t += 1
        plan.ticks_after = ticks[t:]
    return plans
