"""The GPT every strategy starts from, in either family: name-seeded init, KV cache, the one greedy generate loop.

Reads like nanoGPT's model.py: CausalSelfAttention, MLP, Block, GPT, in the order data flows through
them. The config's family chooses the parts (runner/gpt/config.py): GPT-2's LayerNorm, learned positions
and GELU MLP, or Llama's RMSNorm, rotary positions and SwiGLU MLP; either with grouped-query attention
and a tied or untied head. The parameter names are the same in both families where the part is
(`transformer.h.<i>.attn.c_attn` holds Q, K and V stacked, `mlp.c_fc` SwiGLU's gate and up stacked),
so every strategy's plan of names applies to both. Nothing here knows about torch.distributed. Parallelism is applied to this model from outside
(torchtitan's way): runner/gpt/tp_plan.py swaps layers for tensor-parallel ones, `cut_stage` removes
the blocks a pipeline stage does not hold. The pieces a stage lacks are absent (None) and passed
through: without the embedding the model takes hidden states, without the head it returns them.
Blocks live in a ModuleDict keyed by layer id, so every parameter keeps its reference name
`transformer.h.<i>.…` whatever was removed.

Two switches are set from outside, by runner/gpt/build.py: `GPT.compute_context` (the context the
forward runs in: autocast to bfloat16 under bf16-mixed, runner/gpt/precision.py) and a block's
`checkpoint_runner` (activation checkpointing, runner/gpt/checkpointing.py), which the forward uses
for that block while autograd records and no KV cache is in use. Both default to off, so the
reference model is plain float32.

Values come last: a model built on the meta device is given its values by `materialize`, each
parameter `init_parameter(reference name, reference shape)[index]`, where a parameter that a strategy
sliced records its reference shape and index (`Shard`). So any shard is built alone, one full
parameter at a time, and equals the same slice of the single-device reference.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from runner.gpt.config import PRESETS, GPTConfig
from runner.gpt.rotary import Rotary, rotary_heads, split_heads
from runner.gpt.swiglu import swiglu

__all__ = ["GPT", "GPTConfig", "PRESETS", "KVCache", "Shard", "WholeVocabulary", "cut_stage", "greedy_generate",
           "init_parameter", "materialize", "shard_of"]  # fmt: skip


def parameter_seed(base_seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter: the same on every rank, process and machine."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_std(name: str, config: GPTConfig) -> float | None:
    """GPT-2's init (both families): N(0, 0.02) for weights, scaled for residual projections; None means constant."""
    if name.endswith("c_proj.weight"):
        return 0.02 / math.sqrt(2 * config.n_layer)
    if name.endswith(("wte.weight", "wpe.weight", "c_attn.weight", "c_fc.weight", "lm_head.weight")):
        return 0.02
    return None


def init_parameter(name: str, shape: tuple[int, ...], config: GPTConfig, seed: int) -> torch.Tensor:
    """The full reference value of parameter `name` (float32, CPU), derived from its name alone.

    A shard is `init_parameter(...)[index]`: only one parameter is ever materialised at a time.
    """
    if name == "lm_head.weight" and config.tie_head:  # a stage holding only the tied head rebuilds wte
        name = "transformer.wte.weight"
    std = init_std(name, config)
    if std is None:
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            return torch.ones(shape)
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=gen).mul_(std)


@dataclass(frozen=True)
class Shard:
    """What part of a reference parameter a sliced parameter holds: `reference[index]`, where index is a
    tuple of slices or a LongTensor of rows; rows past the reference (vocabulary padding) are zeros."""

    reference_shape: tuple[int, ...]
    index: object = None


def shard_of(p: nn.Parameter) -> Shard:
    """The Shard a strategy recorded on `p`; the whole parameter when none did."""
    return getattr(p, "shard", None) or Shard(tuple(p.shape))


@dataclass
class LayerKVCache:
    """Keys and values one attention layer has seen so far, shape [batch, heads, seq, head_dim]."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The first keys and values are made contiguous: GPT-2's are views of c_attn's output, whose storage holds
        # the queries too, and a cache of views would keep that 3h-wide tensor alive for 2h of content (Llama's
        # rotated keys are new tensors in c_attn's layout, its values already a contiguous copy).
        self.k = k.contiguous() if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v.contiguous() if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


@dataclass
class KVCache:
    layers: list[LayerKVCache] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layer: int) -> KVCache:
        return cls([LayerKVCache() for _ in range(n_layer)])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, hq, Tq, d] over k, v [B, hkv, Tk, d] (hkv dividing hq: each key/value head
    serves hq / hkv consecutive query heads); the queries are the last Tq positions."""
    tq, tk = q.shape[2], k.shape[2]
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    if tq == 1:
        return F.scaled_dot_product_attention(q, k, v, **gqa)
    # Prefill after a cached prefix: query i sits at absolute position tk - tq + i.
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


