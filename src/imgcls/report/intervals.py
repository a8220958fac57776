"""Percentile bootstrap intervals for classification metrics, and their one-line format.

Every metric reported here (accuracy, macro-F1, balanced accuracy, each class's F1) is a function of
the confusion matrix alone. Resampling ``n`` test images with replacement therefore gives a confusion
matrix drawn from Multinomial(n, cells / n) over its cells: drawing those counts directly is the same
bootstrap as drawing image indices, at a cost that grows with resamples x non-empty cells instead of
resamples x images, so 10,000 test images cost no more than 100. No library we use offers this shortcut
(scipy's ``bootstrap`` resamples the data itself), hence the few lines below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1, balanced accuracy and per-class F1 of one or many confusion matrices.

    ``cm``: ``(..., C, K)`` counts, rows = true class, columns = predicted class; ``K >= C``, columns past
    ``C`` are predictions of no known class (always wrong). Matches ``engine.evaluate.classification_metrics``:
    F1 of a class with no true and no predicted image is 0, and balanced accuracy averages the recall of
    the classes present. Returns arrays of shape ``(...)`` (``per_class_f1``: ``(..., C)``).
    """
    cm = np.asarray(cm, dtype=np.float64)
    c = cm.shape[-2]
    return _metrics(np.diagonal(cm[..., :c, :c], axis1=-2, axis2=-1), cm.sum(-1), cm[..., :c].sum(-2))


def _metrics(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics from per-class true positives, true counts and predicted counts, each ``(..., C)``."""
    n = support.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = support + predicted  # 2 tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        recall = np.where(support > 0, tp / np.where(support > 0, support, 1), np.nan)
        present = (support > 0).sum(-1)
        balanced = np.where(present > 0, np.nansum(recall, -1) / np.maximum(present, 1), 0.0)
        accuracy = np.where(n > 0, tp.sum(-1) / np.maximum(n, 1), 0.0)
    return {"accuracy": accuracy, "macro_f1": f1.mean(-1), "balanced_accuracy": balanced, "per_class_f1": f1}


def resample_confusion(cm, *, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``resamples`` bootstrap confusion matrices of the test images behind ``cm``: ``(resamples, C, K)``."""
    cm = np.asarray(cm, dtype=np.int64)
    flat = cm.reshape(-1)
    n = int(flat.sum())
    out = np.zeros((resamples, flat.size), dtype=np.int64)
    if n == 0:
        return out.reshape(resamples, *cm.shape)
    cells = np.flatnonzero(flat)  # empty cells stay empty in every resample
    rng = np.random.default_rng(seed)
    out[:, cells] = rng.multinomial(n, flat[cells] / n, size=resamples)
    return out.reshape(resamples, *cm.shape)


def percentile(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float] | list[tuple[float, float]]:
    """The percentile interval of ``samples`` along axis 0 (a pair, or one pair per column)."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    if np.ndim(lo) == 0:
        return float(lo), float(hi)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def bootstrap_metrics(cm, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, np.ndarray]:
    """``metrics_from_confusion`` of ``resample_confusion(cm)`` (the same draws), without the dense
    ``(resamples, C, K)`` array: only the non-empty cells are drawn and summed per class, so 300 classes
    cost megabytes, not the gigabytes of 2,000 dense 300 x 300 matrices."""
    cm = np.asarray(cm, dtype=np.int64)
    c, k = cm.shape
    flat = cm.reshape(-1)
    n = int(flat.sum())
    cells = np.flatnonzero(flat)
    rows, cols = np.divmod(cells, k)
    draws = (np.random.default_rng(seed).multinomial(n, flat[cells] / n, size=resamples) if n else
             np.zeros((resamples, 0), dtype=np.int64)).astype(np.float64)  # (resamples, non-empty cells)

    def per_class(mask: np.ndarray, cls: np.ndarray) -> np.ndarray:
        onehot = np.zeros((len(cells), c))
        onehot[np.flatnonzero(mask), cls[mask]] = 1.0
        return draws @ onehot  # (resamples, C)

    everywhere = np.ones(len(cells), dtype=bool)
    return _metrics(per_class(rows == cols, rows), per_class(everywhere, rows), per_class(cols < c, np.minimum(cols, c - 1)))


def classification_intervals(cm, classes: Sequence[str], *, resamples: int = RESAMPLES, level: float = LEVEL,
                             seed: int = SEED) -> dict:
    """95 % percentile bootstrap intervals over the test images, for eval's metrics.json."""
    boot = bootstrap_metrics(cm, resamples=resamples, seed=seed)
    # [lo, hi] lists, so the dict equals what metrics.json reads back (the Python API returns it)
    return {
        "method": "percentile bootstrap over the test images",
        "level": level,
        "resamples": resamples,
        "seed": seed,
        "accuracy": list(percentile(boot["accuracy"], level)),
        "macro_f1": list(percentile(boot["macro_f1"], level)),
        "balanced_accuracy": list(percentile(boot["balanced_accuracy"], level)),
        "per_class_f1": {c: list(p) for c, p in zip(classes, percentile(boot["per_class_f1"], level))},
    }


def paired_difference(a_correct, b_correct, *, resamples: int = RESAMPLES, level: float = LEVEL,
                      seed: int = SEED) -> tuple[float, tuple[float, float]]:
    """Accuracy of B minus accuracy of A on the same images, and its paired percentile bootstrap interval.

    Resampling images keeps each image's pair of outcomes together; the difference depends only on the
    four counts (both right, A only, B only, both wrong), so they are drawn as one multinomial, as above.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("paired_difference needs the outcomes of the same images, one per image")
    n = len(a)
    if n == 0:
        return math.nan, (math.nan, math.nan)
    # a 2 x 2 "confusion matrix" of (A right, B right): resample_confusion draws its cells
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]])
    boot = resample_confusion(table, resamples=resamples, seed=seed)
    diff = (boot[:, 1, 0] - boot[:, 0, 1]) / n  # (B only - A only) / n
    return float((b.sum() - a.sum()) / n), percentile(diff, level)


def _fmt(value, ci, digits: int, scale: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    s = f"{scale * value:.{digits}f}{unit}"
    if ci is not None and not any(v is None or math.isnan(v) for v in ci):
        s += f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"
    return s


def fmt_pct(value: float, ci=None, digits: int = 1) -> str:
    """``93.1 % [91.8, 94.3]``: a fraction as a percentage with its interval, when there is one."""
    return _fmt(value, ci, digits, 100, " %")


def fmt_num(value: float, ci=None, digits: int = 3) -> str:
    """``0.912 [0.897, 0.925]``: a score in [0, 1] with its interval, when there is one."""
    return _fmt(value, ci, digits, 1, "")