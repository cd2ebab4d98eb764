"""The Llama family of the one GPT: published sizes, Hugging Face's LlamaForCausalLM (and Qwen2) equal to ours
through a sharded save_pretrained folder, GQA's KV cache, and untied heads through name-seeded stages."""

from __future__ import annotations

import pytest
import torch

from runner.gpt.config import PRESETS, count_parameters
from runner.gpt.model import GPT, KVCache, cut_stage, materialize
from runner.job.checkpoint import HFFolder, config_from_hf_folder, load_hf_folder

TINY = PRESETS["llama-tiny"]
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("preset", "published"),
    # The exact parameter counts of the released checkpoints (sum of numel over their safetensors).
    [("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824), ("llama-3.1-8b", 8_030_261_248),
     ("llama-3.1-70b", 70_553_706_496)],
)  # fmt: skip
def test_presets_have_the_published_llama_sizes(preset, published):
    assert count_parameters(PRESETS[preset]) == published


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_formula_matches_the_llama_modules(tie):
    from dataclasses import replace

    cfg = replace(TINY, tie_head=tie)
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    assert model.transformer.wpe is None and (model.lm_head.weight is model.transformer.wte.weight) == tie
    assert all(
        p.dim() > 1 or n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) for n, p in model.named_parameters()
    )


def _hf_folder(tmp_path, kind: str = "llama", **overrides):
    """A random-weight Hugging Face model saved in small shards: GQA (2 of 4 heads), untied, rope_theta 5e5."""
    dims = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, tie_word_embeddings=False,
                initializer_range=0.1, attn_implementation="sdpa")  # fmt: skip
    dims.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**dims)).eval()
    if kind == "qwen2":  # its q/k/v biases start at zero: give them values, or they would prove nothing
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()  # really sharded
    return hf


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("llama", {}),
        # Llama 3.1's long-context rotary rescaling, with head_dim 16 so some frequencies fall in each band.
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        ("qwen2", {"tie_word_embeddings": True}),  # Q/K/V biases, tied head
    ],
)  # fmt: skip
def test_equal_to_hugging_face(tmp_path, kind, overrides):
    """Same logits within 1e-5 of the largest and the same greedy tokens as transformers' model.

    Why 1e-5: both compute the same float32 expression, in a different order (our Q/K/V and gate/up are
    one matmul each, GQA inside SDPA rather than repeated heads, RMSNorm fused). Each reordered sum of K
    terms moves by at most about K u |terms| (u = 2^-24 = 6e-8), in practice sqrt(K) u: with K <= 176
    and 4 layers that is ~1e-6 of the logits' scale; 1e-5 leaves a factor 10. A wrong rotary layout,
    head grouping or norm moves logits by whole percent."""
    hf = _hf_folder(tmp_path, kind, **overrides)
    cfg = config_from_hf_folder(tmp_path)
    assert (cfg.family, cfg.n_kv_head, cfg.tie_head) == ("llama", 2, kind == "qwen2")
    ours = load_hf_folder(GPT(cfg), HFFolder(tmp_path))
    idx = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = hf(idx).logits, ours(idx)
    rel = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    assert rel < 1e-5, rel
    prompt = idx[:, :7]
    tokens = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 12), tokens)


def test_kv_cache_holds_the_key_value_heads_and_generation_equals_recomputing():
    model = GPT(TINY, seed=2)
    prompt = torch.randint(0, TINY.vocab_size, (2, 5))
    out = model.generate(prompt, 7)
    seq = prompt
    for _ in range(7):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    cache = KVCache.empty(TINY.n_layer)
    with torch.no_grad():
        model(prompt, cache=cache)
    assert cache.layers[0].k.shape == (2, TINY.n_kv_head, 5, TINY.head_dim)


def test_untied_head_stage_rebuilds_its_own_weight_by_name():
    ref = GPT(TINY, seed=1)
    with torch.device("meta"):
        first, last = GPT(TINY), GPT(TINY)
    first = materialize(cut_stage(first, 0, 2, has_embed=True, has_head=False), seed=1)
    last = materialize(cut_stage(last, 2, 4, has_embed=False, has_head=True), seed=1)
    assert torch.equal(last.lm_head.weight, ref.lm_head.weight)
    assert not torch.equal(last.lm_head.weight, ref.transformer.wte.weight)
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(last(first(idx)), ref(idx))


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_shapes_are_the_models(preset, tie):
    """The torch-free list of names and shapes (what a folder is validated against) is what GPT builds."""
    from dataclasses import replace

    from runner.gpt.config import parameter_shapes

    cfg = replace(PRESETS[preset], tie_head=tie)
    with torch.device("meta"):
        built = {n: tuple(p.shape) for n, p in GPT(cfg).named_parameters()}
    assert parameter_shapes(cfg) == built


