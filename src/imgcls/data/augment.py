"""Augmentation over whole batches, on the training device, with per-image random parameters.

Why by hand: torchvision.transforms.v2 draws one set of random parameters per call, so applied to a
batch every image gets the same flip and angle; calling it per image puts Python in the hot loop (or
needs worker processes that take cores from the model on a laptop). Here flip, rotation and random
resized crop are folded into one affine matrix per image and resampled with a single ``grid_sample``
for the whole batch; colour jitter and erasing are elementwise. ``tests/test_augment.py`` checks the
statistics against the per-image torchvision presets.

Input: ``B x S x S x 3`` uint8 (the cache layout). Output: ``B x 3 x S x S`` float32 in channels_last
memory, normalised with the model's mean/std.

On a GPU the step must neither stall nor disturb other random streams: every random draw names the
device of the batch and uses the run's augmentation generator (which lives on that device; a draw without
``device=`` lands on the CPU, which a CUDA generator refuses), the normalisation constants are device
tensors made once in the constructor, and nothing reads a device value back to the host.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

PRESETS = ("none", "flip", "flip-rotate", "rrc", "randaugment", "strong")


def to_float(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``B x H x W x 3`` -> normalised float ``B x 3 x H x W`` (channels_last memory, no copy of layout)."""
    return _normalise(x, *_norm_coefficients(mean, std))


def _normalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # one pass over the batch: x * (1 / (255 std)) - mean / std, the uint8 read and promoted in the kernel
    return torch.addcmul(shift, x.permute(0, 3, 1, 2), scale)


def _norm_coefficients(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, each ``1 x 3 x 1 x 1``, with ``normalise(x) = x * scale + shift`` for x in [0, 255]."""
    std = std.view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), -mean.view(1, 3, 1, 1) / std


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def host_seed(g: torch.Generator) -> int:
    """A seed for choices made on the host (which RandAugment op to run), taken from ``g``'s state.

    Drawing it from ``g`` would need a device-to-host copy (a sync) when ``g`` is a CUDA generator; its
    state, though, is host memory (Philox seed and offset on CUDA, the Mersenne Twister on a CPU). The
    state advances with every draw from ``g``, and a resumed run restores it, so the choices replay."""
    digest = hashlib.blake2b(g.get_state().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchAugment:
    """Callable ``(uint8 batch, generator) -> float batch`` for one preset, for batches on ``device``
    (where its constants live) drawn with a generator on that device."""

    def __init__(
        self, preset: str, *, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str,
        rotate_deg: float = 15.0,
    ):
        # device has no default: a caller that forgot it would fail on the first GPU batch, not in a CPU test
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}")
        self.preset = preset
        # made once, on the device: a .to(device) per step is a host-to-device copy per step on a GPU
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = _norm_coefficients(self.mean, self.std)
        self.device = self.mean.device  # with the index filled in ("cuda" -> "cuda:0")
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
        if device != self.device or g.device != device:
            raise ValueError(
                f"BatchAugment holds its constants on {self.device}; the batch is on {device} and the generator on "
                f"{g.device}: all three must agree (build it with device=..., the generator with torch.Generator(device=...))"
            )
        if self._randaugment is not None:
            # One random op pair per chunk of 8 images: parameters vary across the batch at small cost.
            # v2 chooses ops from the process's CPU generator: run it on a forked copy of that generator,
            # seeded from ours, so runs replay and the process's own streams (CPU and CUDA) stay untouched.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(host_seed(g))
                x = torch.cat([self._randaugment(c) for c in x.permute(0, 3, 1, 2).split(8)]).permute(0, 2, 3, 1)
        if self.preset == "none":
            return _normalise(x, self.scale, self.shift)
        if self.preset in ("flip", "randaugment"):
            # flip the uint8 pixels (W is dim 2 of B x H x W x 3): a quarter of the bytes of a float flip
            flip = torch.rand(b, generator=g, device=device) < 0.5
            return _normalise(torch.where(flip.view(b, 1, 1, 1), x.flip(2), x), self.scale, self.shift)
        theta = self._affine(b, g, device)
        _, h, w, _ = x.shape
        # Resample the raw pixel values, normalise afterwards (both are linear, so the order is free):
        # zeros padding is then black, as torchvision's rotation fill=0. grid_sample reads NCHW float
        # fastest on CPU; the normalisation writes the channels_last result in the same pass.
        pixels = torch.empty((b, 3, h, w), device=device).copy_(x.permute(0, 3, 1, 2))
        grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
        sampled = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = torch.empty((b, 3, h, w), device=device, memory_format=torch.channels_last)
        torch.addcmul(self.shift, sampled, self.scale, out=out)
        if self.preset == "strong":
            out = self._jitter_and_erase(out, g)
        return out.contiguous(memory_format=torch.channels_last)

    def _jitter_and_erase(self, out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = out.shape
        device = out.device
        mean, std = self.mean, self.std
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
