"""Our pipeline schedules against PyTorch's own (`torch.distributed.pipelining`), on the same stages.

Both sides run the same GPT stages (runner.gpt.model's GPT cut by cut_stage, name-seeded weights: stage s holds layers
[s*L/p, (s+1)*L/p), the embedding on the first, ln_f + LM head on the last) on the same global batch cut
into the same m microbatches, over the same gloo ranks. Ours is `PipelineGPT.forward_backward` (the very
code a `pipeline` run executes: `gpipe` / `one_f_one_b` over counted isend/recv); theirs wraps a second
copy of the stage in `PipelineStage` and runs `ScheduleGPipe` / `Schedule1F1B` with `scale_grads=False`
and a loss of CE / m per microbatch, which is our loss (mean over the global batch). Each side then sums
the tied embedding / LM head gradient between first and last stage the same way, so a step leaves the
reference gradients on both. A step is zero_grad + forward + backward (no optimizer: that is not the
schedule's work), timed from barrier to barrier. Every round runs each configuration once (rotated
order) with ours and theirs back to back, flipping which goes first every round, so drift in the
machine hits both alike. Before timing, the summed losses and every gradient are compared. Only p
values up to the usable cores run by default. The bubble, taken apart, is bench/bench_bubble.py's.

Run: `python bench/bench_pipeline.py` (or `make bench`; `--quick` or BENCH_QUICK=1 for a short run). It
starts torchrun itself and writes the "## Pipeline parallelism" section of bench/RESULTS.md.
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

from bench.results import (  # noqa: E402
    compare_sentence,
    exit_worker,
    machine_lines,
    quick_mode,
    run_worker,
    spread,
    usable_cores,
    write_section,
)

# 8 layers split over 2 or 4 stages; batch 16 so every m in MICROBATCHES divides it. Small enough that
# p = 4 (4 ranks on 2 cores) runs every configuration in a couple of minutes.
DIMS = {"n_layer": 8, "n_head": 4, "n_embd": 128, "vocab_size": 512, "block_size": 64}
BATCH, SEED = 16, 0
# Two sizes (n_embd, seq): matmuls dominate the first, so both sides should tie there; the second is so
# small that per-microbatch framework work (scheduling, messaging, autograd bookkeeping) is what is timed.
SIZES = {"compute-bound": (128, 64), "overhead-bound": (32, 8)}
MICROBATCHES = (1, 2, 4, 8, 16)
SCHEDULES = ("gpipe", "1f1b")
FULL = {"warmup": 2, "rounds": 9, "microbatches": list(MICROBATCHES)}
QUICK = {"warmup": 1, "rounds": 3, "microbatches": [1, 4, 16]}


def worker(out_path: str, microbatches: list[int], n_embd: int, seq: int, warmup: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from runner.gpt.build import build_parallel_gpt
    from runner.gpt.mesh import Mesh
    from runner.job.data import synthetic_batch
    from runner.job.resources import pin_rank
    from runner.spec.run_spec import RunSpec
    from runner.spec.strategies.dims import ParallelDims

    # Each rank on its own core, as a job pins them (before the process group, so gloo's threads follow).
    pin_rank(int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    p, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cpu")
    mesh = Mesh.build(ParallelDims(pp=p))
    dims = {**DIMS, "n_embd": n_embd}
    spec = RunSpec(strategy="pipeline", model="custom", **dims, pp=p, batch=BATCH, seq=seq, seed=SEED)
    ours = build_parallel_gpt(spec, mesh, device, torch.float32)  # the pipeline engine, as a job builds it
    their_module = build_parallel_gpt(spec, mesh, device, torch.float32).stage  # same name-seeded weights
    first, last = rank == 0, rank == p - 1
    idx, targets = synthetic_batch(DIMS["vocab_size"], BATCH, seq, SEED, step=0)
    tied_theirs = their_module.transformer.wte.weight if first else (their_module.lm_head.weight if last else None)

    theirs: dict[tuple[str, int], object] = {}

    def supported(schedule: str, m: int) -> bool:
        # Schedule1F1B refuses fewer microbatches than stages (ours runs it: warm-up then cool-down only).
        return schedule == "gpipe" or m >= p

    def their_schedule(schedule: str, m: int):
        if (schedule, m) not in theirs:

            def loss_fn(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(out.flatten(0, 1), tgt.flatten()) / m

            stage = PipelineStage(their_module, rank, p, device)
            cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            theirs[(schedule, m)] = cls(stage, n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
        return theirs[(schedule, m)]

    def run_theirs(schedule: str, m: int) -> float | None:
        sched = their_schedule(schedule, m)
        losses: list[torch.Tensor] = []
        if first:
            sched.step(idx, return_outputs=False)
        elif last:
            sched.step(target=targets, losses=losses, return_outputs=False)
        else:
            sched.step(return_outputs=False)
        if tied_theirs is not None and mesh.embed is not None:
            mesh.embed.all_reduce(tied_theirs.grad)
        return sum(x.item() for x in losses) if last else None

    def run_ours(schedule: str, m: int, start: float) -> float | None:
        ours.n_micro, ours.schedule = m, schedule
        mesh.clock.start_step()  # as the job starts a step: the spans' origin
        ours.begin_step(0, start)
        loss = ours.forward_backward(idx, targets)
        ours.take_spans()
        return loss

    def zero_grad() -> None:
        for module in (ours.stage, their_module):
            module.zero_grad(set_to_none=True)

    # ---- same losses and gradients, for every configuration ----
    checks: dict[str, dict] = {}
    for schedule in SCHEDULES:
        for m in microbatches:
            zero_grad()
            loss_ours = run_ours(schedule, m, time.perf_counter())
            if not supported(schedule, m):
                continue
            loss_theirs = run_theirs(schedule, m)
            grad_diff = max(
                (a.grad - b.grad).abs().max().item()
                for a, b in zip(ours.stage.parameters(), their_module.parameters(), strict=True)
            )
            checks[f"{schedule}/{m}"] = {
                "loss_ours": loss_ours,
                "loss_theirs": loss_theirs,
                "grad_diff": grad_diff,
            }

    # ---- timing: every configuration once per round (rotated), ours and theirs back to back ----
    def step(side: str, schedule: str, m: int) -> float:
        zero_grad()
        mesh.stats.reset()
        mesh.stats.counting = side == "ours"
        dist.barrier()
        start = time.perf_counter()
        if side == "ours":
            run_ours(schedule, m, start)
        else:
            run_theirs(schedule, m)
        dist.barrier()  # the step ends when the slowest stage ends
        mesh.stats.counting = False
        return time.perf_counter() - start

    configs = [(s, m) for s in SCHEDULES for m in microbatches]
    times = {f"{s}/{m}": {"ours": [], "theirs": []} for s, m in configs}
    inflight = dict.fromkeys(times, 0)
    for r in range(warmup + rounds):
        for schedule, m in configs[r % len(configs) :] + configs[: r % len(configs)]:
            key = f"{schedule}/{m}"
            for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                if side == "theirs" and not supported(schedule, m):
                    continue
                ours.max_inflight = 0
                seconds = step(side, schedule, m)
                if side == "ours":
                    inflight[key] = max(inflight[key], ours.max_inflight)
                if r >= warmup:
                    times[key][side].append(seconds)
    mine = {"checks": checks, "inflight": inflight}
    gathered: list[dict] = [{} for _ in range(p)]
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        # Times are the same on every rank (barrier to barrier); checks and in-flight counts are per stage.
        Path(out_path).write_text(json.dumps({"p": p, "times": times, "stages": gathered}))
    dist.destroy_process_group()


def launch(p: int, microbatches: list[int], size: str, settings: dict) -> dict:
    n_embd, seq = SIZES[size]
    result = run_worker(__file__, p, "--n-embd", str(n_embd), "--seq", str(seq),
                        "--microbatches", *map(str, microbatches),
                        "--warmup", str(settings["warmup"]), "--rounds", str(settings["rounds"]))  # fmt: skip
    return {**result, "size": size}


def check(res: dict) -> dict[str, float]:
    """Worst loss and gradient difference ours vs theirs per configuration; raises if they differ."""
    worst: dict[str, float] = {}
    for key in res["times"]:
        if key not in res["stages"][0]["checks"]:
            continue
        checks = [stage["checks"][key] for stage in res["stages"]]
        last = checks[-1]
        loss_diff = abs(last["loss_ours"] - last["loss_theirs"])
        grad_diff = max(c["grad_diff"] for c in checks)
        assert loss_diff < 1e-5 and grad_diff < 1e-5, f"p={res['p']} {key}: ours and theirs differ: {checks}"
        worst[key] = max(loss_diff, grad_diff)
    return worst


def pair_ratios(t: dict) -> list[float]:
    """ours / theirs of the two back-to-back steps of each round."""
    return [a / b for a, b in zip(t["ours"], t["theirs"], strict=True)]


def section(results: list[dict], settings: dict, skipped: list[int], quick: bool) -> str:
    d = DIMS
    lines = [
        "## Pipeline parallelism",
        "",
        f"`python bench/bench_pipeline.py{' --quick' if quick else ''}`, {time.strftime('%Y-%m-%d %H:%M')}. Ours: "
        "`PipelineGPT.forward_backward` (runner/gpt/pipeline.py: `gpipe` / `one_f_one_b`). Theirs: PyTorch's "
        "`torch.distributed.pipelining` (`PipelineStage`, `ScheduleGPipe` / `Schedule1F1B`, `scale_grads=False`) "
        "on the same stages.",
        "",
        *machine_lines(),
        f"- model: {d['n_layer']} layers split evenly over p stages, n_head {d['n_head']}, vocab {d['vocab_size']}, "
        f"float32; batch {BATCH} rows cut into m microbatches; sizes: "
        + "; ".join(f"{k} = n_embd {e}, seq {q}" for k, (e, q) in SIZES.items())
        + "; same weights (name-seeded), inputs and microbatches on both sides",
        "- step: zero_grad + forward + backward (loss = mean over the global batch) + the tied embedding's "
        f"gradient sum; barrier to barrier; {settings['warmup']} warm-up round(s), then {settings['rounds']} rounds, "
        "each running every configuration once (rotated order), ours and theirs back to back (order flipped every "
        "round); a trial's ratio is ours / theirs within one round. Ours runs with its instrumentation on (counted "
        "messages, spans, saved-activation bytes), as a `pipeline` run does",
        "- in flight: most microbatch activations the first stage held at once (GPipe m, 1F1B p)",
        "- the bubble of our pipeline, taken apart, is in the section 'Pipeline bubble'",
        "",
        "| size | p | m | schedule | ours median (ms) | theirs median (ms) | ours / theirs: median (range) "
        "| in flight | max abs diff loss, grads |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    refused = []
    for res in results:
        p = res["p"]
        worst = check(res)
        for key, t in res["times"].items():
            schedule, m = key.split("/")
            ours = statistics.median(t["ours"]) * 1e3
            if t["theirs"]:
                med, lo, hi = spread(pair_ratios(t))
                vs = f"{statistics.median(t['theirs']) * 1e3:.1f} | {med:.2f} ({lo:.2f}..{hi:.2f})"
            else:
                vs = "refused | -"
                if f"p {p} m {m}" not in refused:
                    refused.append(f"p {p} m {m}")
            diff = f"{worst[key]:.1e}" if key in worst else "-"
            inflight = res["stages"][0]["inflight"][key]
            lines.append(f"| {res['size']} | {p} | {m} | {schedule} | {ours:.1f} | {vs} | {inflight} | {diff} |")
    lines += ["", *sentences(results, refused, skipped)]
    return "\n".join(lines) + "\n"


def sentences(results: list[dict], refused: list[str], skipped: list[int]) -> list[str]:
    """What the table says, written from it."""
    out = []
    for size in SIZES:
        mine = [
            (res, key, t) for res in results if res["size"] == size for key, t in res["times"].items() if t["theirs"]
        ]
        if not mine:
            continue
        medians = [statistics.median(pair_ratios(t)) for _, _, t in mine]
        straddle = sum(min(pair_ratios(t)) < 1 < max(pair_ratios(t)) for _, _, t in mine)
        best = min(zip(medians, mine, strict=True), key=lambda x: x[0])
        worst = max(zip(medians, mine, strict=True), key=lambda x: x[0])
        name = lambda item: f"p {item[1][0]['p']} {item[1][1].replace('/', ' m ')}"  # noqa: E731
        out.append(
            "- "
            + compare_sentence(f"{size}, over {len(mine)} configurations", medians, "configuration medians")
            + f" Best {best[0]:.2f} ({name(best)}), worst {worst[0]:.2f} ({name(worst)}); in {straddle} of "
            f"{len(mine)} configurations the trials themselves went both ways."
        )
    diffs = {
        schedule: max(
            (check(res).get(k, 0.0) for res in results for k in res["times"] if k.startswith(schedule)), default=0.0
        )
        for schedule in SCHEDULES
    }
    text = (
        f"- Same results: losses and gradients agree to {max(diffs.values()):.1e} at most "
        f"(gpipe {diffs['gpipe']:.1e}, 1f1b {diffs['1f1b']:.1e})"
    )
    if diffs["gpipe"] > 0 and diffs["1f1b"] == 0:
        text += (
            "; only gpipe differs at all: ours runs its backwards last-in first-out as GPipe does, theirs first-in "
            "first-out, so float32 gradients are summed in another order"
        )
    out.append(text + ".")
    inflight = {
        f"{s} m {m}": {res["stages"][0]["inflight"][f"{s}/{m}"] for res in results}
        for s in SCHEDULES
        for m in sorted({int(k.split("/")[1]) for res in results for k in res["times"]})
    }
    out.append(
        "- In flight on the first stage, by schedule and m (over sizes and p): "
        + ", ".join(f"{k}: {'/'.join(map(str, sorted(v)))}" for k, v in inflight.items())
        + "."
    )
    if refused:
        out.append(f"- Schedule1F1B refused m < p ({', '.join(refused)}); ours runs it (warm-up then cool-down).")
    if skipped:
        out.append(
            f"- not run: p {', '.join(map(str, skipped))} (more ranks than the {usable_cores()} usable cores; "
            "pass --p to run them anyway)."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--p", type=int, nargs="*", help="pipeline degrees (default: 2 and 4, up to the usable cores)")
    parser.add_argument("--microbatches", type=int, nargs="*")
    parser.add_argument("--n-embd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", nargs="*", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="a short run (also BENCH_QUICK=1)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.microbatches, args.n_embd, args.seq, args.warmup, args.rounds)
        exit_worker()
    quick = quick_mode(args.quick)
    settings = QUICK if quick else FULL
    microbatches = args.microbatches or settings["microbatches"]
    wanted = args.p or [2, 4]
    run = [p for p in wanted if args.p or p <= usable_cores()]
    skipped = [p for p in wanted if p not in run]
    results = [launch(p, microbatches, size, settings) for size in args.size for p in run]
    text = section(results, settings, skipped, quick)
    print(text)
    if not args.no_write:
        write_section("Pipeline parallelism", text, REPO / "bench" / "RESULTS.md")


if __name__ == "__main__":
    main()
