"""The pages under Streamlit's AppTest against a real database in a temporary LAB_HOME (no browser).

Page scripts start no runner; where a test needs one to be "alive" it holds the runner lease itself
through the storage API, so the pages see exactly what a live runner would report.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from streamlit.testing.v1 import AppTest

from runner import api
from runner.spec.run_spec import RunSpec
from storage import hosts as leases
from storage import runner_rows

REPO = Path(__file__).resolve().parent.parent
H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * 2**30}


def page(path: str, **query) -> AppTest:
    at = AppTest.from_file(str(REPO / path), default_timeout=30)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


@contextmanager
def runner_lease(engine, gpus: list[dict]):
    """This process holds the lease as a runner would; released before the fixture's stop_runner could signal us."""
    assert leases.acquire_lease(engine, "test-runner", os.getpid(), gpus, "test lease")
    try:
        yield
    finally:
        leases.release_lease(engine, "test-runner")


def query_list(at: AppTest, name: str) -> list[str]:
    """AppTest keeps a one-element query parameter as a plain string; compare as lists either way."""
    value = at.query_params.get(name, [])
    return [value] if isinstance(value, str) else list(value)


def texts(elements) -> list[str]:
    return [e.value for e in elements]


# ---- launch ----------------------------------------------------------------------------------
def test_launch_page_shows_a_bad_degree_under_its_field_and_disables_launch(engine):
    at = page("pages/launch.py")
    assert not at.exception
    at.number_input(key="launch_pp").set_value(3).run()
    errors = texts(at.error)
    assert any("splitting the layers over 3 ranks needs n_layer divisible by 3" in e for e in errors), errors
    assert at.button(key="launch_submit").disabled
    assert not at.code  # no command preview for a spec that will not run
    assert api.count_runs(engine) == 0
    at.number_input(key="launch_batch").set_value(0)
    at.number_input(key="launch_seq").set_value(0).run()  # one row, one cause: each message names its field
    assert {"**batch**: must be at least 1 (got 0)", "**seq**: must be at least 1 (got 0)"} <= set(texts(at.error))


def test_a_tensor_degree_that_does_not_divide_the_heads_names_tp(engine):
    at = page("pages/launch.py")
    at.selectbox(key="launch_strategy").select("tensor").run()
    at.number_input(key="launch_tp").set_value(3).run()
    assert any("n_head divisible by 3" in e for e in texts(at.error)), texts(at.error)
    assert at.button(key="launch_submit").disabled


def test_launch_page_previews_the_torchrun_command_and_memory(engine):
    at = page("pages/launch.py")
    code = texts(at.code)
    assert any("torch.distributed.run --nproc-per-node 2" in c and "-m runner.job" in c for c in code), code
    assert [m.label for m in at.metric][:3] == ["ranks", "parameters per rank (largest)", "AdamW state per rank"]
    # forward keeps no optimizer state
    at.radio(key="launch_workload").set_value("forward").run()
    assert at.metric[2].value == "—"


def test_custom_model_dimensions_appear_and_are_validated(engine):
    at = page("pages/launch.py")
    at.selectbox(key="launch_model").select("custom").run()
    at.number_input(key="launch_n_layer").set_value(3).run()
    assert any("n_layer divisible by 2" in e for e in texts(at.error)), texts(at.error)
    # an empty part shows what it becomes at the typed dimensions: 8 heads' worth of key/value heads, 4 x 96 wide
    at.number_input(key="launch_n_head").set_value(8)
    at.number_input(key="launch_n_embd").set_value(96).run()
    placeholders = (at.number_input(key="launch_n_kv_head").proto.placeholder,
                    at.number_input(key="launch_ffn_hidden").proto.placeholder)  # fmt: skip
    assert placeholders == ("8", "384")


