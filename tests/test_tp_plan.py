"""Tensor parallelism applied by a plan, checked without processes: every parameter is named by the plan,
each rank's slice is the same slice of the name-seeded reference, and the ranks' slices tile it.

The applied model alone is compared with the reference on real gloo ranks (tests/tp_apply_job.py, the last
test here); inside the job's engine, by tests/test_tensor_parallel.py and tests/test_three_d.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from runner.gpt.config import GPTConfig, customized
from runner.gpt.model import GPT, cut_stage, materialize, shard_of
from runner.gpt.tp_layers import padded_vocab
from runner.gpt.tp_plan import apply_tensor_parallel, plan_pattern, tensor_parallel_plan

# vocab 30 is not a multiple of 4: the last rank holds padding rows.
CFG = GPTConfig(n_layer=2, n_head=4, n_embd=16, vocab_size=30, block_size=8)
SHARDED = ("attn.c_attn.weight", "attn.c_attn.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "wte.weight",
           "lm_head.weight")  # fmt: skip


def is_sharded(name: str, style: str) -> bool:
    """ "gather" keeps attention's output projection whole; "megatron" splits its input columns."""
    return name.endswith(SHARDED) or (style == "megatron" and name.endswith("attn.c_proj.weight"))


def applied(tp: int, rank: int, style: str = "megatron", sequence_parallel: bool = False) -> tuple[GPT, object]:
    with torch.device("meta"):
        model = GPT(CFG)
    comm = SimpleNamespace(size=tp, index=rank)  # only its coordinates are read while applying
    state = apply_tensor_parallel(model, comm, style, sequence_parallel)
    return materialize(model, seed=3), state


@pytest.mark.parametrize("style", ["megatron", "gather"])
def test_the_plan_names_every_parameter_of_the_gpt(style):
    plan = tensor_parallel_plan(style)
    with torch.device("meta"):
        model = GPT(CFG)
    for name, _ in model.named_parameters(remove_duplicate=False):
        assert plan_pattern(plan, name.rpartition(".")[0]) is not None, name


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("style", ["megatron", "gather"])
def test_each_rank_holds_a_slice_of_the_reference_and_the_slices_tile_it(tp, style):
    ref = dict(GPT(CFG, seed=3).named_parameters(remove_duplicate=False))
    covered = {name: torch.zeros(p.shape, dtype=torch.long) for name, p in ref.items()}
    for rank in range(tp):
        model, _ = applied(tp, rank, style)
        params = dict(model.named_parameters(remove_duplicate=False))
        assert params.keys() == ref.keys()  # reference names, the tied head included
        assert params["lm_head.weight"] is params["transformer.wte.weight"]
        for name, p in params.items():
            shard = shard_of(p)
            assert shard.reference_shape == tuple(ref[name].shape), name
            assert (shard.index is not None) == is_sharded(name, style), name
            mine = ref[name] if shard.index is None else ref[name][shard.index]
            assert torch.equal(p[tuple(slice(0, n) for n in mine.shape)], mine), name
            if shard.index is not None:
                covered[name][shard.index] += 1
                assert p.numel() * tp <= ref[name].numel() + tp * CFG.n_embd  # a 1/tp slice (+ padding)
            else:
                covered[name] += 1
    for name, count in covered.items():
        assert torch.all(count == (1 if is_sharded(name, style) else tp)), name
    # The vocabulary is padded up to a multiple of tp with zero rows.
    last, _ = applied(tp, tp - 1, style)
    per = padded_vocab(CFG.vocab_size, tp) // tp
    assert last.transformer.wte.weight.shape == (per, CFG.n_embd)
    assert torch.all(last.transformer.wte.weight[CFG.vocab_size - (tp - 1) * per :] == 0)


