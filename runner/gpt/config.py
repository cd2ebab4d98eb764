"""GPTConfig and the model presets: plain data, importable without torch (the spec and pages use it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPTConfig:
    """The model's dimensions (GPT-2 124M by default): layers, attention heads, width, vocabulary, positions."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # the residual stream's width h; heads are h / n_head wide
    vocab_size: int = 50257
    block_size: int = 1024  # learned positions: the longest sequence
    bias: bool = True
    layer_norm_eps: float = 1e-5

    @property
    def d_ff(self) -> int:
        return 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=512, block_size=128),
    "small": GPTConfig(n_layer=8, n_head=8, n_embd=256, vocab_size=8192, block_size=256),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
}


def count_parameters(config: GPTConfig) -> int:
    """Parameters of the full model (tied LM head counted once)."""
    h, L, f = config.n_embd, config.n_layer, config.d_ff
    b = 1 if config.bias else 0
    layer_norm = h + h * b
    per_layer = 2 * layer_norm + (3 * h * h + 3 * h * b) + (h * h + h * b) + (h * f + f * b) + (f * h + h * b)
    return config.vocab_size * h + config.block_size * h + L * per_layer + layer_norm
