"""Paired statistics for `tsd compare`: a t-interval of a mean difference and an exact sign-flip
test, in plain Python (no SciPy in the dependencies).

With 5 seeds a paired difference has 4 degrees of freedom: the 95% interval is mean +- 2.776 x
sd / sqrt(5). The sign-flip test makes no normality assumption: under "no difference" each
paired difference is as likely to have either sign, so the p-value is the share of the 2^n sign
patterns whose |mean| is at least the observed one (n = 5: 32 patterns, smallest p 2/32).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

# Student t, 0.975 quantile, degrees of freedom 1..30 (the standard table).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion, within 1e-3 of the exact value there)."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95% t-interval of the mean of `values` (None with fewer than 2)."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def sign_flip_p(values: Sequence[float], exact_up_to: int = 16) -> float | None:
    """Two-sided p-value of the paired sign-flip permutation test of mean 0 (exact enumeration;
    None with no values or more than `exact_up_to`, where enumeration would be slow)."""
    n = len(values)
    if n == 0 or n > exact_up_to:
        return None
    observed = abs(sum(values)) - 1e-12 * max(1.0, sum(abs(v) for v in values))  # ties count as extreme
    extreme = sum(1 for signs in itertools.product((1, -1), repeat=n)
                  if abs(sum(s * v for s, v in zip(signs, values))) >= observed)
    return extreme / 2**n
