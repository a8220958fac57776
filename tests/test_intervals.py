"""Bootstrap intervals: the same figures as the evaluator, seeded, the right coverage, and cheap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgcls.engine.evaluate import classification_metrics
from imgcls.report import intervals

CLASSES = ("cat", "dog", "fox")


def _accuracy_cm(correct: np.ndarray) -> np.ndarray:
    """A two-class confusion matrix whose accuracy is the share of ``correct``: every image is class 0."""
    return np.array([[int(correct.sum()), int((~correct).sum())], [0, 0]])


def test_bootstrap_interval_is_reproducible_and_seeded():
    cm = np.array([[50, 3, 2], [4, 40, 6], [1, 5, 39]])
    a = intervals.classification_intervals(cm, list(CLASSES), seed=7)
    b = intervals.classification_intervals(cm, list(CLASSES), seed=7)
    c = intervals.classification_intervals(cm, list(CLASSES), seed=8)
    assert a == b
    assert a["accuracy"] != c["accuracy"]
    assert a["resamples"] >= 1000 and a["level"] == 0.95
    point = intervals.metrics_from_confusion(cm)
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        lo, hi = a[key]
        assert lo < float(point[key]) < hi
    for k, name in enumerate(CLASSES):
        lo, hi = a["per_class_f1"][name]
        assert lo < float(point["per_class_f1"][k]) < hi


def test_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for draw in range(200):
        correct = rng.random(300) < 0.8
        lo, hi = intervals.classification_intervals(_accuracy_cm(correct), ["a", "b"], resamples=1000, seed=draw)["accuracy"]
        covered += lo <= 0.8 <= hi
    assert 180 <= covered <= 198, covered  # 90-99 %: a percentile interval at n = 300 covers close to 95 %


def test_multinomial_resampling_equals_resampling_the_images():
    """Drawing the confusion cells is the same bootstrap as drawing image indices (what the docstring claims)."""
    rng = np.random.default_rng(1)
    n, c = 2000, 4
    y = rng.integers(0, c, n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, c, n))
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    ours = intervals.classification_intervals(cm, list("abcd"), resamples=4000, seed=3)
    idx = rng.integers(0, n, (4000, n))
    naive_cm = np.zeros((4000, c, c), dtype=np.int64)
    for b in range(4000):
        np.add.at(naive_cm[b], (y[idx[b]], p[idx[b]]), 1)
    naive = intervals.metrics_from_confusion(naive_cm)
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert np.allclose(ours[key], intervals.percentile(naive[key]), atol=0.006), key


def test_metrics_from_confusion_match_the_evaluator():
    """The figures the intervals are built around are the ones classification_metrics reports."""
    rng = np.random.default_rng(2)
    labels = torch.from_numpy(rng.integers(0, 3, 400))  # class 3 has no test image, class 2 is never predicted
    logits = torch.randn(400, 4)
    logits[:, 2] -= 100
    m = classification_metrics(logits, labels, list("abcd"))
    ours = intervals.metrics_from_confusion(np.array(m["confusion_matrix"]))
    assert float(ours["accuracy"]) == pytest.approx(m["accuracy"], abs=1e-6)
    assert float(ours["macro_f1"]) == pytest.approx(m["macro_f1"], abs=1e-6)
    assert float(ours["balanced_accuracy"]) == pytest.approx(m["balanced_accuracy"], abs=1e-6)
    assert np.allclose(ours["per_class_f1"], [m["per_class"][k]["f1"] for k in "abcd"], atol=1e-6)


def test_paired_difference_interval():
    rng = np.random.default_rng(4)
    a = rng.random(1000) < 0.80
    b = a.copy()
    b[np.flatnonzero(~a)[:60]] = True  # B fixes 60 of A's mistakes and makes 10 new ones: +5 points
    b[np.flatnonzero(a)[:10]] = False
    d, (lo, hi) = intervals.paired_difference(a, b, seed=1)
    assert d == pytest.approx(0.05)
    assert lo < d < hi and lo > 0  # a clear gain: the interval excludes 0
    assert intervals.paired_difference(a, a) == (0.0, (0.0, 0.0))
    assert intervals.fmt_pct(0.931, (0.918, 0.943)) == "93.1 % [91.8, 94.3]"


def test_bootstrap_without_dense_matrices_equals_the_dense_draws():
    # the sparse path eval uses must give exactly what resampling whole confusion matrices gives
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 20, size=(5, 7))
    cm[rng.random(cm.shape) < 0.5] = 0
    dense = intervals.metrics_from_confusion(intervals.resample_confusion(cm, resamples=300, seed=3))
    sparse = intervals.bootstrap_metrics(cm, resamples=300, seed=3)
    assert all(np.allclose(dense[k], sparse[k]) for k in dense)
