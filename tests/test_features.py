"""Frozen-stage feature reuse: same model function, same training, exact resume."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import imgcls.engine.train as train_mod
from imgcls.config import TrainConfig
from imgcls.engine import checkpoint as ckpt
from imgcls.engine import features as feat_mod
from imgcls.engine.train import Interrupted, train
from imgcls.models import build_model, freeze_stages


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
        augment="flip", freeze=3, ema=0.9, lr=3e-3,
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
    monkeypatch.setattr(train_mod, "inference_model", lambda model, *a, **kw: model)
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

    @contextmanager
    def stop_soon():
        class Flag(dict):
            n = 7

            def __getitem__(self, key):
                Flag.n -= 1
                return 15 if Flag.n < 0 else None  # SIGTERM

        yield Flag(signum=None)

    monkeypatch.setattr(train_mod, "stop_on_signals", stop_soon)
    with pytest.raises(Interrupted):
        train(cfg, run_dir=tmp_path / "resumed")
    monkeypatch.undo()
    train(cfg, run_dir=tmp_path / "resumed", resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_no_cache_for_augmentations_that_move_pixels_or_without_frozen_stages():
    model = build_model("resnet18", num_classes=3)
    freeze_stages(model, 2)
    assert feat_mod.split_forward(model, 0) is None
    assert "flip-rotate" not in feat_mod.AUGMENTS and "rrc" not in feat_mod.AUGMENTS
