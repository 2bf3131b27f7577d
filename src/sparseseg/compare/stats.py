"""The statistics of a comparison, as pure functions over numbers (mIoU in percent).

One mean/std helper (`mean_std`, sample std), Table 1's gain, Table 5's rounds to reach a target,
and the paired protocol: a strategy's run with seed s against the reference strategy's run with
the same seed, summarized by the mean difference, a Student t interval and the seeds won.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value, mean NaN for none."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def curve_mean(curve: Sequence[float]) -> float:
    """The mean mIoU over rounds: the area under the learning curve (one unit per round) / rounds.

    It rewards a strategy that is good early as well as at the end; NaN if any round is NaN.
    """
    return statistics.fmean(curve) if curve else math.nan


def table1_gain(uc_only: float, coverage_first: float) -> tuple[float, float]:
    """Table 1's gain of coverage first: (points, percent of the single-stage mIoU)."""
    points = coverage_first - uc_only
    return points, 100 * points / uc_only if uc_only else math.nan


def rounds_to_reach(curve: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose mIoU is at least `target`, None if none is."""
    for r, value in enumerate(curve, start=1):
        if value >= target:
            return r
    return None


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t distribution with `df` degrees of freedom (scipy's)."""
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"t_quantile: df must be at least 1, got {df}")
    return float(t.ppf(p, df))


@dataclass(frozen=True)
class PairedDifference:
    """A strategy minus the reference, seed by seed (points of mIoU).

    `low` and `high` bound the `level` Student t interval of the mean difference; both are None
    with fewer than two pairs. `wins` counts pairs where the strategy is strictly above.
    """

    mean: float
    low: float | None
    high: float | None
    n: int
    wins: int
    level: float = 0.95

    @property
    def verdict(self) -> str:
        """'above' / 'below' when the interval excludes 0, 'within noise' when it holds 0, '' without one."""
        if self.low is None or self.high is None:
            return ""
        if self.low > 0:
            return "above"
        if self.high < 0:
            return "below"
        return "within noise"


def paired_difference(values: Sequence[float], reference: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Mean of `values[i] - reference[i]` with its Student t interval, over the pairs where both are numbers.

    The interval is mean ± t_{(1 + level) / 2, n - 1} · s / sqrt(n), s the sample std of the
    differences: exact when the differences are normal, and wider than the normal interval
    (z = 1.96) as it should be with the 3-5 seeds a comparison has.

    Args:
        values: the strategy's result per seed.
        reference: the reference's result for the same seeds, in the same order.
        level: the interval's coverage, in (0, 1).

    Raises:
        ValueError: the sequences differ in length, or `level` is outside (0, 1).
    """
    if len(values) != len(reference):
        raise ValueError(f"paired_difference: {len(values)} values for {len(reference)} reference values")
    if not 0 < level < 1:
        raise ValueError(f"paired_difference: level must be in (0, 1), got {level}")
    diffs = [a - b for a, b in zip(values, reference, strict=True) if not (math.isnan(a) or math.isnan(b))]
    n = len(diffs)
    if n == 0:
        return PairedDifference(math.nan, None, None, 0, 0, level)
    mean = statistics.fmean(diffs)
    wins = sum(d > 0 for d in diffs)
    if n < 2:
        return PairedDifference(mean, None, None, n, wins, level)
    half = t_quantile((1 + level) / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, wins, level)
