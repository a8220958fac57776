"""The training loop: batches drawn from the decoded uint8 tensors, augmented in bulk on the device.

No DataLoader and no worker processes: the whole split is already decoded (``data.cache``), so a batch is
one index into a tensor, and augmentation is a handful of tensor ops (``data.augment``). On a 2-core
laptop that leaves both cores to the model; on a GPU the uint8 set stays resident in device memory and
no step waits on the host.

Under torchrun each rank takes an equal share of a seeded permutation and the model is wrapped in
DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import csv
import json
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imgcls import config as config_mod
from imgcls import progress
from imgcls.config import TrainConfig
from imgcls.data import BatchAugment, PreparedData, prepare, summarize_report
from imgcls.engine import checkpoint as ckpt
from imgcls.engine import features as feat_mod
from imgcls.engine import runtime as rt_mod
from imgcls.engine.evaluate import inference_model, predict_logits
from imgcls.engine.runtime import Runtime
from imgcls.errors import ImgclsError
from imgcls.models import build_model, check_model_name, data_stats, freeze_stages

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s", "epoch_s", "elapsed_s"]


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a resumable checkpoint was saved at the step boundary."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum = signum


@dataclass
class TrainResult:
    run_dir: Path
    config: TrainConfig
    classes: list[str]
    best_epoch: int
    best_val_acc: float
    epochs_run: int
    stopped_early: bool
    wall_s: float
    train_img_per_s: float
    history: list[dict] = field(default_factory=list)


@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Handlers only set a flag; the loop saves and stops at the next step boundary."""
    flag: dict = {"signum": None}

    def handler(signum, _frame):
        flag["signum"] = signum

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for s in previous:
            signal.signal(s, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread): no handlers
        previous = {}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _rng_state(aug_gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.aug": aug_gen.get_state(),
        "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])], "python": _py_state()}
    return tensors, meta


def _py_state() -> list:
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, aug_gen: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    aug_gen.set_state(tensors["rng.aug"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))


def epoch_order(seed: int, epoch: int, n: int, rt: Runtime) -> torch.Tensor:
    """This rank's sample order for an epoch: a function of (seed, epoch) only, so resume needs no state."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // rt.world
    return perm[rt.rank * per_rank : (rt.rank + 1) * per_rank] if rt.distributed else perm


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    # A trailing batch of one image is dropped: BatchNorm cannot train on it, and the next epoch reshuffles.
    return [b for b in order.split(batch_size) if len(b) >= 2]


class Trainer:
    """Holds the state of one run; ``fit`` runs it. Small methods, one optimizer step written once."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, data: PreparedData, rt: Runtime):
        self.cfg = cfg
        self.run_dir = run_dir
        self.data = data
        self.rt = rt
        self.classes = data.classes
        rt_mod.seed_everything(cfg.seed)
        model = build_model(
            cfg.model,
            num_classes=len(data.classes),
            pretrained=cfg.pretrained,
            weights=cfg.weights,
            dropout=cfg.dropout,
            drop_path=cfg.drop_path,
            norm=cfg.norm,
        )
        self.frozen = freeze_stages(model, cfg.freeze)
        self.precision = rt_mod.choose_precision(cfg.precision, model, rt.device, data.img_size)
        self.channels_last = rt_mod.choose_channels_last(cfg.channels_last)
        model = model.to(rt.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.mean, self.std = data_stats(model)
        self.ddp = DistributedDataParallel(model) if rt.distributed else None
        import timm.optim
        import timm.utils

        self.optimizer = timm.optim.create_optimizer_v2(
            model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
        self.steps_per_epoch = max(1, len(_batches(epoch_order(cfg.seed, 0, len(data.train), rt), cfg.batch_size)) // cfg.accum_steps)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.scheduler = self._make_scheduler()
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.precision == "fp16")
        self.ema = timm.utils.ModelEmaV3(model, decay=cfg.ema) if cfg.ema > 0 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.augment = BatchAugment(cfg.augment, mean=self.mean, std=self.std, device=rt.device)
        # Frozen stages + flip/none augmentation: their output is computed once (engine/features.py).
        # Not under DDP: the cached path calls the model's parts directly, around DDP's hooks.
        self.split = feat_mod.split_forward(model, cfg.freeze) if cfg.augment in feat_mod.AUGMENTS and not rt.distributed else None
        self.features: feat_mod.FrozenFeatureCache | None = None
        self.val_features: feat_mod.FrozenFeatureCache | None = None
        self.aug_gen = torch.Generator(device=rt.device).manual_seed(cfg.seed * 1000 + rt.rank)
        # On a GPU the decoded training set lives on the device; on a CPU it is already there.
        self.train_images = data.train.images.to(rt.device)
        self.train_labels = data.train.labels.to(rt.device)
        # loop position and bookkeeping (all of it goes into the checkpoint)
        self.epoch = 0
        self.step_in_epoch = 0  # batches done in the current epoch
        self.global_step = 0  # optimizer steps
        self.best_val = -1.0
        self.best_epoch = 0
        self.bad_epochs = 0
        self.elapsed = 0.0

    def _make_scheduler(self):
        import timm.scheduler

        if self.cfg.schedule == "constant" and self.cfg.warmup_epochs == 0:
            return None
        warmup = int(round(self.cfg.warmup_epochs * self.steps_per_epoch))
        return timm.scheduler.CosineLRScheduler(
            self.optimizer,
            t_initial=max(self.total_steps, 1) if self.cfg.schedule == "cosine" else 10**12,
            lr_min=self.cfg.lr * 0.01 if self.cfg.schedule == "cosine" else self.cfg.lr,
            warmup_t=warmup,
            warmup_lr_init=self.cfg.lr * 0.01,
            warmup_prefix=False,
            t_in_epochs=False,
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {
            "config": config_mod.to_dict(self.cfg),
            "classes": self.classes,
            "excluded_classes": self.data.excluded_classes,
            "img_size": self.data.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "precision": self.precision,
            "channels_last": self.channels_last,
        }

    def save_full(self, path: Path) -> None:
        """Everything exact resume needs: weights, optimizer, scheduler, scaler, EMA, position, RNGs."""
        tensors = ckpt.prefixed("model", self.model.state_dict())
        opt_t, opt_skel = ckpt.split_state("optim", self.optimizer.state_dict())
        tensors.update(opt_t)
        if self.ema is not None:
            tensors.update(ckpt.prefixed("ema", self.ema.module.state_dict()))
        rng_t, rng_meta = _rng_state(self.aug_gen)
        tensors.update(rng_t)
        meta = self._meta() | {
            "kind": "full",
            "optimizer": opt_skel,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_meta,
            "position": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "best_val": self.best_val,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs,
                "elapsed": self.elapsed,
            },
        }
        ckpt.save(path, tensors, meta)

    def save_weights(self, path: Path, *, epoch: int, val_acc: float) -> None:
        """Inference weights only (the EMA weights when EMA is on)."""
        module = self.ema.module if self.ema is not None else self.model
        meta = self._meta() | {"kind": "weights", "epoch": epoch, "val_acc": val_acc}
        ckpt.save(path, ckpt.prefixed("model", module.state_dict()), meta)

    def load_full(self, path: Path) -> None:
        tensors, meta = ckpt.load(path)
        if meta.get("kind") != "full":
            raise ImgclsError(f"{path} holds weights only and cannot resume a run")
        if meta["classes"] != self.classes:
            raise ImgclsError(f"{path} was trained on classes {meta['classes']}, this data gives {self.classes}")
        self.model.load_state_dict(ckpt.unprefixed("model", tensors))
        opt_t = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        self.optimizer.load_state_dict(ckpt.join_state(meta["optimizer"], opt_t))
        if self.scheduler is not None and meta.get("scheduler") is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("scaler") is not None:
            self.scaler.load_state_dict(meta["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt.unprefixed("ema", tensors))
        pos = meta["position"]
        self.epoch, self.step_in_epoch, self.global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
        self.best_val, self.best_epoch, self.bad_epochs = pos["best_val"], pos["best_epoch"], pos["bad_epochs"]
        self.elapsed = pos["elapsed"]
        _set_rng_state(tensors, meta["rng"], self.aug_gen)

    # -- the step --------------------------------------------------------------------------------

    def _train_mode(self) -> None:
        self.model.train()
        for stage in self.frozen:  # frozen stages keep their BatchNorm statistics
            stage.eval()

    def _forward_backward(self, idx: torch.Tensor, *, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.features is not None:
            x = self.features.batch(idx, self.aug_gen)
            net = self.split[1]
        else:
            x = self.augment(self.train_images[idx], self.aug_gen)
            net = self.ddp or self.model
        y = self.train_labels[idx]
        ctx = net.no_sync() if (self.ddp is not None and not sync) else _null()
        with ctx:
            with rt_mod.autocast(self.rt.device, self.precision):
                logits = net(x)
                loss = self.criterion(logits.float(), y)
            self.scaler.scale(loss / self.cfg.accum_steps).backward()
        correct = (logits.detach().argmax(1) == y).sum()
        return loss.detach(), correct

    def _optimizer_step(self) -> None:
        # accumulate -> (unscale) -> clip -> step -> zero_grad -> schedule -> EMA, in that order
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        # computed on the device: one host sync (the .item() below), not two
        bad = (~torch.isfinite(loss_sum)).float().reshape(())
        rt_mod.all_reduce_sum(self.rt, bad)  # under DDP all ranks agree before anyone saves
        if bad.item() > 0:
            raise ImgclsError(
                f"the loss became NaN/inf in epoch {self.epoch + 1} (step {self.global_step}); stopped before saving, "
                "so the last good checkpoint is intact. Try a lower --lr, --grad-clip 1.0 or --precision fp32."
            )

    def _build_features(self) -> None:
        """Run the frozen stages once over the training set (and its mirror images) when that applies."""
        if self.split is None or self.features is not None:
            return
        mean = torch.tensor(self.mean, device=self.rt.device)
        std = torch.tensor(self.std, device=self.rt.device)
        flip = self.cfg.augment == "flip"
        self._train_mode()
        # the frozen stages of a batch-norm-folded copy when it checks out (they are in eval mode): same features
        fast = inference_model(self.model, self.train_images, mean=self.mean, std=self.std, device=self.rt.device)
        frozen = feat_mod.split_forward(fast, self.cfg.freeze)[0] if fast is not self.model else self.split[0]
        size = feat_mod.estimate_bytes(frozen, self.train_images, mean=mean, std=std, flip=flip, precision=self.precision)
        if size > feat_mod.MAX_BYTES:
            progress.say(f"frozen-stage features would take {size / 2**30:.1f} GiB; running the frozen stages every step")
            self.split = None
            return
        views = 2 if flip else 1
        common = dict(
            mean=mean, std=std, channels_last=self.channels_last, batch_size=rt_mod.inference_batch(self.rt.device),
            precision=rt_mod.inference_precision(self.cfg.precision, self.precision, self.rt.device),
            dtype=torch.float32 if self.precision == "fp32" else torch.bfloat16 if self.precision == "bf16" else torch.float16,
        )
        val_images = self.data.val.images.to(self.rt.device)
        with progress.task("frozen-stage features", views * len(self.train_images) + len(val_images)) as bar:
            self.features = feat_mod.FrozenFeatureCache.build(frozen, self.train_images, flip=flip, on_batch=bar.advance, **common)
            # validation reuses them too: the EMA copy's frozen stages equal the model's (lerp of equal values)
            self.val_features = feat_mod.FrozenFeatureCache.build(frozen, val_images, flip=False, on_batch=bar.advance, **common)

    def _stop_requested(self, stop_flag: dict) -> bool:
        """Whether to stop at this step. Under DDP the ranks agree first (a signal reaches them at slightly
        different steps; a rank that stopped alone would leave the others waiting in an all-reduce)."""
        local = stop_flag["signum"] is not None
        if not self.rt.distributed:
            return local
        votes = rt_mod.all_reduce_sum(self.rt, torch.tensor(float(local), device=self.rt.device))
        if votes.item() > 0 and stop_flag["signum"] is None:
            stop_flag["signum"] = signal.SIGTERM  # another rank was signalled: stop with it
        return votes.item() > 0

    # -- epochs ----------------------------------------------------------------------------------

    def train_epoch(self, stop_flag: dict) -> dict:
        self._train_mode()
        order = epoch_order(self.cfg.seed, self.epoch, len(self.data.train), self.rt).to(self.rt.device)
        batches = _batches(order, self.cfg.batch_size)
        n_batches = len(batches) - len(batches) % self.cfg.accum_steps or len(batches)
        loss_sum = torch.zeros((), device=self.rt.device)
        correct = torch.zeros((), device=self.rt.device, dtype=torch.long)
        seen = 0
        start = time.perf_counter()
        check_every = 1 if self.rt.device.type == "cpu" else 25  # a GPU should not sync every step
        with progress.task(f"epoch {self.epoch + 1}/{self.cfg.epochs}", (n_batches - self.step_in_epoch) * self.cfg.batch_size * self.rt.world) as bar:
            for i in range(self.step_in_epoch, n_batches):
                idx = batches[i]
                sync = (i + 1) % self.cfg.accum_steps == 0
                loss, corr = self._forward_backward(idx, sync=sync)
                loss_sum += loss * len(idx)
                correct += corr
                seen += len(idx)
                if (i + 1) % check_every == 0:
                    self._check_finite(loss_sum)
                if sync:
                    self._optimizer_step()
                self.step_in_epoch = i + 1
                if check_every == 1:
                    bar.advance(len(idx) * self.rt.world, f"loss {float(loss):.3f}")
                else:
                    bar.advance(len(idx) * self.rt.world)
                if sync and (i + 1) % check_every == 0 and self._stop_requested(stop_flag):
                    self._check_finite(loss_sum)
                    self.elapsed += time.perf_counter() - start
                    if self.rt.is_main:
                        self.save_full(self.run_dir / "checkpoints" / "last.safetensors")
                    raise Interrupted(stop_flag["signum"], f"in epoch {self.epoch + 1} at step {self.step_in_epoch}")
        self._check_finite(loss_sum)
        dt = time.perf_counter() - start
        self.elapsed += dt
        stats = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=self.rt.device)])
        rt_mod.all_reduce_sum(self.rt, stats)
        total = max(float(stats[2]), 1.0)
        return {
            "train_loss": float(stats[0]) / total,
            "train_acc": float(stats[1]) / total,
            "img_per_s": total / max(dt, 1e-9),
            "epoch_s": dt,
        }

    def validate(self) -> tuple[float, float]:
        """Val loss and accuracy of the weights that would be saved (EMA when on), sharded over ranks."""
        module = self.ema.module if self.ema is not None else self.model
        n = len(self.data.val)
        lo, hi = (n * self.rt.rank) // self.rt.world, (n * (self.rt.rank + 1)) // self.rt.world
        if self.val_features is not None:  # only when not distributed: lo, hi = 0, n
            logits = feat_mod.predict_rest(
                feat_mod.split_forward(module, self.cfg.freeze)[1], module, self.val_features.all(),
                precision=self.precision, batch_size=max(self.cfg.batch_size, 128),
            )
        else:
            logits = predict_logits(
                module, self.data.val.images[lo:hi], mean=self.mean, std=self.std,
                device=self.rt.device, precision=self.precision, batch_size=max(self.cfg.batch_size, 128),
            )
        labels = self.data.val.labels[lo:hi]
        if len(labels):
            loss_sum = float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct = float((logits.argmax(1) == labels).sum())
        else:
            loss_sum = correct = 0.0
        stats = torch.tensor([loss_sum, correct, float(len(labels))], device=self.rt.device)
        rt_mod.all_reduce_sum(self.rt, stats)
        total = max(float(stats[2]), 1.0)
        return float(stats[0]) / total, float(stats[1]) / total

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def fit(self, *, resume: bool = False) -> TrainResult:
        cfg, run_dir = self.cfg, self.run_dir
        last = run_dir / "checkpoints" / "last.safetensors"
        best = run_dir / "checkpoints" / "best.safetensors"
        history: list[dict] = []
        if resume:
            self.load_full(last)
            history = [h for h in _read_history(run_dir / "metrics.csv") if int(h["epoch"]) <= self.epoch]
            if self.rt.is_main:
                progress.say(f"resumed {run_dir} at epoch {self.epoch + 1}, step {self.step_in_epoch}")
        stopped_early = False
        t0 = time.perf_counter()
        self._build_features()
        with stop_on_signals() as flag:
            while self.epoch < cfg.epochs:
                stats = self.train_epoch(flag)
                val_loss, val_acc = self.validate()
                self.epoch += 1
                self.step_in_epoch = 0
                row = {"epoch": self.epoch, **stats, "val_loss": val_loss, "val_acc": val_acc, "lr": self.current_lr(), "elapsed_s": self.elapsed}
                history.append(row)
                improved = val_acc > self.best_val
                if improved:
                    self.best_val, self.best_epoch, self.bad_epochs = val_acc, self.epoch, 0
                else:
                    self.bad_epochs += 1
                if self.rt.is_main:
                    if improved:
                        self.save_weights(best, epoch=self.epoch, val_acc=val_acc)
                    self.save_full(last)
                    _write_history(run_dir / "metrics.csv", history)
                    progress.say(
                        f"epoch {self.epoch}/{cfg.epochs}  loss {stats['train_loss']:.4f}  acc {stats['train_acc']:.2%}  "
                        f"val_loss {val_loss:.4f}  val_acc {val_acc:.2%}{' *' if improved else ''}  "
                        f"{stats['img_per_s']:,.0f} img/s  {stats['epoch_s']:.0f}s"
                    )
                if cfg.patience and self.bad_epochs >= cfg.patience and self.epoch < cfg.epochs:
                    stopped_early = True
                    if self.rt.is_main:
                        progress.say(f"early stop: val_acc has not improved for {cfg.patience} epoch(s)")
                    break
                if self._stop_requested(flag):
                    raise Interrupted(flag["signum"], f"after epoch {self.epoch}")
        wall = time.perf_counter() - t0
        ips = [h["img_per_s"] for h in history if h.get("img_per_s")]
        return TrainResult(
            run_dir=run_dir,
            config=cfg,
            classes=self.classes,
            best_epoch=self.best_epoch,
            best_val_acc=self.best_val,
            epochs_run=self.epoch,
            stopped_early=stopped_early,
            wall_s=wall,
            train_img_per_s=float(np.median(ips)) if ips else 0.0,
            history=history,
        )


@contextmanager
def _null():
    yield


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _write_history(path: Path, history: list[dict]) -> None:
    lines = [",".join(METRIC_FIELDS)]
    for h in history:
        lines.append(",".join(str(h.get(k, "")) if k == "epoch" else f"{h.get(k, float('nan')):.6g}" for k in METRIC_FIELDS))
    ckpt.atomic_write_text(path, "\n".join(lines) + "\n")


def write_run_files(run_dir: Path, cfg: TrainConfig, data: PreparedData) -> None:
    """The run folder describes itself: resolved config, class map, data report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run_dir / "config.json", json.dumps(config_mod.to_dict(cfg), indent=2) + "\n")
    ckpt.atomic_write_text(
        run_dir / "classes.json",
        json.dumps({"classes": data.classes, "excluded_classes": data.excluded_classes}, indent=2) + "\n",
    )
    ckpt.atomic_write_text(run_dir / "data_report.json", json.dumps(data.report, indent=2) + "\n")


def train(cfg: TrainConfig, *, run_dir: Path, resume: bool = False) -> tuple[TrainResult, PreparedData]:
    """Prepare the data, build the model and train; returns the result and the prepared data."""
    rt = rt_mod.setup(cfg.device)
    try:
        if resume:
            if not (run_dir / "checkpoints" / "last.safetensors").is_file():
                raise ImgclsError(f"nothing to resume in {run_dir}: no checkpoints/last.safetensors")
        elif (run_dir / "checkpoints" / "last.safetensors").exists():
            raise ImgclsError(f"{run_dir} already holds a run; use --resume to continue it or choose another --out")
        check_model_name(cfg.model)
        # rank 0 builds the decode cache first; the others then read it
        if rt.is_main:
            data = prepare(cfg)
        rt_mod.barrier(rt)
        if not rt.is_main:
            data = prepare(cfg)
        if cfg.img_size == 0:
            cfg = cfg.replace(img_size=data.img_size)
        if rt.is_main:
            write_run_files(run_dir, cfg, data)
            for line in summarize_report(data.report):
                progress.say(line)
        trainer = Trainer(cfg, run_dir, data, rt)
        if rt.is_main:
            progress.say(
                f"model {cfg.model}{' (pretrained)' if cfg.pretrained else ''}: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M params, "
                f"{trainer.precision}{' channels_last' if trainer.channels_last else ''} on {rt.device}"
                + (f" x {rt.world} ranks" if rt.distributed else "")
            )
        result = trainer.fit(resume=resume)
        rt_mod.barrier(rt)
        return result, data
    finally:
        rt_mod.teardown(rt)


__all__ = ["train", "Trainer", "TrainResult", "Interrupted", "epoch_order", "METRIC_FIELDS", "write_run_files"]
