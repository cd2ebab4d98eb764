"""layer: consecutive layers per rank over pp ranks, the whole batch at a time (naive model parallelism)."""

from runner.spec.strategies.registry import Strategy, register

LAYER = register(
    Strategy(
        name="layer",
        help="consecutive layers per rank, whole batch at a time (the guide's 'model parallelism')",
        degrees=("pp",),
        min_degree={"pp": 2},
    )
)
