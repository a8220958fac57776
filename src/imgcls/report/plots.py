"""Plots a person would rather look at than read: confusion matrices, curves, mistakes, calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots``, without pyplot: no global backend, no figure manager.

    A library user's matplotlib (backend, open windows) is left as it was; the figure is freed with its
    last reference, and ``savefig`` renders PNG with Agg whatever the backend.
    """
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG (parent folders made): every plot in imgcls goes through here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


CM_MAX_CLASSES = 50  # beyond this the matrix shows the most-confused classes only
CM_MAX_ANNOTATED = 20  # numbers in the cells up to this many classes


def confusion_subset(cm: np.ndarray, limit: int = CM_MAX_CLASSES) -> np.ndarray:
    """Indices (in class order) of the classes a matrix of ``len(cm)`` classes shows: all of them up to
    ``limit``, else the ``limit`` classes involved in the most errors, as true or as predicted class."""
    n = len(cm)
    if n <= limit:
        return np.arange(n)
    off = np.asarray(cm, dtype=float).copy()
    np.fill_diagonal(off, 0)
    errors = off.sum(0) + off.sum(1)
    return np.sort(np.argsort(-errors, kind="stable")[:limit])


def confusion_matrix(cm: list[list[int]], classes: list[str], path: Path, *, normalize: bool, title: str = "") -> Path:
    """The matrix as a PNG whose size is bounded whatever the class count (at 0.55 in per class, 300
    classes made a 180-inch figure that took more than 8 GB to draw)."""
    m = np.asarray(cm, dtype=float)
    if normalize:
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
    shown = confusion_subset(m)
    m = m[np.ix_(shown, shown)]
    names = [classes[i] for i in shown]
    n = len(names)
    size = min(max(4.0, 0.55 * n + 2), 18.0)
    fig, ax = subplots(figsize=(size, size * 0.9))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    font = 8 if n <= 30 else 6
    ax.set_xticks(range(n), names, rotation=45 if n <= 30 else 90, ha="right" if n <= 30 else "center", fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix (counts)")
    if n < len(classes):
        title += f"\nthe {n} most-confused of {len(classes)} classes (all of them in metrics.json)"
    ax.set_title(title)
    if n <= CM_MAX_ANNOTATED:
        hi = m.max() if m.size else 1
        for i in range(n):
            for j in range(n):
                txt = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if m[i, j] > hi * 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def training_curves(history: list[dict], path: Path, *, title: str = "") -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = subplots(1, 2, figsize=(10, 3.6))
    a1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    a2.plot(epochs, [100 * h["val_acc"] for h in history], "o-", label="val")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    for a in (a1, a2):
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def image_grid(images: list[np.ndarray], titles: list[str], path: Path, *, cols: int = 6, suptitle: str = "") -> Path:
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles):
        ax.imshow(img)
        ax.set_title(t, fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)


def reliability_diagram(bins: list[dict], ece: float, path: Path, *, before: list[dict] | None = None,
                        ece_before: float | None = None) -> Path:
    """Accuracy per confidence bin; ``before`` adds the uncalibrated probabilities' curve beside the calibrated."""
    fig, ax = subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if bins:
        centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(centers, [b["accuracy"] for b in bins], width=1 / 15, alpha=0.7, edgecolor="k", label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C3",
                label="calibrated" if before is not None else "mean confidence")
    if before:
        ax.plot([b["confidence"] for b in before], [b["accuracy"] for b in before], "s--", color="C1", alpha=0.8,
                label=f"before temperature scaling (ECE {ece_before:.3f})" if ece_before is not None else "before")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {ece:.3f})")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)
