"""Read a study's finished run folders and compare every arm with the baseline, as plain data.

Each arm is compared with the baseline on the *same test images*: the paths both runs predicted.
For an ordinary arm that is the whole test split; for an arm that leaves classes out it is the kept
classes' images, and a baseline prediction of a left-out class on those images counts as an error.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.errors import ImgclsError
from imgcls.io import write_csv as io_write_csv
from imgcls.study import stats
from imgcls.study.spec import Study, run_dir

ALPHA = 0.05


@dataclass
class RunResult:
    arm: str
    seed: int
    path: Path
    summary: dict
    metrics: dict  # eval/metrics.json
    correct: dict[str, bool]  # test image path -> predicted right
    history: list[dict] = field(default_factory=list)  # metrics.csv rows

    @property
    def accuracy(self) -> float:
        return float(self.summary["test_accuracy"])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_run(arm: str, seed: int, path: Path) -> RunResult:
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        metrics = json.loads((path / "eval" / "metrics.json").read_text(encoding="utf-8"))
        preds = _read_csv(path / "eval" / "predictions.csv")
    except FileNotFoundError as e:
        raise ImgclsError(f"run {path} is incomplete: missing {Path(e.filename).name}; the study needs a test split") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImgclsError(f"run {path} is damaged: {e}") from None
    if "test_accuracy" not in summary:
        raise ImgclsError(f"run {path} has no test accuracy: the study needs data with a test split")
    correct = {r["path"]: r["true"] == r["predicted"] for r in preds}
    history = []
    if (path / "metrics.csv").is_file():
        history = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in _read_csv(path / "metrics.csv")]
    return RunResult(arm, seed, path, summary, metrics, correct, history)


def load_results(study: Study, out: Path, *, skip: set[tuple[str, int]] = frozenset()) -> tuple[dict[str, list[RunResult]], list[str]]:
    """Finished runs by arm (in seed order) and a note for each run that is not there."""
    by_arm: dict[str, list[RunResult]] = {arm: [] for arm in study.arms}
    missing = []
    for arm in study.arms:
        for seed in study.seeds:
            path = run_dir(out, arm, seed)
            if (arm, seed) in skip:
                missing.append(f"{arm} seed {seed} (stale)")
            elif not (path / "summary.json").is_file():
                missing.append(f"{arm} seed {seed} (not finished)")
            else:
                by_arm[arm].append(load_run(arm, seed, path))
    return by_arm, missing


# --- comparison with the baseline -------------------------------------------------------------------


def _matched(run: RunResult, base: RunResult, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([run.correct[p] for p in paths], dtype=bool)
    b = np.array([base.correct[p] for p in paths], dtype=bool)
    return a, b


def compare(runs: list[RunResult], base_runs: list[RunResult]) -> dict:
    """Delta of mean accuracy on the shared test images and its p-value: a paired t-test over the seeds
    both arms have (two or more), else McNemar's exact test on one pair of runs."""
    if not runs or not base_runs:
        return {"delta": math.nan, "p_value": math.nan, "test": "", "baseline_mean": math.nan, "compared_on": ""}
    paths = sorted(set(runs[0].correct) & set(base_runs[0].correct))
    if not paths:
        raise ImgclsError(f"arm {runs[0].arm} and the baseline share no test image; cannot compare them")
    arm_acc = {r.seed: float(np.mean([r.correct.get(p, False) for p in paths])) for r in runs}
    base_acc = {r.seed: float(np.mean([r.correct.get(p, False) for p in paths])) for r in base_runs}
    delta = float(np.mean(list(arm_acc.values())) - np.mean(list(base_acc.values())))
    common = sorted(set(arm_acc) & set(base_acc))
    if len(common) >= 2:
        p = stats.paired_t([arm_acc[s] for s in common], [base_acc[s] for s in common])
        test = f"paired t over {len(common)} seeds"
    else:
        seed_a = common[0] if common else runs[0].seed
        seed_b = common[0] if common else base_runs[0].seed
        ra = next(r for r in runs if r.seed == seed_a)
        rb = next(r for r in base_runs if r.seed == seed_b)
        a, b = _matched(ra, rb, [p for p in paths if p in ra.correct and p in rb.correct])
        p, _, _ = stats.mcnemar_exact(a, b)
        test = "McNemar exact, 1 seed" + ("" if common else f" ({seed_a} vs {seed_b})")
    n_all = len(base_runs[0].correct)
    compared_on = "all test images" if len(paths) == n_all else f"{len(paths):,} of {n_all:,} test images (kept classes)"
    return {
        "delta": delta, "p_value": p, "test": test,
        "baseline_mean": float(np.mean(list(base_acc.values()))), "compared_on": compared_on,
    }


