"""ui/run_detail.py and ui/filters.py: what the run page says about a run and the History filters, as data."""

from __future__ import annotations

from datetime import UTC, date, datetime

from ui.filters import day_range, parse_day, run_filter
from ui.run_detail import (
    failure_text,
    live_progress,
    peak_memory,
    progress,
    progress_html,
    result_captions,
    unfinished_steps_text,
)


def run(**changes):
    base = {"status": "succeeded", "error": None, "failed_rank": None, "exit_code": None, "result": {},
            "ranks": [], "progress": {"step": 0, "total": 0}}  # fmt: skip
    return {**base, **changes}


def test_progress_is_a_fraction_of_the_steps_and_never_over_one():
    assert progress(run(progress={"step": 3, "total": 6})) == (0.5, "step 3 of 6")
    assert progress(run(progress={"step": 7, "total": 6}))[0] == 1.0
    assert progress(run(progress={"step": 0, "total": 0})) == (0.0, "step 0 of 0")


def test_live_progress_says_elapsed_and_remaining_time():
    start, now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC), datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert live_progress(start, [0.5, 1.5], 2, 6, now) == (1 / 3, "step 2 of 6 · elapsed 30.0 s · remaining 4.0 s")
    assert live_progress(None, [], 0, 6, now) == (0.0, "step 0 of 6 · elapsed 0 µs · remaining estimating…")
    assert live_progress(start, [1.0], 9, 6, now)[0] == 1.0
    assert live_progress(start, [0.5], 6, 6, now) == (1.0, "step 6 of 6 · elapsed 30.0 s · every step done, finishing")
    # 300 timed steps typed, 1 warm-up before them: the 301 says what it counts
    assert live_progress(start, [0.5], 43, 301, now, warmup=1)[1].startswith("step 43 of 301 (1 warm-up + 300 timed) ·")


def test_the_progress_bar_is_drawn_where_its_line_says():
    html = progress_html(*live_progress(None, [0.1] * 6, 6, 6, datetime(2026, 1, 1, tzinfo=UTC)))
    assert "step 6 of 6" in html and 'aria-valuenow="100"' in html and "width:100%" in html
    assert "width:58.3%" in progress_html(7 / 12, "step 7 of 12")


def test_the_failure_line_names_the_rank_and_its_exit_code():
    failed = run(status="failed", error="rank 1 was killed by signal 9 (SIGKILL)", failed_rank=1, exit_code=-9)
    assert failure_text(failed) == "rank 1 was killed by signal 9 (SIGKILL) (rank 1, exit code -9)"
    assert failure_text(run(status="cancelled", error="cancelled before it started")) == "cancelled before it started"
    assert failure_text(run(status="succeeded", error="stale")) is None
    assert failure_text(run(status="failed")) is None


def test_captions_say_rss_mfu_or_why_not_and_the_bubble():
    ranks = [{"peak_mem_bytes": 3 * 2**20, "peak_rss_bytes": 2**30}, {"peak_mem_bytes": 5 * 2**20}]
    gpu = {"mfu": 0.123, "peak_flops": 989e12, "device_names": ["NVIDIA H100"], "bubble_fraction": 0.2,
           "bubble_fraction_theory": 0.2}  # fmt: skip
    assert result_captions(run(result=gpu, ranks=ranks)) == [
        "process peak RSS (max rank, interpreter and torch included): 1.0 GiB",
        "MFU 12.3% of 989.0 TFLOP/s peak on NVIDIA H100",
        "pipeline bubble measured 20.0%, theory 20.0%",
    ]
    unknown = {"device": "cuda", "device_names": ["Some GPU"]}
    assert result_captions(run(result=unknown)) == ["no MFU: the peak FLOP/s of Some GPU is not known"]
    assert result_captions(run(result={"device": "cpu"})) == []
    assert peak_memory(run(ranks=ranks)) == 5 * 2**20 and peak_memory(run()) is None


