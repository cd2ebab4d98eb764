"""ParallelDims: a run's tensor, pipeline and data parallel degrees, checked when built (torch-free).

The mesh lays ranks out from it and the spec hands it out as `RunSpec.degrees`; a degree a strategy does
not use is 1. It unpacks like the tuple it replaces: `tp, pp, dp = spec.degrees`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

DEGREES = ("tp", "pp", "dp")


@dataclass(frozen=True)
class ParallelDims:
    """Tensor (tp), pipeline (pp) and data (dp) parallel degrees; world size is their product."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in DEGREES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number (got {value!r})")
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")

    @property
    def world_size(self) -> int:
        """Rank processes the mesh needs: tp * pp * dp."""
        return self.tp * self.pp * self.dp

    def __iter__(self) -> Iterator[int]:
        yield self.tp
        yield self.pp
        yield self.dp