def summary_rows(study: Study, by_arm: dict[str, list[RunResult]]) -> list[dict]:
    """One row per arm: n, mean, std, 95% CI, delta vs baseline, p-value (raw and Holm) and the test."""
    base_runs = by_arm[study.baseline]
    rows = []
    for arm, runs in by_arm.items():
        mean, std, lo, hi = stats.mean_ci([r.accuracy for r in runs])
        row = {"arm": arm, "n": len(runs), "mean": mean, "std": std, "ci_low": lo, "ci_high": hi}
        if arm == study.baseline:
            row.update(delta=0.0, p_value=math.nan, test="(baseline)", baseline_mean=mean, compared_on="all test images")
        else:
            row.update(compare(runs, base_runs))
        aurocs = [r.summary.get("excluded_auroc") for r in runs]
        aurocs = [a for a in aurocs if a is not None and not math.isnan(a)]
        row["left_out"] = ",".join(study.config(arm, study.seeds[0]).exclude_classes)
        row["auroc_left_out"] = float(np.mean(aurocs)) if aurocs else math.nan
        row.update(_unknown_means(runs))
        rows.append(row)
    adjusted = stats.holm([r["p_value"] for r in rows])
    for r, p in zip(rows, adjusted):
        r["p_holm"] = p
        r["significant"] = bool(r["p_value"] < ALPHA) if not math.isnan(r["p_value"]) else ""
    return rows


UNKNOWN_KEYS = {"flagged_test": "flagged_kept", "flagged_left_out": "flagged_left_out", "auroc": "auroc_unknown", "fpr_at_95": "fpr95_unknown"}


def _unknown_means(runs: list[RunResult]) -> dict[str, float]:
    """The "unknown" figures of eval/metrics.json (deploy.calibration.unknown_report), averaged over seeds:
    the share of kept-class test images flagged, the share of left-out images flagged, AUROC and FPR@95 % of
    the rejection score; NaN where the runs have none (trained before calibration, or no left-out classes)."""
    out = {}
    for key, col in UNKNOWN_KEYS.items():
        vals = [(r.metrics.get("unknown") or {}).get(key) for r in runs]
        vals = [float(v) for v in vals if v is not None and not math.isnan(float(v))]
        out[col] = float(np.mean(vals)) if vals else math.nan
    return out


def result_rows(by_arm: dict[str, list[RunResult]]) -> list[dict]:
    rows = []
    for runs in by_arm.values():
        for r in runs:
            s = r.summary
            rows.append({
                "arm": r.arm, "seed": r.seed, "test_accuracy": s.get("test_accuracy"),
                "test_macro_f1": s.get("test_macro_f1"), "test_ece": s.get("test_ece"),
                "best_val_acc": s.get("best_val_acc"), "best_epoch": s.get("best_epoch"), "epochs_run": s.get("epochs_run"),
                "excluded_auroc": s.get("excluded_auroc", ""), "n_test": r.metrics.get("n"),
                "train_wall_s": s.get("train_wall_s"), "wall_s": s.get("wall_s"), "run": str(r.path),
            })
    return rows


# --- per class, confusion and left-out classes -------------------------------------------------------


