"""The GPT-2 model every strategy shards: config presets, name-seeded init, KV cache, HF loading.

Reads like nanoGPT's model.py: GPTConfig, CausalSelfAttention, MLP, Block, GPT, in the order data
flows through them. Nothing here knows about torch.distributed; strategies build their shards from
the same `init_parameter` so that a shard equals the same slice of this reference model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from runner.gpt.config import PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS", "KVCache", "init_parameter"]


def parameter_seed(base_seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter: the same on every rank, process and machine."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_std(name: str, config: GPTConfig) -> float | None:
    """GPT-2's init: N(0, 0.02) for weights, scaled for residual projections; None means constant."""
    if name.endswith("c_proj.weight"):
        return 0.02 / math.sqrt(2 * config.n_layer)
    if name.endswith(("wte.weight", "wpe.weight", "c_attn.weight", "c_fc.weight")):
        return 0.02
    return None


def init_parameter(name: str, shape: tuple[int, ...], config: GPTConfig, seed: int) -> torch.Tensor:
    """The full reference value of parameter `name` (float32, CPU), derived from its name alone.

    A shard is `init_parameter(...)[slice]`: only one parameter is ever materialised at a time.
    """
    if name == "lm_head.weight":  # tied to the token embedding: a stage holding only the head rebuilds wte
        name = "transformer.wte.weight"
    std = init_std(name, config)
    if std is None:
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            return torch.ones(shape)
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=gen) * std


@dataclass
class LayerKVCache:
    """Keys and values one attention layer has seen so far, shape [batch, heads, seq, head_dim]."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
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

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, h, Tq, d] over k, v [B, h, Tk, d]; the queries are the last Tq positions."""
    tq, tk = q.shape[2], k.shape[2]
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    # Prefill after a cached prefix: query i sits at absolute position tk - tq + i.
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.append(k, v)
        y = attend(q, k, v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP of 4x width, tied LM head."""

    def __init__(self, config: GPTConfig, seed: int = 0, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        init_module(self, config, seed)
        if device is not None:
            self.to(device)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [batch, seq, vocab]; with targets, (logits, mean cross-entropy loss)."""
        x = self.embed(idx, 0 if cache is None else cache.length)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layers[i])
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = idx.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + t, device=idx.device)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a KV cache: prefill the prompt, then one token at a time."""
        cache = KVCache.empty(self.config.n_layer)
        logits = self(idx, cache=cache)
        out = [idx]
        for i in range(max_new_tokens):
            nxt = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self(nxt, cache=cache)
        return torch.cat(out, dim=1)


def init_module(module: nn.Module, config: GPTConfig, seed: int, prefix: str = "") -> None:
    """Fill every parameter of `module` with its name-seeded reference value (tied weights once)."""
    with torch.no_grad():
        for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
            p.copy_(init_parameter(name, tuple(p.shape), config, seed))


class GPTStage(nn.Module):
    """Consecutive blocks [first, last) of the GPT, with the embeddings on the first stage and
    ln_f + LM head on the last. Parameter names equal the reference model's, so a stage is built
    (and verified) by name. A stage that holds the head but not the embedding gets its own copy of
    the tied weight; the strategy keeps both copies equal by summing their gradients.
    """

    def __init__(
        self,
        config: GPTConfig,
        first: int,
        last: int,
        seed: int = 0,
        has_embed: bool = True,
        has_head: bool = True,
    ):
        super().__init__()
        self.config = config
        self.first, self.last = first, last
        self.has_embed, self.has_head = has_embed, has_head
        modules: dict[str, nn.Module] = {"h": nn.ModuleDict({str(i): Block(config) for i in range(first, last)})}
        if has_embed:
            modules["wte"] = nn.Embedding(config.vocab_size, config.n_embd)
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if has_head:
            modules["ln_f"] = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.transformer = nn.ModuleDict(modules)
        if has_head:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if has_embed:
                self.lm_head.weight = self.transformer.wte.weight
        init_module(self, config, seed)

    @property
    def layer_ids(self) -> range:
        return range(self.first, self.last)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Token ids on the first stage, hidden states [b, t, h] elsewhere; logits from the last stage."""
        if self.has_embed:
            pos = torch.arange(start, start + x.shape[1], device=x.device)
            x = self.transformer.wte(x) + self.transformer.wpe(pos)
        for i in self.layer_ids:
            x = self.transformer.h[str(i)](x, None if cache is None else cache.layers[i])
        if self.has_head:
            x = self.lm_head(self.transformer.ln_f(x))
        return x
