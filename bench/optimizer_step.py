"""The optimizer's kernels in a whole training step: torch's default (a loop over the parameter tensors on a
CPU) against the fused kernel imgcls asks for (``engine/train.py: fused_kernels``), in one process.

Each step is what ``imgcls train`` runs: forward and backward under bf16 autocast (fp32 with ``--precision
fp32``), channels_last, cross-entropy with label smoothing 0.1, then the optimizer step, on batches held in
memory (the data path is not on the clock). Both optimizers are built by timm's ``create_optimizer_v2`` with
imgcls' arguments; they train two copies of the same model from the same weights, in alternating chunks of
steps, and the figure per side is the median over chunks. The optimizer step alone is timed too.

    .venv/bin/python bench/optimizer_step.py                        # resnet18 at 96 px, batch 64 and 32, Adam
    .venv/bin/python bench/optimizer_step.py --opt sgd --threads 1 --batch 64

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import timm
import timm.optim
import torch
from torch import nn


def make(model: nn.Module, opt: str, fused: bool) -> torch.optim.Optimizer:
    name = "momentum" if opt == "sgd" else opt  # imgcls' sgd with momentum 0.9
    return timm.optim.create_optimizer_v2(model, opt=name, lr=1e-3, weight_decay=0.0, momentum=0.9,
                                          **({"fused": True} if fused else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--batch", default="64,32", help="batch sizes, comma-separated")
    ap.add_argument("--opt", default="adam", choices=("adam", "adamw", "sgd"))
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="steps per chunk")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=6).to(memory_format=torch.channels_last)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    results = []
    for batch in (int(b) for b in args.batch.split(",")):
        x = torch.randn(batch, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 6, (batch,))
        sides = {}
        for fused in (False, True):
            model = copy.deepcopy(base).train()
            sides["fused" if fused else "default"] = (model, make(model, args.opt, fused))

        def step(model, opt) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = loss_fn(model(x), y)
            loss.backward()
            t = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        for model, opt in sides.values():  # warm-up: first-touch of the optimizer state, oneDNN kernels
            for _ in range(2):
                step(model, opt)
        rates = {k: [] for k in sides}
        opt_ms = {k: [] for k in sides}
        for _ in range(args.chunks):
            for name, (model, opt) in sides.items():
                t0 = time.perf_counter()
                in_opt = sum(step(model, opt) for _ in range(args.steps))
                wall = time.perf_counter() - t0
                rates[name].append(batch * args.steps / wall)
                opt_ms[name].append(in_opt / args.steps * 1000)
        row = {"batch": batch, **{f"{k}_img_per_s": round(statistics.median(v), 1) for k, v in rates.items()},
               **{f"{k}_opt_ms": round(statistics.median(v), 1) for k, v in opt_ms.items()}}
        row["speedup"] = round(row["fused_img_per_s"] / row["default_img_per_s"], 3)
        results.append(row)
        print(f"{args.model} {args.img_size} px, batch {batch}, {args.opt}, {args.precision}, {torch.get_num_threads()} thread(s): "
              f"default {row['default_img_per_s']:.1f} img/s (step {row['default_opt_ms']:.1f} ms), "
              f"fused {row['fused_img_per_s']:.1f} img/s (step {row['fused_opt_ms']:.1f} ms): {row['speedup']:.2f}x", flush=True)
    print(json.dumps({"bench": "optimizer_step", "model": args.model, "img_size": args.img_size, "opt": args.opt,
                      "precision": args.precision, "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
