"""In real Chromium, against the real two-node Slurm cluster (tests/slurm_cluster.py) and a Slurm runner process
(`python -m runner serve --backend slurm --partition lab --host slurm-lab`), as the README tells a person to:
pick the partition under "run on", see a layout that splits tensor parallelism over nodes refused at its field
with Launch disabled, then launch a 2-node pipeline run and find it finished with every rank's node (n1 and n2)
in its per-rank table, and in History beside a run of this machine's own runner."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner import api
from runner.service.logs import read_log
from runner.spec.run_spec import RunSpec
from storage.models import TERMINAL_STATES
from tests.browser.conftest import REPO, choose, kill_group, screenshot, set_number, wait_for_app
from tests.jobs import wait_status

pytestmark = [pytest.mark.browser, pytest.mark.slow]
pytest_plugins = ["tests.slurm_cluster"]

SLURM_HOST = "slurm-lab"


@pytest.fixture
def slurm_runner(slurm_cluster, lab_home, engine):
    """A Slurm runner for partition `lab` serving this test's database as host slurm-lab, in a session of its
    own; stopped (and the cluster's jobs cancelled) at teardown."""
    env = slurm_cluster.env({**os.environ, "LAB_HOME": str(lab_home), "PYTHONPATH": str(REPO)})
    env.pop("LAB_HOST", None)
    log_path = lab_home.parent / "slurm-runner.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "serve", "--backend", "slurm", "--partition", slurm_cluster.partition,
             "--host", SLURM_HOST],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (api.runner_status(engine, SLURM_HOST) or {}).get("cluster"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        yield proc
    finally:
        kill_group(proc.pid)
        slurm_cluster.cancel_all()


def test_launch_a_two_node_run_on_the_slurm_partition_from_the_page(slurm_cluster, slurm_runner, app_url, page, engine):
    from playwright.sync_api import expect  # the `page` fixture skips when Playwright is missing

    page.goto(app_url)  # the app starts this machine's runner
    wait_for_app(page)
    # A local run beside it (this machine's runner, one process): History lists both.
    local = api.submit(engine, RunSpec(strategy="single", steps=1, warmup=0))
    # The box names the partition; what it offers is said in a caption under it (the idle count changes).
    choose(page, "run on", re.compile(r"^Slurm partition lab \(slurm-lab\)$"))
    page.get_by_text(re.compile(r"2 nodes x \d+ CPUs, no GPUs, 2 idle")).first.wait_for(timeout=30_000)
    # a number of nodes only means something on a partition
    expect(page.get_by_role("spinbutton", name="nodes", exact=True)).to_be_enabled(timeout=30_000)
    choose(page, "strategy", "tensor")
    set_number(page, "nodes", 2)
    # tp=2 on two nodes of one rank each: the pair would span both nodes
    message = page.get_by_text("tensor parallelism must stay within a node: tp=2 does not divide the 1 ranks per node")
    message.wait_for(timeout=30_000)
    expect(page.get_by_role("button", name="Launch", exact=True)).to_be_disabled(timeout=30_000)  # waits for the rerun
    screenshot(page, "slurm-launch-invalid")
    choose(page, "strategy", "pipeline")
    set_number(page, "timed steps", 2)
    page.get_by_text("#SBATCH --nodes=2").wait_for(timeout=30_000)  # the job the Slurm runner will submit
    screenshot(page, "slurm-launch")
    page.get_by_role("button", name="Launch", exact=True).click()
    page.wait_for_url(re.compile(r"history\?run=\d+"), timeout=30_000)
    run_id = int(re.search(r"run=(\d+)", page.url).group(1))
    run = wait_status(engine, run_id, set(TERMINAL_STATES), timeout=240)
    assert (run["status"], run["backend"], run["runner_host"], run["spec"]["nodes"]) == (
        "succeeded", "slurm", SLURM_HOST, 2), (run["error"], read_log(Path(run["run_dir"]), "torchrun"))  # fmt: skip
    page.get_by_text("succeeded").first.wait_for(timeout=30_000)  # the page follows the run to its end by itself
    page.get_by_text("Verify: PASS").wait_for(timeout=30_000)
    wait_for_app(page)
    # The per-rank tables name both nodes (HTML tables, so no cell is cut).
    cells = page.get_by_test_id("stTable").locator("td")
    for node in ("n1", "n2"):
        cells.filter(has_text=re.compile(f"^{node}$")).first.wait_for(state="attached", timeout=30_000)
    screenshot(page, "slurm-run")
    assert wait_status(engine, local, set(TERMINAL_STATES), timeout=120)["status"] == "succeeded"
    assert api.get_run(engine, local)["backend"] == "local"
    page.goto(f"{app_url}/history")
    wait_for_app(page)
    page.get_by_text("2 runs match the filters").wait_for(timeout=30_000)
    cells = page.get_by_test_id("stDataFrame").first.locator('[role="gridcell"]')
    for strategy in ("pipeline", "single"):  # the Slurm run and the local one, one table
        cells.filter(has_text=re.compile(f"^{strategy}$")).first.wait_for(state="attached", timeout=30_000)
    screenshot(page, "slurm-history")