def test_a_cuda_runs_page_says_what_its_tensor_peak_holds():
    measured = [{"peak_tensor_bytes": 5 * 2**20, "cublas_workspace_bytes": 32 * 2**20},
                {"peak_tensor_bytes": 6 * 2**20, "cublas_workspace_bytes": 64 * 2**20}]  # fmt: skip
    cuda = {"device": "cuda", "mfu": 0.01, "device_names": ["NVIDIA H100 80GB HBM3"]}
    (said, _) = result_captions(run(result=cuda, ranks=measured))
    assert said.startswith("tensor peak: the allocator's peak without cuBLAS's workspaces (up to 64.0 MiB a rank")
    assert "compared" in said
    older = [{"peak_tensor_bytes": 70 * 2**20}]  # a CUDA run recorded before the workspaces were measured apart
    assert "cuBLAS's workspaces included" in result_captions(run(result=cuda, ranks=older))[0]
    assert result_captions(run(result={"device": "cpu"}, ranks=[{"peak_tensor_bytes": 2**20}])) == []


def test_filters_from_days_and_choices():
    assert parse_day("2026-11-24") == date(2026, 11, 24) and parse_day("soon") is None and parse_day(None) is None
    assert day_range(()) == (None, None)
    assert day_range((date(2026, 1, 1),)) == (date(2026, 1, 1), None)
    assert day_range([date(2026, 1, 1), date(2026, 1, 3)]) == (date(2026, 1, 1), date(2026, 1, 3))
    f = run_filter({"strategy": ["layer"], "user": []}, "nightly", date(2026, 1, 1), date(2026, 1, 3))
    assert (f.strategy, f.user, f.status, f.tag) == (["layer"], None, None, ["nightly"])
    assert (f.since, f.until) == (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 4, tzinfo=UTC))  # end inclusive
    assert run_filter({}, "", None, None).tag is None


def test_a_cancelled_runs_page_says_what_its_recorded_steps_measured(engine):
    """Cancelled after 3 of 300 timed steps: its page kept the charts but no figure; now the recorded steps' median,
    warm-up left out as the finished run's figure leaves it."""
    from runner import api
    from runner.spec.records import Step
    from runner.spec.run_spec import RunSpec
    from storage import runner_rows
    from tests.test_ui_pages import page, texts

    run_id = api.submit(engine, RunSpec(strategy="single", steps=300))
    runner_rows.claim_run(engine, run_id, "r", "/tmp/none", [])
    times = [(True, 5.0), (False, 0.2), (False, 0.4), (False, 0.3)]  # the warm-up step's 5 s is not a step's time
    runner_rows.add_step_metrics(engine, run_id, [Step(rank=0, t=float(i), step=i, total_steps=301, warmup=w,
                                                       step_time_s=s, loss=1.0) for i, (w, s) in enumerate(times)])  # fmt: skip
    runner_rows.finish_run(engine, run_id, "cancelled", error="cancelled by the user")
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    assert "Before it ended, 3 timed steps of 300: step time p50 300.0 ms" in " ".join(texts(at.caption))
    assert unfinished_steps_text(run(status="succeeded", result={"tokens_per_s": 1.0}), None) is None


def test_the_run_page_says_which_model_a_custom_run_built_and_how_tp_laid_its_heads(engine):
    """A custom llama's page said only "custom"; its dimensions, and the key/value heads' layout the ranks report
    (split or replicated over tp), were in result.json alone."""
    from runner.spec.run_spec import RunSpec
    from tests.test_ui_pages import finished_run, page, texts

    spec = RunSpec(strategy="tensor", tp=2, model="custom", n_layer=2, n_head=4, n_embd=64, vocab_size=256,
                   block_size=64, family="llama", n_kv_head=2)  # fmt: skip
    run_id = finished_run(engine, spec, {}, [{"tp_kv_heads": "split"}, {"tp_kv_heads": "split"}])
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    assert ("model: llama family: 2 layers, 4 heads, 2 key/value heads, width 64, MLP 256, vocabulary 256, "
            "context 64, rope_theta 10000, tied head · key/value heads split over the tp ranks") in texts(at.caption)
