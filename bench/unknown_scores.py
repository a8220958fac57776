"""Which score separates left-out classes better: calibrated max-probability or energy? Measured on a run
trained with ``--exclude-classes``.

For each way of computing logits (the run's own, with flip TTA when the run uses it, and plain logits without
TTA: with TTA the "logits" are log-averaged probabilities, on which energy carries little beyond max-probability)
the temperature is refitted on the validation split, then for each score: AUROC of kept-class test images vs
left-out test images, FPR@95 % (share of left-out images kept when 95 % of kept-class images are kept), and
the shares flagged at the threshold chosen on validation (``keep``). Prints a table and one JSON line.

    python bench/unknown_scores.py RUN [--keep 0.95]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("IMGCLS_QUIET", "1")

from imgcls.data import prepare  # noqa: E402
from imgcls.deploy import calibration as calib  # noqa: E402
from imgcls.engine.evaluate import inference_model, predict_logits  # noqa: E402
from imgcls.engine.inference import load_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--keep", type=float, default=None, help="default: the run's keep")
    args = ap.parse_args()
    run = load_run(args.run, device="cpu")
    keep = args.keep or run.config.keep
    data = prepare(run.config)
    if data.excluded_test is None or not len(data.excluded_test):
        raise SystemExit(f"{args.run} has no left-out classes: train it with --exclude-classes")
    model = inference_model(run.model, data.val.images, mean=run.mean, std=run.std, device=run.device)
    results = {}
    for tta in sorted({run.config.tta, False}, reverse=True):
        def logits(images):
            return predict_logits(model, images, mean=run.mean, std=run.std, device=run.device, precision="fp32", tta=tta)

        val, known, left = logits(data.val.images), logits(data.test.images), logits(data.excluded_test.images)
        cal = calib.fit(val, data.val.labels, keep=keep)
        row = {"temperature": cal.temperature}
        for score in ("max_prob", "energy"):
            s_known = calib.scores(known, cal.temperature)[score]
            s_left = calib.scores(left, cal.temperature)[score]
            thr = cal.thresholds[score]
            row[score] = {**calib.open_set(s_known, s_left), "flagged_kept": float((s_known < thr).float().mean()),
                          "flagged_left_out": float((s_left < thr).float().mean())}
        results["tta" if tta else "no_tta"] = row
    print(f"{run.config.model}, left out {', '.join(run.excluded_classes)}: {len(data.test)} kept-class and "
          f"{len(data.excluded_test)} left-out test images; thresholds keep {keep:.0%} of {len(data.val)} validation images")
    print(f"  {'logits':8s} {'score':9s} {'AUROC':>6s} {'FPR@95':>7s} {'flagged kept':>13s} {'flagged left-out':>17s}")
    for way, row in results.items():
        for score in ("max_prob", "energy"):
            r = row[score]
            print(f"  {way:8s} {score:9s} {r['auroc']:6.3f} {r['fpr_at_95']:7.1%} {r['flagged_kept']:13.1%} {r['flagged_left_out']:17.1%}")
    print(json.dumps({"bench": "unknown_scores", "model": run.config.model, "left_out": run.excluded_classes,
                      "n_kept": len(data.test), "n_left_out": len(data.excluded_test), "keep": keep, **results}))


if __name__ == "__main__":
    main()
