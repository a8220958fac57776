"""What the train, eval and predict commands do, end to end, writing the run folder's files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from imgcls import locks, progress
from imgcls.config import TrainConfig
from imgcls.data import Split, prepare_eval
from imgcls.engine.evaluate import (
    classification_metrics,
    inference_model,
    most_confused,
    open_set_analysis,
    predict_logits,
    reliability_bins,
)
from imgcls.engine.inference import LoadedRun, expand_paths, input_folders, load_images, load_run
from imgcls.engine.train import train
from imgcls.errors import ImgclsError
from imgcls.io import write_csv, write_json
from imgcls.report import intervals, plots


def _logits(run: LoadedRun, images: torch.Tensor, *, tta: bool, what: str) -> torch.Tensor:
    with progress.task(f"predicting {what}", len(images)) as bar:
        return predict_logits(
            run.model, images, mean=run.mean, std=run.std, device=run.device, precision=run.precision,
            tta=tta, on_batch=bar.advance,
        )


def evaluate_split(run: LoadedRun, split: Split, out_dir: Path, *, excluded: Split | None = None, tta: bool = False) -> dict:
    """Metrics, predictions and plots for ``split`` written to ``out_dir``; returns the metrics dict."""
    if len(split) == 0:
        raise ImgclsError("nothing to evaluate: the split holds no usable image of a known class")
    out_dir.mkdir(parents=True, exist_ok=True)
    logits = _logits(run, split.images, tta=tta, what=f"{len(split)} images")
    metrics = classification_metrics(logits, split.labels, run.classes)
    metrics["most_confused"] = most_confused(metrics["confusion_matrix"], run.classes)
    metrics["intervals"] = intervals.classification_intervals(metrics["confusion_matrix"], run.classes)
    metrics["reliability"] = reliability_bins(logits, split.labels)
    metrics["tta"] = tta
    ex_logits = None
    if excluded is not None and len(excluded):
        ex_logits = _logits(run, excluded.images, tta=tta, what="left-out classes")
        metrics["excluded"] = open_set_analysis(
            logits, ex_logits, excluded.labels, classes=run.classes, excluded_classes=run.excluded_classes
        )
    write_json(out_dir / "metrics.json", metrics)
    _write_predictions(out_dir / "predictions.csv", split, logits, run.classes, true_names=run.classes)
    if ex_logits is not None:
        _write_predictions(out_dir / "predictions_excluded.csv", excluded, ex_logits, run.classes, true_names=run.excluded_classes)
    plots.confusion_matrix(metrics["confusion_matrix"], run.classes, out_dir / "confusion_matrix.png", normalize=False)
    plots.confusion_matrix(metrics["confusion_matrix"], run.classes, out_dir / "confusion_matrix_normalized.png", normalize=True)
    plots.reliability_diagram(metrics["reliability"], metrics["ece"], out_dir / "reliability.png")
    _misclassified_grid(split, logits, run.classes, out_dir / "misclassified.png")
    return metrics


def _write_predictions(path: Path, split: Split, logits: torch.Tensor, classes: list[str], *, true_names: list[str]) -> None:
    probs = logits.softmax(1)
    rows = []
    for path_i, y, p in zip(split.paths, split.labels.tolist(), probs.tolist()):
        j = max(range(len(p)), key=p.__getitem__)
        rows.append([path_i, true_names[y], classes[j], f"{p[j]:.5f}", *[f"{v:.5f}" for v in p]])
    write_csv(path, ["path", "true", "predicted", "confidence", *[f"p_{c}" for c in classes]], rows)


def _misclassified_grid(split: Split, logits: torch.Tensor, classes: list[str], path: Path, k: int = 24) -> None:
    """The most confident mistakes first (fastai's top losses)."""
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    wrong = (pred != split.labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:k].tolist()
    images = [split.images[i].numpy() for i in order]
    titles = [f"true {classes[split.labels[i]]}\npred {classes[pred[i]]} {conf[i]:.0%}" for i in order]
    if not images:
        titles, images = ["no mistakes"], [split.images[0].numpy()]
    plots.image_grid(images, titles, path, suptitle="most confident mistakes")


def refuse_inside_data(out: Path, data: str) -> None:
    """A run written inside a folder data set would be scanned as data next time (a CSV lists its files,
    and built-in sets have no folder, so runs beside those are fine)."""
    src = Path(data).expanduser()
    if not data or not src.is_dir():
        return
    root = src.resolve()
    if out.expanduser().resolve().is_relative_to(root):
        raise ImgclsError(
            f"the output {out} is inside the data set {root}: imgcls would read its files as data next time; "
            "pass --out outside it"
        )


def train_and_evaluate(cfg: TrainConfig, *, run_dir: str | Path, resume: bool = False) -> dict:
    """``imgcls train``: train, then evaluate the best checkpoint on the test split; returns the summary.

    Rank 0 holds the run folder's lock throughout: a second run into the same folder is refused."""
    run_dir = Path(run_dir)
    refuse_inside_data(run_dir, cfg.data)
    if int(os.environ.get("RANK", "0")) != 0:
        return _train_and_evaluate(cfg, run_dir=run_dir, resume=resume)
    with locks.exclusive(run_dir, what="run folder"):
        return _train_and_evaluate(cfg, run_dir=run_dir, resume=resume)


def _train_and_evaluate(cfg: TrainConfig, *, run_dir: Path, resume: bool) -> dict:
    t0 = time.perf_counter()
    result, data = train(cfg, run_dir=run_dir, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 evaluates; IMGCLS_QUIET must not skip it
        return {}
    summary = {
        "run": str(run_dir),
        "model": result.config.model,
        "classes": result.classes,
        "excluded_classes": data.excluded_classes,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "best_epoch": result.best_epoch,
        # the best checkpoint is the epoch with the best cfg.select score; its val accuracy is quoted here
        "select": result.config.select,
        "best_val_score": result.best_val_acc,
        "best_val_acc": next((h["val_acc"] for h in result.history if h["epoch"] == result.best_epoch), result.best_val_acc),
        "train_img_per_s": result.train_img_per_s,
        "train_wall_s": result.wall_s,
    }
    write_json(run_dir / "summary.json", summary)  # the numbers first: a plot that fails loses nothing
    plots.training_curves(result.history, run_dir / "curves.png", title=run_dir.name)
    if data.test is not None:
        loaded = load_run(run_dir, device=cfg.device)
        metrics = evaluate_split(loaded, data.test, run_dir / "eval", excluded=data.excluded_test, tta=cfg.tta)
        summary["test_accuracy"] = metrics["accuracy"]
        summary["test_macro_f1"] = metrics["macro_f1"]
        summary["test_accuracy_ci"] = metrics["intervals"]["accuracy"]
        summary["test_macro_f1_ci"] = metrics["intervals"]["macro_f1"]
        summary["test_ece"] = metrics["ece"]
        if "excluded" in metrics:
            summary["excluded_auroc"] = metrics["excluded"]["auroc_max_softmax"]
    summary["wall_s"] = time.perf_counter() - t0
    write_json(run_dir / "summary.json", summary)
    from imgcls.report.html import write_report  # the page reads the files written above

    write_report(run_dir)
    return summary


def eval_command(run_dir: str | Path, data: str | Path | None, out_dir: str | Path | None, *, tta: bool | None = None, device: str = "auto") -> dict:
    """``imgcls eval``: by default the run's own test split; DATA maps labels onto the run's classes by name."""
    run_dir, out_dir, data = Path(run_dir), out_dir and Path(out_dir), data and str(data)
    loaded = load_run(run_dir, device=device)
    source = data or loaded.config.data
    if data is None:
        # the run's own split: the same data, fractions and seed reproduce the same test rows
        from imgcls.data import prepare

        prepared = prepare(loaded.config)
        if prepared.classes != loaded.classes:
            raise ImgclsError(f"the data at {source} now gives classes {prepared.classes}, the run knows {loaded.classes}")
        if prepared.test is None:
            raise ImgclsError(f"{source} has no test split; pass DATA to evaluate")
        split, excluded = prepared.test, prepared.excluded_test
    else:
        split, excluded, report = prepare_eval(
            source, classes=loaded.classes, img_size=loaded.img_size, allow_unknown=loaded.excluded_classes,
            resize=loaded.config.resize,
        )
    out = out_dir or (run_dir / "eval")
    if data is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "data_report.json", report)
        for s in report["skipped"]:
            progress.say(f"skipped {s['path']}: {s['reason']}")
    return evaluate_split(loaded, split, out, excluded=excluded, tta=loaded.config.tta if tta is None else tta)


def predict_images(loaded: LoadedRun, images: torch.Tensor, paths: list, *, topk: int, model: torch.nn.Module | None = None) -> list[dict]:
    """Top-k rows (``path``, ``label``, ``confidence``, ``topk``) for ``N x S x S x 3`` uint8 images at the
    run's size; ``model`` is the run's model or an inference copy of it (``inference_model``)."""
    logits = predict_logits(
        model or loaded.model, images, mean=loaded.mean, std=loaded.std, device=loaded.device,
        precision=loaded.precision, tta=loaded.config.tta,
    )
    top = logits.softmax(1).topk(min(topk, len(loaded.classes)), dim=1)
    return [
        {
            "path": p,
            "label": loaded.classes[idx[0]],
            "confidence": vals[0],
            "topk": [{"label": loaded.classes[i], "prob": v} for i, v in zip(idx, vals)],
        }
        for p, vals, idx in zip(paths, top.values.tolist(), top.indices.tolist())
    ]


def _check_predict_out(out: Path, inputs: list[str]) -> None:
    """Predictions go to a .csv or .json file of their own, never into a folder being read."""
    if out.suffix.lower() not in (".csv", ".json"):
        raise ImgclsError(f"predict --out must name a .csv or .json file, got {out}")
    if out.is_dir():
        raise ImgclsError(f"predict --out {out} is an existing folder; name a .csv or .json file")
    for folder in input_folders(inputs):
        if out.expanduser().resolve().is_relative_to(folder.resolve()):
            raise ImgclsError(f"predict --out {out} is inside the input folder {folder}; write it elsewhere")


def predict_command(run_dir: str | Path, inputs: list[str | Path], out: str | Path | None, *, topk: int = 5, device: str = "auto") -> tuple[list[dict], list[dict]]:
    """``imgcls predict``: top-k labels per image, to CSV or JSON (by the output's extension)."""
    inputs, out = [str(i) for i in inputs], out and Path(out)
    if out is not None:
        _check_predict_out(out, inputs)
    loaded = load_run(run_dir, device=device)
    paths = expand_paths(inputs)
    if not paths:
        raise ImgclsError("no image files found in the given paths")
    k = min(topk, len(loaded.classes))
    rows: list[dict] = []
    skipped: list[dict] = []
    chunk = 256  # bounded memory for large folders
    model = None  # folded once, on the first chunk with images (predict_logits would fold a copy per call)
    with progress.task("predicting", len(paths)) as bar:
        for start in range(0, len(paths), chunk):
            images, ok, bad = load_images(paths[start : start + chunk], loaded.img_size, loaded.config.resize)
            skipped.extend(bad)
            if len(ok):
                if model is None:
                    model = inference_model(loaded.model, images, mean=loaded.mean, std=loaded.std, device=loaded.device)
                rows.extend(predict_images(loaded, images, [str(p) for p in ok], topk=k, model=model))
            bar.advance(len(paths[start : start + chunk]))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".json":
            write_json(out, {"predictions": rows, "skipped": skipped})
        else:
            header = ["path"]
            for i in range(1, k + 1):
                header += [f"label_{i}", f"prob_{i}"]
            lines = []
            for r in rows:
                line = [r["path"]]
                for t in r["topk"]:
                    line += [t["label"], f"{t['prob']:.5f}"]
                lines.append(line + [""])
            lines += [[s["path"]] + [""] * (2 * k) + [s["reason"]] for s in skipped]
            write_csv(out, header + ["error"], lines)
    return rows, skipped
