"""Frozen-stage feature reuse: compute the frozen stages' output once per image, train the rest on it.

When the first stages of a model are frozen (kept in eval mode, no gradients) and the augmentation is a
horizontal flip or nothing, the frozen part maps each training image to one of only two tensors: the
features of the image or of its mirror image. Computing them once, before the first epoch, removes the
frozen part's forward pass (most of the FLOPs of a fine-tune at 150 px) from every later step.

The step is the same computation as without the cache: the flips are drawn from the same generator in
the same way as ``BatchAugment`` (one ``rand(B) < 0.5`` per batch), so a run's random stream, its resume
and its checkpoints do not depend on whether the cache is used.

Shapes: the cache holds ``V*N x C x H x W`` (``V`` = 2 with flip, 1 without; rows ``[N, 2N)`` are the
mirrored images), in the dtype the frozen part produces under the run's precision, channels_last when the
run is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from imgcls.data.augment import to_float
from imgcls.engine.runtime import autocast
from imgcls.models import families

# Above this the cache is not built and training runs the frozen stages every step as usual.
MAX_BYTES = 6 * 2**30
AUGMENTS = ("none", "flip")


def split_forward(model: nn.Module, n_frozen: int) -> tuple[Callable, Callable] | None:
    """``(frozen, rest)`` with ``rest(frozen(x)) == model(x)``, the frozen part being what ``freeze_stages``
    froze (stage 0 is the stem); None when nothing is frozen. Both come from the one family table
    (``models.families``): a family it does not know raises ImgclsError, as ``freeze_stages`` does."""
    if n_frozen <= 0:
        return None
    return families.split(model, n_frozen)


class FrozenFeatureCache:
    """The frozen part's output for every training image (and its mirror image when flipping)."""

    def __init__(self, features: torch.Tensor, n: int, *, flip: bool, dtype: torch.dtype):
        self.features = features  # V*N x C x H x W
        self.n = n
        self.flip = flip
        self.dtype = dtype  # what batches are handed out in (the storage may be narrower)

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        frozen: Callable,
        images,
        *,
        mean: torch.Tensor,
        std: torch.Tensor,
        flip: bool,
        precision: str,
        channels_last: bool,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 128,
        on_batch: Callable[[int], None] | None = None,
        device: torch.device | None = None,
    ) -> FrozenFeatureCache:
        """Run ``frozen`` over ``images`` (``N x S x S x 3`` uint8 ``ImageRows`` or tensor: on the training
        device, or read from the decode cache a batch at a time), and over their mirror images when ``flip``,
        under ``precision``; batches come out in ``dtype``. The frozen modules must already be in eval mode.
        ``device``: where ``frozen`` runs, when ``images`` are in host memory."""
        n, device = len(images), device or images.device
        views = (False, True) if flip else (False,)
        out = None
        for v, mirrored in enumerate(views):
            for start in range(0, n, batch_size):
                x = to_float(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
                if mirrored:
                    x = x.flip(3)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    f = frozen(x)
                if out is None:
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    out = torch.empty((len(views) * n, *f.shape[1:]), dtype=f.dtype, device=device, memory_format=fmt)
                out[v * n + start : v * n + start + len(f)] = f
                if on_batch is not None:
                    on_batch(len(f))
        assert out is not None, "no training images"
        return cls(out, n, flip=flip, dtype=dtype)

    def batch(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Features of the images ``idx``, each mirrored with probability 1/2 (drawn as BatchAugment does)."""
        if self.flip:
            mirrored = torch.rand(len(idx), generator=g, device=idx.device) < 0.5
            idx = idx + mirrored.long() * self.n
        return self.features[idx].to(self.dtype)  # [idx] keeps channels_last, index_select does not

    def all(self) -> torch.Tensor:
        """Every image's features, unflipped, in order (validation)."""
        return self.features[: self.n].to(self.dtype)


@torch.inference_mode()
def predict_rest(rest: Callable, module: nn.Module, features: torch.Tensor, *, precision: str, batch_size: int = 256) -> torch.Tensor:
    """Logits (float32, CPU) of ``rest`` (the part of ``module`` after its frozen stages) over cached features.
    ``module`` is in eval mode for the call and restored afterwards."""
    was_training = module.training
    module.eval()
    out = []
    try:
        for start in range(0, len(features), batch_size):
            with autocast(features.device, precision):
                out.append(rest(features[start : start + batch_size]).float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def estimate_bytes(frozen: Callable, images: torch.Tensor, *, mean, std, flip: bool, precision: str) -> int:
    """Bytes the cache would take, from one image's features."""
    with torch.inference_mode():
        x = to_float(images[:1], mean, std)
        with autocast(images.device, precision):
            f = frozen(x)
    return f.numel() * f.element_size() * len(images) * (2 if flip else 1)


__all__ = ["FrozenFeatureCache", "split_forward", "predict_rest", "estimate_bytes", "AUGMENTS", "MAX_BYTES"]
