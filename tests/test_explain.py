"""Explanations: every CAM method on a tiny trained run, the CLI, layer and class choice, faithfulness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_split_root, run_cli
from imgcls.errors import ImgclsError

METHODS = ["gradcam", "gradcam++", "eigencam", "layercam", "scorecam"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A resnet18 run at 32 px trained for one epoch (once for the module), and its data."""
    from imgcls.config import TrainConfig
    from imgcls.runs import train_and_evaluate

    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("explain")
    mp.setenv("IMGCLS_CACHE", str(base / "cache"))
    mp.setenv("IMGCLS_QUIET", "1")
    data = make_split_root(base / "data", train=12, test=5)
    cfg = TrainConfig(data=str(data), model="resnet18", img_size=32, epochs=1, batch_size=16, precision="fp32", device="cpu")
    train_and_evaluate(cfg, run_dir=base / "run")
    mp.undo()
    return base / "run", data


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_method_on_a_folder(tiny, tmp_path):
    from imgcls.explain import explain_paths

    run, data = tiny
    doc = explain_paths(run, [str(data / "test")], tmp_path / "ex", method="all", batch_size=8, device="cpu")
    written = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert written["methods"] == METHODS and written["layer"] == "layer4"  # found, not named
    assert "deletion" in written["faithfulness_metric"] and doc["n_images"] == 15
    assert len(written["images"]) == 15 * len(METHODS)
    for m in METHODS:
        assert len(list((tmp_path / "ex" / m).glob("*.png"))) == 15
        assert (tmp_path / "ex" / f"{m}_grid.png").stat().st_size > 0
    for rec in written["images"]:
        assert 0.0 <= rec["deletion_auc"] <= 1.0 and 0.0 <= rec["insertion_auc"] <= 1.0
        assert rec["true"] == Path(rec["path"]).parent.name and rec["target"] == rec["prediction"]
        assert rec["layer"] == "layer4" and Path(rec["figure"]).is_file()


def test_library_call_leaves_the_model_as_it_was(tiny, tmp_path):
    from imgcls.engine.inference import load_run
    from imgcls.explain import explain_run, panel

    run_dir, data = tiny
    loaded = load_run(run_dir, device="cpu")
    loaded.model.train()
    images = np.stack([np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB")) for p in sorted((data / "test" / "dog").glob("*.png"))])
    rows = {}
    for m in ("gradcam", "scorecam"):
        recs = explain_run(loaded, images, ["dog"] * len(images), method=m, out_dir=tmp_path / m)
        assert len(recs) == len(images) and (tmp_path / m / "explain.json").is_file()
        for r in recs:
            assert r["heatmap"].shape == (32, 32) and 0.0 <= r["heatmap"].min() <= r["heatmap"].max() <= 1.0
            assert r["overlay"].shape == (32, 32, 3) and r["overlay"].dtype == np.uint8
        rows[m] = [r["overlay"] for r in recs]
    assert loaded.model.training and _hooks(loaded.model) == 0
    assert all(p.requires_grad and p.grad is None for p in loaded.model.parameters())
    assert panel(rows, [f"img {i}" for i in range(len(images))], tmp_path / "panel.png").stat().st_size > 0


def test_layer_override_and_bad_layer(tiny):
    from imgcls.engine.inference import load_run
    from imgcls.explain import explain_run

    run_dir, data = tiny
    loaded = load_run(run_dir, device="cpu")
    images = np.zeros((2, 40, 40, 3), np.uint8)  # resized to the run's 32 px
    recs = explain_run(loaded, images, method="gradcam", layer="layer3")
    assert {r["layer"] for r in recs} == {"layer3"}
    with pytest.raises(ImgclsError, match="candidates: .*layer4"):
        explain_run(loaded, images, layer="layer9")
    with pytest.raises(ImgclsError, match="not used by forward_features"):  # the head comes after the map
        explain_run(loaded, images, layer="fc")


def test_target_class_why_not(tiny):
    from imgcls.engine.inference import load_run
    from imgcls.explain import explain_run

    run_dir, data = tiny
    loaded = load_run(run_dir, device="cpu")
    images = np.full((3, 32, 32, 3), 120, np.uint8)
    recs = explain_run(loaded, images, method="layercam", target="fox")
    assert {r["target"] for r in recs} == {"fox"} and all(0 <= r["target_probability"] <= 1 for r in recs)
    with pytest.raises(ImgclsError, match="unknown class 'wolf'"):
        explain_run(loaded, images, target="wolf")


def test_cli_skips_bad_files_and_reports_errors_in_one_line(tiny, tmp_path, capsys):
    run_dir, data = tiny
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    for p in sorted((data / "test" / "cat").glob("*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    r = run_cli("explain", str(run_dir), str(tmp_path / "imgs"), "--method", "eigencam", "--class", "dog",
                "--out", str(out), "--device", "cpu", env={"IMGCLS_QUIET": "0"})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "skipped" in r.stderr and "broken.jpg" in r.stderr
    doc = json.loads((out / "explain.json").read_text())
    assert len(doc["images"]) == 3 and doc["skipped"][0]["path"].endswith("broken.jpg")
    assert {i["target"] for i in doc["images"]} == {"dog"} and doc["target_class"] == "dog"
    assert len(list((out / "eigencam").glob("*.png"))) == 3 and (out / "eigencam_grid.png").is_file()
    from imgcls.cli import main  # in-process: a second interpreter start costs seconds

    assert main(["explain", str(run_dir), str(folder), "--layer", "nope", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("imgcls: error: layer 'nope' does not exist") and "layer4" in err


def test_model_without_a_spatial_map_is_a_clear_error():
    import timm

    from imgcls.explain import resolve_layer

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    with pytest.raises(ImgclsError, match="no spatial feature map"):
        resolve_layer(vit, 32)


def test_deletion_is_lower_for_the_true_evidence():
    """A 'model' that looks only at the top-left quadrant: the map pointing there deletes faster."""
    from imgcls.explain import deletion_insertion

    class TopLeft(nn.Module):
        def forward(self, x):
            s = 20 * (x[:, :, :16, :16].mean((1, 2, 3)) - 0.9)  # blurring the quadrant drops it below 0.9
            return torch.stack([s, -s], 1)

    x = torch.zeros(2, 3, 32, 32)
    x[:, :, :16, :16] = 1.0
    right = np.zeros((2, 32, 32), np.float32)
    right[:, :16, :16] = 1.0
    wrong = 1.0 - right
    d_right, i_right = deletion_insertion(TopLeft(), x, right, [0, 0])
    d_wrong, i_wrong = deletion_insertion(TopLeft(), x, wrong, [0, 0])
    assert (d_right < d_wrong - 0.2).all() and (i_right > i_wrong + 0.2).all()
    assert ((0 <= d_right) & (d_right <= 1) & (0 <= i_right) & (i_right <= 1)).all()
