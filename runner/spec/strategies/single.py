"""single: the whole model on one device, the reference every other strategy is checked against."""

from runner.spec.strategies.registry import Strategy, register

SINGLE = register(
    Strategy(
        name="single",
        help="the whole model on one device: the reference every other strategy is checked against",
        degrees=(),
        options=("microbatches",),
    )
)
