"""How long a collective waits before its bytes matter: NCCL's own latency model of a ring (torch-free).

A ring collective over n ranks moves its data in steps from each rank to the next, 2(n-1) steps for an all-reduce
(reduce-scatter, then all-gather) and n-1 for an all-gather or a reduce-scatter, and each step costs a fixed latency
on top of its bytes. The figures are NCCL's, the constants its tuner uses to choose an algorithm (NVIDIA/nccl,
src/graph/tuning.cc at 5067397c, `ncclTunerConstantsDefaults` and `ncclTopoTuneModel`), for the Ring algorithm and
the Simple protocol, the one NCCL picks for the megabyte messages of training:
- a base latency of 8.4 us a collective (baseLatencies, Ring, Simple);
- a step between GPUs of one node: 3.4 us over NVLink, 5.7 us over PCIe (hwLatencies, NVLINK and PCI, Ring,
  Simple);
- a step that crosses a node boundary: 14 us (hwLatencies, NET, Ring, Simple); a ring over k nodes crosses k - 1
  boundaries a pass (twice that for an all-reduce), every other step staying inside a node.
NCCL adds a few microseconds NCCL measures at run time (the network plugin's overhead, the topology's inter-node
latency); they are left out. CPU ranks (gloo) are not NCCL: their collectives' time is the calibrated bandwidth's
(runner/planner/calibrate.py measures an all-reduce whole, its latency in it).

Latency is what a small message costs: a decode step's all-reduce of one token's activations, the loss's three
all-reduces of one number a token, and every tensor-parallel collective of a micro-batch of one sequence, where the
bandwidth term alone would say the collective is nearly free."""

from __future__ import annotations

from runner.planner.devices import Devices

BASE_S = 8.4e-6  # a ring collective's fixed latency, Simple protocol
NVLINK_STEP_S = 3.4e-6  # one ring step between GPUs of a node over NVLink
PCIE_STEP_S = 5.7e-6  # over PCIe
NET_STEP_S = 14.0e-6  # one ring step across a node boundary
KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def collective_latency_s(devices: Devices, kind: str, n: int, span: int | None = None) -> float:
    """NCCL's latency of one ring `kind` over n ranks whose group spans `span` consecutive ranks (default n): 0 for a
    group of one and on CPU ranks (module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")
    if n <= 1 or devices.is_cpu:
        return 0.0
    passes = 2 if kind == "all_reduce" else 1
    steps = passes * (n - 1)
    nodes = min(n, -(-(span or n) // devices.gpus_per_node))
    crossing = passes * (nodes - 1)
    step = NVLINK_STEP_S if devices.nvlink else PCIE_STEP_S
    return BASE_S + (steps - crossing) * step + crossing * NET_STEP_S


def tp_collectives(style: str, sequence_parallel: bool, layers: int, recomputed: int = 0, first: bool = True,
                   last: bool = True, train: bool = True) -> dict[str, int]:  # fmt: skip
    """The tensor-parallel collectives of one micro-batch's passes on a rank, by kind, as the engine issues them
    (runner/gpt/tp_layers.py; tests/test_tensor_parallel.py counts them on real runs):
    - Megatron: a layer's attention and MLP each all-reduce their output forward and their input's gradient
      backward; the embedding's output (first stage) and the head input's gradient (last) one each;
    - gather: attention all-gathers its heads forward instead of all-reducing its output;
    - sequence parallelism: each of those all-reduces is a reduce-scatter and an all-gather, and the column-parallel
      layers (c_attn, c_fc, the head) gather their input once more in the backward;
    - training's vocabulary-parallel loss (last stage): three all-reduces of one number a token;
    - a recomputed layer runs its forward's collectives again.
    `train` False: the forward's alone, and the full logits all-gathered for the user on the last stage (forward's
    output; generation's next token, prefill and each decode step running Megatron's forward, sequence parallelism
    paused)."""
    forward = dict.fromkeys(KINDS, 0)
    back = dict.fromkeys(KINDS, 0)
    per_layer = dict.fromkeys(KINDS, 0)  # a layer's forward: what recomputing it repeats
    if sequence_parallel:
        per_layer.update(all_gather=2, reduce_scatter=2)  # entering c_attn, c_fc; leaving attention, the MLP
        forward.update(all_gather=last, reduce_scatter=first)  # entering the head; leaving the embedding
        back.update(reduce_scatter=2 * layers + last, all_gather=2 * layers + first + 2 * layers + last)
    elif style == "gather":
        per_layer.update(all_gather=1, all_reduce=1)
        forward["all_reduce"] = first
        back["all_reduce"] = 2 * layers + last
    else:
        per_layer["all_reduce"] = 2
        forward["all_reduce"] = first
        back["all_reduce"] = 2 * layers + last
    for kind, n in per_layer.items():
        forward[kind] += layers * n
    if not train:
        forward["all_gather"] += last
        return forward
    forward["all_reduce"] += 3 * last
    return {k: forward[k] + back[k] + recomputed * per_layer[k] for k in KINDS}


def tp_latency_s(devices: Devices, tp: int, counts: dict[str, int]) -> float:
    """Seconds of NCCL latency in `counts` collectives over a tensor-parallel group of tp consecutive ranks."""
    return sum(n * collective_latency_s(devices, kind, tp) for kind, n in counts.items())
