"""Decode rate of large photos: full decode + resize vs the reduced-scale JPEG decode (``decode_square``).

Writes a few synthetic 4000 x 3000 JPEGs (smooth structure plus grain, quality 90, like phone photos) into
a temp folder, then decodes them to the target size both ways, alternating rounds, single-threaded, and
reports the median img/s of each, their ratio and the mean absolute pixel difference between the results
(0-255 levels). Prints a table and one final JSON line; asserts nothing.

    python bench/decode_large.py [--n 6] [--size 160] [--rounds 3] [--width 4000 --height 3000]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.data.images import decode_rgb, decode_square, resize_rgb


def write_photos(folder: Path, n: int, w: int, h: int) -> list[Path]:
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        low = Image.fromarray((rng.random((9, 12, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(low, np.float32) + rng.normal(0, 10, (h, w, 3)).astype(np.float32)
        p = folder / f"photo_{i}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def before(data: bytes, size: int, mode: str) -> np.ndarray:
    arr, _ = decode_rgb(data)  # full decode
    return resize_rgb(arr, size, mode)


def after(data: bytes, size: int, mode: str) -> np.ndarray:
    return decode_square(data, size, resize=mode)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--mode", default="squash", choices=("squash", "crop", "pad"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        blobs = [p.read_bytes() for p in write_photos(Path(tmp), args.n, args.width, args.height)]
    rates: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):  # alternate, so load from other processes falls on both alike
        for name, fn in (("before", before), ("after", after)):
            t = time.perf_counter()
            for b in blobs:
                fn(b, args.size, args.mode)
            rates[name].append(len(blobs) / (time.perf_counter() - t))
    diffs = [np.abs(before(b, args.size, args.mode).astype(np.int16) - after(b, args.size, args.mode).astype(np.int16)).mean() for b in blobs]
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.n} JPEGs {args.width}x{args.height} -> {args.size} px ({args.mode}), median of {args.rounds} rounds, one thread")
    print(f"  full decode + resize   {med['before']:8.2f} img/s")
    print(f"  reduced-scale decode   {med['after']:8.2f} img/s   ({med['after'] / med['before']:.1f}x)")
    print(f"  mean |difference|      {float(np.mean(diffs)):8.3f} of 255 levels (max per image {float(np.max(diffs)):.3f})")
    print(json.dumps({
        "bench": "decode_large", "n": args.n, "width": args.width, "height": args.height, "size": args.size, "mode": args.mode,
        "before_img_per_s": round(med["before"], 3), "after_img_per_s": round(med["after"], 3),
        "speedup": round(med["after"] / med["before"], 2), "mean_abs_diff": round(float(np.mean(diffs)), 4),
    }))


if __name__ == "__main__":
    main()
