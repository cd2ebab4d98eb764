"""pipeline: stages of consecutive layers over pp ranks, fed with microbatches on a GPipe or 1F1B schedule."""

from runner.spec.strategies.registry import Strategy, register

PIPELINE = register(
    Strategy(
        name="pipeline",
        help="stages of layers fed with microbatches, GPipe or 1F1B schedule",
        degrees=("pp",),
        options=("microbatches", "schedule", "virtual_stages"),
        min_degree={"pp": 2},
    )
)
