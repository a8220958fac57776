"""Frozen-stage feature reuse: same model function, same training, exact resume."""

from __future__ import annotations

import pytest
import torch

from imgcls.config import TrainConfig
from imgcls.data import prepare
from imgcls.engine import batches as batches_mod
from imgcls.engine import checkpoint as ckpt
from imgcls.engine import features as feat_mod
from imgcls.engine.runtime import Runtime
from imgcls.engine.train import Run, train
from imgcls.errors import Interrupted
from imgcls.models import build_model
from test_train import sigterm_after_step


@pytest.mark.parametrize("name,stages", [("resnet18", range(1, 6)), ("efficientnet_lite0", range(1, 9))])
def test_split_forward_composes_to_the_model(name, stages):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for n in stages:
            frozen, rest = feat_mod.split_forward(model, n)
            torch.testing.assert_close(rest(frozen(x)), full, rtol=1e-4, atol=1e-5)


def _cfg(data, **kw) -> TrainConfig:
    base = dict(
        data=str(data), model="resnet18", img_size=32, epochs=2, batch_size=8, precision="fp32",
        augment="flip", freeze=3, ema=0.9, lr=3e-3, tensorboard=False,
    )
    return TrainConfig(**(base | kw))


def _weights(run_dir):
    tensors, _ = ckpt.load(run_dir / "checkpoints" / "last.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "rng."))}


def test_cached_features_train_like_the_frozen_stages(split_root, tmp_path, monkeypatch):
    built = []
    real_build = feat_mod.FrozenFeatureCache.build

    def spy(*a, **kw):
        built.append(1)
        return real_build(*a, **kw)

    monkeypatch.setattr(feat_mod.FrozenFeatureCache, "build", spy)
    # the frozen stages as they are, not batch-norm-folded (algebraically equal, not bit-equal; folding has
    # its own tests): so the cached run differs from the plain one by summation order alone
    monkeypatch.setattr(batches_mod, "inference_model", lambda model, *a, **kw: model)
    train(_cfg(split_root), run_dir=tmp_path / "cached")
    assert built, "the feature cache was not used"
    monkeypatch.setattr(feat_mod, "split_forward", lambda model, n: None)
    train(_cfg(split_root), run_dir=tmp_path / "plain")
    a, b = _weights(tmp_path / "cached"), _weights(tmp_path / "plain")
    assert a.keys() == b.keys()
    for k in a:  # same flips, same order: equal up to float summation order
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4, msg=k)


def test_resume_with_cached_features_is_exact(split_root, tmp_path, monkeypatch):
    cfg = _cfg(split_root)
    train(cfg, run_dir=tmp_path / "straight")
    sigterm_after_step(monkeypatch, 8)  # a real SIGTERM inside epoch 2 (6 steps per epoch)
    with pytest.raises(Interrupted, match="in epoch 2"):
        train(cfg, run_dir=tmp_path / "resumed")
    monkeypatch.undo()
    train(cfg, run_dir=tmp_path / "resumed", resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("augment,freeze,cached", [("flip", 3, True), ("none", 2, True), ("flip-rotate", 3, False),
                                                     ("rrc", 3, False), ("flip", 0, False)])
def test_the_cache_is_used_only_for_frozen_stages_under_flip_or_no_augmentation(split_root, augment, freeze, cached):
    """Rotations and crops move pixels, so the frozen stages' output differs every step: no cache there."""
    cfg = _cfg(split_root, augment=augment, freeze=freeze)
    data = prepare(cfg)
    run = Run.build(cfg, data, Runtime(device=torch.device("cpu")))
    batches, validate = run.batches(data)
    assert (batches.features is not None) == cached
    assert (validate.features is not None) == cached
    idx = torch.arange(4)
    x, y, net = batches.get(idx, idx, run.state.aug_gen)
    assert net(x).shape == (4, len(data.classes)) and torch.equal(y, data.train.labels[:4])
