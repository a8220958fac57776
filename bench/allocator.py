"""Training step speed with glibc's default malloc vs ``runtime.keep_freed_memory`` (what imgcls sets).

malloc settings are per process, so each measurement is a child process of this script: default and
kept, alternating, ``--rounds`` times per model, medians compared. The step is a plain timm training step
(AdamW) on a batch from ``BatchAugment('flip-rotate')``, batch 64 at 150 px, channels_last, in the
precision imgcls picks for the model on this CPU (ResNet-18: bf16, EfficientNet-Lite0: fp32). Also
printed: the system time and minor page faults per child, which is where the difference comes from.

    .venv/bin/python bench/allocator.py [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = {"resnet18": "bf16", "efficientnet_lite0": "fp32"}


def child(name: str, precision: str, seconds: float, keep: bool) -> dict:
    import timm
    import torch

    from imgcls.data.augment import BatchAugment
    from imgcls.engine.runtime import autocast, keep_freed_memory

    tuned = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=6).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randint(0, 256, (64, 150, 150, 3), dtype=torch.uint8)
    labels = torch.randint(0, 6, (64,))
    augment = BatchAugment("flip-rotate", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu")
    g = torch.Generator().manual_seed(0)

    def step():
        with autocast(torch.device("cpu"), precision):
            loss = torch.nn.functional.cross_entropy(model(augment(images, g)).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    r0, t0, n = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        n += 64
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"img_s": n / dt, "sys_s": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt,
            "max_rss_gb": r1.ru_maxrss / 2**20, "tuned": tuned}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per child")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--child", nargs=3, metavar=("MODEL", "PRECISION", "KEEP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, precision, keep = args.child
        print(json.dumps(child(name, precision, args.seconds, keep == "1")))
        return
    env = os.environ | {"IMGCLS_MALLOC": ""}
    rows = []
    print(f"{'model@150, batch 64':<24} {'malloc':<8} {'img/s':>7} {'sys s':>6} {'page faults':>12} {'max RSS GB':>10}")
    for name in [m for m in args.models.split(",") if m]:
        got: dict[str, list[dict]] = {"default": [], "kept": []}
        for _ in range(args.rounds):
            for mode in ("default", "kept"):
                cmd = [sys.executable, __file__, "--seconds", str(args.seconds), "--child", name, MODELS[name], "1" if mode == "kept" else "0"]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                got[mode].append(r)
                print(f"{name:<24} {mode:<8} {r['img_s']:>7.1f} {r['sys_s']:>6.1f} {r['minflt']:>12,} {r['max_rss_gb']:>10.2f}", flush=True)
        med = {m: statistics.median(r["img_s"] for r in v) for m, v in got.items()}
        rows.append({"model": name, "precision": MODELS[name], "img_s": med, "kept_over_default": med["kept"] / med["default"], "runs": got})
        print(f"{name:<24} kept/default {med['kept'] / med['default']:.3f} (medians)", flush=True)
    print(json.dumps({"bench": "allocator", "seconds": args.seconds, "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
