"""Config round-trip and validation; model knobs and the offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgcls import config as config_mod
from imgcls.config import TrainConfig
from imgcls.errors import ImgclsError
from imgcls.models import build_model, load_weights
from imgcls.models.factory import PACKAGED_WEIGHTS, packaged_imagenet


def test_round_trip(tmp_path):
    cfg = TrainConfig(data="d", exclude_classes=("a", "b"), lr=0.5, tta=True)
    config_mod.dump(cfg, tmp_path / "c.json")
    assert config_mod.load(tmp_path / "c.json") == cfg


def test_precedence_recipe_file_flags_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.1\n")
    cfg = config_mod.resolve(flags={"lr": "0.2", "recipe": "fast-finetune"}, file=f, sets=["batch_size=16"])
    assert cfg.pretrained is True  # from the recipe
    assert cfg.epochs == 7 and cfg.lr == 0.2 and cfg.batch_size == 16


@pytest.mark.parametrize(
    "bad, match",
    [({"colour": 1}, "unknown key"), ({"epochs": "x"}, "integer"), ({"augment": "wild"}, "augment"),
     ({"tta": "maybe"}, "true or false"), ({"dropout": 1.5}, r"\[0, 1\)"), ({"epochs": 0}, "at least 1"),
     ({"low_res": 64}, "set both or neither"), ({"low_res": 96, "low_res_epochs": 2, "img_size": 96}, "below img_size"),
     ({"low_res": 64, "low_res_epochs": 10, "epochs": 10}, "below epochs"), ({"low_res": 4, "low_res_epochs": 1}, "low_res must be")],
)
def test_invalid_values(bad, match):
    with pytest.raises(ImgclsError, match=match):
        config_mod.from_dict({"data": "d", **bad})


def test_set_parses_values_as_data_not_code():
    parsed = config_mod.coerce_dict(config_mod.parse_set(["exclude_classes=[a, b]", "lr=1e-3", "tta=true"]), where="--set")
    assert parsed == {"exclude_classes": ("a", "b"), "lr": 1e-3, "tta": True}
    with pytest.raises(ImgclsError, match="unknown key"):
        config_mod.parse_set(["__import__('os')=1"])


def test_dropout_and_head_size():
    m = build_model("resnet18", num_classes=4, dropout=0.3)
    assert m.get_classifier().out_features == 4 and m.drop_rate == 0.3


def test_weights_file_loads_matching_tensors(tmp_path):
    from safetensors.torch import save_file

    src = build_model("resnet18", num_classes=4)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    dst = build_model("resnet18", num_classes=7, weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert dst.get_classifier().out_features == 7
    with pytest.raises(ImgclsError, match="Fewer than 90 %"):
        load_weights(build_model("efficientnet_lite0", num_classes=2), tmp_path / "w.safetensors")


@pytest.mark.parametrize("name", sorted(PACKAGED_WEIGHTS))
def test_package_weights_name_a_cat(name):
    """Each package's lukemelas-order tensors map in order onto timm's model: a real cat photo is a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(skimage_data.chelsea()).resize((224, 224))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    model = packaged_imagenet(name).eval()
    with torch.inference_mode():
        top3 = model(((x - mean) / std)[None]).softmax(1).topk(3).indices[0].tolist()
    cats = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat", 283: "Persian", 287: "lynx"}
    assert top3[0] in cats and sum(i in cats for i in top3) >= 2, top3


@pytest.mark.parametrize("name", sorted(PACKAGED_WEIGHTS))
def test_pretrained_lite_builds_without_network(name):
    m = build_model(name, num_classes=6, pretrained=True)
    ref = packaged_imagenet(name)
    assert torch.equal(m.conv_stem.weight, ref.conv_stem.weight)
    assert m.get_classifier().out_features == 6
