"""Augmentation over whole batches, on the training device, with per-image random parameters.

Why by hand: torchvision.transforms.v2 draws one set of random parameters per call, so applied to a
batch every image gets the same flip and angle; calling it per image puts Python in the hot loop (or
needs worker processes that take cores from the model on a laptop). Here flip, rotation and random
resized crop are folded into one affine matrix per image and resampled with a single ``grid_sample``
for the whole batch; colour jitter and erasing are elementwise. ``tests/test_augment.py`` checks the
statistics against the per-image torchvision presets.

Input: ``B x S x S x 3`` uint8 (the cache layout). Output: ``B x 3 x S x S`` float32 in channels_last
memory, normalised with the model's mean/std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PRESETS = ("none", "flip", "flip-rotate", "rrc", "randaugment", "strong")


def to_float(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``B x H x W x 3`` -> normalised float ``B x 3 x H x W`` (channels_last memory, no copy of layout)."""
    # one pass over the batch: x * (1 / (255 std)) - mean / std, the uint8 read and promoted in the kernel
    scale, shift = _norm_coefficients(mean, std)
    return torch.addcmul(shift, x.permute(0, 3, 1, 2), scale)


def _norm_coefficients(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, each ``1 x 3 x 1 x 1``, with ``normalise(x) = x * scale + shift`` for x in [0, 255]."""
    std = std.view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), -mean.view(1, 3, 1, 1) / std


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


class BatchAugment:
    """Callable ``(uint8 batch, generator) -> float batch`` for one preset."""

    def __init__(self, preset: str, *, mean: tuple[float, ...], std: tuple[float, ...], rotate_deg: float = 15.0):
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}")
        self.preset = preset
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.rotate_deg = rotate_deg
        self._randaugment = None
        if preset == "randaugment":
            from torchvision.transforms import v2

            self._randaugment = v2.RandAugment(num_ops=2, magnitude=9)

    def _affine(self, b: int, g: torch.Generator, device: torch.device) -> torch.Tensor | None:
        """Per-image ``2 x 3`` matrices mapping output to input coordinates (affine_grid convention)."""
        flip = torch.where(torch.rand(b, generator=g, device=device) < 0.5, -1.0, 1.0)
        if self.preset == "flip-rotate":
            angle = _uniform(b, -self.rotate_deg, self.rotate_deg, g, device) * (math.pi / 180)
            sx = sy = torch.ones(b, device=device)
            tx = ty = torch.zeros(b, device=device)
        elif self.preset in ("rrc", "strong"):
            # torchvision RandomResizedCrop(scale=(0.25, 1), ratio=(3/4, 4/3)), in normalised coordinates
            area = _uniform(b, 0.25, 1.0, g, device)
            log_r = _uniform(b, math.log(3 / 4), math.log(4 / 3), g, device)
            ratio = torch.exp(log_r)
            sx = torch.sqrt(area * ratio).clamp(max=1.0)
            sy = torch.sqrt(area / ratio).clamp(max=1.0)
            tx = (torch.rand(b, generator=g, device=device) * 2 - 1) * (1 - sx)
            ty = (torch.rand(b, generator=g, device=device) * 2 - 1) * (1 - sy)
            angle = torch.zeros(b, device=device)
        else:
            return None
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([flip * sx * cos, -sy * sin, tx], dim=1),
                torch.stack([flip * sx * sin, sy * cos, ty], dim=1),
            ],
            dim=1,
        )
        return theta

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, device = x.shape[0], x.device
        if self._randaugment is not None:
            # one random op pair per chunk of 8 images: parameters vary across the batch at small cost
            # v2 draws from the global RNG: seed a forked copy from our generator so runs stay reproducible
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = torch.cat([self._randaugment(c) for c in x.permute(0, 3, 1, 2).split(8)]).permute(0, 2, 3, 1)
        mean, std = self.mean.to(device), self.std.to(device)
        if self.preset == "none":
            return to_float(x, mean, std)
        if self.preset in ("flip", "randaugment"):
            # flip the uint8 pixels (W is dim 2 of B x H x W x 3): a quarter of the bytes of a float flip
            flip = torch.rand(b, generator=g, device=device) < 0.5
            return to_float(torch.where(flip.view(b, 1, 1, 1), x.flip(2), x), mean, std)
        theta = self._affine(b, g, device)
        _, h, w, _ = x.shape
        # Resample the raw pixel values, normalise afterwards (both are linear, so the order is free):
        # zeros padding is then black, as torchvision's rotation fill=0. grid_sample reads NCHW float
        # fastest on CPU; the normalisation writes the channels_last result in the same pass.
        pixels = torch.empty((b, 3, h, w), device=device).copy_(x.permute(0, 3, 1, 2))
        grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
        sampled = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        scale, shift = _norm_coefficients(mean, std)
        out = torch.empty((b, 3, h, w), device=device, memory_format=torch.channels_last)
        torch.addcmul(shift, sampled, scale, out=out)
        if self.preset == "strong":
            out = self._jitter_and_erase(out, g)
        return out.contiguous(memory_format=torch.channels_last)

    def _jitter_and_erase(self, out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = out.shape
        device = out.device
        mean, std = self.mean.to(device).view(1, 3, 1, 1), self.std.to(device).view(1, 3, 1, 1)
        img = out * std + mean  # back to [0, 1] for photometric ops
        bright = _uniform(b, 0.7, 1.3, g, device).view(b, 1, 1, 1)
        contrast = _uniform(b, 0.7, 1.3, g, device).view(b, 1, 1, 1)
        sat = _uniform(b, 0.7, 1.3, g, device).view(b, 1, 1, 1)
        img = img * bright
        gray = (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])
        img = (img - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])
        img = ((img - gray) * sat + gray).clamp(0, 1)
        out = (img - mean) / std
        # random erasing (p=0.25, 2-25 % of the area), filled with zeros in normalised space
        erase = torch.rand(b, generator=g, device=device) < 0.25
        area = _uniform(b, 0.02, 0.25, g, device)
        eh = (torch.sqrt(area) * h).long().clamp(1, h)
        ew = (torch.sqrt(area) * w).long().clamp(1, w)
        y0 = (torch.rand(b, generator=g, device=device) * (h - eh + 1)).long()
        x0 = (torch.rand(b, generator=g, device=device) * (w - ew + 1)).long()
        ys = torch.arange(h, device=device).view(1, h, 1)
        xs = torch.arange(w, device=device).view(1, 1, w)
        box = (ys >= y0.view(b, 1, 1)) & (ys < (y0 + eh).view(b, 1, 1)) & (xs >= x0.view(b, 1, 1)) & (xs < (x0 + ew).view(b, 1, 1))
        mask = (box & erase.view(b, 1, 1)).unsqueeze(1)
        return out.masked_fill(mask, 0.0)
