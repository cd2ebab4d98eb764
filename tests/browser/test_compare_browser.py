"""In real Chromium at 1400 px: Compare's "Pick them" fills the selection (and keeps its panel open), and the
guide's comparison table shows every cell whole."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from playwright.sync_api import expect

from runner.spec.run_spec import RunSpec
from tests.browser.conftest import screenshot, wait_for_app
from tests.test_ui_compare import finished

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Every cell of the page's HTML tables against its box: the content's width over the width shown. A cut cell
# (or a table scrolled sideways) has scrollWidth > clientWidth; 1 px of slack for sub-pixel rounding.
CUT_CELLS = """() => [...document.querySelectorAll('[data-testid="stTable"]')].flatMap(t =>
    [t, ...t.querySelectorAll('th, td')].filter(e => e.scrollWidth > e.clientWidth + 1)
        .map(e => `${e.tagName} "${e.innerText}": ${e.scrollWidth} > ${e.clientWidth}`))"""


def test_pick_them_selects_the_best_of_each_strategy_and_the_guide_table_is_whole(app_url, page, engine):
    # Stored before the first page load starts the runner (nothing is queued for it to claim). The longest
    # labels the table meets: a 3D layout with its microbatches and schedule, and a tensor-parallel run.
    slow = finished(engine, RunSpec(strategy="single", model="tiny"), 400.0)
    ids = [
        finished(engine, RunSpec(strategy="single", model="tiny"), 900.0),
        finished(engine, RunSpec(strategy="tensor", tp=2, model="tiny"), 700.0),
        finished(engine, RunSpec(strategy="pipeline", pp=2, microbatches=4, model="tiny"), 800.0, spans=True),
        finished(engine, RunSpec(strategy="3d", tp=2, pp=2, dp=2, microbatches=4, model="tiny"), 600.0, spans=True),
    ]
    finished(engine, RunSpec(strategy="tensor", tp=2, model="tiny", workload="forward"), 5000.0)  # another workload
    page.goto(f"{app_url}/compare")
    wait_for_app(page)
    page.get_by_text("Choose runs above").wait_for(timeout=30_000)  # nothing chosen yet
    page.get_by_role("button", name="Pick them").click()
    address = "runs=" + ",".join(map(str, ids))
    page.wait_for_url(lambda url: unquote(url).endswith(address), timeout=30_000)
    wait_for_app(page)
    page.get_by_text("The guide's comparison table, measured").wait_for(timeout=30_000)
    # The selection is the picked runs, not the slower single run or the forward one, and it stays picked
    chips = page.locator('[data-testid="stMultiSelect"] [data-tag]').all_inner_texts()
    assert [int(re.match(r"#(\d+)", c).group(1)) for c in chips] == ids, chips
    assert slow not in ids
    expect(page.get_by_role("button", name="Pick them")).to_be_visible(timeout=30_000)  # the panel did not collapse
    page.wait_for_timeout(1000)
    assert unquote(page.url).endswith(address), page.url  # not emptied a moment later
    # the guide's table (the page's other static tables, such as the medians of repeated runs, have other columns)
    guide = page.locator('[data-testid="stTable"]').filter(has=page.get_by_text("vs unsharded", exact=True))
    rows = guide.locator("tbody tr")
    assert rows.count() == len(ids)
    assert "n/a: no pipeline" in rows.nth(0).inner_text()
    assert page.evaluate(CUT_CELLS) == []
    screenshot(page, "compare-picked")
