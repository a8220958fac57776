"""One optimizer step, written once: forward under autocast, scaled backward, accumulation, clipping,
the GradScaler step, schedule and EMA, and the finite-loss check. It sees tensors only (no data set, no
run folder), so tests drive it with a tiny model."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from imgcls.engine import runtime as rt_mod
from imgcls.engine.runtime import Runtime
from imgcls.engine.state import TrainState
from imgcls.errors import ImgclsError


class OptimizerStep:
    """``forward_backward`` once per batch; ``step`` after every ``accum_steps`` batches."""

    def __init__(self, state: TrainState, *, criterion: nn.Module, precision: str, device: torch.device,
                 accum_steps: int = 1, grad_clip: float = 0.0):
        self.state = state
        self.criterion = criterion
        self.precision = precision
        self.device = device
        self.accum_steps = accum_steps
        self.grad_clip = grad_clip

    def forward_backward(self, net, x: torch.Tensor, y: torch.Tensor, *, sync: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (detached, on the device) and correct count of one batch; gradients accumulate.
        ``sync=False`` skips DDP's gradient all-reduce (``net.no_sync``) for all but the last batch of an
        accumulation group."""
        ctx = net.no_sync() if not sync and hasattr(net, "no_sync") else nullcontext()
        with ctx:
            with rt_mod.autocast(self.device, self.precision):
                logits = net(x)
                loss = self.criterion(logits.float(), y)
            # the mean over k batches of size b is the mean over one batch of k*b: divide by k
            self.state.scaler.scale(loss / self.accum_steps).backward()
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def step(self) -> None:
        """(unscale) -> clip -> step -> zero_grad -> schedule -> EMA, in that order."""
        s = self.state
        if self.grad_clip > 0:
            s.scaler.unscale_(s.optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), self.grad_clip)
        s.scaler.step(s.optimizer)  # skipped by the scaler when an fp16 gradient overflowed
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        s.global_step += 1
        if s.scheduler is not None:
            s.scheduler.step_update(num_updates=s.global_step)
        if s.ema is not None:
            s.ema.update(s.model, step=s.global_step)


def check_finite(loss_sum: torch.Tensor, rt: Runtime, *, epoch: int, step: int) -> None:
    """Stop on a NaN/inf loss before anything is saved. Computed on the device: one host sync (the
    ``.item()``); under torchrun all ranks agree first, so none saves while another stops."""
    bad = (~torch.isfinite(loss_sum)).float().reshape(())
    rt_mod.all_reduce_sum(rt, bad)
    if bad.item() > 0:
        raise ImgclsError(
            f"the loss became NaN/inf in epoch {epoch} (step {step}); stopped before saving, "
            "so the last good checkpoint is intact. Try a lower --lr, --grad-clip 1.0 or --precision fp32."
        )


__all__ = ["OptimizerStep", "check_finite"]
