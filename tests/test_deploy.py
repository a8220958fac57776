"""Calibration, "unknown", export with its parity proof, ONNX predict and the README snippet, end to end."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, class_image, make_split_root, run_cli
from imgcls.deploy import calibration as calib
from imgcls.errors import ImgclsError

TINY = ["--model", "resnet10t", "--img-size", "32", "--batch-size", "16", "--precision", "fp32", "--epochs", "1"]


# --- calibration and threshold, on logits with a known answer ------------------------------------------------


def _sampled(temperature: float, n: int = 4000, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z); the logits shown are z * temperature, so the fitted T should be ~temperature."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=g).flatten()
    return z * temperature, labels


def test_fit_temperature_recovers_the_scale_and_lowers_nll():
    logits, labels = _sampled(3.0)
    t = calib.fit_temperature(logits, labels)
    assert 2.7 < t < 3.3
    (ece0, nll0), (ece1, nll1) = calib.ece_nll(logits, labels), calib.ece_nll(logits, labels, t)
    assert nll1 < nll0 and ece1 < ece0


def test_threshold_keeps_the_stated_share():
    logits, labels = _sampled(2.0)
    cal = calib.fit(logits, labels, keep=0.9)
    _score, unknown = cal.flag(logits)
    assert 0.09 <= float(unknown.float().mean()) <= 0.11
    assert set(cal.thresholds) == {"max_prob", "energy"} and cal.threshold == cal.thresholds["max_prob"]


def test_too_few_validation_images_keep_temperature_one():
    logits, labels = _sampled(2.0, n=5)
    cal = calib.fit(logits, labels, keep=0.95)
    assert cal.temperature == 1.0 and cal.threshold is None and "validation" in cal.note


def test_old_and_damaged_calibration_files(tmp_path):
    assert calib.read(tmp_path) is calib.UNCALIBRATED  # a run from before calibration: T = 1, no threshold
    (tmp_path / "calibration.json").write_text('{"temperature": -2}')
    with pytest.raises(ImgclsError, match="damaged"):
        calib.read(tmp_path)


def test_keep_is_a_checked_config_key(tmp_path, split_root):
    r = run_cli("train", str(split_root), "--keep", "1.5", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "keep" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- one tiny trained run, exported ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    data = make_split_root(root / "data", train=30, test=6)
    r = run_cli("train", str(data), "--out", str(root / "run"), "--val-fraction", "0.3", *TINY,
                env={"IMGCLS_CACHE": str(root / "cache")})
    assert r.returncode == 0, r.stderr
    return root, data, root / "run"


@pytest.fixture(scope="module")
def onnx_file(run):
    root, _data, run_dir = run
    out = root / "model.onnx"
    r = run_cli("export", str(run_dir), "--out", str(out), env={"IMGCLS_CACHE": str(root / "cache")})
    assert r.returncode == 0, r.stderr
    return out


def test_training_stores_calibration_and_eval_reports_it(run):
    _root, _data, run_dir = run
    cal = json.loads((run_dir / "calibration.json").read_text())
    assert cal["temperature"] > 0 and cal["n"] >= 20 and cal["thresholds"]["max_prob"] > 0
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(m["calibration"]) >= {"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}
    assert m["calibration"]["temperature"] == pytest.approx(cal["temperature"])
    assert 0.0 <= m["unknown"]["flagged_test"] <= 1.0 and m["reliability_before"]


def test_onnx_export_parity_and_metadata(run, onnx_file):
    import onnx

    parity = json.loads(onnx_file.with_name(onnx_file.name + ".parity.json").read_text())
    assert parity["images"] == 18 and parity["top1_agreement"] >= 0.995 and parity["max_abs_prob_diff"] < 1e-3
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["imgcls"])
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["img_size"] == 32 and meta["config"]["model"] == "resnet10t"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and [d.dim_value for d in dims[1:]] == [32, 32, 3]  # dynamic batch
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_onnx_predict_matches_predict_on_the_run(run, onnx_file, tmp_path):
    _root, data, run_dir = run
    outs = {}
    for name, model in (("run", run_dir), ("onnx", onnx_file)):
        r = run_cli("predict", str(model), str(data / "test"), "--out", str(tmp_path / f"{name}.csv"), "--topk", "3")
        assert r.returncode == 0, r.stderr
        outs[name] = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
    assert outs["run"][0].keys() == outs["onnx"][0].keys() and "unknown" in outs["run"][0]
    for a, b in zip(outs["run"], outs["onnx"], strict=True):
        assert a["path"] == b["path"] and a["label_1"] == b["label_1"] and a["unknown"] == b["unknown"]
        assert abs(float(a["prob_1"]) - float(b["prob_1"])) < 1e-3


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- onnx-snippet:start -->\n```python\n(.*?)```\n<!-- onnx-snippet:end -->", text, re.S)
    assert m, "README.md lost its onnx-snippet markers"
    return m.group(1)


def test_readme_snippet_runs_without_imgcls_or_torch(onnx_file, tmp_path):
    code = _readme_snippet()
    assert len(code.strip().splitlines()) <= 15
    imgs = tmp_path / "photos"
    imgs.mkdir()
    class_image(0, 900, size=57).save(imgs / "a.jpg", quality=90)  # not the run's size: the resize must agree
    class_image(2, 901, size=40).resize((40, 23)).save(imgs / "b.png")
    paths = [str(imgs / "a.jpg"), str(imgs / "b.png")]
    # importing torch or imgcls fails inside the snippet's process: it must stand on onnxruntime, Pillow, numpy
    guard = "import sys\nsys.modules['torch'] = None\nsys.modules['imgcls'] = None\n"
    script = tmp_path / "snippet.py"
    script.write_text(guard + code)
    r = subprocess.run([sys.executable, str(script), str(onnx_file), *paths], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = [line.split() for line in r.stdout.strip().splitlines()]
    r = run_cli("predict", str(onnx_file), *paths, "--out", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    want = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [g[0] for g in got] == paths
    for g, w in zip(got, want, strict=True):
        assert g[1] == w["label"] and abs(float(g[2]) - w["confidence"]) < 2e-5
        assert (g[3] == "unknown") == w["unknown"]


def test_torchscript_export_round_trip(run, tmp_path):
    root, _data, run_dir = run
    out = tmp_path / "model.pt"
    r = run_cli("export", str(run_dir), "--format", "torchscript", "--out", str(out), env={"IMGCLS_CACHE": str(root / "cache")})
    assert r.returncode == 0, r.stderr
    extra = {"imgcls.json": ""}
    model = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["imgcls.json"])["classes"] == ["cat", "dog", "fox"]
    probs, score = model(torch.zeros(3, 32, 32, 3, dtype=torch.uint8))
    assert probs.shape == (3, 3) and score.shape == (3,) and torch.allclose(probs.sum(1), torch.ones(3))
    assert json.loads(out.with_name("model.pt.parity.json").read_text())["top1_agreement"] >= 0.995


def test_run_without_calibration_keeps_working_and_says_so(run, tmp_path):
    _root, data, run_dir = run
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    (old / "calibration.json").unlink()
    r = run_cli("predict", str(old), str(data / "test" / "cat"), "--out", str(tmp_path / "p.csv"), env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert "no calibration.json" in r.stderr
    assert "unknown" not in next(csv.reader((tmp_path / "p.csv").open()))
    r = run_cli("predict", str(run_dir), str(data / "test" / "cat"), "--no-unknown", "--out", str(tmp_path / "q.csv"))
    assert r.returncode == 0 and "unknown" not in next(csv.reader((tmp_path / "q.csv").open()))


# --- bad input: one line, nothing half-written ----------------------------------------------------------------


def _one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_export_bad_input(run, tmp_path):
    _root, _data, run_dir = run
    empty = tmp_path / "no-checkpoint"
    (empty / "checkpoints").mkdir(parents=True)
    _one_line_error(run_cli("export", str(empty)), "checkpoint not found")
    _one_line_error(run_cli("export", str(run_dir), "--out", str(tmp_path / "m.pt")), "must end with .onnx")
    _one_line_error(run_cli("export", str(run_dir), "--opset", "9", "--out", str(tmp_path / "m.onnx")), "--opset")
    r = run_cli("export", str(run_dir), "--format", "tflite")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".m.*"))


def test_untraceable_model_is_one_error_and_no_file(tmp_path):
    from imgcls.deploy.export import export_onnx

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.float().mean() > 100:  # control flow on values: torch.export cannot trace it
                return x.float().softmax(1), x.float().mean(1)
            return x.float(), x.float()

    out = tmp_path / "m.onnx"
    with pytest.raises(ImgclsError, match="cannot trace") as e:
        export_onnx(DataDependent(), torch.zeros(2, 8, 8, 3, dtype=torch.uint8), out, opset=18, meta={})
    assert "\n" not in str(e.value) and not out.exists()


def test_parity_failure_writes_nothing(run, tmp_path, monkeypatch):
    from imgcls.deploy import export

    _root, _data, run_dir = run
    monkeypatch.setattr(export, "MIN_AGREEMENT", 1.01)  # no export can reach it: the failure path, for real
    with pytest.raises(ImgclsError, match="nothing written"):
        export.export_run(run_dir, fmt="torchscript", out=tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_onnx_without_imgcls_metadata_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    _one_line_error(run_cli("predict", str(tmp_path / "plain.onnx"), str(tmp_path / "x.png")), "no imgcls metadata")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    _one_line_error(run_cli("predict", str(tmp_path / "junk.onnx"), str(tmp_path / "x.png")), "not a readable ONNX file")


def test_study_summary_averages_the_unknown_figures_per_arm(tmp_path):
    from imgcls.study.analysis import RunResult, _unknown_means

    def result(seed, unknown):
        return RunResult("no-fox", seed, tmp_path, {"test_accuracy": 0.9}, {"unknown": unknown}, {})

    runs = [result(0, {"flagged_test": 0.04, "flagged_left_out": 0.3, "auroc": 0.7, "fpr_at_95": 0.6}),
            result(1, {"flagged_test": 0.06, "flagged_left_out": 0.5, "auroc": 0.8, "fpr_at_95": 0.4})]
    got = _unknown_means(runs)
    assert got == pytest.approx({"flagged_kept": 0.05, "flagged_left_out": 0.4, "auroc_unknown": 0.75, "fpr95_unknown": 0.5})
    old = _unknown_means([result(0, {"note": "no calibration.json"})])  # runs from before calibration: NaN, not an error
    assert all(v != v for v in old.values())
