"""A real app for browser tests: `streamlit run` on a free port with its own LAB_HOME, and Debian's Chromium.

Follows Streamlit's own e2e pattern: poll /_stcore/health, then wait until the app element reports
its script is no longer running. Screenshots go to test-artifacts/ for a reviewer to look at.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from runner.service.launch import stop_group

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture
def app_url(lab_home, free_port):
    """`streamlit run app.py` in its own session on a free port; stopped with its runner and jobs at teardown."""
    env = {**os.environ, "LAB_HOME": str(lab_home), "PYTHONPATH": str(REPO)}
    log_path = lab_home.parent / "streamlit.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(free_port),
         "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{free_port}"
    try:
        wait_healthy(url, proc, log_path)
        yield url
    finally:
        stop_app_and_runner(proc, lab_home)
        log.close()


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    """Poll /_stcore/health until the server answers 200 (Streamlit's own e2e conftest does the same)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError("streamlit did not come up: " + log_path.read_text())
        time.sleep(0.2)


def kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left (zombies count as gone): the runner's own stop."""
    stop_group(pgid, grace_s)


def stop_app_and_runner(proc: subprocess.Popen, lab_home: Path) -> None:
    """Streamlit's group, then the runner it started and any job still running: each is its own session.

    The runner records its pid in the runner_lease table and every run its torchrun pid (= group id), so
    nothing is found by name and nothing of another test or user is touched.
    """
    import psutil

    from storage import hosts as leases
    from storage import runner_rows
    from storage.db import get_engine

    # A runner the app spawned moments ago may not hold its lease yet: it is still the app's child, in
    # a session of its own, so take the app's children before the app goes.
    spawned: list[int] = []
    with contextlib.suppress(psutil.Error):
        spawned = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    kill_group(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for pid in spawned:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:  # a session leader the app started (the runner): its whole group
                kill_group(pid)
    engine = get_engine()  # the test's LAB_HOME database (the lab_home fixture set the environment)
    status = leases.runner_status(engine)
    jobs = [r["pid"] for r in runner_rows.running_runs(engine) if r["pid"]]
    if status:
        kill_group(status["pid"])  # start_new_session: the runner's pid is its group id
    for pgid in jobs:  # a stopped runner leaves its jobs running on purpose (a new one adopts them)
        kill_group(pgid)


@pytest.fixture
def page():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield pg
        browser.close()


def wait_for_app(page, timeout_ms: int = 60_000) -> None:
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout_ms)


def screenshot(page, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main section, so grow the viewport to its height first."""
    size = page.viewport_size
    height = page.evaluate(
        '() => Math.max(...[...document.querySelectorAll(\'[data-testid="stMain"], [data-testid="stSidebar"]\')]'
        ".map(e => e.scrollHeight), window.innerHeight)"
    )
    page.set_viewport_size({"width": size["width"], "height": min(int(height), 6000)})
    page.wait_for_timeout(500)  # charts re-lay out to the new size
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def choose(page, label: str, option, tries: int = 4) -> None:
    """Pick `option` in the selectbox labelled `label` (Streamlit's baseweb select: open it, click the option).

    A rerun the last input started can begin after `wait_for_app` saw the app idle and redraw the select, closing
    its list before the option shows (the window widens on a loaded machine): then open it again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.get_by_test_id("stSelectbox").filter(has=page.get_by_text(label, exact=True))
    for attempt in range(tries):
        wait_for_app(page)
        box.click()
        try:
            page.get_by_role("option", name=option).click(timeout=15_000)
            break
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise
            page.keyboard.press("Escape")
    wait_for_app(page)


def set_number(page, label: str, value: int) -> None:
    fill_fields(page, {label: str(value)})


def fill_fields(page, values: dict[str, str], tries: int = 4) -> None:
    """Type each value into the input labelled with its key, then read them all back, typing again what a late
    rerun (started by an earlier input, redrawing the form after `wait_for_app` saw the app idle) put back."""
    for _ in range(tries):
        for label, value in values.items():
            box = page.get_by_label(label, exact=True)
            if box.input_value() != value:
                box.fill(value)
                box.press("Enter")
                wait_for_app(page)
        page.wait_for_timeout(500)  # room for a late rerun to start before the values are read back
        wait_for_app(page)
        if all(page.get_by_label(label, exact=True).input_value() == value for label, value in values.items()):
            return
    shown = {label: page.get_by_label(label, exact=True).input_value() for label in values}
    raise AssertionError(f"the form shows {shown} after {tries} tries, not {values}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed browser test reports what its page said (errors, warnings, tracebacks, the app's state) and leaves a
    screenshot: CI keeps only the printed output, and a timeout alone does not say what the page showed instead."""
    outcome = yield
    report = outcome.get_result()
    page = item.funcargs.get("page") if report.when == "call" and report.failed else None
    if page is None:
        return
    with contextlib.suppress(Exception):  # the report of the first failure matters more than this one's
        page.screenshot(path=str(ARTIFACTS / f"failed-{item.name}.png"), full_page=True)
        state = page.get_attribute('[data-testid="stApp"]', "data-test-script-state", timeout=2_000)
        said = page.locator('[data-testid="stException"], [data-testid="stAlert"], [data-testid="stCaptionContainer"]')
        texts = [t.strip()[:400] for t in said.all_inner_texts()]
        report.sections.append(("page at failure", f"script {state}; url {page.url}\n" + "\n".join(texts)))
