"""Peak memory against the number of images: does one training epoch's RSS grow with the data set?

For each set size (default 2,000 and 40,000 images of 4 classes at 128 px, generated as JPEGs by Pillow),
two child processes, each measured on its own:

- ``prepare``: ``imgcls.data.prepare`` on a cold decode cache: decode and verify every file, write the
  cache entry, build the train/val/test splits;
- ``train``: ``imgcls train --epochs 1`` on the now warm cache, evaluation included, as a user runs it.

Peak RSS is the kernel's ``ru_maxrss`` of that child, read with ``os.wait4`` (getrusage(RUSAGE_CHILDREN)
keeps the maximum over every child waited for, which would hide a smaller second child). Pages of the
memory-mapped cache that a child touches count in its RSS, as they do for the page cache's owner. The
training throughput is the epoch's images/s from the run's metrics.csv. The model is timm's tiny
``test_efficientnet`` so that an epoch of 40,000 images fits in under an hour on 2 CPU cores (about 45 min at
13 img/s): what grows with the set is the data, not the model.

    python bench/memory.py [--sizes 2000,40000] [--img-size 128] [--model test_efficientnet] [--work DIR]

Prints one line per child and one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("red", "green", "blue", "yellow")
PALETTE = ((200, 40, 40), (40, 160, 60), (40, 60, 200), (200, 180, 40))


def _write_images(args: tuple[Path, int, int, int, int]) -> None:
    """Images ``start..stop`` of one class: its colour, stripes and per-image noise (each file distinct)."""
    folder, cls, start, stop, size = args
    folder.mkdir(parents=True, exist_ok=True)
    stripes = (np.arange(size) // 8 % 2).astype(np.float32) * 40
    base = np.ones((size, size, 3), np.float32) * np.array(PALETTE[cls], np.float32)
    base += stripes[:, None, None] if cls % 2 else stripes[None, :, None]
    for i in range(start, stop):
        rng = np.random.default_rng(cls * 1_000_000 + i)
        img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=85)


def make_set(root: Path, n: int, size: int) -> Path:
    """``n`` images in 4 class folders under ``root``; reused when a previous call finished it."""
    done = root / ".complete"
    if done.is_file():
        return root
    per = n // len(CLASSES)
    jobs = [(root / name, c, s, min(s + 1000, per), size) for c, name in enumerate(CLASSES) for s in range(0, per, 1000)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as ex:
        list(ex.map(_write_images, jobs))
    done.write_text(str(n))
    return root


def run_child(cmd: list[str], *, env: dict, log: Path) -> tuple[float, float, int]:
    """-> (peak RSS in MB, wall seconds, exit code; -9 when the kernel's OOM killer ended it) of ``cmd``,
    whose output goes to ``log``. A child that fails still reports the peak it reached."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        print(f"{' '.join(cmd[:4])} ... failed (exit {p.returncode}); see {log}", flush=True)
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, p.returncode  # ru_maxrss is in KiB on Linux


def measure(n: int, *, work: Path, img_size: int, model: str, batch_size: int, precision: str) -> dict:
    data = make_set(work / f"set-{n}", n, img_size)
    cache = work / f"cache-{n}"
    run = work / f"run-{n}"
    for d in (cache, run):  # a cold cache and a fresh run folder every time
        if d.exists():
            subprocess.run(["rm", "-rf", str(d)], check=True)
    env = {**os.environ, "IMGCLS_CACHE": str(cache), "IMGCLS_QUIET": "0"}
    split = ["--val-fraction", "0.05", "--test-fraction", "0.05"]
    prepare_code = (
        "import sys; from imgcls import config; from imgcls.data import prepare; "
        f"prepare(config.from_dict({{'data': sys.argv[1], 'img_size': {img_size}, 'val_fraction': 0.05, 'test_fraction': 0.05}}))"
    )
    rss_prepare, wall_prepare, rc_prepare = run_child([sys.executable, "-c", prepare_code, str(data)], env=env, log=work / f"prepare-{n}.log")
    print(f"{n:>6} images  prepare (cold cache): peak RSS {rss_prepare:8.0f} MB  {wall_prepare:6.1f} s", flush=True)
    train = [sys.executable, "-m", "imgcls", "train", str(data), "--out", str(run), "--model", model, "--no-pretrained",
             "--img-size", str(img_size), "--epochs", "1", "--batch-size", str(batch_size), "--device", "cpu", "--precision", precision, *split]
    rss_train, wall_train, rc_train = run_child(train, env=env, log=work / f"train-{n}.log")
    ips = None
    if rc_train == 0:
        with (run / "metrics.csv").open(newline="") as f:
            ips = round(float(list(csv.DictReader(f))[0]["img_per_s"]), 1)
    print(f"{n:>6} images  train 1 epoch (warm):  peak RSS {rss_train:8.0f} MB  {wall_train:6.1f} s  "
          + (f"{ips:,.0f} img/s" if ips is not None else f"exit {rc_train}"), flush=True)
    return {"images": n, "peak_rss_prepare_mb": round(rss_prepare), "peak_rss_train_mb": round(rss_train),
            "train_img_per_s": ips, "wall_prepare_s": round(wall_prepare, 1), "wall_train_s": round(wall_train, 1),
            "exit_prepare": rc_prepare, "exit_train": rc_train}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,40000", help="comma-separated numbers of images")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--model", default="test_efficientnet")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="fp32", help="fp32 on a CPU: bf16 there is emulated unless the CPU has AMX")
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated sets (kept, reused); default a temp folder")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="imgcls-memory-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [measure(n, work=work, img_size=args.img_size, model=args.model, batch_size=args.batch_size, precision=args.precision) for n in sizes]
    small, big = rows[0], rows[-1]
    result = {
        "bench": "memory", "img_size": args.img_size, "model": args.model, "batch_size": args.batch_size, "precision": args.precision, "runs": rows,
        "train_rss_growth_mb": big["peak_rss_train_mb"] - small["peak_rss_train_mb"],
        "prepare_rss_growth_mb": big["peak_rss_prepare_mb"] - small["peak_rss_prepare_mb"],
        "img_per_s_ratio": round(big["train_img_per_s"] / small["train_img_per_s"], 3)
        if big["train_img_per_s"] and small["train_img_per_s"] else None,
    }
    print(f"peak RSS growth from {small['images']:,} to {big['images']:,} images: train {result['train_rss_growth_mb']:,} MB, "
          f"prepare {result['prepare_rss_growth_mb']:,} MB; images/s ratio {result['img_per_s_ratio']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
