"""tensor: every layer's heads and MLP columns split over tp ranks (Megatron), optionally sequence parallel.

Sequence parallelism (here and in 3d, which reuses `check`) needs the Megatron style (its all-reduces become a
reduce-scatter and an all-gather around the LayerNorm/residual region) and seq divisible by tp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.spec.strategies.registry import Add, Strategy, register

if TYPE_CHECKING:
    from runner.spec.run_spec import RunSpec


def check(spec: RunSpec, add: Add) -> None:
    """Sequence parallelism: Megatron style only, and seq splits evenly over the tp ranks."""
    if not spec.sequence_parallel:
        return
    if spec.tp < 2:  # 3d at tp 1: no group to shard the sequence over
        add("sequence_parallel", f"shards the sequence over the tp ranks and needs tp 2 or more (got {spec.tp}); raise tp or turn sequence_parallel off")
    if spec.tp_style != "megatron":
        add(
            "sequence_parallel",
            f"works only with tp_style 'megatron' (got '{spec.tp_style}'); set tp_style to 'megatron' or turn sequence_parallel off",
        )
    if spec.seq % spec.tp and spec.prompt is not None:  # the prompt's tokens are the sequence: it is what to change
        add("prompt", f"is {spec.seq} tokens, and sequence parallelism splits the sequence over tp {spec.tp}: make the "
                      f"prompt a multiple of {spec.tp} tokens long, or turn sequence_parallel off")  # fmt: skip
    elif spec.seq % spec.tp:
        add("seq", f"sequence parallelism needs seq divisible by tp {spec.tp}; use a multiple of {spec.tp}")


TENSOR = register(
    Strategy(
        name="tensor",
        help="every layer's heads and MLP columns split over tp ranks (Megatron)",
        degrees=("tp",),
        options=("microbatches", "tp_style", "sequence_parallel"),
        min_degree={"tp": 2},
        check=check,
    )
)