def test_a_custom_llama_is_validated_under_its_fields_and_launched(engine):
    at = page("pages/launch.py")
    at.selectbox(key="launch_model").select("custom").run()
    at.selectbox(key="launch_family").select("llama").run()
    at.number_input(key="launch_n_kv_head").set_value(3).run()
    assert any("n_kv_head must divide n_head 4" in e for e in texts(at.error)), texts(at.error)
    at.number_input(key="launch_n_kv_head").set_value(2).run()
    at.checkbox(key="launch_tie_head").uncheck().run()
    at.button(key="launch_submit").click().run()
    (run,) = api.list_runs(engine).to_dict("records")
    spec = api.get_run(engine, int(run["id"]))["spec"]
    assert (spec["family"], spec["n_kv_head"], spec["tie_head"]) == ("llama", 2, False)


def test_a_hugging_face_folder_shows_its_config_dimensions(engine, tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, '
        '"num_hidden_layers": 4, "intermediate_size": 176, "vocab_size": 512, "max_position_embeddings": 128}'
    )
    at = page("pages/launch.py")
    assert at.selectbox(key="launch_model").value == "tiny"
    at.text_input(key="launch_weights").input(str(tmp_path)).run()  # the folder sets the model, as submit --weights
    assert at.selectbox(key="launch_model").value == "checkpoint"
    assert not any(e.startswith("**model**") for e in texts(at.error)), texts(at.error)
    captions = texts(at.caption)
    assert any("llama family: 4 layers, 4 heads, 2 key/value heads, width 64, MLP 176" in c for c in captions), captions
    assert any("no model.safetensors" in e for e in texts(at.error)), texts(at.error)  # no tensors in the folder
    # a preset is described as the run builds it: text read byte by byte makes the vocabulary 256
    at = page("pages/launch.py")
    assert any("vocabulary 512" in c for c in texts(at.caption))
    at.text_input(key="launch_data").input("stdlib").run()
    assert any("vocabulary 256" in c for c in texts(at.caption)), texts(at.caption)


def test_devices_panel_says_cpu_processes_without_gpus(engine):
    with runner_lease(engine, []):
        at = page("pages/launch.py")
    assert any("runs use CPU processes with the gloo backend" in m.value for m in at.markdown)


def test_devices_panel_lists_the_runners_gpus_and_cuda_becomes_valid(engine):
    with runner_lease(engine, [H100, {**H100, "index": 1, "busy_pids": [4242]}]):
        at = page("pages/launch.py")
        at.selectbox(key="launch_device").select("cuda").run()
    assert any("NVIDIA H100 80GB HBM3" in m.value for m in at.markdown)
    busy = [m.value for m in at.markdown if m.value.startswith("GPU 1:")]
    assert busy and busy[0].endswith("busy: pid 4242 not started by this runner; runs wait for it"), busy
    assert not at.error and not at.button(key="launch_submit").disabled


def test_cuda_without_gpus_is_refused_next_to_device(engine):
    with runner_lease(engine, []):
        at = page("pages/launch.py")
        at.selectbox(key="launch_device").select("cuda").run()
    assert any("is 'cuda' but test lease;" in e for e in texts(at.error)), texts(at.error)  # the runner's own note


def test_launch_button_queues_the_run_with_the_form_values(engine):
    at = page("pages/launch.py")
    at.text_input(key="launch_tags").input("baseline, tiny").run()
    at.button(key="launch_submit").click().run()
    (run,) = api.list_runs(engine).to_dict("records")
    assert run["strategy"] == "layer" and run["pp"] == 2 and run["status"] == "queued"
    assert list(run["tags"]) == ["baseline", "tiny"]


