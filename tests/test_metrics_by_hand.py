"""engine/evaluate.py against numbers worked out by hand on six images."""

from __future__ import annotations

import math

import pytest
import torch

from imgcls.engine.evaluate import auroc, classification_metrics, most_confused, reliability_bins

CLASSES = ["a", "b", "c"]
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
PREDS = [0, 1, 1, 1, 2, 0]  # right, wrong, right, right, right, wrong


def _logits() -> torch.Tensor:
    """Softmax 0.8 on the predicted class and 0.1 on each other one."""
    probs = torch.full((6, 3), 0.1)
    probs[torch.arange(6), torch.tensor(PREDS)] = 0.8
    return probs.log()


def test_classification_metrics_by_hand():
    m = classification_metrics(_logits(), LABELS, CLASSES)
    assert m["n"] == 6
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision a 1/2, b 2/3, c 1/1; recall a 1/2, b 2/2, c 1/2
    per = m["per_class"]
    assert [per[c]["precision"] for c in CLASSES] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [per[c]["recall"] for c in CLASSES] == pytest.approx([0.5, 1.0, 0.5])
    assert [per[c]["f1"] for c in CLASSES] == pytest.approx([0.5, 0.8, 2 / 3])
    assert [per[c]["support"] for c in CLASSES] == [2, 2, 2]
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["loss"] == pytest.approx((4 * -math.log(0.8) + 2 * -math.log(0.1)) / 6, rel=1e-5)
    assert m["ece"] == pytest.approx(abs(0.8 - 4 / 6), rel=1e-4)  # one bin: confidence 0.8, accuracy 2/3
    assert "top5" not in m  # three classes


def test_reliability_and_confusions_by_hand():
    bins = reliability_bins(_logits(), LABELS)
    assert len(bins) == 1 and bins[0]["n"] == 6
    assert bins[0]["confidence"] == pytest.approx(0.8) and bins[0]["accuracy"] == pytest.approx(4 / 6)
    cm = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert sorted((p["true"], p["predicted"], p["count"]) for p in most_confused(cm, CLASSES)) == [("a", "b", 1), ("c", "a", 1)]


def test_auroc_by_hand():
    # pairs (pos, neg) with pos > neg: 0.9 beats both, 0.8 both, 0.4 only 0.3: 5 of 6
    assert auroc(torch.tensor([0.9, 0.8, 0.4]), torch.tensor([0.5, 0.3])) == pytest.approx(5 / 6)
    assert auroc(torch.tensor([0.5]), torch.tensor([0.5])) == pytest.approx(0.5)  # a tie counts half
    assert math.isnan(auroc(torch.tensor([]), torch.tensor([0.5])))
