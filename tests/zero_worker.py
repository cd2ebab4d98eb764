"""Test-only torchrun worker for tests/test_zero.py: several AdamW steps of a ZeRO-sharded GPT against the
single-device reference, with every rank's slices reassembled into whole tensors.

`torchrun ... tests/zero_worker.py OUT SPEC_JSON STAGES STEPS`: for each ZeRO stage in STAGES (comma
separated; 0 is plain data parallelism) it builds this rank's model as the job does, trains STEPS steps
(optimizer.zero_grad, forward_backward, optimizer_step, as runner/job/rank.py) on the job's synthetic batches,
while the reference GPT computes its own loss and gradients on the same global batches and weights, then
steps with torch.optim.AdamW on the ranks' gradients. Each rank reports, for every reference parameter it
holds a part of, the reference elements (flat positions of `ref[shard_index(name)]`) with its gradient
each step and its weight after the last; every rank scatters them into whole tensors (counting how many
ranks covered each element), and rank 0 writes to OUT, per stage: the loss of every step, the largest
differences from the reference (gradients each step, weights after the last), elements no rank covered,
the trained model's prefill logits and greedy tokens against the reference holding the same trained
weights, and each rank's bytes measured the way runner/job/rank.py measures them (parameters(),
optimizer.state) plus the strategy's figures and the communication of the last step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.gpt.build import build_parallel_gpt  # noqa: E402
from runner.gpt.config import kv_copies  # noqa: E402
from runner.gpt.mesh import Mesh  # noqa: E402
from runner.gpt.model import GPT  # noqa: E402
from runner.job.data import synthetic_batch  # noqa: E402
from runner.spec.run_spec import RunSpec  # noqa: E402
from runner.spec.validation import validate_spec


def rank_report(model, ref: GPT, what: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, reference flat positions, values) for each shard this rank holds (grads or weights)."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    out = []
    for name, p in model.named_shards().items():
        value = p.grad if what == "grads" else p
        if value is None:
            continue
        shape = ref_params[name].shape
        index = model.shard_index(name)
        positions = torch.arange(shape.numel()).view(shape)
        positions = positions if index is None else positions[index]
        # A vocabulary slice may carry zero padding rows past the reference: keep the leading part.
        held = value.detach()[tuple(slice(0, n) for n in positions.shape)]
        out.append((name, positions.reshape(-1), held.reshape(-1).float().cpu()))
    return out


def reassemble(reports: list, ref: GPT) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every rank's slices scattered into whole tensors (elements held by several ranks averaged), and how
    many ranks held each element."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    sums = {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in ref_params.items()}
    counts = {n: torch.zeros(p.numel(), dtype=torch.int64) for n, p in ref_params.items()}
    for report in reports:
        for name, positions, values in report:
            sums[name].index_add_(0, positions, values.double())
            counts[name].index_add_(0, positions, torch.ones_like(positions))
    whole = {n: (sums[n] / counts[n].clamp(min=1)).float().view(p.shape) for n, p in ref_params.items()}
    return whole, counts


def compare(whole: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], ref: GPT, what: str) -> dict:
    max_abs, max_ref, uncovered = 0.0, 0.0, 0
    for name, p in ref.named_parameters(remove_duplicate=False):
        theirs = (p.grad if what == "grads" else p).detach().reshape(-1).double()
        covered = counts[name] > 0
        uncovered += int((~covered).sum())
        mine = whole[name].reshape(-1).double()[covered]
        max_abs = max(max_abs, (mine - theirs[covered]).abs().max().item() if covered.any() else 0.0)
        max_ref = max(max_ref, theirs.abs().max().item())
    return {"max_abs": max_abs, "max_ref": max_ref, "uncovered": uncovered}


def gathered(model, ref: GPT, what: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This rank's shards, gathered from every rank and reassembled on every rank."""
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, rank_report(model, ref, what))
    return reassemble(reports, ref)