def test_launch_with_repeat_queues_a_comparison_set_and_links_compare(engine):
    at = page("pages/launch.py")
    at.number_input(key="launch_repeat").set_value(3).run()
    assert "75% confidence (their min..max; 6 runs reach 95%)" in " ".join(texts(at.caption))
    at.button(key="launch_submit").click().run()
    runs = api.list_runs(engine).sort_values("id").to_dict("records")
    ids = [int(r["id"]) for r in runs]
    assert len(ids) == 3 and {api.get_run(engine, i)["set_id"] for i in ids} == {ids[0]}
    assert f"(/compare?runs={','.join(map(str, ids))})" in at.success[0].value
    # out of range: said under the field and nothing launches (a min/max would have launched the last valid value)
    at = page("pages/launch.py")
    at.number_input(key="launch_repeat").set_value(60).run()
    assert "must be a whole number from 1 to 50 (got 60)" in " ".join(texts(at.error))
    assert at.button(key="launch_submit").disabled


def test_launch_queues_issue_14s_options_from_the_page(engine):
    """Interleaved pipeline with its virtual stages, checkpointing and bf16-mixed; then ZeRO on data parallelism."""
    at = page("pages/launch.py")
    at.selectbox(key="launch_strategy").select("pipeline").run()
    assert at.number_input(key="launch_virtual_stages").disabled  # only the interleaved schedule has chunks
    at.selectbox(key="launch_schedule").select("interleaved-1f1b").run()
    at.number_input(key="launch_virtual_stages").set_value(2).run()
    at.text_input(key="launch_checkpoint").input("every-2").run()
    at.selectbox(key="launch_dtype").select("bf16-mixed").run()
    assert at.selectbox(key="launch_zero_stage").disabled  # a pipeline has no data replicas to shard over
    at.button(key="launch_submit").click().run()
    at = page("pages/launch.py")
    at.selectbox(key="launch_strategy").select("data").run()
    at.selectbox(key="launch_zero_stage").select(3).run()
    at.button(key="launch_submit").click().run()
    specs = [api.get_run(engine, int(i))["spec"] for i in sorted(api.list_runs(engine)["id"])]
    got = [(s["strategy"], s["schedule"], s["virtual_stages"], s["checkpoint"], s["dtype"], s["zero_stage"])
           for s in specs]  # fmt: skip
    assert got[0] == ("pipeline", "interleaved-1f1b", 2, "every-2", "bf16-mixed", 0)
    assert (got[1][0], got[1][5]) == ("data", 3)


def test_launch_refuses_checkpointing_a_pipeline_by_a_bad_policy_under_its_field(engine):
    at = page("pages/launch.py")
    at.text_input(key="launch_checkpoint").input("sometimes").run()
    assert any("every-K with K a whole number" in e for e in texts(at.error)), texts(at.error)
    assert at.button(key="launch_submit").disabled


def test_launch_warns_before_a_cpu_run_with_more_ranks_than_cores(engine, monkeypatch):
    import runner.spec.run_spec

    monkeypatch.setattr(runner.spec.run_spec, "usable_cores", lambda: 2)  # this machine, as the warning sees it
    with runner_lease(engine, []):
        at = page("pages/launch.py")
        assert not at.warning  # pp=2 on 2 cores
        at.number_input(key="launch_pp").set_value(4).run()
    (warning,) = texts(at.warning)
    assert warning.startswith("4 ranks on 2 CPU cores") and "oversubscribed" in warning
    assert not at.button(key="launch_submit").disabled  # a warning, not a refusal


def test_no_oversubscription_warning_for_a_gpu_run(engine, monkeypatch):
    import runner.spec.run_spec

    monkeypatch.setattr(runner.spec.run_spec, "usable_cores", lambda: 1)
    with runner_lease(engine, [H100, {**H100, "index": 1}]):
        at = page("pages/launch.py")
    assert not at.warning


def test_the_self_test_button_queues_runs_tagged_selftest_and_links_them(engine):
    with runner_lease(engine, []):
        at = page("pages/launch.py")
        at.selectbox(key="launch_selftest_device").select("cpu").run()
        at.text_input(key="launch_user").set_value("grace").run()
        at.button(key="launch_selftest").click().run()
    runs = api.list_runs(engine).to_dict("records")
    assert runs and all("selftest" in r["tags"] and r["user"] == "grace" for r in runs)
    (done,) = texts(at.success)
    assert f"Queued {len(runs)} self-test runs" in done and "(/history?tag=selftest)" in done
    assert all(f"[#{r['id']}](/history?run={r['id']})" in done for r in runs)


