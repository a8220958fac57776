"""Write an intel-scenes-like set of JPEGs from a seeded generator: same six classes, 150x150, same counts.

For a machine that holds only this repository (a GPU lent for a few minutes): the decode, the cache and
the training then see what they see on intel-scenes (as many files, JPEG-encoded, the same size and
class balance), without copying photos anywhere. The pictures are simple scenes (a sky over a ground
with a class's palette, texture direction and frequency, every parameter jittered per image, plus
blobs and noise): learnable, not trivially, and no substitute for the real photos' accuracy.

    python bench/make_scenes.py OUT [--scale 1.0] [--size 150] [--seed 0] [--workers N]

OUT gets ``train/CLASS/*.jpg`` and ``test/CLASS/*.jpg`` (14,034 + 1,501 images at scale 1); it must not
exist yet or be empty. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# intel-scenes' own counts per class (train, test)
COUNTS = {
    "buildings": (1200, 248), "forest": (1156, 240), "glacier": (1113, 231),
    "mountain": (1229, 255), "sea": (1253, 260), "street": (1289, 267),
}
# per class: sky colour, ground colour, texture angle (degrees), texture period (px), horizon (share of height)
LOOKS = {
    "buildings": ((150, 170, 190), (120, 110, 105), 90, 9, 0.25),
    "forest": ((120, 150, 110), (40, 90, 40), 80, 4, 0.10),
    "glacier": ((180, 200, 225), (215, 230, 240), 30, 24, 0.40),
    "mountain": ((140, 175, 215), (105, 95, 90), 45, 16, 0.45),
    "sea": ((150, 185, 225), (40, 90, 150), 0, 7, 0.50),
    "street": ((165, 175, 185), (90, 90, 95), 60, 12, 0.35),
}


def scene(cls: str, rng: np.random.Generator, size: int) -> np.ndarray:
    sky, ground, angle, period, horizon = LOOKS[cls]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    jitter = lambda c, s: np.clip(np.asarray(c, np.float32) + rng.normal(0, s, 3), 0, 255)  # noqa: E731
    sky_c, ground_c = jitter(sky, 18), jitter(ground, 18)
    h = np.clip(horizon + rng.normal(0, 0.08), 0.05, 0.9)
    tilt = rng.normal(0, 0.1)
    is_ground = (y > h + tilt * (x - 0.5))[..., None]
    top = sky_c * (0.8 + 0.3 * y[..., None])  # brighter towards the horizon
    a = np.deg2rad(angle + rng.normal(0, 12))
    p = period * rng.uniform(0.7, 1.4) / size
    wave = np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / p + rng.uniform(0, 2 * np.pi))
    bottom = ground_c * (1 + 0.22 * wave[..., None])
    img = np.where(is_ground, bottom, top)
    for _ in range(rng.integers(1, 5)):  # blobs: objects that are not the class
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.15)
        blob = ((y - cy) ** 2 + (x - cx) ** 2 < r * r)[..., None]
        img = np.where(blob, rng.uniform(0, 255, 3).astype(np.float32), img)
    img += rng.normal(0, 10, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_class(job: tuple) -> int:
    out, split, cls, n, size, seed = job
    folder = Path(out) / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    ci, si = list(COUNTS).index(cls), ("train", "test").index(split)
    for i in range(n):
        rng = np.random.default_rng([seed, si, ci, i])
        Image.fromarray(scene(cls, rng, size)).save(folder / f"{i}.jpg", quality=90)
    return n


def main() -> None:
    p = argparse.ArgumentParser(description="write an intel-scenes-like set of JPEGs from a seeded generator")
    p.add_argument("out", type=Path)
    p.add_argument("--scale", type=float, default=1.0, help="multiply intel-scenes' counts (at least 2 images per class and split)")
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    args = p.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} exists and is not empty")
    t = time.perf_counter()
    jobs = [
        (str(args.out), split, cls, max(2, round(counts[si] * args.scale)), args.size, args.seed)
        for cls, counts in COUNTS.items() for si, split in enumerate(("train", "test"))
    ]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            n = sum(pool.map(write_class, jobs))
    else:
        n = sum(map(write_class, jobs))
    mib = sum(f.stat().st_size for f in args.out.rglob("*.jpg")) / 2**20
    print(json.dumps({"bench": "make_scenes", "out": str(args.out), "images": n, "mib": round(mib, 1),
                      "size": args.size, "seed": args.seed, "s": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
