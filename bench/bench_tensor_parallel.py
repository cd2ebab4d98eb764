"""Our tensor parallelism against PyTorch's own (`torch.distributed.tensor.parallel`), on the same blocks.

Both sides run L GPT-2 blocks built from the same name-seeded weights, on the same inputs, backend and
ranks: ours is `TensorParallelBlock` (conjugate autograd operators over counted gloo/NCCL collectives);
theirs is the reference block with separate q/k/v linears (torchtitan's layout: c_attn's packed rows
cannot be split by ColwiseParallel without mixing q, k and v) parallelized with ColwiseParallel on q, k,
v and c_fc, RowwiseParallel on both c_proj. Steps are timed as `forward` (no autograd) and `train`
(forward, backward of a mean-square loss, AdamW step), alternating ours and theirs every round so drift
in the machine hits both alike. Before timing, outputs and every gradient are compared.

Run: `python bench/bench_tensor_parallel.py` (or `make bench`). It starts torchrun itself for tp in {2, 4}
and writes the "## Tensor parallelism" section of bench/RESULTS.md (other sections are kept).
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

# Model and batch: the 'small' preset's width with 4 layers, so a step is dominated by matmuls and the
# four per-layer collectives rather than Python overhead, yet tp = 4 fits 2 CPU cores in seconds.
DIMS = {"n_layer": 4, "n_head": 8, "n_embd": 256, "vocab_size": 512, "block_size": 128}
BATCH, SEQ, SEED = 8, 128, 0
WARMUP, ROUNDS = 3, 15


def theirs_block(block, tp_mesh):
    """The reference Block with c_attn split into q, k, v, parallelized by PyTorch's tensor parallel API."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    class Attention(nn.Module):
        def __init__(self, attn, head_dim: int):
            super().__init__()
            h = attn.n_embd
            self.head_dim = head_dim
            self.q, self.k, self.v = (nn.Linear(h, h) for _ in range(3))
            with torch.no_grad():
                for i, lin in enumerate((self.q, self.k, self.v)):
                    lin.weight.copy_(attn.c_attn.weight[i * h : (i + 1) * h])
                    lin.bias.copy_(attn.c_attn.bias[i * h : (i + 1) * h])
            self.c_proj = attn.c_proj

        def forward(self, x):
            b, t, _ = x.shape
            # -1 heads: after ColwiseParallel each rank's local output holds heads/tp heads.
            q, k, v = (lin(x).view(b, t, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))

    class TorchBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2, self.mlp = block.ln_1, block.ln_2, block.mlp
            self.attn = Attention(block.attn, block.attn.n_embd // block.attn.n_head)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))

    plan = {
        "attn.q": ColwiseParallel(),
        "attn.k": ColwiseParallel(),
        "attn.v": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(),
    }
    return parallelize_module(TorchBlock(), tp_mesh, plan)


def worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from runner.gpt.config import GPTConfig
    from runner.gpt.mesh import Mesh
    from runner.gpt.model import Block, init_module
    from runner.gpt.tensor_parallel import TensorParallelBlock

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    cfg = GPTConfig(**DIMS)
    mesh = Mesh.build(tp, 1, 1)
    tp_mesh = init_device_mesh("cpu", (tp,))
    ours = nn.Sequential(*(TensorParallelBlock(cfg, i, mesh.tp, SEED) for i in range(cfg.n_layer)))
    ref_blocks = []
    for i in range(cfg.n_layer):
        b = Block(cfg)
        init_module(b, cfg, SEED, prefix=f"transformer.h.{i}.")
        ref_blocks.append(b)
    theirs = nn.Sequential(*(theirs_block(b, tp_mesh) for b in ref_blocks))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, cfg.n_embd, generator=gen)

    # ---- same outputs and gradients ----
    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    out_ours, out_theirs = ours(x), theirs(x)
    out_ours.pow(2).mean().backward()
    out_theirs.pow(2).mean().backward()
    diffs = {"output": (out_ours - out_theirs).abs().max().item(), "grads": 0.0}
    for i in range(cfg.n_layer):
        o, t = ours[i], theirs[i]
        pairs = [
            (o.attn.c_attn.weight, torch.cat([local(lin.weight.grad) for lin in (t.attn.q, t.attn.k, t.attn.v)])),
            (o.attn.c_proj.weight, local(t.attn.c_proj.weight.grad)),
            (o.mlp.c_fc.weight, local(t.mlp.c_fc.weight.grad)),
            (o.mlp.c_proj.weight, local(t.mlp.c_proj.weight.grad)),
            (o.ln_1.weight, local(t.ln_1.weight.grad)),
            (o.ln_2.bias, local(t.ln_2.bias.grad)),
        ]
        for mine, ref in pairs:
            diffs["grads"] = max(diffs["grads"], (mine.grad - ref).abs().max().item())
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)

    # ---- the same collectives on both sides: count theirs with PyTorch's CommDebugMode, ours with CommStats ----
    from torch.distributed.tensor.debug import CommDebugMode

    counter = CommDebugMode()
    with counter, torch.no_grad():
        theirs(x)
    mesh.stats.reset()
    mesh.stats.counting = True
    with torch.no_grad():
        ours(x)
    mesh.stats.counting = False
    forward_collectives = {"theirs": counter.get_total_counts(), "ours": sum(mesh.stats.calls.values())}

    # ---- timing ----
    opts = {
        "ours": torch.optim.AdamW(ours.parameters(), lr=1e-4),
        "theirs": torch.optim.AdamW(theirs.parameters(), lr=1e-4),
    }
    models = {"ours": ours, "theirs": theirs}

    def step(side: str, workload: str) -> float:
        model = models[side]
        dist.barrier()
        start = time.perf_counter()
        if workload == "forward":
            with torch.no_grad():
                model(x)
        else:
            model(x).pow(2).mean().backward()
            opts[side].step()
            opts[side].zero_grad(set_to_none=True)
        dist.barrier()
        return time.perf_counter() - start

    times: dict[str, dict[str, list[float]]] = {w: {"ours": [], "theirs": []} for w in ("forward", "train")}
    comm_s = {"forward": 0.0, "train": 0.0}  # ours only: seconds inside our collectives (CommStats)
    for workload in ("forward", "train"):
        for r in range(WARMUP + ROUNDS):
            order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
            for side in order:
                mesh.stats.reset()
                mesh.stats.counting = side == "ours"
                t = step(side, workload)
                mesh.stats.counting = False
                if r >= WARMUP:
                    times[workload][side].append(t)
                    comm_s[workload] += mesh.stats.comm_s if side == "ours" else 0.0
    # Per-rank differences are all needed; times are the same on every rank (barrier to barrier).
    gathered: list[dict] = [{} for _ in range(tp)]
    dist.all_gather_object(gathered, diffs)
    if rank == 0:
        worst = {k: max(d[k] for d in gathered) for k in diffs}
        comm_share = {w: comm_s[w] / sum(times[w]["ours"]) for w in comm_s}
        Path(out_path).write_text(
            json.dumps(
                {
                    "tp": tp,
                    "diffs": worst,
                    "times": times,
                    "comm_share": comm_share,
                    "forward_collectives": forward_collectives,
                }
            )
        )
    dist.destroy_process_group()


