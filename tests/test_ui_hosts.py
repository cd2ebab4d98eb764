"""A team database with several hosts, seen from the pages: Launch's "Run on" choice validated against the
target host's GPUs, the hosts alive with their devices, and logs of a run that ran on another host read
from the database (run page and Live page), under AppTest with a real database in a temporary LAB_HOME.

Two hosts are simulated as the storage tests do: this process acquires one runner lease per host name
(LAB_HOST names this machine), so the pages see exactly what two live runners would report.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from streamlit.testing.v1 import AppTest

from runner import api
from runner.service.logs import log_source, run_log
from runner.spec.run_spec import RunSpec
from storage import hosts as leases
from storage import runner_rows
from ui.hosts import HERE, devices_text, ran_on, targets, where_text

REPO = Path(__file__).resolve().parent.parent
H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * 2**30}
TWO_H100 = [H100, {**H100, "index": 1}]
NO_GPU = "no NVIDIA GPU: NVML lists no GPU and torch 2.13.0+cpu is a CPU-only build"  # what alpha's runner says


@pytest.fixture
def two_hosts(engine, monkeypatch):
    """alpha (this machine, no GPU) and beta (2 H100s), both with a live runner lease."""
    monkeypatch.setenv("LAB_HOST", "alpha")
    assert leases.acquire_lease(engine, "runner-alpha", os.getpid(), [], NO_GPU, host="alpha")
    assert leases.acquire_lease(engine, "runner-beta", os.getpid(), TWO_H100, "2 GPUs", host="beta")
    yield engine
    for runner_id in ("runner-alpha", "runner-beta"):
        leases.release_lease(engine, runner_id)


def page(path: str, **query) -> AppTest:
    at = AppTest.from_file(str(REPO / path), default_timeout=30)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def make_silent(engine, host: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE runner_lease SET heartbeat_at = :t WHERE host = :h"),
                     {"t": datetime.now(UTC) - timedelta(hours=1), "h": host})  # fmt: skip


# ---- the choice as data ----------------------------------------------------------------------
def test_targets_offer_this_machine_each_other_live_host_and_any_with_their_gpu_counts(two_hosts):
    options = targets(api.hosts(two_hosts), "alpha")
    assert [(t.key, t.run_on, t.gpu_count) for t in options] == [
        (HERE, None, 0),
        ("beta", "beta", 2),
        (api.ANY_HOST, api.ANY_HOST, 2),  # any: accepted when the best-equipped live host can place it
    ]
    assert options[1].label == "beta: 2 GPUs: NVIDIA H100 80GB HBM3 (80.0 GiB each)"
    assert options[0].label == "this machine (alpha): CPU only (gloo)"


def test_a_silent_host_is_not_a_target_and_this_machine_without_a_runner_is_unknown(two_hosts):
    make_silent(two_hosts, "beta")
    options = targets(api.hosts(two_hosts), "alpha")
    assert [t.key for t in options] == [HERE, api.ANY_HOST]
    assert options[-1].gpu_count == 0  # only alpha is alive, and it has no GPU
    make_silent(two_hosts, "alpha")
    (mine, anywhere) = targets(api.hosts(two_hosts), "alpha")
    assert mine.gpu_count is None and "runner not reporting" in mine.label  # device checks skipped, as before
    assert anywhere.gpu_count is None and "none live now" in anywhere.label


def test_devices_text_names_mixed_gpus_without_a_size():
    mixed = [H100, {"index": 1, "name": "NVIDIA A100-SXM4-40GB", "memory_total": 40 * 2**30}]
    assert devices_text({"gpus": mixed}) == "2 GPUs: NVIDIA A100-SXM4-40GB, NVIDIA H100 80GB HBM3"
    assert devices_text({"gpus": [H100]}) == "1 GPU: NVIDIA H100 80GB HBM3 (80.0 GiB)"


# ---- launch ----------------------------------------------------------------------------------
def test_launch_validates_against_the_chosen_hosts_gpus_and_queues_the_run_there(two_hosts):
    engine = two_hosts
    at = page("pages/launch.py")
    assert not at.exception
    # the box names each choice (a name that stays when a runner reports: the box keeps the text it shows when
    # only its option's label changes); what the chosen one has is said under it
    assert at.selectbox(key="launch_run_on").options == ["this machine (alpha)", "beta", "any host with the devices"]
    assert "CPU only (gloo)" in texts(at.caption)
    at.selectbox(key="launch_device").select("cuda").run()
    assert any(f"is 'cuda' but {NO_GPU};" in e for e in texts(at.error)), texts(at.error)  # alpha's own words
    assert at.button(key="launch_submit").disabled
    at.selectbox(key="launch_run_on").select("beta").run()
    assert not at.error and not at.button(key="launch_submit").disabled  # beta's 2 GPUs fit pp=2
    at.number_input(key="launch_pp").set_value(4).run()
    assert any("4 ranks need 4 GPUs but 2 are visible" in e for e in texts(at.error)), texts(at.error)
    at.number_input(key="launch_pp").set_value(2).run()
    at.button(key="launch_submit").click().run()
    (run,) = api.list_runs(engine).to_dict("records")
    stored = api.get_run(engine, int(run["id"]))
    assert stored["target_host"] == "beta" and stored["host"] == "alpha" and stored["spec"]["device"] == "cuda"
    assert [r["id"] for r in runner_rows.queued_runs(engine, host="alpha")] == []  # alpha's runner leaves it alone


def test_launch_on_any_host_queues_an_untargeted_run(two_hosts):
    at = page("pages/launch.py")
    at.selectbox(key="launch_run_on").select(api.ANY_HOST).run()
    at.selectbox(key="launch_device").select("cuda").run()
    assert not at.error
    at.button(key="launch_submit").click().run()
    (run,) = api.list_runs(two_hosts).to_dict("records")
    assert api.get_run(two_hosts, int(run["id"]))["target_host"] is None
    assert [r["id"] for r in runner_rows.queued_runs(two_hosts, host="beta")] == [run["id"]]


def test_the_devices_panel_lists_every_host_alive_and_the_silent_ones_apart(two_hosts, engine):
    assert leases.acquire_lease(engine, "runner-gamma", os.getpid(), [], "no GPU", host="gamma")
    make_silent(engine, "gamma")
    try:
        at = page("pages/launch.py")
    finally:
        leases.release_lease(engine, "runner-gamma")
    (hosts,) = [m for m in texts(at.markdown) if m.startswith("**Hosts alive**")]
    assert "**alpha** (this machine): CPU only (gloo)" in hosts
    assert "**beta**: 2 GPUs: NVIDIA H100 80GB HBM3 (80.0 GiB each)" in hosts and "gamma" not in hosts
    assert any("Not reporting" in c and "gamma: not reporting" in c for c in texts(at.caption))
    assert "gamma" not in " ".join(at.selectbox(key="launch_run_on").options)


# ---- logs of a run that ran elsewhere --------------------------------------------------------
def ran_on_beta(engine, run_dir: str = "/nonexistent/beta/runs/1") -> int:
    """A run claimed by beta's runner whose folder is on beta, with its log tails in the database."""
    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2), run_on="beta")
    with engine.begin() as conn:  # beta's claim: claim_run records the claiming process's own host
        conn.execute(text("UPDATE runs SET status = 'running', runner_id = 'runner-beta', runner_host = 'beta', "
                          "run_dir = :d, started_at = :t WHERE id = :i"),
                     {"d": run_dir, "t": datetime.now(UTC), "i": run_id})  # fmt: skip
    runner_rows.store_log_tail(engine, run_id, "rank0", "rank 0 on beta\nstep 1/6\n", 24)
    runner_rows.store_log_tail(engine, run_id, "rank1", "rank 1 on beta\nstep 1/6\n", 24)
    return run_id


