"""ZeRO stages 1-3 (runner/gpt/zero.py) on real gloo ranks: the single-device reference over several AdamW
steps, alone ('data') and as the data dimension of '3d'; per-rank bytes against the ZeRO paper's formulas.

Reference: the whole GPT on one process, on the same global batches: each step its loss and gradients
on the same weights, then torch.optim.AdamW stepping it on the ranks' gradients (tests/zero_worker.py
reassembles every rank's slices into whole gradients and weights, counting that every reference element
is held by some rank). Formulas: Rajbhandari et al., "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models" (SC 2020), section 5 and figure 1: per device, with Psi
parameters and Nd data-parallel ranks, baseline (2 + 2 + K) Psi bytes, P_os 2Psi + 2Psi + K Psi/Nd,
P_os+g 2Psi + (2 + K) Psi/Nd, P_os+g+p (2 + 2 + K) Psi/Nd, for mixed-precision Adam (K = 12). Our runs
are float32 AdamW: 4 bytes a parameter, 4 a gradient, K = 8 (exp_avg and exp_avg_sq; the parameters are
their own master copy). Section 7: P_os+g communicates what data parallelism does (2 Psi on the wire:
reduce-scatter + all-gather), P_os+g+p 1.5x (3 Psi: an all-gather forward, another backward, a
reduce-scatter).

The flat buffers: a rank holds S_u = ceil(Psi_u / Nd) elements of each unit (each transformer block, and
the rest: embeddings, final LayerNorm), so Psi/Nd is exceeded by the padding, less than one element per
unit: zero on the tiny model at Nd = 2, and 2 elements per block at Nd = 3 (49984 = 3 * 16661 + 1). AdamW
keeps one 4-byte step counter per tensor it updates: per parameter tensor unsharded, per unit with ZeRO.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from runner.job.verify import TOLERANCES
from runner.service.launch import torchrun_launcher
from tests.jobs import REPO, rank_env, run_torchrun

# The tiny preset's dimensions, written out: vocabulary, positions, width, layers.
V, T, D, L = 512, 128, 64, 4
# One GPT-2 block: ln_1 and ln_2 (2D each), c_attn (3D x D + 3D), attention c_proj (D x D + D),
# c_fc (4D x D + 4D), MLP c_proj (D x 4D + D).
BLOCK = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (4 * D * D + 4 * D) + (4 * D * D + D)
OUTER = V * D + T * D + 2 * D  # wte (the LM head is tied to it: once), wpe, ln_f
PSI = OUTER + L * BLOCK
TENSORS = 4 + 12 * L  # parameter tensors: wte, wpe, ln_f weight and bias; 12 per block
LR = 1e-3
BASE = {"model": "tiny", "batch": 8, "seq": 32, "workload": "train", "lr": LR}
STEPS = 3


slow = pytest.mark.slow  # the multi-process tests (10-25 s each on 2 cores)


def run_worker(spec: dict, stages: str, steps: int, tmp_path: Path) -> dict:
    world = spec.get("tp", 1) * spec.get("pp", 1) * spec.get("dp", 1)
    out = tmp_path / "zero.json"
    env = rank_env()
    argv = [*torchrun_launcher(world), str(REPO / "tests" / "zero_worker.py"), str(out), json.dumps(spec), stages,
            str(steps)]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_matches_reference(result: dict, steps: int) -> None:
    """Each step's loss and gradients against the reference's on the same weights, the weights after the last
    step against the reference's AdamW on the same gradients, then the trained model's logits and greedy
    tokens against the reference holding the same trained weights (tests/zero_worker.py run_stage)."""
    # On the same weights, a forward and backward differ only in summation order (another BLAS blocking, a
    # tensor-parallel partial sum, gradients summed per replica and then reduced): a float32 sum of K <= 256
    # terms (u = 2^-24) moves by ~sqrt(K) u of its terms' size, about 1e-6, over a few such sums in a row
    # (4 blocks, LayerNorm renormalising each); measured <= 3e-7 of the largest logit or gradient. 1e-5
    # keeps a 30x margin; a missing reduction, a gradient off by 2x or a wrong shard are O(1).
    for r in result["ranks"]:
        for ours, ref in zip(r["losses"], result["ref_losses"], strict=True):
            assert ours is None or abs(ours - ref) <= 1e-5 * abs(ref)
    assert any(r["losses"][0] is not None for r in result["ranks"])
    for g in result["grads"]:  # one a step
        assert g["uncovered"] == 0  # every reference element is held by some rank
        assert g["max_abs"] <= 1e-5 * g["max_ref"]
    # AdamW on the same gradients is the same elementwise arithmetic: runner/job/verify.py's float32 bound for one
    # step (a few roundings of the update, one of the weight), added up over the steps since the state is
    # the same; measured 0. Against a reference stepped with its own gradients it would be Adam's
    # amplification instead: a near-zero gradient's rounding turns into an update of up to 2 lr (after 3
    # steps on a Xeon, 0.035 lr a step); here a skipped step, a shard stepped with another's state or a
    # weight not gathered back is lr (1e-3) away.
    w, tol = result["weights"], TOLERANCES["float32"]
    assert w["uncovered"] == 0
    assert w["max_abs"] <= steps * (tol.weights_lr * LR + tol.weights_rel * w["max_ref"])
    # Forward and generate on the trained shards (parameters gathered per block under stage 3), against the
    # reference loaded with the same trained weights: the summation-order bound above.
    outputs = [r for r in result["ranks"] if r["tokens_equal"] is not None]
    assert outputs and all(r["tokens_equal"] for r in outputs)
    assert all(r["logits_max_abs"] <= 1e-5 * r["logits_max_ref"] for r in outputs)


def paper_bytes(stage: int, units: list[int], nd: int, tensors: int) -> dict[str, int]:
    """Bytes a rank holds at rest for float32 AdamW: Psi_u per unit, S_u = ceil(Psi_u / Nd)."""
    psi = sum(units)
    shard = sum(math.ceil(u / nd) for u in units)
    return {
        "param_bytes": 4 * psi if stage < 3 else 4 * shard,
        # Stage 1 all-reduces whole (padded) flat buffers: 4 Psi plus the padding.
        "grad_bytes": 4 * psi if stage == 0 else 4 * nd * shard if stage == 1 else 4 * shard,
        "optimizer_bytes": 8 * psi + 4 * tensors if stage == 0 else 8 * shard + 4 * len(units),
    }


@slow
def test_data_dp2_every_stage_matches_reference_and_the_papers_bytes(tmp_path):
    result = run_worker({**BASE, "strategy": "data", "dp": 2}, "0,1,2,3", STEPS, tmp_path)
    units = [OUTER] + [BLOCK] * L
    assert PSI == 241024 and all(u % 2 == 0 for u in units)  # no padding at Nd = 2
    total = {}
    for stage in (0, 1, 2, 3):
        res = result[str(stage)]
        assert_matches_reference(res, STEPS)
        want = paper_bytes(stage, units, 2, TENSORS)
        for r in res["ranks"]:
            assert {k: r[k] for k in want} == want, (stage, r)
            assert r["zero_stage"] == stage
        total[stage] = sum(want.values())
    # The paper's figure 1 at Nd = 2 for K = 8: 16 Psi -> 4 + 4 + 8/2 = 12 Psi -> 4 + 12/2 = 10 Psi -> 16/2 = 8 Psi
    # (plus AdamW's step counters, 4 bytes a tensor).
    assert total[0] == 16 * PSI + 4 * TENSORS
    assert total[1] == 12 * PSI + 4 * 5
    assert total[2] == 10 * PSI + 4 * 5
    assert total[3] == 8 * PSI + 4 * 5

    # Stages 2, 3 keep at most one unit's whole flat gradient waiting for its reduce-scatter (else they
    # would pile up during backward into the full gradients that sharding them removes).
    assert all(r["zero_reduce_buffers_peak"] == 1 for s in (2, 3) for r in result[str(s)]["ranks"])

    # Communication of one step (payload: all-reduce the tensor, all-gather the gathered buffer,
    # reduce-scatter the full input; plus the 8-byte loss all-reduce of every stage).
    comm = {s: result[str(s)]["ranks"][0]["comm_bytes"] for s in (0, 1, 2, 3)}
    assert comm[0]["all_reduce"] == 4 * PSI + 8
    assert comm[1] == {**comm[1], "all_reduce": 4 * PSI + 8, "all_gather": 4 * PSI, "reduce_scatter": 0}
    assert comm[2] == {**comm[2], "all_reduce": 8, "all_gather": 4 * PSI, "reduce_scatter": 4 * PSI}
    # Stage 3: every block gathered for forward and again for backward, the outer unit once per step.
    assert comm[3] == {**comm[3], "all_reduce": 8, "all_gather": 4 * (2 * PSI - OUTER), "reduce_scatter": 4 * PSI}
    # Section 7 on the wire at Nd = 2: stage 2 moves what data parallelism moves; stage 3 1.5x of it
    # less the outer unit's second gather, which this implementation keeps for the whole step.
    wire = {s: sum(v for k, v in result[str(s)]["ranks"][0]["comm_wire_bytes"].items()) - 8 for s in (0, 2, 3)}
    assert wire[2] == wire[0] == 4 * PSI
    assert wire[3] == 4 * (3 * PSI - OUTER) // 2


@slow
def test_data_dp3_shards_carry_the_stated_padding(tmp_path):
    result = run_worker({**BASE, "strategy": "data", "dp": 3, "batch": 6}, "3", 2, tmp_path)
    units = [OUTER] + [BLOCK] * L
    assert OUTER % 3 == 0 and BLOCK % 3 == 1  # each block pads 2 elements to reach 3 * 16662
    assert_matches_reference(result["3"], 2)
    for r in result["3"]["ranks"]:
        want = paper_bytes(3, units, 3, TENSORS)
        assert {k: r[k] for k in want} == want
        assert r["zero_flat_padding_elements"] == 2 * L
        # 4 Psi / Nd exceeded only by the padding: 2 elements per block, at most one per unit on a rank.
        assert 0 < r["param_bytes"] - 4 * PSI / 3 < 4 * 5


@slow
def test_3d_tp2_dp2_every_stage_matches_reference(tmp_path):
    spec = {**BASE, "strategy": "3d", "tp": 2, "dp": 2}
    result = run_worker(spec, "1,3", STEPS, tmp_path)
    # Megatron's split of one block over tp = 2: c_attn, c_fc rows and both c_proj columns halved, the
    # row-parallel biases and LayerNorms whole; the vocabulary halved, positions and ln_f whole.
    block = (12 * D * D + 3 * D + 4 * D) // 2 + D + D + 4 * D
    outer = V // 2 * D + T * D + 2 * D
    units = [outer] + [block] * L
    for stage in (1, 3):
        res = result[str(stage)]
        assert_matches_reference(res, STEPS)
        for r in res["ranks"]:
            want = paper_bytes(stage, units, 2, TENSORS)
            assert {k: r[k] for k in want} == want, (stage, r)


@slow
def test_3d_pp2_dp2_sharded_inside_a_pipeline_matches_reference(tmp_path):
    spec = {**BASE, "strategy": "3d", "pp": 2, "dp": 2, "microbatches": 2}
    result = run_worker(spec, "2,3", STEPS, tmp_path)
    first = [V * D + T * D] + [BLOCK] * 2  # stage 0: wte, wpe, blocks 0-1
    last = [2 * D + V * D] + [BLOCK] * 2  # stage 1: ln_f, its own copy of the tied head, blocks 2-3
    for stage in (2, 3):
        res = result[str(stage)]
        assert_matches_reference(res, STEPS)
        for r in res["ranks"]:
            units, tensors = (first, 2 + 24) if r["rank"] < 2 else (last, 3 + 24)
            want = paper_bytes(stage, units, 2, tensors)
            assert {k: r[k] for k in want} == want, (stage, r)
    # Inside a pipeline a stage-3 block is gathered for each microbatch's forward and backward.
    r0 = result["3"]["ranks"][0]
    assert r0["comm_calls"]["all_gather"] == 1 + 2 * 2 * 2  # outer once + 2 blocks x 2 microbatches x 2


@slow
def test_llama_sharded_by_zero_1_and_3_matches_reference_and_the_papers_bytes(tmp_path):
    """llama-tiny: RMSNorm weights only, fused Q/K/V of 4 + 2 + 2 heads of 16, SwiGLU's gate and up (176 wide), and
    an untied head in the outer unit beside the token embedding and final norm."""
    result = run_worker({**BASE, "model": "llama-tiny", "strategy": "data", "dp": 2}, "1,3", STEPS, tmp_path)
    block = 2 * D + (D + 2 * 32) * D + D * D + 2 * 176 * D + 176 * D
    units = [V * D + D + V * D] + [block] * L
    for stage in (1, 3):
        res = result[str(stage)]
        assert_matches_reference(res, STEPS)
        for r in res["ranks"]:
            want = paper_bytes(stage, units, 2, 3 + 6 * L)
            assert {k: r[k] for k in want} == want, (stage, r)


@slow
def test_job_verifies_zero3_and_reports_its_bytes(tmp_path):
    """The real job (verify pass, timed steps, figures) on data dp=2 with ZeRO-3."""
    spec = {**BASE, "strategy": "data", "dp": 2, "zero_stage": 3, "steps": 2, "warmup": 1, "verify": True}
    result = run_torchrun(spec, tmp_path)
    assert result["verify"]["passed"], result["verify"]
    want = paper_bytes(3, [OUTER] + [BLOCK] * L, 2, TENSORS)
    for r in result["ranks"]:
        assert {k: r[k] for k in want} == want
        assert r["zero_stage"] == 3


def test_flat_piece_index_picks_the_reference_elements_a_slice_holds():
    """A rank's flat slice of a parameter that is itself reference[index] (tensor parallelism), with zero
    padding rows (vocabulary): ref[flat_piece_index(...)] is the slice, padding left out."""
    from runner.gpt.model import Shard
    from runner.gpt.zero_units import flat_piece_index

    ref = torch.arange(7 * 5).view(7, 5).float()
    cases = [
        (None, ref),
        ((slice(2, 6),), ref[2:6]),
        (torch.tensor([6, 0, 3]), ref[[6, 0, 3]]),
        ((slice(4, 7),), torch.cat([ref[4:7], torch.zeros(1, 5)])),  # one padding row after the held rows
    ]
    for index, local in cases:
        flat = local.reshape(-1)
        valid = ref.numel() if index is None else ref[index].numel()
        for lo, hi in [(0, flat.numel()), (3, 11), (valid - 2, flat.numel()), (valid, flat.numel())]:
            picked = ref[flat_piece_index(Shard((7, 5), index), lo, hi)]
            assert torch.equal(picked, flat[lo : max(lo, min(hi, valid))])


@slow
def test_job_verifies_zero3_in_an_interleaved_pipeline_with_checkpointed_blocks(tmp_path):
    """ZeRO-3 as the data dimension of 3d with the other options of this release: interleaved 1F1B over two
    chunks a rank (a rank's blocks 0 and 2, gathered per use) and blocks recomputed in backward, which run
    a block's forward again inside backward (gathered there, not released until its gradients are in)."""
    spec = {**BASE, "strategy": "3d", "pp": 2, "dp": 2, "zero_stage": 3, "microbatches": 4, "batch": 16,
            "schedule": "interleaved-1f1b", "virtual_stages": 2, "checkpoint": "blocks", "steps": 2, "warmup": 1,
            "verify": True}  # fmt: skip
    result = run_torchrun(spec, tmp_path)
    assert result["verify"]["passed"], result["verify"]
    for r in result["ranks"]:
        assert r["zero_stage"] == 3 and r["recompute_calls"] > 0
