"""Our ZeRO-3 (runner/gpt/zero.py) against PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), same GPT.

Both sides train the same GPT-2 (name-seeded weights, runner/gpt/model.py) with float32 AdamW over dp
data-parallel ranks on the same global batches (runner/job/data.py synthetic_batch; rank r takes rows
[r*B/dp, (r+1)*B/dp)), parameters, gradients and optimizer state sharded over the ranks:
- ours: `DataParallelGPT(engine, mesh, zero_stage=3)`, as the job builds it for strategy 'data'
  (per-block flat units, all-gather before use with the next block prefetched, reduce-scatter of each
  block's gradients started during backward), instrumentation off (CommStats.counting and the StepClock
  disabled), so the step is as un-instrumented as theirs;
- theirs: the reference GPT with `fully_shard` on every block and then on the whole model (FSDP2's
  documented recipe; the root stays gathered through the step, as our outer unit does), on a 1-D CPU
  DeviceMesh over gloo, AdamW over its DTensor parameters.
A step is zero_grad, forward, cross entropy, backward, AdamW, and the global mean loss read on the host
(an 8-byte all-reduce on both sides), barrier to barrier. Before timing, the warm-up steps' losses of the
two sides must agree (1e-5 relative): the same training, not just the same shapes.

Timing: rounds of one step per side, the order of the sides flipped every round, so drift in the machine
hits both alike; a trial's ratio is ours / theirs within one round. Memory, per rank, in separate
processes per side (so neither side's state sits in the other's figure): the job's own measure
(runner/job/resources.py MemoryMeter: peak RSS over the timed steps minus the rank's RSS after set-up, before
the model exists), and the bytes each side holds between steps (parameters, gradients, optimizer state;
FSDP2's as the local tensors of its DTensors). Our unsharded data parallelism (zero_stage 0) runs the same
memory measurement as the baseline.

Run: `python bench/bench_zero.py` (or `make bench`; `--quick` or BENCH_QUICK=1 for a short run). It starts
torchrun itself and writes the "## ZeRO-3 against FSDP2" section of bench/RESULTS.md.
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

# The 'small' preset's width and vocabulary with 4 layers: 5.3 M parameters (21 MB float32), so the state
# ZeRO shards (16 bytes a parameter) stands well above the noise of RSS, and a step stays well under a
# second on 2 cores.
DIMS = {"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 8192, "block_size": 128}
BATCH, SEQ, SEED, LR, DP = 8, 64, 0, 1e-3, 2
FULL = {"warmup": 3, "rounds": 15, "mem_steps": 3}
QUICK = {"warmup": 2, "rounds": 4, "mem_steps": 2}


def spec_for(zero_stage: int):
    from runner.spec.run_spec import RunSpec

    return RunSpec.from_dict({"model": "custom", **DIMS, "strategy": "data", "dp": DP, "zero_stage": zero_stage,
                              "batch": BATCH, "seq": SEQ, "seed": SEED, "lr": LR, "workload": "train"})  # fmt: skip


class Ours:
    """Our data parallelism over the job's engine, ZeRO stage `zero_stage`, instrumentation off."""

    def __init__(self, zero_stage: int):
        import torch

        from runner.gpt.build import build_parallel_gpt
        from runner.gpt.mesh import Mesh

        spec = spec_for(zero_stage)
        self.mesh = Mesh.build(spec.degrees)
        self.mesh.stats.counting = False
        self.mesh.stats.clock.enabled = False
        self.model = build_parallel_gpt(spec, self.mesh, torch.device("cpu"), torch.float32)
        self.opt = self.model.make_optimizer(LR)

    def step(self, idx, targets) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.forward_backward(idx, targets)
        self.model.optimizer_step(self.opt)
        return loss

    def held_bytes(self) -> dict[str, int]:
        params = self.model.parameters()
        return {
            "params": sum(p.numel() * p.element_size() for p in params),
            "grads": self.model.figures()["grad_bytes"],
            "optimizer": state_bytes(self.opt),
        }