def test_a_self_test_on_cuda_without_gpus_queues_nothing_and_says_why(engine):
    with runner_lease(engine, []):
        at = page("pages/launch.py")
        at.selectbox(key="launch_selftest_device").select("cuda").run()
        at.button(key="launch_selftest").click().run()
    assert api.count_runs(engine) == 0
    assert any("No self-test run fits these devices (the runner sees 0 GPU(s))" in w for w in texts(at.warning))


# ---- history ---------------------------------------------------------------------------------
def test_history_empty_state_offers_a_first_run(engine):
    at = page("pages/history.py")
    assert any("No runs yet" in i.value for i in at.info)
    at.button(key="history_first").click().run()
    (run,) = api.list_runs(engine).to_dict("records")
    assert (run["strategy"], run["pp"], run["model"]) == ("layer", 2, "tiny")
    assert at.query_params["run"] == str(run["id"])


def test_history_filters_come_from_the_query_string(engine):
    api.submit(engine, RunSpec(strategy="layer", pp=2))
    api.submit(engine, RunSpec(strategy="data", dp=2))
    at = page("pages/history.py", strategy="data")
    assert at.multiselect(key="history_strategy").value == ["data"]
    assert any(c.value.startswith("1 run match") for c in at.caption)
    assert at.dataframe[0].value["strategy"].tolist() == ["data"]


def test_choosing_a_filter_writes_it_to_the_query_string(engine):
    api.submit(engine, RunSpec(strategy="layer", pp=2, tags=("nightly",)))
    api.submit(engine, RunSpec(strategy="data", dp=2))
    at = page("pages/history.py")
    assert any(c.value.startswith("2 runs match") for c in at.caption)
    at.multiselect(key="history_strategy").select("layer").run()
    at.text_input(key="history_tag").input("nightly").run()
    assert query_list(at, "strategy") == ["layer"] and query_list(at, "tag") == ["nightly"]
    assert at.dataframe[0].value["strategy"].tolist() == ["layer"]
    at.multiselect(key="history_strategy").unselect("layer").run()
    assert "strategy" not in at.query_params


def test_run_detail_shows_the_failure_reason_and_traceback(engine):
    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2))
    runner_rows.claim_run(engine, run_id, "r", "/tmp/none", [])
    runner_rows.finish_run(engine, run_id, "failed", error="rank 1 was killed by signal 9 (SIGKILL)", failed_rank=1,
                       exit_code=1, traceback="Traceback (most recent call last):\n  boom")  # fmt: skip
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    assert any("rank 1 was killed by signal 9" in e and "rank 1, exit code 1" in e for e in texts(at.error))
    assert any("Traceback" in c for c in texts(at.code))


def test_the_run_page_reads_the_run_once_per_rerun_and_uses_its_stored_world_size(engine, tmp_path, monkeypatch):
    from sqlalchemy import text

    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2))
    runner_rows.claim_run(engine, run_id, "r", str(tmp_path), [])
    runner_rows.finish_run(engine, run_id, "succeeded")
    with engine.begin() as conn:  # a stored world size the spec does not say: the page must use the column
        conn.execute(text("UPDATE runs SET world_size = 3 WHERE id = :i"), {"i": run_id})
    (tmp_path / "rank2.log").write_text("the third rank\n")
    reads = []
    get_run = api.get_run
    monkeypatch.setattr(api, "get_run", lambda *a, **k: reads.append(a[1:]) or get_run(*a, **k))
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception and reads == [(run_id,)]
    ranks = at.selectbox(key=f"history_logrank_{run_id}")
    assert ranks.options == ["0", "1", "2"]
    ranks.select(2).run()
    assert "the third rank" in texts(at.code) and len(reads) == 2  # one more rerun, one more read


