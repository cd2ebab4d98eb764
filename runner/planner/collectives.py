"""How long a collective waits before its bytes matter: NCCL's own latency model of a ring (torch-free).

A ring collective over n ranks moves its data in steps from each rank to the next, 2(n-1) steps for an all-reduce
(reduce-scatter, then all-gather) and n-1 for an all-gather or a reduce-scatter, and each step costs a fixed latency
on top of its bytes. The figures are NCCL's, the constants its tuner uses to choose a protocol (NVIDIA/nccl,
src/graph/tuning.cc at 5067397c, `ncclTunerConstantsDefaults` and `ncclTopoTuneModel`), for the Ring algorithm:

| protocol | base | a step over NVLink | over PCIe | across a node boundary | share of the link's bandwidth |
|---|---|---|---|---|---|
| LL | 6.6 us | 0.6 us | 1.0 us | 2.7 us | 0.5 |
| LL128 | 14.0 us | 1.9 us | 2.5 us | 4.0 us | 0.92 |
| Simple | 8.4 us | 3.4 us | 5.7 us | 14.0 us | 1 |

A ring over k nodes crosses k - 1 node boundaries a pass (twice that for an all-reduce), every other step staying
inside a node. NCCL takes, for each call, the protocol whose latency plus bytes at its bandwidth is the least
(`collective_seconds`): Simple for the megabytes of a training micro-batch, LL for a decode step's one token. NCCL
adds a few microseconds it measures at run time (the network plugin's overhead, the topology's inter-node latency)
and caps LL's and LL128's bandwidth per channel; those are left out. CPU ranks (gloo) are not NCCL: their
collectives' time is the calibrated bandwidth's (runner/planner/calibrate.py measures an all-reduce whole, its
latency in it).

Latency is what a small message costs: a decode step's all-reduce of one token's activations, and every
tensor-parallel collective of a micro-batch of one sequence, where the bandwidth term alone would say the collective
is nearly free."""

from __future__ import annotations

from runner.planner.devices import Devices

# protocol: (base, step over NVLink, over PCIe, across nodes) in seconds, and the share of bandwidth it reaches
PROTOCOLS: dict[str, tuple[tuple[float, float, float, float], float]] = {
    "LL": ((6.6e-6, 0.6e-6, 1.0e-6, 2.7e-6), 0.5),
    "LL128": ((14.0e-6, 1.9e-6, 2.5e-6, 4.0e-6), 0.92),
    "Simple": ((8.4e-6, 3.4e-6, 5.7e-6, 14.0e-6), 1.0),
}
KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def collective_latency_s(devices: Devices, kind: str, n: int, protocol: str = "Simple") -> float:
    """NCCL's latency of one ring `kind` over n consecutive ranks in `protocol`: 0 for a group of one and on CPU
    ranks (module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")
    if n <= 1 or devices.is_cpu:
        return 0.0
    (base, nvlink, pcie, net), _ = PROTOCOLS[protocol]
    passes = 2 if kind == "all_reduce" else 1
    steps = passes * (n - 1)
    nodes = min(n, -(-n // devices.gpus_per_node))
    crossing = passes * (nodes - 1)
    step = nvlink if devices.nvlink else pcie
    return base + (steps - crossing) * step + crossing * net


def wire_bytes(kind: str, n: int, nbytes: float) -> float:
    """Bytes a rank sends in a ring `kind` of an nbytes tensor (the whole, gathered or reduced one): 2(n-1)/n of it
    for an all-reduce, (n-1)/n for an all-gather or a reduce-scatter."""
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * nbytes if n > 1 else 0.0


def collective_seconds(devices: Devices, kind: str, n: int, nbytes: float, bw: float) -> float:
    """Seconds of one ring `kind` of an nbytes tensor over n ranks at bw bytes/s a rank: NCCL's fastest protocol."""
    if n <= 1:
        return 0.0
    wire = wire_bytes(kind, n, nbytes)
    return min(collective_latency_s(devices, kind, n, p) + wire / (bw * share) for p, (_, share) in PROTOCOLS.items())


def tp_collectives(style: str, sequence_parallel: bool, layers: int, recomputed: int = 0, first: bool = True,
                   last: bool = True, train: bool = True, positions: bool = False) -> dict[str, int]:  # fmt: skip
    """The tensor-parallel collectives of one micro-batch's passes on a rank, by kind, as the engine issues them
    (runner/gpt/tp_layers.py; tests/test_tensor_parallel.py counts them on real runs):
    - Megatron: a layer's attention and MLP each all-reduce their output forward and their input's gradient
      backward; the embedding's output (first stage) and the head input's gradient (last) one each;
    - gather: attention all-gathers its heads forward instead of all-reducing its output;
    - sequence parallelism: each of those all-reduces is a reduce-scatter and an all-gather, and the column-parallel
      layers (c_attn, c_fc, the head) gather their input once more in the backward;
    - training's vocabulary-parallel loss (last stage): three all-reduces of one number a token;
    - `positions` (a learned position embedding, GPT-2's) under sequence parallelism: its scatter's all-gather in the
      backward (first stage);
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
        back["all_gather"] += first and positions
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


def tp_latency_s(devices: Devices, tp: int, counts: dict[str, int], nbytes: float, bw: float) -> float:
    """Seconds `counts` collectives of an nbytes tensor over a tensor-parallel group of tp consecutive ranks take
    beyond their bytes at the full bandwidth bw (which the caller charges): NCCL's latency, in the protocol it picks."""
    extra = 0.0
    for kind, n in counts.items():
        if n:
            extra += n * (collective_seconds(devices, kind, tp, nbytes, bw) - wire_bytes(kind, tp, nbytes) / bw)
    return extra