class Theirs:
    """The reference GPT under FSDP2: fully_shard per block, then the root."""

    def __init__(self):
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from runner.gpt.model import GPT

        model = GPT(spec_for(3).model_config(), seed=SEED)
        mesh = init_device_mesh("cpu", (DP,))
        for block in model.transformer.h.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(self, idx, targets) -> float:
        import torch
        import torch.distributed as dist

        from runner.gpt.model import WholeVocabulary

        rows = rows_of(idx.shape[0])
        self.opt.zero_grad(set_to_none=True)
        loss = WholeVocabulary().loss(self.model(idx[rows]), targets[rows])
        loss.backward()
        self.opt.step()
        total = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(total)
        return total.item() / DP

    def held_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {
            "params": sum(local(p).numel() * p.element_size() for p in params),
            "grads": sum(local(p.grad).numel() * p.element_size() for p in params if p.grad is not None),
            "optimizer": state_bytes(self.opt),
        }


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(opt) -> int:
    """Optimizer state bytes as runner/job/rank.py counts them (local shards of DTensors)."""
    import torch

    total = 0
    for state in opt.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                t = local(t)
                total += t.numel() * t.element_size()
    return total


def rows_of(batch: int) -> slice:
    import torch.distributed as dist

    per = batch // DP
    r = dist.get_rank()
    return slice(r * per, (r + 1) * per)


def batch(step: int):
    from runner.job.data import synthetic_batch

    return synthetic_batch(DIMS["vocab_size"], BATCH, SEQ, SEED, step)


def timed(side, step: int) -> tuple[float, float]:
    import torch.distributed as dist

    idx, targets = batch(step)
    dist.barrier()
    start = time.perf_counter()
    loss = side.step(idx, targets)
    dist.barrier()
    return time.perf_counter() - start, loss


def worker_time(out: str, warmup: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    sides = {"ours": Ours(3), "theirs": Theirs()}
    losses: dict[str, list[float]] = {"ours": [], "theirs": []}
    for s in range(warmup):  # both sides from the same weights through the same batches
        for name, side in sides.items():
            losses[name].append(timed(side, s)[1])
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for r in range(rounds):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for name in order:
            times[name].append(timed(sides[name], warmup + r)[0])
    # Ours, one more step counted: what it put on the network (the timing above ran uncounted).
    ours = sides["ours"]
    ours.mesh.stats.counting = True
    timed(ours, warmup + rounds)
    ours.mesh.stats.counting = False
    comm = ours.mesh.stats.as_dict()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"losses": losses, "times": times, "ours_comm": comm}))
    dist.destroy_process_group()


