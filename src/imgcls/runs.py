"""What the train, eval and predict commands do, end to end, writing the run folder's files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from imgcls import locks, progress
from imgcls.config import TrainConfig, with_value
from imgcls.data import Split, prepare_eval
from imgcls.deploy import calibration as calib
from imgcls.engine.evaluate import (
    classification_metrics,
    inference_model,
    most_confused,
    open_set_analysis,
    predict_logits,
    reliability_bins,
)
from imgcls.engine.inference import LoadedRun, expand_paths, input_folders, load_images, load_run, own_test_split
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
    raw = _logits(run, split.images, tta=tta, what=f"{len(split)} images")
    cal = run.calibration
    logits = raw / cal.temperature  # every figure below is of the calibrated probabilities
    metrics = classification_metrics(logits, split.labels, run.classes)
    metrics["most_confused"] = most_confused(metrics["confusion_matrix"], run.classes)
    metrics["intervals"] = intervals.classification_intervals(metrics["confusion_matrix"], run.classes)
    metrics["reliability"] = reliability_bins(logits, split.labels)
    metrics["reliability_before"] = reliability_bins(raw, split.labels)
    metrics["calibration"] = calib.calibration_report(cal, raw, split.labels)
    metrics["tta"] = tta
    ex_logits = ex_raw = None
    if excluded is not None and len(excluded):
        ex_raw = _logits(run, excluded.images, tta=tta, what="left-out classes")
        ex_logits = ex_raw / cal.temperature
        metrics["excluded"] = open_set_analysis(
            logits, ex_logits, excluded.labels, classes=run.classes, excluded_classes=run.excluded_classes
        )
    metrics["unknown"] = calib.unknown_report(cal, raw, ex_raw)
    write_json(out_dir / "metrics.json", metrics)
    _write_predictions(out_dir / "predictions.csv", split, logits, run.classes, true_names=run.classes)
    if ex_logits is not None:
        _write_predictions(out_dir / "predictions_excluded.csv", excluded, ex_logits, run.classes, true_names=run.excluded_classes)
    plots.confusion_matrix(metrics["confusion_matrix"], run.classes, out_dir / "confusion_matrix.png", normalize=False)
    plots.confusion_matrix(metrics["confusion_matrix"], run.classes, out_dir / "confusion_matrix_normalized.png", normalize=True)
    plots.reliability_diagram(
        metrics["reliability"], metrics["ece"], out_dir / "reliability.png",
        before=metrics["reliability_before"], ece_before=metrics["calibration"]["ece_before"],
    )
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
    loaded = load_run(run_dir, device=cfg.device)
    loaded.calibration = _calibrate(loaded, data.val)
    if data.test is not None:
        metrics = evaluate_split(loaded, data.test, run_dir / "eval", excluded=data.excluded_test, tta=cfg.tta)
        summary["test_accuracy"] = metrics["accuracy"]
        summary["test_macro_f1"] = metrics["macro_f1"]
        summary["test_accuracy_ci"] = metrics["intervals"]["accuracy"]
        summary["test_macro_f1_ci"] = metrics["intervals"]["macro_f1"]
        summary["test_ece"] = metrics["ece"]
        summary["test_ece_before_calibration"] = metrics["calibration"]["ece_before"]
        summary["temperature"] = metrics["calibration"]["temperature"]
        if "excluded" in metrics:
            summary["excluded_auroc"] = metrics["excluded"]["auroc_max_softmax"]
    summary["wall_s"] = time.perf_counter() - t0
    write_json(run_dir / "summary.json", summary)
    from imgcls.report.html import write_report  # the page reads the files written above

    write_report(run_dir)
    return summary


def _calibrate(run: LoadedRun, val: Split) -> calib.Calibration:
    """Temperature and "unknown" thresholds fitted on the validation split, written to RUN/calibration.json."""
    raw = _logits(run, val.images, tta=run.config.tta, what="validation (calibration)") if len(val) else torch.empty(0, 0)
    cal = calib.fit(raw, val.labels, keep=run.config.keep)
    calib.save(run.run_dir, cal)
    return cal


def eval_command(run_dir: str | Path, data: str | Path | None, out_dir: str | Path | None, *, tta: bool | None = None,
                 device: str = "auto", max_bad_fraction: float | str | None = None) -> dict:
    """``imgcls eval``: by default the run's own test split; DATA maps labels onto the run's classes by name.

    More than ``max_bad_fraction`` (default: the run's own) unreadable files in DATA is an error, as in training."""
    run_dir, out_dir, data = Path(run_dir), out_dir and Path(out_dir), data and str(data)
    loaded = load_run(run_dir, device=device)
    if max_bad_fraction is not None:
        loaded.config = with_value(loaded.config, "max_bad_fraction", max_bad_fraction)
    source = data or loaded.config.data
    if data is None:
        prepared = own_test_split(loaded)
        split, excluded = prepared.test, prepared.excluded_test
    else:
        split, excluded, report = prepare_eval(
            source, classes=loaded.classes, img_size=loaded.img_size, allow_unknown=loaded.excluded_classes,
            resize=loaded.config.resize, max_bad=loaded.config.max_bad_fraction,
        )
    out = out_dir or (run_dir / "eval")
    if data is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "data_report.json", report)
        for s in report["skipped"]:
            progress.say(f"skipped {s['path']}: {s['reason']}")
    metrics = evaluate_split(loaded, split, out, excluded=excluded, tta=loaded.config.tta if tta is None else tta)
    if out.resolve() == (run_dir / "eval").resolve():  # the run's page shows RUN/eval: keep it in step
        from imgcls.report.html import write_report

        write_report(run_dir)
    return metrics


