"""3d: tensor x pipeline x data parallelism on one device mesh, optionally sequence parallel (as tensor checks it)."""

from runner.spec.strategies.registry import Strategy, register
from runner.spec.strategies.tensor import check as sequence_parallel_check

THREE_D = register(
    Strategy(
        name="3d",
        help="tensor x pipeline x data on one device mesh",
        degrees=("tp", "pp", "dp"),
        options=("microbatches", "schedule", "virtual_stages", "tp_style", "sequence_parallel", "zero_stage"),
        check=sequence_parallel_check,
    )
)