def test_log_source_prefers_this_machines_folder_and_falls_back_to_the_database(two_hosts, tmp_path):
    run_id = ran_on_beta(two_hosts)
    run, stored = api.get_run(two_hosts, run_id), api.log_tails(two_hosts, run_id)
    assert log_source(run, stored, "alpha") == "database"
    assert run_log(run, "rank1", stored, "alpha").text == "rank 1 on beta\nstep 1/6\n"
    assert where_text(run, stored, "alpha").startswith("ran on beta: these are the log tails")
    # A folder at the same path here belongs to another run: beta ran this one.
    (tmp_path / "rank0.log").write_text("someone else's run\n")
    assert log_source({**run, "run_dir": str(tmp_path)}, stored, "alpha") == "database"
    # On beta itself the folder is read.
    (tmp_path / "rank0.log").write_text("the whole file\n")
    assert run_log({**run, "run_dir": str(tmp_path)}, "rank0", stored, "beta").text == "the whole file\n"
    assert log_source({**run, "run_dir": None}, {}, "alpha") == "none"


def test_the_run_page_shows_logs_of_a_run_that_ran_on_another_host(two_hosts):
    run_id = ran_on_beta(two_hosts)
    runner_rows.finish_run(two_hosts, run_id, "failed", error="rank 1 exited with code 1")
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    assert any("rank 0 on beta" in c for c in texts(at.code)), texts(at.code)
    at.selectbox(key=f"history_logrank_{run_id}").select(1).run()
    assert any("rank 1 on beta" in c for c in texts(at.code)), texts(at.code)
    assert any(c.startswith("ran on beta: these are the log tails") for c in texts(at.caption))


