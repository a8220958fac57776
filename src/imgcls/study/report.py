"""summary.md: the table a person reads in ten seconds, then the detail (per class, confusions, left-out classes)."""

from __future__ import annotations

import math

from imgcls.report.html import format_p
from imgcls.study.analysis import ALPHA
from imgcls.study.spec import Study


def _pct(v: float, digits: int = 2) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.{digits}f}"


def _pp(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:+.2f}"


def _curve_table(curves: dict[str, tuple], max_cols: int = 12) -> list[str]:
    """Validation accuracy per epoch, mean over seeds: how fast each arm gets there (curves.png draws it)."""
    epochs = sorted({e for ep, *_ in curves.values() for e in ep})
    if not epochs:
        return []
    if len(epochs) > max_cols:  # keep the first, the last and evenly spaced ones between
        idx = sorted({round(i * (len(epochs) - 1) / (max_cols - 1)) for i in range(max_cols)})
        epochs = [epochs[i] for i in idx]
    lines = ["", "## Validation accuracy % by epoch (mean over seeds)", "",
             "| arm | " + " | ".join(str(e) for e in epochs) + " |", "| --- |" + " ---: |" * len(epochs)]
    for arm, (ep, mean, _lo, _hi) in curves.items():
        by = dict(zip(ep, mean))
        lines.append(f"| {arm} | " + " | ".join(_pct(by[e], 1) if e in by else "-" for e in epochs) + " |")
    return lines


