"""3d: tensor x pipeline x data parallelism on one device mesh (no sequence parallelism yet)."""

from runner.spec.strategies.registry import Strategy, register

THREE_D = register(
    Strategy(
        name="3d",
        help="tensor x pipeline x data on one device mesh",
        degrees=("tp", "pp", "dp"),
        options=("microbatches", "schedule", "virtual_stages", "tp_style", "zero_stage"),
    )
)