def test_the_live_page_tails_a_run_running_on_another_host_from_the_database(two_hosts):
    ran_on_beta(two_hosts)
    at = page("pages/live.py")
    assert not at.exception
    (tails,) = [c for c in texts(at.code) if "--- rank 0" in c]
    assert "rank 0 on beta" in tails and "rank 1 on beta" in tails
    assert any("ran on beta" in c for c in texts(at.caption))


# ---- seeds -------------------------------------------------------------------------------------
def test_the_launch_form_takes_a_seed_of_any_size_and_names_a_bad_one(engine):
    at = page("pages/launch.py")
    at.text_input(key="launch_seed").input("forty-two").run()
    assert any("must be a whole number (got 'forty-two')" in e for e in texts(at.error)), texts(at.error)
    assert at.button(key="launch_submit").disabled
    at.text_input(key="launch_seed").input(str(2**63 + 5)).run()  # past int64, and past the browser's 2**53
    assert not at.error
    at.button(key="launch_submit").click().run()
    (run,) = api.list_runs(engine).to_dict("records")
    assert api.get_run(engine, int(run["id"]))["spec"]["seed"] == 2**63 + 5


def test_the_run_page_says_who_launched_it_where_and_which_host_runs_it(two_hosts):
    queued = api.submit(two_hosts, RunSpec(strategy="single"), user="ada", run_on="beta")
    anywhere = api.submit(two_hosts, RunSpec(strategy="single"), user="ada", run_on=api.ANY_HOST)
    running = ran_on_beta(two_hosts)
    captions = {i: texts(page("pages/history.py", run=str(i)).caption) for i in (queued, anywhere, running)}
    assert "launched by ada on alpha · aimed at beta" in captions[queued]
    assert "launched by ada on alpha · for any host with the devices" in captions[anywhere]
    assert any(c.endswith("on alpha · runs on beta") for c in captions[running]), captions[running]


# ---- a Slurm partition as a target -------------------------------------------------------------
# What a Slurm runner publishes in its lease (runner.service.cluster.Partition.to_dict, from sinfo): the local
# two-node cluster's partition with 4 CPUs a node.
LAB = {
    "partition": "lab", "account": None, "default_nodes": None, "error": None,
    "nodes": [{"name": "n1", "cpus": 4, "gpus": 0, "state": "idle"},
              {"name": "n2", "cpus": 4, "gpus": 0, "state": "idle"}],
}  # fmt: skip


@pytest.fixture
def with_slurm(two_hosts):
    """alpha, beta and a live Slurm runner for partition `lab` holding the lease of host slurm-lab."""
    assert leases.acquire_lease(two_hosts, "runner-slurm", os.getpid(), [], "no NVIDIA GPU", host="slurm-lab",
                                cluster=LAB)  # fmt: skip
    yield two_hosts
    leases.release_lease(two_hosts, "runner-slurm")


def test_a_slurm_runner_is_a_partition_target_with_its_nodes(with_slurm):
    options = targets(api.hosts(with_slurm), "alpha")
    assert [t.key for t in options] == [HERE, "beta", "slurm-lab", api.ANY_HOST]
    slurm = options[2]
    assert slurm.label == "Slurm partition lab (slurm-lab): 2 nodes x 4 CPUs, no GPUs, 2 idle"
    assert (slurm.is_slurm, slurm.run_on, slurm.node_count, slurm.gpus_per_node, slurm.cpus_per_node) == (
        True, "slurm-lab", 2, 0, 4)  # fmt: skip
    assert options[-1].gpu_count == 2  # "any host" is judged by the machines' runners, beta's 2 GPUs
    assert not options[0].is_slurm and options[0].node_count is None


