"""Training throughput: the capable-user loop vs imgcls's engine vs the same model on ready tensors.

Three ways to feed the same model (same architecture, batch size, precision and memory layout), in one
process, side by side, in alternating chunks:

- ``baseline``: bench/baseline_loop.py (ImageFolder + PIL transforms, DataLoader with 2 workers);
- ``imgcls``: the real engine, ``TrainBatches.get`` + ``OptimizerStep`` as ``train_epoch`` calls them
  (index into the decoded uint8 set, batched augmentation, step);
- ``ready``: the run's own model, loss and optimizer step on batches augmented beforehand and held
  in memory as float tensors: what the step costs when the data path is free.

Only full batches are timed (one shape: cuDNN autotunes it during the warm-up, and a short last batch
would not be a step at the stated batch size), and each chunk counts the images it actually ran. Each
chunk's throughput is its images over its wall time; the figure per mode is the median over chunks.
The baseline's DataLoader refills its prefetch queue while the other modes run, so the first
``2 x workers`` steps of each baseline chunk are run but not timed. ``imgcls / ready`` is the share of the
step the data path leaves (1.0 = free); ``imgcls / baseline`` the speed-up over the usual loop.

``--sync-steps N`` then runs N engine steps with every augmentation preset; on a GPU under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every operation that makes the host wait for the
device, and the warnings are reported with the line that caused them (the loss check every 25 steps is the
one designed wait; the steps checked are not at a multiple of 25).

    .venv/bin/python bench/train_throughput.py [--quick] [--models resnet18,...] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline_loop  # noqa: E402

from imgcls import config as config_mod  # noqa: E402
from imgcls.data import BatchAugment, prepare  # noqa: E402
from imgcls.data.augment import PRESETS  # noqa: E402
from imgcls.engine import runtime as rt_mod  # noqa: E402
from imgcls.engine.batches import TrainBatches  # noqa: E402
from imgcls.engine.step import check_finite  # noqa: E402
from imgcls.engine.train import Run, _batches, epoch_order  # noqa: E402

CONFIGS = {
    "resnet18": {"model": "resnet18", "pretrained": False},
    "resnet50": {"model": "resnet50", "pretrained": False},
    "efficientnet_lite0": {"model": "efficientnet_lite0", "pretrained": True},  # full fine-tune, nothing frozen
}
MODES = ("baseline", "imgcls", "ready")


def make_run(name: str, data, *, batch_size: int, precision: str, augment: str, device: str = "cpu",
             root: Path = baseline_loop.DATA) -> tuple[Run, TrainBatches]:
    cfg = config_mod.from_dict(
        {
            "data": root.as_posix(), "img_size": 150, **CONFIGS[name], "freeze": 0,
            "batch_size": batch_size, "precision": precision, "channels_last": "on", "augment": augment,
            "ema": 0.0, "epochs": 3, "device": device,
        }
    )
    run = Run.build(cfg, data, rt_mod.setup(device, distributed=False))
    return run, run.batches(data)[0]


def engine_step(run: Run, batches: TrainBatches, idx: tuple[torch.Tensor, torch.Tensor], i: int) -> None:
    """One step exactly as train.train_epoch takes it (finite check every step on a CPU, every 25 on a GPU);
    ``idx`` is the batch's indices on the host and on the device."""
    x, y, net = batches.get(*idx, run.state.aug_gen)
    loss, _ = run.step.forward_backward(net, x, y)
    if run.rt.device.type == "cpu" or (i + 1) % 25 == 0:
        check_finite(loss, run.rt, epoch=1, step=i)
    run.step.step()


def ready_step(run: Run, x: torch.Tensor, y: torch.Tensor, i: int) -> None:
    """The same step with the data path removed: the batch is already augmented float, channels_last."""
    with rt_mod.autocast(run.rt.device, run.precision):
        logits = run.state.model(x)
        loss = run.step.criterion(logits.float(), y)
    run.state.scaler.scale(loss).backward()
    (logits.detach().argmax(1) == y).sum()
    if run.rt.device.type == "cpu" or (i + 1) % 25 == 0:
        check_finite(loss.detach(), run.rt, epoch=1, step=i)
    run.step.step()


