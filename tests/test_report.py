"""``imgcls compare``, the HTML pages, and those pages in a real headless Chromium.

One small study (3 arms x 1 seed, 32 px, two epochs) is trained once for the module: its runs are
the run pages, the study is the study page, and two of its runs are compared for the comparison page.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_split_root, run_cli
from imgcls.compare import compare_runs
from imgcls.errors import ImgclsError
from imgcls.report.html import write_report

CLASSES = ("cat", "dog", "fox")
BASE = {"model": "resnet18", "img_size": 32, "epochs": 2, "batch_size": 8, "lr": 3e-3, "precision": "fp32", "val_fraction": 0.25}
# "slow" barely moves from its random start: it disagrees with the baseline on many images
ARMS = {"baseline": {}, "slow": {"optimizer": "sgd", "lr": 1e-5}, "no-fox": {"exclude_classes": ["fox"]}}


# --- one small trained study for the rest ---------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from imgcls.explain.core import explain_paths
    from imgcls.study.core import run_study

    root = tmp_path_factory.mktemp("report")
    make_split_root(root / "data", CLASSES, train=12, test=6)
    spec = {"name": "tiny", "data": "data", "base": BASE, "seeds": [0], "arms": ARMS, "panel_per_class": 1}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_CACHE", str(root / "cache"))
        mp.setenv("IMGCLS_QUIET", "1")
        run_study(root / "spec.yaml", root / "study")
        base = root / "study" / "runs" / "baseline" / "seed0"
        explain_paths(base, [str(root / "data" / "test" / c / f"{c}_500.png") for c in CLASSES], base / "explain",
                      method="gradcam", layer="layer2")
        write_report(base)  # again, now with the Grad-CAM examples
        compare_runs(base, root / "study" / "runs" / "slow" / "seed0", None, root / "compare")
    return root


def _runs(study: Path, arm: str) -> Path:
    return study / "study" / "runs" / arm / "seed0"


def _predictions(run: Path) -> dict[str, tuple[str, str]]:
    with (run / "eval" / "predictions.csv").open(newline="") as f:
        return {r["path"]: (r["true"], r["predicted"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_eval_metrics_carry_intervals(study):
    m = json.loads((_runs(study, "baseline") / "eval" / "metrics.json").read_text())
    ci = m["intervals"]
    assert ci["resamples"] >= 1000 and set(ci["per_class_f1"]) == set(CLASSES)
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):  # metrics.json holds float32 figures
        assert ci[key][0] - 1e-6 <= m[key] <= ci[key][1] + 1e-6
    s = json.loads((_runs(study, "baseline") / "summary.json").read_text())
    assert s["test_accuracy_ci"] == ci["accuracy"]


@pytest.mark.slow
def test_compare_agrees_with_each_runs_own_evaluation(study):
    doc = json.loads((study / "compare" / "compare.json").read_text())
    pa, pb = _predictions(_runs(study, "baseline")), _predictions(_runs(study, "slow"))
    assert sorted(pa) == sorted(pb) and doc["n"] == len(pa) == 6 * len(CLASSES)
    ok_a = {k: t == p for k, (t, p) in pa.items()}
    ok_b = {k: t == p for k, (t, p) in pb.items()}
    assert doc["accuracy_a"] == pytest.approx(np.mean(list(ok_a.values())))
    assert doc["accuracy_b"] == pytest.approx(np.mean(list(ok_b.values())))
    assert doc["mcnemar"]["a_only"] == sum(ok_a[k] and not ok_b[k] for k in pa)
    assert doc["mcnemar"]["b_only"] == sum(ok_b[k] and not ok_a[k] for k in pa)
    assert doc["difference"] == pytest.approx(doc["accuracy_b"] - doc["accuracy_a"])
    assert doc["difference_ci"][0] <= doc["difference"] <= doc["difference_ci"][1]
    verdict = "significant" if doc["mcnemar"]["p_value"] < 0.05 else "not significant"
    assert f"the difference is {verdict}" in doc["sentence"] and "95 % CI" in doc["sentence"]
    assert re.search(r"gives p (= [01]\.?\d*|< 0\.001)", doc["sentence"])
    assert doc["a"]["label"] == "baseline/seed0" and doc["b"]["label"] == "slow/seed0"  # same folder names: the arm tells them apart
    for key, name in doc["grids"].items():
        assert name is None or (study / "compare" / name).is_file()
    assert {r["class"] for r in doc["per_class"]} == set(CLASSES)


@pytest.mark.slow
def test_compare_refuses_different_classes_unless_shared(study, tmp_path):
    base, nofox = _runs(study, "baseline"), _runs(study, "no-fox")
    r = run_cli("compare", str(base), str(nofox), "--out", str(tmp_path / "c"), env={"IMGCLS_CACHE": str(study / "cache")})
    assert r.returncode == 2, r.stderr
    assert "different classes" in r.stderr and "--classes shared" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("compare", str(base), str(nofox), "--classes", "shared", "--out", str(tmp_path / "c"),
                env={"IMGCLS_CACHE": str(study / "cache")})
    assert r.returncode == 0, r.stderr
    assert "significant" in r.stdout
    doc = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert doc["classes"] == ["cat", "dog"] and doc["n"] == 12  # the fox test images are not compared
    assert (tmp_path / "c" / "report.html").is_file()


@pytest.mark.slow
def test_compare_needs_data_when_the_splits_differ(study, tmp_path):
    from imgcls.config import from_dict
    from imgcls.runs import train_and_evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_CACHE", str(study / "cache"))
        cfg = json.loads((_runs(study, "slow") / "config.json").read_text())
        other = tmp_path / "other"
        train_and_evaluate(from_dict({**cfg, "split_seed": 5}), run_dir=other)
    with pytest.raises(ImgclsError, match="split_seed"):
        compare_runs(_runs(study, "baseline"), other, None, tmp_path / "c")
    doc = compare_runs(_runs(study, "baseline"), other, str(study / "data"), tmp_path / "c")
    assert doc["n"] == 6 * len(CLASSES) and doc["images"] == str(study / "data")


def _self_contained(page: Path) -> str:
    """The page's HTML (entities decoded) after checking that it needs nothing from outside itself."""
    html = page.read_text(encoding="utf-8")
    assert "<script" not in html
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    srcs = re.findall(r"""<img[^>]+src="([^"]*)""", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    return unescape(html)


@pytest.mark.slow
def test_pages_are_self_contained_and_show_what_the_folders_hold(study):
    run = _self_contained(_runs(study, "baseline") / "report.html")
    for text in ("test accuracy", "95 % CI", "Per class", "Confusion matrices", "Calibration",
                 "Grad-CAM examples", "gradcam", "Data", "Configuration", '"model": "resnet18"', *CLASSES):
        assert text in run, text
    st = _self_contained(study / "study" / "report.html")
    for text in ("Study tiny", "verdict", "(baseline)", "left out", "Grad-CAM across arms", "runs/slow/seed0/report.html", *CLASSES):
        assert text in st, text
    assert any(v in st for v in (">held<", ">not held<", ">held before correction only<"))
    cmp = _self_contained(study / "compare" / "report.html")
    sentence = json.loads((study / "compare" / "compare.json").read_text())["sentence"]
    assert sentence in cmp and "Per-class F1" in cmp


@pytest.mark.slow
def test_report_command_rerenders_and_rejects_other_folders(study, tmp_path):
    out = tmp_path / "page.html"
    r = run_cli("report", str(_runs(study, "no-fox")), "--out", str(out))
    assert r.returncode == 0, r.stderr
    html = _self_contained(out)
    assert "Run no-fox/seed0" in html and "fox (left out)" in html
    r = run_cli("report", str(tmp_path))
    assert r.returncode == 2 and "is not a run" in r.stderr and "Traceback" not in r.stderr


def test_eval_keeps_the_run_page_in_step(study, tmp_path):
    """`imgcls eval RUN` rewrites RUN/eval, so it re-renders RUN/report.html; an eval elsewhere leaves it."""
    run = tmp_path / "run"
    shutil.copytree(_runs(study, "baseline"), run)
    (run / "report.html").unlink()
    r = run_cli("eval", str(run), "--out", str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr
    assert not (run / "report.html").exists()
    r = run_cli("eval", str(run), env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert "report.html (updated)" in r.stdout + r.stderr
    assert "Run run" in _self_contained(run / "report.html")


# --- the pages in a real browser ------------------------------------------------------------------------

def _screenshot_tool():
    """docs/screenshot.py: the same browser and checks the README's screenshots went through."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "screenshot.py"
    spec = importlib.util.spec_from_file_location("imgcls_docs_screenshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def browser():
    shot = _screenshot_tool()
    if not (shot.CHROMIUM.is_file() and shot.CHROMEDRIVER.is_file()):
        pytest.skip("headless Chromium not installed (make browser installs Debian's chromium and chromium-driver)")
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    driver, profile = shot.driver()
    try:
        yield driver, shot.check
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_pages_render_in_headless_chromium(study, browser):
    from selenium.webdriver.common.by import By

    browser, check = browser
    pages = {"run": _runs(study, "baseline") / "report.html", "study": study / "study" / "report.html",
             "compare": study / "compare" / "report.html"}
    for kind, page in pages.items():
        # loaded, no severe console message, figures present, each with a size and (an <img>) decoded
        problem = check(browser, page)
        assert problem is None, (kind, problem)
        text = browser.find_element(By.TAG_NAME, "body").text  # rendered text: what a reader sees
        for name in CLASSES:
            assert name in text, (kind, name)
