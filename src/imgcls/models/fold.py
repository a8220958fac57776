"""Inference copies with batch norm folded into the convolution before it.

In eval mode a batch norm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one convolution
with scaled weights and a bias. Folding removes a full read and write of every activation map, which on
a CPU is memory-bound work: on the 2-core machine EfficientNet-Lite0's stem + blocks 0-4 at 150 px ran
1.5x faster folded at the same batch size, 2.8x with the 16-image batches imgcls uses for forward-only
work on a CPU (bench/frozen_features.py). PyTorch offers this only for FX graphs of plain
``Conv2d``/``BatchNorm2d`` pairs (``torch.fx.experimental.optimization.fuse``); timm's ``BatchNormAct2d``
carries its activation inside and is not matched there, hence this module.

A conv/norm pair is folded when, inside one parent module, a ``Conv2d`` is registered directly before a
``BatchNorm2d`` (timm's ``BatchNormAct2d`` included) over its output channels: the order timm's blocks
(EfficientNet, MobileNet, ResNet) and ``nn.Sequential`` use. Registration order is not forward order in
general, so ``folded_copy`` checks the copy against the original on a probe batch and returns None when
they disagree: the caller then keeps the original. That check runs in true fp32: with TF32 on (imgcls turns
it on for training on a GPU, and cuDNN convolutions use it by default) each convolution rounds its inputs to
10 mantissa bits, a relative error near 1e-3 per layer that would reject sound folds.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
    fused = copy.copy(conv)  # keeps the class: timm's same-padding convs subclass Conv2d with their own forward
    fused._parameters = dict(conv._parameters)
    fused.weight = nn.Parameter(conv.weight.detach() * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    bias = conv.bias.detach() * scale if conv.bias is not None else 0.0
    fused.bias = nn.Parameter(bias + shift, requires_grad=False)
    return fused


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of a norm layer once its affine map is folded away: timm's drop + activation, if any."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold, in place, every adjacent (conv, norm) child pair of every module; the number folded."""
    folded = 0
    for parent in list(model.modules()):
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.running_mean is not None
                and bn.num_features == conv.out_channels
            ):
                parent._modules[a] = _fold_pair(conv, bn)
                parent._modules[b] = _after_norm(bn)
                folded += 1
    return folded


@contextmanager
def exact_fp32():
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block, the previous settings restored.
    (The same legacy flags ``runtime.setup`` sets: mixing them with the newer ``fp32_precision`` API makes
    torch refuse to read them back.)"""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


@torch.no_grad()
def folded_copy(model: nn.Module, probe: torch.Tensor, *, rtol: float = 1e-3) -> nn.Module | None:
    """An eval-mode copy of ``model`` with its batch norms folded, or None when nothing folds or the copy's
    output on ``probe`` (a small batch of normalised inputs) differs from the original's by more than
    ``rtol`` of its scale (both computed in fp32 without TF32). ``model`` itself is not changed (each submodule's train/eval mode is restored)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return None  # nothing to fold (already folded, or norm none): no copy made
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        fast = copy.deepcopy(model).eval()
        if fold_batchnorm_(fast) == 0:
            return None
        probe = probe.float()
        with exact_fp32():
            want, got = model(probe).float(), fast(probe).float()
        if want.shape != got.shape or (want - got).abs().max() > rtol * (want.abs().max() + 1e-6):
            return None
        return fast
    finally:
        for m, training in modes:
            m.training = training


__all__ = ["exact_fp32", "fold_batchnorm_", "folded_copy"]
