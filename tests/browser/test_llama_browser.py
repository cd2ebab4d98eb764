"""In real Chromium: a Hugging Face Llama folder on the Launch page (its config.json's shape shown, launched, verified)
and a Llama preset on the Planner page."""

from __future__ import annotations

import re

import pytest

from runner import api
from tests.browser.conftest import screenshot, wait_for_app
from tests.test_planner_ui import calibrated

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label`."""
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()
    wait_for_app(page)


def test_a_hugging_face_folder_is_launched_from_the_page_and_verified(app_url, page, engine, tmp_path):
    from tests.test_llama import _hf_folder

    folder = tmp_path / "hf-llama"
    _hf_folder(folder)
    page.goto(app_url)
    wait_for_app(page)
    page.get_by_text("No usable GPU").wait_for(timeout=30_000)
    choose(page, "model", "checkpoint")
    weights = page.get_by_role("textbox", name="weights (optional)")
    weights.fill(str(folder))
    weights.press("Enter")
    wait_for_app(page)
    page.get_by_text("config.json: llama family: 4 layers, 4 heads, 2 key/value heads, width 64, MLP 176").wait_for()
    screenshot(page, "launch-llama-folder")
    page.get_by_role("button", name="Launch", exact=True).click()
    page.wait_for_url(re.compile(r"history\?run=\d+"), timeout=30_000)
    page.get_by_text("Verify: PASS").wait_for(timeout=180_000)
    (run,) = api.list_runs(engine).to_dict("records")
    spec = api.get_run(engine, int(run["id"]))["spec"]
    assert (spec["model"], spec["weights"], run["status"]) == ("checkpoint", str(folder), "succeeded")


def test_the_planner_plans_llama_3_1_70b(app_url, page, engine):
    calibrated(engine)  # this host measured already: the page does not calibrate it first
    page.goto(f"{app_url}/planner")
    wait_for_app(page)
    choose(page, "model", "llama-3.1-70b")
    page.get_by_text("llama family: 80 layers, 64 heads, 8 key/value heads, width 8192, MLP 28672").wait_for()
    screenshot(page, "planner-llama-70b")
