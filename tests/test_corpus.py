"""Corpora and their batches (runner/job/corpus.py, runner/job/data.py): what a `data` value names, the token
cache built once, windows rebuilt from (seed, step), the held-out windows, text in and out, and the spec's
refusals naming the field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from runner.job import corpus
from runner.job.data import EVAL_BATCHES, Batches, synthetic_batch
from runner.spec.run_spec import RunSpec
from runner.spec.validation import validate_spec

TEXT = "def add(a, b):\n    return a + b\n\n" * 40  # 1,320 bytes, ASCII: one byte a token


@pytest.fixture
def text_dir(tmp_path, lab_home):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(TEXT)
    (folder / "sub" / "a.txt").write_text("héllo wörld\n" * 50)
    (folder / ".hidden").write_text("never read")
    return folder


def problems(**fields) -> dict[str, str]:
    return {p.field: p.message for p in validate_spec(RunSpec(**fields))}


def test_a_text_folder_is_its_files_bytes_in_path_order_cached_once_with_the_last_tenth_held_out(text_dir):
    source = corpus.resolve(str(text_dir))
    assert source.kind == "text" and source.byte_level and [f.name for f in source.files] == ["b.txt", "a.txt"]
    raw = (text_dir / "b.txt").read_bytes() + (text_dir / "sub" / "a.txt").read_bytes()
    train, val = corpus.open_splits(source)
    assert bytes(np.concatenate([train, val])) == raw
    assert (len(train), len(val)) == corpus.split_sizes(source) == (len(raw) - len(raw) // 10, len(raw) // 10)
    key = corpus.cache_key(source)
    cache = corpus.cache_root() / key / "tokens.bin"
    built = cache.stat().st_mtime_ns
    corpus.open_splits(corpus.resolve(str(text_dir)))
    assert cache.stat().st_mtime_ns == built  # read, not rebuilt
    (text_dir / "b.txt").write_text(TEXT + "# changed\n")
    assert corpus.cache_key(corpus.resolve(str(text_dir))) != key  # an edited file: a new cache


def test_stdlib_is_this_pythons_sources_byte_level_and_sizes_the_model_vocabulary_256():
    source = corpus.resolve("stdlib")
    assert source.files and all(f.suffix == ".py" for f in source.files) and source.byte_level
    assert not any("site-packages" in f.parts for f in source.files)
    assert RunSpec(data="stdlib").model_config().vocab_size == 256
    assert RunSpec(data="synthetic").model_config().vocab_size == 512  # the tiny preset's, as before
    assert RunSpec(data="stdlib", model="custom", n_layer=2, n_head=2, n_embd=32, vocab_size=300,
                   block_size=64).model_config().vocab_size == 300  # fmt: skip


def test_batches_are_windows_of_the_training_split_the_same_for_the_same_seed_and_step(text_dir):
    batches = Batches(str(text_dir), None, 256, batch=4, seq=16, seed=3)
    idx, targets = batches.train(5)
    again, _ = Batches(str(text_dir), None, 256, batch=4, seq=16, seed=3).train(5)
    assert torch.equal(idx, again) and not torch.equal(idx, batches.train(6)[0])
    assert idx.shape == targets.shape == (4, 16) and torch.equal(idx[:, 1:], targets[:, :-1])
    train = bytes(batches.train_ids)
    for row, nxt in zip(idx, targets, strict=True):
        window = bytes(row.tolist()) + bytes([int(nxt[-1])])
        assert window in train  # every window lies inside the training split


def test_held_out_batches_are_fixed_windows_spread_over_the_held_out_split(text_dir):
    a = Batches(str(text_dir), None, 256, batch=2, seq=8, seed=0).held_out()
    b = Batches(str(text_dir), None, 256, batch=2, seq=8, seed=99).held_out()
    assert len(a) == EVAL_BATCHES and all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    val = bytes(Batches(str(text_dir), None, 256, batch=2, seq=8, seed=0).val_ids)
    first, last = bytes(a[0][0][0].tolist()), bytes(a[-1][0][-1].tolist())
    assert val.startswith(first) and val[-9:-1] == last  # the first and the last window of the split


def test_synthetic_batches_are_the_same_as_synthetic_batch():
    idx, targets = Batches("synthetic", None, 512, batch=3, seq=5, seed=7).train(2)
    want = synthetic_batch(512, 3, 5, 7, 2)
    assert torch.equal(idx, want[0]) and torch.equal(targets, want[1])
    assert Batches("synthetic", None, 512, batch=3, seq=5, seed=7).held_out() == []


def test_a_nanogpt_folder_is_read_as_it_is_and_its_largest_id_judged_against_the_vocabulary(tmp_path, lab_home):
    ids = (np.arange(3000) * 7 % 500).astype("<u2")
    ids.tofile(tmp_path / "train.bin")
    ids[:600].tofile(tmp_path / "val.bin")
    source = corpus.resolve(str(tmp_path))
    assert source.kind == "tokens" and not source.decodable and corpus.split_sizes(source) == (3000, 600)
    assert corpus.resolve(str(tmp_path / "train.bin")).files == source.files
    train, val = corpus.open_splits(source)
    assert np.array_equal(train, ids) and np.array_equal(val, ids[:600])
    assert problems(data=str(tmp_path), eval_every=2) == {}  # ids up to 499 in the tiny model's 512
    msg = problems(data=str(tmp_path), model="custom", n_layer=2, n_head=2, n_embd=32, vocab_size=400, block_size=64)
    assert "token ids up to 499" in msg["data"] and "set vocab_size to at least 500" in msg["data"]
    (tmp_path / "val.bin").unlink()
    assert "held-out split" in problems(data=str(tmp_path), eval_every=2)["eval_every"]
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"\x01\x02\x03")
    assert "odd number of bytes" in problems(data=str(tmp_path / "odd"))["data"]


def test_refusals_name_the_field_before_anything_is_queued(text_dir, tmp_path):
    assert "no file or folder at" in problems(data=str(tmp_path / "nope"))["data"]
    (tmp_path / "empty").mkdir()
    assert "holds no readable files" in problems(data=str(tmp_path / "empty"))["data"]
    size = len(TEXT.encode()) + len("héllo wörld\n".encode()) * 50
    train = size - size // 10
    msg = problems(data=str(text_dir), batch=64, seq=64)["data"]
    assert f"holds {train:,} tokens, fewer than one batch of batch 64 x (seq 64 + 1) = 4,160" in msg
    assert problems(data=str(text_dir), batch=2, seq=16) == {}
    assert "synthetic tokens have no held-out split" in problems(eval_every=5)["eval_every"]
    assert "workload 'forward' does not train" in problems(data="stdlib", eval_every=5, workload="forward")["eval_every"]
    assert "synthetic tokens are no text" in problems(workload="generate", prompt="hi", seq=2)["prompt"]
    assert "set seq to 5" in problems(data=str(text_dir), workload="generate", prompt="hello", seq=8)["prompt"]
    assert problems(data=str(text_dir), workload="generate", prompt="hello", seq=5) == {}
    assert "must be 0" in problems(eval_every=-1)["eval_every"]
    # The prompt's tokens are the sequence, so where their count is wrong the prompt is what to change: too long
    # for the context (tiny: 128 positions, 16 new tokens leave 112), or not splitting over tp under SP.
    long = problems(data=str(text_dir), workload="generate", prompt="x" * 200, seq=200, new_tokens=16)
    assert set(long) == {"prompt"} and "shorten the prompt to at most 112 tokens" in long["prompt"]
    odd = problems(data=str(text_dir), workload="generate", prompt="abc", seq=3, strategy="tensor", tp=2,
                   sequence_parallel=True)  # fmt: skip
    assert set(odd) == {"prompt"} and "make the prompt a multiple of 2 tokens long" in odd["prompt"]


def test_stored_specs_without_the_new_fields_read_as_synthetic_without_eval_or_prompt():
    old = json.loads(RunSpec().to_json())
    for key in ("data", "eval_every", "prompt"):
        old.pop(key)
    spec = RunSpec.from_dict(old)
    assert (spec.data, spec.eval_every, spec.prompt) == ("synthetic", 0, None)


def test_bytes_round_trip_through_encode_and_decode_and_padded_ids_read_as_a_replacement():
    source = corpus.resolve("stdlib")
    ids = corpus.encode(source, "naïve ✓")
    assert ids == list("naïve ✓".encode()) and corpus.decode(source, ids) == "naïve ✓"
    assert corpus.decode(source, [104, 105, 300]) == "hi\ufffd"


def test_a_tokenizer_json_beside_the_weights_tokenizes_the_text(text_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT, "héllo wörld"], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")  # only its folder matters here
    tok.save(str(weights.parent / "tokenizer.json"))
    source = corpus.resolve(str(text_dir), str(weights))
    assert source.tokenizer == weights.parent / "tokenizer.json" and not source.byte_level and source.decodable
    train, val = corpus.open_splits(source)
    want = tok.encode(TEXT, add_special_tokens=False).ids + tok.encode("héllo wörld\n" * 50).ids
    assert np.concatenate([train, val]).tolist() == want
    assert corpus.vocab_of(source) == tok.get_vocab_size()
    assert corpus.decode(source, corpus.encode(source, "return a")) == "return a"
    assert not corpus.is_byte_text(str(text_dir), str(weights)) and corpus.is_byte_text(str(text_dir), None)


def test_the_first_byte_level_loss_is_about_ln_256():
    """An untrained tiny model's logits are near zero (init std 0.02, a 64-wide LayerNorm'd input), so its
    softmax is near uniform over the 256 ids: the loss is ln 256 = 5.545 within a few percent."""
    from runner.gpt.model import GPT

    spec = RunSpec(data="stdlib", batch=4, seq=32)
    model = GPT(spec.model_config(), seed=0)
    idx, targets = Batches.of(spec).train(0)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(256)) < 0.05 * math.log(256)


@pytest.mark.slow
def test_a_pipeline_reports_the_global_loss_every_step_the_held_out_loss_and_generates_text(tmp_path, lab_home):
    """Through the real job: rank 0 of a 2-stage pipeline holds no loss itself, yet its step events carry the
    last stage's; the held-out loss comes on eval_every's steps and at the end; a prompted generate run records
    its prompt and continuation as ids and text."""
    from tests.jobs import read_events, run_torchrun

    spec = dict(strategy="layer", pp=2, data="stdlib", batch=4, seq=32, steps=4, warmup=1, eval_every=2, lr=3e-3)
    run_torchrun(spec, tmp_path / "train")
    steps = [e for e in read_events(tmp_path / "train") if e["kind"] == "step"]
    assert [e["step"] for e in steps] == [0, 1, 2, 3, 4]
    assert all(e["loss"] is not None and math.isfinite(e["loss"]) for e in steps)
    assert [e["step"] for e in steps if e["eval_loss"] is not None] == [1, 3, 4]
    assert abs(steps[0]["loss"] - math.log(256)) < 0.05 * math.log(256)
    prompt = "def main():\n    "
    gen = dict(strategy="layer", pp=2, data="stdlib", workload="generate", prompt=prompt, seq=len(prompt),
               batch=2, new_tokens=6, steps=1, warmup=0)  # fmt: skip
    result = run_torchrun(gen, tmp_path / "generate")
    assert result["prompt"] == prompt and len(result["generated_ids"]) == 6
    assert result["generated_text"] == corpus.decode(corpus.resolve("stdlib"), result["generated_ids"])
