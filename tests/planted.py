"""A small data set with known problems planted in it, written by Pillow into a temp folder.

- ``paper`` is all PNG, every other class JPEG (a format shortcut);
- ``rare`` has a tenth of the training images of the big classes (10:1 imbalance) and looks like ``can``
  apart from its colour, so a model that ignores it loses little accuracy;
- some training images appear again in test/, resized and re-encoded (near-duplicates across splits);
- a few bottle and can images sit in each other's folders (swapped labels).

Every image has its own low-frequency pattern, so distinct images have distinct perceptual hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"bottle": (60, 150, 70), "can": (170, 60, 60), "paper": (70, 80, 190), "rare": (150, 75, 95)}
PATTERN = {"bottle": "h", "can": "v", "paper": "check", "rare": "v"}
BIG, RARE, TEST = 40, 4, 10


@dataclass
class Planted:
    root: Path
    near_duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train path, test copy), relative
    swapped: list[str] = field(default_factory=list)  # relative paths whose folder label is wrong


def image(cls: str, i: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(sum(map(ord, cls)) * 7919 + i)
    low = Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    blob = (np.asarray(low, np.float32) - 128) * 0.8
    yy, xx = np.mgrid[0:size, 0:size]
    kind = PATTERN[cls]
    stripes = ((yy if kind == "h" else xx) // 4 % 2) if kind != "check" else ((yy // 6 + xx // 6) % 2)
    img = np.asarray(COLOURS[cls], np.float32)[None, None, :] + blob[..., None] + stripes[..., None] * 40.0
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _save(img: Image.Image, path: Path, cls: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if cls == "paper":
        img.save(path.with_suffix(".png"))
    else:
        img.save(path.with_suffix(".jpg"), quality=92)


def make(root: Path, *, n_dupes: int = 4, n_swaps: int = 3) -> Planted:
    out = Planted(root)
    for split, counts, offset in (("train", {"bottle": BIG, "can": BIG, "paper": BIG, "rare": RARE}, 0),
                                  ("test", {c: TEST for c in COLOURS}, 1000)):
        for cls, n in counts.items():
            for i in range(n):
                _save(image(cls, offset + i), root / split / cls / f"{cls} {offset + i}", cls)
    # swapped labels: the first n_swaps bottles go to can/ and the first n_swaps cans to bottle/
    for i in range(n_swaps):
        for src, dst in (("bottle", "can"), ("can", "bottle")):
            p = root / "train" / src / f"{src} {i}.jpg"
            q = root / "train" / dst / f"{src} {i} (1).jpg"
            p.rename(q)
            out.swapped.append(str(q.relative_to(root)))
    # near-duplicates: training images copied into test/, resized to 48 px (JPEGs re-encoded at quality 70)
    for i in range(n_dupes):
        cls = ("bottle", "can", "paper")[i % 3]
        idx = 10 + i
        src = root / "train" / cls / f"{cls} {idx}{'.png' if cls == 'paper' else '.jpg'}"
        copy = Image.open(src).convert("RGB").resize((48, 48), Image.Resampling.BILINEAR)
        dst = root / "test" / cls / f"copy {idx}{'.png' if cls == 'paper' else '.jpg'}"
        copy.save(dst, **({} if cls == "paper" else {"quality": 70}))
        out.near_duplicates.append((str(src.relative_to(root)), str(dst.relative_to(root))))
    return out