class CausalSelfAttention(nn.Module):
    """c_attn's output is [Q | K | V] of widths `c_attn.parts` (what this c_attn holds: a tensor-parallel one
    records the widths of its heads); heads and positions are read from them, so an attention whose c_attn
    holds only some heads, or gathers the sequence (tensor parallelism), runs unchanged. With fewer
    key/value heads than query heads (grouped-query attention) each serves a run of consecutive query heads,
    and the KV cache holds the key/value heads only."""

    def __init__(self, config: GPTConfig, rotary: Rotary | None = None):
        super().__init__()
        self.head_dim = config.head_dim
        self.rotary = rotary
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * config.kv_width, bias=config.bias or config.qkv_bias)
        self.c_attn.parts = (config.n_embd, config.kv_width, config.kv_width)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        qkv = self.c_attn(x)
        b, t, _ = qkv.shape  # not x's: a sequence-parallel c_attn gathers the sequence on the way in
        if self.rotary is not None:  # positions continue after what the cache holds
            cos, sin = self.rotary.cos_sin(0 if cache is None else cache.length, t, x)
            q, k, v = rotary_heads(qkv, self.c_attn.parts, self.head_dim, cos, sin)
            del qkv  # nothing else holds it: freed before the attention runs (runner/gpt/rotary.py)
        else:
            q, k, v = split_heads(qkv, self.c_attn.parts, self.head_dim)
        if cache is not None:
            k, v = cache.append(k, v)
        y = attend(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    """GPT-2's tanh-GELU MLP, or Llama's SwiGLU: c_fc holds the gate's rows then the up projection's, and the
    hidden state is silu(gate) * up (c_fc's output halves, so a column-parallel c_fc holding the same
    slice of each runs unchanged)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.is_llama
        self.c_fc = nn.Linear(config.n_embd, config.fused_mlp_parts * config.d_ff, bias=config.bias)
        self.c_fc.parts = (config.d_ff,) * config.fused_mlp_parts  # tensor parallelism splits each part alike
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.c_proj(swiglu(self.c_fc(x)))
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


def norm(config: GPTConfig) -> nn.Module:
    """The family's normalisation: LayerNorm (GPT-2) or RMSNorm (Llama); its weight is `<name>.weight`."""
    if config.is_llama:
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, rotary: Rotary | None = None):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, rotary)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)
        # Set by activation checkpointing (runner/gpt/checkpointing.py) on the blocks it checkpoints:
        # GPT.forward then runs the block through it while training.
        self.checkpoint_runner: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 (learned positions, pre-LayerNorm blocks, tanh-GELU MLP, biases) or Llama (rotary positions,
    pre-RMSNorm blocks, SwiGLU MLP, no biases), as the config's family says; the LM head tied to the token
    embedding or a parameter of its own (`tie_head`). A Llama has no `transformer.wpe` (None).

    `GPT(config, seed)` is the whole single-device model with its reference values. Built under
    `torch.device("meta")` it has shapes only, for a strategy to slice and cut before `materialize`.
    """

    def __init__(self, config: GPTConfig, seed: int = 0, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        target = torch.get_default_device()  # meta inside `with torch.device("meta")`
        rotary = Rotary(config) if config.rotary else None
        with torch.device("meta"):  # shapes first: each value is then made once, by name
            self.transformer = nn.ModuleDict(
                dict(
                    wte=nn.Embedding(config.vocab_size, config.n_embd),
                    wpe=nn.Embedding(config.block_size, config.n_embd) if config.learned_positions else None,
                    h=nn.ModuleDict({str(i): Block(config, rotary) for i in range(config.n_layer)}),
                    ln_f=norm(config),
                )
            )
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.transformer.wte.weight
        # The context every forward runs in: autocast under bf16-mixed (runner/gpt/precision.py).
        self.compute_context: Callable[[], AbstractContextManager] = nullcontext
        if target.type != "meta":
            materialize(self, seed, device=device if device is not None else target)

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token ids (or hidden states without the embedding) at positions start.. -> logits [b, t, vocab]
        (or hidden states without the head; with `last_only`, the head sees the last position only).
        With targets, (logits, mean cross-entropy loss): a convenience of the whole model."""
        with self.compute_context():
            if self.transformer.wte is not None:
                x = self.embed(x, start)
            recording = torch.is_grad_enabled()  # training: checkpointed blocks drop their activations
            for i, block in self.transformer.h.items():
                if block.checkpoint_runner is not None and cache is None and recording:
                    x = block.checkpoint_runner(block, x)
                else:
                    x = block(x, None if cache is None else cache.layers[int(i)])
            if self.lm_head is not None:
                if last_only:
                    x = x[:, -1:, :]
                x = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return x
        return x, WholeVocabulary().loss(x, targets)

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = idx.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}")
        if self.transformer.wpe is None:  # rotary positions: applied inside attention
            return self.transformer.wte(idx)
        pos = torch.arange(start, start + t, device=idx.device).unsqueeze(0)  # [1, t]: broadcast over the batch
        return self.transformer.wte(idx) + self.transformer.wpe(pos)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a KV cache: prefill the prompt, then one token at a time."""
        cache = KVCache.empty(self.config.n_layer)

        def step(_mb: int, tokens: torch.Tensor, start: int, _round: int) -> torch.Tensor:
            logits = self(tokens, cache=cache, start=start, last_only=True)
            return logits[:, -1, :].argmax(dim=-1, keepdim=True)

        return greedy_generate([idx], max_new_tokens, step)[0]


class WholeVocabulary:
    """The output functions of a model whose head holds the whole vocabulary: its loss is plain cross
    entropy and its logits are already full (runner/gpt/tp_layers.py TPState gives the same three for a
    vocab-parallel head)."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def whole_sequences(self) -> AbstractContextManager:
        return nullcontext()


