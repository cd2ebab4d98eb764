"""The files a spec names, checked before anything is queued: its weights (a GPT-2 checkpoint file, or a Hugging
Face folder whose config.json and tensors must fit the chosen model) and its data (a corpus large enough for one
batch, with ids inside the model's vocabulary). Part of runner/spec/validation.py's `validate_spec`."""

from __future__ import annotations

import re
from pathlib import Path

from runner.gpt.config import parameter_shapes
from runner.job import corpus
from runner.job.checkpoint import (
    checkpoint_shapes,
    config_from_hf_folder,
    hf_folder_shapes,
    llama_sources,
)
from runner.spec.run_spec import FROM_WEIGHTS, RunSpec
from runner.spec.strategies.registry import Add


def _validate_hf_folder(spec: RunSpec, path: Path, add: Add) -> None:
    """A Hugging Face Llama-family folder: config.json we can run, and every tensor we read, of its shape."""
    if spec.model != FROM_WEIGHTS:
        add("model", f"{path.name} is a Hugging Face folder: set model to '{FROM_WEIGHTS}' (its config.json gives "
                     "the dimensions)")  # fmt: skip
        return
    try:
        cfg = config_from_hf_folder(path)
        shapes = hf_folder_shapes(path)
    except (OSError, ValueError) as exc:
        add("weights", f"{path.name} is not a Llama, Qwen2 or Mistral folder we can read ({exc})")
        return
    for name, shape in parameter_shapes(cfg).items():
        for src in llama_sources(name, cfg):
            want = (src.rows, *shape[1:])
            if src.name not in shapes:
                add("weights", f"{path.name} lacks {src.name}, which {name} is read from")
                return
            if tuple(shapes[src.name]) != want:
                add("weights", f"{path.name} has {src.name} of shape {tuple(shapes[src.name])} but its config.json "
                               f"implies {want}")  # fmt: skip
                return


def validate_weights(spec: RunSpec, add: Add) -> None:
    """A weights file's header against the chosen model: GPT-2 names, vocabulary, width, depth, context; a
    Hugging Face folder against its own config.json."""
    path = Path(spec.weights or "").expanduser()
    if path.is_dir():
        _validate_hf_folder(spec, path, add)
        return
    if spec.model_config().is_llama:
        add("weights", "a single file is read as a GPT-2 checkpoint; for a Llama-family model give the Hugging Face "
                       "folder (config.json and model.safetensors or its shards)")  # fmt: skip
        return
    if not path.is_file():
        add("weights", f"no file at {str(path)!r}; give the path of a GPT-2 .safetensors or .pt/.bin file, or of a "
                       "Llama, Qwen2 or Mistral Hugging Face folder")  # fmt: skip
        return
    try:
        shapes = checkpoint_shapes(path)
    except (OSError, ValueError) as exc:
        add(
            "weights",
            f"{path.name} is not a readable GPT-2 checkpoint ({exc}); use a Hugging Face GPT-2 .safetensors or torch state dict",
        )
        return
    wte = shapes.get("wte.weight") or shapes.get("transformer.wte.weight")
    if wte is None or not any(k.endswith("attn.c_attn.weight") for k in shapes):
        # a file of a Llama-family folder: the folder, not the file, is what loads it
        folder = (f"; for the model of its folder give the folder, {str(path.parent)!r}"
                  if (path.parent / "config.json").is_file() else "")  # fmt: skip
        add(
            "weights",
            f"{path.name} has no GPT-2 tensors (wte.weight, h.N.attn.c_attn.weight); use a Hugging Face GPT-2 checkpoint{folder}",
        )
        return
    cfg = spec.model_config()
    if tuple(wte) != (cfg.vocab_size, cfg.n_embd):
        add(
            "weights",
            f"{path.name} has vocab x width {tuple(wte)} but the {spec.model} model has {(cfg.vocab_size, cfg.n_embd)}; pick the matching preset",
        )
        return
    # The rest of the layout, so a checkpoint of another depth or context (distilgpt2 for gpt2) is refused
    # here instead of failing inside the job.
    layers = {int(m.group(1)) for k in shapes if (m := re.search(r"(?:^|\.)h\.(\d+)\.", k))}
    if len(layers) != cfg.n_layer:
        add(
            "weights",
            f"{path.name} has {len(layers)} layers but the {spec.model} model has {cfg.n_layer}; pick the preset of that depth",
        )
    wpe = shapes.get("wpe.weight") or shapes.get("transformer.wpe.weight")
    if wpe is not None and tuple(wpe) != (cfg.block_size, cfg.n_embd):
        add(
            "weights",
            f"{path.name} has {wpe[0]} positions but the {spec.model} model has block_size {cfg.block_size}; pick the matching preset",
        )
    expected = {"attn.c_attn.weight": (cfg.n_embd, 3 * cfg.n_embd), "mlp.c_fc.weight": (cfg.n_embd, cfg.d_ff)}
    for suffix, shape in expected.items():
        found = {tuple(v) for k, v in shapes.items() if k.endswith(suffix)}
        if found and found != {shape}:
            add(
                "weights",
                f"{path.name} has {suffix} of shape {sorted(found)[0]} but the {spec.model} model needs {shape}",
            )


