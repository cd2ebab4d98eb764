"""The one statistics helper (runner/analysis/stats.py), checked on cases worked out by hand and on its coverage."""

from __future__ import annotations

import math
import random

import pytest

from runner.analysis.stats import (
    direction,
    mann_whitney_counts,
    median_interval,
    ratio_interval,
    runs_needed,
    runs_needed_each,
)


def test_ten_values_give_the_second_and_ninth_order_statistics():
    # Bin(10, 1/2): P(<= 1) = 11/1024 = 0.0107 <= 0.025 but P(<= 2) = 56/1024 = 0.055 is not, so k = 2.
    got = median_interval([7, 3, 10, 1, 9, 2, 8, 4, 6, 5])
    assert (got.estimate, got.low, got.high) == (5.5, 2, 9)
    assert got.confidence == pytest.approx(1 - 22 / 1024) and got.reaches_level


def test_five_values_cannot_reach_95_and_say_so():
    # Only min..max is left, and it covers the median with 1 - 2/32 = 93.75%.
    got = median_interval([5, 1, 4, 2, 3])
    assert (got.estimate, got.low, got.high) == (3, 1, 5)
    assert got.confidence == pytest.approx(0.9375) and not got.reaches_level
    assert "only a 94% interval; 6 values give 95%" in got.describe()


def test_three_runs_cover_the_median_three_times_in_four_and_six_reach_95():
    assert median_interval([1, 2, 3]).confidence == pytest.approx(0.75)
    six = median_interval([1, 2, 3, 4, 5, 6])
    assert (six.low, six.high) == (1, 6) and six.confidence == pytest.approx(1 - 2 / 64)
    assert runs_needed() == 6 and runs_needed_each() == 4
    one = median_interval([4.0])
    assert (one.low, one.high, one.confidence) == (4.0, 4.0, 0.0)


def test_mann_whitney_counts_of_two_and_two():
    # The 6 orders of aabb: U counts pairs a < b. aabb 4, abab 3, abba 2, baab 2, baba 1, bbaa 0.
    assert mann_whitney_counts(2, 2) == (1, 1, 2, 1, 1)
    assert sum(mann_whitney_counts(5, 5)) == math.comb(10, 5)


def test_four_runs_each_resolve_a_clear_difference_with_min_and_max_of_the_ratios():
    # 4 and 4: P(U = 0) = 1/70 <= 0.025 < P(U <= 1) = 2/70, so k = 1: the smallest and largest of 16 ratios.
    got = ratio_interval([10, 11, 12, 13], [20, 21, 22, 23])
    assert (got.low, got.high) == (20 / 13, 23 / 10)
    assert got.confidence == pytest.approx(1 - 2 / 70)
    assert direction(got) == "higher"
    assert direction(ratio_interval([20, 21, 22, 23], [10, 11, 12, 13])) == "lower"


def test_five_and_five_use_the_third_ratio_from_each_end():
    # Counts of U for 5 and 5 start 1, 1, 2, 3: P(U <= 2) = 4/252 <= 0.025 < P(U <= 3) = 7/252, so k = 3.
    a, b = [1, 2, 3, 4, 5], [2, 3, 4, 5, 6]
    ratios = sorted(y / x for x in a for y in b)
    got = ratio_interval(a, b)
    assert (got.low, got.high) == (ratios[2], ratios[-3])
    assert got.confidence == pytest.approx(1 - 8 / 252)


def test_two_identical_distributions_are_not_resolved():
    same = [9.3, 18.9, 10.1, 12.0, 9.8, 11.2]
    assert direction(ratio_interval(same, same)) == "unresolved"
    rng = random.Random(1)
    draws = [[rng.lognormvariate(0, 0.3) for _ in range(8)] for _ in range(2)]
    assert direction(ratio_interval(*draws)) == "unresolved"


def test_three_runs_each_are_too_few_however_clear_the_difference():
    # 3 and 3: the best interval, min..max of the 9 ratios, covers with 1 - 2/20 = 90% only.
    got = ratio_interval([10, 11, 12], [100, 101, 102])
    assert got.confidence == pytest.approx(0.9) and direction(got) == "too few"


def test_the_interval_covers_a_skewed_median_at_least_as_often_as_it_claims():
    # A timing-like distribution (log-normal, long slow tail): over 2000 samples of 10 the interval claims
    # 97.85%; the binomial spread of the count at that rate is sqrt(2000 * 0.0215 * 0.9785) = 6.5, so 95.5%
    # (90 misses, 47 expected) fails only an interval that is wrong.
    rng = random.Random(0)
    true_median = 1.0  # exp(0)
    covered = 0
    for _ in range(2000):
        got = median_interval([rng.lognormvariate(0, 0.5) for _ in range(10)])
        covered += got.low <= true_median <= got.high
    assert covered / 2000 >= 0.955


def test_the_ratio_interval_covers_the_true_ratio_as_often_as_it_claims():
    # b is a times 1.5 exactly: 500 samples of 4 and 4 claim 97.1%; 500 * 0.029 = 14.5 misses expected,
    # sd 3.8, so 30 misses (94%) fails only a wrong interval.
    rng = random.Random(2)
    covered = 0
    for _ in range(500):
        a = [rng.lognormvariate(0, 0.4) for _ in range(4)]
        b = [1.5 * rng.lognormvariate(0, 0.4) for _ in range(4)]
        got = ratio_interval(a, b)
        covered += got.low <= 1.5 <= got.high
    assert covered / 500 >= 0.94

