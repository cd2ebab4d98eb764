"""The CLI under 1,000 generated specs: each is queued (exit 0, runnable) or refused (exit 2, every problem
named), never a crash. In-process calls of the real entry point against a temporary database."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import api
from runner.__main__ import main
from runner.spec.run_spec import RunSpec
from runner.spec.strategies import strategy_names
from runner.spec.validation import validate_spec
from storage.db import get_engine
from tests.test_spec import spec_values

junk = st.one_of(
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
spec_json = st.one_of(
    spec_values.map(json.dumps),  # well-typed fields with out-of-range and unknown values
    st.dictionaries(st.sampled_from(["tp", "pp", "strategy", "batch", "colour", "verify", "tags"]), junk, max_size=4).map(json.dumps),
    st.text(max_size=30),  # not JSON at all
)  # fmt: skip


def test_a_thousand_generated_specs_are_queued_or_refused_with_messages(lab_home, capsys):
    engine = get_engine()

    @settings(
        max_examples=1000,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(text=spec_json)
    def check(text):
        before = api.count_runs(engine)
        try:
            strategy = json.loads(text).get("strategy", "single")
        except (ValueError, AttributeError):
            strategy = "single"
        if not isinstance(strategy, str) or strategy not in strategy_names():
            strategy = "single"  # argparse refuses unknown choices itself (tested in test_cli)
        code = main(["submit", "--strategy", strategy, f"--spec-json={text}", "--json"])
        out = capsys.readouterr().out
        reply = json.loads(out)
        if code == 0:
            run = api.get_run(engine, reply["id"])
            assert run["status"] == "queued"
            assert validate_spec(RunSpec.from_dict(run["spec"])) == []  # queued means runnable
            assert api.count_runs(engine) == before + 1
        else:
            assert code == 2, out
            assert reply["problems"] and all(p["field"] and p["message"] for p in reply["problems"])
            assert api.count_runs(engine) == before  # nothing queued

    check()
