"""Reading checkpoints: GPT-2 files and Hugging Face Llama-family folders, mapped onto our model by name.

GPT-2 (one file): `checkpoint_shapes` reads a .safetensors header without torch (the spec validates a
form with it); `read_checkpoint` loads the tensors (safetensors, or a torch file with weights_only=True:
no pickled code runs); `convert_gpt2_state_dict` maps Hugging Face GPT-2's names and Conv1D layouts to
this project's model; `load_gpt2_state_dict` copies them into a whole model.

Llama, Qwen2 and Mistral (a folder as `save_pretrained` writes it: config.json, and model.safetensors or
shards listed in model.safetensors.index.json): `config_from_hf` turns config.json into a GPTConfig
without torch; `HFFolder` reads any slice of one of our parameters straight from the safetensors files
(`get_slice`), so a rank reads the rows and columns it holds and never the whole model. Our fused
parameters are stacks of theirs: c_attn = [q_proj; k_proj; v_proj], c_fc = [gate_proj; up_proj]
(`llama_sources`). Torch is imported only where tensors are read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from runner.gpt.config import PRESETS, GPTConfig, RopeScaling, llama

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


# ---- Hugging Face Llama-family folders -----------------------------------------------------------------
HF_MODEL_TYPES = ("llama", "qwen2", "mistral")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_hf_folder(path: str | Path | None) -> bool:
    return path is not None and Path(path).expanduser().is_dir()


def read_hf_config(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(f"no config.json in {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"config.json is not valid JSON ({exc.msg})") from exc


def config_from_hf(cfg: dict) -> GPTConfig:
    """Our GPTConfig of a Llama, Qwen2 or Mistral config.json; ValueError naming what we do not run."""
    kind = cfg.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"model_type {kind!r} is not one of {', '.join(HF_MODEL_TYPES)}")
    try:
        h, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        dims = dict(n_layer=int(cfg["num_hidden_layers"]), n_head=n_head, n_embd=h,
                    n_kv_head=int(cfg.get("num_key_value_heads") or n_head), ffn_hidden=int(cfg["intermediate_size"]),
                    vocab_size=int(cfg["vocab_size"]))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"config.json lacks a usable {exc}") from exc
    if cfg.get("head_dim") not in (None, h // n_head):
        raise ValueError(f"head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads; not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r}: only SwiGLU (silu) MLPs are supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("attention_bias / mlp_bias on every projection is not supported")
    rope = dict(cfg.get("rope_parameters") or {})
    scaling_cfg = cfg.get("rope_scaling") or rope
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind_of_rope = scaling_cfg.get("rope_type", scaling_cfg.get("type", "default"))
    scaling = None
    if kind_of_rope == "llama3":
        scaling = RopeScaling(float(scaling_cfg["factor"]), float(scaling_cfg["low_freq_factor"]),
                              float(scaling_cfg["high_freq_factor"]), int(scaling_cfg["original_max_position_embeddings"]))  # fmt: skip
    elif kind_of_rope != "default":
        raise ValueError(f"rope type {kind_of_rope!r} is not supported (default and llama3 are)")
    block = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True):  # up to the window, sliding attention is full attention
        block = min(block, int(window))
    config = llama(**dims, block_size=block, rope_theta=theta, tie_head=bool(cfg.get("tie_word_embeddings", False)),
                   rope_scaling=scaling, eps=float(cfg.get("rms_norm_eps", 1e-6)))  # fmt: skip
    return replace(config, qkv_bias=True) if kind == "qwen2" else config


def config_from_hf_folder(folder: str | Path) -> GPTConfig:
    return config_from_hf(read_hf_config(folder))


def hf_weight_files(folder: str | Path) -> dict[str, str]:
    """Tensor name -> the safetensors file (in `folder`) holding it, from the index or the single file."""
    folder = Path(folder).expanduser()
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{INDEX_FILE} has no weight_map")
        return {k: str(folder / v) for k, v in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return {k: str(single) for k in checkpoint_shapes(single)}
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def hf_folder_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the folder, from the safetensors headers (no tensor is read)."""
    out: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(hf_weight_files(folder).values())):
        out.update(checkpoint_shapes(Path(file)))
    return out


@dataclass(frozen=True)
class Source:
    """Rows [offset, offset + rows) of one of our parameters come from Hugging Face tensor `name`."""

    name: str
    offset: int
    rows: int


