"""The Planner page's state across edits, under Streamlit's AppTest: what it draws after an input changes is what
a page opened with the new inputs draws, its pickers follow the new plan, and it starts where `runner plan` does."""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest

from tests.test_planner_ui import REPO, calibrated, plan_args


def test_an_edit_redraws_the_timeline_and_the_launch_choice_from_the_new_inputs(engine):
    """Streamlit's selectbox returns the object it returned before while that object's label is still offered: a
    plan's layouts as options kept drawing (and launching) a layout judged on the batch before the edit. After an
    edit the page reads exactly as a page opened with the edited inputs."""
    calibrated(engine)

    def shown(at):
        return ([c.value for c in at.caption], at.selectbox(key="planner_sim_choice").value,
                at.selectbox(key="planner_launch_choice").options)  # fmt: skip

    edited = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()
    before = shown(edited)
    edited.number_input(key="planner_batch").set_value(64).run()
    fresh = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60)
    fresh.session_state["planner_batch"] = 64
    fresh.run()
    assert not edited.exception and not fresh.exception
    # the timeline says what its step leaves out of the table's (the data-parallel reduction of dp > 1 among them)
    assert any("passes, messages and the bubble. The table's" in c for c in shown(edited)[0])
    assert shown(edited) == shown(fresh) != before


def test_the_timeline_follows_the_fastest_layout_until_the_user_picks_one(engine):
    """After an edit the timeline shows the new plan's fastest pipelined layout, not the one that was first before;
    a layout the user picked stays picked while the plan offers it."""
    calibrated(engine)
    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()
    sim = at.selectbox(key="planner_sim_choice")
    assert sim.value == sim.options[0]
    at.number_input(key="planner_count").set_value(512)  # the guide's GPT-3 175B, first at a batch of 8
    at.selectbox(key="planner_model").set_value("gpt3-175b").run()
    first_before = at.selectbox(key="planner_sim_choice").value
    at.number_input(key="planner_batch").set_value(1536)
    at.text_input(key="planner_ckpt").set_value("blocks").run()
    sim = at.selectbox(key="planner_sim_choice")
    assert first_before in sim.options and first_before != sim.options[0]  # (what a kept default would show)
    assert not at.exception and sim.value == sim.options[0]  # the new plan's first
    chosen = sim.options[2]
    sim.set_value(chosen).run()
    at.number_input(key="planner_seq").set_value(1024).run()
    assert chosen in at.selectbox(key="planner_sim_choice").options
    assert at.selectbox(key="planner_sim_choice").value == chosen



def test_the_page_and_runner_plan_start_from_the_same_defaults(engine, capsys):
    """Same inputs, same answer: the page once planned ZeRO 0 and 1 on up to 8 GPUs' layouts where the CLI planned
    ZeRO 0 on all 8 only, and they recommended different layouts for gpt2 on 8 H100s."""
    from runner.planner.cli import run_plan

    calibrated(engine)
    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()  # gpt2, 8 H100, batch 8
    assert run_plan(plan_args("--model", "gpt2", "--gpus", "8", "--gpu", "h100-80gb", "--json")) == 0
    cli = json.loads(capsys.readouterr().out)
    shown = at.dataframe[0].value
    assert [c["label"] for c in cli["feasible"]] == list(shown.layout.str.replace(" ★", "", regex=False))
    assert at.metric[0].value == cli["feasible"][0]["label"]


def test_the_page_and_runner_plan_take_the_same_default_sequence(capsys):
    """Llama 3.1 8B's context is 131,072: the CLI planned 8,192 positions where the page planned 1,024, so the same
    untouched inputs gave two answers. Both now take `default_seq`."""
    from runner.planner.cli import run_plan

    at = AppTest.from_file(str(REPO / "pages/planner.py"), default_timeout=60).run()
    at.selectbox(key="planner_model").set_value("llama-3.1-8b").run()
    page_seq = at.number_input(key="planner_seq").value
    assert run_plan(plan_args("--model", "llama-3.1-8b", "--gpus", "8", "--gpu", "h100-80gb", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["workload"]["seq"] == page_seq == 1024