def test_run_detail_of_a_finished_run_shows_figures_verify_and_ranks(engine, tmp_path):
    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2, verify=True))
    runner_rows.claim_run(engine, run_id, "r", str(tmp_path), [])
    rank = {"tp": 0, "dp": 0, "param_count": 1000, "param_bytes": 4000, "optimizer_bytes": 8000,
            "peak_mem_bytes": 300 * 2**20, "compute_s": 0.5, "comm_s": 0.01, "idle_s": 0.02,
            "comm_bytes": {"send": 2**20, "recv": 2**20, "all_reduce": 0}, "comm_calls": {"send": 5}}  # fmt: skip
    result = {"tokens_per_s": 6868.0, "step_time_s_p50": 0.0746, "step_time_s_p90": 0.1388, "achieved_gflops": 10.1,
              "bubble_fraction": 0.445, "bubble_fraction_theory": 0.5, "device_names": ["cpu"],
              "verify": {"logits_max_abs_diff": 0.0, "loss_abs_diff": 0.0, "grads_max_abs_diff": 1e-7,
                         "tokens_equal": None},
              "ranks": [{**rank, "rank": 0, "pp": 0}, {**rank, "rank": 1, "pp": 1}]}  # fmt: skip
    runner_rows.finish_run(engine, run_id, "succeeded", result=result)
    runner_rows.add_spans(engine, run_id, [
        {"step": st, "rank": r, "stage": r, "microbatch": 0, "phase": ph, "start": t0, "end": t0 + 0.01}
        for st in (1, 2) for r in (0, 1) for ph, t0 in (("forward", 0.01 * r), ("backward", 0.05 - 0.01 * r))
    ])  # fmt: skip
    (tmp_path / "rank1.log").write_text("hello from rank 1\n")
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    assert any("succeeded" in h.value for h in at.subheader)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["throughput"] == "6.9 k tok/s" and metrics["run's peak memory"] == "300.0 MiB"
    assert any("bubble measured 44.5%, theory 50.0%" in c.value for c in at.caption)
    # stored before verdicts: its differences are shown, but never as a pass
    assert not at.success and any("Verify: no verdict** (recorded before verdicts)" in i for i in texts(at.info))
    verify, held, spent = (t.value for t in at.table)  # HTML tables: nothing cut
    assert verify["quantity"].tolist() == ["logits", "loss", "gradients"]
    assert verify["max abs diff"].iloc[2] == "1.0e-07"
    assert held["rank"].tolist() == spent["rank"].tolist() == ["0", "1"]
    assert "params MiB" in held and "send MiB" in spent and "all_reduce MiB" not in spent
    charts = [c.proto.spec for c in at.get("vega_lite_chart")]
    assert any("Layer split timeline, step 3 (stage x microbatch)" in c for c in charts), "no timeline of the last step"

    at.selectbox(key=f"history_logrank_{run_id}").select(1).run()
    assert any("hello from rank 1" in c for c in texts(at.code))


def finished_run(engine, spec: RunSpec, result: dict, ranks: list[dict]) -> int:
    """A succeeded run whose result.json held `result` and `ranks` (shaped as the job writes them)."""
    run_id = api.submit(engine, spec)
    runner_rows.claim_run(engine, run_id, "r", "/tmp/none", [])
    base = {"tp": 0, "pp": 0, "dp": 0, "param_count": 1000, "param_bytes": 4000, "optimizer_bytes": 8000,
            "peak_mem_bytes": 2**20, "compute_s": 0.5, "comm_s": 0.01, "idle_s": 0.0, "comm_bytes": {},
            "comm_calls": {}}  # fmt: skip
    result = {"tokens_per_s": 1000.0, "step_time_s_p50": 0.1, "step_times_s": [0.1, 0.1], "device": "cpu",
              "ranks": [{**base, "rank": i, **r} for i, r in enumerate(ranks)], **result}  # fmt: skip
    runner_rows.finish_run(engine, run_id, "succeeded", result=result)
    return run_id


