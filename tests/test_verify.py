"""Verify gives a verdict that can fail, and it leaves no trace on the run it checks (weights, memory).

Real torchrun/gloo jobs; the corrupted shard comes in through the job's fault-injection variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runner.job.verify import FAULT_ENV
from runner.spec.run_spec import usable_cores
from tests.jobs import REPO, read_events, run_torchrun

pytestmark = pytest.mark.slow


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["kind"] == "step"]


def test_a_corrupted_shard_fails_verify_and_submit_wait_exits_1(engine, monkeypatch):
    # Scaling one layer's MLP weight by 1.01 on the rank that holds it must show in logits, gradients and weights.
    monkeypatch.setenv(FAULT_ENV, "transformer.h.2.mlp.c_fc.weight")
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "submit", "--strategy", "pipeline", "--pp", "2", "--microbatches", "2",
         "--model", "tiny", "--workload", "train", "--steps", "1", "--verify", "--wait", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded"  # the job ran; its numbers are wrong
    verify = run["result"]["verify"]
    assert verify["passed"] is False
    failed = {f.split(":")[0] for f in verify["failures"]}
    assert {"logits", "grads", "weights"} <= failed, verify["failures"]
    assert verify["grads_max_rel_diff"] > verify["tolerances"]["grads"]


def test_verify_passes_in_float32_and_restores_the_weights_it_stepped(tmp_path):
    spec = dict(strategy="tensor", tp=2, model="tiny", workload="train", steps=3, warmup=0, batch=4, seq=16)
    checked = run_torchrun({**spec, "verify": True}, tmp_path / "verify")
    plain = run_torchrun({**spec, "verify": False}, tmp_path / "plain")
    verify = checked["verify"]
    assert verify["passed"] is True and verify["failures"] == []
    assert verify["grads_max_rel_diff"] <= 1e-5 and verify["logits_max_rel_diff"] <= 1e-5
    assert plain["verify"] is None
    # Verify's throwaway AdamW step is undone: the timed steps see exactly the weights of a run without verify.
    assert losses(tmp_path / "verify") == losses(tmp_path / "plain")


def test_bfloat16_verify_is_judged_with_the_bfloat16_bound(tmp_path):
    result = run_torchrun(dict(strategy="tensor", tp=2, model="tiny", workload="train", steps=1, warmup=0,
                               batch=4, seq=16, dtype="bfloat16", verify=True), tmp_path)  # fmt: skip
    verify = result["verify"]
    assert verify["dtype"] == "bfloat16" and verify["passed"] is True, verify
    # bf16 carries 8 significant bits: differences are far above float32's bound, within bf16's.
    assert 1e-5 < verify["logits_max_rel_diff"] <= verify["tolerances"]["logits"] == 3e-2


def test_peak_memory_is_the_runs_own_with_or_without_verify(tmp_path):
    """Verify builds a float32 reference with gradients and AdamW state (about 4x the model): none of it may
    show in the run's peak. The model: 2 layers of width 256 and a 8192-token vocabulary, 3.7M parameters."""
    spec = dict(strategy="single", model="custom", n_layer=2, n_head=4, n_embd=256, vocab_size=8192,
                block_size=64, workload="train", steps=2, warmup=1, batch=4, seq=32)  # fmt: skip
    params = 3_693_568 * 4  # bytes of float32 parameters, for scale
    plain = run_torchrun({**spec, "verify": False}, tmp_path / "plain")["ranks"][0]
    checked = run_torchrun({**spec, "verify": True}, tmp_path / "verify")["ranks"][0]
    # The run's own peak holds at least the weights, their gradients and AdamW's two moments ...
    assert plain["peak_mem_bytes"] >= 4 * params * 0.9
    # ... and verify, which would add about 4x the parameters again, adds nothing measurable.
    assert abs(checked["peak_mem_bytes"] - plain["peak_mem_bytes"]) < 1.0 * params, (checked, plain)
    assert checked["peak_rss_bytes"] > checked["peak_mem_bytes"]  # the absolute RSS includes torch itself


@pytest.mark.skipif(usable_cores() >= 4, reason="needs fewer than 4 usable cores to oversubscribe 4 ranks")
def test_four_pipeline_ranks_on_fewer_cores_are_marked_oversubscribed_with_their_cpu_wait(tmp_path):
    result = run_torchrun(dict(strategy="pipeline", pp=4, microbatches=4, model="tiny", workload="train",
                               steps=3, warmup=1), tmp_path)  # fmt: skip
    assert result["cpu_oversubscribed"] is True and result["cpu_pinned"] is False
    assert result["cpu_cores"] == usable_cores()
    waits = [r["cpu_wait_s"] for r in result["ranks"]]
    # Four runnable processes on fewer cores: the kernel made some of them wait for one.
    assert sum(waits) > 0, waits
    assert all(r["cpu_core"] is None for r in result["ranks"])


@pytest.mark.skipif(usable_cores() < 2, reason="needs 2 cores")
def test_two_ranks_on_two_cores_are_each_pinned_to_their_own_core(tmp_path):
    result = run_torchrun(dict(strategy="data", dp=2, model="tiny", workload="train", steps=1), tmp_path)
    cores = [r["cpu_core"] for r in result["ranks"]]
    assert result["cpu_oversubscribed"] is False and result["cpu_pinned"] is True
    assert len(set(cores)) == 2 and set(cores) <= os.sched_getaffinity(0)
    # The machine while it ran (runner/job/load.py): every rank's own CPU, the host measured once, by rank 0.
    assert all(r["timed_cpu_s"] > 0 for r in result["ranks"])
    assert [r["host_cpu_cores"] for r in result["ranks"]] == [2, None]  # the two cores the ranks are pinned to
    assert 0 <= result["others_cpu_share"] <= 1 + result["others_cpu_share_resolution"]
    assert result["load_avg_1m_start"] >= 0 and result["load_avg_1m_end"] >= 0
