"""Deletion and insertion AUC (Petsiuk et al., RISE, 2018), batched.

Deletion: replace the most salient pixels first, in ``steps`` equal steps, with a heavily blurred copy
of the image, and follow the target class's probability; a faithful map makes it fall fast, so a
*lower* deletion AUC is better. Insertion: start from the blurred copy and put the original pixels back,
most salient first; *higher* is better. The area is the trapezoid rule over the removed fraction 0..1,
so both lie in [0, 1]. One baseline (the blur) for both keeps the two curves mirror experiments.
pytorch-grad-cam's ROAD metrics solve a sparse system per image and threshold, too slow for folders.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

METRIC = (
    "deletion/insertion AUC (RISE): target-class probability as the most salient pixels are replaced "
    "by a Gaussian-blurred copy (deletion; lower = more faithful) or restored onto it (insertion; "
    "higher = more faithful), {steps} steps, trapezoid area over the fraction 0..1"
)


def blurred(x: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with sigma = 1/10 of the side: keeps colours, removes shapes and texture."""
    from torchvision.transforms.v2.functional import gaussian_blur

    side = min(x.shape[-2:])
    sigma = max(side / 10.0, 1.0)
    k = min(2 * int(3 * sigma) + 1, 2 * side - 1)  # reflect padding needs k // 2 < side
    return gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


@torch.no_grad()
def _target_probs(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size]).float()
        out.append(logits.softmax(1).gather(1, targets[start : start + batch_size, None]).squeeze(1))
    return torch.cat(out)


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    heatmaps: np.ndarray,
    targets: list[int],
    *,
    steps: int = 10,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(deletion AUC, insertion AUC) per image for float input ``x`` (``N x 3 x H x W``) and
    ``N x H x W`` saliency ``heatmaps``. The model must be in eval mode."""
    n, _, h, w = x.shape
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    device = x.device
    t = torch.as_tensor(list(targets), device=device, dtype=torch.long)
    base = blurred(x)
    heat = torch.from_numpy(np.ascontiguousarray(heatmaps)).to(device).reshape(n, h * w).float()
    # ties (flat maps, 1 x 1 feature maps upsampled) broken at random, with a fixed seed, not in raster order
    g = torch.Generator().manual_seed(0)
    heat = heat + 1e-6 * torch.rand(heat.shape, generator=g).to(device)
    rank = heat.argsort(1, descending=True).argsort(1).reshape(n, 1, h, w)  # 0 = most salient pixel
    # inner steps only: step 0 / steps of deletion are the image / the baseline, and insertion mirrors them
    counts = [round(k * h * w / steps) for k in range(1, steps)]
    p_full = _target_probs(model, x, t, batch_size)
    p_base = _target_probs(model, base, t, batch_size)
    dele, ins = [p_full], [p_base]
    for c in counts:
        m = rank < c  # N x 1 x H x W: the c most salient pixels
        dele.append(_target_probs(model, torch.where(m, base, x), t, batch_size))
        ins.append(_target_probs(model, torch.where(m, x, base), t, batch_size))
    dele.append(p_base)
    ins.append(p_full)
    dc, ic = torch.stack(dele, 1).cpu().numpy(), torch.stack(ins, 1).cpu().numpy()  # N x (steps + 1)
    frac = np.linspace(0.0, 1.0, steps + 1)
    return np.trapezoid(dc, frac, axis=1).astype(np.float32), np.trapezoid(ic, frac, axis=1).astype(np.float32)
