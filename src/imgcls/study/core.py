"""``imgcls study``: expand a spec into runs, run what is missing, and compare the arms."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from imgcls import progress
from imgcls.errors import ImgclsError
from imgcls.io import write_json, write_text
from imgcls.report.html import format_p, write_report
from imgcls.study import analysis as agg
from imgcls.study import plots, report, runner
from imgcls.study.executors import Executor, LocalExecutor
from imgcls.study.panel import gradcam_panel
from imgcls.study.spec import Study, load_spec


@dataclass
class StudyResult:
    out: Path
    trained: int  # runs trained or continued by this call
    skipped: int  # runs already finished
    stale: list[str] = field(default_factory=list)  # runs left out of the report (only with report_only)
    summary: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    panel_note: str = ""


def run_study(spec: str | Path | Study, out: Path, *, rerun_stale: bool = False, report_only: bool = False,
              executor: Executor | None = None) -> StudyResult:
    """Run (or continue) every arm x seed of the spec (a file, or one already loaded with ``load_spec``'s
    overrides) in ``out`` (here unless ``executor`` says otherwise), then aggregate; see :mod:`imgcls.study`."""
    study = spec if isinstance(spec, Study) else load_spec(spec)
    out = Path(out)
    planned = runner.plan(study, out)
    stale = [r for r in planned if r.state == "stale"]
    done = sum(r.state == "done" for r in planned)
    trained = 0
    if report_only:
        for r in stale:
            progress.say(f"stale (left out of the report): {r.arm} seed {r.seed}: {r.reason}")
    else:
        todo = runner.prepare_runs(planned, out, rerun_stale=rerun_stale)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "study.json", study.to_dict())
        progress.say(f"study {study.name}: {len(study.arms)} arms x {len(study.seeds)} seeds = {len(planned)} runs; "
                     f"{done} finished, {sum(r.state == 'resume' for r in todo)} to continue, "
                     f"{sum(r.state == 'new' for r in todo)} to train")
        (executor or LocalExecutor()).execute(todo, out, total=len(planned), done_before=len(planned) - len(todo))
        trained = len(todo)
        stale = []
    result = aggregate(study, out, skip={(r.arm, r.seed) for r in stale})
    result.trained, result.skipped = trained, done
    result.stale = [f"{r.arm} seed {r.seed}" for r in stale]
    return result


def aggregate(study: Study, out: Path, *, skip: set[tuple[str, int]] = frozenset()) -> StudyResult:
    """Write results.csv, summary.csv, the delta tables, summary.md and the plots from the finished runs."""
    by_arm, missing = agg.load_results(study, out, skip=skip)
    if not by_arm[study.baseline]:
        raise ImgclsError(f"no finished run of the baseline arm {study.baseline!r} in {out / 'runs'}; nothing to compare with")
    out.mkdir(parents=True, exist_ok=True)
    classes = list(by_arm[study.baseline][0].metrics["classes"])
    for runs in by_arm.values():  # a baseline that itself leaves classes out still lists every class
        for r in runs:
            classes += [c for c in r.metrics["classes"] if c not in classes]
    summary = agg.summary_rows(study, by_arm)
    per_class = agg.per_class_rows(study, by_arm, classes)
    confusion = agg.confusion_rows(study, by_arm)
    left_out = agg.left_out_rows(by_arm)

    files = [
        agg.write_csv(out / "results.csv", agg.result_rows(by_arm)),
        agg.write_csv(out / "summary.csv", summary, [
            "arm", "n", "mean", "std", "ci_low", "ci_high", "delta", "p_value", "p_holm", "significant", "test",
            "baseline_mean", "compared_on", "left_out", "auroc_left_out", *agg.UNKNOWN_KEYS.values(),
        ]),
        agg.write_csv(out / "per_class_delta.csv", per_class, ["arm", "class", "arm_acc", "baseline_acc", "delta", "note"]),
        agg.write_csv(out / "confusion_delta.csv", confusion, ["arm", "true", "predicted", "arm_rate", "baseline_rate", "delta"]),
        agg.write_csv(out / "left_out.csv", left_out, ["arm", "left_out_class", "predicted_as", "fraction", "mean_max_softmax"]),
    ]
    arms = [a for a in study.arms if a != study.baseline]
    files.append(plots.accuracy_by_arm(summary, {a: [r.accuracy for r in runs] for a, runs in by_arm.items()},
                                       out / "accuracy_by_arm.png", baseline=study.baseline, title=""))
    if arms:
        files.append(plots.per_class_delta(per_class, arms, classes, out / "per_class_delta.png", baseline=study.baseline))
    curves = agg.mean_curves(by_arm)
    files.append(plots.curves(curves, out / "curves.png"))
    panel_path, panel_note = gradcam_panel(study, out, by_arm)
    if panel_path is not None:
        files.append(panel_path)
    md = report.render(study, summary, per_class, confusion, left_out, missing=missing, classes=classes,
                         curves=curves, panel_note=panel_note)
    write_text(out / "summary.md", md)
    files.insert(0, out / "summary.md")
    files.insert(1, write_report(out))  # the page reads the tables and plots written above
    return StudyResult(out=out, trained=0, skipped=0, summary=summary, missing=missing, files=files, panel_note=panel_note)


def say_summary(result: StudyResult, *, wall_s: float) -> None:
    """The short end-of-study lines: the table in brief and where the files are."""
    progress.say("")
    progress.say(f"trained {result.trained} run(s), {result.skipped} already finished; {wall_s:.0f}s")
    for r in result.summary:
        if r["test"] == "(baseline)":
            progress.say(f"  {r['arm']:<24} {100 * r['mean']:6.2f}%  (baseline, n={r['n']})")
        else:
            sig = " *" if r["significant"] is True else ""
            p = format_p(r["p_value"])  # as summary.md writes it: <0.001, not 0.000
            p = p if p.startswith("<") else "=" + p
            progress.say(f"  {r['arm']:<24} {100 * r['mean']:6.2f}%  {100 * r['delta']:+6.2f} pp  p{p}{sig}  (n={r['n']}, {r['test']})")
    if result.missing:
        progress.say(f"missing from the report: {', '.join(result.missing)}")
    if result.panel_note:
        progress.say(result.panel_note)
    progress.say(f"files: {result.out}/report.html, summary.md, summary.csv, results.csv, per_class_delta.csv, *.png")


def timed_study(spec: str | Path | Study, out: Path, *, rerun_stale: bool = False, report_only: bool = False,
                executor: Executor | None = None) -> StudyResult:
    t0 = time.perf_counter()
    result = run_study(spec, out, rerun_stale=rerun_stale, report_only=report_only, executor=executor)
    say_summary(result, wall_s=time.perf_counter() - t0)
    return result
