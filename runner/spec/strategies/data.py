"""data: dp replicas of the whole model, each on a slice of the batch, gradients all-reduced."""

from runner.spec.strategies.registry import Strategy, register

DATA = register(
    Strategy(
        name="data",
        help="dp replicas on slices of the batch, gradients all-reduced",
        degrees=("dp",),
        options=("microbatches", "zero_stage"),
        min_degree={"dp": 2},
    )
)