TOLERANCES = {"logits": 1e-5, "loss": 1e-5, "grads": 1e-5, "weights": 1e-6}
VERIFY = {"passed": True, "dtype": "float32", "tolerances": TOLERANCES, "failures": [],
          "logits_max_abs_diff": 2e-7, "logits_max_rel_diff": 3e-7, "loss_abs_diff": 0.0, "loss_rel_diff": 0.0,
          "grads_max_abs_diff": 1e-8, "grads_max_rel_diff": 2e-6, "weights_max_abs_diff": 1e-9,
          "tokens_equal": None}  # fmt: skip


def test_a_verify_within_tolerance_shows_a_pass_badge_and_the_tolerances(engine):
    run_id = finished_run(engine, RunSpec(strategy="data", dp=2, verify=True), {"verify": VERIFY}, [{}, {}])
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    assert any(s.startswith("**Verify: PASS**") for s in texts(at.success)) and not at.error
    assert any("grads rel ≤ 1e-05" in c and "weights abs ≤ 1e-06" in c for c in texts(at.caption))
    table = at.table[0].value
    assert table["quantity"].tolist() == ["logits", "loss", "gradients", "updated weights"]
    assert list(table.columns) == ["quantity", "max abs diff", "max rel diff", "bound"]


def test_a_verify_beyond_tolerance_shows_a_fail_badge_listing_each_failure(engine):
    failed = {**VERIFY, "passed": False, "grads_max_rel_diff": 0.031,
              "failures": ["grads: max rel diff 3.1e-02 > 1e-05", "weights: max abs diff 2.0e-03 > 1e-06"]}  # fmt: skip
    run_id = finished_run(engine, RunSpec(strategy="data", dp=2, verify=True), {"verify": failed}, [{}, {}])
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception and not at.success
    (badge,) = [e for e in texts(at.error) if "Verify: FAIL" in e]
    assert "- grads: max rel diff 3.1e-02 > 1e-05" in badge and "- weights: max abs diff 2.0e-03 > 1e-06" in badge
    assert at.table[0].value.set_index("quantity").loc["gradients", "max rel diff"] == "3.1e-02"


def test_an_oversubscribed_run_says_how_much_idle_and_bubble_was_waiting_for_a_core(engine):
    result = {"cpu_oversubscribed": True, "cpu_cores": 2, "world_size": 4, "bubble_fraction": 0.5,
              "bubble_fraction_theory": 0.43}  # fmt: skip
    ranks = [{"pp": i, "idle_s": 0.5, "cpu_wait_s": w} for i, w in enumerate((0.4, 0.3, 0.3, 0.2))]
    run_id = finished_run(engine, RunSpec(strategy="pipeline", pp=4, microbatches=4), result, ranks)
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception
    (warning,) = texts(at.warning)
    assert warning.startswith("Oversubscribed: 4 ranks on 2 CPU cores")
    assert (
        "waited 1.2 s for a CPU core in total against 2.0 s idle: up to 60% of the idle time and the bubble" in warning
    )
    assert any("verify: off" in c for c in texts(at.caption))


def test_a_run_that_shared_the_machine_is_flagged_on_its_page(engine):
    result = {"others_cpu_share": 0.45, "others_cpu_share_resolution": 0.02, "load_avg_1m_start": 5.2,
              "load_avg_1m_end": 6.0}  # fmt: skip
    run_id = finished_run(engine, RunSpec(strategy="single"), result, [{}])
    at = page("pages/history.py", run=str(run_id))
    (warning,) = texts(at.warning)
    assert warning.startswith("Shared machine: other processes took 45% (±2%) of the job's cores")


