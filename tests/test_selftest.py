"""The self-test: which runs the devices allow, what it refuses, and the CPU self-test itself end to end
(this is how `make test` runs it: the real CLI, the real runner, real torchrun jobs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runner import api
from runner.gpt.config import kv_copies
from runner.selftest import environment, resolve_device
from runner.spec.run_spec import RunSpec
from runner.spec.selftest_layouts import comm_theory_bytes, layouts, selftest_specs
from runner.spec.validation import validate_spec
from tests.jobs import REPO
from tests.test_planner_measured import compare

STRATEGIES = {"single", "layer", "tensor", "pipeline", "data", "3d"}


def test_cpu_runs_every_strategy_and_workload_verified():
    rows = selftest_specs("cpu", gpus=0)
    specs = [s for s, _ in rows if s is not None]
    # 6 strategies x 3 workloads, gpipe's training, 10 options' training; llama-tiny: 6 strategies and tensor at tp 4
    # (its key/value heads copied) x 3 workloads
    assert len(specs) == len(rows) == 28 + 21
    options = {(s.strategy, s.schedule, s.virtual_stages, s.zero_stage, s.checkpoint, s.dtype) for s in specs}
    assert {o for o in options if o[1:] != ("1f1b", 1, 0, "none", "float32")} == {
        ("pipeline", "gpipe", 1, 0, "none", "float32"),
        ("pipeline", "interleaved-1f1b", 2, 0, "none", "float32"),
        ("pipeline", "zb-h1", 1, 0, "none", "float32"),
        ("pipeline", "1f1b", 1, 0, "blocks", "float32"),
        ("pipeline", "1f1b", 1, 0, "none", "bf16-mixed"),
        ("data", "1f1b", 1, 1, "none", "float32"),
        ("data", "1f1b", 1, 2, "none", "float32"),
        ("data", "1f1b", 1, 3, "none", "float32"),
        ("3d", "1f1b", 1, 3, "none", "float32"),
        ("single", "1f1b", 1, 0, "every-2", "float32"),
    }
    assert {s.strategy for s in specs} == STRATEGIES
    assert all(s.verify and s.device == "cpu" and "selftest" in s.tags for s in specs)
    assert all(validate_spec(s, gpu_count=0) == [] for s in specs)
    three_d = {(s.tp, s.pp, s.dp) for s in specs if s.strategy == "3d"}
    assert three_d == {(2, 2, 2)}
    llama = [s for s in specs if s.model == "llama-tiny"]
    assert {s.strategy for s in llama} == STRATEGIES and len(llama) == 21
    kv = {s.tp: kv_copies(s.model_config(), s.tp) for s in llama if s.strategy == "tensor"}
    assert kv == {2: 1, 4: 2}  # tp 2 splits the 2 key/value heads, tp 4 copies each to 2 ranks


def test_on_real_text_every_run_reads_the_corpus_and_is_valid():
    specs = [s for s, _ in selftest_specs("cpu", gpus=0, data="stdlib") if s is not None]
    synthetic = [s for s, _ in selftest_specs("cpu", gpus=0) if s is not None]
    assert len(specs) == len(synthetic) and {s.data for s in specs} == {"stdlib"}
    assert all(validate_spec(s, gpu_count=0) == [] for s in specs)
    assert {s.model_config().vocab_size for s in specs} == {256}  # bytes: the model's vocabulary follows


def test_the_strategies_alone_leave_out_the_option_rows():
    rows = selftest_specs("cpu", gpus=0, options=False)
    assert len(rows) == 19 and all(s.zero_stage == 0 and s.checkpoint == "none" for s, _ in rows)


def test_one_gpu_runs_only_single_and_names_what_it_skips():
    rows = selftest_specs("cuda", gpus=1)
    ran = [s for s, _ in rows if s is not None]
    # 3 workloads of each family, and checkpointing's training
    assert {s.strategy for s in ran} == {"single"} and len(ran) == 7
    skipped = [label for s, label in rows if s is None]
    assert "tensor tp=2 train skipped (needs 2 GPUs, 1 present)" in skipped
    assert any(label.startswith("3d tp=2 pp=2 dp=1") and "needs 4 GPUs, 1 present" in label for label in skipped)


def test_four_gpus_take_3d_without_data_parallelism():
    specs = [s for s, _ in selftest_specs("cuda", gpus=4) if s is not None]
    assert {(s.tp, s.pp, s.dp) for s in specs if s.strategy == "3d"} == {(2, 2, 1)}
    assert {s.strategy for s in specs} == STRATEGIES


def test_cuda_asked_for_without_cuda_is_a_failure_with_the_runners_reason():
    env = environment()  # this machine, no runner: read as the runner would read it
    assert env["usable_gpus"] == [] and env["torch_cuda"] is None
    device, why = resolve_device("cuda", env)
    assert device is None and why == f"CUDA was asked for but {env['no_gpu_reason']}"
    assert "torch 2.13.0+cpu is a CPU-only build" in why
    assert resolve_device("auto", env) == ("cpu", None)


def test_comm_theory_counts_megatron_all_reduces_by_hand():
    # tiny: 4 layers, h = 64. tp=2 train on 8 x 32 tokens: 4 all-reduces of 8*32*64 floats per layer plus the
    # embedding's (forward) and the head input's (backward), on each of 2 ranks.
    spec = RunSpec(strategy="tensor", tp=2, model="tiny", workload="train", batch=8, seq=32)
    assert comm_theory_bytes(spec) == 2 * (4 * 4 + 2) * (8 * 32 * 64 * 4)
    # Forward: 2 per layer + the embedding's, and the logits (8*32 tokens x 512 vocab) gathered on both ranks.
    forward = RunSpec(strategy="tensor", tp=2, model="tiny", workload="forward", batch=8, seq=32)
    assert comm_theory_bytes(forward) == 2 * (2 * 4 + 1) * (8 * 32 * 64 * 4) + 2 * 8 * 32 * 512 * 4
    # bf16-mixed: the 2 row-parallel sums a layer forward are bf16 (2 bytes); the embedding's and every backward
    # sum stay float32.
    mixed = RunSpec(strategy="tensor", tp=2, model="tiny", workload="train", batch=8, seq=32, dtype="bf16-mixed")
    assert comm_theory_bytes(mixed) == 2 * (4 * 2 * 2 + (1 + 2 * 4 + 1) * 4) * (8 * 32 * 64)
    # A 2-stage pipeline forward: one activation across the one boundary.
    assert comm_theory_bytes(RunSpec(strategy="pipeline", pp=2, model="tiny", workload="forward")) == 8 * 64 * 64 * 4
    # Training adds the gradient back and the tied embedding's gradient (512 x 64) all-reduced on both stages.
    train = RunSpec(strategy="pipeline", pp=2, model="tiny", workload="train")
    assert comm_theory_bytes(train) == 2 * 8 * 64 * 64 * 4 + 2 * 512 * 64 * 4


def test_comm_theory_of_grouped_query_heads_and_an_untied_head_by_hand():
    # llama-tiny (4 layers, h 64, 4 heads of 16, 2 key/value heads): at tp 2 the heads split and the Megatron sums
    # are all there is; at tp 4 each rank also sums its copied key/value head's K and V rows (2 x 16 rows of 64)
    # over its pair, every layer.
    megatron = 2 * (4 * 4 + 2) * (8 * 32 * 64 * 4)
    split = RunSpec(strategy="tensor", tp=2, model="llama-tiny", workload="train", batch=8, seq=32)
    assert comm_theory_bytes(split) == megatron
    copied = RunSpec(strategy="tensor", tp=4, model="llama-tiny", workload="train", batch=8, seq=32)
    assert comm_theory_bytes(copied) == 4 * (4 * 4 + 2) * (8 * 32 * 64 * 4) + 4 * 4 * (2 * 16 * 64) * 4
    # A pipeline of an untied head sums no embedding: the activation forward and its gradient back only.
    train = RunSpec(strategy="pipeline", pp=2, model="llama-tiny", workload="train")
    assert comm_theory_bytes(train) == 2 * 8 * 64 * 64 * 4


def test_selftest_cuda_here_fails_before_queueing_anything(engine):
    proc = subprocess.run([sys.executable, "-m", "runner", "selftest", "--device", "cuda"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert "NVIDIA driver: not found (NVMLError_LibraryNotFound" in proc.stdout
    assert "GPUs runs may use, as this machine's runner decides: none" in proc.stdout
    assert "FAILED: CUDA was asked for but no NVIDIA GPU: NVML is unavailable" in proc.stdout
    assert api.count_runs(engine) == 0


@pytest.mark.slow
def test_cpu_selftest_passes_end_to_end_and_stores_its_runs(engine):
    # One strategy's rows, each workload (3 runs), through the runner as the whole self-test goes: tensor, whose
    # communication the rows hold to the theory in every workload. Every other row is a spec validated above whose
    # job verifies in its own test (tests/test_layer_split.py, test_pipeline.py, test_data_parallel.py,
    # test_three_d.py, test_zero.py, test_pipeline_schedules.py, test_checkpointing.py, test_precision.py), its
    # memory against the planner in test_planner_measured.py: all 19 here again took 3 of the suite's minutes.
    argv = [sys.executable, "-m", "runner", "selftest", "--device", "cpu", "--json", "--no-options"]
    proc = subprocess.run([*argv, "--strategy", "tensor"], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = json.loads(proc.stdout)
    failed = [r for r in out["rows"] if not r["ok"]]
    assert proc.returncode == 0 and out["passed"], failed or proc.stderr[-3000:]
    assert len(out["rows"]) == 3 and all(r["verdict"] == "pass" for r in out["rows"])
    assert {r["label"].split()[0] for r in out["rows"]} == {"tensor"}
    assert out["environment"]["gloo"] is True
    stored = api.list_runs(engine, api.RunFilter(tag=["selftest"]), limit=100)
    assert len(stored) == 3 and set(stored["status"]) == {"succeeded"}
    for row in out["rows"]:
        run = api.get_run(engine, row["run_id"])
        assert run["result"]["verify"]["passed"] is True
        assert (
            len(row["peak_mem_bytes"]) == len(run["ranks"]) == run["spec"]["tp"] * run["spec"]["pp"] * run["spec"]["dp"]
            and min(row["peak_mem_bytes"]) > 0
        )
        # The planner's memory model against every strategy the self-test ran (tests/test_planner_measured.py
        # `compare`): parameter and AdamW bytes and in-flight microbatches to the byte, the bytes autograd saved
        # within 10%.
        spec = RunSpec.from_dict(run["spec"])
        assert compare(spec, run["ranks"], tolerance=0.0, exact_only=True) == [], row["label"]
        assert compare(spec, run["ranks"]) == [], row["label"]
        # Counted payload against the textbook's leading terms: never below them, and what they leave out
        # (loss all-reduces, generated tokens, next-token logits) is small at this size.
        if row["comm_theory_bytes"]:
            assert 1.0 <= row["comm_bytes"] / row["comm_theory_bytes"] <= 1.15, row
        else:
            assert row["comm_bytes"] == 0, row


def test_the_self_test_lists_what_the_registry_holds_a_new_strategy_included():
    from runner.spec.strategies import Strategy, registered, strategy_names

    assert [label.split()[0] for _, label, _ in layouts(0, "cpu")] == [
        *["single"] * 3, *["layer"] * 2, *["tensor"] * 3, *["pipeline"] * 7, *["data"] * 5, *["3d"] * 3,
    ]  # fmt: skip
    assert {label.split()[0] for _, label, _ in layouts(0, "cpu")} == set(strategy_names())
    with registered(Strategy(name="zero", help="sharded data parallelism (a test's)", degrees=("dp",))):
        rows = [(s, label) for s, label in selftest_specs("cpu", gpus=0) if label.startswith("zero")]
        assert [label for _, label in rows] == [
            *(f"zero dp=2 {w}" for w in ("forward", "generate", "train")),
            *(f"zero dp=2 llama-tiny {w}" for w in ("forward", "generate", "train")),
        ]
        assert all(s.strategy == "zero" and s.world_size == 2 and s.verify for s, _ in rows)
    assert "zero" not in {label.split()[0] for _, label in selftest_specs("cpu", gpus=0)}
