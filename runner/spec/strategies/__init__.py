"""The parallel strategies, one file each, registered in the order the app lists them.

Adding a strategy: write runner/spec/strategies/<name>.py registering one `Strategy`, and import it below.
"""

from runner.spec.strategies.dims import DEGREES, ParallelDims
from runner.spec.strategies.registry import (
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
from runner.spec.strategies import single  # noqa: F401, E402
from runner.spec.strategies import layer  # noqa: F401, E402
from runner.spec.strategies import tensor  # noqa: F401, E402
from runner.spec.strategies import pipeline  # noqa: F401, E402
from runner.spec.strategies import data  # noqa: F401, E402
from runner.spec.strategies import three_d  # noqa: F401, E402
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
