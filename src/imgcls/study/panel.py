"""Grad-CAM of the same fixed test images through every arm (seed 0 of each): one row per arm.

The images are chosen once (seeded, a few per class of the baseline's test split) and kept in
``panel_images.json`` so that later reruns and added arms show the very same images.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from imgcls.errors import ImgclsError
from imgcls.io import write_json
from imgcls.study.analysis import RunResult
from imgcls.study.spec import Study

PANEL_SEED = 0


def choose_images(base: RunResult, per_class: int, *, seed: int = PANEL_SEED) -> list[dict]:
    """``per_class`` test images of each class from the baseline's predictions, by a seeded draw."""
    with (base.path / "eval" / "predictions.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_class: dict[str, list[str]] = {}
    for r in rows:
        by_class.setdefault(r["true"], []).append(r["path"])
    rng = random.Random(seed)
    chosen = []
    for cls in sorted(by_class):
        paths = sorted(by_class[cls])
        for p in rng.sample(paths, min(per_class, len(paths))):
            chosen.append({"path": p, "class": cls})
    return chosen


def _fixed_images(study: Study, out: Path, base: RunResult) -> list[dict]:
    path = out / "panel_images.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["images"]
    images = choose_images(base, study.panel_per_class)
    write_json(path, {"seed": PANEL_SEED, "per_class": study.panel_per_class, "images": images})
    return images


def gradcam_panel(study: Study, out: Path, by_arm: dict[str, list[RunResult]]) -> tuple[Path | None, str]:
    """Render ``gradcam_panel.png``; returns its path (or None) and a one-line note when skipped."""
    if study.panel_per_class == 0:
        return None, "Grad-CAM panel: off (panel_per_class: 0)."
    runs = {arm: next((r for r in rs if r.seed == study.seeds[0]), None) for arm, rs in by_arm.items()}
    runs = {arm: r for arm, r in runs.items() if r is not None}
    base = runs.get(study.baseline)
    if base is None:
        return None, f"Grad-CAM panel skipped: no seed {study.seeds[0]} run of the baseline."
    target = out / "gradcam_panel.png"
    chosen = _fixed_images(study, out, base)
    # what the picture shows; when none of it changed, a rerun does not redraw it
    key = {"layer": study.panel_layer, "images": [c["path"] for c in chosen],
           "runs": {arm: [str(r.path), (r.path / "summary.json").stat().st_mtime_ns] for arm, r in runs.items()}}
    key_file = out / "gradcam_panel.json"
    if target.is_file() and key_file.is_file() and json.loads(key_file.read_text(encoding="utf-8")) == key:
        return target, ""
    # torch and pytorch-grad-cam load only when a panel is drawn
    from imgcls.engine.inference import load_images
    from imgcls.explain import explain_run, panel

    stored = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    size = int(stored["img_size"])  # resolved, never 0
    images, ok, _bad = load_images([Path(c["path"]) for c in chosen], size, stored.get("resize", "squash"))
    kept = {str(p) for p in ok}
    labels = [c["class"] for c in chosen if c["path"] in kept]
    if not labels:
        return None, "Grad-CAM panel skipped: the chosen test images can no longer be read."
    rows = {}
    try:
        for arm, r in runs.items():
            records = explain_run(r.path, images, labels, method="gradcam", layer=study.panel_layer or None)
            rows[f"{arm}\n(seed {r.seed})"] = [rec["overlay"] for rec in records]
    except ImgclsError as e:  # a picture must not cost the study its tables
        return None, f"Grad-CAM panel skipped: {e}"
    titles = list(labels)
    layer = study.panel_layer or "last feature map"
    panel(rows, titles, target, suptitle=f"Grad-CAM ({layer}) of the same test images (column title: true class)")
    write_json(key_file, key)
    return target, ""