def test_a_folder_is_read_slice_by_slice_in_every_kind_of_index(tmp_path):
    """HFFolder.read(name, index) is reference[index] for the indices strategies record -- slices (vocabulary rows,
    row-parallel columns), rows of fused blocks (Q/K/V, gate/up), ZeRO's flat pieces -- and reads no more than
    the rows (and, for slices, columns) asked for."""
    from runner.gpt.model import Shard
    from runner.gpt.tp_plan import qkv_rows
    from runner.gpt.zero_units import flat_piece_index

    _hf_folder(tmp_path)
    folder = HFFolder(tmp_path)
    ref = load_hf_folder(GPT(folder.config), HFFolder(tmp_path))
    params = dict(ref.named_parameters())
    attn = "transformer.h.1.attn.c_attn.weight"
    cases = [
        ("transformer.wte.weight", (slice(256, 512),), 256 * 64),
        ("transformer.h.0.mlp.c_proj.weight", (slice(None), slice(88, 176)), 64 * 88),
        (attn, qkv_rows(64, 32, 2, rank=3, tp=4), (16 + 16 + 16) * 64),  # a copied key/value head
        ("transformer.h.2.mlp.c_fc.weight", torch.cat([torch.arange(44, 88), torch.arange(176 + 44, 176 + 88)]), 88 * 64),
        (attn, flat_piece_index(Shard((128, 64)), 100, 3000), (3000 // 64 - 100 // 64 + 1) * 64),
        ("transformer.ln_f.weight", None, 64),
    ]  # fmt: skip
    for name, index, elements in cases:
        before = folder.bytes_read
        got = folder.read(name, index)
        want = params[name].detach() if index is None else params[name].detach()[index]
        assert torch.equal(got, want), name
        assert folder.bytes_read - before == 4 * elements, name


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    # tensor parallelism's row and column slices; ZeRO-3's flat pieces of every unit
    [{"strategy": "tensor", "tp": 2}, {"strategy": "data", "dp": 2, "zero_stage": 3}],
)  # fmt: skip
def test_a_run_loads_a_sharded_hugging_face_folder_each_rank_reading_its_slices(tmp_path, layout):
    """`--weights DIR`: the model is the folder's config.json, each rank reads only what it holds, and the run
    verifies against the reference loaded whole from the same folder (training and generation)."""
    from tests.jobs import run_torchrun

    folder = tmp_path / "hf"
    _hf_folder(folder)
    spec = {"model": "checkpoint", "weights": str(folder), "batch": 4, "seq": 16, "steps": 1, "warmup": 0,
            "verify": True, **layout}  # fmt: skip
    result = run_torchrun(spec, tmp_path / "run")
    assert result["verify"]["passed"], result["verify"]
    read = [r["weights_bytes_read"] for r in result["ranks"]]
    total = 4 * count_parameters(config_from_hf_folder(folder))
    if layout["strategy"] == "tensor":  # the split parts tile the model; the norms (2 per layer + final) twice
        assert sum(read) == total + 4 * (2 * 4 + 1) * 64 and max(read) < 0.55 * total
    else:  # ZeRO-3's shards: each rank a part (whole rows around its pieces), never the whole model
        assert max(read) < 0.75 * total


@pytest.mark.slow
def test_a_prompt_is_read_and_the_continuation_written_with_the_folders_tokenizer(tmp_path, lab_home):
    """`--prompt "text"` with a Llama folder holding tokenizer.json: the prompt becomes the tokenizer's ids (seq must
    be their count), generation on two tensor-parallel ranks equals the reference's greedy tokens, and result.json
    keeps the prompt and the continuation as the tokenizer reads them back."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.jobs import run_torchrun

    line = "def main(): return the value of each item in a list for a range of numbers\n"
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([line] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    folder, text = tmp_path / "hf", tmp_path / "corpus"
    _hf_folder(folder, vocab_size=tok.get_vocab_size())  # every id the model can emit reads back as text
    tok.save(str(folder / "tokenizer.json"))
    text.mkdir()
    (text / "a.txt").write_text(line * 30)
    prompt = "def main(): return"
    ids = tok.encode(prompt).ids
    spec = {"model": "checkpoint", "weights": str(folder), "data": str(text), "workload": "generate", "prompt": prompt,
            "seq": len(ids), "batch": 2, "new_tokens": 5, "steps": 1, "warmup": 0, "verify": True,
            "strategy": "tensor", "tp": 2}  # fmt: skip
    result = run_torchrun(spec, tmp_path / "run")
    assert result["verify"]["passed"] and result["verify"]["tokens_equal"], result["verify"]
    assert result["prompt"] == tok.decode(ids) and len(result["generated_ids"]) == 5
    assert result["generated_text"] == tok.decode(result["generated_ids"]) and result["generated_text"]


def test_config_json_of_each_family_and_what_is_refused():
    from runner.job.checkpoint import config_from_hf

    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": 100, "max_position_embeddings": 32768}  # fmt: skip
    # Mistral 7B v0.1: attention slides over 4096 positions; up to the window that is full causal attention
    mistral = config_from_hf({**base, "model_type": "mistral", "sliding_window": 4096, "rope_theta": 1e6})
    assert (mistral.block_size, mistral.rope_theta, mistral.qkv_bias) == (4096, 1e6, False)
    # Qwen2: Q/K/V biases; its sliding window is off unless use_sliding_window says otherwise
    qwen = config_from_hf({**base, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert (qwen.block_size, qwen.qkv_bias, qwen.bias) == (32768, True, False)
    # Llama 3.1's rotary rescaling, in the older rope_scaling spelling
    scaled = config_from_hf({**base, "model_type": "llama", "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})  # fmt: skip
    assert scaled.rope_scaling is not None and scaled.rope_scaling.factor == 8.0
    refused = [
        ({"model_type": "gemma"}, "model_type 'gemma'"),
        ({"model_type": "llama", "head_dim": 32}, "head_dim 32"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "only SwiGLU"),
    ]
    for changes, fragment in refused:
        with pytest.raises(ValueError, match=fragment):
            config_from_hf({**base, **changes})
