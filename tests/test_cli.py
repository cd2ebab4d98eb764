"""The CLI as scripts use it: bad input refused with field-named messages (exit 2, nothing queued), --json shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner import api
from storage import hosts as leases
from storage import runner_rows

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m runner ARGS` run as main(ARGS) in this process (the same code less an interpreter's start-up, which
    the subprocess tests pay for): its exit code and what it printed."""
    from runner.__main__ import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["runner", *args], code, out.out, out.err)


@pytest.mark.parametrize(
    ("args", "field", "fragment"),
    [
        (["--strategy", "layer", "--pp", "3"], "pp", "needs n_layer divisible by 3"),
        (["--strategy", "layer", "--pp", "0"], "pp", "must be at least 1"),
        (["--strategy", "data", "--dp", "-2"], "dp", "must be at least 1"),
        (["--strategy", "single", "--model", "gpt9"], "model", "is not a preset"),
        (["--strategy", "single", "--weights", "/nope/model.safetensors"], "weights", "no file at"),
        (["--strategy", "single", "--spec-json", '{"colour": 1}'], "colour", "is not a spec field"),
        (["--strategy", "single", "--data", "/nope/corpus"], "data", "no file or folder at '/nope/corpus'"),
        (["--strategy", "single", "--data", "stdlib", "--prompt", "def f(x):"], "prompt", "workload 'train'"),
        (["--strategy", "tensor", "--tp", "4", "--model", "llama-tiny", "--n-kv-head", "3"], "n_kv_head", "divide"),
        (["--strategy", "data", "--dp", "2", "--microbatch-size", "3"], "microbatch_size", "a multiple of 6"),
        (["--strategy", "single", "--microbatches", "2", "--microbatch-size", "2"], "microbatch_size", "not both"),
        (["--strategy", "single", "--microbatches", "3"], "microbatches", "must split into 3 equal microbatches"),
        (["--strategy", "data", "--dp", "2", "--reduce-fp32"], "reduce_fp32", "choose dtype bf16-master"),
        (["--strategy", "single", "--dtype", "bf16-master", "--reduce-fp32"], "reduce_fp32", "dp 2 or more"),
    ],
)
def test_bad_submissions_exit_2_name_the_field_and_queue_nothing(engine, args, field, fragment, capsys):
    """In this process, as `python -m runner submit` runs it (main(); the command itself runs in the tests below)."""
    proc = cli_here(capsys, "submit", *args, "--json")
    assert proc.returncode == 2, proc.stderr
    out = json.loads(proc.stdout)
    assert any(p["field"] == field and fragment in p["message"] for p in out["problems"]), out
    assert api.count_runs(engine) == 0


def test_model_part_flags_reach_the_spec():
    from runner.__main__ import build_parser
    from runner.spec.cli_flags import specs_from_args

    spec_from_args = lambda args: specs_from_args(args)[0]  # noqa: E731 -- one spec from the flags alone
    args = build_parser().parse_args(["submit", "--strategy", "single", "--model", "tiny", "--family", "llama",
                                      "--n-kv-head", "2", "--ffn-hidden", "96", "--rope-theta", "1e6", "--no-tie-head"])  # fmt: skip
    data = spec_from_args(args)
    assert {k: data[k] for k in ("family", "n_kv_head", "ffn_hidden", "rope_theta", "tie_head")} == {
        "family": "llama", "n_kv_head": 2, "ffn_hidden": 96, "rope_theta": 1e6, "tie_head": False}  # fmt: skip
    assert "tie_head" not in spec_from_args(build_parser().parse_args(["submit", "--strategy", "single"]))


def test_plan_refuses_a_model_naming_the_flag():
    proc = cli("plan", "--model", "llama-3.1-8b", "--n-kv-head", "5")
    assert proc.returncode == 2 and "--n-kv-head: each key/value head serves" in proc.stderr


