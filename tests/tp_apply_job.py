"""Test-only torchrun entry: tensor parallelism applied by the plan to a GPT, without the engine or the job.

Each rank builds the GPT on the meta device, applies tensor parallelism over the mesh's tp group
(style and sequence parallelism from the spec), materializes its shards, runs forward, the loss and
backward, and compares the full logits, the loss and every gradient slice with the single-device
reference on the same batch. Rank 0 writes the largest differences to result.json beside the spec.
Launched by tests.jobs.run_torchrun(module="tests.tp_apply_job").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from runner.gpt.config import kv_copies
from runner.gpt.mesh import Mesh
from runner.gpt.model import GPT, materialize, shard_of
from runner.gpt.tp_layers import all_reduce_kv_grads, all_reduce_sequence_parallel_grads
from runner.gpt.tp_plan import apply_tensor_parallel
from runner.job.data import synthetic_batch
from runner.spec.run_spec import RunSpec


def main(spec_path: str) -> None:
    spec = RunSpec.from_dict(json.loads(Path(spec_path).read_text()))
    dist.init_process_group("gloo")
    cfg = spec.model_config()
    mesh = Mesh.build(spec.degrees, kv_share=kv_copies(cfg, spec.degrees.tp))
    idx, targets = synthetic_batch(cfg.vocab_size, spec.batch, spec.seq, spec.seed, step=0)

    ref = GPT(cfg, seed=spec.seed)
    ref_logits, ref_loss = ref(idx, targets)
    ref_loss.backward()

    with torch.device("meta"):
        model = GPT(cfg)
    tp = apply_tensor_parallel(model, mesh.tp, spec.tp_style, spec.sequence_parallel)
    materialize(model, spec.seed)
    local = model(idx)
    loss = tp.loss(local, targets)
    loss.backward()
    all_reduce_sequence_parallel_grads(
        [p for p in model.parameters() if getattr(p, "sequence_parallel", False)], mesh.tp
    )
    all_reduce_kv_grads([p for p in model.parameters() if hasattr(p, "kv_replicated_from")], mesh.kv)
    with torch.no_grad():
        logits = tp.full_logits(model(idx))

    refs = dict(ref.named_parameters(remove_duplicate=False))
    grads = 0.0
    for name, p in model.named_parameters(remove_duplicate=False):
        index = shard_of(p).index
        theirs = refs[name].grad if index is None else refs[name].grad[index]
        mine = p.grad[tuple(slice(0, n) for n in theirs.shape)]  # vocabulary padding rows hold no gradient
        grads = max(grads, (mine - theirs).abs().max().item())
    diffs = torch.tensor([(logits - ref_logits).abs().max().item(), abs(loss.item() - ref_loss.item()), grads])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        result = dict(zip(("logits", "loss", "grads"), diffs.tolist(), strict=True))
        (Path(spec_path).parent / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
