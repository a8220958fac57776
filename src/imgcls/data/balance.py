"""Class imbalance: how large it is, and the two ways training can compensate for it.

- ``balanced_order``: an epoch order that draws every class equally often (small classes repeat, large
  ones are subsampled), over the decoded set, as a pure function of (seed, epoch) like the plain order,
  so resume needs no sampler state.
- ``class_weights``: loss weights from the effective number of samples (Cui et al., CVPR 2019).

The choice between them is the config key ``balance`` (none | sampler | weights).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

WARN_RATIO = 3.0  # above this max/min class ratio the report warns


def imbalance(counts: Mapping[str, int], *, smallest: int = 3) -> dict:
    """``{"counts", "ratio", "smallest", "warning"}`` for class counts (of the training split)."""
    nonzero = {c: int(n) for c, n in counts.items() if n > 0}
    if not nonzero:
        return {"counts": dict(counts), "ratio": 1.0, "smallest": [], "warning": False}
    ratio = max(nonzero.values()) / min(nonzero.values())
    low = sorted(nonzero.items(), key=lambda kv: (kv[1], kv[0]))[:smallest]
    return {
        "counts": {c: int(n) for c, n in counts.items()},
        "ratio": round(ratio, 3),
        "smallest": [{"class": c, "count": n} for c, n in low],
        "warning": ratio > WARN_RATIO,
    }


def balanced_order(labels: torch.Tensor, *, seed: int, epoch: int) -> torch.Tensor:
    """A length-N epoch order (N = len(labels)) in which each class fills ~N/C places.

    Within a class the indices come from successive permutations of its members (no image repeats before
    every image of its class has been drawn), then the whole order is shuffled. ``labels`` is 1-D int64.
    """
    n = len(labels)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)  # apart from the plain order's stream
    classes = torch.unique(labels)
    k = len(classes)
    share = [n // k + (1 if i < n % k else 0) for i in range(k)]
    parts = []
    for c, want in zip(classes.tolist(), share):
        members = (labels == c).nonzero().flatten()
        reps = -(-want // len(members))  # ceil
        draws = torch.cat([members[torch.randperm(len(members), generator=g)] for _ in range(reps)])
        parts.append(draws[:want])
    order = torch.cat(parts)
    return order[torch.randperm(n, generator=g)]


def class_weights(counts: list[int], *, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights ``(1 - beta) / (1 - beta ** n_c)``, scaled so that the weighted mean over the
    training samples is 1 (the loss, and so the learning rate, keep their scale).

    beta = 0.999 (the paper's choice for long-tailed sets of this size): for classes of a few to a few
    hundred images this is close to inverse frequency; for thousands it flattens, so one huge class does not
    shrink every other weight toward zero. beta -> 1 is exactly inverse frequency.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if (n <= 0).any():
        raise ValueError("class_weights needs a positive count for every class")
    w = (1.0 - beta) / (1.0 - beta**n) if beta < 1.0 else 1.0 / n
    w = w * n.sum() / (w * n).sum()
    return w.float()


__all__ = ["WARN_RATIO", "imbalance", "balanced_order", "class_weights"]