def llama_sources(name: str, config: GPTConfig) -> list[Source]:
    """Where our parameter `name` comes from in a Llama-family checkpoint, as a stack of row blocks."""
    h, kv, f = config.n_embd, config.kv_width, config.d_ff
    if name == "transformer.wte.weight" or (name == "lm_head.weight" and config.tie_head):
        return [Source("model.embed_tokens.weight", 0, config.vocab_size)]
    if name == "lm_head.weight":
        return [Source("lm_head.weight", 0, config.vocab_size)]
    if name == "transformer.ln_f.weight":
        return [Source("model.norm.weight", 0, h)]
    parts = name.split(".")  # transformer.h.<i>.<module>.<...>.<weight|bias>
    if parts[:2] != ["transformer", "h"] or len(parts) < 5:
        raise ValueError(f"{name} has no Llama counterpart")
    layer, leaf, rest = f"model.layers.{parts[2]}", parts[-1], ".".join(parts[3:-1])
    if rest == "attn.c_attn":
        return [
            Source(f"{layer}.self_attn.{p}_proj.{leaf}", o, n)
            for p, o, n in (("q", 0, h), ("k", h, kv), ("v", h + kv, kv))
        ]
    if rest == "mlp.c_fc":
        return [Source(f"{layer}.mlp.gate_proj.{leaf}", 0, f), Source(f"{layer}.mlp.up_proj.{leaf}", f, f)]
    single = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
              "mlp.c_proj": "mlp.down_proj"}  # fmt: skip
    if rest not in single:
        raise ValueError(f"{name} has no Llama counterpart")
    return [Source(f"{layer}.{single[rest]}.{leaf}", 0, h)]


def _row_runs(rows: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs [lo, hi) of a list of row ids, in the list's order."""
    start = prev = None
    for r in rows:
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            yield start, prev + 1
            start = prev = r
    if start is not None:
        yield start, prev + 1


class HFFolder:
    """Sliced reads of our parameters from a Hugging Face Llama-family folder, by our reference names.

    `read(name, index)` is `reference[index]` of our parameter (the same index a strategy's Shard records:
    None, a tuple of slices, a LongTensor of rows, or ZeRO's per-dimension coordinates), reading from the
    files only the rows (and, for slices, the columns) it covers."""

    def __init__(self, folder: str | Path, config: GPTConfig | None = None):
        self.folder = Path(folder).expanduser()
        self.config = config or config_from_hf_folder(self.folder)
        self.files = hf_weight_files(self.folder)
        self._open: dict[str, object] = {}
        self.bytes_read = 0

    def _slice(self, name: str):
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise ValueError(f"the checkpoint lacks {name}")
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file].get_slice(name)

    def _rows(self, name: str, lo: int, hi: int, cols: slice | None) -> torch.Tensor:
        """Our parameter's rows [lo, hi) (columns `cols` of a matrix), stitched from its sources."""
        import torch

        pieces = []
        for src in llama_sources(name, self.config):
            a, b = max(lo, src.offset), min(hi, src.offset + src.rows)
            if a >= b:
                continue
            sl = self._slice(src.name)
            rows = slice(a - src.offset, b - src.offset)
            t = sl[rows] if cols is None or len(sl.get_shape()) == 1 else sl[rows, cols]
            self.bytes_read += t.numel() * t.element_size()
            pieces.append(t.float())
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def full_shape(self, name: str) -> tuple[int, ...]:
        srcs = llama_sources(name, self.config)
        rest = tuple(self._slice(srcs[0].name).get_shape()[1:])
        return (sum(s.rows for s in srcs), *rest)

    def read(self, name: str, index=None) -> torch.Tensor:
        import torch

        n = self.full_shape(name)[0]
        if index is None:
            return self._rows(name, 0, n, None)
        if isinstance(index, torch.Tensor):  # rows, in their order (fused Q/K/V or gate/up slices)
            return torch.cat([self._rows(name, lo, hi, None) for lo, hi in _row_runs(index.tolist())])
        if all(isinstance(i, slice) for i in index):
            lo, hi, step = index[0].indices(n)
            if hi <= lo:  # a vocabulary slice that is all padding
                return torch.zeros((0, *self.full_shape(name)[1:]))
            block = self._rows(name, lo, hi, index[1] if len(index) > 1 else None)
            return block[::step] if step != 1 else block
        # ZeRO's coordinates, one tensor a dimension (a flat piece): the rows they span, then the elements.
        first = index[0]
        if isinstance(first, torch.Tensor) and first.numel() == 0:
            return torch.empty(0)
        rows = first if isinstance(first, torch.Tensor) else torch.as_tensor(first)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        block = self._rows(name, lo, hi, None)
        return block[(rows - lo, *index[1:])]


def open_weights(path: str | Path, config: GPTConfig) -> HFFolder | dict[str, torch.Tensor]:
    """A run's weights: a Hugging Face folder, read slice by slice later, or a GPT-2 file's tensors (read whole)."""
    return HFFolder(path, config) if is_hf_folder(path) else read_checkpoint(path)


def shard_reader(weights: HFFolder | dict[str, torch.Tensor]):
    """(name, index) -> reference[index] of our parameter `name`, from either kind of weights."""
    if isinstance(weights, HFFolder):
        return weights.read
    full = convert_gpt2_state_dict(weights)
    return lambda name, index: full[name] if index is None else full[name][index]


def load_reference(model: nn.Module, weights: HFFolder | dict[str, torch.Tensor]) -> nn.Module:
    """Whole weights into a whole model (the verification's reference)."""
    return load_hf_folder(model, weights) if isinstance(weights, HFFolder) else load_gpt2_state_dict(model, weights)


def load_hf_folder(model: nn.Module, folder: HFFolder) -> nn.Module:
    """Copy a whole model's parameters (the verification's reference) from a Llama-family folder."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head is one parameter, read once
            value = folder.read(name)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(p.shape)}")
            p.copy_(value)
    return model