def measure(name: str, data, args) -> dict:
    bs = args.batch_size
    run, source = make_run(name, data, batch_size=bs, precision=args.precision, augment=args.augment, device=args.device,
                           root=args.data)
    run.train_mode()
    order = epoch_order(0, 0, len(data.train), run.rt)
    dev = run.rt.device
    batches = [(b, b.to(dev)) for b in _batches(order, bs) if len(b) == bs]  # (host, device) indices, full batches
    if not batches:
        sys.exit(f"{args.data} has {len(data.train)} training images: not one full batch of {bs}")
    # ready tensors: a few distinct batches augmented up front by the engine's own augmentation
    ready = []
    with torch.no_grad():
        for idx in batches[: args.ready_batches]:
            x, y, _ = source.get(*idx, run.state.aug_gen)
            ready.append((x, y))
    modes = tuple(m for m in MODES if m != "baseline" or not args.skip_baseline)
    base = None if args.skip_baseline else baseline_loop.build(
        CONFIGS[name]["model"], data=args.data, pretrained=CONFIGS[name]["pretrained"], batch_size=bs, epochs=3,
        rotate=args.augment == "flip-rotate", precision=args.precision,
    )
    discard = 2 * base.train_loader.num_workers if base is not None else 0
    pos = {"imgcls": 0, "ready": 0}
    cuda = run.rt.device.type == "cuda"

    def chunk(mode: str, steps: int) -> float:
        """Run ``steps`` timed steps of ``mode``; returns images per second."""
        if mode == "baseline":
            baseline_loop.train_steps(base, discard)  # drain what was prefetched meanwhile
            t = time.perf_counter()
            baseline_loop.train_steps(base, steps)  # its loader drops the last partial batch: all full
            return steps * bs / (time.perf_counter() - t)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        images = 0
        for _ in range(steps):
            i = pos[mode]
            pos[mode] += 1
            if mode == "imgcls":
                idx = batches[i % len(batches)]
                engine_step(run, source, idx, i)
                images += len(idx[0])
            else:
                x, y = ready[i % len(ready)]
                ready_step(run, x, y, i)
                images += len(y)
        if cuda:
            torch.cuda.synchronize()  # a GPU runs ahead of the host: time the work, not its queueing
        return images / (time.perf_counter() - t)

    for mode in modes:  # warm-up: first-call costs, allocator, worker start, cudnn autotuning
        chunk(mode, args.warmup)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        k = r % len(modes)
        order = modes[k:] + modes[:k]  # rotate who goes first
        for mode in order:
            rates[mode].append(chunk(mode, args.steps))
        print(f"  {name} round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {rates[m][-1]:.1f}" for m in modes), flush=True)
    med = {m: statistics.median(v) for m, v in rates.items()}
    syncs = sync_check(run, source, batches, args.sync_steps) if args.sync_steps else None
    return {
        "model": name,
        "pretrained": CONFIGS[name]["pretrained"],
        "img_per_s": med,
        "chunks": rates,
        "imgcls_over_ready": med["imgcls"] / med["ready"],
        "imgcls_over_baseline": med["imgcls"] / med["baseline"] if "baseline" in med else None,
        "sync_check": syncs,
    }


