"""What a run shows and writes about itself while it trains, besides checkpoints: terminal lines,
``metrics.csv`` (one row per epoch) and TensorBoard event files under ``RUN/tensorboard``. Only rank 0
writes or prints; every rank keeps the history (the loop returns it)."""

from __future__ import annotations

import csv
from pathlib import Path

from imgcls import progress
from imgcls.config import TrainConfig
from imgcls.io import write_text

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "val_balanced_accuracy", "lr", "img_per_s", "epoch_s", "elapsed_s"]
# TensorBoard tag of each metrics.csv column that has one (train and val side by side in one chart)
SCALARS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
    "lr": "learning_rate", "img_per_s": "images_per_s",
}


class Reporter:
    def __init__(self, run_dir: Path, cfg: TrainConfig, *, is_main: bool, done_epochs: int = 0):
        """``done_epochs`` > 0 on resume: the history up to it is read back and TensorBoard events of
        later epochs (written before the interruption) are discarded."""
        self.run_dir, self.cfg, self.is_main = run_dir, cfg, is_main
        self.csv = run_dir / "metrics.csv"
        self.history = [h for h in read_history(self.csv) if h["epoch"] <= done_epochs] if done_epochs else []
        self.tb = None
        if is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when it is used

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=done_epochs + 1 if done_epochs else None)

    def say(self, line: str) -> None:
        if self.is_main:
            progress.say(line)

    def epoch(self, row: dict, *, improved: bool) -> None:
        self.history.append(row)
        if not self.is_main:
            return
        write_history(self.csv, self.history)
        if self.tb is not None:
            for key, tag in SCALARS.items():
                self.tb.add_scalar(tag, row[key], row["epoch"])
            self.tb.flush()
        self.say(
            f"epoch {row['epoch']}/{self.cfg.epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:.2%}  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.2%}{' *' if improved else ''}  "
            f"{row['img_per_s']:,.0f} img/s  {row['epoch_s']:.0f}s"
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_history(path: Path, history: list[dict]) -> None:
    lines = [",".join(METRIC_FIELDS)]
    for h in history:
        lines.append(",".join(str(h.get(k, "")) if k == "epoch" else f"{h.get(k, float('nan')):.6g}" for k in METRIC_FIELDS))
    write_text(path, "\n".join(lines) + "\n")


__all__ = ["Reporter", "METRIC_FIELDS", "read_history", "write_history"]
