"""Prediction over uint8 images (tensors, or ``data.rows.ImageRows`` read a batch at a time) and metrics as
plain data (printing and plots live elsewhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics.functional.classification as tmf
from torch import nn

from imgcls.data.augment import to_float
from imgcls.engine.runtime import autocast, inference_batch
from imgcls.models.fold import folded_copy


def inference_model(model: nn.Module, images, *, mean, std, device: torch.device) -> nn.Module:
    """``model`` with its batch norms folded (``models.fold``), checked on the first two ``images``; the model
    itself when nothing folds, the check fails, or it is already folded (then no copy is made)."""
    if not len(images):
        return model
    probe = to_float(images[:2].to(device), torch.tensor(mean, device=device), torch.tensor(std, device=device))
    return folded_copy(model, probe) or model


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int | None = None,
    tta: bool = False,
    on_batch=None,
) -> torch.Tensor:
    """Logits (float32, CPU) for ``N x S x S x 3`` uint8 ``images`` (a tensor or ``ImageRows``, whose batches
    are read as they are needed); ``tta`` averages with the flipped view.

    The forward passes run on a copy of ``model`` with its batch norms folded when that copy checks out
    (``models.fold``); the model is switched to eval mode for the call and restored afterwards.
    """
    batch_size = batch_size or inference_batch(device)
    mean_t = torch.tensor(mean, device=device)
    std_t = torch.tensor(std, device=device)
    model = inference_model(model, images, mean=mean, std=std, device=device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            xb = images[start : start + batch_size].to(device, non_blocking=True)
            x = to_float(xb, mean_t, std_t)
            with autocast(device, precision):
                logits = model(x).float()
                if tta:
                    logits = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)).mul_(0.5).log_()
            out.append(logits)  # kept on the device: one copy to the host at the end, not a sync per batch
            if on_batch is not None:
                on_batch(len(xb))
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out).cpu()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, top-5 (when there are more than five classes), per-class precision/recall/F1/accuracy,
    confusion matrix (rows = true class, in ``classes`` order), ECE and NLL."""
    c = len(classes)
    probs = logits.softmax(1)
    preds = probs.argmax(1)
    cm = tmf.multiclass_confusion_matrix(preds, labels, num_classes=c)
    precision = tmf.multiclass_precision(preds, labels, num_classes=c, average=None, zero_division=0)
    recall = tmf.multiclass_recall(preds, labels, num_classes=c, average=None, zero_division=0)
    f1 = tmf.multiclass_f1_score(preds, labels, num_classes=c, average=None, zero_division=0)
    support = cm.sum(1)
    out = {
        "n": int(len(labels)),
        "accuracy": float((preds == labels).float().mean()) if len(labels) else 0.0,
        "loss": float(F.cross_entropy(logits, labels)) if len(labels) else 0.0,
        "macro_f1": float(f1.mean()),
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        "ece": float(tmf.multiclass_calibration_error(probs, labels, num_classes=c, n_bins=15, norm="l1")),
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "accuracy": float(recall[i]),  # per-class accuracy is the recall of that class
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
    }
    if c > 5:
        out["top5"] = float(tmf.multiclass_accuracy(probs, labels, num_classes=c, top_k=5, average="micro"))
    return out


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> list[dict]:
    """Confidence vs accuracy per bin, for the reliability diagram."""
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            bins.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "confidence": float(conf[m].mean()), "accuracy": float(correct[m].mean())})
    return bins


def most_confused(cm: list[list[int]], classes: list[str], k: int = 10) -> list[dict]:
    pairs = [
        {"true": classes[i], "predicted": classes[j], "count": int(cm[i][j])}
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and cm[i][j] > 0
    ]
    return sorted(pairs, key=lambda p: -p["count"])[:k]


def auroc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    if len(scores_pos) == 0 or len(scores_neg) == 0:
        return float("nan")
    s = torch.cat([scores_pos, scores_neg]).double()
    ranks = torch.empty_like(s)
    order = s.argsort()
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def open_set_analysis(
    known_logits: torch.Tensor, excluded_logits: torch.Tensor, excluded_labels: torch.Tensor,
    *, classes: list[str], excluded_classes: list[str]
) -> dict:
    """Where a left-out class's images go, and how well max-softmax separates them from known classes."""
    out = {"classes": {}, "auroc_max_softmax": None}
    if len(excluded_logits) == 0:
        return out
    probs = excluded_logits.softmax(1)
    preds = probs.argmax(1)
    for j, name in enumerate(excluded_classes):
        m = excluded_labels == j
        n = int(m.sum())
        if n == 0:
            continue
        counts = torch.bincount(preds[m], minlength=len(classes))
        out["classes"][name] = {
            "n": n,
            "predicted_as": {classes[i]: float(counts[i]) / n for i in range(len(classes))},
            "mean_max_softmax": float(probs[m].max(1).values.mean()),
        }
    known_conf = known_logits.softmax(1).max(1).values
    out["auroc_max_softmax"] = auroc(known_conf, probs.max(1).values)
    out["mean_max_softmax_known"] = float(known_conf.mean()) if len(known_conf) else None
    return out
