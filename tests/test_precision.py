"""bf16-mixed: float32 master weights, gradients and AdamW state; bf16 matmuls under autocast; results within
the bound runner/job/verify.py documents against the float32 reference; and a real multi-rank run that verifies,
sends float32 activations between stages and reduces float32 gradients. bf16-master: bfloat16 weights and
gradients, float32 masters and moments in the optimizer, verified in every strategy.

The reference is the plain float32 GPT; the bf16 evidence is read from the operators that actually ran
(a TorchDispatchMode below autocast sees the dtypes each aten kernel received).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from runner.gpt.model import GPT, PRESETS, cut_stage
from runner.gpt.precision import PRECISIONS, MasterAdamW, optimizer_state_bytes, precision_of
from runner.job.data import synthetic_batch
from runner.job.verify import TOLERANCES
from tests.jobs import run_torchrun

CONFIG = PRESETS["tiny"]  # 4 layers, d=64, 4 heads, vocab 512
MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._scaled_dot_product")


class KernelDtypes(TorchDispatchMode):
    """Records (operator, dtypes of its floating-point tensor inputs) for every matmul-like aten kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(MATMULS):
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.calls.append((name, dtypes))
        return func(*args, **(kwargs or {}))


def model_in(dtype: str, seed: int = 0) -> GPT:
    precision = precision_of(dtype)
    model = GPT(CONFIG, seed=seed).to(precision.param_dtype)
    model.compute_context = precision.compute_context("cpu")
    return model


def test_the_four_precisions():
    assert {n: (p.param_dtype, p.compute_dtype, p.mixed, p.master_dtype) for n, p in PRECISIONS.items()} == {
        "float32": (torch.float32, torch.float32, False, None),
        "bfloat16": (torch.bfloat16, torch.bfloat16, False, None),
        "bf16-mixed": (torch.float32, torch.bfloat16, True, None),
        "bf16-master": (torch.bfloat16, torch.bfloat16, False, torch.float32),
    }
    with pytest.raises(ValueError, match="float32, bfloat16, bf16-mixed, bf16-master"):
        precision_of("fp16")


def test_master_weights_keep_updates_that_bfloat16_rounds_away():
    # Below 1.0 bfloat16's values are 2^-8 = 3.9e-3 apart. Adam's updates with a constant gradient are lr = 1e-3 each
    # (lr * g / |g|, plus weight decay 0.01 lr), under half that gap: pure bfloat16 AdamW rounds every one away, and
    # the weight stays 1.0. The float32 master keeps them: 10 steps take it to 1 - 10 * 1.01e-3 = 0.98990, and the
    # bfloat16 weight shows it rounded to the nearest bfloat16, 1 - 3 * 2^-8 = 0.98828. The optimizer holds 12
    # bytes a parameter: the master, exp_avg and exp_avg_sq.
    pure, kept = (torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16)) for _ in range(2))
    optimizers = [torch.optim.AdamW([pure], lr=1e-3), MasterAdamW([kept], lr=1e-3)]
    for _ in range(10):
        for p, opt in zip((pure, kept), optimizers, strict=True):
            opt.zero_grad(set_to_none=True)
            p.grad = torch.ones_like(p)
            opt.step()
    assert torch.all(pure == 1.0)
    assert torch.all(kept == 1 - 3 * 2**-8) and kept.dtype == torch.bfloat16
    assert abs(optimizers[1].masters[0][0].item() - (1 - 10 * 1e-3 * (1 + 1e-2))) < 2e-4  # (weight decay 0.01 lr)
    assert optimizer_state_bytes(optimizers[1]) == 12 * 1000 + 4  # + AdamW's float32 step counter


def test_bf16_mixed_keeps_parameters_gradients_and_adamw_state_in_float32():
    model = model_in("bf16-mixed")
    idx, targets = synthetic_batch(CONFIG.vocab_size, 4, 32, seed=0, step=0)
    logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16  # the head's matmul ran in bf16 ...
    assert loss.dtype == torch.float32  # ... the loss is taken in float32
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        state = optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32, name


