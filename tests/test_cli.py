"""End to end through the real CLI: train -> eval -> predict -> resume, and one-line errors."""

from __future__ import annotations

import csv
import json
import re

import pytest

from conftest import class_image, make_split_root, run_cli, write_class_folders

FAST = ["--model", "resnet18", "--img-size", "32", "--batch-size", "8", "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_split_root(root / "data", classes=("cat", "dog", "fox", "owl", "bee", "ant", "elk"), train=10, test=3)
    run = root / "run"
    r = run_cli("train", str(data), "--out", str(run), "--epochs", "1", *FAST, env={"IMGCLS_CACHE": str(root / "cache"), "IMGCLS_QUIET": "0"}, process=True)  # a user's shell, end to end
    assert r.returncode == 0, r.stderr
    return data, run, r


def test_train_writes_a_self_describing_run(trained):
    data, run, r = trained
    assert "test accuracy" in r.stderr and str(run) in r.stderr
    assert re.search(r"test accuracy \d+\.\d % \[\d+\.\d, \d+\.\d\]", r.stderr)  # with its 95 % interval
    for name in ("report.html", "config.json", "classes.json", "data_report.json", "metrics.csv", "curves.png", "summary.json",
                 "checkpoints/best.safetensors", "checkpoints/last.safetensors", "eval/metrics.json"):
        assert (run / name).exists(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["img_size"] == 32 and cfg["data"] == str(data)


def test_eval_outputs(trained, tmp_path):
    data, run, _ = trained
    out = tmp_path / "ev"
    r = run_cli("eval", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "classes", "confusion_matrix", "per_class", "top5", "ece", "most_confused", "intervals"} <= set(m)
    assert m["n"] == 21 and len(m["confusion_matrix"]) == 7
    assert sum(map(sum, m["confusion_matrix"])) == 21
    assert set(m["per_class"]["cat"]) >= {"precision", "recall", "f1", "accuracy", "support"}
    for png in ("confusion_matrix.png", "confusion_matrix_normalized.png", "misclassified.png", "reliability.png"):
        assert (out / png).stat().st_size > 1000
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 21 and {"path", "true", "predicted", "p_cat"} <= set(rows[0])


def test_eval_on_another_folder_maps_by_name(trained, tmp_path):
    _, run, _ = trained
    other = write_class_folders(tmp_path / "other", ["dog", "owl"], 2)
    r = run_cli("eval", str(run), str(other), "--out", str(tmp_path / "ev2"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert m["per_class"]["dog"]["support"] == 2 and m["per_class"]["cat"]["support"] == 0
    write_class_folders(tmp_path / "zoo", ["zebra"], 2)
    r = run_cli("eval", str(run), str(tmp_path / "zoo"))
    assert r.returncode == 2 and "zebra" in r.stderr and "Traceback" not in r.stderr


def test_eval_applies_the_bad_file_limit_of_training(trained, tmp_path):
    _, run, _ = trained
    junky = write_class_folders(tmp_path / "junky", ["dog", "owl"], 3)  # 6 good files, then 3 junk: 33 % > 5 %
    for i in range(3):
        (junky / "dog" / f"junk{i}.jpg").write_bytes(b"junk")
    r = run_cli("eval", str(run), str(junky), "--out", str(tmp_path / "ev-junky"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "3 of 9 files in the data cannot be used" in r.stderr
    assert "--max-bad-fraction" in r.stderr and not (tmp_path / "ev-junky" / "metrics.json").exists()
    # the flag raises the limit for one evaluation; the skipped files are still listed, one line each
    r = run_cli("eval", str(run), str(junky), "--out", str(tmp_path / "ev-raised"), "--max-bad-fraction", "0.5",
                env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert sum(f"junk{i}.jpg" in line and "skipped" in line for i in range(3) for line in r.stderr.splitlines()) == 3
    r = run_cli("eval", str(run), str(junky), "--max-bad-fraction", "2")
    assert r.returncode == 2 and "max_bad_fraction" in r.stderr and "Traceback" not in r.stderr


def test_eval_with_one_junk_file_among_many_reports_the_skip(trained, tmp_path):
    _, run, _ = trained
    data = write_class_folders(tmp_path / "mostly-good", ["cat", "dog", "fox", "owl", "bee", "ant", "elk"], 3)
    (data / "cat" / "broken.jpg").write_bytes(b"junk")  # 1 of 22 files: under the run's 5 %
    out = tmp_path / "ev-one"
    r = run_cli("eval", str(run), str(data), "--out", str(out), env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert any("skipped" in line and "broken.jpg" in line for line in r.stderr.splitlines())
    assert json.loads((out / "metrics.json").read_text())["n"] == 21
    report = json.loads((out / "data_report.json").read_text())
    assert [s["path"].rsplit("/", 1)[-1] for s in report["skipped"]] == ["broken.jpg"]


def test_predict_csv_and_json(trained, tmp_path):
    data, run, _ = trained
    (tmp_path / "imgs").mkdir()
    class_image(1, 3).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"nope")
    r = run_cli("predict", str(run), str(tmp_path / "imgs"), str(data / "test" / "cat" / "*.png"), "--out", str(tmp_path / "p.csv"), "--topk", "3")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 5 and rows[0]["label_1"] and "prob_3" in rows[0]
    assert any(row["error"] for row in rows)  # the broken file is reported, not fatal
    r = run_cli("predict", str(run), str(tmp_path / "imgs" / "a.png"), "--out", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    pred = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert len(pred) == 1 and len(pred[0]["topk"]) == 5


def test_resume_extends_a_finished_run(trained):
    _, run, _ = trained
    r = run_cli("train", "--resume", "--out", str(run), "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    r = run_cli("train", "--resume", "--out", str(run), "--lr", "0.1")
    assert r.returncode == 2 and "only" in r.stderr


def test_config_file_and_set(tmp_path, split_root):
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("model: resnet18\nimg_size: 32\nepochs: 1\nbatch_size: 8\nprecision: fp32\nlr: 0.01\n")
    run = tmp_path / "run"
    r = run_cli("train", str(split_root), "--config", str(cfgf), "--set", "lr=0.002", "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["lr"] == 0.002


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "/no/such/folder"], "not found"),
        (["train", "{data}", "--model", "resnet_nope"], "unknown model"),
        (["train", "{one}"], "at least two classes"),
        (["train", "{unseen}", *FAST], "not in training"),
        (["train", "{data}", "--set", "colour=red"], "unknown key"),
        (["train", "{data}", "--epochs", "many"], "integer"),
        (["eval", "{tmp}/no-run"], "not found"),
        (["eval", "{tampered}"], "integrity"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    data = make_split_root(tmp_path / "data", train=3, test=1)
    write_class_folders(tmp_path / "one", ["solo"], 3)
    unseen = make_split_root(tmp_path / "unseen", train=3, test=1)
    write_class_folders(unseen / "test", ["ghost"], 1)
    tampered = tmp_path / "tampered"
    (tampered / "checkpoints").mkdir(parents=True)
    if "{tampered}" in args:
        from imgcls.engine import checkpoint as ckpt
        import torch

        ckpt.save(tampered / "checkpoints" / "best.safetensors", {"model.w": torch.zeros(8)}, {})
        p = tampered / "checkpoints" / "best.safetensors"
        b = bytearray(p.read_bytes())
        b[-3] ^= 0xFF
        p.write_bytes(bytes(b))
    subs = {"{data}": str(data), "{one}": str(tmp_path / "one"), "{unseen}": str(unseen), "{tmp}": str(tmp_path), "{tampered}": str(tampered)}
    argv = [subs.get(a, a).replace("{tmp}", str(tmp_path)) for a in args]
    r = run_cli(*argv, "--out", str(tmp_path / "o")) if argv[0] == "train" else run_cli(*argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_salted_data_set_trains_to_the_end(tmp_path):
    """Bad files are skipped and reported, odd valid files are used, and the run completes."""
    import numpy as np
    from PIL import Image

    data = make_split_root(tmp_path / "data", train=8, test=2)
    cat = data / "train" / "cat"
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("text")
    Image.new("CMYK", (32, 32), (0, 200, 200, 0)).save(cat / "cmyk.jpg")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(cat / "deep16.png")
    Image.new("RGBA", (40, 30), (200, 0, 0, 120)).save(cat / "alpha.png")
    Image.new("P", (32, 32), 3).save(cat / "palette.gif")
    (data / "train" / ".ipynb_checkpoints").mkdir()
    (cat / "Thumbs.db").write_bytes(b"\x00")
    run = tmp_path / "run"
    r = run_cli("train", str(data), "--out", str(run), "--epochs", "1", "--max-bad-fraction", "0.3", *FAST, env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert "skipped 2 unusable file(s)" in r.stderr and "ignored 1 non-image file(s)" in r.stderr
    report = json.loads((run / "data_report.json").read_text())
    assert {s["path"].rsplit("/", 1)[-1] for s in report["skipped"]} == {"zero.jpg", "notes.jpg"}
    assert report["counts"]["train"]["cat"] + report["counts"]["val"]["cat"] == 8 + 4