def validate_data(spec: RunSpec, add: Add) -> None:
    """The corpus: it exists and reads, one batch fits its training split (and one window its held-out split
    when eval_every asks for it), its ids fit the model's vocabulary; a prompt is generate's, reads as the
    corpus's tokens and is the seq."""
    if spec.eval_every and spec.workload != "train":
        add("eval_every", f"the held-out loss is measured while training; workload '{spec.workload}' does not "
                          "train: set eval_every to 0 or workload to train")  # fmt: skip
    if spec.prompt is not None and spec.workload != "generate":
        add("prompt", f"a prompt starts generation; workload '{spec.workload}' generates nothing: clear the "
                      "prompt or set workload to generate")  # fmt: skip
    try:
        source = corpus.resolve(spec.data, spec.weights)
        if source.kind == corpus.SYNTHETIC:
            if spec.eval_every:
                add("eval_every", "synthetic tokens have no held-out split to learn anything about: set eval_every "
                                  "to 0, or data to stdlib or a corpus")  # fmt: skip
            if spec.prompt is not None:
                add("prompt", "synthetic tokens are no text to read a prompt as: set data to stdlib or a text corpus")
            return
        train, val = corpus.split_sizes(source)
        largest = corpus.vocab_of(source)
        largest = largest - 1 if largest is not None else corpus.largest_id(source)
    except (corpus.DataError, OSError) as exc:
        add("data", f"{exc}" if isinstance(exc, corpus.DataError) else f"cannot be read ({exc})")
        return
    need = spec.batch * (spec.seq + 1)
    if train < need:
        add("data", f"the training split of {source.describe()} holds {train:,} tokens, fewer than one batch of "
                    f"batch {spec.batch} x (seq {spec.seq} + 1) = {need:,}; give a larger corpus or lower batch or seq")  # fmt: skip
    if spec.eval_every and val <= spec.seq:
        add("eval_every", f"the held-out split of {source.describe()} holds {val:,} tokens, fewer than one window "
                          f"of seq {spec.seq} + 1; give a corpus with more (a nanoGPT folder needs val.bin) or set "
                          "eval_every to 0")  # fmt: skip
    vocab = spec.model_config().vocab_size
    if largest >= vocab:
        fix = "set vocab_size to at least" if spec.model == "custom" else "use a model whose vocab_size is at least"
        add("data", f"{source.describe()} holds token ids up to {largest} but the {spec.model} model's vocabulary "
                    f"is {vocab}; {fix} {largest + 1}")  # fmt: skip
    if spec.prompt is not None:
        if not source.decodable:
            add("prompt", "a nanoGPT token folder has no tokenizer to read text with: put tokenizer.json beside the "
                          "weights, or use stdlib or a text corpus")  # fmt: skip
        elif (n := len(corpus.encode(source, spec.prompt))) + spec.new_tokens > (block := spec.model_config().block_size):
            room = f"shorten the prompt to at most {block - spec.new_tokens} tokens" if block > spec.new_tokens else ""
            add("prompt", f"is {n} tokens of {source.describe()}, and with {spec.new_tokens} new tokens exceeds the "
                          f"model's block_size {block}; {room + ' or ' if room else ''}lower new_tokens")  # fmt: skip
        elif n != spec.seq:
            add("prompt", f"is {n} tokens of {source.describe()} but seq is {spec.seq}: set seq to "
                          f"{n} (every row of the batch is the prompt)")  # fmt: skip