def test_unknown_strategy_is_refused_by_the_parser(engine):
    proc = cli("submit", "--strategy", "zero")
    assert proc.returncode == 2 and "invalid choice: 'zero'" in proc.stderr


def test_strategy_choices_and_help_come_from_the_registry():
    from runner.__main__ import build_parser
    from runner.spec.strategies import Strategy, get_strategy, registered, strategy_names

    def flags(parser):
        submit = parser._subparsers._group_actions[0].choices["submit"]
        return {a.dest: a for a in submit._actions}

    strategy = flags(build_parser())["strategy"]
    assert tuple(strategy.choices) == strategy_names()
    assert all(f"{n}: {get_strategy(n).help}" in strategy.help for n in strategy_names())
    assert flags(build_parser())["microbatches"].help == "used by single, tensor, pipeline, data, 3d"
    with registered(Strategy(name="zero", help="sharded data parallelism, 100% of a test", degrees=("dp",))):
        got = flags(build_parser())
        assert "zero" in got["strategy"].choices and got["dp"].help == "used by data, 3d, zero"
        assert "zero: sharded data parallelism, 100%% of a test" in got["strategy"].help  # argparse's escape


def test_a_checkpoint_that_is_not_gpt2_is_refused(engine, tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(path))
    proc = cli("submit", "--strategy", "single", "--weights", str(path))
    assert proc.returncode == 2 and "has no GPT-2 tensors" in proc.stderr
    # a Hugging Face folder's own file: the message names the folder to give instead
    (tmp_path / "config.json").write_text("{}")
    proc = cli("submit", "--strategy", "single", "--weights", str(path))
    assert proc.returncode == 2 and f"for the model of its folder give the folder, '{tmp_path}'" in proc.stderr
    proc = cli("submit", "--strategy", "single", "--weights", str(tmp_path / "nowhere.safetensors"))
    assert proc.returncode == 2 and "or of a Llama, Qwen2 or Mistral Hugging Face folder" in proc.stderr


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


