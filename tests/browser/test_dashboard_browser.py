"""In real Chromium: watch a run live and cancel it from the Live page; compare two real runs and find the
figures, the guide's table and the measured pipeline timeline on the Compare page."""

from __future__ import annotations

import time

import psutil
import pytest

from runner import api
from runner.spec.run_spec import RunSpec
from storage import runner_rows
from storage.models import TERMINAL_STATES
from tests.browser.conftest import screenshot, wait_for_app
from tests.jobs import wait_status as wait_run

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_watch_a_run_live_and_cancel_it(app_url, page, engine):
    page.goto(app_url)  # the app starts the runner
    wait_for_app(page)
    slow = RunSpec(strategy="layer", pp=2, model="tiny", workload="train", steps=100_000)  # until cancelled
    run_id = api.submit(engine, slow)
    run = wait_run(engine, run_id, {"running"})
    page.goto(f"{app_url}/live")
    page.get_by_text("remaining").first.wait_for(timeout=60_000)  # the progress line of the running run
    page.get_by_text("--- rank 1").wait_for(timeout=30_000)  # log tails of both ranks
    screenshot(page, "live")
    pids = [p.pid for p in psutil.Process(runner_rows.running_runs(engine)[0]["pid"]).children(recursive=True)]
    page.get_by_role("button", name="Cancel").first.click()
    run = wait_run(engine, run_id, set(TERMINAL_STATES), timeout=30)
    assert run["status"] == "cancelled"
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    page.get_by_text("Nothing is running or queued").wait_for(timeout=30_000)


def test_compare_two_real_runs(app_url, page, engine):
    page.goto(app_url)
    wait_for_app(page)
    a = api.submit(engine, RunSpec(strategy="layer", pp=2, model="tiny", steps=2))
    b = api.submit(engine, RunSpec(strategy="pipeline", pp=2, microbatches=4, model="tiny", steps=2))
    for run_id in (a, b):
        assert wait_run(engine, run_id, set(TERMINAL_STATES))["status"] == "succeeded"
    page.goto(f"{app_url}/compare?runs={a},{b}")
    wait_for_app(page)
    page.get_by_text("The guide's comparison table, measured").wait_for(timeout=30_000)
    page.get_by_text(f"#{b} pipeline: step").wait_for(timeout=30_000)  # the measured timeline's title
    page.get_by_text("theory (p-1)/(m+p-1)").first.wait_for(timeout=30_000)
    page.get_by_text("Settings that differ").wait_for()
    assert page.locator('[data-testid="stVegaLiteChart"]').count() >= 4
    screenshot(page, "compare")
