"""The CLI as scripts use it: bad input refused with field-named messages (exit 2, nothing queued), --json shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage import queries

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "field", "fragment"),
    [
        (["--strategy", "layer", "--pp", "3"], "pp", "needs n_layer divisible by 3"),
        (["--strategy", "layer", "--pp", "0"], "pp", "must be at least 1"),
        (["--strategy", "data", "--dp", "-2"], "dp", "must be at least 1"),
        (["--strategy", "single", "--model", "gpt9"], "model", "is not a preset"),
        (["--strategy", "single", "--weights", "/nope/model.safetensors"], "weights", "no file at"),
        (["--strategy", "single", "--spec-json", '{"colour": 1}'], "colour", "is not a spec field"),
    ],
)
def test_bad_submissions_exit_2_name_the_field_and_queue_nothing(engine, args, field, fragment):
    proc = cli("submit", *args, "--json")
    assert proc.returncode == 2, proc.stderr
    out = json.loads(proc.stdout)
    assert any(p["field"] == field and fragment in p["message"] for p in out["problems"]), out
    assert queries.count_runs(engine) == 0


def test_unknown_strategy_is_refused_by_the_parser(engine):
    proc = cli("submit", "--strategy", "zero")
    assert proc.returncode == 2 and "invalid choice: 'zero'" in proc.stderr


def test_a_checkpoint_that_is_not_gpt2_is_refused(engine, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(path))
    proc = cli("submit", "--strategy", "single", "--weights", str(path))
    assert proc.returncode == 2 and "has no GPT-2 tensors" in proc.stderr


def test_submit_list_show_cancel_without_a_runner(engine):
    proc = cli("submit", "--strategy", "layer", "--pp", "2", "--model", "tiny", "--tag", "smoke", "--json")
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["id"]
    listed = json.loads(cli("list", "--json").stdout)
    assert [r["id"] for r in listed] == [run_id] and listed[0]["tags"] == ["smoke"]
    shown = json.loads(cli("show", str(run_id), "--json").stdout)
    assert shown["status"] == "queued" and shown["spec"]["pp"] == 2
    cancel = cli("cancel", str(run_id), "--json")
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["status"] == "cancelled"
    assert cli("show", "999").returncode == 1
    csv_out = cli("export", "--format", "csv").stdout.splitlines()
    assert csv_out[0].startswith("id,status") and len(csv_out) == 2


def test_a_spec_json_that_is_not_an_object_is_refused_as_a_spec_problem(engine):
    proc = cli("submit", "--strategy", "single", "--spec-json", "[1, 2]", "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["problems"] == [
        {"field": "spec", "message": "must be a JSON object of field: value pairs"}
    ]
    assert queries.count_runs(engine) == 0


def test_logs_prints_a_rank_log_and_as_json_names_its_path(engine, tmp_path):
    from runner.spec import RunSpec

    run_id = queries.submit_run(engine, RunSpec(strategy="layer", pp=2))
    queries.claim_run(engine, run_id, "r", str(tmp_path), [])
    (tmp_path / "rank1.log").write_text("hello from rank 1\n")
    assert cli("logs", str(run_id), "--rank", "1").stdout == "hello from rank 1\n"
    out = json.loads(cli("logs", str(run_id), "--rank", "1", "--json").stdout)
    assert out == {"id": run_id, "rank": 1, "path": str(tmp_path / "rank1.log"), "status": "running",
                   "text": "hello from rank 1\n"}  # fmt: skip
    missing = cli("logs", str(run_id), "--rank", "5")
    assert missing.returncode == 1 and "no log for rank 5" in missing.stderr


def test_list_and_export_take_the_history_filters(engine):
    from runner.spec import RunSpec

    layer = queries.submit_run(engine, RunSpec(strategy="layer", pp=2, tags=("nightly",)), user="ada")
    single = queries.submit_run(engine, RunSpec(strategy="single"), user="bob")
    assert [r["id"] for r in json.loads(cli("list", "--strategy", "layer", "--json").stdout)] == [layer]
    both = json.loads(cli("list", "--user", "ada", "--user", "bob", "--json").stdout)
    assert [r["id"] for r in both] == [single, layer]
    assert [r["id"] for r in json.loads(cli("list", "--limit", "1", "--offset", "1", "--json").stdout)] == [layer]
    exported = json.loads(cli("export", "--format", "json", "--tag", "nightly").stdout)
    assert [r["id"] for r in exported] == [layer] and exported[0]["spec"]["pp"] == 2
    assert len(cli("export", "--status", "succeeded").stdout.splitlines()) == 1  # the header only