def test_microbatch_size_becomes_the_count_of_gradient_accumulation(engine):
    # Megatron's --micro-batch-size: batch 16 over dp 2 in microbatches of 2 sequences is m = 4 per replica
    proc = cli("submit", "--strategy", "data", "--dp", "2", "--batch", "16", "--microbatch-size", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert api.get_run(engine, json.loads(proc.stdout)["id"])["spec"]["microbatches"] == 4


def test_a_spec_json_that_is_not_an_object_is_refused_as_a_spec_problem(engine):
    proc = cli("submit", "--strategy", "single", "--spec-json", "[1, 2]", "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["problems"] == [
        {"field": "spec", "message": "must be a JSON object of field: value pairs"}
    ]
    assert api.count_runs(engine) == 0


def test_submit_repeat_queues_a_comparison_set_interleaved(engine, capsys):
    proc = cli_here(capsys, "submit", "--model", "tiny", "--repeat", "2", "--spec-json", '{"strategy": "single"}',
                    "--spec-json", '{"strategy": "data", "dp": 2}', "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    runs = [api.get_run(engine, i) for i in out["ids"]]
    assert [r["spec"]["strategy"] for r in runs] == ["single", "data", "single", "data"]
    assert {r["set_id"] for r in runs} == {out["set_id"]} == {out["ids"][0]}
    text = cli_here(capsys, "submit", "--strategy", "single", "--repeat", "3").stdout
    assert text.startswith("queued comparison set ") and "run one at a time in turn" in text
    refused = cli_here(capsys, "submit", "--strategy", "single", "--repeat", "0", "--json")
    assert refused.returncode == 2 and json.loads(refused.stdout)["problems"][0]["field"] == "repeat"
    nothing = cli_here(capsys, "submit", "--model", "tiny")
    assert nothing.returncode == 2 and "--strategy is required" in nothing.stderr
    assert api.count_runs(engine) == 7


def test_compare_prints_groups_medians_with_intervals_and_what_the_runs_resolve(engine, capsys):
    from runner.spec.run_spec import RunSpec
    from tests.test_ui_compare import finished

    single, data = RunSpec(strategy="single"), RunSpec(strategy="data", dp=2)
    ids = [finished(engine, spec, t) for spec, t in [(single, 1000.0), (data, 2000.0)] * 2
           + [(single, 1050.0), (data, 2100.0), (single, 980.0), (data, 1950.0)]]  # fmt: skip
    out = json.loads(cli_here(capsys, "compare", *map(str, ids), "--json").stdout)
    assert [g["runs"] for g in out["groups"]] == [ids[0::2], ids[1::2]]
    tokens = [m for m in out["medians"] if m["figure"] == "tokens_per_s"]
    assert [(m["median"], m["low"], m["high"]) for m in tokens] == [(1000.0, 980.0, 1050.0), (2000.0, 1950.0, 2100.0)]
    (verdict,) = out["verdicts"]
    assert verdict["outcome"] == "higher" and verdict["runs"] == [4, 4]  # 4 runs of each resolve it
    text = cli_here(capsys, "compare", *map(str, ids)).stdout
    assert text.startswith("Runs grouped by spec") and "What the runs resolve (tokens/s):" in text
    assert "data · tp1 pp1 dp2 is faster than single · tp1 pp1 dp1: 2.00x the tokens/s (median of the 16 run-to-run ratios; 97% interval" in text
    missing = cli_here(capsys, "compare", str(ids[0]), "999")
    assert missing.returncode == 1 and missing.stdout.strip() == "no run 999"


def test_logs_prints_a_rank_log_and_as_json_names_its_path(engine, tmp_path):
    from runner.spec.run_spec import RunSpec

    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2))
    runner_rows.claim_run(engine, run_id, "r", str(tmp_path), [])
    (tmp_path / "rank1.log").write_text("hello from rank 1\n")
    assert cli("logs", str(run_id), "--rank", "1").stdout == "hello from rank 1\n"
    out = json.loads(cli("logs", str(run_id), "--rank", "1", "--json").stdout)
    assert out == {"id": run_id, "rank": 1, "path": str(tmp_path / "rank1.log"), "status": "running",
                   "text": "hello from rank 1\n"}  # fmt: skip
    missing = cli("logs", str(run_id), "--rank", "5")
    assert missing.returncode == 1 and "no log for rank 5" in missing.stderr


def test_list_and_export_take_the_history_filters(engine, capsys):
    from runner.spec.run_spec import RunSpec

    layer = api.submit(engine, RunSpec(strategy="layer", pp=2, tags=("nightly",)), user="ada")
    single = api.submit(engine, RunSpec(strategy="single"), user="bob")
    assert [r["id"] for r in json.loads(cli_here(capsys, "list", "--strategy", "layer", "--json").stdout)] == [layer]
    both = json.loads(cli_here(capsys, "list", "--user", "ada", "--user", "bob", "--json").stdout)
    assert [r["id"] for r in both] == [single, layer]
    assert [
        r["id"] for r in json.loads(cli_here(capsys, "list", "--limit", "1", "--offset", "1", "--json").stdout)
    ] == [layer]
    exported = json.loads(cli_here(capsys, "export", "--format", "json", "--tag", "nightly").stdout)
    assert [r["id"] for r in exported] == [layer] and exported[0]["spec"]["pp"] == 2
    assert len(cli_here(capsys, "export", "--status", "succeeded").stdout.splitlines()) == 1  # the header only
    # a value no run can have is refused, naming the flag and the choices, rather than read as "no runs"
    for flag, value in (("--status", "bogus"), ("--strategy", "nope"), ("--workload", "fit")):
        refused = cli_here(capsys, "list", flag, value)
        assert refused.returncode == 2 and f"{flag}: invalid choice: '{value}'" in refused.stderr, refused.stderr
    assert "(choose from 'queued', 'running', 'succeeded'" in cli_here(capsys, "export", "--status", "x").stderr
    for flag, value, why in (("--limit", "-1", "must be at least 1"), ("--offset", "x", "must be a whole number")):
        refused = cli_here(capsys, "list", flag, value)
        assert refused.returncode == 2 and f"{flag}: {why}" in refused.stderr, refused.stderr
    # one short line a run: its layout and verdict, not pandas' dump of every column and the verify record
    lines = cli_here(capsys, "list").stdout.splitlines()
    assert lines[0].split() == ["id", "status", "strategy", "layout", "model", "workload", "tokens/s", "step", "p50",
                                "verify", "created"]  # fmt: skip
    assert lines[1].split()[:9] == [str(single), "queued", "single", "tp1", "pp1", "dp1", "tiny", "train", "—"]
    assert lines[2].split()[3:6] == ["tp1", "pp2", "dp1"] and max(map(len, lines)) < 120


