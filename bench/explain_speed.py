"""Explanations per second on the CPU for each CAM method, batched vs one image per call.

ResNet-18 (random init: speed does not depend on the weights) at 150 px on intel-scenes test images when
../shared/datasets/intel-scenes/test exists, else synthetic images. Times the CAM alone and, on one
line, the deletion/insertion faithfulness score. Prints a table and one final JSON line; asserts nothing.

    python bench/explain_speed.py [--size 150] [--n 16] [--n-scorecam 3] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("IMGCLS_QUIET", "1")

from imgcls.data.augment import to_float  # noqa: E402
from imgcls.engine.inference import expand_paths, load_images  # noqa: E402
from imgcls.explain.cam import METHODS, compute_cams, resolve_layer  # noqa: E402
from imgcls.explain.faithfulness import deletion_insertion  # noqa: E402
from imgcls.models import build_model  # noqa: E402
from imgcls.models.factory import data_stats  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "intel-scenes" / "test"


def images(n: int, size: int) -> tuple[torch.Tensor, str]:
    if DATA.is_dir():
        every = expand_paths([str(DATA)])
        paths = every[:: max(1, len(every) // n)][:n]  # spread over the classes
        imgs, _ok, _bad = load_images(paths, size)
        if len(imgs) == n:
            return imgs, "intel-scenes test"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g), "synthetic"


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=150)
    ap.add_argument("--n", type=int, default=16, help="images per method (ScoreCAM: --n-scorecam)")
    ap.add_argument("--n-scorecam", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=6).eval().to(memory_format=torch.channels_last)
    mean, std = data_stats(model)
    imgs, source = images(args.n, args.size)
    x = to_float(imgs, torch.tensor(mean), torch.tensor(std)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()
    layer = resolve_layer(model, args.size)
    compute_cams(model, x[:2], targets[:2], method="gradcam", layer=layer)  # warm-up

    rows = []
    for m in METHODS:
        n = args.n_scorecam if m == "scorecam" else args.n
        xb, tb = x[:n], targets[:n]
        batched = rate(lambda: compute_cams(model, xb, tb, method=m, layer=layer, batch_size=args.batch_size), n)
        single = rate(lambda: [compute_cams(model, xb[i : i + 1], tb[i : i + 1], method=m, layer=layer, batch_size=1) for i in range(n)], n)
        rows.append({"method": m, "images": n, "batched_per_s": batched, "one_by_one_per_s": single, "speedup": batched / single})
    heat = compute_cams(model, x, targets, method="gradcam", layer=layer, batch_size=args.batch_size)
    faith = rate(lambda: deletion_insertion(model, x, heat, targets, batch_size=args.batch_size), len(x))

    print(f"resnet18 @ {args.size}px, {source} images, {torch.get_num_threads()} CPU threads, "
          f"batch {args.batch_size}, layer {layer.name}")
    print(f"{'method':<10} {'images':>6} {'batched/s':>10} {'1-by-1/s':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['method']:<10} {r['images']:>6} {r['batched_per_s']:>10.2f} {r['one_by_one_per_s']:>10.2f} {r['speedup']:>7.2f}x")
    print(f"faithfulness (deletion+insertion, 10 steps, batched): {faith:.2f} images/s")
    print(json.dumps({
        "bench": "explain_speed", "model": "resnet18", "img_size": args.size, "source": source,
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "layer": layer.name,
        "methods": {r["method"]: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != "method"} for r in rows},
        "faithfulness_per_s": round(faith, 3),
    }))


if __name__ == "__main__":
    main()
