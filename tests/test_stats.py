"""Paired statistics of `tsd compare` (pipeline/reports/stats.py) against independent references:
the t table's own neighbours, a coverage simulation, and sign-flip p-values counted by hand."""

import math
import random
import statistics

import pytest

from pipeline.reports.stats import mean_ci95, sign_flip_p, t975


def test_t_quantile_table_and_expansion_meet():
    assert t975(4) == 2.776 and t975(1) == 12.706
    assert t975(31) == pytest.approx(2.040, abs=1e-3)  # the exact value is 2.0395
    assert t975(120) == pytest.approx(1.980, abs=1e-3)
    assert all(t975(d) > t975(d + 1) for d in range(1, 200))
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = random.Random(0)
    for n in (3, 5, 12):
        trials, covered = 4000, 0
        for _ in range(trials):
            ci = mean_ci95([rng.gauss(0.7, 2.0) for _ in range(n)])
            covered += ci[0] <= 0.7 <= ci[1]
        # binomial sd at 95% over 4000 trials: 0.34%; 3 sd either side
        assert abs(covered / trials - 0.95) < 0.011, (n, covered / trials)


def test_interval_by_formula():
    values = [0.4, -0.1, 0.9, 0.3, 0.5]
    lo, hi = mean_ci95(values)
    half = 2.776 * statistics.stdev(values) / math.sqrt(5)
    assert (lo, hi) == pytest.approx((0.4 - half, 0.4 + half))
    assert mean_ci95([1.0]) is None


def test_sign_flip_p_counts_sign_patterns():
    assert sign_flip_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)  # only all-plus and all-minus are as extreme
    assert sign_flip_p([1, -1]) == 1.0
    # [3, 1, 1]: sums of the 8 patterns are ±5, ±3, ±1, ±1 -> |sum| >= 5 in 2 of 8
    assert sign_flip_p([3, 1, 1]) == pytest.approx(2 / 8)
    # [3, 1, -1]: observed |3| ; patterns |±3±1±1| in {5, 3, 3, 1, ...}: 5,3,3,1 each twice -> 6 of 8
    assert sign_flip_p([3, 1, -1]) == pytest.approx(6 / 8)
    assert sign_flip_p([]) is None and sign_flip_p([0.1] * 17) is None
