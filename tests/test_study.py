"""Studies: spec checks, resumable arm x seed runs, aggregation, statistics and the CLI.

One small study (3 arms x 2 seeds, 32 px, one epoch) is trained once for the module; the other
tests read it, copy its small files, or replace the training function so that nothing trains again.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from conftest import make_split_root, run_cli
from imgcls.errors import ImgclsError
from imgcls.study import analysis, executors, runner, spec, stats
from imgcls.study.core import run_study

BASE = {"model": "resnet18", "img_size": 32, "epochs": 1, "batch_size": 16, "precision": "fp32", "val_fraction": 0.25}
ARMS = {"baseline": {}, "sgd": {"optimizer": "sgd", "lr": 0.01}, "no-fox": {"exclude_classes": ["fox"]}}


def write_spec(path: Path, **changes) -> Path:
    doc = {"name": "tiny", "data": "data", "base": BASE, "seeds": [0, 1], "arms": ARMS, "panel_per_class": 1, **changes}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished study folder: (spec path, out folder, StudyResult)."""
    root = tmp_path_factory.mktemp("study")
    make_split_root(root / "data", train=12, test=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_CACHE", str(root / "cache"))
        mp.setenv("IMGCLS_QUIET", "1")
        result = run_study(write_spec(root / "spec.yaml"), root / "out")
    return root / "spec.yaml", root / "out", result


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _light_copy(src: Path, dst: Path) -> Path:
    """The study without checkpoints or pictures: what planning and aggregation read."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    return dst


# --- the trained study --------------------------------------------------------------------------------


def test_study_writes_runs_tables_and_plots(study):
    spec_path, out, result = study
    assert result.trained == 6 and result.skipped == 0 and not result.missing
    for arm in ARMS:
        for seed in (0, 1):
            assert (out / "runs" / arm / f"seed{seed}" / "summary.json").is_file()
    results = _rows(out / "results.csv")
    assert len(results) == 6 and {r["arm"] for r in results} == set(ARMS)
    summary = {r["arm"]: r for r in _rows(out / "summary.csv")}
    for col in ("arm", "n", "mean", "std", "ci_low", "ci_high", "delta", "p_value", "p_holm", "test"):
        assert col in summary["sgd"]
    assert summary["sgd"]["test"] == "paired t over 2 seeds" and summary["sgd"]["n"] == "2"
    assert summary["no-fox"]["left_out"] == "fox" and "kept classes" in summary["no-fox"]["compared_on"]
    # the baseline restricted to the kept classes: recomputed here from its predictions
    kept = []
    for seed in (0, 1):
        preds = _rows(out / "runs" / "baseline" / f"seed{seed}" / "eval" / "predictions.csv")
        kept.append(np.mean([p["true"] == p["predicted"] for p in preds if p["true"] != "fox"]))
    assert float(summary["no-fox"]["baseline_mean"]) == pytest.approx(np.mean(kept), abs=1e-5)
    md = (out / "summary.md").read_text()
    assert "| arm |" in md and "Holm" in md and "fox →" in md and "left out" in md
    per_class = _rows(out / "per_class_delta.csv")
    assert {"arm": "no-fox", "class": "fox"}.items() <= next(r for r in per_class if r["arm"] == "no-fox" and r["class"] == "fox").items()
    assert any(r["left_out_class"] == "fox" for r in _rows(out / "left_out.csv"))
    for png in ("accuracy_by_arm.png", "per_class_delta.png", "curves.png"):
        assert (out / png).stat().st_size > 1000
    saved = json.loads((out / "study.json").read_text())
    assert saved["baseline"] == "baseline" and saved["data"] == str((spec_path.parent / "data").resolve())


def test_rerun_trains_nothing(study, monkeypatch):
    spec_path, out, _ = study

    def no_training(*a, **k):
        raise AssertionError("a finished study must not train again")

    monkeypatch.setattr(runner, "train_one", no_training)
    result = run_study(spec_path, out)
    assert result.trained == 0 and result.skipped == 6


def test_changed_spec_names_stale_runs_and_rerun_stale_redoes_them(study, tmp_path, monkeypatch):
    spec_path, out, _ = study
    copy = _light_copy(out, tmp_path / "out")
    # beside the original spec, so that data: resolves to the same folder
    changed = write_spec(spec_path.parent / "changed.yaml", arms={**ARMS, "sgd": {"optimizer": "sgd", "lr": 0.05}})
    with pytest.raises(ImgclsError, match=r"sgd seed 0.*lr: 0\.01 -> 0\.05") as e:
        run_study(changed, copy)
    assert "sgd seed 1" in str(e.value) and "baseline seed" not in str(e.value)

    calls = []
    monkeypatch.setattr(runner, "train_one", lambda cfg, *, run_dir, resume: calls.append((run_dir.parent.name, cfg.seed, resume)) or {})
    result = run_study(changed, copy, rerun_stale=True)
    assert calls == [("sgd", 0, False), ("sgd", 1, False)]
    assert len(list((copy / "stale" / "sgd").iterdir())) == 2
    assert result.missing == ["sgd seed 0 (not finished)", "sgd seed 1 (not finished)"]  # the fake trained nothing


def test_unfinished_run_is_continued(study, tmp_path, monkeypatch):
    spec_path, out, _ = study
    copy = _light_copy(out, tmp_path / "out")
    run = copy / "runs" / "sgd" / "seed1"
    (run / "summary.json").unlink()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.safetensors").write_bytes(b"")
    calls = []
    monkeypatch.setattr(runner, "train_one", lambda cfg, *, run_dir, resume: calls.append((run_dir, resume)) or {})
    result = run_study(spec_path, copy)
    assert calls == [(run, True)] and result.trained == 1 and result.skipped == 5


def test_report_only_through_the_cli(study):
    spec_path, out, _ = study
    before = (out / "results.csv").read_text()
    r = run_cli("study", str(spec_path), "--out", str(out), "--report-only", env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert "trained 0 run(s), 6 already finished" in r.stderr and "summary.md" in r.stderr
    assert (out / "results.csv").read_text() == before
    bad = write_spec(spec_path.parent / "bad.yaml", arms={"baseline": {}, "typo": {"dropuot": 0.5}})
    r = run_cli("study", str(bad), "--out", str(out))
    assert r.returncode == 2 and "dropuot" in r.stderr and "'typo'" in r.stderr


# --- spec checks (no training) ---------------------------------------------------------------------


def test_unknown_key_names_key_and_arm(tmp_path):
    with pytest.raises(ImgclsError, match=r"arm 'sgd'.*unknown key\(s\) lrr"):
        spec.parse_spec({"data": "d", "arms": {"baseline": {}, "sgd": {"lrr": 0.1}}}, spec_dir=tmp_path)
    with pytest.raises(ImgclsError, match="unknown key.*seed_list"):
        spec.parse_spec({"data": "d", "arms": {"a": {}}, "seed_list": [0]}, spec_dir=tmp_path)
    with pytest.raises(ImgclsError, match="seed is set by the study"):
        spec.parse_spec({"data": "d", "arms": {"a": {"seed": 3}}}, spec_dir=tmp_path)
    with pytest.raises(ImgclsError, match="arm 'a'.*optimizer must be one of"):
        spec.parse_spec({"data": "d", "arms": {"a": {"optimizer": "lion"}}}, spec_dir=tmp_path)


def test_spec_resolves_data_and_baseline(tmp_path):
    s = spec.parse_spec({"data": "../d", "arms": {"x": {}, "y": {"dropout": 0.5}}, "seeds": [2, 5]}, spec_dir=tmp_path / "studies")
    assert s.data == str((tmp_path / "d").resolve()) and s.baseline == "x"
    assert s.runs() == [("x", 2), ("y", 2), ("x", 5), ("y", 5)]
    assert s.config("y", 5).dropout == 0.5 and s.config("y", 5).seed == 5
    assert spec.parse_spec({"data": "fashion-mnist", "arms": {"a": {}}}, spec_dir=tmp_path).data == "fashion-mnist"
    assert spec.parse_spec({"data": "/abs/d", "arms": {"a": {}, "baseline": {}}}, spec_dir=tmp_path).baseline == "baseline"


def test_a_recipe_in_a_spec_sets_its_defaults_under_the_spec_keys(tmp_path):
    s = spec.parse_spec({"data": "/abs/d", "base": {"recipe": "fast-finetune", "epochs": 1},
                         "arms": {"a": {}, "b": {"freeze": 6}, "scratch": {"recipe": "none", "model": "resnet18"}}},
                        spec_dir=tmp_path)
    a, b, scratch = s.config("a", 0), s.config("b", 0), s.config("scratch", 0)
    assert (a.model, a.pretrained, a.freeze, a.ema, a.epochs) == ("efficientnet_lite0", True, 4, 0.99, 1)
    assert (b.model, b.freeze) == ("efficientnet_lite0", 6)
    assert (scratch.model, scratch.pretrained, scratch.freeze, scratch.epochs) == ("resnet18", False, 0, 1)


class _FakeProc:
    def __init__(self, cmd, *, env):
        self.cmd, self.env = cmd, env

    def wait(self):
        return 0


def test_one_run_per_gpu_when_several_are_visible(tmp_path, monkeypatch):
    s = spec.parse_spec({"data": "d", "arms": {"a": {}, "b": {"dropout": 0.2}}, "seeds": [0, 1]}, spec_dir=tmp_path)
    runs = runner.plan(s, tmp_path / "out")
    seen = []

    def fake_popen(cmd, *, env, log):
        seen.append((env["CUDA_VISIBLE_DEVICES"], cmd))
        return _FakeProc(cmd, env=env)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr(executors, "_popen", fake_popen)
    monkeypatch.setattr(executors, "cuda_devices", lambda runs: ["4", "6"])
    warmed = []
    monkeypatch.setattr("imgcls.data.prepare", lambda cfg: warmed.append(cfg.img_size))
    executors.LocalExecutor().execute(runs, tmp_path / "out", total=4, done_before=0)
    assert warmed == [0]  # the decode cache is built once, before the runs start
    assert len(seen) == 4 and {g for g, _ in seen} <= {"4", "6"}
    cmd = seen[0][1]
    assert cmd[1:4] == ["-m", "imgcls", "train"] and "--config" in cmd
    stored = json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())
    assert stored["seed"] in (0, 1) and stored["data"] == str((tmp_path / "d").resolve())
    with pytest.raises(ImgclsError, match="--jobs is for runs on the CPU; with 2 GPUs"):
        executors.LocalExecutor(jobs=2).execute(runs, tmp_path / "out", total=4, done_before=0)


def test_jobs_run_side_by_side_each_with_its_share_of_the_cores(study, tmp_path, monkeypatch):
    spec_path, out, _ = study
    copy = _light_copy(out, tmp_path / "out")
    for seed in (0, 1):  # two runs left to do
        shutil.rmtree(copy / "runs" / "sgd" / f"seed{seed}")
    envs = []
    real_popen = executors._popen

    def spy(cmd, *, env, log):
        envs.append(env["OMP_NUM_THREADS"])
        return real_popen(cmd, env=env, log=log)

    monkeypatch.setattr(executors, "_popen", spy)
    monkeypatch.setattr(executors, "cpu_threads", lambda jobs: 3)  # what each child is told, whatever this machine has
    r = run_cli("study", str(spec_path), "--out", str(copy), "--jobs", "2",
                env={"IMGCLS_QUIET": "0", "IMGCLS_CACHE": str(spec_path.parent / "cache")})
    assert r.returncode == 0, r.stderr
    assert envs == ["3", "3"]
    assert "2 run(s), 2 at a time with 3 CPU thread(s) each" in r.stderr
    assert "sgd seed 0: test accuracy" in r.stderr and "sgd seed 1: test accuracy" in r.stderr
    assert "2/2 ended" in r.stderr and ("1/2 ended, about" in r.stderr)  # a time left after the first
    for seed in (0, 1):
        run = copy / "runs" / "sgd" / f"seed{seed}"
        assert json.loads((run / "summary.json").read_text())["test_accuracy"] >= 0
        assert "trained 1 epoch(s)" in (run / "train.log").read_text()
    assert len(_rows(copy / "results.csv")) == 6


def test_cpu_threads_share_the_cores(monkeypatch):
    monkeypatch.setattr(executors.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert executors.cpu_threads(1) == 4 and executors.cpu_threads(2) == 2 and executors.cpu_threads(16) == 1
    # 2 at a time: each of the first runs gets half; a run that starts when it is the last one left gets all
    assert executors.share_of_cores(slots=2, not_finished=15) == 2
    assert executors.share_of_cores(slots=2, not_finished=2) == 2
    assert executors.share_of_cores(slots=2, not_finished=1) == 4


def test_a_signal_starts_no_new_run_and_reaches_the_running_ones(tmp_path):
    import signal
    import sys

    children = executors._Children()
    with (tmp_path / "log").open("w") as log:
        proc = children.start([sys.executable, "-c", "import time; time.sleep(60)"], dict(__import__("os").environ), log)
        children.stop(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM  # the child got the signal (no handler there: it ended)
        assert children.start([sys.executable, "-c", "pass"], {}, log) is None


def test_once_every_run_started_an_ended_run_leaves_its_cores_to_the_running_ones(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(executors, "cpu_threads", lambda jobs: {1: 4, 2: 2}[jobs])
    children = executors._Children()
    files = [tmp_path / f"t{i}" for i in range(3)]
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    with (tmp_path / "log").open("w") as log:
        a, b = (children.start(sleep, dict(__import__("os").environ), log, f) for f in files[:2])
        c = a
        try:
            a.kill(), a.wait()
            assert children.finished(a, 1.0, total=3) is None  # a third run is still to start and takes a's cores
            assert not files[1].exists()
            c = children.start(sleep, dict(__import__("os").environ), log, files[2])
            b.kill(), b.wait()
            line = children.finished(b, 1.0, total=3)  # nothing left to start: c gets every core
            assert files[2].read_text() == "4\n" and not files[1].exists()
            assert line == "  the 1 run(s) still training now use 4 CPU thread(s) each"
        finally:
            for p in {a, b, c}:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_sigterm_to_a_study_with_jobs_stops_its_runs_at_a_checkpoint(tmp_path):
    """The study's process is signalled (as a scheduler or `kill` would, not the terminal's process group):
    it starts no new run, passes the signal on, and each running run saves a checkpoint to continue from."""
    import os
    import signal
    import sys
    import time

    make_split_root(tmp_path / "data", train=40, test=4)
    spec_path = write_spec(tmp_path / "spec.yaml", base={**BASE, "epochs": 60, "batch_size": 8}, seeds=[0, 1, 2],
                           arms={"baseline": {}})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "imgcls", "study", str(spec_path), "--out", str(out), "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "IMGCLS_CACHE": str(tmp_path / "cache"), "IMGCLS_QUIET": "0"})
    first = [out / "runs" / "baseline" / f"seed{k}" / "metrics.csv" for k in (0, 1)]
    deadline = time.time() + 240
    while not all(f.exists() for f in first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM during the study's runs" in err and "rerun the same study command" in err
    assert "Traceback" not in err
    assert "seed 0: stopped (exit" in err and "ended" not in err  # stopping runs are not counted as ended
    states = {r.seed: r.state for r in runner.plan(spec.load_spec(spec_path), out)}
    assert states == {0: "resume", 1: "resume", 2: "new"}  # the third run never started


def test_jobs_is_checked_before_anything_trains():
    with pytest.raises(ImgclsError, match="--jobs must be 1 or more"):
        executors.make_executor("local", jobs=0)
    assert executors.make_executor("local", jobs=2).jobs == 2


# --- statistics on known numbers -------------------------------------------------------------------


def test_paired_t_matches_scipy():
    a, b = [0.81, 0.79, 0.84], [0.78, 0.77, 0.80]
    assert stats.paired_t(a, b) == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert stats.paired_t([0.5, 0.6], [0.5, 0.6]) == 1.0  # identical arms: no evidence of a difference


def test_mean_ci_is_student_t():
    x = [0.80, 0.82, 0.86]
    m, s, lo, hi = stats.mean_ci(x)
    ref = sps.t.interval(0.95, df=2, loc=np.mean(x), scale=sps.sem(x))
    assert (m, s) == pytest.approx((np.mean(x), np.std(x, ddof=1)))
    assert (lo, hi) == pytest.approx(ref)
    assert math.isnan(stats.mean_ci([0.8])[2])


def test_mcnemar_exact():
    a = [True] * 10 + [False] * 6 + [True] * 1
    b = [True] * 10 + [True] * 6 + [False] * 1  # b alone right 6 times, a alone once
    p, b_only, a_only = stats.mcnemar_exact(a, b)
    assert (b_only, a_only) == (6, 1)
    assert p == pytest.approx(sps.binomtest(1, 7, 0.5).pvalue) == pytest.approx(16 / 128)
    assert stats.mcnemar_exact([True, False], [True, False])[0] == 1.0


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = stats.holm([0.2, float("nan")])
    assert out[0] == pytest.approx(0.2) and math.isnan(out[1])


def test_one_seed_uses_mcnemar_on_shared_images():
    def run(arm, correct):
        return analysis.RunResult(arm, 0, Path(arm), {"test_accuracy": float(np.mean(list(correct.values())))}, {}, correct)

    base = run("baseline", {f"{c}{i}": i < 8 for c in "abc" for i in range(10)})  # 80% on a, b and c
    arm = run("x", {f"{c}{i}": True for c in "ab" for i in range(10)})  # left c out; perfect on a and b
    res = analysis.compare([arm], [base])
    assert res["test"].startswith("McNemar") and "kept classes" in res["compared_on"]
    assert res["baseline_mean"] == pytest.approx(0.8) and res["delta"] == pytest.approx(0.2)
    assert res["p_value"] == pytest.approx(sps.binomtest(0, 4, 0.5).pvalue)


def test_config_differences_ignore_auto_size_device_and_new_default_keys():
    from imgcls.config import TrainConfig, to_dict

    stored = to_dict(TrainConfig(img_size=32, device="cuda"))
    stored.pop("ema")  # a run written before the key existed
    assert runner.config_differences(TrainConfig(), stored) == []
    assert runner.config_differences(TrainConfig(img_size=64, ema=0.9), stored) == ["img_size: 32 -> 64", "ema: (not stored) -> 0.9"]


def test_spec_data_and_base_can_be_changed_from_the_command_line(tmp_path, monkeypatch):
    from imgcls.study.spec import load_spec

    spec = write_spec(tmp_path / "spec.yaml")
    other = make_split_root(tmp_path / "elsewhere", train=3, test=1)
    monkeypatch.chdir(tmp_path)
    study = load_spec(spec, data="elsewhere", sets=["lr=0.05", "epochs=2"])
    cfg = study.config(study.baseline, study.seeds[0])
    assert cfg.data == str(other.resolve()) and cfg.lr == 0.05 and cfg.epochs == 2
    assert load_spec(spec, data="fashion-mnist").data == "fashion-mnist"
    with pytest.raises(ImgclsError, match="seed is set by the study"):
        load_spec(spec, sets=["seed=3"])
    with pytest.raises(ImgclsError, match="unknown key"):
        load_spec(spec, sets=["colour=red"])


def test_the_end_of_study_lines_write_p_as_summary_md_does(tmp_path, monkeypatch, capsys):
    from imgcls.study.core import StudyResult, say_summary

    monkeypatch.setenv("IMGCLS_QUIET", "0")
    rows = [{"arm": "base", "mean": 0.84, "n": 3, "test": "(baseline)"},
            {"arm": "tiny-p", "mean": 0.81, "delta": -0.03, "p_value": 0.0002, "significant": True, "n": 3, "test": "paired t"},
            {"arm": "some-p", "mean": 0.83, "delta": -0.01, "p_value": 0.25, "significant": False, "n": 3, "test": "paired t"},
            {"arm": "no-p", "mean": 0.83, "delta": -0.01, "p_value": float("nan"), "significant": None, "n": 1, "test": "-"}]
    say_summary(StudyResult(out=tmp_path, trained=0, skipped=4, summary=rows), wall_s=1.0)
    err = capsys.readouterr().err
    assert "p<0.001 *" in err and "p=0.250  (" in err and "p=-  (" in err and "0.000" not in err
