"""Per-node telemetry of multi-node runs: the node sampler process, the runner's reader of its files, storage of the
node, and the pages' per-node views (ui/nodes.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from runner.service.node_telemetry import NodeFilesSampler, node_file, start_node_sampler, stop_node_sampler
from storage import runner_rows, runs, series
from ui.nodes import latest_by_node, nodes_caption, ranks_by_node, with_node

# A stand-in for one node's torchrun: two "rank" children (RANK in their environment), as torchrun starts them.
FAKE_TORCHRUN = textwrap.dedent("""
    import os, subprocess, sys, time
    kids = [subprocess.Popen([sys.executable, "-c", "import time; x = b'1' * %d; time.sleep(60)" % ((r + 1) * 8_000_000)],
                             env={**os.environ, "RANK": str(r + 4)}) for r in range(2)]
    print("ready", flush=True)
    time.sleep(60)
""")


def wait_for(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture
def fake_node():
    proc = subprocess.Popen([sys.executable, "-c", FAKE_TORCHRUN], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_the_node_sampler_writes_each_rank_process_of_its_node_and_stops(tmp_path, fake_node):
    sampler = start_node_sampler(tmp_path, "n7", fake_node.pid, [])
    try:
        path = node_file(tmp_path, "n7")
        got = wait_for(lambda: {d["source"] for d in lines(path)} == {"rank4", "rank5"} and lines(path))
        assert {d["host"] for d in got} == {"n7"}
        before = time.time()
        assert all(before - 30 < d["t"] <= before and d["mem_bytes"] > 8_000_000 for d in got)
        # The ranks' own memory, measured by the kernel: rank5 holds 8 MB more than rank4.
        last = {d["source"]: d["mem_bytes"] for d in got}
        assert 6_000_000 < last["rank5"] - last["rank4"] < 10_000_000
        # The sampler is a child of this (test) process, not of the torchrun it samples, and never counts itself.
        assert "RANK" not in psutil.Process(sampler.pid).environ()
    finally:
        stop_node_sampler(sampler)
    assert sampler.poll() is not None


def test_the_node_sampler_dies_with_the_rank_that_started_it(tmp_path, fake_node):
    """A rank killed mid-run (SIGKILL: no chance to stop the sampler) takes its node's sampler with it."""
    starter = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from runner.service.node_telemetry import start_node_sampler
        p = start_node_sampler(Path({str(tmp_path)!r}), "n1", {fake_node.pid}, [])
        print(p.pid, flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])  # fmt: skip
    sampler_pid = int(starter.stdout.readline())
    wait_for(lambda: lines(node_file(tmp_path, "n1")))
    starter.kill()
    starter.wait()
    wait_for(lambda: not psutil.pid_exists(sampler_pid) or psutil.Process(sampler_pid).status() == "zombie", 10)


def test_the_runner_reads_only_whole_lines_of_every_node_file(tmp_path):
    folder = tmp_path / "telemetry"
    folder.mkdir()
    n1, n2 = folder / "n1.jsonl", folder / "n2.jsonl"
    n1.write_text(json.dumps({"host": "n1", "t": 1000.5, "source": "rank0", "util_pct": 90.0, "mem_bytes": 5}) + "\n"
                  + '{"host": "n1", "t": 1001.5, "sou')  # a line still being written  # fmt: skip
    n2.write_text(json.dumps({"host": "n2", "t": 1000.7, "source": "rank1", "util_pct": 80.0, "mem_bytes": 7}) + "\n"
                  + "not json\n")  # fmt: skip
    reader = NodeFilesSampler(tmp_path, started=1000.0)
    first = reader.sample()
    assert first == [
        {"host": "n1", "source": "rank0", "t_s": 0.5, "util_pct": 90.0, "mem_bytes": 5},
        {"host": "n2", "source": "rank1", "t_s": pytest.approx(0.7), "util_pct": 80.0, "mem_bytes": 7},
    ]
    with n1.open("a") as f:
        f.write('rce": "rank0", "util_pct": 70.0, "mem_bytes": 6}\n')
    assert reader.sample() == [{"host": "n1", "source": "rank0", "t_s": 1.5, "util_pct": 70.0, "mem_bytes": 6}]
    assert reader.sample() == []
    assert NodeFilesSampler(tmp_path / "none", 0.0).sample() == []