def worker_memory(out: str, side: str, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from runner.job.resources import MemoryMeter

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    meter = MemoryMeter.after_setup(torch.device("cpu"))  # before any model exists, as the job does
    model = Theirs() if side == "theirs" else Ours(int(side.removeprefix("ours-zero")))
    timed(model, 0)  # warm-up: optimizer state allocated
    meter.start_timed()
    for s in range(steps):
        timed(model, 1 + s)
    mine = {**meter.figures(), **model.held_bytes()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


MEMORY_SIDES = ("ours-zero3", "theirs", "ours-zero0")
LABELS = {"ours-zero3": "ours, ZeRO-3", "theirs": "FSDP2 fully_shard", "ours-zero0": "ours, plain data parallel"}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def section(res: dict, memory: dict[str, list[dict]], settings: dict, quick: bool) -> str:
    from runner.gpt.config import GPTConfig, count_parameters

    psi = count_parameters(GPTConfig(**DIMS))
    t = res["times"]
    ratios = [a / b for a, b in zip(t["ours"], t["theirs"], strict=True)]
    med, lo, hi = spread(ratios)
    worst_loss = max(abs(a - b) / abs(b) for a, b in zip(res["losses"]["ours"], res["losses"]["theirs"], strict=True))
    comm = res["ours_comm"]["comm_bytes"]
    lines = [
        "## ZeRO-3 against FSDP2",
        "",
        f"`python bench/bench_zero.py{' --quick' if quick else ''}`, {time.strftime('%Y-%m-%d %H:%M')}. "
        "Ours: `DataParallelGPT(engine, mesh, zero_stage=3)` (runner/gpt/zero.py: per-block flat units, "
        "all-gather before use with the next block prefetched, reduce-scatter during backward; instrumentation "
        "off). Theirs: the same GPT with PyTorch's FSDP2 `fully_shard` on every block and on the root, AdamW over "
        "its DTensors.",
        "",
        *machine_lines(),
        f"- model: {DIMS['n_layer']} layers, n_embd {DIMS['n_embd']}, n_head {DIMS['n_head']}, vocabulary "
        f"{DIMS['vocab_size']}, {psi / 1e6:.2f} M parameters, float32; batch {BATCH} x {SEQ} tokens over dp = {DP} "
        f"ranks ({BATCH // DP} rows each); same name-seeded weights and batches on both sides",
        f"- steps: zero_grad, forward, cross entropy, backward, AdamW, loss read; {settings['warmup']} warm-up "
        f"step(s) per side whose losses agree to {worst_loss:.1e} relative, then {settings['rounds']} rounds of one "
        "step per side (order flipped every round), barrier to barrier",
        f"- ours, one counted step: all_gather {mib(comm['all_gather'])} MiB, reduce_scatter "
        f"{mib(comm['reduce_scatter'])} MiB of payload per rank ({comm['all_gather'] / (4 * psi):.2f} and "
        f"{comm['reduce_scatter'] / (4 * psi):.2f} x the 4 Psi bytes of the parameters)",
        "",
        "| | ours ZeRO-3 | FSDP2 |",
        "|---|---:|---:|",
        f"| step time, median (ms) | {statistics.median(t['ours']) * 1e3:.1f} | {statistics.median(t['theirs']) * 1e3:.1f} |",
        f"| step time ratio ours / theirs, median (range) | {med:.2f} ({lo:.2f}..{hi:.2f}) | |",
        "",
        "Memory per rank (MiB): held between steps (parameters + gradients + optimizer state), and the peak over "
        f"{settings['mem_steps']} steps above the rank's set-up RSS (runner/job/resources.py, the job's figure).",
        "",
        "| side | rank | parameters | gradients | optimizer | held | peak over set-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side in MEMORY_SIDES:
        for rank, m in enumerate(memory[side]):
            held = m["params"] + m["grads"] + m["optimizer"]
            lines.append(
                f"| {LABELS[side]} | {rank} | {mib(m['params'])} | {mib(m['grads'])} | {mib(m['optimizer'])} "
                f"| {mib(held)} | {mib(m['peak_mem_bytes'])} |"
            )
    lines.append("")
    lines.append("- " + compare_sentence("Step time", ratios, noun="interleaved rounds"))
    load, cores = os.getloadavg()[0], usable_cores()
    if load > cores:
        lines.append(
            f"- The machine ran other work meanwhile (load average {load:.1f} on {cores} usable cores): both sides "
            "were timed under the same contention, alternating round by round, so the ratio compares them fairly, "
            "but the absolute step times are inflated by waiting for a core."
        )

    def mean_of(side: str, key) -> float:
        return statistics.fmean(key(m) for m in memory[side])

    def held(m: dict) -> int:
        return m["params"] + m["grads"] + m["optimizer"]

    ours_held, theirs_held, base_held = (mean_of(s, held) for s in MEMORY_SIDES)
    ours_peak, theirs_peak, base_peak = (mean_of(s, lambda m: m["peak_mem_bytes"]) for s in MEMORY_SIDES)
    lines.append(
        f"- Held between steps, per rank: ours {mib(ours_held)} MiB, FSDP2 {mib(theirs_held)} MiB "
        f"({ours_held / theirs_held:.3f}x), against {mib(base_held)} MiB unsharded: ours holds "
        f"{ours_held / base_held:.2f} of the unsharded bytes (the paper's 1/Nd = {1 / DP:.2f} plus AdamW's step "
        "counters and flat-buffer padding)."
    )
    lines.append(
        f"- Peak over set-up, per rank (mean of the ranks): ours {mib(ours_peak)} MiB, FSDP2 {mib(theirs_peak)} MiB "
        f"({ours_peak / theirs_peak:.2f}x), unsharded {mib(base_peak)} MiB; the peak adds to the held state what a "
        "step allocates for a while: activations, the gathered blocks, full gradients before their reduce-scatter."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a short run (also BENCH_QUICK=1)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.worker:
        if args.mode == "time":
            worker_time(args.worker, args.warmup, args.rounds)
        else:
            worker_memory(args.worker, args.side, args.steps)
        exit_worker()
    quick = quick_mode(args.quick)
    settings = QUICK if quick else FULL
    res = run_worker(__file__, DP, "--mode", "time", "--warmup", str(settings["warmup"]), "--rounds",
                     str(settings["rounds"]))  # fmt: skip
    for a, b in zip(res["losses"]["ours"], res["losses"]["theirs"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), f"ours and FSDP2 train differently: {res['losses']}"
    memory = {
        side: run_worker(__file__, DP, "--mode", "memory", "--side", side, "--steps", str(settings["mem_steps"]))
        for side in MEMORY_SIDES
    }
    text = section(res, memory, settings, quick)
    print(text)
    if not args.no_write:
        write_section("ZeRO-3 against FSDP2", text, REPO / "bench" / "RESULTS.md")


if __name__ == "__main__":
    main()
