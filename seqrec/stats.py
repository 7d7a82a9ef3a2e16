"""The statistics of the comparison tools, without SciPy: Student's t, the mean with its 95 % confidence interval,
the paired t-test and the Wilcoxon signed-rank test (normal approximation)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

CONFIDENCE = 0.95


def student_t_sf(x: float, df: int) -> float:
    """P(T > x) for Student's t with `df` degrees of freedom: Simpson's rule on the density from |x| to infinity,
    after the substitution u = atan(t), which turns the heavy tail into a smooth bounded integrand on
    [atan|x|, pi/2]. Integrating the tail itself keeps small p-values accurate (no 1 - cdf cancellation); error
    below 1e-9 for the |x| < 1000 that intervals and p-values need."""
    a = abs(float(x))
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    u = np.linspace(math.atan(a), math.pi / 2, 4001)
    t = np.tan(u)
    f = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df)) / np.cos(u) ** 2
    h = u[1] - u[0]
    tail = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return tail if x >= 0 else 1.0 - tail


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x)."""
    return 1.0 - student_t_sf(x, df)


def student_t_quantile(p: float, df: int) -> float:
    """x with P(T <= x) = p, for 0.5 <= p < 1, by bisection on `student_t_sf`."""
    low, high = 0.0, 1e6
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_sf(mid, df) > 1 - p else (low, mid)
    return (low + high) / 2


def mean_ci(values) -> tuple[float, float, float]:
    """(mean, sample standard deviation, half-width of the CONFIDENCE interval of the mean: t * s / sqrt(n) with
    n - 1 degrees of freedom); std and half-width are NaN for one value."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float(values.mean()) if n else math.nan, math.nan, math.nan
    std = float(values.std(ddof=1))
    return float(values.mean()), std, student_t_quantile((1 + CONFIDENCE) / 2, n - 1) * std / math.sqrt(n)


def paired_t_test(a, b) -> dict:
    """Paired t-test of b - a: {n, mean_diff, ci (half-width), t, p (two-sided)}; t and p are NaN for n < 2 or for
    identical differences (zero spread)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    mean, std, half = mean_ci(diff)
    n = len(diff)
    t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else math.nan
    p = 2 * student_t_sf(abs(t), n - 1) if not math.isnan(t) else math.nan
    return {"n": n, "mean_diff": mean, "ci": half, "t": t, "p": p}


def wilcoxon_signed_rank(diff) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test that the differences are centred on 0: zero differences
    dropped, tied |differences| given their mean rank, the normal approximation with the tie-corrected variance
    (what scipy.stats.wilcoxon(method="approx") computes; exact tables matter only below ~25 non-zero pairs, while
    this test pairs thousands of users). NaN when no difference is non-zero."""
    d = np.asarray(diff, dtype=float)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return math.nan
    magnitude = pd.Series(np.abs(d))
    w_plus = magnitude.rank()[d > 0].sum()  # the sum of the ranks of the positive differences
    ties = magnitude.value_counts().to_numpy(dtype=float)
    variance = n * (n + 1) * (2 * n + 1) / 24 - (ties**3 - ties).sum() / 48
    z = (w_plus - n * (n + 1) / 4) / math.sqrt(variance) if variance > 0 else math.nan
    return math.erfc(abs(z) / math.sqrt(2))