def _rows(classes: list[str], probs: torch.Tensor, score: torch.Tensor, paths: list, *, topk: int, threshold: float | None) -> list[dict]:
    """Top-k rows (``path``, ``label``, ``confidence``, ``topk``; ``unknown`` and ``score`` when there is a threshold)."""
    top = probs.topk(min(topk, len(classes)), dim=1)
    rows = []
    for p, vals, idx, s in zip(paths, top.values.tolist(), top.indices.tolist(), score.tolist()):
        row = {"path": p, "label": classes[idx[0]], "confidence": vals[0],
               "topk": [{"label": classes[i], "prob": v} for i, v in zip(idx, vals)]}
        if threshold is not None:
            row.update(unknown=bool(s < threshold), score=s)
        rows.append(row)
    return rows


def predict_images(loaded: LoadedRun, images: torch.Tensor, paths: list, *, topk: int, model: torch.nn.Module | None = None) -> list[dict]:
    """Top-k rows of calibrated probabilities for ``N x S x S x 3`` uint8 images at the run's size, with
    ``unknown``/``score`` when the run has a threshold; ``model`` is the run's model or an inference copy of it."""
    raw = predict_logits(
        model or loaded.model, images, mean=loaded.mean, std=loaded.std, device=loaded.device,
        precision=loaded.precision, tta=loaded.config.tta,
    )
    cal = loaded.calibration
    score, _unknown = cal.flag(raw)
    return _rows(loaded.classes, (raw / cal.temperature).softmax(1), score, paths, topk=topk, threshold=cal.threshold)


def _check_predict_out(out: Path, inputs: list[str]) -> None:
    """Predictions go to a .csv or .json file of their own, never into a folder being read."""
    if out.suffix.lower() not in (".csv", ".json"):
        raise ImgclsError(f"predict --out must name a .csv or .json file, got {out}")
    if out.is_dir():
        raise ImgclsError(f"predict --out {out} is an existing folder; name a .csv or .json file")
    for folder in input_folders(inputs):
        if out.expanduser().resolve().is_relative_to(folder.resolve()):
            raise ImgclsError(f"predict --out {out} is inside the input folder {folder}; write it elsewhere")


def _predictor(run_dir: Path, device: str):
    """(rows for images and paths, classes, img_size, resize, calibration) of a run folder or, by its suffix,
    of an exported ONNX file run by onnxruntime."""
    if run_dir.suffix.lower() == ".onnx" and not run_dir.is_dir():
        from imgcls.deploy.predictor import OnnxClassifier

        onnx = OnnxClassifier(run_dir)
        cal = onnx.calibration

        def onnx_rows(images, paths, k):
            return _rows(onnx.classes, *onnx.classify(images), paths, topk=k, threshold=cal.threshold)

        return onnx_rows, onnx.classes, onnx.img_size, onnx.resize, cal
    loaded = load_run(run_dir, device=device)
    state = {}

    def run_rows(images, paths, k):
        if "model" not in state:  # folded once, on the first chunk (predict_logits would fold a copy per call)
            state["model"] = inference_model(loaded.model, images, mean=loaded.mean, std=loaded.std, device=loaded.device)
        return predict_images(loaded, images, paths, topk=k, model=state["model"])

    return run_rows, loaded.classes, loaded.img_size, loaded.config.resize, loaded.calibration


def predict_command(
    run_dir: str | Path, inputs: list[str | Path], out: str | Path | None, *, topk: int = 5, device: str = "auto",
    unknown: bool = True,
) -> tuple[list[dict], list[dict]]:
    """``imgcls predict``: top-k labels per image (calibrated probabilities), to CSV or JSON (by the output's
    extension); RUN may be a run folder or a ``.onnx`` file from ``imgcls export`` (run by onnxruntime).
    With ``unknown``, each row also gets the rejection ``score`` and ``unknown`` (score under the run's threshold)."""
    inputs, out = [str(i) for i in inputs], out and Path(out)
    if out is not None:
        _check_predict_out(out, inputs)
    predict_rows, classes, img_size, resize, cal = _predictor(Path(run_dir), device)
    if unknown and cal.threshold is None:
        progress.say(f"no 'unknown' column: {cal.note or 'the run has no rejection threshold'}")
        unknown = False
    paths = expand_paths(inputs)
    if not paths:
        raise ImgclsError("no image files found in the given paths")
    k = min(topk, len(classes))
    rows: list[dict] = []
    skipped: list[dict] = []
    chunk = 256  # bounded memory for large folders
    with progress.task("predicting", len(paths)) as bar:
        for start in range(0, len(paths), chunk):
            images, ok, bad = load_images(paths[start : start + chunk], img_size, resize)
            skipped.extend(bad)
            if len(ok):
                rows.extend(predict_rows(images, [str(p) for p in ok], k))
            bar.advance(len(paths[start : start + chunk]))
    if not unknown:
        for r in rows:
            r.pop("unknown", None)
            r.pop("score", None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".json":
            write_json(out, {"predictions": rows, "skipped": skipped})
        else:
            header = ["path"]
            for i in range(1, k + 1):
                header += [f"label_{i}", f"prob_{i}"]
            extra = ["unknown", "score"] if unknown else []
            lines = []
            for r in rows:
                line = [r["path"]]
                for t in r["topk"]:
                    line += [t["label"], f"{t['prob']:.5f}"]
                if unknown:
                    line += ["true" if r["unknown"] else "false", f"{r['score']:.5f}"]
                lines.append(line + [""])
            lines += [[s["path"]] + [""] * (2 * k + len(extra)) + [s["reason"]] for s in skipped]
            write_csv(out, header + extra + ["error"], lines)
    return rows, skipped
