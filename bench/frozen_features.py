"""Forward-only speed: the frozen-stage feature build and whole-model inference, before and after folding.

For each model, two forward passes over the same input, alternated in chunks and compared by median:
- ``plain``: the model as trained (batch norm as its own pass), bf16 autocast, channels_last, 128 images
  per batch (the plain path);
- ``folded``: ``models.fold.folded_copy`` (batch norm folded into the conv before it), same precision and
  layout, ``runtime.inference_batch`` images per batch (16 on a CPU).
Rows: EfficientNet-Lite0's stem + blocks 0-4 (the fast-finetune recipe's frozen part) and the whole
Lite0, ResNet-18 and ResNet-50, at 150 px. Random weights with random norm statistics: speed does not
depend on their values.

    .venv/bin/python bench/frozen_features.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from imgcls.engine import features as feat_mod
from imgcls.engine.runtime import autocast, inference_batch
from imgcls.models import build_model
from imgcls.models.fold import folded_copy

ROWS = (  # (label, model, frozen stages or 0 for the whole model)
    ("lite0 stem+blocks0-4", "efficientnet_lite0", 6),
    ("lite0 whole", "efficientnet_lite0", 0),
    ("resnet18 whole", "resnet18", 0),
    ("resnet50 whole", "resnet50", 0),
)


def rate(fn, batch: int, size: int, seconds: float) -> float:
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(x.device, "bf16"):
        fn(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(x)
            n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=150)
    p.add_argument("--seconds", type=float, default=3.0, help="per chunk")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    small = inference_batch(torch.device("cpu"))
    results = []
    print(f"{'forward pass':<22} {'plain@128 img/s':>16} {f'folded@{small} img/s':>18} {'ratio':>7}")
    for label, name, n_frozen in ROWS:
        model = build_model(name, num_classes=6).eval().to(memory_format=torch.channels_last)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
        fast = folded_copy(model, torch.randn(2, 3, args.size, args.size))
        assert fast is not None, f"{name}: no folded copy"
        if n_frozen:
            plain_fn, fast_fn = feat_mod.split_forward(model, n_frozen)[0], feat_mod.split_forward(fast, n_frozen)[0]
        else:
            plain_fn, fast_fn = model, fast
        a, b = [], []
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both
            a.append(rate(plain_fn, 128, args.size, args.seconds))
            b.append(rate(fast_fn, small, args.size, args.seconds))
        pa, pb = statistics.median(a), statistics.median(b)
        results.append({"pass": label, "plain_img_s": round(pa, 1), "folded_img_s": round(pb, 1), "ratio": round(pb / pa, 3)})
        print(f"{label:<22} {pa:>16.0f} {pb:>18.0f} {pb / pa:>6.2f}x", flush=True)
    print(json.dumps({"bench": "frozen_features", "size": args.size, "folded_batch": small, "rows": results}))


if __name__ == "__main__":
    main()