def test_samples_are_stored_and_read_per_node(engine):
    from runner.spec.run_spec import RunSpec

    run_id = runs.insert_run(engine, RunSpec(strategy="pipeline", pp=2, microbatches=2))
    runner_rows.add_telemetry(engine, run_id, [
        {"host": "n1", "source": "rank0", "t_s": 0.2, "util_pct": 100.0, "mem_bytes": 10},
        {"host": "n1", "source": "rank0", "t_s": 0.7, "util_pct": 50.0, "mem_bytes": 30},
        {"host": "n2", "source": "rank1", "t_s": 0.4, "util_pct": 90.0, "mem_bytes": 20},
        {"source": "rank0", "t_s": 0.1, "util_pct": 10.0, "mem_bytes": 1},  # taken by the runner on its own host
    ])  # fmt: skip
    got = series.telemetry_series(engine, [run_id]).sort_values(["host", "source"]).reset_index(drop=True)
    assert got[["host", "source", "t_s", "util_pct", "mem_bytes"]].to_dict("records") == [
        {"host": "", "source": "rank0", "t_s": 0.0, "util_pct": 10.0, "mem_bytes": 1},
        {"host": "n1", "source": "rank0", "t_s": 0.0, "util_pct": 75.0, "mem_bytes": 30},
        {"host": "n2", "source": "rank1", "t_s": 0.0, "util_pct": 90.0, "mem_bytes": 20},
    ]


def test_the_pages_show_each_nodes_latest_sample():
    s = pd.DataFrame([
        {"run_id": 3, "host": "n1", "source": "rank0", "t_s": 1.0, "util_pct": 90.0, "mem_bytes": 100 * 2**20},
        {"run_id": 3, "host": "n1", "source": "rank0", "t_s": 2.0, "util_pct": 99.0, "mem_bytes": 110 * 2**20},
        {"run_id": 3, "host": "n1", "source": "rank1", "t_s": 2.0, "util_pct": 97.0, "mem_bytes": 90 * 2**20},
        {"run_id": 3, "host": "n2", "source": "rank2", "t_s": 1.0, "util_pct": 50.0, "mem_bytes": 64 * 2**20},
    ])  # fmt: skip
    table = latest_by_node(s)
    assert table.to_dict("records") == [
        {"node": "n1", "sources": "rank0, rank1", "util_pct": 196.0, "mem_bytes": 200 * 2**20, "t_s": 2.0},
        {"node": "n2", "sources": "rank2", "util_pct": 50.0, "mem_bytes": 64 * 2**20, "t_s": 1.0},
    ]
    assert nodes_caption(s) == "n1 (rank0, rank1): 196% CPU, 200.0 MiB at 2 s · n2 (rank2): 50% CPU, 64.0 MiB at 1 s"
    assert nodes_caption(s.assign(host="")) is None  # a local run: no per-node line


def test_compare_sums_a_nodes_ranks():
    ranks = pd.DataFrame([
        {"run_id": 1, "rank": 0, "host": "n1", "param_bytes": 10, "peak_mem_bytes": 100, "comm_s": 0.5},
        {"run_id": 1, "rank": 1, "host": "n1", "param_bytes": 10, "peak_mem_bytes": 120, "comm_s": 0.25},
        {"run_id": 1, "rank": 2, "host": "n2", "param_bytes": 12, "peak_mem_bytes": 90, "comm_s": 1.0},
        {"run_id": 2, "rank": 0, "host": None, "param_bytes": 32, "peak_mem_bytes": 300, "comm_s": 0.0},
    ])  # fmt: skip
    got = ranks_by_node(ranks)
    assert got[["run_id", "node", "ranks", "param_bytes", "peak_mem_bytes", "comm_s"]].to_dict("records") == [
        {"run_id": 1, "node": "n1", "ranks": "0, 1", "param_bytes": 20, "peak_mem_bytes": 220, "comm_s": 0.75},
        {"run_id": 1, "node": "n2", "ranks": "2", "param_bytes": 12, "peak_mem_bytes": 90, "comm_s": 1.0},
        {"run_id": 2, "node": "unrecorded", "ranks": "0", "param_bytes": 32, "peak_mem_bytes": 300, "comm_s": 0.0},
    ]
    assert with_node(ranks)["node"].tolist() == ["n1", "n1", "n2", "unrecorded"]