@pytest.mark.parametrize(("dtype", "expected"), [("bf16-mixed", torch.bfloat16), ("float32", torch.float32)])
def test_matmuls_run_in_the_compute_dtype_forward_and_backward(dtype, expected):
    model = model_in(dtype)
    idx, targets = synthetic_batch(CONFIG.vocab_size, 2, 16, seed=0, step=0)
    with KernelDtypes() as forward:
        _, loss = model(idx, targets)
    with KernelDtypes() as backward:
        loss.backward()
    # Per block: c_attn, attention, c_proj, c_fc, c_proj; plus the head.
    assert len(forward.calls) >= 5 * CONFIG.n_layer + 1
    assert all(dtypes == {expected} for _, dtypes in forward.calls), forward.calls
    assert any(name.startswith("aten._scaled_dot_product") for name, _ in forward.calls)
    # Backward runs outside autocast, on the dtypes the forward saved: its matmuls are bf16 too. (Attention's
    # backward also takes the forward's log-sum-exp, which the kernel keeps in float32 by design.)
    assert len(backward.calls) >= 2 * (4 * CONFIG.n_layer + 1)
    for name, dtypes in backward.calls:
        assert dtypes == {expected} if not name.startswith("aten._scaled_dot_product") else expected in dtypes


def test_the_residual_stream_and_so_a_stage_boundary_stay_float32():
    """Why pipeline stages send float32 under bf16-mixed: a stage's output is float32 (LayerNorm and the
    residual add promote the bf16 branch outputs), so nothing is rounded at the cut."""
    whole = model_in("bf16-mixed")
    first = cut_stage(copy.deepcopy(whole), 0, 2, has_embed=True, has_head=False)
    second = cut_stage(copy.deepcopy(whole), 2, 4, has_embed=False, has_head=True)
    idx, _ = synthetic_batch(CONFIG.vocab_size, 2, 16, seed=0, step=0)
    with torch.no_grad():
        hidden = first(idx)
        assert hidden.dtype == torch.float32
        # Split at the stage boundary, the model computes exactly what it computes whole.
        assert torch.equal(second(hidden), whole(idx))


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_logits_and_gradients_are_within_the_documented_bound_of_float32(seed):
    idx, targets = synthetic_batch(CONFIG.vocab_size, 8, 64, seed=seed, step=-1)
    errors = {}
    ref = GPT(CONFIG, seed=seed)
    ref_logits, ref_loss = ref(idx, targets)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    for dtype in ("bf16-mixed", "bfloat16"):
        model = model_in(dtype, seed)
        logits, loss = model(idx, targets)
        loss.backward()
        grad_err = max((p.grad.float() - ref_grads[n].grad).abs().max().item() for n, p in model.named_parameters())
        grads = torch.cat([p.grad.float().flatten() for _, p in model.named_parameters()])
        theirs = torch.cat([ref_grads[n].grad.flatten() for n, _ in model.named_parameters()])
        errors[dtype] = {
            "logits": ((logits.float() - ref_logits).abs().max() / ref_logits.abs().max()).item(),
            "loss": abs(loss.item() - ref_loss.item()) / ref_loss.item(),
            "grads": grad_err / max(p.grad.abs().max().item() for p in ref_grads.values()),
            # Root-mean-square errors relative to the reference's (|ours - ref| / |ref| over all elements).
            "logits_rms": ((logits.float() - ref_logits).norm() / ref_logits.norm()).item(),
            "grads_rms": ((grads - theirs).norm() / theirs.norm()).item(),
        }
    mixed, tol = errors["bf16-mixed"], TOLERANCES["bf16-mixed"]
    assert mixed["logits"] <= tol.logits and mixed["loss"] <= tol.loss and mixed["grads"] <= tol.grads, mixed
    # It really computed in bf16: far from float32's bound (8 significant bits, u = 2^-8 = 3.9e-3).
    assert mixed["logits"] > 100 * TOLERANCES["float32"].logits and mixed["grads"] > 100 * TOLERANCES["float32"].grads
    # Master weights and a float32 residual stream round less than pure bfloat16 does: pure bf16 rounds what
    # bf16-mixed rounds (every matmul's inputs and output) and more (the residual stream, LayerNorm, GELU,
    # softmax, the weights' storage, the gradients), so its mean-square error is larger. Compared as RMS over
    # all elements, where that shows (measured mixed/bf16: logits 0.58, gradients 0.64-0.71 over seeds 0-3
    # and every kernel setting tried), not as the maxima above: those are single elements, as noisy as their
    # difference -- the gradients' max ratio measured 0.79 to 1.28 (ATEN_CPU_CAPABILITY=default, seed 0).
    bf16 = errors["bfloat16"]
    assert mixed["logits_rms"] < bf16["logits_rms"] and mixed["grads_rms"] < bf16["grads_rms"], errors
    # The bound is tighter than pure bfloat16's, and leaves room for depth (measured values are 3-6x below).
    assert (tol.logits, tol.loss, tol.grads) < (TOLERANCES["bfloat16"].logits, TOLERANCES["bfloat16"].loss, 1.0)
    assert tol.grads < TOLERANCES["bfloat16"].grads