# ---- a team database: runs aimed at a host, logs of a run that ran on another ---------------------
H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * 2**30}
NO_GPU = "no NVIDIA GPU: NVML lists no GPU and torch 2.13.0+cpu is a CPU-only build"  # what alpha's runner says


@pytest.fixture
def two_hosts(engine, monkeypatch):
    """This machine is alpha (no GPU); beta has 2 GPUs. Both leases held by this process, as two live runners."""
    import os

    monkeypatch.setenv("LAB_HOST", "alpha")  # the CLI subprocesses inherit it
    # No heartbeat follows these leases, and on a busy machine the test's CLI calls outlast the default 30 s after
    # which a silent runner counts as gone: they stay alive for the test's whole length instead.
    monkeypatch.setenv("LAB_RUNNER_STALE_S", "3600")
    assert leases.acquire_lease(engine, "runner-alpha", os.getpid(), [], NO_GPU, host="alpha")
    assert leases.acquire_lease(engine, "runner-beta", os.getpid(), [H100, {**H100, "index": 1}], "2", host="beta")
    yield engine
    leases.release_lease(engine, "runner-alpha")
    leases.release_lease(engine, "runner-beta")


def test_submit_host_validates_against_that_hosts_gpus_and_aims_the_run_there(two_hosts):
    cuda = ["submit", "--strategy", "data", "--dp", "2", "--model", "tiny", "--device", "cuda", "--json"]
    here = cli(*cuda)
    assert here.returncode == 2 and f"is 'cuda' but {NO_GPU};" in here.stdout  # alpha, this machine, has none
    on_beta = cli(*cuda, "--host", "beta")
    assert on_beta.returncode == 0, on_beta.stdout + on_beta.stderr
    run_id = json.loads(on_beta.stdout)["id"]
    assert api.get_run(two_hosts, run_id)["target_host"] == "beta"
    anywhere = cli(*cuda[:-1], "--host", "any")
    assert anywhere.returncode == 0 and "for any host with the devices" in anywhere.stdout, anywhere.stderr
    any_id = int(anywhere.stdout.split()[2])
    assert api.get_run(two_hosts, any_id)["target_host"] is None
    assert [r["id"] for r in runner_rows.queued_runs(two_hosts, host="alpha")] == [any_id]
    too_wide = cli(*cuda[:4], "4", *cuda[5:], "--host", "beta")
    assert too_wide.returncode == 2 and "4 ranks need 4 GPUs but 2 are visible" in too_wide.stdout
    gone = cli("submit", "--strategy", "single", "--host", "delta")
    assert gone.returncode == 0 and "no runner is alive on delta now" in gone.stdout


