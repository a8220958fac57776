"""Batched augmentation matches the per-image torchvision presets in distribution."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from imgcls.data.augment import BatchAugment, to_float

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(size=32) -> torch.Tensor:
    """An asymmetric uint8 picture (H x W x 3): a diagonal ramp plus a bright block off-centre."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], dim=-1)
    img[4:12, 18:28] = 255
    return img.to(torch.uint8)


def _ours(preset: str, n: int) -> torch.Tensor:
    batch = _image()[None].repeat(n, 1, 1, 1)
    out = BatchAugment(preset, mean=MEAN, std=STD)(batch, torch.Generator().manual_seed(0))
    return out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)  # back to [0, 1]


def _reference(transform, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    chw = _image().permute(2, 0, 1)
    return torch.stack([transform(chw) for _ in range(n)]).float() / 255


@pytest.mark.parametrize(
    "preset, reference, tol",
    [
        ("flip", v2.RandomHorizontalFlip(), 0.03),
        ("flip-rotate", v2.Compose([v2.RandomHorizontalFlip(), v2.RandomRotation(15)]), 0.04),
        ("rrc", v2.Compose([v2.RandomResizedCrop(32, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]), 0.06),
    ],
)
def test_statistics_match_per_image_presets(preset, reference, tol):
    n = 1500
    ours, ref = _ours(preset, n), _reference(reference, n)
    assert ours.shape == ref.shape
    assert (ours.mean(0) - ref.mean(0)).abs().mean() < tol  # the average picture
    assert (ours.std(0) - ref.std(0)).abs().mean() < tol * 1.5  # how much pixels vary across draws
    # per-image parameters: the batch is not one repeated draw
    assert ours.std(0).mean() > 0.02


def test_layout_dtype_and_determinism():
    batch = _image()[None].repeat(8, 1, 1, 1)
    aug = BatchAugment("strong", mean=MEAN, std=STD)
    a = aug(batch, torch.Generator().manual_seed(3))
    b = aug(batch, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and a.shape == (8, 3, 32, 32)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
    none = BatchAugment("none", mean=MEAN, std=STD)(batch, torch.Generator())
    assert torch.allclose(none, to_float(batch, torch.tensor(MEAN), torch.tensor(STD)))


def test_randaugment_runs_and_keeps_global_rng():
    batch = _image()[None].repeat(16, 1, 1, 1)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    out = BatchAugment("randaugment", mean=MEAN, std=STD)(batch, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 32, 32) and torch.isfinite(out).all()
    assert torch.equal(torch.get_rng_state(), before)
