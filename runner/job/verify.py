"""Verification against the single-device reference, with a verdict: the one place tolerances live.

`verify_pass(...)` runs once, before the warm-up, as a pass of its own: it builds the float32 reference
GPT from the same seed (and checkpoint), runs the workload on the same global batch through the strategy
and through the reference, compares, then frees the reference and puts back everything it changed (the
shard's weights after its throwaway optimizer step, gradients), so the timed steps start from the
weights a run without verify has and its memory is not counted (see runner/job/resources.py).

What is compared, and the tolerance of each (`TOLERANCES`, per dtype of the strategy's run):
- logits: max |ours - ref| / max |ref| over the output ranks' rows (relative to the largest logit);
- loss: |ours - ref| / |ref|;
- grads: max |ours - ref| over every shard / max |ref grad| over the same shards (train);
- weights after one AdamW step from the same weights on the same gradients: the strategy's optimizer over
  its shards (ZeRO's sharded state, bf16 storage) against torch's AdamW stepping the reference's slice of
  each shard with that shard's own gradient (AdamW is elementwise), max |ours - ref|. The gradients are
  judged on their own above. Stepping the reference with its own gradients would measure Adam's
  amplification instead of the step: the first update is lr·g/(|g| + eps), about lr·sign(g), so a
  gradient within its rounding (~1e-8 here) of zero can move that weight by anything up to 2 lr. Over
  seeds 0-24 of data dp=2 that measured 0.0005 to 0.031 lr, with a long tail (0.066 lr in one of 40
  in-process half-batch splits): no fraction of lr below 2 bounds it, and 2 lr would let a skipped step
  through. On the same gradients it is the same elementwise arithmetic: in float32 (and bf16-mixed's
  float32 master weights and state) the results differ at most by a few roundings of the update
  (relative ~10u, u = 2^-24, where an implementation orders it differently: foreach or fused kernels on
  GPU) and one rounding of the weight, so the bound is 1e-5 lr + 2^-22 max |w| (two units in the last
  place of the largest weight); measured 0 on CPU, under every kernel choice tried. bfloat16 stores the
  weight and AdamW's state in bf16: the start (ours is the reference's weight rounded) and the result are
  rounded, 2^-9 |w| each, so 2^-8 max |w| (more than lr for LayerNorm weights near 1, whose update bf16
  cannot hold), and the update carries ~5 roundings of its state and arithmetic (5u = 2% of lr): bound
  0.1 lr + 2^-8 max |w|. A skipped step, a shard stepped with another shard's state or a corrupted weight
  are lr or 1% of a weight away, thousands of times the float32 bound;
- generate: greedy tokens must be equal in float32; in bfloat16, bf16-mixed and bf16-master a near-tie may flip a token, so the
  tokens are reported and the prefill logits are judged instead.
float32 is held to 1e-5 relative on logits, loss and gradients (PyTorch's own pipelining tests use rtol
1e-5). bfloat16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3) and the error grows with depth,
so its bound is 3e-2 on logits and loss and 1e-1 on gradients, the scale of errors bf16 training tolerates.
Activation checkpointing changes nothing numerically (recomputed values are bitwise those of the
forward), so a checkpointed run is held to its dtype's bound unchanged.

bf16-mixed (runner/gpt/precision.py: float32 weights, gradients and AdamW state, bf16 matmuls under
autocast, float32 residual stream) against the float32 reference: each matmul rounds its inputs to
bf16 (relative error <= u each) and accumulates in float32, so the logits carry a few u of relative
error, growing with depth, and the gradients, which pass every matmul twice more, somewhat more. The
bound is logits 2e-2 (~5u), loss 2e-2 (cross entropy moves by at most 2 max|logit error| per token, so
it follows the logits) and gradients 5e-2 (~13u): 3-6x above what was measured -- logits 2.8e-3 to
6.4e-3 and gradients 3.5e-3 to 7.9e-3 relative, loss below 2e-5, for the tiny (4 layers, d=64) and
small (8 layers, d=256) presets at batch 8 x 64 and 4 x 128 tokens, seeds 0 and 1, where pure
bfloat16 measured 4.3e-3 to 8.8e-3 and 4.7e-3 to 1.2e-2 -- and below pure bfloat16's bound, since
master weights and the float32 residual stream round less. Weights after one AdamW step on the same
gradients: float32 parameters and state, so float32's bound.
bf16-master (bfloat16 weights, gradients and activations; float32 master weights and AdamW state in the
optimizer) computes the forward and backward exactly as pure bfloat16 does, so it is held to bfloat16's bound;
its one AdamW step updates the float32 masters on the same gradients and rounds them into the bfloat16 weights,
the start and the result one rounding each (2^-9 |w|): bfloat16's weights bound, 0.1 lr + 2^-8 max |w|, holds it.
tests/test_precision.py checks these bounds on the same model against the float32 reference. What the
bound cannot see: an error smaller than bf16's own rounding. On the tiny model, an MLP weight scaled by
1.01 moves logits and gradients by less than bf16-mixed already differs (4e-3 to 5e-3); scaled by 1.1 it
crosses the logits bound (2.5e-2). Gross mistakes (a gradient not averaged, a shard or stage missing)
are tens of percent and fail; subtle ones are caught by verifying the same strategy in float32.

Fault injection for tests: LAB_FAULT_CORRUPT_SHARD=<reference parameter name> scales that parameter
by 1.01 on the ranks that hold it, after the model is built, so a test can watch verify fail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runner.gpt.model import GPT
from runner.gpt.strategy import ParallelGPT
from runner.job.checkpoint import load_reference
from runner.job.resources import release_freed_memory
from runner.spec.run_spec import RunSpec

FAULT_ENV = "LAB_FAULT_CORRUPT_SHARD"


@dataclass(frozen=True)
class Tolerance:
    logits: float  # relative to the largest reference logit
    loss: float  # relative
    grads: float  # relative to the largest reference gradient
    weights_lr: float  # max weight difference after one AdamW step on the same gradients, as a fraction of lr ...
    weights_rel: float  # ... plus this fraction of the largest reference weight (the dtype's rounding)


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(logits=1e-5, loss=1e-5, grads=1e-5, weights_lr=1e-5, weights_rel=2**-22),
    "bfloat16": Tolerance(logits=3e-2, loss=3e-2, grads=1e-1, weights_lr=0.1, weights_rel=2**-8),
    "bf16-mixed": Tolerance(logits=2e-2, loss=2e-2, grads=5e-2, weights_lr=1e-5, weights_rel=2**-22),
    # the model computes as pure bfloat16 does (weights, activations and gradients in bfloat16), so its bound is
    # bfloat16's; its update runs on float32 masters rounded into the bfloat16 weights (module docstring)
    "bf16-master": Tolerance(logits=3e-2, loss=3e-2, grads=1e-1, weights_lr=0.1, weights_rel=2**-8),
}

# Reduced over ranks with MAX; -1 marks "this rank has no such figure".
_KEYS = (
    "logits_abs",
    "logits_ref",
    "loss_abs",
    "loss_ref",
    "grads_abs",
    "grads_ref",
    "weights_abs",
    "weights_ref",
    "mismatch",
)


class _Differences:
    """Per-rank maxima of differences and of reference magnitudes."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def note(self, key: str, value: float) -> None:
        self.values[key] = max(self.values.get(key, 0.0), float(value))

    def reduced(self, device: torch.device) -> dict[str, float | None]:
        # NCCL reduces device tensors only; gloo takes CPU ones.
        local = torch.tensor([self.values.get(k, -1.0) for k in _KEYS], dtype=torch.float64, device=device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return {k: (None if v < 0 else v) for k, v in zip(_KEYS, local.tolist(), strict=True)}


def _shard_of(model: ParallelGPT, name: str, ref: torch.Tensor) -> torch.Tensor:
    index = model.shard_index(name)
    return ref if index is None else ref[index]


def trim_padding(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The leading part of a shard that exists in the reference (a vocab slice may carry padding rows)."""
    if tuple(t.shape) == tuple(shape):
        return t
    return t[tuple(slice(0, n) for n in shape)]


def _compare_grads(model: ParallelGPT, ref: GPT, diffs: _Differences) -> None:
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for name, p in model.named_shards().items():
        theirs, mine = ref_params[name].grad, p.grad
        if theirs is None or mine is None:
            continue
        theirs = _shard_of(model, name, theirs.detach())
        if theirs.numel() == 0:  # a vocabulary slice that is all padding (vocab < tp^2) holds nothing to compare
            continue
        mine = trim_padding(mine.detach(), theirs.shape).float().cpu()
        diffs.note("grads_abs", (mine - theirs).abs().max().item())
        diffs.note("grads_ref", theirs.abs().max().item())


def _reference_step(model: ParallelGPT, ref: GPT, lr: float) -> dict[str, torch.Tensor]:
    """torch's AdamW step, from the reference's weights, on the gradients this rank computed: for each shard,
    the reference slice it holds, stepped once with the shard's own gradient (AdamW is elementwise, so a
    slice steps as it would inside the whole tensor). Gradients are judged on their own, before this."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    slices: dict[str, torch.Tensor] = {}
    for name, p in model.named_shards().items():
        start = _shard_of(model, name, ref_params[name].detach())
        if p.grad is None or start.numel() == 0:
            continue
        w = start.clone().requires_grad_(True)
        w.grad = trim_padding(p.grad.detach(), start.shape).float().cpu()
        slices[name] = w
    if slices:
        torch.optim.AdamW(list(slices.values()), lr=lr).step()
    return {name: w.detach() for name, w in slices.items()}


def _run(spec: RunSpec, model: ParallelGPT, ref: GPT, idx: torch.Tensor, targets: torch.Tensor) -> _Differences:
    diffs = _Differences()
    rows = model.batch_rows(idx.shape[0])
    dev = model.device
    if spec.workload == "generate":
        ours = model.generate(idx.to(dev), spec.new_tokens)
        if model.is_output_rank:
            theirs = ref.generate(idx, spec.new_tokens)[rows]
            diffs.note("mismatch", (ours.cpu() != theirs).sum().item())
    logits = model.forward_logits(idx.to(dev))
    with torch.no_grad():
        ref_logits, _ = ref(idx, targets)
    if model.is_output_rank:
        diffs.note("logits_abs", (logits.float().cpu() - ref_logits[rows]).abs().max().item())
        diffs.note("logits_ref", ref_logits[rows].abs().max().item())
    if spec.workload == "train":
        ref.zero_grad(set_to_none=True)
        _, ref_loss = ref(idx, targets)
        ref_loss.backward()
        loss = model.forward_backward(idx.to(dev), targets.to(dev))
        if model.is_output_rank:
            diffs.note("loss_abs", abs(loss - ref_loss.item()))
            diffs.note("loss_ref", abs(ref_loss.item()))
        _compare_grads(model, ref, diffs)
        stepped = _reference_step(model, ref, spec.lr)  # before ours: ZeRO's shard views hold the gradients
        model.optimizer_step(model.make_optimizer(spec.lr))  # ZeRO steps its own shard of the state
        for name, p in model.named_shards().items():
            if name in stepped:
                theirs = stepped[name]
                mine = trim_padding(p.detach(), theirs.shape).float().cpu()
                diffs.note("weights_abs", (mine - theirs).abs().max().item())
                diffs.note("weights_ref", theirs.abs().max().item())
    elif spec.workload == "forward" and model.is_output_rank:
        # A data-parallel replica sees only its rows: compare with the reference loss on the same rows.
        loss = F.cross_entropy(logits.float().cpu().flatten(0, 1), targets[rows].flatten()).item()
        ref_rows_loss = F.cross_entropy(ref_logits[rows].flatten(0, 1), targets[rows].flatten()).item()
        diffs.note("loss_abs", abs(loss - ref_rows_loss))
        diffs.note("loss_ref", abs(ref_rows_loss))
    return diffs


def _rel(abs_diff: float | None, ref: float | None) -> float | None:
    if abs_diff is None or ref is None:
        return None
    return abs_diff / ref if ref > 0 else (0.0 if abs_diff == 0 else float("inf"))


def verdict(spec: RunSpec, reduced: dict[str, float | None]) -> dict:
    """The verify record for result.json: differences, the tolerances used, failures and `passed`."""
    tol = TOLERANCES[spec.dtype]
    out = {
        "logits_max_abs_diff": reduced["logits_abs"],
        "logits_max_rel_diff": _rel(reduced["logits_abs"], reduced["logits_ref"]),
        "loss_abs_diff": reduced["loss_abs"],
        "loss_rel_diff": _rel(reduced["loss_abs"], reduced["loss_ref"]),
        "grads_max_abs_diff": reduced["grads_abs"],
        "grads_max_rel_diff": _rel(reduced["grads_abs"], reduced["grads_ref"]),
        "weights_max_abs_diff": reduced["weights_abs"],
        "tokens_equal": None if reduced["mismatch"] is None else reduced["mismatch"] == 0,
    }
    weights_bound = tol.weights_lr * spec.lr + tol.weights_rel * (reduced["weights_ref"] or 0.0)
    failures = []
    checks = [
        ("logits", out["logits_max_rel_diff"], tol.logits, "max rel diff"),
        ("loss", out["loss_rel_diff"], tol.loss, "rel diff"),
        ("grads", out["grads_max_rel_diff"], tol.grads, "max rel diff"),
        ("weights", out["weights_max_abs_diff"], weights_bound, "max abs diff after one AdamW step"),
    ]
    for name, value, bound, what in checks:
        if value is not None and not value <= bound:  # NaN fails too
            failures.append(f"{name}: {what} {value:.3g} > {bound:.3g}")
    if spec.dtype == "float32" and out["tokens_equal"] is False:
        failures.append(f"tokens: {int(reduced['mismatch'] or 0)} generated tokens differ from the reference")
    tolerances = {"logits": tol.logits, "loss": tol.loss, "grads": tol.grads, "weights": weights_bound}
    return {"passed": not failures, "dtype": spec.dtype, "tolerances": tolerances, "failures": failures, **out}


def verify_pass(spec: RunSpec, model: ParallelGPT, weights, idx: torch.Tensor, targets: torch.Tensor) -> dict:
    """Compare the strategy with the reference on one batch, then free the reference and restore the shard.
    `weights`: the run's checkpoint (runner/job/checkpoint.py open_weights), loaded whole into the reference."""
    saved = [(p, p.detach().clone()) for p in model.parameters()]
    ref = GPT(spec.model_config(), seed=spec.seed)
    if weights is not None:
        load_reference(ref, weights)
    try:
        reduced = _run(spec, model, ref, idx, targets).reduced(model.device)
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
        model.zero_grad()
        del ref, saved
        release_freed_memory(model.device)
    return verdict(spec, reduced)


def inject_fault(model: ParallelGPT) -> None:
    """Corrupt the parameter named by LAB_FAULT_CORRUPT_SHARD on the ranks that hold it (tests only)."""
    name = os.environ.get(FAULT_ENV)
    if not name:
        return
    shard = model.named_shards().get(name)
    if shard is not None:
        with torch.no_grad():
            shard.mul_(1.01)
