"""What a run saves and exact resume restores: one dataclass, one save/load pair, and where it is written.

``TrainState`` holds the loop position, every random generator (per rank under torchrun), and the model,
optimizer, scheduler, grad scaler and EMA. ``dump``/``restore`` turn it into a safetensors checkpoint
(``engine.checkpoint``) and back. ``Checkpoints`` decides when and on which thread files are written.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from imgcls.engine import checkpoint as ckpt
from imgcls.engine.runtime import Runtime
from imgcls.errors import ImgclsError

POSITION = ("epoch", "step_in_epoch", "global_step", "best_val", "best_epoch", "bad_epochs", "elapsed")


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, or None for a constant rate without warm-up
    scaler: torch.amp.GradScaler
    ema: Any  # timm.utils.ModelEmaV3 or None
    aug_gen: torch.Generator  # this rank's augmentation draws, on the training device
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # batches done in the current epoch
    global_step: int = 0  # optimizer steps
    best_val: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    elapsed: float = 0.0  # training seconds, summed over resumes

    @property
    def weights(self) -> nn.Module:
        """The weights that are validated and saved as best (the EMA copy when EMA is on)."""
        return self.ema.module if self.ema is not None else self.model

    def end_epoch(self, val_acc: float) -> bool:
        """Advance to the next epoch; returns whether ``val_acc`` is a new best."""
        self.epoch += 1
        self.step_in_epoch = 0
        improved = val_acc > self.best_val
        if improved:
            self.best_val, self.best_epoch, self.bad_epochs = val_acc, self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def dump(self, rt: Runtime) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON metadata of the whole state (``restore`` reverses it). Collective under torchrun: every rank's random
        generators are gathered (each rank draws its own augmentations), so every rank must call it."""
        tensors = ckpt.prefixed("model", self.model.state_dict())
        opt_t, opt_skel = ckpt.split_state("optim", self.optimizer.state_dict())
        tensors.update(opt_t)
        if self.ema is not None:
            tensors.update(ckpt.prefixed("ema", self.ema.module.state_dict()))
        ranks = _gather(rt, _rng_capture(self.aug_gen))
        for r, rng in enumerate(ranks):
            tensors.update({f"rng.{r}.{k}": v for k, v in rng.items() if k != "meta"})
        meta = {
            "kind": "full",
            "optimizer": opt_skel,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": {"device": self.aug_gen.device.type, "ranks": [rng["meta"] for rng in ranks]},
            "position": {k: getattr(self, k) for k in POSITION},
        }
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict, rt: Runtime, *, reseed: int) -> str | None:
        """Restore what ``dump`` gave. Returns a note when the augmentation stream could not be restored
        (the run was saved on another device type; it then restarts from ``reseed`` + the step count)."""
        if meta.get("kind") != "full":
            raise ImgclsError("that checkpoint holds weights only and cannot resume a run")
        self.model.load_state_dict(ckpt.unprefixed("model", tensors))
        opt_t = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        # the kernel choice (fused, foreach) is this process's, not the saved run's: a checkpoint from before
        # the fused kernels (or from another device type) must not switch them off
        # (set before loading: torch places the loaded step counters by the groups' kernel choice)
        saved = ckpt.join_state(meta["optimizer"], opt_t)
        for group, now in zip(saved.get("param_groups", []), self.optimizer.param_groups):
            group.update({k: now[k] for k in ("fused", "foreach") if k in now})
        self.optimizer.load_state_dict(saved)
        _match_param_layout(self.optimizer)
        if self.scheduler is not None and meta.get("scheduler") is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("scaler") is not None:
            self.scaler.load_state_dict(meta["scaler"])  # a no-op when this run's scaler is off (bf16/fp32)
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt.unprefixed("ema", tensors))
        for k in POSITION:
            setattr(self, k, meta["position"][k])
        return _rng_restore(tensors, meta["rng"], rt, self.aug_gen, reseed=reseed + self.global_step)


