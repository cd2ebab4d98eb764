"""Our pipeline schedules against PyTorch's own (`torch.distributed.pipelining`), and the measured bubble.

Both sides run the same GPT stages (runner.gpt.model.GPTStage, name-seeded weights: stage s holds layers
[s*L/p, (s+1)*L/p), the embedding on the first, ln_f + LM head on the last) on the same global batch cut
into the same m microbatches, over the same gloo ranks. Ours is `PipelineGPT.forward_backward` (the very
code a `pipeline` run executes: `gpipe` / `one_f_one_b` over counted isend/recv); theirs wraps a second
copy of the stage in `PipelineStage` and runs `ScheduleGPipe` / `Schedule1F1B` with `scale_grads=False`
and a loss of CE / m per microbatch, which is our loss (mean over the global batch). Each side then sums
the tied embedding / LM head gradient between first and last stage the same way, so a step leaves the
reference gradients on both. A step is zero_grad + forward + backward (no optimizer: that is not the
schedule's work), timed from barrier to barrier, alternating ours and theirs every round so drift in
the machine hits both alike. Before timing, the summed losses and every gradient are compared.

The bubble is measured as a `pipeline` run measures it: per stage, time blocked in recv plus time waiting
at the end-of-step barrier, over the step time; overall = mean over stages, beside (p-1)/(m+p-1).

Run: `python bench/bench_pipeline.py` (or `make bench`). It starts torchrun itself for p in {2, 4} and
writes the "## Pipeline parallelism" section of bench/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import write_section  # noqa: E402
from runner.spec import torchrun_launcher  # noqa: E402

# 8 layers split over 2 or 4 stages; batch 16 so every m in MICROBATCHES divides it. Small enough that
# p = 4 (4 ranks on 2 cores) runs every configuration in a couple of minutes.
DIMS = {"n_layer": 8, "n_head": 4, "n_embd": 128, "vocab_size": 512, "block_size": 64}
BATCH, SEED = 16, 0
# Two sizes (n_embd, seq): matmuls dominate the first, so both sides should tie there; the second is so
# small that per-microbatch framework work (scheduling, messaging, autograd bookkeeping) is what is timed.
SIZES = {"compute-bound": (128, 64), "overhead-bound": (32, 8)}
MICROBATCHES = (1, 2, 4, 8, 16)
SCHEDULES = ("gpipe", "1f1b")
WARMUP, ROUNDS = 2, 9


def worker(out_path: str, microbatches: list[int], n_embd: int, seq: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from runner.gpt.data import synthetic_batch
    from runner.gpt.mesh import Mesh
    from runner.gpt.pipeline import PipelineGPT
    from runner.spec import RunSpec

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    p, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cpu")
    mesh = Mesh.build(1, p, 1)
    dims = {**DIMS, "n_embd": n_embd}
    spec = RunSpec(strategy="pipeline", model="custom", **dims, pp=p, batch=BATCH, seq=seq, seed=SEED)
    ours = PipelineGPT(spec, mesh, device, torch.float32)
    their_module = ours.build_stage()  # a second stage with the same name-seeded weights
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

    # ---- timing and the measured bubble ----
    def step(side: str, schedule: str, m: int) -> tuple[float, float]:
        zero_grad()
        mesh.stats.reset()
        mesh.stats.counting = side == "ours"
        dist.barrier()
        start = time.perf_counter()
        if side == "ours":
            run_ours(schedule, m, start)
        else:
            run_theirs(schedule, m)
        work_end = time.perf_counter()
        dist.barrier()  # the step ends when the slowest stage ends; waiting for it is bubble too
        end = time.perf_counter()
        mesh.stats.counting = False
        idle = mesh.stats.idle_s + (end - work_end)
        return end - start, idle / (end - start)

    times: dict[str, dict[str, list[float]]] = {}
    bubbles: dict[str, list[float]] = {}
    inflight: dict[str, int] = {}
    for schedule in SCHEDULES:
        for m in microbatches:
            key = f"{schedule}/{m}"
            times[key] = {"ours": [], "theirs": []}
            bubbles[key] = []
            ours.max_inflight = 0
            for r in range(WARMUP + ROUNDS):
                for side in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                    if side == "theirs" and not supported(schedule, m):
                        continue
                    seconds, bubble = step(side, schedule, m)
                    if r >= WARMUP:
                        times[key][side].append(seconds)
                        if side == "ours":
                            bubbles[key].append(bubble)
            inflight[key] = ours.max_inflight
    mine = {"checks": checks, "bubbles": bubbles, "inflight": inflight}
    gathered: list[dict] = [{} for _ in range(p)]
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        # Times are the same on every rank (barrier to barrier); bubbles and checks are per stage.
        Path(out_path).write_text(json.dumps({"p": p, "times": times, "stages": gathered}))
    dist.destroy_process_group()


def launch(p: int, microbatches: list[int], size: str) -> dict:
    n_embd, seq = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        argv = [
            *torchrun_launcher(p),
            str(Path(__file__).resolve()), "--worker", str(out), "--n-embd", str(n_embd), "--seq", str(seq),
            "--microbatches", *map(str, microbatches),
        ]  # fmt: skip
        subprocess.run(argv, cwd=REPO, env=env, check=True)
        return {**json.loads(out.read_text()), "size": size}


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


def cpu_name() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def section(results: list[dict]) -> str:
    import torch

    d = DIMS
    lines = [
        "## Pipeline parallelism",
        "",
        f"`python bench/bench_pipeline.py`, {time.strftime('%Y-%m-%d')}. Ours: `PipelineGPT.forward_backward` "
        "(runner/gpt/pipeline.py: `gpipe` / `one_f_one_b`). Theirs: PyTorch's `torch.distributed.pipelining` "
        "(`PipelineStage`, `ScheduleGPipe` / `Schedule1F1B`, `scale_grads=False`) on the same stages.",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        "CPU ranks, gloo, one thread per rank",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
        f"- model: {d['n_layer']} layers split evenly over p stages, n_head {d['n_head']}, vocab {d['vocab_size']}, "
        f"float32; batch {BATCH} rows cut into m microbatches; sizes: "
        + "; ".join(f"{k} = n_embd {e}, seq {q}" for k, (e, q) in SIZES.items())
        + "; same weights (name-seeded), inputs and microbatches on both sides",
        "- step: zero_grad + forward + backward (loss = mean over the global batch) + the tied embedding's "
        f"gradient sum; {WARMUP} warm-up rounds, then {ROUNDS} rounds alternating ours/theirs; barrier to barrier",
        "- bubble (ours, measured): per stage (recv wait + end-of-step barrier wait) / step time, mean over "
        "stages and timed rounds; theory (p-1)/(m+p-1)",
        "- in flight: most microbatch activations one stage held at once (first stage; GPipe m, 1F1B p)",
        "",
        "| size | p | m | schedule | ours median (ms) | theirs median (ms) | ours / theirs | bubble measured "
        "| bubble theory | per stage | in flight | max abs diff loss, grads |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for res in results:
        p = res["p"]
        worst = check(res)
        for key, t in res["times"].items():
            schedule, m = key.split("/")
            m = int(m)
            ours = statistics.median(t["ours"]) * 1e3
            theirs = statistics.median(t["theirs"]) * 1e3 if t["theirs"] else None
            per_stage = [statistics.fmean(stage["bubbles"][key]) for stage in res["stages"]]
            measured = statistics.fmean(per_stage)
            theory = (p - 1) / (m + p - 1)
            inflight = res["stages"][0]["inflight"][key]
            vs = f"{theirs:.1f} | {ours / theirs:.2f}" if theirs else "refused (m < p) | -"
            diff = f"{worst[key]:.1e}" if key in worst else "-"
            lines.append(
                f"| {res['size']} | {p} | {m} | {schedule} | {ours:.1f} | {vs} | {measured:.2f} "
                f"| {theory:.2f} | {' '.join(f'{b:.2f}' for b in per_stage)} | {inflight} | {diff} |"
            )
    lines.append("")
    for size in SIZES:
        ratios = [
            statistics.median(t["ours"]) / statistics.median(t["theirs"])
            for res in results
            if res["size"] == size
            for t in res["times"].values()
            if t["theirs"]
        ]
        if ratios:
            lines.append(f"Ratio ours/theirs, {size}, over {len(ratios)} configurations: median "
                         f"{statistics.median(ratios):.2f}, best {min(ratios):.2f}, worst {max(ratios):.2f}.")  # fmt: skip
    return "\n".join(lines) + "\n"


NOTES = """
Reading the table. Both sides run the same stages, microbatches and float32 kernels and send the same
activations and gradients, and their losses and gradients agree (last column; the 1e-8 differences are
GPipe's backward order: ours runs backwards last-in first-out as GPipe does, theirs first-in first-out).
So a step is the same arithmetic on both sides and the ratio can only come from per-microbatch framework
work. At the compute-bound size that work is a few percent of a step and the ratios scatter around 1.0
within the noise of this machine; we do not reach the 0.9 we aimed for, and we do not claim to. At the
overhead-bound size the per-microbatch work is what is timed: ours records spans, counts saved-tensor
bytes through an autograd hook, counts every message, and adds one small barrier per step between first
and last stage (so that the last stage's wait for the first one's final backward is booked as bubble,
not as all-reduce time); that instrumentation is the product's point, and it is what costs us there.
Schedule1F1B refuses m < p (ours runs it as warm-up then cool-down).

The measured bubble follows (p-1)/(m+p-1) where the theory's assumptions hold (m = 1, 2: stages wait
for each other) and stays above it for larger m: the theory assumes every stage owns a processor and
free communication, while here p ranks share 2 cores with other work, so a stage that could compute is
often waiting for a core, and the per-microbatch send/recv latency of gloo grows relative to ever
smaller microbatches. With p = 4 on 2 cores at most two stages compute at once, so the measured bubble
cannot fall much below 0.5. In flight: GPipe stores all m microbatches' activations on the first stage,
1F1B at most p (the test suite asserts both, and that the saved bytes equal that count times one
microbatch's). These CPU figures come from a 2-core machine shared with other jobs (load average 4 to
12 during the run): repeated runs move medians by up to 2x at the compute-bound size, so read ratios
and bubbles, not absolute times.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--p", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="*", default=list(MICROBATCHES))
    parser.add_argument("--n-embd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", nargs="*", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.microbatches, args.n_embd, args.seq)
        return
    results = [launch(p, args.microbatches, size) for size in args.size for p in args.p]
    text = section(results)
    print(text)
    if not args.no_write:
        write_section("Pipeline parallelism", text, REPO / "bench" / "RESULTS.md", NOTES)


if __name__ == "__main__":
    main()
