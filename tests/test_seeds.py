"""Seeds of any size: batches and initial weights come out of every seed, the same on every process.

torch's generator takes seeds in [-2**63, 2**64); the batch seed seed * 1_000_003 + step leaves that range
from seed ~2**44 on, and a user may type 2**63+5 or 2**80. Such values used to raise "Overflow when
unpacking long" inside the job.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.gpt.model import GPT, PRESETS, init_parameter
from runner.job.data import synthetic_batch
from runner.spec.run_spec import RunSpec
from runner.spec.validation import validate_spec

REPO = Path(__file__).resolve().parent.parent
BIG = [2**44, 2**63 + 5, 2**64 + 5, 2**200 + 1]  # past int64 once multiplied, past int64, past uint64, far past


@pytest.mark.parametrize("seed", BIG)
def test_a_large_seed_gives_a_valid_batch_that_differs_by_step_and_by_seed(seed):
    idx, targets = synthetic_batch(50, 2, 16, seed, step=3)
    assert idx.shape == (2, 16) and int(idx.min()) >= 0 and int(idx.max()) < 50
    assert torch.equal(idx[:, 1:], targets[:, :-1])
    assert torch.equal(idx, synthetic_batch(50, 2, 16, seed, step=3)[0])  # the same on every call
    assert not torch.equal(idx, synthetic_batch(50, 2, 16, seed, step=4)[0])  # steps still differ
    assert not torch.equal(idx, synthetic_batch(50, 2, 16, seed + 1, step=3)[0])  # so do neighbouring seeds
    assert not torch.equal(idx, synthetic_batch(50, 2, 16, seed, step=-1)[0])  # the verify batch too


def test_seeds_that_always_worked_keep_their_batches_and_neighbours_stay_apart():
    """Small seeds are not re-hashed (a run repeated with its old seed sees the same data), and a folded
    seed right past the edge does not collide with one right before it."""
    edge = (2**64 - 1) // 1_000_003  # the last seed whose steps 0.. all fit torch's range
    a = synthetic_batch(1000, 4, 32, edge, step=0)[0]
    b = synthetic_batch(1000, 4, 32, edge + 1, step=0)[0]
    assert not torch.equal(a, b)
    ref = torch.randint(0, 1000, (4, 33), generator=torch.Generator().manual_seed(5 * 1_000_003 + 2))
    assert torch.equal(synthetic_batch(1000, 4, 32, 5, step=2)[0], ref[:, :-1])


@pytest.mark.parametrize("seed", [2**63 + 5, 2**200 + 1])
def test_a_large_seed_initialises_the_model_and_the_reference_matches_its_shards(seed):
    cfg = PRESETS["tiny"]
    model = GPT(cfg, seed=seed)
    wte = init_parameter("transformer.wte.weight", (cfg.vocab_size, cfg.n_embd), cfg, seed)
    assert torch.equal(model.transformer.wte.weight.detach(), wte)
    assert not torch.equal(wte, init_parameter("transformer.wte.weight", wte.shape, cfg, seed + 1))
    idx, targets = synthetic_batch(cfg.vocab_size, 2, 16, seed, step=0)
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert torch.isfinite(loss)


def test_folded_seeds_are_the_same_in_another_process():
    """A hash, not Python's per-process hash(): every rank rebuilds the same batch."""
    seed = 2**63 + 5
    code = (
        "import json; from runner.job.data import synthetic_batch; "
        f"print(json.dumps(synthetic_batch(97, 2, 8, {seed}, step=7)[0].tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == synthetic_batch(97, 2, 8, seed, step=7)[0].tolist()


def test_validate_accepts_any_non_negative_seed():
    for seed in BIG:
        assert not [p for p in validate_spec(RunSpec(strategy="single", seed=seed), gpu_count=0) if p.field == "seed"]


@pytest.mark.slow
def test_a_job_with_a_seed_past_uint64_runs_and_verifies(tmp_path):
    """Through torchrun as the runner launches it: 2 layer ranks, seed 2**64+5 (past what torch.manual_seed
    takes too), verified."""
    from tests.jobs import run_torchrun

    result = run_torchrun({"strategy": "layer", "pp": 2, "model": "tiny", "workload": "train", "batch": 2, "seq": 16,
                           "steps": 1, "warmup": 0, "seed": 2**64 + 5, "verify": True}, tmp_path)  # fmt: skip
    assert result["verify"]["passed"], result["verify"]
