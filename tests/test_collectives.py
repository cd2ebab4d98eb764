"""NCCL's latency model of a ring collective in the planner (runner/planner/collectives.py) against NCCL's tuner
constants (NVIDIA/nccl src/graph/tuning.cc at 5067397c: base 8.4 us, ring steps of 3.4 us over NVLink, 5.7 us over
PCIe, 14 us across nodes, Ring/Simple), and what it changes in a step: small messages are no longer free."""

from __future__ import annotations

import pytest

from runner.gpt.config import GPTConfig
from runner.planner.collectives import collective_latency_s, collective_seconds
from runner.planner.devices import cpu_host, described, preset
from runner.planner.models import Layout, Workload
from runner.planner.step_time import predict_step

US = 1e-6


@pytest.mark.parametrize(
    ("devices", "kind", "n", "expected_us"),
    [
        # one DGX H100: an all-reduce over its 8 GPUs is 2 x 7 NVLink steps
        (preset("h100-80gb", 8), "all_reduce", 8, 8.4 + 14 * 3.4),
        # two nodes: an all-gather over 16 crosses one node boundary, its other 14 steps inside a node
        (preset("h100-80gb", 16), "all_gather", 16, 8.4 + 14 * 3.4 + 14.0),
        # an all-reduce over 16 crosses it twice
        (preset("h100-80gb", 16), "all_reduce", 16, 8.4 + 28 * 3.4 + 2 * 14.0),
        # PCIe parts: 4 L40S, 3 steps of a reduce-scatter
        (preset("l40s", 4), "reduce_scatter", 4, 8.4 + 3 * 5.7),
        # a described machine whose links outrun PCIe 5 (64 GB/s) has NVLink
        (described(4, 80, 500, 300, 25, 4), "all_gather", 4, 8.4 + 3 * 3.4),
        (described(4, 80, 500, 32, 25, 4), "all_gather", 4, 8.4 + 3 * 5.7),
    ],
)
def test_latency_is_nccls_ring_simple_model(devices, kind, n, expected_us):
    assert collective_latency_s(devices, kind, n) == pytest.approx(expected_us * US)


def test_no_latency_for_one_rank_or_cpu_ranks_and_a_named_error_for_an_unknown_collective():
    assert collective_latency_s(preset("h100-80gb", 8), "all_reduce", 1) == 0.0
    cpu = cpu_host(2, 24 * 2**30, 50e9, 5e9)  # gloo: the calibrated all-reduce bandwidth holds its latency
    assert collective_latency_s(cpu, "all_reduce", 2) == 0.0
    with pytest.raises(ValueError, match="unknown collective 'broadcast'"):
        collective_latency_s(preset("h100-80gb", 8), "broadcast", 8)


LLAMA_1B = GPTConfig(n_layer=16, n_head=32, n_embd=2048, vocab_size=32768, block_size=4096, bias=False,
                     family="llama", n_kv_head=32, ffn_hidden=8192, tie_head=True)  # fmt: skip


def test_latency_weighs_most_where_messages_are_small():
    # The same 64 sequences on one node at tp 8, as one micro-batch or as 64 of one: the bytes on the wire are the
    # same, the collectives 64 times as many, so the small micro-batches' communication is the larger.
    devices = preset("h100-80gb", 8)
    layout = Layout(tp=8)
    big = predict_step(LLAMA_1B, layout, Workload(batch=64, seq=4096, dtype="bf16-master", sequence_parallel=True,
                                                  microbatch_size=64), devices)  # fmt: skip
    small = predict_step(LLAMA_1B, layout, Workload(batch=64, seq=4096, dtype="bf16-master", sequence_parallel=True,
                                                    microbatch_size=1), devices)  # fmt: skip
    collectives_a_micro_batch = 16 * 10 + 5 + 3  # 10 a layer; the embedding and head 5, the loss 3 (collectives.py)
    assert small.tp_comm_s > big.tp_comm_s
    assert small.tp_comm_s - big.tp_comm_s >= 63 * collectives_a_micro_batch * 8.4 * US  # at least the base latency


def test_nccls_protocol_is_the_fastest_for_the_size_simple_for_megabytes_ll_for_a_token():
    # 8 H100s over NVLink at 360 GB/s: LL has a twelfth of Simple's latency at half its bandwidth
    devices, bw = preset("h100-80gb", 8), 360e9
    simple, ll = 8.4 + 14 * 3.4, 6.6 + 14 * 0.6
    token = 4096 * 2  # one token's activations of 4096 in bfloat16
    micro_batch = 4096 * token  # a sequence of 4096 of them
    assert collective_seconds(devices, "all_reduce", 8, token, bw) == pytest.approx(ll * US + 1.75 * token / (bw / 2))
    # megabytes are bandwidth-bound: whichever protocol is taken (LL128 at 0.92 of the bandwidth comes out level with
    # Simple at 32 MB), the time is Simple's to a percent
    assert collective_seconds(devices, "all_reduce", 8, micro_batch, bw) == pytest.approx(
        simple * US + 1.75 * micro_batch / bw, rel=0.01)


def test_each_decode_step_pays_the_latency_of_its_collectives():
    # 32 more tokens on tp 8: each decode step's 2 all-reduces a layer, the embedding's and the logits' gather carry
    # one position (kilobytes), so NCCL runs them in LL: the step grows by at least 31 decode steps x 32 all-reduces x
    # LL's 8-rank latency, and by less than Simple's latency would make it.
    devices = preset("h100-80gb", 8)
    one = predict_step(LLAMA_1B, Layout(tp=8), Workload(batch=1, seq=128, workload="generate", new_tokens=1), devices)
    many = predict_step(LLAMA_1B, Layout(tp=8), Workload(batch=1, seq=128, workload="generate", new_tokens=32),
                        devices)  # fmt: skip
    grown = many.tp_comm_s - one.tp_comm_s
    assert 31 * 32 * (6.6 + 14 * 0.6) * US <= grown < 31 * 34 * (8.4 + 14 * 3.4) * US
