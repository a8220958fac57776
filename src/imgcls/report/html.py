"""One self-contained HTML page for a run, a study or a comparison, built from the files in its folder.

The pages read only what the commands already wrote (JSON, CSV, PNG); figures are inlined as PNG data
URIs and the style sheet sits in the page, so it reads the same offline, mailed or printed. The layout
is in Jinja2 templates (``report/templates``); this module turns the files into the values they show.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
from functools import cache
from pathlib import Path

import jinja2

from imgcls import __version__
from imgcls.errors import ImgclsError
from imgcls.io import write_text
from imgcls.report.intervals import fmt_num, fmt_pct

MAX_ROWS = 20  # skipped files, duplicates: the first ones on the page, all of them in data_report.json


@cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("imgcls.report", "templates"),
        autoescape=jinja2.select_autoescape(("html",)),
        undefined=jinja2.StrictUndefined,  # a misspelt name is an error, not a silently empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )


# --- reading a folder ----------------------------------------------------------------------------------


def _json(path: Path, *, required: bool = False):
    if not path.is_file():
        if required:
            raise ImgclsError(f"{path} not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImgclsError(f"{path} is damaged: {e}") from None


def _csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _png(path: Path) -> str:
    """A PNG file as a data URI; empty when the file is not there (the template then leaves the figure out)."""
    if not path.is_file():
        return ""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def format_p(v) -> str:
    """A p-value as every table writes it: "-" when there is none, "<0.001", else three decimals."""
    v = _float(v)
    return "-" if math.isnan(v) else "<0.001" if v < 0.001 else f"{v:.3f}"


def _link(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target.resolve(), page.resolve().parent)).as_posix()


def kind_of(folder: Path) -> str:
    """run, study or compare, by the files the folder holds."""
    if (folder / "compare.json").is_file():
        return "compare"
    if (folder / "summary.csv").is_file() and (folder / "runs").is_dir():
        return "study"
    if (folder / "config.json").is_file() and ((folder / "summary.json").is_file() or (folder / "eval" / "metrics.json").is_file()):
        return "run"
    raise ImgclsError(f"{folder} is not a run (config.json + summary.json), a study (summary.csv + runs/) "
                      "or a comparison (compare.json) folder")


def write_report(folder: Path, out: Path | None = None) -> Path:
    """Render the page of ``folder`` (a run, a study or a comparison) to ``out`` (default FOLDER/report.html)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImgclsError(f"folder not found: {folder}")
    out = Path(out) if out is not None else folder / "report.html"
    kind = kind_of(folder)
    context = {"run": _run_context, "study": _study_context, "compare": _compare_context}[kind](folder, out)
    page = _env().get_template(f"{kind}.html").render(version=__version__, source=folder.name, **context)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, page)
    return out


# --- a run ---------------------------------------------------------------------------------------------


def _kv(pairs) -> list[tuple[str, str]]:
    return [(k, v) for k, v in pairs if v not in (None, "", "-")]


