"""The strategy registry: names and order, ParallelDims, and that a strategy is one file plus one entry.

A throwaway strategy registered from a temporary module must reach spec validation, the launch form and
the CLI's names without touching any other file; every registered builder must resolve to a function.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import runner.spec.run_spec
import ui.forms
from runner.spec.run_spec import RunSpec
from runner.spec.strategies import (
    NEUTRAL,
    ParallelDims,
    Strategy,
    build,
    get_strategy,
    load_builder,
    register,
    registered,
    strategy_names,
    unregister,
)
from runner.spec.validation import validate_spec

ORDER = ("single", "layer", "tensor", "pipeline", "data", "3d")


def test_the_registry_lists_the_six_strategies_in_order():
    assert strategy_names() == ORDER
    assert runner.spec.run_spec.STRATEGIES == ORDER
    assert [get_strategy(n).name for n in ORDER] == list(ORDER)
    assert all(get_strategy(n).help.strip() and "\n" not in get_strategy(n).help for n in ORDER)


def test_each_strategy_says_what_it_uses():
    uses = {n: (get_strategy(n).degrees, get_strategy(n).options) for n in ORDER}
    assert uses == {
        "single": ((), ("microbatches",)),  # gradient accumulation
        "layer": (("pp",), ()),
        "tensor": (("tp",), ("microbatches", "tp_style", "sequence_parallel")),
        "pipeline": (("pp",), ("microbatches", "schedule", "virtual_stages")),
        "data": (("dp",), ("microbatches", "zero_stage")),
        "3d": (("tp", "pp", "dp"), ("microbatches", "schedule", "virtual_stages", "tp_style", "sequence_parallel",
                                     "zero_stage")),
    }
    assert {n: get_strategy(n).min_degree for n in ORDER} == {
        "single": {}, "layer": {"pp": 2}, "tensor": {"tp": 2}, "pipeline": {"pp": 2}, "data": {"dp": 2}, "3d": {}
    }  # fmt: skip


def test_one_file_per_strategy():
    folder = Path(runner.spec.run_spec.__file__).parent / "strategies"
    files = {p.stem for p in folder.glob("*.py")} - {"__init__", "registry", "dims"}
    assert files == {"single", "layer", "tensor", "pipeline", "data", "three_d"}
    assert {inspect.getmodule(get_strategy(n).check).__name__ for n in ("tensor",)} == {"runner.spec.strategies.tensor"}


def test_an_unknown_strategy_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_strategy("zero")
    assert str(err.value) == "'zero' is not a strategy; choose one of single, layer, tensor, pipeline, data, 3d"
    with pytest.raises(ValueError, match="not a strategy"):
        unregister("zero")


def test_parallel_dims_are_checked_when_built():
    dims = ParallelDims(tp=2, pp=3, dp=4)
    assert dims.world_size == 24 and tuple(dims) == (2, 3, 4)
    tp, pp, dp = dims
    assert (tp, pp, dp) == (2, 3, 4)
    assert ParallelDims() == ParallelDims(1, 1, 1) and ParallelDims().world_size == 1
    assert len({ParallelDims(pp=2), ParallelDims(pp=2)}) == 1  # frozen, hashable
    with pytest.raises(ValueError, match=r"^tp must be >= 1 \(got 0\)$"):
        ParallelDims(tp=0)
    with pytest.raises(ValueError, match=r"^dp must be >= 1 \(got -2\)$"):
        ParallelDims(dp=-2)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(ValueError, match="pp must be a whole number"):
            ParallelDims(pp=bad)


def test_spec_degrees_come_from_the_strategy():
    spec = RunSpec(strategy="3d", tp=2, pp=2, dp=2)
    assert spec.degrees == ParallelDims(2, 2, 2) and spec.world_size == 8
    assert RunSpec(strategy="tensor", tp=4, pp=3).degrees == ParallelDims(tp=4)
    assert RunSpec(strategy="pipeline", pp=2).uses_microbatches and not RunSpec(strategy="layer").uses_microbatches


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"degrees": ("xp",)}, "'xp' is not a degree"),
        ({"options": ("zigzag",)}, "'zigzag' is not an option"),
        ({"min_degree": {"tp": 2}}, "min_degree tp=2 must name a degree it uses"),
        ({"builder": "runner.gpt.build.build_parallel_gpt"}, "builder must be 'module:function'"),
        ({"help": " "}, "needs a one-line help text"),
    ],
)
def test_a_malformed_strategy_is_refused_when_declared(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        Strategy(**{"name": "odd", "help": "odd", "degrees": ("pp",), **changes})


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="'layer' is already registered"):
        register(Strategy(name="layer", help="again", degrees=("pp",)))
    assert strategy_names() == ORDER


THROWAWAY = '''
"""zigzag: a throwaway strategy for a test: pp stages, microbatches, needs an even pp."""

from runner.spec.strategies.registry import Strategy, register


def check(spec, add):
    if spec.pp % 2:
        add("pp", "zigzag needs an even pp; set pp to an even number")


ZIGZAG = register(
    Strategy(
        name="zigzag",
        help="stages placed back and forth over the ranks",
        degrees=("pp",),
        options=("microbatches",),
        min_degree={"pp": 2},
        check=check,
        builder="tests.test_strategies:fake_builder",
    )
)
'''


def fake_builder(spec, mesh, device, dtype):
    return ("built", spec.strategy, mesh, device, dtype)


def test_adding_a_strategy_is_one_file_and_every_reader_picks_it_up(tmp_path, monkeypatch):
    (tmp_path / "zigzag_strategy.py").write_text(textwrap.dedent(THROWAWAY))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        __import__("zigzag_strategy")  # the one entry: an import line in runner/spec/strategies/__init__.py
        assert strategy_names() == (*ORDER, "zigzag")
        assert runner.spec.run_spec.STRATEGIES == (*ORDER, "zigzag")  # what the CLI offers
        assert ui.forms.STRATEGY_HELP["zigzag"] == "stages placed back and forth over the ranks"
        assert ui.forms.uses("zigzag", "pp") and ui.forms.uses("zigzag", "microbatches")
        assert not ui.forms.uses("zigzag", "tp") and not ui.forms.uses("zigzag", "schedule")

        good = RunSpec(strategy="zigzag", pp=4, microbatches=2, batch=8)
        assert validate_spec(good) == [] and good.world_size == 4 and good.uses_microbatches
        assert tuple(good.degrees) == (1, 4, 1)
        problems = [(p.field, p.message) for p in validate_spec(RunSpec(strategy="zigzag", pp=1, dp=2))]
        assert problems == [
            ("dp", "strategy 'zigzag' does not use dp; set dp to 1 or pick a strategy that uses it (data, 3d)"),
            (
                "pp",
                "strategy 'zigzag' needs at least 2 ranks in pp (got 1); set pp to 2 or more, or use strategy 'single'",
            ),
            ("pp", "zigzag needs an even pp; set pp to an even number"),  # its own rule
        ]
        assert {p.field for p in validate_spec(RunSpec(strategy="zigzag", pp=2, microbatches=3, batch=8))} == {
            "microbatches"
        }  # it uses microbatches: 8 rows do not split into 3
        six = {"model": "custom", "n_layer": 6, "n_head": 4, "n_embd": 64, "vocab_size": 100, "block_size": 64}
        (odd,) = validate_spec(RunSpec(strategy="zigzag", pp=3, **six))  # 6 layers divide by 3; only its rule objects
        assert (odd.field, odd.message) == ("pp", "zigzag needs an even pp; set pp to an even number")
        # The form sets what zigzag does not use neutral and keeps what it does.
        spec, problems = ui.forms.spec_from_form({"strategy": "zigzag", "pp": 2, "tp": 4, "microbatches": 2})
        assert problems == [] and (spec.tp, spec.pp, spec.microbatches) == (1, 2, 2)
        # The rank process builds it through the registry.
        assert build(good, "mesh", "cpu", "float32") == ("built", "zigzag", "mesh", "cpu", "float32")
        for name, neutral in NEUTRAL.items():
            assert getattr(RunSpec(strategy="zigzag"), name) == neutral
    finally:
        if "zigzag" in strategy_names():
            unregister("zigzag")
        sys.modules.pop("zigzag_strategy", None)
    assert strategy_names() == ORDER
    (problem,) = validate_spec(RunSpec(strategy="zigzag", pp=2))
    assert problem.field == "strategy" and "'zigzag' is not a strategy" in problem.message


def test_registered_is_a_context_for_tests():
    with registered(Strategy(name="tmp", help="for a moment", degrees=("dp",))):
        assert strategy_names()[-1] == "tmp" and RunSpec(strategy="tmp", dp=3, batch=9).world_size == 3
    assert strategy_names() == ORDER


@pytest.mark.parametrize("name", ORDER)
def test_every_builder_resolves_to_a_function_taking_spec_mesh_device_dtype(name):
    fn = load_builder(get_strategy(name))  # imports torch: fine in a test, never in the app
    assert callable(fn) and list(inspect.signature(fn).parameters) == ["spec", "mesh", "device", "dtype"]


def test_the_registry_spec_and_form_import_no_torch():
    code = "import sys, runner.spec.strategies, runner.spec.run_spec, runner.spec.validation, runner.spec.estimates, ui.forms; "
    code += "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