@pytest.mark.slow  # a --follow process polling while tails are stored
def test_logs_of_a_run_that_ran_on_another_host_come_from_the_database(two_hosts, tmp_path):
    import subprocess
    import time

    from sqlalchemy import text

    from runner.spec.run_spec import RunSpec

    engine = two_hosts
    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2), run_on="beta")
    # beta's claim; its run folder is on beta, and a folder at that path here is not this run's
    (tmp_path / "rank1.log").write_text("another run's log on alpha\n")
    with engine.begin() as conn:
        conn.execute(text("UPDATE runs SET status = 'running', runner_id = 'runner-beta', runner_host = 'beta', "
                          "run_dir = :d WHERE id = :i"), {"d": str(tmp_path), "i": run_id})  # fmt: skip
    runner_rows.store_log_tail(engine, run_id, "rank1", "step 1/3\n", 9)
    assert cli("logs", str(run_id), "--rank", "1").stdout == "step 1/3\n"
    out = json.loads(cli("logs", str(run_id), "--rank", "1", "--json").stdout)
    assert (out["source"], out["host"], out["text"], out["size"]) == ("database", "beta", "step 1/3\n", 9)
    missing = cli("logs", str(run_id), "--rank", "0")
    assert missing.returncode == 1 and "beta stored none" in missing.stderr

    follow = subprocess.Popen([sys.executable, "-m", "runner", "logs", str(run_id), "--rank", "1", "--follow"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(3)  # it printed the tail and polls
        runner_rows.store_log_tail(engine, run_id, "rank1", "step 1/3\nstep 2/3\n", 18)
        time.sleep(2)
        runner_rows.store_log_tail(engine, run_id, "rank1", "step 3/3\n", 27)  # the stored tail keeps the end only
        runner_rows.finish_run(engine, run_id, "succeeded")
        stdout, stderr = follow.communicate(timeout=30)
    finally:
        follow.kill()
    assert follow.returncode == 0, stderr
    assert stdout == "step 1/3\nstep 2/3\nstep 3/3\n"


@pytest.mark.slow  # a --follow process polling while the rank writes
def test_logs_follow_streams_this_machines_rank_log_until_the_run_ends(engine, tmp_path):
    import time

    run_id = api.submit(engine, {"strategy": "layer", "pp": 2})
    runner_rows.claim_run(engine, run_id, "r", str(tmp_path), [])  # claimed by this machine
    log = tmp_path / "rank0.log"
    log.write_text("step 1/3\n")
    follow = subprocess.Popen([sys.executable, "-m", "runner", "logs", str(run_id), "--follow"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(3)  # it printed the log and polls
        with log.open("a") as f:
            f.write("step 2/3\n")
        time.sleep(1)
        with log.open("a") as f:
            f.write("step 3/3\n")
        runner_rows.finish_run(engine, run_id, "succeeded")
        stdout, stderr = follow.communicate(timeout=30)
    finally:
        follow.kill()
    assert follow.returncode == 0, stderr
    assert stdout == "step 1/3\nstep 2/3\nstep 3/3\n"


@pytest.mark.parametrize(
    ("args", "flag", "fragment"),
    [
        (["--efficiency", "0"], "--efficiency", "above 0 and at most 1"),
        (["--efficiency", "-0.5"], "--efficiency", "above 0 and at most 1"),
        (["--efficiency", "1.5"], "--efficiency", "above 0 and at most 1"),
        (["--virtual-stages", "0"], "--virtual-stages", "at least 1 model chunk"),
        (["--virtual-stages", "2"], "--virtual-stages", "set virtual_stages to 1, or schedule to interleaved-1f1b"),
        (["--schedule", "interleaved-1f1b"], "--virtual-stages", "at least 2 model chunks"),
        (["--batch", "0"], "--batch", "at least 1 sequence"),
        (["--gpus", "0"], "--gpus", "at least 1 device"),
        (["--zero", "x"], "--zero", "'x' is not a ZeRO stage"),
        (["--microbatches", "-1"], "--microbatches", "must be 0"),
        (["--microbatches", "2", "--microbatch-size", "4"], "--microbatch-size", "not both"),
        (["--seq", "0"], "--seq", "at least 1 token"),
        (["--seq", "4096"], "--seq", "exceeds the model's block_size 1024"),
        (["--n-layer", "0"], "--n-layer", "at least 1"),
        (["--n-head", "7"], "--n-head", "must be divisible by n_head 7"),
        (["--memory-gib", "80", "--tflops", "-1", "--bw-intra", "1", "--bw-inter", "1"], "--tflops", "positive"),
    ],
)
def test_bad_plan_inputs_exit_2_name_the_flag_without_a_traceback(args, flag, fragment, capsys):
    """In this process (`python -m runner` is main(); an exception would fail the test with its traceback): each
    case named by its flag, code 2. The next test runs the command itself."""
    proc = cli_here(capsys, "plan", *args)  # (argparse's own refusals exit: cli_here reads their code)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert any(line.startswith(f"plan: {flag}: ") and fragment in line for line in err.splitlines()), err


def test_bad_plan_inputs_as_json_list_every_problem():
    proc = cli("plan", "--batch", "0", "--gpus", "0", "--efficiency", "2", "--json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    fields = {p["field"] for p in json.loads(proc.stdout)["problems"]}
    assert fields == {"batch", "gpus", "efficiency"}


def test_export_into_a_reader_that_stops_early_ends_without_a_traceback(engine):
    """`python -m runner export | head`: the reader closes the pipe after its first bytes; the CLI stops writing
    without a BrokenPipeError traceback. 150 runs export to well over a pipe's 64 KiB buffer, so the write fails."""
    from runner.spec.run_spec import RunSpec

    for _ in range(3):
        api.submit_set(engine, [RunSpec(strategy="single")], api.MAX_REPEAT)
    proc = subprocess.Popen([sys.executable, "-m", "runner", "export", "--format", "json"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.read(100).startswith(b"[")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and b"Traceback" not in err, err


def test_show_says_the_verify_verdict_and_cancel_of_a_finished_run_says_nothing_was_cancelled(engine, capsys):
    """`submit --verify --wait` ends with run_summary: the verdict asked for is on its line."""
    from runner.spec.run_spec import RunSpec
    from tests.test_ui_pages import VERIFY, finished_run

    passed = finished_run(engine, RunSpec(strategy="data", dp=2, verify=True), {"verify": VERIFY, "loss": 5.4321},
                          [{}, {}])  # fmt: skip
    failed = finished_run(engine, RunSpec(strategy="data", dp=2, verify=True),
                          {"verify": {**VERIFY, "passed": False}}, [{}, {}])  # fmt: skip
    unverified = finished_run(engine, RunSpec(strategy="single"), {}, [{}])
    assert cli_here(capsys, "show", str(passed)).stdout.strip().endswith("| final loss 5.4321 | verify PASS")
    assert cli_here(capsys, "show", str(failed)).stdout.strip().endswith("| verify FAIL")
    assert "verify" not in cli_here(capsys, "show", str(unverified)).stdout
    cancel = cli_here(capsys, "cancel", str(passed))
    assert cancel.returncode == 1 and cancel.stdout.strip() == f"run {passed}: succeeded already; nothing to cancel"


def test_selftest_refuses_data_that_is_not_there_as_bad_input(engine, capsys):
    """It printed nine bare SKIP rows and "FAILED: 0 of 9 runs passed verify; runs are in History" with nothing
    queued, exit 1; the reason only in --json."""
    refused = cli_here(capsys, "selftest", "--data", "/nope", "--strategy", "tensor")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("selftest: --data: no file or folder at '/nope'")
    assert api.count_runs(engine) == 0


def test_a_selftest_row_refused_says_why():
    from runner.selftest import Row, format_row

    line = format_row(Row(label="tensor tp=2 forward", status="refused", verdict="error", failures=["data: gone"]))
    assert line.splitlines() == ["ERROR tensor tp=2 forward", "      data: gone"]
    assert format_row(Row(label="pipeline pp=4 train")) == "SKIP  pipeline pp=4 train"
