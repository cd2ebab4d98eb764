"""Layouts, step time, devices, the `plan` CLI and the calibration store (no torch except the one calibration run)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from itertools import pairwise

import pytest

from runner.planner.byte_counts import rank_parameters
from runner.planner.calibrate import Calibration, devices_from_calibration, stored
from runner.planner.cli import add_plan_parser, run_plan
from runner.planner.devices import described, from_gpus, from_lease, from_partition, matmul_seconds, preset
from runner.planner.inputs import input_problems
from runner.planner.layouts import evaluate, plan, usable_note
from runner.planner.memory import rank_memory
from runner.planner.models import MODELS, Layout, Workload, with_dims
from runner.planner.step_time import predict_step, rank_passes, ring_allreduce_s
from runner.spec.run_spec import RunSpec
from runner.spec.validation import validate_spec

GB = 1e9
PRESETS_TINY = MODELS["tiny"]


def test_infeasible_reasons_name_the_cause():
    gpt2, h100 = MODELS["gpt2"], preset("h100-80gb", 16, 8)
    w = Workload(batch=16, seq=1024)
    assert "n_head 12 not divisible by tp 8" in evaluate(gpt2, Layout(tp=8, dp=2), w, h100).reasons
    assert "tp 16 exceeds the 8 GPUs of a node" in evaluate(gpt2, Layout(tp=16), w, h100).reasons
    assert "n_layer 12 not divisible by pp 8" in evaluate(gpt2, Layout(pp=8, dp=2), w, h100).reasons
    small = described(1, 24, 100, 10, 10, 1)  # 24 GiB, 1 GiB of it reserved for the CUDA context
    (reason,) = evaluate(gpt2, Layout(), Workload(batch=64, seq=1024), small).reasons
    assert reason.startswith("needs 74.6 GiB per GPU, you have 23.0 GiB; microbatches of 64 sequences")
    assert reason.endswith("it needs 3.0 GiB")  # the fix named: one sequence a microbatch
    (reason,) = evaluate(gpt2, Layout(), Workload(batch=64, seq=1024, microbatch_size=1), described(1, 3, 100, 10, 10, 1)).reasons
    assert reason.startswith("needs 3.0 GiB") and reason.endswith(", you have 2.0 GiB")  # no fix to name
    assert usable_note(small).startswith("you have 23.0 GiB of each GPU's 24.0, 1.0 reserved")  # said once beside it


def test_each_dimension_tensor_parallelism_splits_is_named_on_its_own():
    """An MLP width tp does not divide is the MLP's fault, not n_embd's (4096 is divisible by every tp here)."""
    odd_mlp = replace(MODELS["llama-3.1-8b"], ffn_hidden=14335)  # 14335 = 5 x 47 x 61: no tp of 2, 4, 8 divides it
    w, h100 = Workload(batch=8, seq=1024), preset("h100-80gb", 8, 8)
    for tp in (2, 4, 8):
        c = evaluate(odd_mlp, Layout(tp=tp, dp=8 // tp), w, h100)
        assert c.reasons == (f"ffn_hidden (MLP width) 14335 not divisible by tp {tp}",) and c.memory is None
    assert evaluate(odd_mlp, Layout(dp=8), w, h100).memory is not None  # tp 1 splits nothing: judged on memory
    narrow = replace(MODELS["gpt2"], n_embd=770, n_head=2, ffn_hidden=3072)  # 770 = 2 x 5 x 7 x 11: tp 4 does not
    assert "n_embd 770 not divisible by tp 4" in evaluate(narrow, Layout(tp=4, dp=2), w, h100).reasons


def test_a_memory_reason_names_the_lab_engines_adamw_step_where_the_peak_falls():
    """70B on 16 A100-80GB, ZeRO-3, bf16-master: every layout's peak is AdamW's step, where the lab's engine holds
    the masters' float32 gradients and foreach AdamW's temporary, 8 bytes a stepped parameter; the reason says how
    much of the peak that is, since another engine would not hold it."""
    cfg, a100 = MODELS["llama-3.1-70b"], preset("a100-80gb", 16, 8)
    w = Workload(batch=8, seq=2048, dtype="bf16-master", checkpoint="blocks")
    c = evaluate(cfg, Layout(tp=2, dp=8, zero_stage=3), w, a100)
    assert c.memory is not None and c.memory.peak_at.startswith("AdamW's step")
    stepped = c.memory.param_count  # ZeRO-3: the rank steps its shard, the parameters it holds
    assert c.memory.optimizer_step_bytes == pytest.approx(8 * stepped, rel=0.01)
    (reason,) = c.reasons
    step_gib = c.memory.optimizer_step_bytes / 2**30
    assert f"peak in AdamW's step: {step_gib:.1f} GiB of it the lab engine's step buffers" in reason
    small = evaluate(MODELS["gpt2"], Layout(), Workload(batch=64, seq=1024), described(1, 24, 100, 10, 10, 1))
    assert small.memory is not None and not small.memory.peak_at.startswith("AdamW") and "AdamW" not in small.reasons[0]


def test_every_layout_is_listed_once_and_feasible_ones_are_ranked():
    p = plan(MODELS["gpt2"], Workload(batch=16, seq=1024), preset("a100-40gb", 16, 8), zero_stages=(0, 1))
    labels = [c.layout.label() for c in p.feasible + p.infeasible]
    assert len(labels) == len(set(labels))
    # 16 = 2^4 = tp x pp x dp: C(6, 2) = 15 ordered factorizations; 5 have dp = 1 (tp x pp = 1x16, 2x8, 4x4,
    # 8x2, 16x1), the other 10 come again with ZeRO-1
    assert len(labels) == 15 + 10
    times = [c.step.total for c in p.feasible]
    assert times == sorted(times) and p.best is p.feasible[0]


def test_data_parallel_all_reduce_time_by_hand():
    # gpt2 over dp 8 on one node at 100 GB/s (link efficiency 1): ring all-reduce of 4-byte gradients,
    # 2 (n-1)/n x 497,759,232 bytes / 1e11; the engine starts each 25 MiB bucket as the backward makes it, so only the
    # last bucket's share outlasts a backward this long (float32 at half of 6.7 TFLOP/s: over a second)
    dev = described(8, 80, 100, 100, 10, 8)
    s = predict_step(MODELS["gpt2"], Layout(dp=8), Workload(batch=8, seq=1024, dtype="float32"), dev, 0.5, 1.0)
    assert s.dp_comm_total_s == pytest.approx(2 * 7 / 8 * 124_439_808 * 4 / 100e9)
    assert s.dp_comm_s == pytest.approx(s.dp_comm_total_s * 25 * 2**20 / (124_439_808 * 4))
    assert ring_allreduce_s(1e9, 1, 1e9) == 0
    # across nodes (2 GPUs a node) the ring crosses each node boundary through the node's 2 network cards at once
    two = described(8, 80, 100, 100, 10, 2)
    s2 = predict_step(MODELS["gpt2"], Layout(dp=8), Workload(batch=8, seq=1024, dtype="float32"), two, 0.5, 1.0)
    assert s2.dp_comm_total_s == pytest.approx(100 / (2 * 10) * s.dp_comm_total_s)
    # inside a pipeline the reduction follows the backward: all of it exposed
    piped = predict_step(MODELS["gpt2"], Layout(pp=2, dp=4), Workload(batch=8, seq=1024, dtype="float32"), dev, 0.5, 1)
    assert piped.dp_comm_s == piped.dp_comm_total_s > 0


def test_compute_and_bubble_by_hand():
    # gpt2 train, batch 8 x 1024, float32 at a flat half of 10 TFLOP/s; 1F1B over 4 stages of 3 layers, microbatches
    # of one sequence. A layer's forward: its matmuls 2 T 12 h^2 and the causal half of attention's two products,
    # 2 s^2 h; its backward twice the matmuls and 2.5 attention forwards. The last stage paces the pipeline: its
    # layers and the head ([T, h] x [h, V] forward, twice that backward).
    h, s, v = 768, 1024, 50257
    layer = (24 * s * h * h + 2 * s * s * h) + (48 * s * h * h + 5 * s * s * h)
    last = 3 * layer + 6 * s * h * v
    dev = described(4, 80, 100, 1000, 1000, 4, peak_fp32_tflops=10)
    s_ = predict_step(MODELS["gpt2"], Layout(pp=4), Workload(batch=8, seq=1024, dtype="float32"), dev, 0.5, 1.0)
    n = 124_439_808 - 1024 * 768  # PaLM's 6N + 12 l h s a token for the reported FLOPs, N without the positions
    assert s_.flops == pytest.approx(8 * 1024 * (6 * n + 12 * 12 * 768 * 1024))
    assert s_.compute_s == pytest.approx(8 * last / (10e12 * 0.5))
    # 1F1B, p 4, m 8 (one sequence each): bubble (p-1)/(m+p-1) = 3/11 of the pipelined time
    assert s_.bubble_fraction == pytest.approx(3 / 11)
    assert s_.bubble_s / (s_.compute_s + s_.bubble_s) == pytest.approx(3 / 11)
    ck = predict_step(MODELS["gpt2"], Layout(pp=4), Workload(batch=8, seq=1024, checkpoint="blocks"), dev)
    assert ck.flops == pytest.approx(s_.flops * 4 / 3)  # one more forward of every block


def test_tensor_parallel_bytes_by_hand():
    # tp 2 in a node at 100 GB/s: 4 all-reduces a layer of b s h float32, 2 (t-1)/t of it each, 12 layers; and
    # each of the 53 all-reduces (those 48, the embedding's, the head input's, the loss's 3) NCCL's latency over
    # NVLink (100 GB/s is more than PCIe carries): 8.4 us and 2 (t-1) ring steps of 3.4 us
    dev = described(2, 80, 100, 100, 10, 2)
    s = predict_step(MODELS["gpt2"], Layout(tp=2), Workload(batch=2, seq=1024, dtype="float32"), dev, 0.5, 1.0)
    latency = 53 * (8.4e-6 + 2 * 3.4e-6)
    assert s.tp_comm_s == pytest.approx(12 * 4 * (2 * 1 / 2) * 2 * 1024 * 768 * 4 / 100e9 + latency)


def test_devices_from_nvml_and_partition():
    dev = from_gpus([{"name": "NVIDIA H100 80GB HBM3", "memory_total": 85_520_809_984}] * 4)
    assert dev.count == 4 and dev.peak("bf16-mixed") == 989e12 and dev.peak("float32") == 67e12
    lease = {"host": "gpu-box", "gpus": [{"name": "NVIDIA A100-SXM4-40GB", "memory_total": 42_949_672_960}] * 2}
    other = from_lease(lease)
    assert other is not None and other.count == 2 and other.peak("float32") == 19.5e12 and "gpu-box" in other.source
    assert from_lease({"host": "cpu-box", "gpus": []}) is None
    from runner.service.cluster import parse_sinfo

    part = parse_sinfo("n1|64|gpu:8|idle\nn2|64|gpu:8|mixed\n", "gpu")
    d = from_partition(part, "a100-80gb")
    assert (d.count, d.gpus_per_node) == (16, 8) and "partition gpu" in d.source


def test_plan_cli_json(capsys):
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model", "gpt3-175b", "--gpus", "512", "--gpu", "h100-80gb",
                              "--gpus-per-node", "8", "--batch", "1536", "--seq", "2048", "--zero", "0,1",
                              "--checkpoint", "blocks", "--json"])  # fmt: skip
    assert run_plan(args) == 0
    out = json.loads(capsys.readouterr().out)
    guide = [c for c in out["feasible"] if (c["tp"], c["pp"], c["dp"], c["zero_stage"]) == (4, 8, 16, 1)]
    assert guide and guide[0]["memory_gib"] < 78
    assert any("n_head 96 not divisible by tp 512" in r for c in out["infeasible"] for r in c["reasons"])


def test_plan_cli_table_and_bad_arguments(capsys):
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    assert run_plan(parser.parse_args(["plan", "--model", "gpt2", "--gpus", "4", "--gpu", "l4"])) == 0
    text = capsys.readouterr().out
    assert "GiB/GPU" in text and "infeasible" in text and "n_head 12 not divisible by tp 8" not in text
    assert "GiB/GPU: the most a rank holds at one moment, not the sum of the columns" in text  # the page's peak-at
    assert "the first row peaks at: " in text
    # the model line names every part the plan counts: a custom llama keeps the preset's tied head unless told
    args = ["plan", "--family", "llama", "--n-kv-head", "4", "--gpus", "4", "--gpu", "l4"]
    assert run_plan(parser.parse_args(args)) == 0
    assert "model: llama family: 12 layers, 12 heads, 4 key/value heads, width 768, MLP 3072, vocabulary 50257, context 1024, " \
        "rope_theta 10000, tied head\n" in capsys.readouterr().out
    assert run_plan(parser.parse_args(["plan", "--memory-gib", "10"])) == 2
    assert "--tflops" in capsys.readouterr().err


def plan_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


@pytest.mark.parametrize("part", [{"n_kv_head": 0}, {"ffn_hidden": 0}, {"rope_theta": -1.0}, {"rope_theta": 0.0},
                                  {"rope_theta": math.nan}, {"rope_theta": math.inf},
                                  {"family": "gpt2", "rope_theta": 5.0}])  # fmt: skip
def test_the_planner_refuses_a_model_part_as_submit_does(part):
    """One rule for both: the planner says what `submit` (validate_spec) says of the same part on the same model."""
    (field,) = set(part) - {"family"}
    submit = [p for p in validate_spec(RunSpec(model="llama-tiny", **part)) if p.field == field]
    assert len(submit) == 1
    cfg = with_dims(MODELS["llama-tiny"], **part)
    planner = [p for p in input_problems(cfg, Workload(seq=64), parts=part) if p.field == field]
    assert planner == submit
    assert input_problems(with_dims(MODELS["llama-tiny"], rope_theta=5.0), Workload(seq=64), parts={"rope_theta": 5.0}) == []


@pytest.mark.parametrize("argv, flag, says", [
    (["--n-kv-head", "0"], "--n-kv-head", "must be at least 1 (got 0)"),  # submit's rule, before how heads divide
    (["--block-size", "0"], "--block-size", "must be at least 1 (got 0)"),  # not also the --seq it defaulted
    (["--rope-theta", "nan", "--model", "llama-tiny"], "--rope-theta", "must be a positive number"),
    (["--rope-theta", "5"], "--rope-theta", "learned positions"),  # gpt2 has no rotary base to set
    (["--gpus", "8", "--gpus-per-node", "3"], "--gpus-per-node", "give gpus a multiple of 3 (6 or 9)"),
    (["--gpus", "12", "--gpu", "h100-80gb"], "--gpus", "whole nodes of 8"),  # the kind's usual node, not given
    (["--gpus", "12", "--memory-gib", "80", "--tflops", "100", "--bw-intra", "100", "--bw-inter", "10"], "--gpus",
     "whole nodes of 8"),
])  # fmt: skip
def test_plan_cli_names_only_the_flag_at_fault(capsys, argv, flag, says):
    assert run_plan(plan_args(*argv)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"plan: {flag}: ") and says in line


@pytest.mark.parametrize("argv", [["--gpus", "4", "--gpu", "a10"], ["--gpus", "2", "--gpus-per-node", "8"],
                                  ["--gpus", "16", "--gpu", "a10", "--gpus-per-node", "8"]])  # fmt: skip
def test_plan_cli_takes_whole_nodes_and_part_of_one(capsys, argv):
    """A count that fills whole nodes, or is less than one node (part of it), is a cluster that exists."""
    assert run_plan(plan_args(*argv, "--model", "tiny", "--seq", "64", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["feasible"]


def test_plan_cli_an_unreadable_partition_is_named_not_a_traceback(capsys, monkeypatch):
    from runner.service import cluster

    def unreadable(name: str, *args, **kwargs):
        raise cluster.ClusterError(f"sinfo could not read partition {name!r}: sinfo: error: bad name\nsinfo: fatal")

    monkeypatch.setattr(cluster, "read_partition", unreadable)
    assert run_plan(plan_args("--partition", "foo", "--gpu", "h100-80gb")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # sinfo's lines joined: one message
    assert line.startswith("plan: --partition: sinfo could not read partition 'foo': sinfo: error: bad name; sinfo")
    assert "sinfo -s" in line and "--gpu KIND --gpus N" in line
    monkeypatch.setattr(cluster, "read_partition", lambda name, *a, **k: cluster.parse_sinfo("n1|64|(null)|idle\n", name))
    assert run_plan(plan_args("--partition", "cpus", "--gpu", "h100-80gb")) == 2  # a partition without GPUs
    assert capsys.readouterr().err.startswith("plan: --partition: partition cpus has no GPUs per node")


def test_calibration_stored_and_used(engine):
    cal = Calibration("box", "cpu", "AMD EPYC", {"float32": 40e9, "bfloat16": 140e9}, 1.9e9, 2, "gloo")
    assert len(cal.store(engine)) == 2
    back = stored(engine, "box")
    assert back is not None and back.matmul_flops == cal.matmul_flops and back.allreduce_bytes_per_s == 1.9e9
    assert stored(engine, "other") is None
    dev = devices_from_calibration(back, 2, 24 * 2**30)
    assert (dev.count, dev.peak("float32"), dev.bw_intra) == (2, 40e9, 1.9e9)
    assert "calibrated" in dev.source and "40.0 GFLOP/s float32" in dev.source and "1.90 GB/s" in dev.source


def test_calibrate_measures_this_host():
    from runner.planner.calibrate import measure_allreduce, measure_matmul

    mm = measure_matmul("cpu", 256, "float32")
    assert 1e8 < mm["flops"] < 1e13  # a core does 0.1 to 10,000 GFLOP/s
    ar = measure_allreduce("cpu", mib=1, ranks=2)
    assert ar["ranks"] == 2 and ar["busbw"] > 1e6


def test_chunks_apply_to_pipelines_and_microbatches_to_every_layout():
    # tiny has 4 layers: interleaved with v = 4 splits over pp 1 (no pipeline: nothing to interleave) but not pp 2;
    # without a pipeline the 4 microbatches are gradient accumulation: a replica's 4 rows one at a time
    w = Workload(batch=8, seq=64, schedule="interleaved-1f1b", virtual_stages=4, microbatches=4)
    dev = preset("h100-80gb", 2, 2)
    alone = evaluate(PRESETS_TINY, Layout(dp=2), w, dev)
    assert alone.feasible and alone.microbatches == 4 and alone.memory.microbatch_size == 1
    by_size = evaluate(PRESETS_TINY, Layout(dp=2), replace(w, microbatches=0, microbatch_size=2), dev)
    assert by_size.microbatches == 2 and by_size.memory.microbatch_size == 2
    assert "batch per replica 4 not divisible by microbatches of 3" in evaluate(
        PRESETS_TINY, Layout(dp=2), replace(w, microbatches=0, microbatch_size=3), dev).reasons  # fmt: skip
    assert "n_layer 4 not divisible by pp 2 x virtual stages 4" in evaluate(PRESETS_TINY, Layout(pp=2), w, dev).reasons


def test_communication_in_the_runs_precision_and_zero_shares():
    # gpt2, pp 2 x dp 4 on one node at 100 GB/s: the reductions follow the pipeline's backward (all exposed). A share
    # is (n-1)/n of the rank's parameters on the wire once: plain data parallelism all-reduces (2 shares), ZeRO-1 adds
    # the all-gather of the updated weights (3), ZeRO-2 reduce-scatters and all-gathers (2: the paper's section 7).
    dev = described(8, 80, 100, 100, 10, 8)
    work = Workload(batch=8, seq=1024, dtype="bf16-master")
    psi = max(rank_parameters(MODELS["gpt2"], Layout(pp=2, dp=4), r).total for r in (0, 1))
    share = 3 / 4 * psi / 100e9
    totals = {z: predict_step(MODELS["gpt2"], Layout(pp=2, dp=4, zero_stage=z), work, dev, 0.5, 1.0).dp_comm_total_s
              for z in (0, 1, 2)}  # fmt: skip
    assert totals == pytest.approx({0: 2 * 2 * share, 1: 3 * 2 * share, 2: 2 * 2 * share})  # bfloat16 gradients
    wide = predict_step(MODELS["gpt2"], Layout(pp=2, dp=4), replace(work, reduce_fp32=True), dev, 0.5, 1.0)
    assert wide.dp_comm_total_s == pytest.approx(2 * 4 * share)  # reduce_fp32: 4 bytes a gradient on the wire
    # pipeline messages at the residual stream's width: bfloat16 under bf16-master, float32 under bf16-mixed
    mixed = predict_step(MODELS["gpt2"], Layout(pp=2, dp=4), replace(work, dtype="bf16-mixed"), dev, 0.5, 1.0)
    master = predict_step(MODELS["gpt2"], Layout(pp=2, dp=4), work, dev, 0.5, 1.0)
    assert mixed.pp_comm_s == pytest.approx(2 * master.pp_comm_s)


def test_matmul_time_depends_on_shape_and_device_kind():
    # A [8192, 8192] x [8192, 8192] bf16 product is 64 x 64 = 4096 tiles of 128 x 128: 31.03 waves of an H100's 132
    # SMs, so 32 whole waves at 80.1% of the peak (3% lost to the last wave); on an A100's 108 SMs 37.9 waves, so 38.
    # With 8192 x 64 outputs (64 half-empty tiles) the inputs' traffic through HBM dominates: far below the peak.
    h100, a100 = preset("h100-80gb", 1), preset("a100-80gb", 1)
    tile = 2 * 128 * 128 * 8192
    big = matmul_seconds(h100, "bfloat16", 8192, 8192, 8192)
    assert big == pytest.approx(32 * 132 * tile / (989e12 * 0.801))
    assert matmul_seconds(a100, "bfloat16", 8192, 8192, 8192) == pytest.approx(38 * 108 * tile / (312e12 * 0.801))
    thin = matmul_seconds(h100, "bfloat16", 8192, 64, 8192)
    assert thin == pytest.approx((8192 * 8192 + 2 * 8192 * 64) * 2 / (3350e9 * 0.8))  # [m, k], [k, n], [m, n]


def test_an_uneven_cut_moves_whole_layers_between_stages():
    """Layout.cut: stage 0 holds the first cut[0] blocks. Under 1F1B on 2 stages stage 0 keeps 2 microbatches in
    flight, so each block moved onto it adds the same bytes, 2 x one block's saved activations, and one block's
    parameters; the step follows the longer stage. A cut that is not one count a stage summing to n_layer is named."""
    cfg = replace(PRESETS_TINY, n_layer=6)
    w = Workload(batch=8, seq=32, microbatches=4)
    dev = preset("h100-80gb", 2, 2)
    cands = {cut: evaluate(cfg, Layout(pp=2, cut=cut), w, dev) for cut in [(1, 5), (2, 4), (3, 3), (4, 2)]}
    first = {cut: rank_memory(cfg, Layout(pp=2, cut=cut), w, 0) for cut in cands}
    assert [rank_parameters(cfg, Layout(pp=2, cut=cut), 0).layers for cut in cands] == [(0,), (0, 1), (0, 1, 2),
                                                                                          (0, 1, 2, 3)]  # fmt: skip
    assert rank_parameters(cfg, Layout(pp=2, cut=(2, 4)), 1).layers == (2, 3, 4, 5)
    steps = [first[c].activation_bytes for c in cands]
    params = [first[c].param_bytes for c in cands]
    assert len({b - a for a, b in pairwise(steps)}) == 1 and steps[1] - steps[0] == steps[0]  # (blocks only: the
    assert len({b - a for a, b in pairwise(params)}) == 1  # embedding's output is not kept)
    even = rank_memory(cfg, Layout(pp=2), w, 0)
    assert even == first[(3, 3)]  # the cut that is the even split is the even split
    assert first[(1, 5)].in_flight == 2
    # the slowest stage sets the step: 3 + 3 is the fastest of these cuts
    assert min(cands, key=lambda c: cands[c].step.total) == (3, 3)
    bad = evaluate(cfg, Layout(pp=3, cut=(2, 4)), w, preset("h100-80gb", 3, 3)).reasons
    assert "n_layer cut [2, 4]: one count a stage, 3 of them, summing to 6" in bad


def test_a_forward_step_is_priced_at_the_models_own_layer():
    """Forward and generate take their rate from one layer's forward: that layer's FLOPs must be the model's own
    (SwiGLU's three projections at its width, grouped key/value heads), not GPT-2's 24 h^2. Both sides price the
    same matmul shapes on the same clock; they differ only in the head (priced at its own shape in training, at the
    layer's rate here) and attention (its causal half priced, its full count in the FLOPs), a few percent for an 8B
    at 2,048 positions. So the forward step's compute tracks the training forward pass whatever the MLP width;
    GPT-2's count would make it 0.50x at a 4,096 width and 2.1x at 32,768."""
    h100, base = preset("h100-80gb", 1), MODELS["llama-3.1-8b"]
    for cfg in (replace(base, ffn_hidden=f) for f in (4096, 14336, 32768)):
        for kv in (2, 8, 32):
            model = replace(cfg, n_kv_head=kv)
            forward = predict_step(model, Layout(), Workload(workload="forward", batch=4, seq=2048, dtype="bfloat16"), h100)
            train = rank_passes(model, Layout(), Workload(batch=4, seq=2048, dtype="bfloat16"), h100, 0, None, 1.0)
            assert forward.compute_s == pytest.approx(train.forward, rel=0.1)


def test_a_layout_refused_for_its_microbatch_names_gradient_accumulation_where_that_fits():
    """Llama-3 8B on 16 H100 at batch 64 x 4096: without a pipeline each replica's 16 sequences ran as one
    microbatch, and "needs 280 GiB" did not say that microbatches of one sequence need a fifth of it."""
    cfg = with_dims(MODELS["llama-3.1-8b"], block_size=8192)
    work = Workload(batch=64, seq=4096)
    h100 = preset("h100-80gb", 16, 8)
    (reason,) = evaluate(cfg, Layout(tp=4, dp=4), work, h100).reasons
    one = evaluate(cfg, Layout(tp=4, dp=4), replace(work, microbatch_size=1), h100)
    assert one.feasible and one.microbatches == 16
    assert reason.endswith(f"; microbatches of 16 sequences: of 1 (microbatch_size 1, gradients accumulated) it needs "
                           f"{one.memory.total / 2**30:.1f} GiB")  # fmt: skip
    # a layout that one sequence a microbatch does not save says nothing of it
    (reason,) = evaluate(cfg, Layout(dp=16), Workload(batch=16, seq=4096), h100).reasons
    assert "microbatch" not in reason


def test_each_decode_step_reads_the_weights_and_cache_from_device_memory():
    """Llama 3.1 8B in bfloat16 on one H100, one prompt of 128 generating 1,024 tokens: each of the 1,023 decode steps
    reads the 8.03e9 weights' 16.06 GB, which at the data sheet's 3,350 GB/s takes at least 4.79 ms, 4.90 s in all;
    at the 0.8 share of that bandwidth elementwise kernels reach (MEMORY_SHARE) 6.13 s. The key/value cache adds
    32 layers x 2 x 1,024 wide x 2 bytes = 128 KiB a position, at most 1,151 positions a step: 0.15 GB, 1% of the
    weights. Timed at the prompt's FLOP rate instead, the 1,023 tokens' 2 x 8e9 FLOPs each took 0.07 s."""
    h100, cfg = preset("h100-80gb", 1), MODELS["llama-3.1-8b"]
    work = Workload(workload="generate", batch=1, seq=128, new_tokens=1024, dtype="bfloat16")
    step = predict_step(cfg, Layout(), work, h100)
    assert 1023 * 16.06e9 / 3350e9 < step.compute_s  # the data sheet's bandwidth, whole: a floor
    assert step.compute_s == pytest.approx(1023 * 16.06e9 / (3350e9 * 0.8), rel=0.03)
    # the prompt alone, a forward of 128 positions, stays FLOP-bound: a decode of one token adds no memory floor
    assert predict_step(cfg, Layout(), replace(work, new_tokens=1), h100).compute_s < 0.05


def test_a_global_batch_past_any_published_run_is_refused_by_name():
    """A billion sequences filled the memory before a word was printed: the plan simulates every microbatch."""
    cfg = MODELS["llama-3.1-8b"]
    (problem,) = [p for p in input_problems(cfg, Workload(batch=10**9, seq=4096)) if p.field == "batch"]
    assert problem.message.startswith("at most 65,536 sequences (got 1,000,000,000)")
    assert not [p for p in input_problems(cfg, Workload(batch=65536, seq=4096)) if p.field == "batch"]