def test_a_gpu_partition_and_one_sinfo_could_not_read_are_labelled(with_slurm):
    gpu = {
        **LAB,
        "partition": "a100",
        "nodes": [
            {"name": f"g{i}", "cpus": 64, "gpus": 4, "state": s} for i, s in enumerate(["mixed", "idle", "down*"])
        ],
    }
    hosts = [{**h, "cluster": gpu} if h["host"] == "slurm-lab" else h for h in api.hosts(with_slurm)]
    (slurm,) = [t for t in targets(hosts, "alpha") if t.is_slurm]
    assert slurm.label == "Slurm partition a100 (slurm-lab): 3 nodes x 64 CPUs, 4 GPUs each, 1 idle, 1 down or drained"
    assert slurm.gpus_for(RunSpec(strategy="data", dp=8, device="cuda", nodes=2)) == 8  # 2 nodes x 4 GPUs
    broken = {**LAB, "nodes": [], "error": "sinfo could not read partition 'lab': connect failure"}
    hosts = [{**h, "cluster": broken} if h["host"] == "slurm-lab" else h for h in api.hosts(with_slurm)]
    (slurm,) = [t for t in targets(hosts, "alpha") if t.is_slurm]
    assert slurm.label == (
        "Slurm partition lab (slurm-lab): nodes unknown (sinfo could not read partition 'lab': connect failure)"
    )


def test_the_lease_carries_the_partition_and_a_heartbeat_refreshes_it(with_slurm):
    assert api.runner_status(with_slurm, "slurm-lab")["cluster"] == LAB
    assert api.runner_status(with_slurm, "beta")["cluster"] is None  # a machine's runner publishes none
    drained = {**LAB, "nodes": [LAB["nodes"][0], {**LAB["nodes"][1], "state": "drained"}]}
    assert leases.heartbeat(with_slurm, "runner-slurm", cluster=drained)
    assert api.runner_status(with_slurm, "slurm-lab")["cluster"]["nodes"][1]["state"] == "drained"
    assert leases.heartbeat(with_slurm, "runner-slurm")  # a plain heartbeat keeps what was published
    assert api.runner_status(with_slurm, "slurm-lab")["cluster"] == drained


def test_launch_on_a_slurm_partition_takes_nodes_and_checks_the_layout_before_launch(with_slurm):
    engine = with_slurm
    at = page("pages/launch.py")
    assert not at.exception
    assert "Slurm partition lab (slurm-lab)" in at.selectbox(key="launch_run_on").options
    assert at.number_input(key="launch_nodes").disabled  # this machine: no nodes to choose
    at.selectbox(key="launch_run_on").select("slurm-lab").run()
    assert not at.number_input(key="launch_nodes").disabled
    assert "Partition lab: 2 nodes x 4 CPUs, no GPUs, 2 idle (from sinfo)" in texts(at.caption)
    at.selectbox(key="launch_strategy").select("pipeline").run()
    at.number_input(key="launch_nodes").set_value(2).run()
    assert not at.error and not at.button(key="launch_submit").disabled, texts(at.error)
    assert any("#SBATCH --nodes=2" in c for c in texts(at.code)), texts(at.code)  # the job its runner submits
    # three nodes on a two-node partition: named at the field, nothing can be launched
    at.number_input(key="launch_pp").set_value(3).run()
    at.number_input(key="launch_nodes").set_value(3).run()
    assert any("must be <= the partition's nodes: lab has 2, the run asks for 3; choose 2 or fewer" in e
               for e in texts(at.error)), texts(at.error)  # fmt: skip
    assert at.button(key="launch_submit").disabled
    # tensor parallelism split over nodes
    at.number_input(key="launch_pp").set_value(2).run()
    at.selectbox(key="launch_strategy").select("tensor").run()
    at.number_input(key="launch_nodes").set_value(2).run()
    assert any("tensor parallelism must stay within a node: tp=2" in e for e in texts(at.error)), texts(at.error)
    assert at.button(key="launch_submit").disabled
    at.selectbox(key="launch_strategy").select("pipeline").run()
    at.button(key="launch_submit").click().run()
    (run,) = api.list_runs(engine).to_dict("records")
    stored = api.get_run(engine, int(run["id"]))
    assert stored["target_host"] == "slurm-lab" and stored["spec"]["nodes"] == 2 and stored["spec"]["pp"] == 2


def test_leaving_the_partition_clears_nodes(with_slurm):
    at = page("pages/launch.py")
    at.selectbox(key="launch_run_on").select("slurm-lab").run()
    at.number_input(key="launch_nodes").set_value(2).run()
    at.selectbox(key="launch_run_on").select(HERE).run()
    assert at.number_input(key="launch_nodes").disabled and at.number_input(key="launch_nodes").value is None
    assert not at.error


def test_history_says_where_a_run_ran_and_that_slurm_ran_it():
    assert ran_on("slurm-lab", "slurm") == "slurm-lab (Slurm)"
    assert ran_on("vm", "local") == "vm"
    assert ran_on(None, "local") == ""  # queued: no runner took it yet
