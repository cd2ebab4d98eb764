"""runner/planner/what_fits.py: when no layout fits, the settings that would make one fit, on the CLI and the page;
and what the recommendation's memory figure holds beyond its columns."""

from __future__ import annotations

import json
from dataclasses import replace

from streamlit.testing.v1 import AppTest

from runner.planner.devices import preset
from runner.planner.layouts import plan
from runner.planner.models import MODELS, Workload
from runner.planner.what_fits import changes, what_fits, what_fits_text
from tests.test_planner_ui import REPO, plan_args

SEVENTY_B = MODELS["llama-3.1-70b"]
WORK = Workload(batch=1024, seq=8192, dtype="bf16-mixed")  # the page's precision and ZeRO 0 and 1
H100_64 = preset("h100-80gb", 64, 8)


def test_each_change_is_planned_as_if_the_user_had_made_it():
    """Llama 3.1 70B on 64 H100 at 1,024 x 8,192, bf16-mixed, ZeRO 0 and 1: nothing fits (each replica's activations
    at 8,192 positions). Each change reported is a plan of its own whose fastest layout fits, and is that plan's
    best exactly: no second model of memory."""
    assert plan(SEVENTY_B, WORK, H100_64, (0, 1)).best is None
    offered = {c.words: c for c in changes(WORK, (0, 1))}
    assert set(offered) == {"microbatch_size 1", "checkpoint blocks", "sequence_parallel", "dtype bf16-master",
                            "ZeRO stages 0-3"}  # fmt: skip
    found = what_fits(SEVENTY_B, WORK, H100_64, (0, 1))
    assert found, "checkpointing alone makes a layout fit (README's example)"
    for words, best in found:
        change = offered[words]
        again = plan(SEVENTY_B, replace(WORK, **change.fields), H100_64, change.zero_stages or (0, 1)).best
        assert again is not None and best.layout == again.layout and best.memory.total <= H100_64.usable_bytes
    text = what_fits_text(found, "GPU")
    assert text.startswith("What would fit") and "checkpoint blocks: " in text


def test_nothing_fits_says_what_is_left_when_no_setting_helps():
    """70B on one H100: its bfloat16 weights alone are 141 GB; no setting of one GPU shards them."""
    one = preset("h100-80gb", 1)
    assert what_fits(SEVENTY_B, WORK, one, (0, 1)) == []
    assert what_fits_text([], "GPU").startswith("Nothing the planner counts makes a layout fit: more GPUs")


def test_the_cli_and_the_page_say_what_would_fit(capsys):
    from runner.planner.cli import run_plan

    argv = ("--model", "llama-3.1-70b", "--gpus", "64", "--gpu", "h100-80gb", "--seq", "8192", "--batch", "1024")
    assert run_plan(plan_args(*argv)) == 0
    assert "(no layout fits)" in (out := capsys.readouterr().out) and "\nWhat would fit (" in out
    assert run_plan(plan_args(*argv, "--json")) == 0
    shown = json.loads(capsys.readouterr().out)["what_fits"]
    assert {"checkpoint blocks"} <= {c["change"] for c in shown} and all(c["feasible"] for c in shown)
    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=120).run()
    at.selectbox(key="planner_model").set_value("llama-3.1-70b")
    at.number_input(key="planner_count").set_value(64)
    at.number_input(key="planner_batch").set_value(1024)
    at.number_input(key="planner_seq").set_value(8192).run()
    assert not at.exception and any("What would fit" in m.value for m in at.markdown), [e.value for e in at.error]


def test_the_recommendations_memory_notes_are_printed_with_it(capsys):
    """Under ZeRO-2 with microbatches the grads column shows the shard while the peak holds the whole gradients
    until the reduce-scatter: only the JSON said so, beside a column that seemed to contradict the total."""
    from runner.planner.cli import run_plan

    argv = ("--model", "llama-3.1-8b", "--gpus", "8", "--gpu", "h100-80gb", "--seq", "4096", "--batch", "256",
            "--zero", "2", "--microbatch-size", "1")  # fmt: skip
    assert run_plan(plan_args(*argv)) == 0
    out = capsys.readouterr().out
    assert "\nthe first row's memory: ZeRO-2/3 with microbatches: the full gradients exist until the reduce-scatter" in out
