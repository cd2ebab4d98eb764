"""bench/RESULTS.md sections: a script rewrites its own section and leaves the others as they are."""

from __future__ import annotations

import pytest

from bench.results import write_section


def test_a_section_is_replaced_in_place_and_others_are_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section("Tensor parallelism", "## Tensor parallelism\n\nold tp\n", path)
    write_section("Pipeline parallelism", "## Pipeline parallelism\n\npp\n", path, notes="why")
    write_section("Tensor parallelism", "## Tensor parallelism\n\nnew tp\n", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "new tp" in text and "old tp" not in text
    assert text.index("## Tensor parallelism") < text.index("## Pipeline parallelism")
    assert "pp\n\nwhy" in text


def test_the_pytorch_side_of_the_tp_benchmark_holds_our_shards():
    # bench_tensor_parallel compares like with like only if ColwiseParallel's contiguous chunk r of the
    # reordered c_attn is exactly our rank r's q, k, v rows (and so one all-reduce per region, as ours).
    from types import SimpleNamespace

    import torch

    from bench.bench_tensor_parallel import fused_qkv_rows
    from runner.gpt.config import GPTConfig
    from runner.gpt.model import GPT, init_parameter, materialize
    from runner.gpt.tp_plan import apply_tensor_parallel

    cfg = GPTConfig(n_layer=1, n_head=4, n_embd=16, vocab_size=32, block_size=8)
    for tp in (2, 4):
        shards = []
        for r in range(tp):  # our rank r's c_attn, as the plan slices it and materialize fills it
            with torch.device("meta"):
                model = GPT(cfg)
            apply_tensor_parallel(model, SimpleNamespace(size=tp, index=r))
            shards.append(dict(materialize(model, seed=0).named_parameters()))
        for leaf in ("weight", "bias"):
            name = f"transformer.h.0.attn.c_attn.{leaf}"
            full = init_parameter(name, (3 * 16, 16) if leaf == "weight" else (3 * 16,), cfg, 0)
            theirs = full[fused_qkv_rows(cfg, tp)].chunk(tp)
            for r in range(tp):
                assert torch.equal(theirs[r], shards[r][name])


def test_the_unequal_stage_model_is_the_textbook_bubble_when_stages_are_equal():
    from bench.bench_bubble import unequal_stage_bubble

    for p in (2, 4):
        for m in (1, 2, 8):
            assert abs(unequal_stage_bubble([1.0] * p, [2.0] * p, m) - (p - 1) / (m + p - 1)) < 1e-12
    # A slower last stage: the others wait for it every microbatch, so more idle than the formula says,
    # and it no longer goes to 0 as m grows.
    assert unequal_stage_bubble([1.0, 1.5], [2.0, 3.0], 16) > 1 / 17
    assert unequal_stage_bubble([1.0, 1.5], [2.0, 3.0], 10_000) > 0.15


PLAYBOOK_HEADER = "model,nodes,gpus,dp,tp,pp,zero,mbs,grad_acc,gbs_sequences,seq,mfu_pct,tok_s_gpu,gpu_mem_gb\n"


def playbook_csv(tmp_path, rows: str):
    """A Playbook CSV of `rows` (lines in the measured file's columns) under tmp_path."""
    path = tmp_path / "runs.csv"
    path.write_text(PLAYBOOK_HEADER + rows)
    return path


def test_the_playbook_benchmark_counts_fit_and_memory_from_each_row(tmp_path):
    # Four 1B runs: one that ran, the same one whose figures are missing (read as out of memory), a micro-batch of
    # 256 sequences the planner says cannot fit, and pp 32 on 16 layers (one layer a stage, as nanotron cuts it):
    # small enough to fit, but a layout nanotron cannot train (its output rank holds no loss), so predicted not to run.
    from bench.bench_playbook import plan_row, read_rows, summarize

    csv = playbook_csv(tmp_path, "1B,1,8,8,1,1,0,1,32,256,4096,38.3,39273,36.7\n"
                                 "1B,1,8,8,1,1,0,1,32,256,4096,,,\n"
                                 "1B,1,8,8,1,1,0,256,1,256,4096,,,\n"
                                 "1B,4,32,1,1,32,0,1,256,256,4096,,,\n")  # fmt: skip
    rows = read_rows(csv)
    planned = [plan_row(r, 131072, "none") for r in rows]
    assert [p.fits for p in planned] == [True, True, False, True]
    assert [p.runs for p in planned] == [True, True, False, False]
    s = summarize(planned)
    assert (s.planned, s.cut, s.measured) == (4, 0, 1)
    assert s.fit_counts == {(True, True): 1, (True, False): 1, (False, False): 2} and s.fit_agreement == 3 / 4
    assert s.memory_fit_agreement == 2 / 4 and s.untrainable == (1, 0)
    assert s.memory_median == abs(planned[0].memory / (36.7 * 2**30) - 1)


def test_the_playbook_benchmark_sets_aside_failures_no_memory_figure_explains(tmp_path):
    # One layout (1B on a node, dp 8): micro-batch 1 failed while 2 ran at ZeRO-0 and 2 ran at ZeRO-1, so neither
    # micro-batch 1 failure is a memory one; micro-batch 4 failed above a 2 that ran: memory can explain it. A layout
    # none of whose micro-batches ran (tp 2 x dp 4) cannot be told apart from a broken launch.
    from bench.bench_playbook import plan_row, read_rows
    from bench.playbook_limits import memory_cannot_explain, zero_twins

    csv = playbook_csv(tmp_path, "1B,1,8,8,1,1,0,1,32,256,4096,,,\n"
                                 "1B,1,8,8,1,1,0,2,16,256,4096,38.3,39000,50.0\n"
                                 "1B,1,8,8,1,1,0,4,8,256,4096,,,\n"
                                 "1B,1,8,8,1,1,1,1,32,256,4096,,,\n"
                                 "1B,1,8,8,1,1,1,2,16,256,4096,20.0,19500,45.0\n"
                                 "1B,1,8,4,2,1,0,1,64,256,4096,,,\n")  # fmt: skip
    rows = read_rows(csv)
    assert memory_cannot_explain(rows) == [True, False, False, True, False, True]
    twins = zero_twins([plan_row(r, 131072, "none") for r in rows], min_pairs=1)
    # the one pair with a result on both sides (micro-batch 2) measured 19,500 / 39,000 = 0.5: more than 25% apart
    assert twins.pairs == 1 and twins.measured_quartiles == (0.5, 0.5, 0.5) and twins.off_25 == 1.0
    # the planner's ZeRO-1 adds an all-gather and steps an eighth of the optimizer: a few percent either way
    assert 0.9 < twins.predicted_range[0] == twins.predicted_range[1] < 1.1


def test_nanotron_cuts_the_playbook_models_by_cost_counting_the_head():
    """1B: a layer costs 4 h^2 + 3 h f = 2^24 + 3 * 2^24 = 2^26, the head V h = 2^17 * 2^11 = 2^28, four layers' worth:
    20 layers' worth in all. Over 4 stages each share is 5 layers' worth; a rank takes blocks until the running cost
    passes its share (strictly), so the 5th layer (exactly 5) stays and the 6th joins stage 0: 6, 5 (to 11 > 10),
    5 (to 16 > 15) and the head alone. Over 2 stages: 11 (11 > 10) and 5 with the head."""
    from bench.bench_playbook import model, nanotron_cut

    one_b = model("1B", 131072, 4096)
    assert nanotron_cut(one_b, 4) == (6, 5, 5, 0)
    assert nanotron_cut(one_b, 2) == (11, 5)
    assert nanotron_cut(one_b, 32) == (1,) * 16 + (0,) * 16  # a share below one layer: one layer a stage


def test_nanotron_names_an_output_rank_past_the_loss_where_stages_outnumber_its_cut():
    """1B at a 131,072 vocabulary: a layer 2^26, the head 2^28 (four layers' worth), 20 in all. Over 16 stages a rank's
    share is 1.25 layers' worth: the 16th layer ends at 16 > 15 (rank 11's 12 x 1.25) and moves on; the final norm
    stays on rank 12 (16 <= 16.25), the head takes it to 20 > 16.25, so the cast sits on 13 and the loss on 14, and
    the loss's 20 > 18.75 names rank 15, which holds nothing, the output rank. Over 8 stages the loss is on rank 7,
    whose share is the whole (20 > 20 is false): the output rank holds it. At 32,768 the head is one layer's worth (17
    in all, 1.0625 a rank over 16) and the loss reaches the last rank: 1B over 16 stages trains there."""
    from bench.bench_playbook import model, nanotron_blocks, nanotron_trains

    one_b = model("1B", 131072, 4096)
    owner, output = nanotron_blocks(one_b, 16)
    assert owner[-4:] == (12, 12, 13, 14) and output == 15 and 15 not in owner  # norm, head, cast, loss
    assert not nanotron_trains(one_b, 16) and nanotron_trains(one_b, 8)
    assert nanotron_trains(model("1B", 32768, 4096), 16)
    eight_b = model("8B", 131072, 4096)  # a layer 4 h^2 + 3 h f = 243M beside a head of 537M: it spreads further
    assert nanotron_trains(eight_b, 32) and not nanotron_trains(eight_b, 64)


def test_the_playbook_memory_is_rank_0s_and_the_fit_the_busiest_ranks(tmp_path):
    """nanotron writes world rank 0's peak (pipeline stage 0): a measured 1B run on 2 stages, one micro-batch of 8
    sequences, against stage 0's prediction, whose 11 layers hold the micro-batch; the last stage's 5 layers hold it
    too, and its head's float32 logits (8 x 4096 x 131072 x 4 bytes = 16 GiB, and their gradient) make it the
    busiest rank, which alone decides the fit: at 10 sequences it no longer fits, though stage 0 would."""
    from bench.bench_playbook import plan_row, read_rows

    csv = playbook_csv(tmp_path, "1B,4,32,16,1,2,1,8,1,128,4096,22.0,19338,41.3\n"
                                 "1B,4,32,16,1,2,1,10,1,160,4096,,,\n")  # fmt: skip
    measured, larger = (plan_row(r, 131072, "none") for r in read_rows(csv))
    assert abs(measured.memory / (41.3 * 2**30) - 1) < 0.1 and measured.fits
    assert larger.memory < 78 * 2**30 and not larger.fits


def test_the_playbook_growth_per_sequence_compares_differences_within_a_layout(tmp_path):
    """1B on a node at dp 8: 1 and 2 sequences a micro-batch ran at 36.7 and 50.2 GiB (the CSV's rows; the second ran
    at dp 64, the same per-rank work at ZeRO-0), 13.5 GiB for the added sequence. The planner adds one sequence's
    activations and logits, about 12.6 GiB at tp 1: a ratio near 1, and one pair. A run without a figure and a run
    of another layout make no pair."""
    from bench.bench_playbook import plan_row, read_rows
    from bench.playbook_limits import growth_per_sequence

    csv = playbook_csv(tmp_path, "1B,1,8,8,1,1,0,1,32,256,4096,38.3,39273,36.7\n"
                                 "1B,1,8,8,1,1,0,2,16,256,4096,49.0,50000,50.2\n"
                                 "1B,1,8,8,1,1,0,4,8,256,4096,,,\n"
                                 "1B,1,8,4,2,1,0,1,64,256,4096,19.7,20000,19.5\n")  # fmt: skip
    growth = growth_per_sequence([plan_row(r, 131072, "none") for r in read_rows(csv)])
    assert list(growth) == [1] and growth[1][0] == 1
    assert 1.0 < growth[1][1] < 1.15


def test_the_playbook_ratio_by_kind_bands_layouts_and_micro_batches(tmp_path):
    """Three runs that ran, each with tokens/s per GPU of 1,000: a pipeline at tp 1 with one sequence a micro-batch, a
    pipeline at tp 16 with 16, and no pipeline at tp 2 with 4; a run without a result is left out. Each lands in its
    own (pipeline, tp band, micro-batch band) with measured / predicted = 1,000 / the planner's tokens/s."""
    from bench.bench_playbook import plan_row, read_rows
    from bench.playbook_limits import ratio_by_kind

    csv = playbook_csv(tmp_path, "1B,1,8,4,1,2,0,1,64,256,4096,1,1000,30\n"
                                 "1B,4,32,1,16,2,0,16,16,256,4096,1,1000,10\n"
                                 "1B,1,8,4,2,1,0,4,16,256,4096,1,1000,20\n"
                                 "1B,1,8,4,2,1,0,8,8,256,4096,,,\n")  # fmt: skip
    planned = [plan_row(r, 131072, "none") for r in read_rows(csv)]
    kinds = ratio_by_kind(planned)
    assert kinds == {
        (False, "tp 2-8", "4-8"): (1, pytest.approx(1000 / planned[2].tok_s_gpu)),
        (True, "tp 1", "1-2"): (1, pytest.approx(1000 / planned[0].tok_s_gpu)),
        (True, "tp 16-32", "16+"): (1, pytest.approx(1000 / planned[1].tok_s_gpu)),
    }


def test_the_playbook_per_micro_batch_time_is_the_step_over_its_accumulation(tmp_path):
    """A tp 2 pipeline (1 node, dp 2) at 1 and 2 sequences a micro-batch with 1,000 and 2,000 tokens/s per GPU: a step
    of 256 x 4,096 tokens over 8 GPUs takes 131.072 s and 65.536 s, over 128 and 64 micro-batches 1,024 ms each. A tp
    16 pipeline that ran at three sizes is across nodes (beyond max_tp), a tp 2 run without a pipeline is not one,
    and a size without a result is left out."""
    from bench.bench_playbook import plan_row, read_rows
    from bench.playbook_limits import per_micro_batch

    csv = playbook_csv(tmp_path, "1B,1,8,2,2,2,0,1,128,256,4096,1,1000,10\n"
                                 "1B,1,8,2,2,2,0,2,64,256,4096,1,2000,12\n"
                                 "1B,1,8,2,2,2,0,4,32,256,4096,,,\n"
                                 "1B,4,32,1,16,2,0,1,256,256,4096,1,100,5\n"
                                 "1B,4,32,1,16,2,0,2,128,256,4096,1,200,6\n"
                                 "1B,4,32,1,16,2,0,4,64,256,4096,1,400,7\n"
                                 "1B,1,8,4,2,1,0,1,64,256,4096,1,3000,9\n")  # fmt: skip
    planned = [plan_row(r, 131072, "none") for r in read_rows(csv)]
    layout, runs = per_micro_batch(planned)
    assert layout == ("1B", 1, 2, 2, 2, 0)
    assert [(b, pytest.approx(m)) for b, m, _ in runs] == [(1, 1024.0), (2, 1024.0)]
    # the prediction by the same arithmetic from the planner's own tokens/s
    assert runs[0][2] == pytest.approx(256 * 4096 / (planned[0].tok_s_gpu * 8) / 128 * 1e3)
    assert per_micro_batch(planned, max_tp=16)[0] == ("1B", 4, 16, 2, 1, 0)  # three sizes ran


def test_best_usable_finds_the_usable_memory_that_best_separates_runs_from_failures():
    """Peaks of 30, 50 and 55 GiB ran, 60 and 70 failed, and 45 failed among them. Usable memory from 55 to 59.5 GiB
    agrees on 5 of 6 (the 45 GiB failure is wrong wherever the line goes); below 50 the 50 and 55 runs are wrong as
    well, 4 of 6 at best. The lowest of the best is reported; a configuration the planner cannot lay out (no memory)
    is not counted."""
    from bench.bench_playbook import Planned, Row
    from bench.playbook_limits import best_usable

    def planned(gib: float | None, ran: bool) -> Planned:
        row = Row("1B", 1, 1, 1, 8, 0, 1, 32, 4096, 1000.0 if ran else None, None)
        peak = None if gib is None else gib * 2**30
        return Planned(row, peak, busiest=peak or 0.0)

    ran = [planned(30, True), planned(50, True), planned(55, True)]
    failed = [planned(45, False), planned(60, False), planned(70, False)]
    assert best_usable(ran + failed + [planned(None, True)]) == (5 / 6, 55.0)


def test_the_playbook_benchmark_names_a_missing_csv_and_the_fix(tmp_path, capsys):
    from bench.bench_playbook import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--csv", str(tmp_path / "absent.csv"), "--results", str(tmp_path / "RESULTS.md")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--csv: no file at" in err and "measured-1b-8b.csv" in err
    assert not (tmp_path / "RESULTS.md").exists()


def test_a_playbook_run_stalled_where_its_slot_took_several_times_its_kinds_fastest(tmp_path):
    """1B, tp 2, pp 2, one sequence a micro-batch, 256 sequences a step of 4,096 tokens. On one node (dp 2, 128
    micro-batches) at 4,000 tokens/s per GPU a step takes 256 x 4,096 / (4,000 x 8) = 32.77 s over 128 + 1 slots:
    254 ms a slot. On two nodes (dp 4, 64 micro-batches) at 900 tokens/s: 72.82 s over 65 slots, 1,120 ms, 4.41
    times as long: stalled at 4x, not at 6x, and not judged when only steps of 128 micro-batches are. Its ZeRO-1 twin
    at 3,800 tokens/s (265 ms a slot) did not stall. A micro-batch of 2 is its own kind (its only run is its fastest),
    and a run without a result never stalls."""
    from bench.bench_playbook import plan_row, read_rows, summarize
    from bench.playbook_limits import slot_seconds, stalled, stalls

    csv = playbook_csv(tmp_path, "1B,1,8,2,2,2,0,1,128,256,4096,1,4000,30\n"
                                 "1B,2,16,4,2,2,0,1,64,256,4096,1,900,30\n"
                                 "1B,2,16,4,2,2,1,1,64,256,4096,1,3800,30\n"
                                 "1B,2,16,4,2,2,0,2,32,256,4096,1,100,30\n"
                                 "1B,2,16,4,2,2,0,4,16,256,4096,,,\n")  # fmt: skip
    rows = read_rows(csv)
    assert slot_seconds(rows[0]) == pytest.approx(0.254, abs=1e-3)
    assert slot_seconds(rows[1]) == pytest.approx(1.120, abs=1e-3)
    assert stalled(rows) == [False, True, False, False, False]
    assert stalled(rows, factor=6) == [False] * 5
    assert stalled(rows, min_accumulation=128) == [False] * 5
    found = stalls([plan_row(r, 131072, "none") for r in rows], summarize)
    assert (found.count, found.in_pipelines, found.twins) == (1, 1, (1, 1))
    assert found.rho_without[(4, 1)][0] == 1 and found.rho_without[(10, 1)][0] == 0


def test_a_pipelines_slot_across_nodes_is_set_against_the_same_layout_within_one(tmp_path):
    """nanotron orders ranks (pp, dp, tp): the next stage is dp x tp ranks on. 1B tp 4 pp 2 on one node (dp 1): rank
    r's next stage is r + 4, on the same node; on two nodes (dp 2) it is r + 8, on the other. The first at 20,000
    tokens/s per GPU: 256 x 4,096 / (20,000 x 8) = 6.554 s over 257 slots, 25.5 ms; the second at 6,000: 10.923 s
    over 129 slots, 84.7 ms (3.32x, below the 4x of a stall), 59.2 ms more. tp 1 pp 8 on one node (r + 1) crosses
    no node; tp 2 pp 4 on two nodes (dp 2: r + 4) does, from rank 4 on. A layout run on one side only gives nothing."""
    from bench.bench_playbook import read_rows
    from bench.playbook_limits import crossing_cost, stages_cross_nodes

    csv = playbook_csv(tmp_path, "1B,1,8,1,4,2,0,1,256,256,4096,1,20000,30\n"
                                 "1B,2,16,2,4,2,0,1,128,256,4096,1,6000,30\n"
                                 "1B,1,8,1,1,8,0,1,256,256,4096,1,3000,30\n"
                                 "1B,2,16,2,2,4,0,1,128,256,4096,1,3000,30\n")  # fmt: skip
    rows = read_rows(csv)
    assert [stages_cross_nodes(r) for r in rows] == [False, True, False, True]
    ((key, [(ratio, extra)]),) = crossing_cost(rows).items()
    assert key == (4, True) and ratio == pytest.approx(3.32, abs=0.01) and extra == pytest.approx(0.0592, abs=2e-4)
