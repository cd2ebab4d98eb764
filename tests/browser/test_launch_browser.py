"""In real Chromium: launch a layer split from the page, watch it finish, see it in history; bad input blocks launch."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from runner import api
from tests.browser.conftest import screenshot, wait_for_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_launch_a_layer_split_from_the_page_and_see_it_succeed(app_url, page, engine):
    page.goto(app_url)
    wait_for_app(page)
    page.get_by_text("Launch a run").wait_for()
    page.get_by_text("No usable GPU").wait_for(timeout=30_000)  # the runner reported its devices
    # and "run on", drawn while the runner was starting, now says what the sidebar says
    page.get_by_text("Runner alive").wait_for(timeout=30_000)
    page.get_by_text("CPU only (gloo)", exact=True).wait_for(timeout=10_000)  # the caption under "run on"
    assert page.get_by_text("runner not reporting").count() == 0
    expect(page.get_by_role("combobox", name="run on")).to_have_value(re.compile(r"^this machine \(.+\)$"))
    screenshot(page, "launch")
    page.get_by_role("button", name="Launch", exact=True).click()
    # The run's page opens at once, the run still queued: its live part re-reads the run by itself, sees the end
    # and redraws the whole page with the run's figures, no reload.
    page.wait_for_url(re.compile(r"history\?run=\d+"), timeout=30_000)
    page.get_by_text("succeeded").first.wait_for(timeout=120_000)
    page.get_by_text("throughput").first.wait_for(timeout=30_000)
    page.get_by_text("step time p50").first.wait_for(timeout=5_000)
    page.get_by_text("Run's peak memory per rank").wait_for(timeout=30_000)
    page.get_by_text("Verify: PASS").wait_for(timeout=30_000)  # the job's own verdict, not a label
    wait_for_app(page)
    screenshot(page, "run-detail")
    (run,) = api.list_runs(engine).to_dict("records")
    assert run["status"] == "succeeded" and run["strategy"] == "layer" and run["world_size"] == 2
    page.goto(f"{app_url}/history")
    wait_for_app(page)
    page.get_by_text("Throughput per run").wait_for(timeout=30_000)
    screenshot(page, "history")


def test_a_bad_degree_shows_its_message_and_queues_nothing(app_url, page, engine):
    # The first visit of this fresh server is a deep link: app.py must still run around the page.
    page.goto(f"{app_url}/history")
    wait_for_app(page)
    page.get_by_text("No runs yet").wait_for(timeout=30_000)
    page.get_by_text("Runner alive").wait_for(timeout=30_000)
    nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
    assert "Launch" in nav and "History" in nav and "app" not in nav.split(), nav
    expect(page.get_by_role("button", name="Launch a first tiny run")).to_be_visible(timeout=30_000)
    screenshot(page, "history-empty")
    page.goto(app_url)
    wait_for_app(page)
    pp = page.get_by_role("spinbutton", name="pp", exact=True)
    pp.fill("3")
    pp.press("Enter")
    wait_for_app(page)
    page.get_by_text("splitting the layers over 3 ranks needs n_layer divisible by 3").wait_for(timeout=30_000)
    expect(page.get_by_role("button", name="Launch", exact=True)).to_be_disabled(timeout=30_000)
    # A batch of 0 reaches the spec (no browser-side bound keeps it back) and is refused under its field
    batch = page.get_by_role("spinbutton", name="batch", exact=True)
    batch.fill("0")
    batch.press("Enter")
    wait_for_app(page)
    message = page.get_by_text("must be at least 1 (got 0)")
    message.wait_for(timeout=30_000)
    field, below = batch.bounding_box(), message.bounding_box()
    assert below["y"] > field["y"] and field["x"] - 60 <= below["x"] <= field["x"] + field["width"], (field, below)
    screenshot(page, "launch-invalid")
    launch = page.get_by_role("button", name="Launch", exact=True)
    expect(launch).to_be_disabled(timeout=30_000)
    launch.click(force=True)  # a click on the disabled button does nothing either
    wait_for_app(page)
    assert api.count_runs(engine) == 0


def test_a_shared_link_opened_first_after_start_gets_the_whole_app(app_url, page, engine):
    """Streamlit would run pages/history.py alone for a first request to /history; enter_through_app prevents that."""
    page.goto(f"{app_url}/history")
    wait_for_app(page)
    # The page first runs alone, then reruns through app.py; on a loaded machine the first run can finish
    # before the rerun starts, so wait for app.py's navigation rather than reading the sidebar once.
    nav = page.locator('[data-testid="stSidebarNav"]')
    page.wait_for_function(
        "() => { const n = document.querySelector('[data-testid=\"stSidebarNav\"]'); return n && n.innerText.includes('Launch'); }",
        timeout=30_000,
    )
    wait_for_app(page)
    text = nav.inner_text()
    assert "Launch" in text and "Compare" in text and "app" not in text.split()
