"""The GPT-2 model: shapes, name-seeded init that shards can rebuild, KV cache, and Hugging Face loading."""

from __future__ import annotations

import pytest
import torch

from runner.gpt.config import PRESETS, GPTConfig, count_parameters
from runner.gpt.model import GPT, cut_stage, init_parameter, materialize
from runner.job.checkpoint import load_gpt2_state_dict, read_checkpoint

TINY = PRESETS["tiny"]


def test_logits_and_loss_shapes():
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 17))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 17, TINY.vocab_size)
    assert loss.shape == () and torch.isfinite(loss)
    assert model(idx).shape == (3, 17, TINY.vocab_size)


@pytest.mark.parametrize("preset", ["tiny", "small", "gpt2"])
def test_parameter_count_formula_matches_modules(preset):
    cfg = PRESETS[preset]
    assert sum(p.numel() for p in GPT(cfg).parameters()) == count_parameters(cfg)


@pytest.mark.parametrize(
    ("preset", "published"),
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_presets_have_the_published_gpt2_sizes(preset, published):
    assert count_parameters(PRESETS[preset]) == published


def test_init_is_deterministic_per_name_and_seed():
    a, b = GPT(TINY, seed=3), GPT(TINY, seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    c = GPT(TINY, seed=4)
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    # Different names draw different values even with equal shapes.
    assert not torch.equal(a.transformer.h["0"].attn.c_attn.weight, a.transformer.h["1"].attn.c_attn.weight)


def test_a_shard_equals_the_same_slice_of_the_reference():
    ref = GPT(TINY, seed=7)
    name = "transformer.h.2.mlp.c_fc.weight"
    full = init_parameter(name, (TINY.d_ff, TINY.n_embd), TINY, seed=7)
    assert torch.equal(full[64:128], dict(ref.named_parameters())[name][64:128])


def test_gpt2_init_statistics():
    model = GPT(PRESETS["small"], seed=0)
    # Sample standard deviations of N normal draws are within ~1/sqrt(2N) of sigma (wte: N = 2.1M, 5e-4;
    # c_proj: N = 262k, 1.4e-3): 2% and 5% are tens of those, whatever kernel draws them, and a wrong scale
    # (GPT-2's 1/sqrt(2 L) left out: 4x) is far outside.
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    proj = model.transformer.h["0"].mlp.c_proj.weight.std().item()
    assert proj == pytest.approx(0.02 / (2 * PRESETS["small"].n_layer) ** 0.5, rel=0.05)
    assert torch.all(model.transformer.h["0"].attn.c_attn.bias == 0)
    assert torch.all(model.transformer.ln_f.weight == 1)


def _stage(first: int, last: int, has_embed: bool, has_head: bool) -> GPT:
    with torch.device("meta"):
        model = GPT(TINY)
    return materialize(cut_stage(model, first, last, has_embed, has_head), seed=1)


def test_stages_chained_equal_the_whole_model():
    ref = GPT(TINY, seed=1)
    first = _stage(0, 2, has_embed=True, has_head=False)
    last = _stage(2, 4, has_embed=False, has_head=True)
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(last(first(idx)), ref(idx))
    # The head-only stage rebuilt the tied embedding from its name.
    assert torch.equal(last.lm_head.weight, ref.transformer.wte.weight)


def test_a_cut_stage_keeps_reference_names_and_values():
    """cut_stage removes blocks and the embedding or head; what stays keeps the reference's names and values."""
    ref = dict(GPT(TINY, seed=1).named_parameters(remove_duplicate=False))
    middle = _stage(1, 3, has_embed=False, has_head=False)
    names = [n for n, _ in middle.named_parameters(remove_duplicate=False)]
    assert names == [n for n in ref if n.startswith(("transformer.h.1.", "transformer.h.2."))]
    for name, p in middle.named_parameters():
        assert torch.equal(p, ref[name]), name
    head_only = _stage(3, 4, has_embed=False, has_head=True)
    held = {n for n, _ in head_only.named_parameters(remove_duplicate=False)}
    assert {"lm_head.weight", "transformer.ln_f.weight"} <= held and "transformer.wte.weight" not in held
    # Both ends and the whole model: the tied weight is one parameter under two names.
    whole = _stage(0, 4, has_embed=True, has_head=True)
    assert whole.lm_head.weight is whole.transformer.wte.weight
    # A middle stage takes hidden states and returns hidden states.
    x = torch.randn(2, 5, TINY.n_embd)
    assert middle(x).shape == x.shape


def test_kv_cache_generation_equals_recomputing_the_prefix():
    model = GPT(TINY, seed=2)
    prompt = torch.randint(0, TINY.vocab_size, (2, 5))
    out = model.generate(prompt, 7)
    seq = prompt
    for _ in range(7):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=16, block_size=4))
    with pytest.raises(ValueError, match="exceeds block_size 4"):
        model(torch.zeros(1, 5, dtype=torch.long))


def _hf_gpt2(cfg: GPTConfig):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(hf_cfg).eval()


def test_hugging_face_gpt2_weights_give_the_original_logits(tmp_path):
    """Random weights in the Hugging Face layout (Conv1D, transformer. prefix) through a safetensors file."""
    from safetensors.torch import save_file

    hf = _hf_gpt2(TINY)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    ours = load_gpt2_state_dict(GPT(TINY), read_checkpoint(path))
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    # Two implementations of the same float32 forward (Conv1D's addmm, the eager attention) differ only in
    # summation order: a few sqrt(K) u of logits below 1 (runner/job/verify.py), measured 1.7% of this bound.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    prompt = idx[:, :6]
    hf_tokens = hf.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 5), hf_tokens)


def test_torch_checkpoint_loads_with_weights_only_and_refuses_pickled_code(tmp_path):
    hf = _hf_gpt2(TINY)
    good = tmp_path / "pytorch_model.bin"
    torch.save({k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}, good)
    load_gpt2_state_dict(GPT(TINY), read_checkpoint(good))  # names without the prefix load too

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_checkpoint(bad)


def test_mismatched_checkpoint_is_refused_with_the_tensor_named():
    sd = GPT(TINY).state_dict()
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="h.0.attn.c_attn.weight"):
        load_gpt2_state_dict(GPT(TINY), sd)
