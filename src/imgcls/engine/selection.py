"""The validation score that picks the best checkpoint (config key ``select``).

Accuracy favours the large classes of an imbalanced set; macro-F1 and balanced accuracy (mean per-class
recall) weigh every class alike. All three come from one confusion matrix, which sums over DDP ranks.
"""

from __future__ import annotations

import torch

SELECT_METRICS = ("accuracy", "macro_f1", "balanced_accuracy")


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C x C`` counts (float64, rows = true class) of predicted class indices against true ones."""
    flat = labels.to(torch.int64) * num_classes + pred.to(torch.int64)
    return torch.bincount(flat.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes).double()


def scores(cm: torch.Tensor) -> dict[str, float]:
    """accuracy, macro_f1 and balanced_accuracy of a confusion matrix; classes absent from the labels
    (a row of zeros) are left out of the two class averages, as scikit-learn's balanced accuracy does."""
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    present = support > 0
    total = float(cm.sum())
    recall = tp / support.clamp(min=1)
    precision = tp / predicted.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum()) / total if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
    }


__all__ = ["SELECT_METRICS", "confusion", "scores"]