def _mean_per_class(runs: list[RunResult]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for r in runs:
        for name, v in r.metrics["per_class"].items():
            sums.setdefault(name, []).append(float(v["accuracy"]))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def _mean_confusion(runs: list[RunResult]) -> dict[tuple[str, str], float]:
    """Row-normalised confusion matrices averaged over seeds, keyed by (true, predicted) names."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        classes = r.metrics["classes"]
        m = np.asarray(r.metrics["confusion_matrix"], dtype=float)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        for i, t in enumerate(classes):
            for j, p in enumerate(classes):
                acc.setdefault((t, p), []).append(float(m[i, j]))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def per_class_rows(study: Study, by_arm: dict[str, list[RunResult]], classes: list[str]) -> list[dict]:
    """Per-class accuracy of each arm vs the baseline (means over seeds); left-out classes are marked."""
    base = _mean_per_class(by_arm[study.baseline])
    rows = []
    for arm, runs in by_arm.items():
        if arm == study.baseline or not runs:
            continue
        mine = _mean_per_class(runs)
        left_out = set(study.config(arm, study.seeds[0]).exclude_classes)
        for c in classes:
            if c in left_out or c not in mine:
                rows.append({"arm": arm, "class": c, "arm_acc": math.nan, "baseline_acc": base.get(c, math.nan), "delta": math.nan, "note": "left out"})
            else:
                b = base.get(c, math.nan)
                rows.append({"arm": arm, "class": c, "arm_acc": mine[c], "baseline_acc": b, "delta": mine[c] - b, "note": ""})
    return rows


def confusion_rows(study: Study, by_arm: dict[str, list[RunResult]]) -> list[dict]:
    """Row-normalised confusion deltas (arm - baseline) over the rows both know and every column either has."""
    base = _mean_confusion(by_arm[study.baseline])
    rows = []
    for arm, runs in by_arm.items():
        if arm == study.baseline or not runs:
            continue
        mine = _mean_confusion(runs)
        true_names = sorted({t for t, _ in mine} & {t for t, _ in base})
        pred_names = sorted({p for _, p in mine} | {p for _, p in base})
        for t in true_names:
            for p in pred_names:
                a, b = mine.get((t, p), 0.0), base.get((t, p), 0.0)
                rows.append({"arm": arm, "true": t, "predicted": p, "arm_rate": a, "baseline_rate": b, "delta": a - b})
    return rows


def left_out_rows(by_arm: dict[str, list[RunResult]]) -> list[dict]:
    """Where each left-out class's test images go (fractions averaged over seeds)."""
    rows = []
    for arm, runs in by_arm.items():
        per: dict[str, dict[str, list[float]]] = {}
        conf: dict[str, list[float]] = {}
        for r in runs:
            for name, info in ((r.metrics.get("excluded") or {}).get("classes") or {}).items():
                for pred, frac in info["predicted_as"].items():
                    per.setdefault(name, {}).setdefault(pred, []).append(float(frac))
                conf.setdefault(name, []).append(float(info.get("mean_max_softmax", math.nan)))
        for name, dist in per.items():
            for pred, fracs in sorted(dist.items(), key=lambda kv: -np.mean(kv[1])):
                rows.append({"arm": arm, "left_out_class": name, "predicted_as": pred, "fraction": float(np.mean(fracs)),
                             "mean_max_softmax": float(np.mean(conf[name]))})
    return rows


def mean_curves(by_arm: dict[str, list[RunResult]], key: str = "val_acc") -> dict[str, tuple[list[int], list[float], list[float], list[float]]]:
    """Per arm: epochs, mean, min and max of ``key`` over the seeds that reached each epoch."""
    out = {}
    for arm, runs in by_arm.items():
        by_epoch: dict[int, list[float]] = {}
        for r in runs:
            for h in r.history:
                if key in h and not math.isnan(h[key]):
                    by_epoch.setdefault(int(h["epoch"]), []).append(h[key])
        epochs = sorted(by_epoch)
        out[arm] = (epochs, [float(np.mean(by_epoch[e])) for e in epochs],
                    [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs])
    return out


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or (list(rows[0]) if rows else [])
    return io_write_csv(path, columns, [[_fmt(r.get(k, "")) for k in columns] for r in rows])


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v
