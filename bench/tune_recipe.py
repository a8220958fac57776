"""Choose a recipe on validation accuracy alone; read the test split once, for the choice only.

    python bench/tune_recipe.py --data data/intel-scenes                  # all candidates, 3 seeds, then test
    python bench/tune_recipe.py --data data/intel-scenes --candidates lite0 lite1 --seeds 0 1
    python bench/tune_recipe.py --data data/intel-scenes --no-test        # choose, and stop there

The protocol, in code rather than in a comment:

1. Every candidate (a set of overrides on ``--recipe fast-finetune``) trains once per seed on DATA/train
   alone, given as a plain folder of classes with ``--test-fraction 0``: imgcls carves the same validation
   split it carves when trained on DATA (same ``split_seed``, same order of files), and the test folder
   is never opened while choosing.
2. A candidate whose fastest run (the decode cache warm, as it is after the first run; the fastest, as other
   work on the machine only ever slows a run down) plus the cold decode it skipped exceeds ``--budget-s`` is
   out. Of the rest, the highest mean best-validation accuracy
   over the seeds wins.
3. Only then are the winner's runs evaluated on DATA/test (``imgcls eval RUN DATA/test``), and the
   figure printed is the mean +- sd over seeds of that one evaluation. Losing candidates are never
   evaluated on test.

Finished runs are skipped, so the script can be stopped and restarted. Each run is an ordinary run folder
under ``--out`` (``CANDIDATE-sSEED``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Overrides on --recipe fast-finetune (whose own settings are in imgcls/config.py), one lever each: a stronger
# backbone whose weights ship in a package, a larger trained part, a higher input resolution.
CANDIDATES: dict[str, list[str]] = {
    "lite0": [],
    "lite1": ["--model", "efficientnet_lite1"],
    "lite2": ["--model", "efficientnet_lite2"],
    "lite0-freeze4": ["--freeze", "4"],  # blocks 3-6 trained, stem + blocks 0-2 cached
    "lite0-224": ["--img-size", "224"],
}


def imgcls(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgcls", *args]


def train_one(data: Path, name: str, seed: int, out: Path) -> dict:
    """The run's summary.json, with ``tune_wall_s``: the process's wall time, kept in OUT/walls.json (the
    run folder stays as imgcls wrote it)."""
    run, walls_file = out / f"{name}-s{seed}", out / "walls.json"
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    summary = run / "summary.json"
    if not summary.is_file():
        cmd = imgcls(
            "train", str(data / "train"), "--recipe", "fast-finetune", *CANDIDATES[name],
            "--test-fraction", "0", "--seed", str(seed), "--out", str(run),
        )
        if (run / "config.json").is_file():
            cmd.append("--resume")
        print(f"[{name} seed {seed}] {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)  # imgcls's own progress lines (epochs, speed, ETA) show as it trains
        walls[run.name] = time.perf_counter() - t0
        walls_file.write_text(json.dumps(walls, indent=2))
    result = json.loads(summary.read_text())
    # a run finished by an earlier, interrupted invocation has only imgcls's own wall time
    result.setdefault("tune_wall_s", walls.get(run.name, result["wall_s"]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a split root with train/ and test/ (intel-scenes)")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="runs/tune")
    ap.add_argument("--budget-s", type=float, default=300.0, help="whole-run time limit, cold decode included")
    ap.add_argument("--decode-s", type=float, default=15.0,
                    help="what a cold decode cache adds to a run (an upper bound for intel-scenes: bench/end_to_end.py's cold and warm runs differ by 2.6 s for 3,301 of its photos)")
    ap.add_argument("--no-test", action="store_true", help="choose, and do not evaluate the winner on test")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        sys.exit(f"tune_recipe: {data} needs train/ and test/ folders")
    out.mkdir(parents=True, exist_ok=True)

    table = {}
    for name in args.candidates:
        runs = [train_one(data, name, s, out) for s in args.seeds]
        vals = [100 * r["best_val_acc"] for r in runs]
        walls = [r["tune_wall_s"] for r in runs]
        table[name] = {
            "val_mean": statistics.mean(vals),
            "val_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "vals": vals,
            "wall_s": min(walls) + args.decode_s,
        }
    print("\ncandidate        val acc (mean +- sd over seeds)   fastest run + cold decode")
    for name, row in table.items():
        over = "  over budget" if row["wall_s"] > args.budget_s else ""
        print(f"{name:<16} {row['val_mean']:6.2f} +- {row['val_sd']:.2f}   {row['wall_s']:6.0f} s{over}")
    eligible = {k: v for k, v in table.items() if v["wall_s"] <= args.budget_s}
    if not eligible:
        sys.exit(f"tune_recipe: no candidate within {args.budget_s:.0f} s")
    chosen = max(eligible, key=lambda k: eligible[k]["val_mean"])
    print(f"\nchosen on validation: {chosen}")
    result = {"chosen": chosen, "seeds": args.seeds, "candidates": table}
    if not args.no_test:
        accs = []
        for s in args.seeds:
            run = out / f"{chosen}-s{s}"
            subprocess.run(
                imgcls("eval", str(run), str(data / "test"), "--out", str(run / "eval-test")),
                check=True, env={**os.environ, "IMGCLS_QUIET": "1"},
            )
            accs.append(100 * json.loads((run / "eval-test" / "metrics.json").read_text())["accuracy"])
        result["test_accs"] = accs
        result["test_mean"] = statistics.mean(accs)
        result["test_sd"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"test accuracy of {chosen}, read once: {result['test_mean']:.2f} +- {result['test_sd']:.2f} % "
              f"(seeds {', '.join(f'{a:.2f}' for a in accs)})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
