"""In real Chromium at 1400 px: a tensor-parallel run's page shows its tables whole (verify's bounds, what each rank
held and where its time went), and History lists its verdict."""

from __future__ import annotations

import pytest

from runner import api
from runner.spec.run_spec import RunSpec
from storage.models import TERMINAL_STATES
from tests.browser.conftest import screenshot, wait_for_app
from tests.browser.test_compare_browser import CUT_CELLS
from tests.jobs import wait_status as wait_run

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_tensor_parallel_runs_page_shows_every_table_whole(app_url, page, engine):
    page.goto(app_url)
    wait_for_app(page)
    run_id = api.submit(engine, RunSpec(strategy="tensor", tp=2, model="tiny", steps=3, verify=True))
    assert wait_run(engine, run_id, set(TERMINAL_STATES))["status"] == "succeeded"
    page.goto(f"{app_url}/history?run={run_id}")
    wait_for_app(page)
    page.get_by_text("Verify: PASS").wait_for(timeout=30_000)
    page.get_by_text("n/a: judged by max abs diff").wait_for(timeout=30_000)  # the weights' relative difference
    assert page.locator('[data-testid="stTable"]').count() == 3  # verify, what each rank held, where time went
    assert page.evaluate(CUT_CELLS) == []
    screenshot(page, "run-detail-tensor")
    page.goto(f"{app_url}/history")
    wait_for_app(page)
    page.get_by_text("Throughput per run").wait_for(timeout=30_000)
    screenshot(page, "history")
