"""GPTConfig and the model presets: plain data, importable without torch (the spec and pages use it).

One config, two families (docs: "One model, families by configuration"): `family` chooses the parts the
one GPT builds. 'gpt2': LayerNorm, learned positions, tanh-GELU MLP, biases. 'llama': RMSNorm, rotary
positions (`rope_theta`, optionally Llama 3.1's long-context rescaling `rope_scaling`), SwiGLU MLP
(`ffn_hidden` wide), no biases (Qwen2 keeps them on Q, K and V: `qkv_bias`). Both take grouped-query
attention (`n_kv_head` key/value heads shared by n_head / n_kv_head query heads each) and a head tied to
the token embedding or not (`tie_head`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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


def customized(base: GPTConfig, family: str | None = None, **fields) -> GPTConfig:
    """`base` with the fields given (None leaves one as it is); another family brings its own defaults first
    (GPT-2's biases, or none and no Llama 3.1 rotary rescaling for a Llama made from a GPT-2 preset)."""
    if family is not None and family != base.family and family in FAMILIES:
        base = replace(base, family=family, bias=family == "gpt2", qkv_bias=False, rope_scaling=None)
    return replace(base, **{k: v for k, v in fields.items() if v is not None})


def kv_copies(config: GPTConfig, tp: int) -> int:
    """On how many tp ranks each key/value head lives: tp / n_kv_head when there are fewer heads than ranks
    (each copied to the ranks whose query heads use it), else 1 (the heads split over the ranks)."""
    kv = config.kv_heads
    return tp // kv if tp > kv and tp % kv == 0 else 1


def _list(values) -> str:
    return ", ".join(str(v) for v in values)


def model_problems(cfg: GPTConfig) -> list[tuple[str, str]]:
    """What makes a config unbuildable, as (field, how to fix it): heads against the width, a head's
    dimension against rotary pairs, key/value heads against query heads."""
    out = []
    if cfg.family not in FAMILIES:
        out.append(("family", f"'{cfg.family}' is not a family; choose one of {_list(FAMILIES)}"))
    if cfg.n_embd % cfg.n_head:
        heads = [d for d in range(1, min(cfg.n_embd, 256) + 1) if cfg.n_embd % d == 0]
        out.append(("n_head", f"n_embd {cfg.n_embd} must be divisible by n_head {cfg.n_head}; pick n_head among "
                              f"{_list(heads)}"))  # fmt: skip
    elif cfg.rotary and cfg.head_dim % 2:
        heads = [d for d in range(1, min(cfg.n_embd, 256) + 1) if cfg.n_embd % d == 0 and (cfg.n_embd // d) % 2 == 0]
        out.append(("n_head", f"rotary positions turn pairs of a head's {cfg.head_dim} dimensions: the head dimension "
                              f"n_embd / n_head must be even; pick n_head among {_list(heads)}"))  # fmt: skip
    if cfg.kv_heads < 1 or cfg.n_head % cfg.kv_heads:
        kvs = [d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]
        out.append(("n_kv_head", f"each key/value head serves n_head / n_kv_head query heads: n_kv_head must divide "
                                 f"n_head {cfg.n_head}; pick n_kv_head among {_list(kvs)}"))  # fmt: skip
    if cfg.d_ff < 1:
        out.append(("ffn_hidden", f"must be at least 1 (got {cfg.d_ff})"))
    return out


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's reference name and shape, as the GPT builds them (a tied head listed once, as wte)."""
    h, f, v = config.n_embd, config.d_ff, config.vocab_size
    qkv, bias = h + 2 * config.kv_width, config.bias
    out: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, h)}
    if config.learned_positions:
        out["transformer.wpe.weight"] = (config.block_size, h)
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        layer = {"ln_1.weight": (h,), "ln_1.bias": (h,) if bias else None,
                 "attn.c_attn.weight": (qkv, h), "attn.c_attn.bias": (qkv,) if bias or config.qkv_bias else None,
                 "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,) if bias else None,
                 "ln_2.weight": (h,), "ln_2.bias": (h,) if bias else None,
                 "mlp.c_fc.weight": (config.fused_mlp_parts * f, h),
                 "mlp.c_fc.bias": (config.fused_mlp_parts * f,) if bias else None,
                 "mlp.c_proj.weight": (h, f), "mlp.c_proj.bias": (h,) if bias else None}  # fmt: skip
        out.update({p + k: s for k, s in layer.items() if s is not None})
    out["transformer.ln_f.weight"] = (h,)
    if bias:
        out["transformer.ln_f.bias"] = (h,)
    if not config.tie_head:
        out["lm_head.weight"] = (v, h)
    return out


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


def describe_model(cfg: GPTConfig) -> str:
    """One line of a model's shape, as the Launch and Planner pages and `runner plan` show it."""
    kv = f", {cfg.kv_heads} key/value heads" if cfg.kv_heads != cfg.n_head else ""
    head = "tied head" if cfg.tie_head else "untied head"
    rope = f", rope_theta {cfg.rope_theta:g}" if cfg.rotary else ""
    return (f"{cfg.family} family: {cfg.n_layer} layers, {cfg.n_head} heads{kv}, width {cfg.n_embd}, MLP {cfg.d_ff}, "
            f"vocabulary {cfg.vocab_size}, context {cfg.block_size}{rope}, {head}")  # fmt: skip