def _scalar(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def _calibration_rows(cal: dict) -> list[tuple[str, str]]:
    """Temperature scaling's before/after figures first, then any other plain value it reports."""
    known = [("temperature", "temperature", _scalar), ("ece_before", "ECE before", _scalar), ("ece_after", "ECE after", _scalar),
             ("nll_before", "NLL before", _scalar), ("nll_after", "NLL after", _scalar), ("fitted_on", "fitted on", _scalar),
             ("n_fit", "images fitted on", _scalar), ("note", "note", _scalar)]
    return _kv([(label, f(cal[k])) for k, label, f in known if k in cal]
               + [(k, _scalar(v)) for k, v in cal.items() if k not in {k for k, *_ in known} and not isinstance(v, (dict, list))])


def _unknown_rows(unk: dict) -> list[tuple[str, str]]:
    share = lambda v: fmt_pct(_float(v))  # noqa: E731
    known = [("score", "score", _scalar), ("threshold", "threshold", _scalar), ("keep", "validation images kept", share),
             ("flagged_test", "test images flagged unknown", share), ("flagged_left_out", "left-out images flagged unknown", share),
             ("auroc", "AUROC known vs left out", _scalar), ("fpr_at_95", "FPR at 95 % TPR", _scalar), ("note", "note", _scalar)]
    return _kv([(label, f(unk[k])) for k, label, f in known if k in unk]
               + [(k, _scalar(v)) for k, v in unk.items() if k not in {k for k, *_ in known} and not isinstance(v, (dict, list))])


def _headline(metrics: dict) -> list[dict]:
    ci = metrics.get("intervals") or {}

    def card(label, value, interval, pct=True):
        f = fmt_pct if pct else fmt_num
        text = f(value, interval)
        main, _, rest = text.partition(" [")
        return {"label": label, "value": main, "ci": ("95 % CI [" + rest) if rest else ""}

    cards = [card("test accuracy", metrics["accuracy"], ci.get("accuracy")),
             card("macro-F1", metrics["macro_f1"], ci.get("macro_f1"), pct=False),
             card("balanced accuracy", metrics["balanced_accuracy"], ci.get("balanced_accuracy"))]
    if "top5" in metrics:
        cards.append(card("top-5 accuracy", metrics["top5"], None))
    cards.append(card("ECE", metrics["ece"], None, pct=False))
    cards.append(card("NLL (test loss)", metrics["loss"], None, pct=False))
    cards.append({"label": "test images", "value": f"{metrics['n']:,}", "ci": ""})
    return cards


def _data_context(report: dict) -> dict:
    splits = list(report.get("counts", {}))
    classes = list(report.get("classes", [])) + list(report.get("excluded_classes", []))
    counts = [{"name": c + (" (left out)" if c in report.get("excluded_classes", []) else ""),
               "cells": [report["counts"][s].get(c, 0) for s in splits]} for c in classes]
    train = [v for v in report.get("counts", {}).get("train", {}).values() if v > 0]
    imbalance = f"{max(train) / min(train):.1f}x" if train else ""

    def files(entry):
        return "; ".join(f"{Path(f['path']).name} ({f['split']}, {f['label']})" for f in entry["files"])

    notes = []
    ignored = report.get("ignored_by_extension") or {}
    if ignored:
        notes.append("Ignored by extension: " + ", ".join(f"{k or '(none)'} x {v}" for k, v in ignored.items()) + ".")
    source = report.get("source") or {}
    return {
        "source": f"{source.get('kind', 'data')} {source.get('root', '')}".strip(),
        "img_size": report.get("img_size", "?"),
        "splits": splits, "counts": counts, "imbalance": imbalance, "notes": notes,
        "skipped": [{"path": s["path"], "reason": s["reason"]} for s in report.get("skipped", [])[:MAX_ROWS]],
        "n_skipped": len(report.get("skipped", [])),
        "duplicates": [files(d) for d in report.get("duplicates", [])[:MAX_ROWS]],
        "n_duplicates": len(report.get("duplicates", [])),
        "conflicts": [files(d) for d in report.get("conflicting_labels", [])[:MAX_ROWS]],
        "n_conflicts": len(report.get("conflicting_labels", [])),
    }


def _explain_context(folder: Path) -> dict | None:
    doc = _json(folder / "explain.json")
    if not doc:
        return None
    grids = []
    for method, path in (doc.get("grids") or {}).items():
        uri = _png(folder / Path(path).name)  # the stored path may be relative to where explain ran
        if uri:
            s = (doc.get("summary") or {}).get(method)
            scores = (f"deletion AUC {s['mean_deletion_auc']:.3f}, insertion AUC {s['mean_insertion_auc']:.3f}" if s else "")
            grids.append({"method": method, "uri": uri, "scores": scores})
    if not grids:
        return None
    return {"folder": folder.name, "n": doc.get("n_images", "?"), "layer": doc.get("layer", "?"), "grids": grids}


def _excluded_context(ex: dict | None) -> dict | None:
    if not ex or not ex.get("classes"):
        return None
    rows = []
    for name, info in ex["classes"].items():
        top = sorted(info["predicted_as"].items(), key=lambda kv: -kv[1])[:4]
        rows.append({"name": name, "n": info["n"], "conf": fmt_pct(info.get("mean_max_softmax", math.nan), digits=0),
                     "where": ", ".join(f"{k} {fmt_pct(v, digits=0)}" for k, v in top if v > 0)})
    return {"auroc": _scalar(ex.get("auroc_max_softmax")), "rows": rows}


def _run_context(folder: Path, out: Path) -> dict:
    config = _json(folder / "config.json", required=True)
    summary = _json(folder / "summary.json") or {}
    metrics = _json(folder / "eval" / "metrics.json")
    data_report = _json(folder / "data_report.json")
    ev = folder / "eval"
    ctx = {
        # a study's run folders are all called seed<k>: the arm tells them apart
        "title": f"Run {folder.parent.name}/{folder.name}" if folder.name.startswith("seed") else f"Run {folder.name}",
        "subtitle": f"{config.get('model', '?')} on {Path(str(config.get('data', '?'))).name}, "
                    f"{len(summary.get('classes') or (metrics or {}).get('classes') or [])} classes",
        "headline": _headline(metrics) if metrics else [],
        "training": _kv([
            ("epochs run", _scalar(summary.get("epochs_run")) + (" (stopped early)" if summary.get("stopped_early") else "")),
            ("best validation accuracy", f"{fmt_pct(summary['best_val_acc'], digits=2)} at epoch {summary.get('best_epoch')}"
             if "best_val_acc" in summary else None),
            ("training speed", f"{summary['train_img_per_s']:,.{0 if summary['train_img_per_s'] >= 10 else 1}f} images/s"
             if "train_img_per_s" in summary else None),
            ("training time", f"{summary['train_wall_s']:.0f} s" if "train_wall_s" in summary else None),
            ("test-time augmentation", "flip" if (metrics or {}).get("tta") else None),
        ]),
        "curves": _png(folder / "curves.png"),
        "config_text": json.dumps(config, indent=2),
        "per_class": [], "most_confused": [], "confusion": "", "confusion_norm": "", "reliability": "",
        "calibration": [], "calibration_plain": [], "unknown": [], "misclassified": "", "excluded": None,
        "explain": _explain_context(folder / "explain"),
        "data": _data_context(data_report) if data_report else None,
    }
    if metrics:
        f1_ci = (metrics.get("intervals") or {}).get("per_class_f1") or {}
        support = {k: v["support"] for k, v in metrics["per_class"].items()}
        ctx.update(
            per_class=[{"name": k, "precision": f"{v['precision']:.3f}", "recall": f"{v['recall']:.3f}",
                        "f1": fmt_num(v["f1"], f1_ci.get(k)), "support": f"{v['support']:,}"}
                       for k, v in metrics["per_class"].items()],
            most_confused=[{**p, "share": fmt_pct(p["count"] / max(support.get(p["true"], 0), 1))} for p in metrics.get("most_confused", [])],
            confusion=_png(ev / "confusion_matrix.png"), confusion_norm=_png(ev / "confusion_matrix_normalized.png"),
            reliability=_png(ev / "reliability.png"), misclassified=_png(ev / "misclassified.png"),
            calibration=_calibration_rows(metrics["calibration"]) if isinstance(metrics.get("calibration"), dict) else [],
            calibration_plain=[("ECE (15 bins)", f"{metrics['ece']:.4f}"), ("NLL", f"{metrics['loss']:.4f}")],
            unknown=_unknown_rows(metrics["unknown"]) if isinstance(metrics.get("unknown"), dict) else [],
            excluded=_excluded_context(metrics.get("excluded")),
        )
    return ctx


# --- a study -------------------------------------------------------------------------------------------


ALPHA = 0.05  # the studies' level (study.analysis.ALPHA); repeated so that report does not import study


def _verdict(row: dict) -> tuple[str, str]:
    p, holm = _float(row.get("p_value")), _float(row.get("p_holm"))
    if math.isnan(p):
        return "-", ""
    if holm < ALPHA:
        return "held", "held"
    if p < ALPHA:
        return "held before correction only", "held"
    return "not held", "notheld"


def _study_context(folder: Path, out: Path) -> dict:
    spec = _json(folder / "study.json") or {}
    baseline = spec.get("baseline", "")
    arms_spec = spec.get("arms") or {}
    summary = _csv(folder / "summary.csv")
    if not baseline and summary:
        baseline = next((r["arm"] for r in summary if r.get("test") == "(baseline)"), summary[0]["arm"])
    rows = []
    for r in summary:
        changes = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in (arms_spec.get(r["arm"]) or {}).items())
        mean, std = _float(r["mean"]), _float(r["std"])
        lo, hi = _float(r["ci_low"]), _float(r["ci_high"])
        verdict, css = _verdict(r) if r["arm"] != baseline else ("(baseline)", "")
        rows.append({
            "arm": r["arm"], "changes": changes or "-", "n": r["n"], "is_baseline": r["arm"] == baseline,
            "mean": f"{100 * mean:.2f}" + ("" if math.isnan(std) else f" ± {100 * std:.2f}"),
            # accuracy is bounded: the t interval is shown clipped to [0, 100] (summary.csv keeps it raw)
            "ci": "-" if math.isnan(lo) else f"{100 * max(lo, 0):.1f} - {100 * min(hi, 1):.1f}",
            "delta": None if math.isnan(_float(r["delta"])) else 100 * _float(r["delta"]),
            "p": format_p(r["p_value"]), "p_holm": format_p(r["p_holm"]), "verdict": verdict, "verdict_class": css,
            "test": r.get("test", "") + (f"; {r['compared_on']}" if "kept" in r.get("compared_on", "") else ""),
        })
    others = [r for r in rows if not r["is_baseline"] and r["p"] != "-"]
    held = [r["arm"] for r in others if r["verdict"] == "held"]
    conclusion = (f"{len(held)} of {len(others)} arm(s) differ from {baseline} after Holm's correction"
                  + (f": {', '.join(held)}." if held else "."))

    arms = [r["arm"] for r in rows if not r["is_baseline"]]
    cells = {(r["arm"], r["class"]): r for r in _csv(folder / "per_class_delta.csv")}
    classes = list(dict.fromkeys(r["class"] for r in cells.values()))
    per_class = []
    for c in classes:
        base = next((_float(cells[(a, c)]["baseline_acc"]) for a in arms if (a, c) in cells), math.nan)
        values = []
        for a in arms:
            cell = cells.get((a, c))
            values.append("left out" if cell is None or cell.get("note") else 100 * _float(cell["delta"]))
        per_class.append({"name": c, "base": fmt_pct(base), "cells": values})

    runs = []
    for r in _csv(folder / "results.csv"):
        run = folder / "runs" / r["arm"] / f"seed{r['seed']}"
        page = run / "report.html"
        if not page.is_file() and (run / "config.json").is_file():
            write_report(run)  # a run trained before pages existed
        m = _json(run / "eval" / "metrics.json") or {}
        acc_ci = (m.get("intervals") or {}).get("accuracy")
        runs.append({"arm": r["arm"], "seed": r["seed"], "accuracy": fmt_pct(_float(r["test_accuracy"]), acc_ci),
                     "macro_f1": fmt_num(_float(r["test_macro_f1"])), "best_val": fmt_pct(_float(r["best_val_acc"])),
                     "epochs": r.get("epochs_run", ""), "train_s": f"{_float(r['train_wall_s']):.0f}",
                     "link": _link(page, out) if page.is_file() else ""})
    missing = [f"{a} seed {s}" for s in spec.get("seeds", []) for a in arms_spec
               if not (folder / "runs" / a / f"seed{s}" / "summary.json").is_file()]
    base_cfg = (spec.get("configs") or {}).get(baseline) or spec.get("base") or {}
    seeds = spec.get("seeds") or []
    return {
        "title": f"Study {spec.get('name', folder.name)}",
        "subtitle": f"{base_cfg.get('model', '?')}, {base_cfg.get('epochs', '?')} epoch(s); {len(arms_spec)} arms x "
                    f"{len(seeds)} seed(s); data {Path(str(spec.get('data', '?'))).name}",
        "baseline": baseline, "summary": rows, "conclusion": conclusion, "alpha": ALPHA, "n_tests": len(others),
        "kept_note": "Leave-classes-out arms are compared with the baseline on the kept classes' test images only."
                     if any("kept" in r["test"] for r in rows) else "",
        "missing": missing, "arms": arms, "per_class": per_class, "runs": runs,
        "accuracy_by_arm": _png(folder / "accuracy_by_arm.png"), "curves": _png(folder / "curves.png"),
        "per_class_delta": _png(folder / "per_class_delta.png"), "panel": _png(folder / "gradcam_panel.png"),
        "panel_note": "" if (folder / "gradcam_panel.png").is_file() else "No Grad-CAM panel in this study (panel_per_class: 0, or it was skipped; see summary.md).",
        "first_seed": seeds[0] if seeds else "",
        "spec_text": json.dumps({k: v for k, v in spec.items() if k != "configs"}, indent=2),
    }


