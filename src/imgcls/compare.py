"""``imgcls compare``: two runs on the same test images, and whether the difference between them is real.

Both models predict the same images (the test split they share, or DATA); each accuracy gets a
bootstrap interval, the difference a paired one, and McNemar's exact test looks at the images where
exactly one of the two is right. The answer is written to ``compare.json``, two image grids and a page.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls import progress
from imgcls.config import with_value
from imgcls.data import Split, prepare_eval
from imgcls.engine.evaluate import predict_logits
from imgcls.engine.inference import LoadedRun, load_run, own_test_split
from imgcls.errors import ImgclsError
from imgcls.io import write_json
from imgcls.report import intervals, plots
from imgcls.study.stats import mcnemar_exact

ALPHA = 0.05
SPLIT_KEYS = ("data", "val_fraction", "test_fraction", "split_seed")  # what carves the test split
GRID_MAX = 24


@dataclass
class Outcome:
    """One run's predictions on its copy of the test images, by path."""

    split: Split
    true: list[str]  # class name per image
    predicted: list[str]
    confidence: list[float]


def _label(run: Path, other: Path) -> str:
    """The run's folder name; with its parent when both runs have the same name (seed0 of two arms)."""
    return run.name if run.name != other.name else f"{run.parent.name}/{run.name}"


def _shared_classes(a: LoadedRun, b: LoadedRun, mode: str) -> list[str]:
    if mode not in ("same", "shared"):
        raise ImgclsError(f"--classes must be same or shared, got {mode!r}")
    only_a = [c for c in a.classes if c not in b.classes]
    only_b = [c for c in b.classes if c not in a.classes]
    if (only_a or only_b) and mode != "shared":
        raise ImgclsError(
            f"the runs know different classes (only A: {', '.join(only_a) or '-'}; only B: {', '.join(only_b) or '-'}); "
            "pass --classes shared to compare them on the classes both know"
        )
    shared = [c for c in a.classes if c in b.classes]
    if not shared:
        raise ImgclsError("the runs share no class; there is nothing to compare")
    return shared


def _split_key(cfg, key: str):
    v = getattr(cfg, key)
    if key == "data" and Path(v).exists():  # the same folder written two ways is the same data
        return os.path.realpath(v)
    return v


def _own_split_differs(a: LoadedRun, b: LoadedRun) -> list[str]:
    return [k for k in SPLIT_KEYS if _split_key(a.config, k) != _split_key(b.config, k)]


def _test_images(run: LoadedRun, data: str | None, other: LoadedRun) -> tuple[Split, list[str]]:
    """The run's test images and their class names: its own test split (data None) or DATA's."""
    if data is None:
        return own_test_split(run).test, run.classes
    unknown = [c for c in [*run.excluded_classes, *other.classes, *other.excluded_classes] if c not in run.classes]
    split, _extra, _report = prepare_eval(data, classes=run.classes, img_size=run.img_size, allow_unknown=list(dict.fromkeys(unknown)),
                                          resize=run.config.resize, max_bad=run.config.max_bad_fraction)
    return split, run.classes


def _predict(run: LoadedRun, split: Split, names: list[str], what: str) -> Outcome:
    with progress.task(f"predicting {what}", len(split)) as bar:
        logits = predict_logits(run.model, split.images, mean=run.mean, std=run.std, device=run.device,
                                precision=run.precision, tta=run.config.tta, on_batch=bar.advance)
    conf, pred = logits.softmax(1).max(1)
    return Outcome(split, [names[i] for i in split.labels.tolist()], [run.classes[i] for i in pred.tolist()], conf.tolist())