def sync_check(run: Run, source: TrainBatches, batches: list, steps: int) -> dict:
    """``steps`` engine steps per augmentation preset (after one unchecked step: first-call costs); on a GPU
    under ``set_sync_debug_mode("warn")``. Per preset: whether it ran, its error, and each distinct wait
    for the device as ``file:line: message`` (with how often it came)."""
    cuda = run.rt.device.type == "cuda"
    out: dict = {"debug_mode": "warn" if cuda else None, "steps": steps, "presets": {}}
    for preset in PRESETS:
        res: dict = {"ok": True, "error": None, "syncs": {}}
        try:
            source.augment = BatchAugment(preset, mean=run.mean, std=run.std, device=run.rt.device)
            engine_step(run, source, batches[0], 0)
            if cuda:
                torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    for i in range(1, steps + 1):  # i + 1 < 25: the every-25-steps loss check stays out
                        engine_step(run, source, batches[i % len(batches)], i)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
            for w in caught:
                if "synchroniz" in str(w.message):
                    where = f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:100]}"
                    res["syncs"][where] = res["syncs"].get(where, 0) + 1
        except Exception as e:  # reported, not raised: the other presets still get checked
            res.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
        out["presets"][preset] = res
        state = "ok" if res["ok"] else f"FAILED ({res['error']})"
        print(f"  sync check {preset}: {state}, {sum(res['syncs'].values())} waits for the device" +
              "".join(f"\n    {n} x {w}" for w, n in res["syncs"].items()), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="training throughput: baseline loop vs imgcls vs ready tensors")
    p.add_argument("--models", default="resnet18,resnet50,efficientnet_lite0")
    p.add_argument("--quick", action="store_true", help="fewer, shorter chunks (a smoke run)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", type=Path, default=baseline_loop.DATA, help="an intel-scenes-like folder (train/, test/)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--augment", default="flip-rotate", choices=["flip", "flip-rotate"],
                   help="flip-rotate matches the baseline's RandomHorizontalFlip + RandomRotation(15)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the baseline loop always feeds from CPU workers)")
    p.add_argument("--skip-baseline", action="store_true", help="only imgcls and ready tensors (e.g. a GPU check)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per chunk (default 8, --quick 3)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps per mode first (default 3, --quick 2)")
    p.add_argument("--sync-steps", type=int, default=0, help="then N steps per augmentation preset, on a GPU in sync debug mode (N < 24)")
    p.add_argument("--json", type=Path, help="also write the final JSON line to this file")
    args = p.parse_args()
    if args.sync_steps > 23:
        p.error("--sync-steps must be under 24 (step 25 reads the loss back by design)")
    args.rounds, args.steps, args.warmup = (2, args.steps or 3, args.warmup or 2) if args.quick else (3, args.steps or 8, args.warmup or 3)
    args.ready_batches = 8
    torch.manual_seed(0)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in CONFIGS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(CONFIGS)}")
    data = prepare(config_mod.from_dict({"data": args.data.as_posix(), "img_size": 150}))
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.precision} "
          f"channels_last, augment {args.augment}, {args.rounds} rounds x {args.steps} steps per mode", flush=True)
    results = [measure(n, data, args) for n in names]
    print()
    print(f"{'model@150':<31} {'baseline':>9} {'imgcls':>9} {'ready':>9}   {'imgcls/ready':>12} {'imgcls/baseline':>15}")
    for r in results:
        ips = r["img_per_s"]
        label = r["model"] + (" (fine-tune)" if r["pretrained"] else " (scratch)")
        base_s = f"{ips['baseline']:>9.1f}" if "baseline" in ips else f"{'-':>9}"
        over_s = f"{r['imgcls_over_baseline']:>15.2f}" if r["imgcls_over_baseline"] is not None else f"{'-':>15}"
        print(f"{label:<31} {base_s} {ips['imgcls']:>9.1f} {ips['ready']:>9.1f}   {r['imgcls_over_ready']:>12.3f} {over_s}")
    print("(img/s, medians over alternating chunks in this one run; ready = same step on pre-augmented tensors)")
    line = json.dumps({"bench": "train_throughput", "device": args.device, "batch_size": args.batch_size, "precision": args.precision,
                       "augment": args.augment, "quick": args.quick, "steps": args.steps, "warmup": args.warmup,
                       "train_images": len(data.train), "results": results})
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
