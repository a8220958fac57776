"""The training loop: batches drawn from the decoded uint8 rows, augmented in bulk on the device.

No DataLoader and no worker processes: the whole split is already decoded (``data.cache``), so a batch is
one read of its rows from the cache's file (``data.rows``; the process never holds the split), and
augmentation is a handful of tensor ops (``data.augment``). On a 2-core laptop that leaves both cores to
the model; on a GPU the uint8 set stays resident in device memory when it fits, and no step waits on the host.

``fit`` reads top to bottom; its parts live beside it: ``state`` (what is saved and resumed),
``step`` (one optimizer step), ``batches`` (where batches come from, validation), ``reporter`` (terminal,
metrics.csv, TensorBoard). Under torchrun each rank takes an equal share of a seeded permutation and the
model is wrapped in DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

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
from imgcls.data.balance import balanced_order, class_weights
from imgcls.engine import features as feat_mod
from imgcls.engine import runtime as rt_mod
from imgcls.engine.batches import TrainBatches, Validator
from imgcls.engine.reporter import METRIC_FIELDS, Reporter
from imgcls.engine.runtime import Runtime
from imgcls.engine.state import Checkpoints, TrainState
from imgcls.engine.step import OptimizerStep, check_finite
from imgcls.errors import ImgclsError, Interrupted
from imgcls.io import write_json
from imgcls.models import build_model, check_model_name, data_stats, freeze_stages


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


def fit(cfg: TrainConfig, run_dir: Path, data: PreparedData, rt: Runtime, *, resume: bool = False) -> TrainResult:
    """Train on ``data`` into ``run_dir`` (continuing its last checkpoint when ``resume``)."""
    run = Run.build(cfg, data, rt)
    state = run.state
    ckpts = Checkpoints(run_dir, run.meta(data), rt)
    if resume:
        note = ckpts.load(state, classes=data.classes, reseed=aug_seed(cfg, rt))
    report = Reporter(run_dir, cfg, is_main=rt.is_main, done_epochs=state.epoch)
    report.say(run.describe())
    if resume:
        report.say(f"resumed {run_dir} at epoch {state.epoch + 1}, step {state.step_in_epoch}" + (f"; {note}" if note else ""))
    t0 = time.perf_counter()  # wall time from here: the frozen-feature cache counts, building the model does not
    batches, validate = run.batches(data)
    stopped_early = False
    with stop_on_signals() as stop:
        while state.epoch < cfg.epochs:
            stats = train_epoch(cfg, rt, run, batches, stop, ckpts)
            val_loss, val_acc = validate(state.weights)
            scores = {"accuracy": val_acc, **validate.scores}  # accuracy, macro_f1, balanced_accuracy (engine.selection)
            improved = state.end_epoch(scores[cfg.select])  # best_val holds the best cfg.select score
            ckpts.save(state, best_val_acc=val_acc if improved else None)
            lr = float(state.optimizer.param_groups[0]["lr"])
            row = {"epoch": state.epoch, **stats, "val_loss": val_loss, "val_acc": val_acc, "val_macro_f1": scores.get("macro_f1", float("nan")),
                   "val_balanced_accuracy": scores.get("balanced_accuracy", float("nan")), "lr": lr, "elapsed_s": state.elapsed}
            report.epoch(row, improved=improved)
            if cfg.patience and state.bad_epochs >= cfg.patience and state.epoch < cfg.epochs:
                report.say(f"early stop: val {cfg.select} has not improved for {cfg.patience} epoch(s)")
                stopped_early = True
                break
            if stop.requested(rt):
                ckpts.wait()
                raise Interrupted(stop.signum, f"after epoch {state.epoch}")
    ckpts.wait()
    report.close()
    ips = [h["img_per_s"] for h in report.history if h.get("img_per_s")]
    return TrainResult(
        run_dir=run_dir, config=cfg, classes=data.classes, best_epoch=state.best_epoch, best_val_acc=state.best_val,
        epochs_run=state.epoch, stopped_early=stopped_early, wall_s=time.perf_counter() - t0,
        train_img_per_s=float(np.median(ips)) if ips else 0.0, history=report.history,
    )


def train_epoch(cfg: TrainConfig, rt: Runtime, run: Run, batches: TrainBatches, stop: StopFlag, ckpts: Checkpoints) -> dict:
    """The rest of the current epoch (all of it unless resumed mid-epoch): loss, accuracy and speed."""
    state = run.state
    run.train_mode()
    batches.size = cfg.low_res if state.epoch < cfg.low_res_epochs else 0
    order = epoch_order(cfg.seed, state.epoch, len(batches), rt, run.sampler_labels)
    idx_host, idx_dev = _batches(order, cfg.batch_size), _batches(order.to(rt.device), cfg.batch_size)
    n = len(idx_dev) - len(idx_dev) % cfg.accum_steps or len(idx_dev)  # whole accumulation groups only
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    check_every = 1 if rt.device.type == "cpu" else 25  # a GPU should not wait for the host every step
    with progress.task(f"epoch {state.epoch + 1}/{cfg.epochs}", (n - state.step_in_epoch) * cfg.batch_size * rt.world) as bar:
        for i in range(state.step_in_epoch, n):
            x, y, net = batches.get(idx_host[i], idx_dev[i], state.aug_gen)
            sync = (i + 1) % cfg.accum_steps == 0
            loss, corr = run.step.forward_backward(net, x, y, sync=sync)
            loss_sum += loss * len(y)
            correct += corr
            seen += len(y)
            if (i + 1) % check_every == 0:
                check_finite(loss_sum, rt, epoch=state.epoch + 1, step=state.global_step)
            if sync:
                run.step.step()
            state.step_in_epoch = i + 1
            if (threads := run.cores.poll()) is not None:
                progress.say(f"  now on {threads} CPU thread(s): another run of the study ended (step {state.global_step})")
            bar.advance(len(y) * rt.world, f"loss {float(loss):.3f}" if check_every == 1 else "")
            if sync and (i + 1) % check_every == 0 and stop.requested(rt):
                state.elapsed += time.perf_counter() - start
                ckpts.save(state, wait=True)
                raise Interrupted(stop.signum, f"in epoch {state.epoch + 1} at step {state.step_in_epoch}")
    check_finite(loss_sum, rt, epoch=state.epoch + 1, step=state.global_step)
    dt = time.perf_counter() - start
    state.elapsed += dt
    stats = rt_mod.all_reduce_sum(rt, torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=rt.device)]))
    loss_total, correct_total, total = stats.tolist()
    total = max(total, 1.0)
    return {"train_loss": loss_total / total, "train_acc": correct_total / total, "img_per_s": total / max(dt, 1e-9), "epoch_s": dt}


@dataclass
class Run:
    """What the loop computes with and does not save: the DDP wrapper, frozen stages, precision, layout,
    normalisation, the step; ``state`` is what it saves."""

    cfg: TrainConfig
    rt: Runtime
    state: TrainState
    step: OptimizerStep
    net: nn.Module  # the model, or its DDP wrapper
    frozen: list[nn.Module]
    precision: str
    channels_last: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sampler_labels: torch.Tensor | None = None  # the training labels under balance: sampler
    cores: rt_mod.CoreShare = field(default_factory=lambda: rt_mod.CoreShare(None))  # threads a study may add (--jobs)

    @classmethod
    def build(cls, cfg: TrainConfig, data: PreparedData, rt: Runtime) -> Run:
        import timm.optim
        import timm.utils

        rt_mod.seed_everything(cfg.seed)
        model = build_model(cfg.model, num_classes=len(data.classes), pretrained=cfg.pretrained, weights=cfg.weights,
                            weights_partial=cfg.weights_partial, dropout=cfg.dropout, drop_path=cfg.drop_path, norm=cfg.norm)
        frozen = freeze_stages(model, cfg.freeze)
        precision = rt_mod.choose_precision(cfg.precision, model, rt.device, data.img_size)
        channels_last = rt_mod.choose_channels_last(cfg.channels_last)
        model = model.to(rt.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # timm's "sgd" is Nesterov SGD, which torch refuses without momentum; plain SGD then ("momentum" in timm)
        opt = "momentum" if cfg.optimizer == "sgd" and cfg.momentum == 0 else cfg.optimizer
        optimizer = timm.optim.create_optimizer_v2(model, opt=opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                                   **fused_kernels(rt.device))
        steps_per_epoch = max(1, len(_batches(epoch_order(cfg.seed, 0, len(data.train), rt), cfg.batch_size)) // cfg.accum_steps)
        state = TrainState(
            model=model, optimizer=optimizer, scheduler=make_scheduler(cfg, optimizer, steps_per_epoch),
            scaler=torch.amp.GradScaler(rt.device.type, enabled=precision == "fp16"),
            # warmup with power 1: decay = min(ema, k / (k + 1)) at update k, so until the EMA's horizon is
            # reached it is the plain mean of the iterates so far. Without it, a run shorter than the horizon
            # (a small folder: a few steps an epoch) keeps mostly its first iterate and evaluates as untrained.
            ema=timm.utils.ModelEmaV3(model, decay=cfg.ema, use_warmup=True, warmup_power=1.0) if cfg.ema > 0 else None,
            aug_gen=torch.Generator(device=rt.device).manual_seed(aug_seed(cfg, rt)),
        )
        counts = torch.bincount(data.train.labels, minlength=len(data.classes)).clamp(min=1).tolist()
        weight = class_weights(counts).to(rt.device) if cfg.balance == "weights" else None
        step = OptimizerStep(state, criterion=nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing), precision=precision,
                             device=rt.device, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip)
        net = DistributedDataParallel(model) if rt.distributed else model
        mean, std = data_stats(model)
        return cls(cfg, rt, state, step, net, frozen, precision, channels_last, mean, std,
                   sampler_labels=data.train.labels if cfg.balance == "sampler" else None, cores=rt_mod.CoreShare.from_env(rt.device))

    def describe(self) -> str:
        cfg, rt = self.cfg, self.rt
        params = sum(p.numel() for p in self.state.model.parameters()) / 1e6
        return (
            f"model {cfg.model}{' (pretrained)' if cfg.pretrained else ''}: {params:.1f}M params, "
            f"{self.precision}{' channels_last' if self.channels_last else ''} on {rt.device}" + (f" x {rt.world} ranks" if rt.distributed else "")
            + (f"; epochs 1-{cfg.low_res_epochs} at {cfg.low_res}px, then {cfg.img_size}px" if cfg.low_res_epochs else "")
        )

    def train_mode(self) -> None:
        self.state.model.train()
        for stage in self.frozen:  # frozen stages keep their BatchNorm statistics
            stage.eval()

    def batches(self, data: PreparedData) -> tuple[TrainBatches, Validator]:
        cfg, rt = self.cfg, self.rt
        batches = TrainBatches(data.train.images, data.train.labels, net=self.net, device=rt.device,
                               augment=BatchAugment(cfg.augment, mean=self.mean, std=self.std, device=rt.device))
        validate = Validator(data.val, rt, mean=self.mean, std=self.std, precision=self.precision, batch_size=max(cfg.batch_size, 128),
                             num_classes=len(data.classes))
        # Frozen stages + flip/none augmentation: their output is computed once (engine/features.py).
        # Not under DDP: the cached path calls the model's parts directly, around DDP's hooks. Not with
        # progressive resizing: the cache holds the stages' output at one size.
        if cfg.freeze > 0 and cfg.augment in feat_mod.AUGMENTS and not rt.distributed and not cfg.low_res_epochs:
            self.train_mode()
            batches.use_frozen_features(
                self.state.model, cfg.freeze, validate, train_precision=self.precision, channels_last=self.channels_last,
                precision=rt_mod.inference_precision(cfg.precision, self.precision, rt.device), mean=self.mean, std=self.std,
            )
        return batches, validate

    def meta(self, data: PreparedData) -> dict:
        """What every checkpoint of the run says about it (a loader needs it to rebuild the model)."""
        return {
            "config": config_mod.to_dict(self.cfg), "classes": data.classes, "excluded_classes": data.excluded_classes,
            "img_size": data.img_size, "mean": list(self.mean), "std": list(self.std), "precision": self.precision,
            "channels_last": self.channels_last,
        }


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step cosine (to 1 % of ``lr``) or constant rate, after a linear warm-up; None when constant
    without warm-up."""
    import timm.scheduler

    if cfg.schedule == "constant" and cfg.warmup_epochs == 0:
        return None
    cosine = cfg.schedule == "cosine"
    return timm.scheduler.CosineLRScheduler(
        optimizer, t_initial=max(steps_per_epoch * cfg.epochs, 1) if cosine else 10**12, lr_min=cfg.lr * 0.01 if cosine else cfg.lr,
        warmup_t=int(round(cfg.warmup_epochs * steps_per_epoch)), warmup_lr_init=cfg.lr * 0.01, warmup_prefix=False, t_in_epochs=False,
    )