def test_sequence_parallel_marks_exactly_the_replicated_parameters_used_on_part_of_the_sequence():
    model, state = applied(2, 0, sequence_parallel=True)
    marked = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
    h = "transformer.h.{}."
    expected = {h.format(i) + leaf for i in range(CFG.n_layer) for leaf in
                ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.bias", "mlp.c_proj.bias")}  # fmt: skip
    assert marked == expected | {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert state.sequence_sharded
    with state.whole_sequences():  # decoding: one position a pass, nothing to split
        assert not state.sequence_sharded
    assert state.sequence_sharded
    with pytest.raises(ValueError, match="megatron"):
        applied(2, 0, style="gather", sequence_parallel=True)


def test_a_tensor_parallel_stage_keeps_reference_names_and_its_shards():
    with torch.device("meta"):
        model = GPT(CFG)
    apply_tensor_parallel(model, SimpleNamespace(size=2, index=1))
    materialize(cut_stage(model, 1, 2, has_embed=False, has_head=True), seed=3)
    ref = dict(GPT(CFG, seed=3).named_parameters(remove_duplicate=False))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert names == [n for n in ref if n.startswith("transformer.h.1.") or n in
                     ("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight")]  # fmt: skip
    head = model.lm_head.weight  # its own copy of the tied weight: rank 1's rows of wte
    assert torch.equal(head[: CFG.vocab_size - 15], ref["transformer.wte.weight"][15:])
    c_attn = model.transformer.h["1"].attn.c_attn.weight
    assert torch.equal(c_attn, ref["transformer.h.1.attn.c_attn.weight"][shard_of(c_attn).index])


LLAMA_OPTIONS = {"family": "llama", "n_kv_head": 2, "ffn_hidden": 48, "rope_theta": 5e5, "tie_head": False}


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    # Llama: key/value heads split (tp 2, one each) and copied (tp 4, each on two ranks) under sequence parallelism
    # (copied without it: tests/test_tensor_parallel.py). GPT-2's Megatron, gather and sequence-parallel plans are
    # held to the reference through the engine there, gradients included.
    [LLAMA_OPTIONS, {**LLAMA_OPTIONS, "tp": 4, "sequence_parallel": True}],
)  # fmt: skip
def test_a_tensor_parallel_gpt_equals_the_reference_forward_and_backward_on_gloo(tmp_path, options):
    """The plan applied to a GPT over a real tp=2 (or 4) gloo group, no engine in between: full logits, loss and
    every gradient slice equal the single-device reference's within float32 reordering (1e-6)."""
    from tests.jobs import run_torchrun

    spec = {"strategy": "tensor", "tp": 2, "model": "custom", "n_layer": 2, "n_head": 4, "n_embd": 32,
            "vocab_size": 61, "block_size": 16, "batch": 2, "seq": 8, **options}  # fmt: skip
    diffs = run_torchrun(spec, tmp_path, module="tests.tp_apply_job", timeout=120)
    assert diffs["logits"] <= 1e-6 and diffs["loss"] <= 1e-6 and diffs["grads"] <= 1e-6, diffs


# Llama: 4 query heads over 2 key/value heads, SwiGLU, untied head, no biases (vocab 30 again not a multiple of 4).
LLAMA = customized(CFG, family="llama", n_kv_head=2, ffn_hidden=24, tie_head=False)


@pytest.mark.parametrize("tp", [2, 4])
def test_llama_slices_hold_whole_heads_split_or_copied_and_tile_the_reference(tp):
    """tp 2 splits the 2 key/value heads (one a rank), tp 4 copies each to the 2 ranks whose query heads use it
    and marks those rows for the kv group's gradient sum; gate and up are split alike; the head is its own."""
    ref = dict(GPT(LLAMA, seed=3).named_parameters())
    h, head_dim, f = LLAMA.n_embd, LLAMA.head_dim, LLAMA.d_ff
    copied = tp > LLAMA.kv_heads
    rows_held = {name: torch.zeros(p.shape[0], dtype=torch.long) for name, p in ref.items()}  # ranks holding a row
    plan = tensor_parallel_plan("megatron", learned_positions=False)
    for rank in range(tp):
        with torch.device("meta"):
            model = GPT(LLAMA)
        state = apply_tensor_parallel(model, SimpleNamespace(size=tp, index=rank))
        materialize(model, seed=3)
        params = dict(model.named_parameters())
        assert params.keys() == ref.keys() and params["lm_head.weight"] is not params["transformer.wte.weight"]
        assert all(plan_pattern(plan, n.rpartition(".")[0]) for n in params)
        for name, p in params.items():
            index = shard_of(p).index
            mine = ref[name] if index is None else ref[name][index]
            assert torch.equal(p[: mine.shape[0]], mine), name
            rows = slice(None) if index is None else index[0] if isinstance(index, tuple) else index
            rows_held[name][rows] += 1
        # SwiGLU: the same slice of the gate's rows and of the up projection's
        per = f // tp
        mine = torch.arange(rank * per, (rank + 1) * per)
        assert torch.equal(shard_of(model.transformer.h["0"].mlp.c_fc.weight).index, torch.cat([mine, f + mine]))
        # Attention: h/tp query rows, then one key/value head's K and V (its own, or the one its queries share)
        attn = model.transformer.h["0"].attn.c_attn
        assert attn.parts == (h // tp, head_dim, head_dim)
        kv = rank * LLAMA.kv_heads // tp
        k_rows = ref["transformer.h.0.attn.c_attn.weight"][h + kv * head_dim : h + (kv + 1) * head_dim]
        assert torch.equal(attn.weight[h // tp : h // tp + head_dim], k_rows)
        assert getattr(attn.weight, "kv_replicated_from", None) == (h // tp if copied else None)
        assert state.figures()["tp_kv_heads"] == ("replicated" if copied else "split")
    for name, held in rows_held.items():
        if name.endswith("c_attn.weight"):  # query rows once; key/value rows once, or on each of their 2 ranks
            expected = torch.tensor([1] * h + [2 if copied else 1] * (2 * LLAMA.kv_width))
        elif name.endswith(("c_fc.weight", "wte.weight", "lm_head.weight")):  # column and vocabulary splits
            expected = torch.ones_like(held)
        else:  # norms whole; row-parallel c_proj splits its columns, so every rank holds every row
            expected = torch.full_like(held, tp)
        assert torch.equal(held, expected), name
