"""GPTConfig and the model presets: plain data, importable without torch (the spec and pages use it).

One config, two families (docs: "One model, families by configuration"): `family` chooses the parts the
one GPT builds. 'gpt2': LayerNorm, learned positions, tanh-GELU MLP, biases. 'llama': RMSNorm, rotary
positions (`rope_theta`, optionally Llama 3.1's long-context rescaling `rope_scaling`), SwiGLU MLP
(`ffn_hidden` wide), no biases (Qwen2 keeps them on Q, K and V: `qkv_bias`). Both take grouped-query
attention (`n_kv_head` key/value heads shared by n_head / n_kv_head query heads each) and a head tied to
the token embedding or not (`tie_head`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rescaling of rotary frequencies for long contexts (Hugging Face rope_type 'llama3'):
    wavelengths above original_max / low_freq_factor are stretched by `factor`, those below
    original_max / high_freq_factor kept, the ones between interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class GPTConfig:
    """The model's dimensions (GPT-2 124M by default): layers, attention heads, width, vocabulary, positions,
    and the family's parts (see the module docstring)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # the residual stream's width h; heads are h / n_head wide
    vocab_size: int = 50257
    block_size: int = 1024  # the longest sequence (learned positions: as many embeddings)
    bias: bool = True
    layer_norm_eps: float = 1e-5  # the norm's epsilon (LayerNorm or RMSNorm)
    family: str = "gpt2"
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    ffn_hidden: int | None = None  # the MLP's hidden width; None: 4h
    rope_theta: float = 10000.0  # rotary base (llama)
    tie_head: bool = True  # the LM head is the token embedding
    qkv_bias: bool = False  # biases on Q, K, V only (Qwen2)
    rope_scaling: RopeScaling | None = None

    @property
    def d_ff(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def kv_width(self) -> int:
        """Width of the keys (and of the values): kv_heads x head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def is_llama(self) -> bool:
        return self.family == "llama"

    @property
    def rotary(self) -> bool:
        return self.is_llama

    @property
    def learned_positions(self) -> bool:
        return not self.rotary

    @property
    def fused_mlp_parts(self) -> int:
        """Row blocks of the MLP's input projection c_fc: 2 (gate, up) for SwiGLU, 1 for GELU."""
        return 2 if self.is_llama else 1

    def to_dict(self) -> dict:
        return asdict(self)


def llama(n_layer: int, n_head: int, n_kv_head: int, n_embd: int, ffn_hidden: int, vocab_size: int, block_size: int,
          rope_theta: float, tie_head: bool, rope_scaling: RopeScaling | None = None, eps: float = 1e-5) -> GPTConfig:  # fmt: skip
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, block_size=block_size,
                     bias=False, layer_norm_eps=eps, family="llama", n_kv_head=n_kv_head, ffn_hidden=ffn_hidden,
                     rope_theta=rope_theta, tie_head=tie_head, rope_scaling=rope_scaling)  # fmt: skip


_LLAMA3 = dict(vocab_size=128256, block_size=131072, rope_theta=500000.0)

PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=512, block_size=128),
    "small": GPTConfig(n_layer=8, n_head=8, n_embd=256, vocab_size=8192, block_size=256),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Tests and the self-test: 2 key/value heads for 4 query heads (tp 2 splits them, tp 4 replicates them).
    "llama-tiny": llama(4, 4, 2, 64, 176, 512, 128, rope_theta=500000.0, tie_head=False),
    # Published dimensions (Hugging Face meta-llama/*/config.json).
    "llama-3.2-1b": llama(16, 32, 8, 2048, 8192, **_LLAMA3, tie_head=True, rope_scaling=RopeScaling(factor=32.0)),
    "llama-3.2-3b": llama(28, 24, 8, 3072, 8192, **_LLAMA3, tie_head=True, rope_scaling=RopeScaling(factor=32.0)),
    "llama-3.1-8b": llama(32, 32, 8, 4096, 14336, **_LLAMA3, tie_head=False, rope_scaling=RopeScaling()),
    "llama-3.1-70b": llama(80, 64, 8, 8192, 28672, **_LLAMA3, tie_head=False, rope_scaling=RopeScaling()),
}


def count_parameters(config: GPTConfig) -> int:
    """Parameters of the full model (a tied LM head counted once)."""
    h, L, f = config.n_embd, config.n_layer, config.d_ff
    b = 1 if config.bias else 0
    qkv_b = 1 if config.bias or config.qkv_bias else 0
    norm = h + h * b  # RMSNorm and a bias-free LayerNorm: one weight vector
    qkv = h + 2 * config.kv_width
    attn = qkv * h + qkv * qkv_b + h * h + h * b
    parts = config.fused_mlp_parts
    mlp = parts * (h * f + f * b) + f * h + h * b
    positions = config.block_size * h if config.learned_positions else 0
    head = 0 if config.tie_head else config.vocab_size * h
    return config.vocab_size * h + positions + L * (2 * norm + attn + mlp) + norm + head
