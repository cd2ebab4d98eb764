"""Reading GPT-2 checkpoints: tensor shapes from a file's header, the tensors, and their names in our model.

`checkpoint_shapes` reads a .safetensors header without torch (the spec validates a form with it);
`read_checkpoint` loads the tensors (safetensors, or a torch file with weights_only=True: no pickled
code runs); `convert_gpt2_state_dict` maps Hugging Face GPT-2's names and Conv1D layouts to this
project's model; `load_gpt2_state_dict` copies them into a whole model. Torch is imported only where
tensors are read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from runner.gpt.config import PRESETS, GPTConfig

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a checkpoint without building a model: safetensors header, else torch.load(weights_only)."""
    if path.suffix == ".safetensors":
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file too short for safetensors")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise ValueError("safetensors header is implausibly large")
            meta = json.loads(f.read(n))
        return {k: tuple(v["shape"]) for k, v in meta.items() if k != "__metadata__"}
    import torch  # only for non-safetensors checkpoints; the page path avoids it

    try:
        sd = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # torch raises many types for a non-checkpoint file
        raise ValueError(str(exc).splitlines()[0][:200]) from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError("not a state dict")
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


# Hugging Face GPT-2 stores these as Conv1D, i.e. [in, out]; nn.Linear wants [out, in].
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def convert_gpt2_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 layout -> this model's names and layouts (full tensors, float32)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name.endswith(_CONV1D_SUFFIXES):
            value = value.t()
        out[name] = value.float().contiguous()
    out.setdefault("lm_head.weight", out.get("transformer.wte.weight"))
    return out


def config_from_gpt2_state_dict(sd: dict[str, torch.Tensor], n_head: int | None = None) -> GPTConfig:
    """Infer dims from a GPT-2 checkpoint; n_head is not in the tensors, so match a preset by width."""
    conv = convert_gpt2_state_dict(sd)
    vocab, n_embd = conv["transformer.wte.weight"].shape
    block_size = conv["transformer.wpe.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[2]) for k in conv if k.startswith("transformer.h."))
    if n_head is None:
        by_width = {p.n_embd: p.n_head for p in PRESETS.values() if p.vocab_size == 50257}
        n_head = by_width.get(n_embd, max(1, n_embd // 64))
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, block_size=block_size)


def load_gpt2_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a Hugging Face GPT-2 state dict into `model`; raises ValueError naming what mismatches."""
    conv = convert_gpt2_state_dict(state_dict)
    own = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(own) - set(conv))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, first: {missing[:3]}")
    import torch

    with torch.no_grad():
        for name, p in own.items():
            if tuple(conv[name].shape) != tuple(p.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(conv[name].shape)} != model {tuple(p.shape)}")
            p.copy_(conv[name])
    return model


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch file loaded with weights_only=True (no pickled code)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return sd
