"""Whether a run that started on one thread speeds up when it is given more while it trains.

``imgcls study --jobs N`` starts each run with its share of the cores in ``OMP_NUM_THREADS``; once no run is
left to start, an ended run's cores go to the ones still running, which call ``torch.set_num_threads`` between
steps (``engine/runtime.py: CoreShare``). This times the same training step (ResNet-18-D at 96 px, batch 32,
bf16 autocast, channels_last, fused Adam: the laptop study's base) in one process: on 1 thread, then after
``torch.set_num_threads(N)``, then back on 1 thread, alternating chunks; the figure per side is the median.
Batches are held in memory (the data path is not on the clock). Start it with ``OMP_NUM_THREADS=1``, as the
study starts a run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/threads_midrun.py            # 1 -> all cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/threads_midrun.py --threads 2

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import timm
import timm.optim
import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18d")
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads given mid-run")
    ap.add_argument("--steps", type=int, default=10, help="steps per chunk")
    ap.add_argument("--chunks", type=int, default=3, help="chunks per side")
    args = ap.parse_args()
    start = torch.get_num_threads()
    if start == args.threads:
        ap.error(f"the run starts on {start} thread(s) already: start it with OMP_NUM_THREADS=1, or pass another --threads")
    model = timm.create_model(args.model, num_classes=6).to(memory_format=torch.channels_last)
    opt = timm.optim.create_optimizer_v2(model, opt="adam", lr=1e-3, weight_decay=0.0, fused=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (args.batch,), generator=g)

    def chunk() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return args.steps * args.batch / (time.perf_counter() - t0)

    chunk()  # warm-up: oneDNN picks its kernels
    speeds: dict[int, list[float]] = {start: [], args.threads: []}
    for _ in range(args.chunks):
        for n in (start, args.threads):
            torch.set_num_threads(n)
            chunk()  # one chunk to settle at the new count
            speeds[n].append(chunk())
    one, more = statistics.median(speeds[start]), statistics.median(speeds[args.threads])
    print(f"{args.model} at {args.img_size} px, batch {args.batch}: {one:.0f} img/s on {start} thread(s), "
          f"{more:.0f} img/s after set_num_threads({args.threads}): {more / one:.2f}x")
    print(json.dumps({"bench": "threads_midrun", "model": args.model, "img_size": args.img_size, "batch": args.batch,
                      "start_threads": start, "threads": args.threads, "img_per_s_start": round(one, 1),
                      "img_per_s_after": round(more, 1), "ratio": round(more / one, 3)}))


if __name__ == "__main__":
    main()