@pytest.mark.slow
def test_bf16_mixed_3d_run_verifies_and_keeps_float32_on_the_wire(tmp_path):
    """pp=2 x dp=2 with 2 microbatches: verify passes with bf16-mixed's bound; stages send float32
    activations and gradients, and the data-parallel reduction carries float32 gradients."""
    steps, batch, seq = 2, 8, 16
    result = run_torchrun(dict(strategy="3d", tp=1, pp=2, dp=2, microbatches=2, model="tiny", workload="train",
                               batch=batch, seq=seq, steps=steps, warmup=1, dtype="bf16-mixed", verify=True),
                          tmp_path)  # fmt: skip
    verify = result["verify"]
    assert verify["dtype"] == "bf16-mixed" and verify["passed"] is True, verify
    assert verify["tolerances"]["grads"] == TOLERANCES["bf16-mixed"].grads
    assert 1e-5 < verify["logits_max_rel_diff"] <= TOLERANCES["bf16-mixed"].logits
    for r in result["ranks"]:
        assert (r["precision"], r["param_dtype"], r["compute_dtype"], r["grad_dtype"]) == (
            "bf16-mixed", "float32", "bfloat16", "float32")  # fmt: skip
        # Every timed step each stage sends its replica's batch/dp rows of hidden states (stage 0) or their
        # gradients (stage 1): [rows, seq, d] float32, 4 bytes an element -- half that in bf16.
        assert r["comm_bytes"]["send"] == steps * (batch // 2) * seq * CONFIG.n_embd * 4
        # All-reduces a step: the data-parallel buckets carry every gradient of the stage at 4 bytes a
        # parameter (float32), the tied embedding's gradient is summed between the first and last stage
        # (vocab x d, float32), and the last stage's replicas average their loss (one float64).
        tied = CONFIG.vocab_size * CONFIG.n_embd * 4
        loss = 8 if r["pp"] == 1 else 0
        assert r["comm_bytes"]["all_reduce"] == steps * (r["param_count"] * 4 + tied + loss)


@pytest.mark.slow
def test_bf16_mixed_tensor_parallel_sums_bf16_partial_outputs_and_float32_gradients(tmp_path):
    """tp=2: each forward row-parallel sum (attention's and the MLP's c_proj, 2 a layer) carries a bf16
    matmul output; the embedding's sum and every backward all-reduce (the gradient of a float32 LayerNorm
    output entering a parallel region, 2 a layer plus the head's) are float32; the vocab-parallel loss
    all-reduces 3 float32 numbers a token."""
    batch, seq, d, L = 4, 16, CONFIG.n_embd, CONFIG.n_layer
    result = run_torchrun(dict(strategy="tensor", tp=2, model="tiny", workload="train", batch=batch, seq=seq,
                               steps=1, warmup=0, dtype="bf16-mixed", verify=True), tmp_path)  # fmt: skip
    assert result["verify"]["passed"] is True, result["verify"]
    elements, tokens = batch * seq * d, batch * seq
    expected = 2 * L * elements * 2 + elements * 4 + (2 * L + 1) * elements * 4 + 3 * tokens * 4
    for r in result["ranks"]:
        assert r["comm_calls"]["all_reduce"] == 2 * L + 1 + 2 * L + 1 + 3
        assert r["comm_bytes"]["all_reduce"] == expected  # float32 throughout would be 2 * L * elements * 2 more


PSI = 241024  # the tiny model's parameters (tests/test_zero.py writes them out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        {"strategy": "single"},  # (layer is the pipeline below with one microbatch: the same engine)
        {"strategy": "tensor", "tp": 2},
        {"strategy": "pipeline", "pp": 2, "microbatches": 2},
        {"strategy": "data", "dp": 2, "zero_stage": 1, "reduce_fp32": True},
        {"strategy": "data", "dp": 2, "zero_stage": 3},
        # (tensor parallelism's bf16-master: the tensor case above; here a pipeline whose stages ZeRO-2 shards)
        {"strategy": "3d", "tp": 1, "pp": 2, "dp": 2, "microbatches": 2, "zero_stage": 2, "reduce_fp32": True},
    ],
)
def test_bf16_master_verifies_in_every_strategy_with_the_papers_bytes(tmp_path, layout):
    """Verify passes under bf16-master's own bound (bfloat16's: runner/job/verify.py), the model keeps bfloat16
    weights and gradients, and the optimizer 12 bytes a parameter it steps (float32 master and two moments, of the
    rank's shards under ZeRO: the paper's P_os) plus a 4-byte step counter a tensor; gradients cross the
    data-parallel wire in bfloat16, or float32 under reduce_fp32."""
    spec = {"model": "tiny", "workload": "train", "batch": 8, "seq": 32, "steps": 1, "warmup": 0, "verify": True,
            "dtype": "bf16-master", **layout}  # fmt: skip
    result = run_torchrun(spec, tmp_path)
    verify = result["verify"]
    assert verify["passed"] is True and verify["tolerances"]["grads"] == TOLERANCES["bf16-master"].grads, verify
    assert verify["grads_max_rel_diff"] > 100 * TOLERANCES["float32"].grads  # it really computed in bfloat16
    zero = layout.get("zero_stage", 0)
    for r in result["ranks"]:
        assert (r["param_dtype"], r["master_dtype"], r["grad_dtype"]) == ("bfloat16", "float32", "bfloat16")
        assert r["param_bytes"] == 2 * r["param_count"]  # (ZeRO-3: its shards)
        # what AdamW steps: the parameters, or the rank's shard of each unit (its gradients at rest under ZeRO-2/3;
        # under ZeRO-1 a 1/dp share of the whole flat gradients it holds)
        stepped = r["param_count"] if zero == 0 else r["grad_bytes"] // 2 // (layout["dp"] if zero == 1 else 1)
        tensors = r["optimizer_bytes"] - 12 * stepped
        assert 0 < tensors <= 4 * 52 and tensors % 4 == 0, r  # one float32 step counter a stepped tensor or unit
    if layout["strategy"] == "data":
        comm = result["ranks"][0]["comm_bytes"]
        wire = comm["all_reduce"] - 8 if zero == 1 else comm["reduce_scatter"]
        assert wire == PSI * (4 if layout.get("reduce_fp32") else 2)