def _confusion(true: list[int], pred: list[int], c: int) -> np.ndarray:
    """Rows = true shared class, columns = predicted shared class, last column = a class the other run lacks."""
    cm = np.zeros((c, c + 1), dtype=np.int64)
    np.add.at(cm, (np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def compare_runs(run_a: Path, run_b: Path, data: str | None, out: Path, *, classes: str = "same", device: str = "auto",
                 max_bad_fraction: float | str | None = None) -> dict:
    """Compare two runs on the same test images; writes ``compare.json``, grids and ``report.html`` to ``out``.

    More than ``max_bad_fraction`` (default: each run's own) unreadable files in DATA is an error, as in training."""
    run_a, run_b = Path(run_a), Path(run_b)
    la, lb = load_run(run_a, device=device), load_run(run_b, device=device)
    if max_bad_fraction is not None:
        for run in (la, lb):
            run.config = with_value(run.config, "max_bad_fraction", max_bad_fraction)
    shared = _shared_classes(la, lb, classes)
    if data is None:
        differs = _own_split_differs(la, lb)
        if differs:
            raise ImgclsError(f"the runs were not split from the same data the same way (they differ in {', '.join(differs)}); "
                              "pass DATA to compare them on the same images")
    label_a, label_b = _label(run_a, run_b), _label(run_b, run_a)
    split_a, names_a = _test_images(la, data, lb)
    reuse = la.img_size == lb.img_size and la.classes == lb.classes  # then B's copy of the images is A's
    split_b, names_b = (split_a, names_a) if reuse else _test_images(lb, data, la)
    a = _predict(la, split_a, names_a, f"A ({label_a})")
    b = _predict(lb, split_b, names_b, f"B ({label_b})")

    index = {c: i for i, c in enumerate(shared)}
    pos_b = {p: i for i, p in enumerate(split_b.paths)}
    rows = [(i, pos_b[p]) for i, p in enumerate(split_a.paths) if p in pos_b and a.true[i] in index]
    if not rows:
        raise ImgclsError("the runs share no test image of a shared class; there is nothing to compare")
    n_classes = len(shared)
    true = [index[a.true[i]] for i, _ in rows]
    pred_a = [index.get(a.predicted[i], n_classes) for i, _ in rows]
    pred_b = [index.get(b.predicted[j], n_classes) for _, j in rows]
    ok_a = np.asarray(pred_a) == np.asarray(true)
    ok_b = np.asarray(pred_b) == np.asarray(true)

    cm_a, cm_b = _confusion(true, pred_a, n_classes), _confusion(true, pred_b, n_classes)
    point_a, point_b = intervals.metrics_from_confusion(cm_a), intervals.metrics_from_confusion(cm_b)
    ci_a, ci_b = intervals.classification_intervals(cm_a, shared), intervals.classification_intervals(cm_b, shared)
    diff, diff_ci = intervals.paired_difference(ok_a, ok_b)
    p, b_only, a_only = mcnemar_exact(ok_a, ok_b)

    out.mkdir(parents=True, exist_ok=True)
    grids = {
        "a_right_b_wrong": _grid(rows, a, b, ok_a & ~ok_b, out / "a_right_b_wrong.png", f"right by A ({label_a}), wrong by B ({label_b})", wrong=b),
        "b_right_a_wrong": _grid(rows, a, b, ok_b & ~ok_a, out / "b_right_a_wrong.png", f"right by B ({label_b}), wrong by A ({label_a})", wrong=a),
    }
    doc = {
        "a": {"run": str(run_a.resolve()), "label": label_a, "model": la.config.model, "classes": la.classes},
        "b": {"run": str(run_b.resolve()), "label": label_b, "model": lb.config.model, "classes": lb.classes},
        "images": "the runs' shared test split" if data is None else str(data),
        "n": len(rows),
        "classes": shared,
        "classes_mode": classes,
        "accuracy_a": float(point_a["accuracy"]), "accuracy_a_ci": ci_a["accuracy"],
        "accuracy_b": float(point_b["accuracy"]), "accuracy_b_ci": ci_b["accuracy"],
        "macro_f1_a": float(point_a["macro_f1"]), "macro_f1_a_ci": ci_a["macro_f1"],
        "macro_f1_b": float(point_b["macro_f1"]), "macro_f1_b_ci": ci_b["macro_f1"],
        "difference": diff, "difference_ci": diff_ci, "difference_of": "accuracy of B minus accuracy of A",
        "bootstrap": {k: ci_a[k] for k in ("method", "level", "resamples", "seed")},
        "mcnemar": {"p_value": p, "a_only": a_only, "b_only": b_only, "test": "McNemar's exact test (two-sided binomial on the discordant images)"},
        "significant": bool(p < ALPHA),
        "alpha": ALPHA,
        "per_class": [
            {"class": c, "f1_a": float(point_a["per_class_f1"][k]), "f1_b": float(point_b["per_class_f1"][k]),
             "delta": float(point_b["per_class_f1"][k] - point_a["per_class_f1"][k]),
             "support": int(cm_a[k].sum())}
            for k, c in enumerate(shared)
        ],
        "grids": {k: (v.name if v else None) for k, v in grids.items()},
    }
    doc["sentence"] = sentence(doc)
    write_json(out / "compare.json", doc)
    from imgcls.report.html import write_report

    write_report(out)
    return doc


def _grid(rows, a: Outcome, b: Outcome, mask: np.ndarray, path: Path, title: str, *, wrong: Outcome) -> Path | None:
    """Up to GRID_MAX images of ``mask``, the wrong run's most confident mistakes first; None when there are none."""
    picked = [k for k in np.flatnonzero(mask)]
    if not picked:
        path.unlink(missing_ok=True)
        return None
    conf = [wrong.confidence[rows[k][0 if wrong is a else 1]] for k in picked]
    picked = [picked[i] for i in np.argsort(conf)[::-1][:GRID_MAX]]
    images, titles = [], []
    for k in picked:
        i, j = rows[k]
        images.append(a.split.images[i].numpy())
        titles.append(f"true {a.true[i]}\nA: {a.predicted[i]}  B: {b.predicted[j]}")
    return plots.image_grid(images, titles, path, suptitle=title)


def _signed(v: float) -> str:
    return f"{100 * v:+.1f}"


def sentence(doc: dict) -> str:
    """The answer in words: who is more accurate, by how much, how sure, and whether it is significant."""
    a, b = doc["a"]["label"], doc["b"]["label"]
    d, (lo, hi) = doc["difference"], doc["difference_ci"]
    m = doc["mcnemar"]
    p = m["p_value"]
    p_txt = "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.995 else "p = 1"
    discordant = m["a_only"] + m["b_only"]
    if abs(d) < 1e-12:
        lead = f"A ({a}) and B ({b}) are equally accurate on the same {doc['n']:,} test images"
    else:
        better, worse = (b, a) if d > 0 else (a, b)
        lead = f"{better} is {abs(100 * d):.1f} points more accurate than {worse} on the same {doc['n']:,} test images"
    verdict = "significant" if doc["significant"] else "not significant"
    txt = (f"{lead} ({intervals.fmt_pct(doc['accuracy_a'], doc['accuracy_a_ci'])} for A, "
           f"{intervals.fmt_pct(doc['accuracy_b'], doc['accuracy_b_ci'])} for B): B - A = {_signed(d)} points, "
           f"95 % CI [{_signed(lo)}, {_signed(hi)}]; McNemar's exact test on the {discordant:,} images where exactly one "
           f"is right ({m['b_only']:,} by B only, {m['a_only']:,} by A only) gives {p_txt}, "
           f"so the difference is {verdict} at the {100 * doc['alpha']:.0f} % level.")
    if doc["significant"] != (lo > 0 or hi < 0) and not math.isnan(lo):
        txt += " (The interval and the test disagree at the margin: read it as borderline.)"
    return txt
