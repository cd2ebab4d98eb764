"""ui/cpu.py: how much of an oversubscribed CPU run's idle time (and bubble) was waiting for a core."""

from __future__ import annotations

import pytest

from ui.cpu import contention, contention_text, oversubscription_warning


def ranks(waits, idles):
    return [{"rank": i, "cpu_wait_s": w, "idle_s": s} for i, (w, s) in enumerate(zip(waits, idles, strict=True))]


def test_waits_against_idle_give_the_largest_share_that_can_be_contention():
    c = contention(ranks([0.7, 0.5], [1.5, 0.5]))
    assert (c.wait_s, c.idle_s) == pytest.approx((1.2, 2.0)) and c.share == pytest.approx(0.6)
    assert contention_text(ranks([0.7, 0.5], [1.5, 0.5]), bubble=True) == (
        "ranks waited 1.2 s for a CPU core in total against 2.0 s idle: "
        "up to 60% of the idle time and the bubble is contention, not the schedule"
    )


def test_more_wait_than_idle_means_all_of_it_may_be_contention():
    c = contention(ranks([2.0, 1.0], [0.5, 0.5]))
    assert c.share == 1.0
    assert "all of the idle time may be contention" in contention_text(ranks([2.0, 1.0], [0.5, 0.5]))
    assert "nothing was idle" in contention_text(ranks([0.2, 0.0], [0.0, 0.0]))


def test_no_measurement_on_some_rank_means_no_share():
    assert contention(ranks([0.1, None], [1.0, 1.0])) is None
    assert contention([]) is None


def test_the_warning_only_for_a_run_marked_oversubscribed():
    rs = ranks([0.4, 0.3, 0.2, 0.1], [0.5, 0.5, 0.5, 0.5])
    assert oversubscription_warning({"cpu_oversubscribed": False}, rs) is None
    text = oversubscription_warning({"cpu_oversubscribed": True, "world_size": 4, "cpu_cores": 2}, rs)
    assert text.startswith("Oversubscribed: 4 ranks on 2 CPU cores")
    assert "Ranks waited 1.0 s for a CPU core in total against 2.0 s idle: up to 50% of the idle time is" in text
    unmeasured = oversubscription_warning({"cpu_oversubscribed": True, "world_size": 4}, ranks([None] * 4, [1.0] * 4))
    assert "not measured" in unmeasured


def test_a_run_is_flagged_as_sharing_the_machine_only_when_the_share_surely_reaches_a_tenth():
    from ui.cpu import load_text, shared_machine

    busy = {"others_cpu_share": 0.35, "others_cpu_share_resolution": 0.04, "load_avg_1m_start": 3.1,
            "load_avg_1m_end": 4.0}  # fmt: skip
    assert shared_machine(busy) and load_text(busy).startswith(
        "Shared machine: other processes took 35% (±4%) of the job's cores during its timed steps; "
        "1-minute load average 3.1 → 4.0."
    )
    # 12% measured over a short window whose ticks allow +-5%: it may have been 7%, so not flagged.
    short = {"others_cpu_share": 0.12, "others_cpu_share_resolution": 0.05}
    assert shared_machine(short) is False and load_text(short).startswith("Machine while it ran: other processes")
    assert shared_machine({}) is None and load_text({"tokens_per_s": 1.0}) is None  # a run from before
