"""Pictures of explanations: heat-map overlays, the three-panel figure per image, grids and panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgcls.report.plots import save_figure, subplots


def overlay(image: np.ndarray, heatmap: np.ndarray, *, image_weight: float = 0.5) -> np.ndarray:
    """``H x W x 3`` uint8 image blended with a jet-coloured ``H x W`` map in [0, 1] -> uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=image_weight)


def colour(heatmap: np.ndarray) -> np.ndarray:
    """The heat map alone in the overlay's colours, uint8 RGB."""
    import cv2

    return cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * np.clip(heatmap, 0, 1)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def title_for(record: dict) -> str:
    """``true cat | pred dog 87% | why dog? (gradcam)`` from an explanation record."""
    parts = []
    if record.get("true"):
        parts.append(f"true {record['true']}")
    parts.append(f"pred {record['prediction']} {record['probability']:.0%}")
    if record["target"] != record["prediction"]:
        parts.append(f"why {record['target']}? ({record['target_probability']:.0%})")
    return " | ".join(parts)


def three_panels(image: np.ndarray, heatmap: np.ndarray, ov: np.ndarray, *, title: str, path: Path) -> Path:
    """Original, heat map and overlay side by side, under one title."""
    fig, axes = subplots(1, 3, figsize=(7.5, 2.9))
    for ax, img, name in zip(axes, (image, colour(heatmap), ov), ("image", "heat map", "overlay")):
        ax.imshow(img)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def panel(rows: dict[str, list[np.ndarray]], titles: list[str], path: Path, *, suptitle: str = "") -> Path:
    """One row per arm (the dict's order, the key as the row label), one column per image.

    ``rows`` maps an arm name to its overlays (``H x W x 3`` uint8, e.g. ``record["overlay"]`` from
    :func:`imgcls.explain.explain_run`); ``titles`` labels the columns (may be shorter or empty).
    """
    if not rows:
        raise ValueError("panel needs at least one row")
    n_cols = max(len(v) for v in rows.values())
    n_rows = len(rows)
    fig, axes = subplots(n_rows, max(n_cols, 1), figsize=(1.9 * max(n_cols, 1) + 1.2, 2.0 * n_rows), squeeze=False)
    for r, (arm, images) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c])
            if r == 0 and c < len(titles):
                ax.set_title(titles[c], fontsize=7)
        axes[r, 0].set_ylabel(arm, fontsize=8, rotation=0, ha="right", va="center")
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, Path(path))
