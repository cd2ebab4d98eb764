"""The pipeline bubble as our pipeline measures it, beside (p-1)/(m+p-1), and what that formula leaves out.

p = 2 stages on 2 ranks, each pinned to its own core (as a `pipeline` job pins them), so a stage that
could compute never waits for a core of its own; the seconds a rank still spent runnable but waiting for
a core (other processes on the machine) are read from /proc/self/schedstat and reported. The model is
the `small` preset (runner/gpt/config.py) cut into two stages; every step is the job's training step:
zero_grad, `PipelineGPT.forward_backward` (gpipe or 1f1b over m microbatches, then the tied embedding /
LM head gradient sum between first and last stage), AdamW, then the end-of-step barrier.

Measured bubble = a `pipeline` job's own figure: per stage, idle seconds (time blocked in recv, waiting
for the peer before the tied-embedding sum, waiting at the end-of-step barrier; CommStats.idle_s plus
the barrier) over the step time, mean over stages. The formula assumes equal stages, free and instant
communication and nothing but the schedule in a step. Each step is therefore also taken apart from the
pipeline's spans and the benchmark's own clock: forward and backward compute per stage (which shows how
unequal the stages are: the last one also runs ln_f, the LM head and the loss), recv waits, send
posting, sends completing plus the tied-embedding all-reduce after the last backward, the optimizer step
and the barrier. From the measured per-microbatch stage times it also gives the bubble the same
schedule would have with those unequal stages and free communication: T = sum_s c_s + (m-1) max_s c_s
for forward and backward alike, stage s idle 1 - m c_s / T.

Configurations run round-robin (every round runs each schedule and m once), so drift in the machine
hits them alike. Run: `python bench/bench_bubble.py` (or `make bench`; `--quick` or BENCH_QUICK=1 for a
short run). It writes the "## Pipeline bubble" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import exit_worker, machine_lines, quick_mode, run_worker, signed, write_section  # noqa: E402

P = 2
MODEL, BATCH, SEQ, SEED = "small", 16, 32, 0
SCHEDULES = ("gpipe", "1f1b")
FULL = {"warmup": 2, "rounds": 8, "microbatches": [1, 2, 4, 8, 16]}
QUICK = {"warmup": 1, "rounds": 2, "microbatches": [1, 4, 16]}
# Parts of a step, in seconds per stage; they add up to the step (`other`: Python between the parts).
PARTS = ("forward", "backward", "recv_wait", "send", "tail", "tied_wait", "tied_all_reduce", "optimizer", "barrier")


def worker(out_path: str, warmup: int, rounds: int, microbatches: list[int]) -> None:
    import torch
    import torch.distributed as dist

    from runner.gpt.build import build_parallel_gpt
    from runner.gpt.mesh import Mesh
    from runner.gpt.pipeline import PipelineGPT
    from runner.job.data import synthetic_batch
    from runner.job.resources import cpu_wait_ns, pin_rank
    from runner.spec.run_spec import RunSpec
    from runner.spec.strategies.dims import ParallelDims

    rank = int(os.environ["RANK"])
    core = pin_rank(int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", P)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = Mesh.build(ParallelDims(pp=P))
    spec = RunSpec(strategy="pipeline", model=MODEL, pp=P, batch=BATCH, seq=SEQ, seed=SEED)

    class Timed(PipelineGPT):
        """The product's pipeline; only the tied-embedding sum is timed from outside, split into the wait
        for the peer (idle, as the pipeline books it) and the all-reduce itself."""

        tied: tuple[float, float] = (0.0, 0.0)

        def sync_tied_embedding(self) -> None:
            idle0, start = self.mesh.stats.idle_s, time.perf_counter()
            super().sync_tied_embedding()
            wait = self.mesh.stats.idle_s - idle0
            self.tied = (wait, time.perf_counter() - start - wait)

    built = build_parallel_gpt(spec, mesh, torch.device("cpu"), torch.float32)  # the job's stage and output
    model = Timed(built.stage, built.output, mesh, built.device, built.dtype, schedule=spec.schedule)
    assert model.tied_weight() is not None, "p = 2: both stages hold the tied embedding / LM head"
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    clock = mesh.clock  # runner/gpt/timing.py: the spans' origin is the clock's, taken as the job takes it
    idx, targets = synthetic_batch(spec.model_config().vocab_size, BATCH, SEQ, SEED, step=0)

    def step(schedule: str, m: int) -> dict[str, float]:
        model.schedule, model.n_micro = schedule, m
        mesh.stats.reset()
        mesh.stats.counting = True
        dist.barrier()
        wait0 = cpu_wait_ns()
        start = time.perf_counter()
        clock.start_step()
        model.begin_step(0, start)
        optimizer.zero_grad(set_to_none=True)
        model.tied = (0.0, 0.0)
        model.forward_backward(idx, targets)
        fb_end = time.perf_counter()
        optimizer.step()
        work_end = time.perf_counter()
        dist.barrier()
        end = time.perf_counter()
        wait1 = cpu_wait_ns()
        mesh.stats.counting = False
        parts = dict.fromkeys(PARTS, 0.0)
        spans = model.take_spans()
        for span in spans:
            parts[span["phase"]] = parts.get(span["phase"], 0.0) + span["end"] - span["start"]
        schedule_end = max(span["end"] for span in spans)
        parts["tied_wait"], parts["tied_all_reduce"] = model.tied
        # Between the schedule's last span and the tied-embedding sum: reading the loss, Python.
        parts["tail"] = (fb_end - start) - schedule_end - sum(model.tied)
        parts["optimizer"] = work_end - fb_end
        parts["barrier"] = end - work_end
        parts["step"] = end - start
        parts["idle"] = mesh.stats.idle_s + parts["barrier"]
        parts["schedule"] = schedule_end
        parts["cpu_wait"] = (wait1 - wait0) / 1e9 if wait0 is not None and wait1 is not None else float("nan")
        return parts

    configs = [(s, m) for s in SCHEDULES for m in microbatches]
    steps: dict[str, list[dict[str, float]]] = {f"{s}/{m}": [] for s, m in configs}
    for r in range(warmup + rounds):
        # Round-robin, in a rotated order every round, so no configuration always follows the same one.
        for s, m in configs[r % len(configs) :] + configs[: r % len(configs)]:
            parts = step(s, m)
            if r >= warmup:
                steps[f"{s}/{m}"].append(parts)
    gathered: list[dict] = [{} for _ in range(P)]
    dist.all_gather_object(gathered, {"steps": steps, "core": core})
    if rank == 0:
        Path(out_path).write_text(json.dumps({"stages": gathered}))
    dist.destroy_process_group()


def launch(settings: dict) -> dict:
    return run_worker(__file__, P, "--warmup", str(settings["warmup"]), "--rounds", str(settings["rounds"]),
                      "--microbatches", *map(str, settings["microbatches"]))  # fmt: skip


def unequal_stage_bubble(forward: list[float], backward: list[float], m: int) -> float:
    """Mean idle share of the stages when stage s takes forward[s] and backward[s] per microbatch and
    messages are free: the m forwards stream through the stages at the pace of the slowest one, after
    the first microbatch has crossed all of them, and the backwards likewise, so a step lasts
    T = sum_s (f_s + b_s) + (m - 1)(max f + max b) and stage s works m (f_s + b_s) of it. With equal
    stages this is (p-1)/(m+p-1)."""
    step = sum(forward) + sum(backward) + (m - 1) * (max(forward) + max(backward))
    return statistics.fmean(1 - m * (f + b) / step for f, b in zip(forward, backward, strict=True))


def mean_part(stage: dict, key: str, part: str) -> float:
    return statistics.fmean(s[part] for s in stage["steps"][key])


def analyse(res: dict, key: str) -> dict:
    """Everything the table and the sentences say about one (schedule, m), from the per-step parts."""
    schedule, m = key.split("/")
    m = int(m)
    stages = res["stages"]
    step = [mean_part(st, key, "step") for st in stages]
    measured = statistics.fmean(mean_part(st, key, "idle") / t for st, t in zip(stages, step, strict=True))
    # Per-microbatch compute of each stage, forward and backward apart, from the spans.
    f = [mean_part(st, key, "forward") / m for st in stages]
    b = [mean_part(st, key, "backward") / m for st in stages]
    unequal = unequal_stage_bubble(f, b, m)
    # The schedule alone, as measured, comparable with the model: per step, the window ends with the last
    # span on any stage; a stage idles in it while blocked in recv and after its own last span.
    in_schedule = []
    for per_step in zip(*(st["steps"][key] for st in stages), strict=True):
        window = max(s["schedule"] for s in per_step)
        in_schedule += [(s["recv_wait"] + window - s["schedule"]) / window for s in per_step]
    share = {
        part: statistics.fmean(mean_part(st, key, part) / t for st, t in zip(stages, step, strict=True))
        for part in (*PARTS, "cpu_wait")
    }
    share["other"] = 1 - sum(share[p] for p in PARTS)
    per_stage_compute = [(fs + bs) * 1e3 for fs, bs in zip(f, b, strict=True)]
    return {
        "schedule": schedule,
        "m": m,
        "theory": (P - 1) / (m + P - 1),
        "measured": measured,
        "per_stage": [mean_part(st, key, "idle") / t for st, t in zip(stages, step, strict=True)],
        "unequal": unequal,
        "in_schedule": statistics.fmean(in_schedule),
        "share": share,
        "step_ms": statistics.fmean(step) * 1e3,
        "stage_ms": per_stage_compute,
        "steps": len(stages[0]["steps"][key]),
    }


def section(res: dict, settings: dict, quick: bool) -> str:
    from runner.gpt.config import PRESETS

    cfg = PRESETS[MODEL]
    rows = [analyse(res, key) for key in res["stages"][0]["steps"]]
    cores = [st["core"] for st in res["stages"]]
    pinned = (
        f"pinned to cores {cores[0]} and {cores[1]}" if None not in cores else "not pinned (fewer cores than ranks)"
    )
    lines = [
        "## Pipeline bubble",
        "",
        f"`python bench/bench_bubble.py{' --quick' if quick else ''}`, {time.strftime('%Y-%m-%d %H:%M')}. Our "
        f"`PipelineGPT` (runner/gpt/pipeline.py), p = {P} stages on {P} ranks {pinned}.",
        "",
        *machine_lines(),
        f"- model: `{MODEL}` preset ({cfg.n_layer} layers, {cfg.n_layer // P} per stage, n_embd {cfg.n_embd}, "
        f"vocab {cfg.vocab_size}), float32, batch {BATCH} x seq {SEQ} cut into m microbatches",
        "- step: the job's training step (zero_grad, forward_backward with the tied-embedding sum, AdamW, "
        f"end-of-step barrier); {settings['warmup']} warm-up round(s), then {settings['rounds']} rounds, each "
        "running every configuration once (round-robin, rotated)",
        "- measured: idle / step per stage (recv waits + wait for the peer before the tied-embedding sum + "
        "end-of-step barrier), mean over stages and steps: what a `pipeline` run reports",
        "- theory: (p-1)/(m+p-1); unequal stages: the same schedule with the measured per-microbatch stage "
        "times and free communication; in schedule: the same window measured (from the step start to the last "
        "forward/backward/send span on any stage; a stage idles in it while blocked in recv and after its own last span)",
        "- step shares (mean over stages): compute = forward + backward spans; recv = recv waits; send = the "
        "pipeline's send spans; tail = after the schedule's last span, before the tied-embedding sum; tied = wait for the peer + "
        "the all-reduce itself; opt = AdamW; barrier = end-of-step wait; cpu wait = runnable but waiting "
        "for a core (/proc/self/schedstat, other processes), already inside the other shares",
        "",
        "| schedule | m | step (ms) | stage compute / microbatch (ms) | theory | unequal stages | in schedule "
        "| measured | per stage | compute | recv | send | tail | tied wait + all-reduce | opt | barrier | other "
        "| cpu wait |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["share"]
        lines.append(
            f"| {r['schedule']} | {r['m']} | {r['step_ms']:.0f} | {' / '.join(f'{c:.1f}' for c in r['stage_ms'])} "
            f"| {r['theory']:.2f} | {r['unequal']:.2f} | {r['in_schedule']:.2f} | {r['measured']:.2f} "
            f"| {' '.join(f'{b:.2f}' for b in r['per_stage'])} | {s['forward'] + s['backward']:.0%} "
            f"| {s['recv_wait']:.0%} | {s['send']:.1%} | {s['tail']:.1%} "
            f"| {s['tied_wait']:.0%} + {s['tied_all_reduce']:.1%} | {s['optimizer']:.0%} | {s['barrier']:.0%} "
            f"| {s['other']:.1%} | {s['cpu_wait']:.1%} |"
        )
    lines += ["", *sentences(rows)]
    return "\n".join(lines) + "\n"


def sentences(rows: list[dict]) -> list[str]:
    """What the table says, written from it."""
    out = []
    for schedule in SCHEDULES:
        mine = [r for r in rows if r["schedule"] == schedule]
        lo, hi = mine[0], mine[-1]
        gaps = ", ".join(f"m {r['m']}: {signed(r['measured'] - r['theory'])}" for r in mine)
        out.append(
            f"- {schedule}: measured {lo['measured']:.2f} against theory {lo['theory']:.2f} at m = {lo['m']}, "
            f"{hi['measured']:.2f} against {hi['theory']:.2f} at m = {hi['m']}; measured minus theory by m: {gaps}."
        )
    all_stage = [r["stage_ms"] for r in rows]
    ratio = statistics.median(s[-1] / s[0] for s in all_stage)
    f1 = [r for r in rows if r["schedule"] == "1f1b"]
    if ratio > 1.05:
        why = (
            f"the last stage computes {ratio:.2f}x what the first does (median over configurations): besides its "
            "layers it runs ln_f, the LM head over the whole vocabulary and the loss, the first only the "
            "embedding lookup"
        )
    else:
        why = f"the last stage computes {ratio:.2f}x what the first does (median over configurations)"
    text = (
        f"- Unequal stages: per microbatch {why}. With the measured stage times and free communication the "
        "schedule alone would idle "
        + ", ".join(f"{r['unequal']:.2f} (theory {r['theory']:.2f})" for r in f1)
        + " for 1f1b by m"
    )
    if f1[-1]["unequal"] > f1[-1]["theory"] + 0.02:
        text += ": the faster stage waits for the slower one in every microbatch, so that part of the bubble does not shrink with m."
    else:
        text += ": at this size the stages are close enough that the model stays near the theory."
    out.append(text)
    for schedule in SCHEDULES:
        mine = [r for r in rows if r["schedule"] == schedule]
        lo, hi = mine[0], mine[-1]
        # Forward + backward over all microbatches, summed over stages; and the same less every second
        # the ranks waited for a core during the step (an upper bound on what other processes added).
        work = [r["m"] * sum(r["stage_ms"]) for r in (lo, hi)]
        waited = [r["share"]["cpu_wait"] * r["step_ms"] * P for r in (lo, hi)]
        net = [w - c for w, c in zip(work, waited, strict=True)]
        if work[1] > 1.1 * work[0]:
            text = (
                f"- Work per step ({schedule}): forward + backward over all microbatches, summed over stages, is "
                f"{work[0]:.0f} ms at m = {lo['m']} and {work[1]:.0f} ms at m = {hi['m']} ({work[1] / work[0]:.1f}x); "
                f"less the time the ranks waited for a core, {net[0]:.0f} and {net[1]:.0f} ms ({net[1] / net[0]:.1f}x)."
            )
            if net[1] > 1.1 * net[0]:
                text += (
                    " So smaller microbatches cost more in total (each reads every weight and adds into every "
                    "weight gradient, whatever its size), which the formula, holding the work constant, leaves out."
                )
            else:
                text += " The growth is the machine's other load, not the microbatches."
            out.append(text)
    big = max(rows, key=lambda r: r["m"])
    s = big["share"]
    outside = s["optimizer"] + s["tied_wait"] + s["tied_all_reduce"] + s["tail"] + s["barrier"]
    out.append(
        f"- Outside the schedule ({big['schedule']}, m = {big['m']}): AdamW takes {s['optimizer']:.0%} of the "
        f"step, the tied-embedding sum {s['tied_wait'] + s['tied_all_reduce']:.0%} (of which waiting for the "
        f"peer {s['tied_wait']:.0%}), the rest after the schedule {s['tail']:.1%}, the end-of-step barrier {s['barrier']:.0%}: "
        f"{outside:.0%} of the step that (p-1)/(m+p-1) does not model. The waits among them (peer, barrier) "
        "count as bubble; AdamW and the all-reduce are work that dilutes it."
    )
    comm = statistics.fmean(r["share"]["send"] + r["share"]["tail"] for r in rows)
    gaps = [r["in_schedule"] - r["unequal"] for r in rows]
    gap = statistics.fmean(gaps)
    if abs(gap) < 0.01:
        verdict = (
            f"matches the unequal-stage model to within 0.01 of the window on average (range "
            f"{signed(min(gaps))}..{signed(max(gaps))}): at this size messages add no idle time the model misses"
        )
    elif gap > 0:
        verdict = (
            f"idles {gap:.2f} of the window more than the unequal-stage model on average (range "
            f"{signed(min(gaps))}..{signed(max(gaps))}): the model takes messages as instant, the measurement includes "
            "each message's latency (gloo over loopback) and the Python between spans"
        )
    else:
        verdict = (
            f"idles {-gap:.2f} of the window less than the unequal-stage model on average (range "
            f"{signed(min(gaps))}..{signed(max(gaps))}): message latency is not visible at this size; the stage times "
            "the model uses come from the same noisy spans"
        )
    out.append(
        f"- Communication: the pipeline's send spans and what follows the schedule take {comm:.1%} of a step on "
        "average; the "
        f"measured schedule window {verdict}."
    )
    waits = [r["share"]["cpu_wait"] for r in rows]
    out.append(
        f"- Cores: ranks spent {statistics.fmean(waits):.1%} of a step on average (up to {max(waits):.1%}) runnable "
        "but waiting for their core, i.e. taken by other processes; that time is inside the shares above."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--microbatches", type=int, nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a short run (also BENCH_QUICK=1)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.warmup, args.rounds, args.microbatches)
        exit_worker()
    quick = quick_mode(args.quick)
    settings = QUICK if quick else FULL
    text = section(launch(settings), settings, quick)
    print(text)
    if not args.no_write:
        write_section("Pipeline bubble", text, REPO / "bench" / "RESULTS.md")


if __name__ == "__main__":
    main()
