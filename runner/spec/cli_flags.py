"""A RunSpec as command-line flags: one flag per spec field (`SPEC_FLAGS`, with the strategy registry's choices
and help), and the spec documents `python -m runner submit` builds from them (`specs_from_args`)."""

from __future__ import annotations

import argparse
import json

from runner.gpt.config import FAMILIES
from runner.job import corpus
from runner.job.checkpoint import is_hf_folder
from runner.spec.run_spec import (
    DEVICES,
    DTYPES,
    FROM_WEIGHTS,
    SCHEDULES,
    TP_STYLES,
    WORKLOADS,
    ZERO_STAGES,
    RunSpec,
    SpecError,
    SpecProblem,
    microbatches_of_size,
)
from runner.spec.strategies import get_strategy, strategy_names, users_of

SPEC_FLAGS = {  # strategy choices and what uses a degree or option come from the registry (registry_opts)
    "strategy": dict(),  # required unless --spec-json names it (cmd_submit says so)
    "tp": dict(type=int),
    "pp": dict(type=int),
    "dp": dict(type=int),
    "microbatches": dict(type=int),
    "schedule": dict(choices=SCHEDULES),
    "virtual_stages": dict(type=int),
    "tp_style": dict(choices=TP_STYLES),
    "sequence_parallel": dict(action="store_true", default=None),
    "zero_stage": dict(type=int, choices=ZERO_STAGES),
    "checkpoint": dict(help="activation checkpointing: none, blocks, or every-K (every K-th block), train only"),
    "model": dict(),
    "n_layer": dict(type=int),
    "n_head": dict(type=int),
    "n_embd": dict(type=int),
    "vocab_size": dict(type=int),
    "block_size": dict(type=int),
    "family": dict(choices=FAMILIES, help="the model's parts: gpt2 or llama (default: the preset's)"),
    "n_kv_head": dict(type=int, help="key/value heads, dividing n_head (grouped-query attention)"),
    "ffn_hidden": dict(type=int, help="the MLP's hidden width"),
    "rope_theta": dict(type=float, help="rotary base (llama family)"),
    "tie_head": dict(
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the LM head shares the token embedding (default: the preset's)",
    ),  # fmt: skip
    "workload": dict(choices=WORKLOADS),
    "batch": dict(type=int),
    "seq": dict(type=int),
    "new_tokens": dict(type=int),
    "prompt": dict(help="generate: the text every row starts from; seq becomes its token count unless given"),
    "steps": dict(type=int),
    "warmup": dict(type=int),
    "lr": dict(type=float),
    "device": dict(choices=DEVICES),
    "dtype": dict(choices=DTYPES),
    "reduce_fp32": dict(action="store_true", default=None,
                        help="bf16-master or bfloat16: reduce the gradients over data parallelism in float32"),
    "seed": dict(type=int),
    "data": dict(help="synthetic (default), stdlib (this Python's sources, byte-level), a folder or file of text "
                 "(tokenizer.json beside --weights, else byte-level), or a nanoGPT folder (train.bin, val.bin)"),
    "eval_every": dict(type=int, help="train on a corpus: the held-out loss every this many steps (0: never)"),
    "verify": dict(action="store_true", default=None),
    "weights": dict(
        help="a GPT-2 .safetensors/.pt file, or a Hugging Face Llama/Qwen2/Mistral folder (then the "
        "model is 'checkpoint': its config.json gives the dimensions)"
    ),
    "time_limit_s": dict(type=float, flag="--time-limit"),
    "nodes": dict(type=int, help="Slurm: nodes the run spreads over (nodes x GPUs per node = ranks)"),
}


def registry_opts(name: str) -> dict:
    """What the strategy registry says about a spec flag: --strategy's choices with each one's help, and for
    a degree or option the strategies that use it."""
    if name == "strategy":
        names = strategy_names()
        text = "; ".join(f"{n}: {get_strategy(n).help}" for n in names)
        return dict(choices=names, help=text.replace("%", "%%"))
    users = users_of(name)
    return dict(help=f"used by {', '.join(users)}") if users else {}


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per spec field on `parser` (submit's), and --microbatch-size instead of a microbatch count."""
    for name, opts in SPEC_FLAGS.items():
        opts = {**opts, **registry_opts(name)}
        flag = opts.pop("flag", "--" + name.replace("_", "-"))
        parser.add_argument(flag, dest=name, **opts)
    parser.add_argument("--microbatch-size", type=int, dest="microbatch_size",
                        help="sequences per microbatch (Megatron's --micro-batch-size), instead of --microbatches")


def specs_from_args(args: argparse.Namespace) -> list[dict]:
    """Each spec's fields: one per --spec-json (or one from the flags alone), the flags given on top of each
    (api.submit parses and validates them). SpecError for a document that is no JSON object, or for both
    --microbatches and --microbatch-size."""
    if args.microbatch_size is not None and args.microbatches is not None:
        raise SpecError([SpecProblem("microbatch_size", "give --microbatches (a count) or --microbatch-size "
                                                        "(sequences each), not both")])  # fmt: skip
    docs = args.spec_json or [None]
    specs = []
    for text in docs:
        if text is None:
            data = {}
        else:
            RunSpec.from_json(text)  # a malformed or non-object document is refused as a spec problem
            data = json.loads(text)
        for name in SPEC_FLAGS:
            value = getattr(args, name, None)
            if value is not None:
                data[name] = value
        if is_hf_folder(data.get("weights")) and "model" not in data:
            data["model"] = FROM_WEIGHTS
        if args.tags:
            data["tags"] = args.tags
        if data.get("prompt") and args.seq is None:  # every row is the prompt: its tokens are the sequence
            length = corpus.prompt_length(str(data.get("data", "synthetic")), data.get("weights"), data["prompt"])
            data["seq"] = length if length else data.get("seq", RunSpec.seq)
        if args.microbatch_size is not None:
            data["microbatches"] = microbatches_of_size(RunSpec.from_dict(data), args.microbatch_size)
        specs.append(data)
    return specs