def run_stage(spec: RunSpec, mesh: Mesh, stage: int, steps: int) -> dict:
    """The reference is checked against, then stepped with, what the ranks computed: each step the
    gradients reassembled from every rank are compared with the reference's own on the same weights, then
    the reference's torch AdamW steps on ours, and the weights both steps give are compared. So each
    comparison has one source of difference (the summation order of a forward and backward; the
    arithmetic of one AdamW step on the same gradients) and none inherits Adam's amplification of a
    near-zero gradient's rounding into an update of up to 2 lr. The trained forward and generate are
    compared with the reference holding the ranks' own trained weights."""
    spec = RunSpec.from_dict({**spec.to_dict(), "zero_stage": stage}) if stage else spec
    cpu = torch.device("cpu")
    model = build_parallel_gpt(spec, mesh, cpu, torch.float32)
    ref = GPT(spec.model_config(), seed=spec.seed)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=spec.lr)
    optimizer = model.make_optimizer(spec.lr)
    losses, ref_losses, grads = [], [], []
    for step in range(steps):
        idx, targets = synthetic_batch(spec.model_config().vocab_size, spec.batch, spec.seq, spec.seed, step)
        last = step == steps - 1
        mesh.stats.reset()
        mesh.stats.counting = last  # the last step's communication, as a timed step of the job counts it
        optimizer.zero_grad(set_to_none=True)
        losses.append(model.forward_backward(idx, targets))
        mesh.stats.counting = False
        ref_opt.zero_grad(set_to_none=True)
        _, ref_loss = ref(idx, targets)
        ref_loss.backward()
        ref_losses.append(ref_loss.item())
        whole, counts = gathered(model, ref, "grads")
        grads.append(compare(whole, counts, ref, "grads"))
        for name, p in ref.named_parameters():
            p.grad = whole[name]
        mesh.stats.counting = last
        model.optimizer_step(optimizer)
        mesh.stats.counting = False
        ref_opt.step()
    whole, counts = gathered(model, ref, "weights")
    weights = compare(whole, counts, ref, "weights")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(whole[name])
    # The trained weights serve the other workloads too: prefill logits and greedy tokens of this rank's rows.
    idx, _ = synthetic_batch(spec.model_config().vocab_size, spec.batch, spec.seq, spec.seed, steps)
    rows = model.batch_rows(idx.shape[0])
    logits = model.forward_logits(idx)
    tokens = model.generate(idx[:, :8], 4)
    with torch.no_grad():
        ref_logits = ref(idx)[rows]
    ref_tokens = ref.generate(idx[:, :8], 4)[rows]
    outputs = {
        "logits_max_abs": None if logits is None else (logits - ref_logits).abs().max().item(),
        "logits_max_ref": ref_logits.abs().max().item(),
        "tokens_equal": None if tokens is None else bool(torch.equal(tokens, ref_tokens)),
    }
    opt_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    mine = {
        "rank": dist.get_rank(),
        "losses": losses,
        **outputs,
        "param_count": sum(p.numel() for p in model.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "optimizer_bytes": opt_bytes,
        "optimizer_tensors": len(optimizer.state),
        **{k: v for k, v in model.figures().items() if isinstance(v, (int, float))},
        **mesh.stats.as_dict(),
    }
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() != 0:
        return {}
    return {"ref_losses": ref_losses, "ranks": ranks, "grads": grads, "weights": weights}


def main() -> None:
    out, spec_json, stages, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dist.init_process_group("gloo")
    spec = RunSpec.from_dict(json.loads(spec_json))
    assert not validate_spec(spec, gpu_count=0), validate_spec(spec, gpu_count=0)  # only what a user can launch
    torch.manual_seed(0)
    mesh = Mesh.build(spec.degrees, kv_share=kv_copies(spec.model_config(), spec.degrees.tp))
    results = {str(s): run_stage(spec, mesh, int(s), steps) for s in stages.split(",")}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as runner/job/rank.py: no interpreter finalisation while gloo threads live


if __name__ == "__main__":
    main()
