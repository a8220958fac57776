"""The few statistics a seed study needs, on plain lists (scipy does the distributions)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std and the Student-t confidence interval of the mean: ``(mean, std, low, high)``.

    One value has no spread: std and the interval are NaN.
    """
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (math.nan,) * 4
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan, math.nan
    s = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, df=len(x) - 1)) * s / math.sqrt(len(x))
    return m, s, m - half, m + half


def paired_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of a paired t-test of ``a`` against ``b`` (same seeds, same order).

    Identical pairs (zero variance of the differences) give p = 1 when the mean difference is 0.
    """
    a_ = np.asarray(a, dtype=float)
    b_ = np.asarray(b, dtype=float)
    if len(a_) != len(b_) or len(a_) < 2:
        raise ValueError("paired_t needs two equally long lists of at least two values")
    d = a_ - b_
    if np.allclose(d, d[0]):  # scipy returns NaN here: no spread to test against
        return 1.0 if abs(d[0]) < 1e-12 else 0.0
    return float(stats.ttest_rel(a_, b_).pvalue)


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[float, int, int]:
    """McNemar's exact test on paired per-image outcomes: ``(p_value, b_only, a_only)``.

    Only the discordant images count: ``b_only`` right by B alone, ``a_only`` right by A alone;
    under the null each discordant image is a fair coin (two-sided binomial test).
    """
    a_ = np.asarray(a_correct, dtype=bool)
    b_ = np.asarray(b_correct, dtype=bool)
    if a_.shape != b_.shape:
        raise ValueError("mcnemar_exact needs outcomes of the same images")
    a_only = int((a_ & ~b_).sum())
    b_only = int((b_ & ~a_).sum())
    n = a_only + b_only
    if n == 0:
        return 1.0, b_only, a_only
    return float(stats.binomtest(min(a_only, b_only), n, 0.5).pvalue), b_only, a_only


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a comparison)."""
    p = [float(v) for v in pvalues]
    idx = [i for i, v in enumerate(p) if not math.isnan(v)]
    m = len(idx)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
