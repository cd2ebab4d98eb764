"""The strategy registry: what each parallel strategy is (degrees, options, help, rules, builder), torch-free.

Every reader of "what a strategy is" asks here: the spec (world size, degrees, validation), the launch form
(which fields to enable), the CLI (choices and help) and the rank process (`build`). One file per strategy
in this package registers one `Strategy`; `runner/spec/strategies/__init__.py` imports them in order.

Fields a strategy does not use must keep their neutral value (`NEUTRAL`); `schedule` and `tp_style` have
none: a strategy that does not use them ignores them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runner.spec.strategies.dims import DEGREES, ParallelDims

if TYPE_CHECKING:
    from runner.spec.run_spec import RunSpec

OPTIONS = ("microbatches", "schedule", "virtual_stages", "tp_style", "sequence_parallel", "zero_stage")
# The value a field must keep when the strategy does not use it (the RunSpec default too).
NEUTRAL: dict[str, Any] = {"tp": 1, "pp": 1, "dp": 1, "microbatches": 1, "virtual_stages": 1,
                           "sequence_parallel": False, "zero_stage": 0}  # fmt: skip

Add = Callable[[str, str], None]  # add(field, message): report one problem


def _no_rules(spec: RunSpec, add: Add) -> None:
    """The default `check`: a strategy with no rules beyond its degrees and options."""


@dataclass(frozen=True)
class Strategy:
    """One parallel strategy: what it uses, what it needs, and which function builds a rank's model for it."""

    name: str  # "single", "layer", "tensor", "pipeline", "data", "3d"
    help: str  # one line: form caption, CLI help, docs
    degrees: tuple[str, ...]  # which of ("tp", "pp", "dp") it uses
    options: tuple[str, ...] = ()  # other spec fields it uses, among OPTIONS
    min_degree: dict[str, int] = field(default_factory=dict)  # e.g. {"pp": 2}; validate_spec names the fix
    check: Callable[[RunSpec, Add], None] = _no_rules  # strategy-specific rules: add(field, message)
    builder: str = "runner.gpt.build:build_parallel_gpt"  # "module:function", imported in rank processes only

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip():
            raise ValueError(f"a strategy needs a name without surrounding spaces (got {self.name!r})")
        if not self.help.strip():
            raise ValueError(f"strategy {self.name!r} needs a one-line help text")
        for d in self.degrees:
            if d not in DEGREES:
                raise ValueError(f"strategy {self.name!r}: {d!r} is not a degree; degrees are {', '.join(DEGREES)}")
        for o in self.options:
            if o not in OPTIONS:
                raise ValueError(f"strategy {self.name!r}: {o!r} is not an option; options are {', '.join(OPTIONS)}")
        for d, n in self.min_degree.items():
            if d not in self.degrees or n < 1:
                raise ValueError(f"strategy {self.name!r}: min_degree {d}={n} must name a degree it uses, at least 1")
        module, _, function = self.builder.partition(":")
        if not module or not function:
            raise ValueError(f"strategy {self.name!r}: builder must be 'module:function' (got {self.builder!r})")

    def uses(self, field: str) -> bool:
        """Whether this strategy reads `field` (one of its degrees or options)."""
        return field in self.degrees or field in self.options

    def dims(self, spec: RunSpec) -> ParallelDims:
        """The spec's degrees as this strategy lays ranks out: the ones it does not use are 1."""
        return ParallelDims(**{d: getattr(spec, d) for d in self.degrees})


_REGISTRY: dict[str, Strategy] = {}


def register(s: Strategy) -> Strategy:
    """Add a strategy (after those registered before it); a second one of the same name is refused."""
    if s.name in _REGISTRY:
        raise ValueError(f"strategy {s.name!r} is already registered")
    _REGISTRY[s.name] = s
    return s


def unregister(name: str) -> None:
    """Remove a registered strategy (tests that register a throwaway one)."""
    get_strategy(name)
    del _REGISTRY[name]


@contextmanager
def registered(s: Strategy) -> Iterator[Strategy]:
    """Register `s` for the duration of a with-block (tests)."""
    register(s)
    try:
        yield s
    finally:
        unregister(s.name)


def get_strategy(name: str) -> Strategy:
    """The registered strategy of that name; ValueError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"{name!r} is not a strategy; choose one of {', '.join(_REGISTRY)}") from None


def strategy_names() -> tuple[str, ...]:
    """Registered strategy names in registration order: single, layer, tensor, pipeline, data, 3d."""
    return tuple(_REGISTRY)


def users_of(field: str) -> tuple[str, ...]:
    """Names of the strategies that use `field`, in registration order."""
    return tuple(s.name for s in _REGISTRY.values() if s.uses(field))


def load_builder(s: Strategy) -> Callable[..., Any]:
    """Import the strategy's builder function (imports torch: rank processes and tests only)."""
    module, _, function = s.builder.partition(":")
    return getattr(importlib.import_module(module), function)


def build(spec: RunSpec, mesh: Any, device: Any, dtype: Any) -> Any:
    """This rank's ParallelGPT for `spec`: imports the strategy's builder lazily and calls it."""
    return load_builder(get_strategy(spec.strategy))(spec, mesh, device, dtype)
