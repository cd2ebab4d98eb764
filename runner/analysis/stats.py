"""Medians, their 95% intervals, and whether a difference is resolved: the one statistics helper that bench/,
the pages (ui/compare_sets.py) and the CLI (`python -m runner compare`) use. Torch-free, standard library only.

The method assumes nothing about the shape of the distribution. Timings on a shared machine are skewed (a
neighbour's job makes some runs 2x slower, none 2x faster), so neither a mean nor a normal interval fits.

- One figure measured n times (`median_interval`): the sample median, and the interval between the order
  statistics x_(k) and x_(n+1-k), with k the largest for which P(Bin(n, 1/2) <= k-1) <= (1 - level) / 2.
  Each value falls below the true median with probability 1/2, so the number below it is Bin(n, 1/2) and the
  interval covers the median with probability exactly 1 - 2 P(Bin(n, 1/2) <= k-1), whatever the (continuous)
  distribution: the sign test, inverted. Below 6 values no pair of order statistics reaches 95%: the widest,
  min..max, covers the median with 1 - 2^(1-n) (75% with 3 values, 93.75% with 5). The interval then carries
  that lower confidence and says so; it never claims 95%.
- Two figures, m and n runs (`ratio_interval`, unpaired): the ratio b/a is a shift of logarithms, so the
  Hodges-Lehmann estimate is the median of the m*n ratios b_j/a_i, and the interval runs from the k-th
  smallest to the k-th largest of them, k - 1 being the Mann-Whitney critical value: the largest u with
  P(U <= u) <= (1 - level) / 2 when both samples come from one distribution (every one of the C(m+n, m)
  orders of the pooled values equally likely; counted exactly, or by the normal approximation beyond
  MW_EXACT_MAX pairs). Its coverage is 1 - 2 P(U <= k-1). 4 runs of each reach 95% (1 - 2/70 = 97.1%);
  3 and 3 reach at most 90% (1 - 2/20). Tied values (a figure that does not vary) make it conservative.
- Paired ratios (bench's interleaved rounds, one ratio per round): `median_interval` of the ratios.
- A difference is resolved only when its interval reaches the level and excludes 1 (`direction`); an
  interval that includes 1 is "no difference this run can resolve", one that cannot reach the level is
  "too few runs" (with how many would do: `runs_needed`, `runs_needed_each`).

Why not the percentile bootstrap bench/ used before: the bootstrap median of a handful of values never leaves
min..max, so with 3 runs it claims 95% where the true coverage is at most 75%. Why unpaired for the pages: the
runner interleaves a comparison set's runs (A B C A B C ...) so that each spec meets the same machine over
time, which is what makes both samples draw from the same conditions; pairing by round would need 6 complete
rounds to reach 95% (the sign test on 6 ratios), unpaired needs 4 runs of each.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

LEVEL = 0.95
MW_EXACT_MAX = 400  # m*n above this: the Mann-Whitney distribution by its normal approximation (error < 0.5%)


@dataclass(frozen=True)
class Interval:
    """An estimate with the interval around it and the confidence that interval truly has (may be < level)."""

    estimate: float
    low: float
    high: float
    confidence: float  # the interval's exact coverage under the method's assumptions
    level: float  # what was asked for
    n: tuple[int, ...]  # values behind it: (n,) for one figure, (m, n) for a ratio of two

    @property
    def reaches_level(self) -> bool:
        return self.confidence >= self.level - 1e-12

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high

    def describe(self, fmt: str = "{:.3g}") -> str:
        """'1.2..3.4 (95% interval)', or with its true confidence when it falls short: '1..3 (min..max, a 75%
        interval; 6 values give 95%)'."""
        span = f"{fmt.format(self.low)}..{fmt.format(self.high)}"
        if self.reaches_level:
            return f"{span} ({self.level:.0%} interval)"
        need = runs_needed(self.level) if len(self.n) == 1 else runs_needed_each(self.level)
        each = "" if len(self.n) == 1 else " of each"
        return f"{span} (only a {self.confidence:.0%} interval; {need} values{each} give {self.level:.0%})"


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def _binom_cdf_half(n: int, k: int) -> float:
    """P(Bin(n, 1/2) <= k)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n if k >= 0 else 0.0


def _order_statistic_rank(n: int, level: float) -> tuple[int, float]:
    """(k, coverage of [x_(k), x_(n+1-k)]): the narrowest such interval reaching `level`, else k = 1 (min..max)."""
    tail = (1 - level) / 2
    k = 1
    while k + 1 <= (n + 1) // 2 and _binom_cdf_half(n, k) <= tail + 1e-15:
        k += 1
    return k, (1 - 2 * _binom_cdf_half(n, k - 1)) if n > 1 else 0.0


def median_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """The median of `values` with its distribution-free interval (see the module's docstring)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("median_interval needs at least one value")
    n = len(xs)
    k, coverage = _order_statistic_rank(n, level)
    return Interval(statistics.median(xs), xs[k - 1], xs[n - k], coverage, level, (n,))


@lru_cache(maxsize=256)
def mann_whitney_counts(m: int, n: int) -> tuple[int, ...]:
    """How many of the C(m+n, m) orders of two samples give U = 0, 1, ..., m*n (U: pairs with a's value below
    b's). The last element of the pooled order is either an a (it beats no b: U unchanged, one a fewer) or a b
    (every a lies below it: U - m, one b fewer)."""
    table = [[(1,) if i == 0 or j == 0 else () for j in range(n + 1)] for i in range(m + 1)]
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            counts = [0] * (i * j + 1)
            for u, c in enumerate(table[i - 1][j]):
                counts[u] += c
            for u, c in enumerate(table[i][j - 1]):
                counts[u + i] += c
            table[i][j] = tuple(counts)
    return table[m][n]


def _mw_lower_tail(m: int, n: int, u: int) -> float:
    """P(U <= u) when both samples come from one distribution."""
    if u < 0:
        return 0.0
    if m * n <= MW_EXACT_MAX:
        counts = mann_whitney_counts(m, n)
        return sum(counts[: u + 1]) / math.comb(m + n, m)
    mean, sd = m * n / 2, math.sqrt(m * n * (m + n + 1) / 12)
    return 0.5 * math.erfc(-((u + 0.5 - mean) / sd) / math.sqrt(2))


def ratio_interval(base: Iterable[float], other: Iterable[float], level: float = LEVEL) -> Interval:
    """How many times `base` the figure `other` is: the Hodges-Lehmann ratio with its Mann-Whitney interval
    (unpaired; every value positive)."""
    a, b = [float(v) for v in base], [float(v) for v in other]
    if not a or not b:
        raise ValueError("ratio_interval needs values on both sides")
    if min(a + b) <= 0:
        raise ValueError("ratio_interval needs positive values")
    m, n = len(a), len(b)
    ratios = sorted(y / x for x in a for y in b)
    tail = (1 - level) / 2
    k = 1
    while k + 1 <= (m * n + 1) // 2 and _mw_lower_tail(m, n, k) <= tail + 1e-15:
        k += 1
    coverage = 1 - 2 * _mw_lower_tail(m, n, k - 1)
    return Interval(statistics.median(ratios), ratios[k - 1], ratios[m * n - k], coverage, level, (m, n))


Direction = Literal["higher", "lower", "unresolved", "too few"]


def direction(ratio: Interval) -> Direction:
    """What an interval of a ratio says: 'higher' or 'lower' (than 1, resolved), 'unresolved' (it includes 1),
    or 'too few' (it includes 1 and no interval at the level exists with these values)."""
    if ratio.reaches_level and ratio.excludes(1.0):
        return "higher" if ratio.low > 1 else "lower"
    return "unresolved" if ratio.reaches_level else "too few"


def runs_needed(level: float = LEVEL) -> int:
    """The fewest values whose min..max reaches `level` for the median: 6 for 95%."""
    n = 1
    while 1 - 2 ** (1 - n) < level:
        n += 1
    return n


def runs_needed_each(level: float = LEVEL) -> int:
    """The fewest runs of each of two specs whose ratio interval can reach `level`: 4 for 95%."""
    n = 1
    while 1 - 2 / math.comb(2 * n, n) < level:
        n += 1
    return n