def launch(tp: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        argv = [
            *torchrun_launcher(tp),
            str(Path(__file__).resolve()), "--worker", str(out),
        ]  # fmt: skip
        subprocess.run(argv, cwd=REPO, env=env, check=True)
        return json.loads(out.read_text())


def section(results: list[dict]) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    d = DIMS
    lines = [
        "## Tensor parallelism",
        "",
        f"`python bench/bench_tensor_parallel.py`, {time.strftime('%Y-%m-%d')}. Ours: `TensorParallelBlock` "
        "(runner/gpt/tensor_parallel.py, megatron style). Theirs: PyTorch's `torch.distributed.tensor.parallel` "
        "(ColwiseParallel on q, k, v, c_fc; RowwiseParallel on both c_proj) on the same blocks.",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"CPU ranks, gloo, one thread per rank",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}",
        f"- model: {d['n_layer']} blocks, n_embd {d['n_embd']}, n_head {d['n_head']}, float32; "
        f"input [{BATCH}, {SEQ}, {d['n_embd']}], same weights (name-seeded) and inputs on both sides",
        f"- steps: `forward` = no-grad forward of the blocks; `train` = forward + backward of mean(out^2) + AdamW; "
        f"{WARMUP} warm-up rounds, then {ROUNDS} rounds alternating ours/theirs; time from barrier to barrier",
        "",
        "| tp | workload | ours median (ms) | theirs median (ms) | ours / theirs | ours: share in collectives "
        "| max abs diff output | max abs diff grads |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for workload in ("forward", "train"):
            ours = statistics.median(res["times"][workload]["ours"]) * 1e3
            theirs = statistics.median(res["times"][workload]["theirs"]) * 1e3
            lines.append(
                f"| {res['tp']} | {workload} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | "
                f"{res['comm_share'][workload]:.0%} | "
                f"{res['diffs']['output']:.1e} | {res['diffs']['grads']:.1e} |"
            )
    counts = ", ".join(
        f"tp {r['tp']}: ours {r['forward_collectives']['ours']}, theirs {r['forward_collectives']['theirs']}"
        for r in results
    )
    lines += ["", f"Collectives in one forward (CommDebugMode for theirs, CommStats for ours): {counts}."]
    return "\n".join(lines) + "\n"


NOTES = """
Why the ratios are what they are. Both sides run the same float32 matmuls, attention and LayerNorms, and
the same collectives (2 all-reduces of [b, s, h] per block forward, counted above), over the same gloo
group, so the only room for a difference is per-op overhead. Ours calls F.linear on plain tensors and the
collective directly (one Python autograd.Function per region boundary); theirs dispatches every op of the
parallel linears through DTensor (sharding propagation, redistribute of the Replicate input, wrapping and
unwrapping local tensors), which costs more in backward and in AdamW over DTensor parameters than in a
no-grad forward. That is where ours gains most (`train`, and tp 4 where each rank's matmuls are smaller so
overhead weighs more). The no-grad forward at tp 2 is the closest (0.86 to 0.91 over four runs): there the step is mostly the
same matmuls plus the same all-reduces (ours spends the share shown in collectives), leaving only DTensor's
dispatch to save. These CPU figures come from a 2-core machine shared with other work: tp 4 runs 4 ranks on
2 cores and repeated runs moved the medians by up to 2x (ratios within about 0.1), so read the ratios, not
the absolute times.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, nargs="*", default=[2, 4])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    results = [launch(tp) for tp in args.tp]
    for res in results:
        assert res["diffs"]["output"] < 1e-5 and res["diffs"]["grads"] < 1e-5, f"ours and theirs differ: {res}"
    text = section(results)
    print(text)
    write_section("Tensor parallelism", text, REPO / "bench" / "RESULTS.md", NOTES)


if __name__ == "__main__":
    main()
