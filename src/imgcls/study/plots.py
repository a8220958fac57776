"""The study's figures: accuracy by arm with confidence intervals, per-class deltas, training curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator

from imgcls.report.plots import save_figure, subplots


def accuracy_by_arm(rows: list[dict], seeds: dict[str, list[float]], path: Path, *, baseline: str, title: str = "") -> Path:
    """Mean test accuracy per arm with its 95% CI, each seed as a dot, the baseline mean as a line."""
    arms = [r["arm"] for r in rows]
    fig, ax = subplots(figsize=(max(5.0, 1.1 * len(arms) + 2), 4))
    x = np.arange(len(arms))
    means = np.array([100 * r["mean"] for r in rows])
    lo = np.array([100 * r["ci_low"] if not math.isnan(r["ci_low"]) else np.nan for r in rows])
    hi = np.array([100 * r["ci_high"] if not math.isnan(r["ci_high"]) else np.nan for r in rows])
    err = np.vstack([np.nan_to_num(means - lo), np.nan_to_num(hi - means)])
    colors = ["C7" if a == baseline else ("C3" if r.get("significant") is True else "C0") for a, r in zip(arms, rows)]
    for i in range(len(arms)):  # a point and its interval, not a bar: the axis does not start at 0
        ax.errorbar([i], [means[i]], yerr=err[:, i : i + 1], fmt="o", ms=8, color=colors[i], ecolor=colors[i], capsize=6, lw=1.5)
        vals = [100 * v for v in seeds.get(arms[i], [])]
        ax.plot(i + 0.18 + np.linspace(0, 0.1, len(vals)), vals, ".", color="k", ms=5, alpha=0.7)
        if "kept" in rows[i].get("compared_on", ""):  # its own test set is smaller: show the fair reference
            ax.plot([i], [100 * rows[i]["baseline_mean"]], "x", color="C7", ms=9, mew=2, label=f"{baseline} on the same images")
    base = next((r for r in rows if r["arm"] == baseline), None)
    if base is not None and not math.isnan(base["mean"]):
        ax.axhline(100 * base["mean"], color="C7", ls="--", lw=1, label=f"{baseline} mean")
        ax.legend(fontsize=8, loc="best")
    finite = [v for v in np.concatenate([means, lo, hi, [100 * v for s in seeds.values() for v in s]]) if np.isfinite(v)]
    if finite:
        span = max(finite) - min(finite)
        ax.set_ylim(max(0.0, min(finite) - 0.15 * span - 1), min(100.5, max(finite) + 0.15 * span + 1))
    ax.set_xticks(x, arms, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "test accuracy by arm: mean and 95% CI over seeds, dots = seeds; red = p < 0.05 vs baseline", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def per_class_delta(rows: list[dict], arms: list[str], classes: list[str], path: Path, *, baseline: str) -> Path:
    """Heat map of per-class accuracy change vs the baseline (points); grey = class left out."""
    m = np.full((max(len(arms), 1), len(classes)), np.nan)
    for r in rows:
        if r["arm"] in arms and r["class"] in classes:
            m[arms.index(r["arm"]), classes.index(r["class"])] = 100 * r["delta"]
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    lim = max(lim, 1.0)
    fig, ax = subplots(figsize=(max(5.0, 0.9 * len(classes) + 2.5), max(2.5, 0.5 * len(arms) + 1.5)))
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(arms)), arms)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            txt = "left out" if np.isnan(m[i, j]) else f"{m[i, j]:+.1f}"
            dark = np.isfinite(m[i, j]) and abs(m[i, j]) > 0.6 * lim
            ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_title(f"per-class accuracy change vs {baseline} (points, mean over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="points")
    return save_figure(fig, path)


def curves(curves_by_arm: dict[str, tuple[list[int], list[float], list[float], list[float]]], path: Path, *, key: str = "val_acc") -> Path:
    """Validation accuracy vs epoch per arm: the mean over seeds, the band from the lowest to the highest seed."""
    fig, ax = subplots(figsize=(6.5, 4))
    for k, (arm, (epochs, mean, lo, hi)) in enumerate(curves_by_arm.items()):
        if not epochs:
            continue
        color = f"C{k % 10}"
        ax.plot(epochs, [100 * v for v in mean], "o-", color=color, label=arm, ms=3)
        if any(a != b for a, b in zip(lo, hi)):
            ax.fill_between(epochs, [100 * v for v in lo], [100 * v for v in hi], color=color, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.set_title("validation accuracy per epoch (mean over seeds; band: min-max)\n"
                 "arms that leave classes out are scored on the kept classes only", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