def _rng_capture(aug_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    v, py_state, gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "aug": aug_gen.get_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "meta": {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])], "python": [v, list(py_state), gauss]},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded state tensor (exp_avg, momentum, ...) its parameter's memory layout. A checkpoint
    gives them back contiguous while a channels_last model's conv weights are not; torch's fused kernels
    walk parameter and state as if their layouts agreed, and on a CPU a mismatch silently computes the
    wrong update (the bit-for-bit resume test caught it: 0.03 off after two steps)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _gather(rt: Runtime, obj: dict) -> list[dict]:
    if not rt.distributed:
        return [obj]
    out: list = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def _rng_restore(tensors: dict[str, torch.Tensor], rng: dict, rt: Runtime, aug_gen: torch.Generator, *, reseed: int) -> str | None:
    if "ranks" not in rng:  # a checkpoint from before per-rank states: one rank, keys "rng.torch", ...
        rng, prefix = {"device": None, "ranks": [rng]}, "rng."
    else:
        prefix = f"rng.{rt.rank}."
    if len(rng["ranks"]) != rt.world:
        raise ImgclsError(
            f"the checkpoint was saved by {len(rng['ranks'])} process(es) and this run has {rt.world}; "
            "resume with the same number of torchrun processes"
        )
    torch.set_rng_state(tensors[prefix + "torch"])
    name, pos, has_gauss, cached = rng["ranks"][rt.rank]["numpy"]
    np.random.set_state((name, tensors[prefix + "numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    v, state, gauss = rng["ranks"][rt.rank]["python"]
    random.setstate((v, tuple(state), gauss))
    if prefix + "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[prefix + "cuda"])
    saved_on = rng["device"] or aug_gen.device.type
    if saved_on == aug_gen.device.type:
        aug_gen.set_state(tensors[prefix + "aug"])
        return None
    # A CUDA generator's state (seed + offset) and a CPU one (Mersenne Twister) do not convert.
    aug_gen.manual_seed(reseed)
    return (
        f"the run was saved on {saved_on} and continues on {aug_gen.device.type}: its augmentation draws restart from "
        "the seed, so it will not repeat an uninterrupted run bit for bit"
    )


class Checkpoints:
    """``checkpoints/last.safetensors`` (full state) and ``best.safetensors`` (inference weights) of a run.

    On a GPU an epoch can take seconds while writing a full checkpoint (hundreds of MB: digest,
    serialisation, fsync) takes about as long, so there the write runs on a background thread once the
    tensors are copied to the host; the next save, a stop and the end of the run wait for it, so the last
    checkpoint is always on disk before the process goes on or exits. On a CPU it writes in place: a
    thread would take a core from training."""

    def __init__(self, run_dir: Path, run_meta: dict, rt: Runtime):
        self.last = run_dir / "checkpoints" / "last.safetensors"
        self.best = run_dir / "checkpoints" / "best.safetensors"
        self.run_meta = run_meta  # config, classes, sizes, mean/std, precision: what a loader needs
        self.rt = rt
        self.background = rt.device.type == "cuda"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: TrainState, *, best_val_acc: float | None = None, wait: bool = False) -> None:
        """The full state to ``last`` (all ranks call this; rank 0 writes) and, given ``best_val_acc``,
        the inference weights to ``best``."""
        tensors, meta = state.dump(self.rt)
        if not self.rt.is_main:
            return
        jobs = [(self.last, tensors, self.run_meta | meta)]
        if best_val_acc is not None:
            best_meta = self.run_meta | {"kind": "weights", "epoch": state.epoch, "val_acc": best_val_acc}
            jobs.append((self.best, ckpt.prefixed("model", state.weights.state_dict()), best_meta))
        self.wait()
        if not self.background or wait:
            for job in jobs:
                ckpt.save(*job)
            return
        jobs = [(p, {k: v.detach().to("cpu", copy=True) for k, v in t.items()}, m) for p, t, m in jobs]
        self._thread = threading.Thread(target=self._write, args=(jobs,), name="imgcls-checkpoint", daemon=False)
        self._thread.start()

    def _write(self, jobs: list) -> None:
        try:
            for job in jobs:
                ckpt.save(*job)
        except BaseException as e:  # re-raised on the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def load(self, state: TrainState, *, classes: list[str], reseed: int) -> str | None:
        tensors, meta = ckpt.load(self.last)
        if meta.get("classes") != classes:
            raise ImgclsError(f"{self.last} was trained on classes {meta.get('classes')}, this data gives {classes}")
        return state.restore(tensors, meta, self.rt, reseed=reseed)


__all__ = ["TrainState", "Checkpoints", "POSITION"]
