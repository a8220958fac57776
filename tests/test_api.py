"""The Python API as the README shows it: train, load, evaluate, predict, explain; str and Path alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgcls
from conftest import class_image, make_split_root, write_class_folders
from imgcls.errors import ImgclsError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    make_split_root(root / "photos", train=8, test=3)
    return root


def test_train_load_evaluate_predict_explain(trained, monkeypatch, capfd):
    monkeypatch.chdir(trained)
    monkeypatch.delenv("IMGCLS_QUIET")  # the API itself must keep quiet
    run = imgcls.train("photos/", out="runs/a", model="resnet18", epochs=1, img_size=32, batch_size=8, precision="fp32")
    assert isinstance(run, imgcls.Run) and run.path == Path("runs/a") and run.classes == ["cat", "dog", "fox"]
    same = imgcls.load(Path("runs/a"))
    assert same.config == run.config and same.config.epochs == 1 and same.summary["epochs_run"] == 1

    metrics = run.evaluate()
    assert metrics == json.loads(Path("runs/a/eval/metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(same.summary["test_accuracy"]) and metrics["n"] == 9

    # one 48 px photo as a file, a PIL image and an array: the same resize, the same answer
    Path("new").mkdir()
    class_image(1, 900, size=48).save("new/dog.png")
    Path("new/broken.jpg").write_text("not an image")
    pil = Image.open("new/dog.png")
    rows = run.predict(["new/dog.png", pil, np.asarray(pil), Path("new")], topk=2)
    assert [r["input"] for r in rows] == [0, 1, 2, 3, 3]
    by_file, from_pil, from_array = rows[:3]
    assert by_file["path"] == str(Path("new/dog.png")) and from_pil["path"] is None
    assert len(by_file["topk"]) == 2 and by_file["label"] == by_file["topk"][0]["label"] in run.classes
    for r in (from_pil, from_array):
        assert [t["label"] for t in r["topk"]] == [t["label"] for t in by_file["topk"]]
        assert [t["prob"] for t in r["topk"]] == pytest.approx([t["prob"] for t in by_file["topk"]], abs=1e-6)
    assert rows[3]["path"].endswith("broken.jpg") and "not an image" in rows[3]["error"]
    assert rows[4]["path"] == by_file["path"]
    with pytest.raises(ImgclsError, match="uint8"):
        run.predict(np.zeros((8, 8, 3), np.float32))

    doc = run.explain(["new/dog.png"], method="gradcam", out="runs/a/why")
    assert doc["n_images"] == 1 and doc["layer"] == "layer4" and Path("runs/a/why/explain.json").is_file()
    assert Path(doc["images"][0]["figure"]).is_file()

    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # nothing printed unless asked
    write_class_folders(Path("more"), ["cat"], 20)
    Path("more/cat/broken.png").write_bytes(b"")
    assert run.evaluate("more", out="runs/a/eval-more", verbose=True)["n"] == 20
    assert "skipped" in capfd.readouterr().err  # asked: the CLI's lines


def test_options_are_checked_like_set(trained, monkeypatch):
    monkeypatch.chdir(trained)
    with pytest.raises(ImgclsError, match="unknown key.*modle"):
        imgcls.train("photos", out="runs/bad", modle="resnet18")
    with pytest.raises(ImgclsError, match="epochs must be an integer"):
        imgcls.train("photos", out="runs/bad", epochs="many")
    with pytest.raises(ImgclsError, match="not a trained run"):
        imgcls.load("photos")
