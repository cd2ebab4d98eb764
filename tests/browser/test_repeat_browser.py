"""In real Chromium: Launch with Repeat 3 queues a comparison set; once its runs are done, Compare shows their
medians with intervals and says what three runs can and cannot tell; each run page says how loaded the machine was."""

from __future__ import annotations

import time

import pytest

from runner import api
from tests.browser.conftest import choose, screenshot, set_number, wait_for_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_repeat_three_from_launch_to_the_medians_on_compare(app_url, page, engine):
    page.goto(app_url)
    wait_for_app(page)
    page.get_by_text("No usable GPU").wait_for(timeout=30_000)  # the runner reported its devices
    choose(page, "strategy", "single")
    set_number(page, "repeat", 3)
    page.get_by_text("the median's interval has 75% confidence").wait_for(timeout=30_000)
    page.get_by_role("button", name="Launch", exact=True).click()
    page.get_by_text("Queued comparison set").wait_for(timeout=30_000)
    wait_for_app(page)
    screenshot(page, "launch-repeat")
    runs = api.list_runs(engine).sort_values("id")
    ids = [int(i) for i in runs["id"]]
    assert len(ids) == 3 and runs["strategy"].tolist() == ["single"] * 3
    assert {api.get_run(engine, i)["set_id"] for i in ids} == {ids[0]}
    deadline = time.monotonic() + 600  # three tiny runs one after another on a busy 2-core machine
    while not all(api.is_terminal(api.get_run(engine, i)["status"]) for i in ids):
        assert time.monotonic() < deadline, [api.get_run(engine, i)["status"] for i in ids]
        time.sleep(1.0)
    done = [api.get_run(engine, i) for i in ids]
    assert [r["status"] for r in done] == ["succeeded"] * 3, [r["error"] for r in done]
    # One at a time, in queue order: each started after the one before it had finished.
    assert all(a["finished_at"] <= b["started_at"] for a, b in zip(done, done[1:], strict=False))
    link = page.get_by_role("link", name="compare them").get_attribute("href")
    assert link == f"/compare?runs={','.join(map(str, ids))}"
    page.goto(app_url + link)  # (Streamlit opens a message's links in a new tab)
    wait_for_app(page)
    page.get_by_text("Medians of repeated runs, and what they resolve").wait_for(timeout=30_000)
    table = page.get_by_test_id("stTable").filter(has_text="tokens/s").first.inner_text()  # the medians' table
    assert "tokens/s" in table and "75%: 6 runs reach 95%" in table and "single · tp1 pp1 dp1" in table
    screenshot(page, "compare-repeats")
    page.goto(f"{app_url}/history?run={ids[0]}")
    wait_for_app(page)
    page.get_by_text("of the job's cores during its timed steps").first.wait_for(timeout=30_000)
    screenshot(page, "run-detail-load")
