"""The parallel strategies, one file each, registered in the order the app lists them.

Adding a strategy: write runner/strategies/<name>.py registering one `Strategy`, and import it below.
"""

from runner.strategies.dims import DEGREES, ParallelDims
from runner.strategies.registry import (
    NEUTRAL,
    OPTIONS,
    Strategy,
    build,
    get_strategy,
    load_builder,
    register,
    registered,
    strategy_names,
    unregister,
    users_of,
)

# Import order is the order strategy_names() lists them in.
# isort: off
from runner.strategies import single  # noqa: F401, E402
from runner.strategies import layer  # noqa: F401, E402
from runner.strategies import tensor  # noqa: F401, E402
from runner.strategies import pipeline  # noqa: F401, E402
from runner.strategies import data  # noqa: F401, E402
from runner.strategies import three_d  # noqa: F401, E402
# isort: on

__all__ = [
    "DEGREES",
    "NEUTRAL",
    "OPTIONS",
    "ParallelDims",
    "Strategy",
    "build",
    "get_strategy",
    "load_builder",
    "register",
    "registered",
    "strategy_names",
    "unregister",
    "users_of",
]