def aug_seed(cfg: TrainConfig, rt: Runtime) -> int:
    """Seed of a rank's augmentation generator: each rank draws its own augmentations."""
    return cfg.seed * 1000 + rt.rank


def epoch_order(seed: int, epoch: int, n: int, rt: Runtime, labels: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's sample order for an epoch: a function of (seed, epoch) only, so resume needs no state.
    Given the training ``labels`` (``balance: sampler``), every class is drawn equally often."""
    if labels is not None:
        perm = balanced_order(labels, seed=seed, epoch=epoch)
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = n // rt.world
    return perm[rt.rank * per_rank : (rt.rank + 1) * per_rank] if rt.distributed else perm


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    # A trailing batch of one image is dropped: BatchNorm cannot train on it, and the next epoch reshuffles.
    return [b for b in order.split(batch_size) if len(b) >= 2]


def fused_kernels(device: torch.device) -> dict:
    """torch's fused optimizer kernels where it has them (CPU, CUDA): one kernel over all parameters instead of
    several ops per tensor; torch uses them only when asked. On the 2-core CPU, ResNet-18's Adam step took
    14.6 ms instead of 16.9 (1-3 % of a whole training step at 96 px; bench/optimizer_step.py)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def requested(self, rt: Runtime) -> bool:
        """Whether to stop now. Under torchrun the ranks vote first (a signal reaches them at slightly
        different steps; a rank that stopped alone would leave the others waiting in an all-reduce)."""
        if not rt.distributed:
            return self.signum is not None
        votes = rt_mod.all_reduce_sum(rt, torch.tensor(float(self.signum is not None), device=rt.device)).item()
        if votes > 0 and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled: stop with it
        return votes > 0


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Handlers only set the flag; the loop saves and stops at the next step boundary."""
    flag = StopFlag()

    def handler(signum, _frame):
        flag.signum = signum

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


def write_run_files(run_dir: Path, cfg: TrainConfig, data: PreparedData) -> None:
    """The run folder describes itself: resolved config, class map, data report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_mod.dump(cfg, run_dir / "config.json")
    write_json(run_dir / "classes.json", {"classes": data.classes, "excluded_classes": data.excluded_classes})
    write_json(run_dir / "data_report.json", data.report)


def run_folder_problem(run_dir: Path, *, resume: bool, rt: Runtime) -> str | None:
    """Why training into ``run_dir`` cannot start on this rank, or None. Only rank 0 writes the run folder,
    but on ``--resume`` every rank reads its checkpoint (each restores its own augmentation stream)."""
    last = run_dir / "checkpoints" / "last.safetensors"
    if resume and not last.is_file():
        shared = " (every node reads the run folder on --resume: put it on storage they share)" if rt.distributed and not rt.is_main else ""
        return f"nothing to resume in {run_dir}: no checkpoints/last.safetensors{shared}"
    if not resume and last.exists():
        return f"{run_dir} already holds a run; use --resume to continue it or choose another --out"
    return None


def prepare_on_each_node(cfg: TrainConfig, rt: Runtime) -> PreparedData:
    """The prepared data on every rank, each node's decode cache filled once.

    The first rank of each node (``LOCAL_RANK`` 0) prepares while the node's other ranks wait, then they
    read what it put in the node's cache. Which cache that is is ``IMGCLS_CACHE`` as each node sees it: a
    folder per node (node 1's first rank, global rank 1 or 8, decodes there too) or one folder the nodes
    share, where their first ranks take turns on the cache's lock so that one decodes and the others read
    (data.cache). Global rank 0 alone decoding first would leave every rank of the other nodes to find
    their own caches empty and decode side by side. The waits allow for a long decode (runtime.agree)."""
    data = None
    for first in (True, False):
        error = None
        if (rt.local_rank == 0) == first:
            try:
                data = prepare(cfg)
            except ImgclsError as e:
                error = str(e)
        rt_mod.agree(rt, error)
    assert data is not None  # every rank prepared in one of the two turns, or agree raised
    return data


def train(cfg: TrainConfig, *, run_dir: Path, resume: bool = False) -> tuple[TrainResult, PreparedData]:
    """Prepare the data, build the model and train; returns the result and the prepared data."""
    rt = rt_mod.setup(cfg.device)
    try:
        rt_mod.agree(rt, run_folder_problem(run_dir, resume=resume, rt=rt))
        check_model_name(cfg.model)
        data = prepare_on_each_node(cfg, rt)
        if cfg.img_size == 0:
            cfg = cfg.replace(img_size=data.img_size)
        if rt.is_main:
            write_run_files(run_dir, cfg, data)
            for line in summarize_report(data.report):
                progress.say(line)
        result = fit(cfg, run_dir, data, rt, resume=resume)
        rt_mod.barrier(rt)
        return result, data
    finally:
        rt_mod.teardown(rt)


__all__ = ["train", "fit", "Run", "TrainResult", "epoch_order", "METRIC_FIELDS", "write_run_files", "make_scheduler"]
