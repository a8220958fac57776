"""The family table: freezing, the frozen/rest split and the CAM layer agree for every family it lists."""

from __future__ import annotations

import pytest
import torch

from imgcls.engine.features import split_forward
from imgcls.errors import ImgclsError
from imgcls.explain.cam import resolve_layer
from imgcls.models import build_model, freeze_stages
from imgcls.models.families import FAMILIES, family_of

SMALL = {  # one small member of each family in the table, no pretrained weights
    "resnet": "resnet10t",
    "efficientnet": "efficientnet_lite0",
    "mobilenetv3": "mobilenetv3_small_050",
    "convnext": "convnext_atto",
    "regnet": "regnetx_002",
}


def test_every_family_has_a_test_model():
    assert set(SMALL) == {f.name for f in FAMILIES}


def _executed_params(fn, model, x) -> set[int]:
    """ids of the parameters of every module that ran inside ``fn(x)``."""
    seen: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.update(id(p) for p in mod.parameters(recurse=False)))
             for m in model.modules()]
    try:
        fn(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("family", sorted(SMALL))
def test_freeze_and_split_agree(family):
    torch.manual_seed(0)
    model = build_model(SMALL[family], num_classes=3).eval()
    assert family_of(model).name == family
    x = torch.randn(2, 3, 64, 64)
    n_stages = 1 + len(family_of(model).stage_modules(model))
    with torch.no_grad():
        full = model(x)
        for n in range(1, n_stages + 1):
            frozen, rest = split_forward(model, n)
            torch.testing.assert_close(rest(frozen(x)), full, rtol=1e-4, atol=1e-5)
            for p in model.parameters():
                p.requires_grad_(True)
            freeze_stages(model, n)
            # exactly the parameters the frozen part runs are frozen, and the rest trains
            assert {id(p) for p in model.parameters() if not p.requires_grad} == _executed_params(frozen, model, x)
    with pytest.raises(ImgclsError, match=f"has {n_stages} stages"):
        freeze_stages(model, n_stages + 1)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_cam_layer_outputs_the_feature_map(family):
    model = build_model(SMALL[family], num_classes=3).eval()
    layer = resolve_layer(model, 64)
    out = []
    h = layer.module.register_forward_hook(lambda m, i, o: out.append(o))
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 64, 64))
    h.remove()
    torch.testing.assert_close(out[-1], feats)


def test_a_family_outside_the_table_is_a_clear_error():
    model = build_model("vit_tiny_patch16_224", num_classes=3)
    with pytest.raises(ImgclsError, match="not supported for VisionTransformer.*supported families: resnet"):
        freeze_stages(model, 2)
    with pytest.raises(ImgclsError, match="not supported"):
        split_forward(model, 2)
    assert split_forward(model, 0) is None  # nothing frozen: any model trains
