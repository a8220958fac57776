"""A study on CPU: one run at a time (``--jobs 1``) against runs side by side (``--jobs 2``), same spec, one script.

The spec is the laptop study's base (``studies/laptop.yaml``: ResNet-18-D from scratch, 96 px, batch 32, Adam,
flip + rotate) cut to ``--epochs`` epochs, 2 arms (baseline, dropout) x 2 seeds = 4 runs, on intel-scenes.
The README's figures were measured when that base was ResNet-18 (same size, batch and optimizer).
Each side is one ``imgcls study`` process timed from start to exit, into its own study folder. The decode
cache (``IMGCLS_CACHE`` in a temporary folder) is filled before either side starts, so neither pays for it.

With ``--jobs 1`` the runs train one after another in the study's process with every core; with ``--jobs N``
each run is a subprocess with cores/N threads (``OMP_NUM_THREADS``), N at a time.

    .venv/bin/python bench/study_jobs.py              # 2 epochs a run: about 8 minutes on two cores
    .venv/bin/python bench/study_jobs.py --epochs 1 --jobs 2

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "datasets" / "intel-scenes"


def spec(data: Path, epochs: int) -> dict:
    base = yaml.safe_load((HERE.parent / "studies" / "laptop.yaml").read_text(encoding="utf-8"))["base"]
    return {"name": "jobs-bench", "data": str(data), "base": {**base, "epochs": epochs}, "seeds": [0, 1],
            "arms": {"baseline": {}, "dropout": {"dropout": 0.5}}, "panel_per_class": 1}


def side(spec_file: Path, out: Path, jobs: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "imgcls", "study", str(spec_file), "--out", str(out), "--jobs", str(jobs)]
    print(f"study_jobs: --jobs {jobs} ...", flush=True)
    t0 = time.perf_counter()
    with (out.parent / f"jobs{jobs}.log").open("w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc:
        sys.exit(f"study_jobs: --jobs {jobs} failed (exit {rc}); see {out.parent / f'jobs{jobs}.log'}")
    runs = sorted((out / "runs").glob("*/seed*/summary.json"))
    summaries = [json.loads(p.read_text()) for p in runs]
    return {"jobs": jobs, "wall_s": round(wall, 1),
            "train_img_per_s": round(sum(s["train_img_per_s"] for s in summaries) / len(summaries) * jobs, 1),
            "test_accuracy": [round(s["test_accuracy"], 4) for s in summaries]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="intel-scenes (train/ and test/ folders)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2, help="the side-by-side side's --jobs")
    args = ap.parse_args()
    if not (args.data / "train").is_dir():
        sys.exit(f"study_jobs: no intel-scenes at {args.data}; pass --data")
    with tempfile.TemporaryDirectory(prefix="imgcls-jobs-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "IMGCLS_CACHE": str(tmp / "cache")}
        doc = spec(args.data.resolve(), args.epochs)
        spec_file = tmp / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(doc), encoding="utf-8")
        print("study_jobs: filling the decode cache ...", flush=True)
        warm = ("from imgcls.config import TrainConfig; from imgcls.data import prepare; "
                f"prepare(TrainConfig(data={str(args.data.resolve())!r}, img_size={doc['base']['img_size']}))")
        subprocess.run([sys.executable, "-c", warm], env={**env, "IMGCLS_QUIET": "1"}, check=True)
        one = side(spec_file, tmp / "one", 1, env)
        many = side(spec_file, tmp / "many", args.jobs, env)
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, 4 runs of {args.epochs} epoch(s) (ResNet-18, 96 px, intel-scenes)")
    for r in (one, many):
        print(f"  --jobs {r['jobs']}: {r['wall_s']:7.1f} s   {r['train_img_per_s']:6.1f} img/s training in all   "
              f"test acc {', '.join(f'{a:.2%}' for a in r['test_accuracy'])}")
    speedup = one["wall_s"] / many["wall_s"]
    print(f"  --jobs {args.jobs} took {1 / speedup:.2f}x the time of --jobs 1 ({speedup:.2f}x as fast)")
    print(json.dumps({"bench": "study_jobs", "cores": cores, "epochs": args.epochs, "runs": 4, "one": one, "many": many,
                      "speedup": round(speedup, 3)}))


if __name__ == "__main__":
    main()