Step = Callable[[int, torch.Tensor, int, int], "torch.Tensor | None"]


def greedy_generate(prompts: Sequence[torch.Tensor], new_tokens: int, step: Step) -> list[torch.Tensor]:
    """The one greedy decoding loop, over microbatches of prompts as an assembly line.

    Round r runs one pass of every microbatch i in order: `step(i, tokens, start, r)` feeds `tokens`
    (the prompt in round 0, then the token picked one round earlier) at positions start.. through the
    model with microbatch i's KV cache and returns the next token [b, 1] -- or None where this rank
    does not pick tokens (a pipeline stage before the last, which gets its input from its neighbour
    instead). So a prompt is prefilled once, then new_tokens - 1 single-token passes follow.
    Returns each microbatch's prompt followed by the tokens picked here.
    """
    tokens = list(prompts)
    starts = [0] * len(prompts)
    out = [[p] for p in prompts]
    for r in range(new_tokens):
        for i in range(len(prompts)):
            nxt = step(i, tokens[i], starts[i], r)
            starts[i] += tokens[i].shape[1]
            tokens[i] = tokens[i][:, -1:] if nxt is None else nxt  # one position a pass from now on
            if nxt is not None:
                out[i].append(nxt)
    return [torch.cat(parts, dim=1) for parts in out]


def cut_stage(model: GPT, first: int, last: int, has_embed: bool, has_head: bool) -> GPT:
    """Keep blocks [first, last) of `model` and, where asked, the embedding and the head (final norm +
    LM head); the rest is removed (None: passed through). Names are unchanged. A stage with the head but
    not the embedding keeps a tied weight as its own lm_head.weight (init maps it to wte's value); an
    untied head is the last stage's alone."""
    for i in list(model.transformer.h.keys()):
        if not first <= int(i) < last:
            del model.transformer.h[i]
    if not has_embed:
        model.transformer.wte = None
        model.transformer.wpe = None
    if not has_head:
        model.transformer.ln_f = None
        model.lm_head = None
    return model


@torch.no_grad()
def materialize(
    model: nn.Module,
    seed: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    config: GPTConfig | None = None,
) -> nn.Module:
    """Give every parameter its value, by name: `init_parameter(name, reference shape)[index]` with the
    `Shard` its slicer recorded (zero rows past the reference, e.g. vocabulary padding), then on `device`
    in `dtype`, keeping the attributes set on it. Tied parameters stay tied (the first name visited draws
    the value)."""
    config = config or model.config
    made: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for leaf, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                name = f"{prefix}.{leaf}" if prefix else leaf
                shard = shard_of(p)
                full = init_parameter(name, shard.reference_shape, config, seed)
                value = full if shard.index is None else full[shard.index]
                if tuple(value.shape) != tuple(p.shape):
                    padded = torch.zeros(p.shape)
                    padded[tuple(slice(0, n) for n in value.shape)] = value
                    value = padded
                where = device if device is not None else (p.device if p.device.type != "meta" else "cpu")
                # A copy of its own, never a view: a row shard of `full` is a contiguous view that would keep the
                # whole reference tensor alive on a CPU rank (a view's storage is its base's).
                own = torch.empty(value.shape, device=where, dtype=dtype or p.dtype).copy_(value)
                new = nn.Parameter(own, p.requires_grad)
                new.__dict__.update(p.__dict__)  # what strategies noted on it: its Shard, sequence-parallel marks
                made[id(p)] = new
            module._parameters[leaf] = made[id(p)]
    return model