# --- a comparison --------------------------------------------------------------------------------------


def _compare_context(folder: Path, out: Path) -> dict:
    doc = _json(folder / "compare.json", required=True)
    runs = []
    for key in ("a", "b"):
        r = doc[key]
        page = Path(r["run"]) / "report.html"
        runs.append({"key": key.upper(), "label": r["label"], "model": r["model"],
                     "accuracy": fmt_pct(doc[f"accuracy_{key}"], doc[f"accuracy_{key}_ci"]),
                     "macro_f1": fmt_num(doc[f"macro_f1_{key}"], doc[f"macro_f1_{key}_ci"]),
                     "link": _link(page, out) if page.is_file() else ""})
    lo, hi = doc["difference_ci"]
    m = doc["mcnemar"]
    grids = doc.get("grids") or {}
    return {
        "title": f"{doc['a']['label']} vs {doc['b']['label']}",
        "subtitle": f"A = {doc['a']['label']}, B = {doc['b']['label']}; {doc['n']:,} test images, {len(doc['classes'])} classes",
        "sentence": doc["sentence"],
        "headline": [
            {"label": "B - A accuracy", "value": f"{100 * doc['difference']:+.2f} points", "ci": f"95 % CI [{100 * lo:+.2f}, {100 * hi:+.2f}] (paired)"},
            {"label": "McNemar p", "value": format_p(m["p_value"]), "ci": ""},
            {"label": "verdict", "value": "significant" if doc["significant"] else "not significant", "ci": f"at the {100 * doc['alpha']:.0f} % level"},
        ],
        "runs": runs,
        "images_note": (f"Images: {doc['images']}" + (f"; compared on the {len(doc['classes'])} classes both runs know"
                                                      if doc.get("classes_mode") == "shared" else "") + "."),
        "discordant": [("both right or both wrong", f"{doc['n'] - m['a_only'] - m['b_only']:,}"),
                       ("right by A only", f"{m['a_only']:,}"), ("right by B only", f"{m['b_only']:,}"),
                       ("McNemar's exact p", format_p(m["p_value"]))],
        "test_note": f"{m['test']}; the difference interval is a paired percentile bootstrap over the images "
                     f"({doc['bootstrap']['resamples']:,} resamples, seed {doc['bootstrap']['seed']}).",
        "per_class": [{"name": r["class"], "support": f"{r['support']:,}", "f1_a": f"{r['f1_a']:.3f}", "f1_b": f"{r['f1_b']:.3f}",
                       "delta": r["delta"]} for r in doc["per_class"]],
        "grid_ab": _png(folder / grids["a_right_b_wrong"]) if grids.get("a_right_b_wrong") else "",
        "grid_ba": _png(folder / grids["b_right_a_wrong"]) if grids.get("b_right_a_wrong") else "",
    }
