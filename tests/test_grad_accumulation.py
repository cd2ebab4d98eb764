"""Gradient accumulation in every strategy on real gloo ranks: a replica's batch cut into m microbatches, each one's
forward and backward in turn, gives the gradients of the whole batch at once (the single-device reference), with
one reduction a step over data parallelism, overlapped with the last microbatch's backward.

Tolerances as every float32 strategy test: gradients within 1e-5 of the largest reference gradient (the
microbatches' means add up in another order than the whole batch's), weights after the AdamW steps within a
fraction of lr a step (runner/job/verify.py).
"""

from __future__ import annotations

import pytest

from tests.jobs import run_torchrun
from tests.test_zero import BASE, PSI, assert_matches_reference, run_worker

pytestmark = pytest.mark.slow

TOL = 1e-5


@pytest.mark.parametrize(("strategy", "degrees", "m"), [("single", {}, 4), ("tensor", {"tp": 2}, 2), ("data", {"dp": 2}, 2)])
def test_accumulated_microbatches_give_the_whole_batchs_gradients(tmp_path, strategy, degrees, m):
    spec = {"strategy": strategy, **degrees, "microbatches": m, "model": "tiny", "batch": 8, "seq": 32, "steps": 1,
            "warmup": 0, "verify": True, "workload": "train"}  # fmt: skip
    result = run_torchrun(spec, tmp_path)
    v = result["verify"]
    assert v["passed"], v
    assert v["grads_max_abs_diff"] <= TOL and v["loss_abs_diff"] <= TOL
    for r in result["ranks"]:
        figures = r
        # reported in the run: m microbatches, one in flight at a time (each one's backward follows its forward)
        assert figures["microbatches"] == m and figures["max_inflight_microbatches"] == 1
        assert figures["peak_activation_bytes"] == figures["activation_bytes_per_microbatch"]
        if strategy == "data":
            # one gradient all-reduce a step (the tiny model's 0.96 MB in one bucket) and the loss's, not one a
            # microbatch
            assert r["comm_calls"]["all_reduce"] == 2 and r["comm_bytes"]["all_reduce"] == 4 * PSI + 8


def test_zero_stages_accumulate_then_reduce_once(tmp_path):
    # dp 2 x 2 microbatches of 2 rows: every ZeRO stage against the reference over three AdamW steps, and the
    # step's gradient traffic that of one batch: an all-reduce (0, 1) or a reduce-scatter (2, 3) of Psi once
    result = run_worker({**BASE, "strategy": "data", "dp": 2, "microbatches": 2}, "0,1,2,3", 3, tmp_path)
    for stage in (0, 1, 2, 3):
        res = result[str(stage)]
        assert_matches_reference(res, 3)
        comm = res["ranks"][0]["comm_bytes"]
        grads = comm["all_reduce"] - 8 if stage < 2 else comm["reduce_scatter"]
        assert grads == 4 * PSI, (stage, comm)
