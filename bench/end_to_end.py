"""Whole-process time, as a user runs it: `imgcls train` vs the capable-user loop, each as its own process.

Both tools get the same files: a class-balanced subset of intel-scenes' train split (``--train-per-class``,
300 a class = 1,800 photos by default) and its whole test split, copied into a temporary folder. Each is
timed from process start to exit, start-up (Python, imports), decoding, training, evaluation and (for
imgcls) its run folder, plots and page included:

- baseline: ``python bench/baseline_loop.py --data SUBSET --model M --epochs N`` (timm, ImageFolder + PIL
  in 2 DataLoader workers, AdamW + OneCycle, bf16, channels_last; test accuracy after every epoch);
- imgcls: ``imgcls train SUBSET --model M --epochs N --img-size 150 --seed 0 --out TMP`` with an empty
  decode cache (``IMGCLS_CACHE`` in the temporary folder), so the decode is on its clock; a second,
  warm-cache run shows what a repeat run costs. imgcls holds 10 % of the training photos out for
  validation and trains on the rest; the baseline trains on all of them.

Start-up alone is measured too: ``python -c "import torch, timm, torchvision"`` (the baseline's imports)
and ``imgcls --version`` / ``imgcls train --help`` (the CLI's).

    .venv/bin/python bench/end_to_end.py                      # ResNet-18 from scratch, 3 epochs: about 4 minutes
    .venv/bin/python bench/end_to_end.py --model resnet18 --epochs 3 --train-per-class 300

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets" / "intel-scenes"


def subset(src: Path, dst: Path, per_class: int) -> int:
    """train/: the first ``per_class`` files of each class (sorted names); test/: all of it."""
    n = 0
    for cls in sorted(p.name for p in (src / "train").iterdir() if p.is_dir()):
        (dst / "train" / cls).mkdir(parents=True)
        for f in sorted((src / "train" / cls).iterdir())[:per_class]:
            shutil.copy2(f, dst / "train" / cls / f.name)
            n += 1
    shutil.copytree(src / "test", dst / "test")
    return n


def timed(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"end_to_end: {' '.join(cmd[:4])} ... failed (exit {r.returncode}); see {log}")
    return wall


def startup(cmd: list[str], env: dict, repeats: int = 3) -> float:
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-per-class", type=int, default=300)
    args = ap.parse_args()
    if not (args.data / "train").is_dir():
        sys.exit(f"end_to_end: {args.data} has no train/ folder (get intel-scenes, see the README)")
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="imgcls-e2e-") as tmp:
        tmp = Path(tmp)
        n_train = subset(args.data, tmp / "data", args.train_per_class)
        env = {**os.environ, "IMGCLS_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
        env.pop("IMGCLS_QUIET", None)

        start = {
            "python -c 'import torch, timm, torchvision'": startup([py, "-c", "import torch, timm, torchvision"], env),
            "imgcls --version": startup([py, "-m", "imgcls", "--version"], env),
            "imgcls train --help": startup([py, "-m", "imgcls", "train", "--help"], env),
        }
        base_cmd = [py, str(HERE / "baseline_loop.py"), "--data", str(tmp / "data"), "--model", args.model,
                    "--epochs", str(args.epochs)]
        ours_cmd = [py, "-m", "imgcls", "train", str(tmp / "data"), "--model", args.model, "--epochs", str(args.epochs),
                    "--img-size", "150", "--seed", "0"]
        print(f"start-up measured; the baseline loop ({args.epochs} epochs)...", flush=True)
        base_wall = timed(base_cmd, env, tmp / "baseline.log")
        print(f"  {base_wall:.0f} s; imgcls train, empty cache...", flush=True)
        cold_wall = timed([*ours_cmd, "--out", str(tmp / "run-cold")], env, tmp / "imgcls-cold.log")
        print(f"  {cold_wall:.0f} s; imgcls train, warm cache...", flush=True)
        warm_wall = timed([*ours_cmd, "--out", str(tmp / "run-warm")], env, tmp / "imgcls-warm.log")
        print(f"  {warm_wall:.0f} s\n", flush=True)

        base_acc = json.loads((tmp / "baseline.log").read_text().strip().splitlines()[-1])["epochs"][-1]["test_acc"]
        ours_acc = json.loads((tmp / "run-cold" / "summary.json").read_text())["test_accuracy"]
        log = (tmp / "imgcls-cold.log").read_text()
        trained = re.search(r"trained .*", log)

    print(f"{args.model}@150 from scratch, {args.epochs} epochs, {n_train:,} training photos (imgcls: 90 % of them; "
          f"10 % validation), whole test split")
    print("start-up (median of 3):")
    for k, v in start.items():
        print(f"  {k:<46} {v:5.2f} s")
    print(f"{'':<28} {'wall':>7} {'test acc':>9}")
    print(f"{'baseline loop':<28} {base_wall:6.0f}s {100 * base_acc:8.2f}%")
    print(f"{'imgcls train (cold cache)':<28} {cold_wall:6.0f}s {100 * ours_acc:8.2f}%")
    print(f"{'imgcls train (warm cache)':<28} {warm_wall:6.0f}s")
    print(f"imgcls is {base_wall / cold_wall:.2f}x the baseline's speed end to end (cold cache), "
          f"{base_wall / warm_wall:.2f}x warm" + (f"; its own line: {trained.group(0)}" if trained else ""))
    print(json.dumps({
        "bench": "end_to_end", "model": args.model, "epochs": args.epochs, "train_photos": n_train,
        "startup_s": start, "baseline_wall_s": base_wall, "imgcls_cold_wall_s": cold_wall, "imgcls_warm_wall_s": warm_wall,
        "baseline_test_acc": base_acc, "imgcls_test_acc": ours_acc,
        "speedup_cold": base_wall / cold_wall, "speedup_warm": base_wall / warm_wall,
    }))


if __name__ == "__main__":
    main()