def _value(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _describe(study: Study) -> str:
    base = study.config(study.baseline, study.seeds[0])
    return (f"{base.model} at {base.img_size or 'auto'} px, {base.epochs} epoch(s), {base.optimizer}, augment {base.augment}; "
            f"seeds {', '.join(map(str, study.seeds))}; data `{study.data}`")


def render(
    study: Study,
    summary: list[dict],
    per_class: list[dict],
    confusion: list[dict],
    left_out: list[dict],
    *,
    missing: list[str],
    classes: list[str],
    curves: dict[str, tuple] | None = None,
    panel_note: str = "",
) -> str:
    lines = [f"# Study: {study.name}", "", _describe(study), ""]
    if missing:
        lines += [f"**Incomplete:** {len(missing)} run(s) missing: {', '.join(missing)}.", ""]
    lines += [
        "| arm | changes | n | test accuracy % (mean ± sd) | 95% CI | Δ vs baseline (pp) | p | p (Holm) | test |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in summary:
        changes = ", ".join(f"{k}={_value(v)}" for k, v in study.arms[r["arm"]].items()) or "-"
        sd = "" if math.isnan(r["std"]) else f" ± {_pct(r['std'])}"
        # accuracy is bounded: the Student-t interval is shown clipped to [0, 100] (summary.csv keeps it raw)
        ci = "-" if math.isnan(r["ci_low"]) else f"{_pct(max(r['ci_low'], 0.0), 1)}-{_pct(min(r['ci_high'], 1.0), 1)}"
        star = " *" if r["significant"] is True else ""
        delta = "(baseline)" if r["arm"] == study.baseline else _pp(r["delta"]) + star
        test = "" if r["arm"] == study.baseline else r["test"]
        if r["arm"] != study.baseline and "kept" in r["compared_on"]:
            test += f"; on kept classes vs baseline {_pct(r['baseline_mean'])}%"
        lines.append(f"| {r['arm']} | {changes} | {r['n']} | {_pct(r['mean'])}{sd} | {ci} | {delta} | {format_p(r['p_value'])} | {format_p(r['p_holm'])} | {test} |")
    others = [r for r in summary if r["arm"] != study.baseline and not math.isnan(r["p_value"])]
    sig = [r for r in others if r["p_value"] < ALPHA]
    sig_holm = [r for r in others if r["p_holm"] < ALPHA]
    lines.append("")
    if sig:
        lines.append("Significant at p < 0.05: " + "; ".join(
            f"**{r['arm']}** {_pp(r['delta'])} pp ({'better' if r['delta'] > 0 else 'worse'})" for r in sig) + ".")
    else:
        lines.append("No arm differs from the baseline at p < 0.05.")
    lines.append(
        f"Caveat: {len(others)} arms are each tested against one baseline, so some p < 0.05 can be luck; "
        f"after Holm's correction {len(sig_holm)} remain significant"
        + (f" ({', '.join(r['arm'] for r in sig_holm)})" if sig_holm else "") + "."
    )
    if any(r["n"] < 2 for r in summary):
        lines.append("Arms with one seed have no spread; their p-value compares single runs image by image (McNemar), not seeds.")
    if any("kept" in r.get("compared_on", "") for r in summary):
        lines.append("Leave-classes-out arms are compared with the baseline on the kept classes' test images only; "
                     "a baseline prediction of a left-out class counts as an error.")

    arms = [r["arm"] for r in summary if r["arm"] != study.baseline]
    if per_class:
        lines += ["", f"## Per-class accuracy change vs {study.baseline} (points, mean over seeds)", "",
                  "| class | " + " | ".join(arms) + " |", "| --- |" + " ---: |" * len(arms)]
        cell = {(r["arm"], r["class"]): r for r in per_class}
        base_acc = {r["class"]: r["baseline_acc"] for r in per_class}
        for c in classes:
            vals = []
            for a in arms:
                r = cell.get((a, c))
                vals.append("left out" if r is None or r["note"] else _pp(r["delta"]))
            lines.append(f"| {c} ({_pct(base_acc.get(c, math.nan), 1)}%) | " + " | ".join(vals) + " |")
        lines.append("")
        lines.append("(the baseline's own per-class accuracy in brackets)")

    if confusion:
        lines += ["", "## Largest confusion changes vs baseline (row-normalised, mean over seeds)", ""]
        for a in arms:
            off = [r for r in confusion if r["arm"] == a and r["true"] != r["predicted"] and abs(r["delta"]) > 1e-9]
            top = sorted(off, key=lambda r: -abs(r["delta"]))[:3]
            if top:
                lines.append(f"- **{a}**: " + "; ".join(
                    f"{r['true']} → {r['predicted']} {_pct(r['baseline_rate'], 1)}% → {_pct(r['arm_rate'], 1)}%" for r in top))

    if left_out:
        lines += ["", "## Where the left-out classes' test images go (mean over seeds)", ""]
        auroc = {r["arm"]: r["auroc_left_out"] for r in summary}
        for a in dict.fromkeys(r["arm"] for r in left_out):
            lines.append(f"- **{a}** (AUROC of max-softmax, known vs left-out: {auroc.get(a, math.nan):.3f}; 0.5 = no better than chance)")
            row = next((r for r in summary if r["arm"] == a), {})
            if not math.isnan(row.get("flagged_left_out", math.nan)):
                lines.append(f"  - flagged unknown: {_pct(row['flagged_left_out'], 1)}% of left-out vs {_pct(row['flagged_kept'], 1)}% of "
                             f"kept-class test images (calibrated score: AUROC {row['auroc_unknown']:.3f}, FPR@95% {_pct(row['fpr95_unknown'], 1)}%)")
            for name in dict.fromkeys(r["left_out_class"] for r in left_out if r["arm"] == a):
                dist = [r for r in left_out if r["arm"] == a and r["left_out_class"] == name and r["fraction"] > 0]
                conf = dist[0]["mean_max_softmax"] if dist else math.nan
                lines.append(f"  - {name} → " + ", ".join(f"{r['predicted_as']} {_pct(r['fraction'], 0)}%" for r in dist[:4])
                             + f" (mean confidence {_pct(conf, 0)}%)")

    if curves:
        lines += _curve_table(curves)

    lines += ["", "## Files", "",
              "results.csv (one row per run), summary.csv (the table above), per_class_delta.csv, confusion_delta.csv, "
              "left_out.csv, accuracy_by_arm.png, per_class_delta.png, curves.png"
              + (", gradcam_panel.png" if not panel_note else ""), "runs/<arm>/seed<k>/ are ordinary run folders."]
    if panel_note:
        lines += ["", panel_note]
    return "\n".join(lines) + "\n"