def test_an_unknown_gpu_shows_no_mfu_and_a_run_within_its_cores_no_warning(engine):
    result = {"device": "cuda", "device_names": ["Mystery GPU"], "mfu": None, "peak_flops": None,
              "cpu_oversubscribed": False}  # fmt: skip
    run_id = finished_run(engine, RunSpec(strategy="data", dp=2), result, [{"cpu_wait_s": 0.0}, {"cpu_wait_s": 0.0}])
    at = page("pages/history.py", run=str(run_id))
    assert not at.exception and not at.warning
    assert any("no MFU: the peak FLOP/s of Mystery GPU is not known" in c for c in texts(at.caption))
    assert not any(c.startswith("MFU") or "bubble" in c for c in texts(at.caption))


def test_run_detail_of_a_missing_run_says_so(engine):
    at = page("pages/history.py", run="42")
    assert any("There is no run 42" in e for e in texts(at.error))


def test_a_queued_run_can_be_cancelled_from_its_page(engine):
    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2))
    at = page("pages/history.py", run=str(run_id))
    assert any("waiting" in i.value or "runner" in i.value for i in at.info)
    at.button(key=f"history_cancel_{run_id}").click().run()
    assert api.get_run(engine, run_id)["status"] == "cancelled"


# ---- app -------------------------------------------------------------------------------------
def test_app_sidebar_shows_the_runner_heartbeat(engine):
    with runner_lease(engine, []):
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=30).run()
        assert not at.exception
        # The lease was written just before the page ran; a busy machine can take a few seconds to render it.
        assert any(re.match(r"Runner alive, last seen [1-9] s ago", s.value) for s in at.sidebar.success)
        assert any("CPU processes" in c.value for c in at.sidebar.caption)


def test_history_lists_each_runs_verdict_and_colours_both_charts_by_strategy(engine):
    import json

    checked = finished_run(engine, RunSpec(strategy="data", dp=2, verify=True), {"verify": VERIFY}, [{}, {}])
    failed = finished_run(engine, RunSpec(strategy="layer", pp=2), {"verify": {**VERIFY, "passed": False}}, [{}, {}])
    unchecked = finished_run(engine, RunSpec(strategy="single", verify=False), {"verify": None}, [{}])
    queued = api.submit(engine, RunSpec(strategy="single"))
    at = page("pages/history.py")
    assert not at.exception
    table = at.dataframe[0].value.set_index("id")
    assert table.loc[[checked, failed, unchecked, queued], "verify"].tolist() == ["pass", "fail", "off", "—"]
    assert table.loc[queued, "note"] == ""  # no note is an empty cell, not a grey "None"
    throughput, memory = (json.loads(c.proto.spec) for c in at.get("vega_lite_chart")[:2])
    assert throughput["encoding"]["color"]["field"] == memory["encoding"]["color"]["field"] == "strategy"


def test_a_prompted_generate_runs_seq_field_says_the_prompt_sets_it(engine):
    """The field showed 30 beside "seq follows the prompt: 11 tokens" and the run took 11: now it takes no value."""
    at = page("pages/launch.py")
    assert not at.number_input(key="launch_seq").disabled
    at.radio(key="launch_workload").set_value("generate")
    at.text_input(key="launch_data").set_value("stdlib").run()
    at.text_input(key="launch_prompt").set_value("def main():").run()  # in the session before the rerun draws seq
    seq = at.number_input(key="launch_seq")
    assert seq.disabled and seq.help == "set by the prompt: its tokens are the sequence"
    assert any(c.startswith("seq follows the prompt: ") for c in texts(at.caption)) and not at.exception


def test_microbatches_default_to_a_pipelines_four_and_elsewhere_to_the_clis_one(engine):
    """A single run from the page accumulated gradients over 4 microbatches, unasked (the CLI's default is 1), and
    Compare listed "microbatches 4" between it and the same spec from the CLI."""
    at = page("pages/launch.py")
    at.selectbox(key="launch_strategy").set_value("single").run()
    assert at.number_input(key="launch_microbatches_accumulated").value == 1
    at.selectbox(key="launch_strategy").set_value("pipeline").run()
    assert at.number_input(key="launch_microbatches").value == 4 and not at.exception
