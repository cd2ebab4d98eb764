"""In real Chromium at 1400 x 1000: the Planner answers first (the recommendation in the first screen, above the
inputs), and a pipeline of 192 microbatches is drawn a window at a time."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import choose, fill_fields, screenshot, wait_for_app
from tests.test_planner_ui import calibrated

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_the_planner_answers_first_and_windows_a_long_pipeline(app_url, page, engine):
    calibrated(engine)  # this host measured already: the page does not calibrate it first
    page.goto(f"{app_url}/planner")
    wait_for_app(page)
    answer = page.get_by_text("Recommended:").first
    answer.wait_for(timeout=60_000)
    page.get_by_text("This host:").wait_for(timeout=60_000)  # the whole page drawn, to its launch section
    wait_for_app(page)
    box = answer.bounding_box()
    assert box is not None and box["y"] + box["height"] < 1000, box  # in the first screen, unscrolled
    assert box["y"] < page.get_by_text("Model and workload").bounding_box()["y"]
    screenshot(page, "planner")
    # GPT-3 175B on 512 H100 trained as the guide does: microbatches of one sequence, hundreds of them a stage
    choose(page, "model", "gpt3-175b")
    fill_fields(page, {"GPUs": "512", "global batch": "1536", "sequence": "2048", "activation checkpointing": "blocks"})
    page.get_by_text("microbatch passes a stage are too many to read at once").wait_for(timeout=120_000)
    expect(page.get_by_text("window from (ms)")).to_be_visible(timeout=30_000)  # the slider that moves the window
    screenshot(page, "planner-512")
