"""Where training and validation batches come from, so the loop only asks for "batch ``idx``".

A split is uint8 rows over the decode cache's file (``data.rows.ImageRows``): on a CPU each batch reads its
rows from the file (through the page cache; the process never holds the set), on a GPU the set is copied
into device memory a chunk at a time when it fits and a batch is one index into it. Either way the batch
then goes through the batched augmentation (``data.augment``). A set larger than the GPU can spare is read
from the file a batch at a time, pinned and copied with ``non_blocking``.
With frozen stages and flip/no augmentation, batches come from the frozen stages' output computed once
(``engine.features``) and only the rest of the model runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from imgcls import progress
from imgcls.data import BatchAugment, Split
from imgcls.data.augment import to_float
from imgcls.data.rows import ImageRows
from imgcls.engine import features as feat_mod
from imgcls.engine import runtime as rt_mod
from imgcls.engine import selection
from imgcls.engine.evaluate import inference_model

# The decoded set may take at most this share of the GPU memory free at the start; the rest is left to
# the weights, optimizer state, activations and cuDNN workspaces.
DEVICE_SHARE = 0.5


def fits_on_device(nbytes: int, free_bytes: int, share: float = DEVICE_SHARE) -> bool:
    """Whether ``nbytes`` of data should be put on a device with ``free_bytes`` free (``torch.cuda.mem_get_info``)."""
    return nbytes <= free_bytes * share


def place(images: ImageRows | torch.Tensor, device: torch.device, *, what: str) -> ImageRows:
    """``images`` copied whole onto a GPU ``device`` when they fit there (a chunk at a time), else left where
    they are (said in one line): a CPU reads each batch from the cache's file, as does a GPU they do not fit."""
    if isinstance(images, torch.Tensor):
        images = ImageRows.of_tensor(images)
    if images.device == device or device.type == "cpu":
        return images
    if device.type != "cuda":
        return ImageRows.of_tensor(images.to(device))
    free, _total = torch.cuda.mem_get_info(device)
    if fits_on_device(images.nbytes, free):
        return ImageRows.of_tensor(images.to(device))
    progress.say(
        f"the {what} ({images.nbytes / 2**30:.1f} GiB decoded) does not fit in half of {device}'s "
        f"{free / 2**30:.1f} GiB free: each batch is read from the decode cache and copied over"
    )
    return images


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch gathered from a set in host memory, on ``device``: pinned first so that the copy runs
    asynchronously (pinning the whole set instead would lock all of it in RAM)."""
    if batch.device == device:
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


def shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    """An augmented batch at ``size`` x ``size`` for progressive resizing (``--low-res``): antialiased bilinear,
    as torchvision's ``Resize`` on tensors, in channels_last memory. The augmentation ran at the decoded size,
    so a rotation or crop loses no more detail than it would there."""
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


class TrainBatches:
    """``get(idx_host, idx_dev, g) -> (x, y, net)``: the batch input, labels and the module to run on it."""

    def __init__(self, images: ImageRows | torch.Tensor, labels: torch.Tensor, *, net: nn.Module, augment: BatchAugment,
                 device: torch.device):
        self.images = place(images, device, what="training set")
        self.labels = labels.to(device)
        self.net, self.augment, self.device = net, augment, device
        self.features: feat_mod.FrozenFeatureCache | None = None
        self.rest: Callable | None = None
        self.size = 0  # progressive resizing: the size this epoch's batches are shrunk to (0 = as decoded)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def streaming(self) -> bool:
        return self.images.device != self.device

    def get(self, idx_host: torch.Tensor, idx_dev: torch.Tensor, g: torch.Generator):
        y = self.labels[idx_dev]
        if self.features is not None:
            return self.features.batch(idx_dev, g), y, self.rest
        x = self.augment(to_device(self.images.take(idx_host if self.streaming else idx_dev), self.device), g)
        if self.size and self.size != x.shape[-1]:
            x = shrink(x, self.size)
        return x, y, self.net

    def use_frozen_features(self, model: nn.Module, freeze: int, val: Validator, *, precision: str, train_precision: str,
                            channels_last: bool, mean, std) -> None:
        """Run the frozen stages once over the training set (and its mirror images when flipping) and the
        validation set; later steps train the rest on that output. Skipped when the cache would be too big."""
        split = feat_mod.split_forward(model, freeze)
        if split is None:
            return
        mean_t, std_t = torch.tensor(mean, device=self.device), torch.tensor(std, device=self.device)
        flip = self.augment.preset == "flip"
        # the frozen stages of a batch-norm-folded copy when it checks out (they are in eval mode): same features
        fast = inference_model(model, self.images[:2], mean=mean, std=std, device=self.device)
        frozen = feat_mod.split_forward(fast, freeze)[0] if fast is not model else split[0]
        one = feat_mod.estimate_bytes(frozen, self.images[:1].to(self.device), mean=mean_t, std=std_t, flip=flip, precision=train_precision)
        if one * len(self.images) > feat_mod.MAX_BYTES:
            progress.say(f"frozen-stage features would take {one * len(self.images) / 2**30:.1f} GiB; running the frozen stages every step")
            return
        common = dict(
            mean=mean_t, std=std_t, channels_last=channels_last, batch_size=rt_mod.inference_batch(self.device), precision=precision,
            dtype={"fp32": torch.float32, "bf16": torch.bfloat16}.get(train_precision, torch.float16), device=self.device,
        )
        views = 2 if flip else 1
        with progress.task("frozen-stage features", views * len(self.images) + len(val.images)) as bar:
            self.features = feat_mod.FrozenFeatureCache.build(frozen, self.images, flip=flip, on_batch=bar.advance, **common)
            # validation reuses them too: the EMA copy's frozen stages equal the model's (lerp of equal values)
            val.features = feat_mod.FrozenFeatureCache.build(frozen, val.images, flip=False, on_batch=bar.advance, **common)
        self.rest, val.freeze = split[1], freeze


class Validator:
    """Validation loss and accuracy of a module, sharded over torchrun ranks; sums stay on the device and
    come back in one copy at the end."""

    def __init__(self, split: Split, rt: rt_mod.Runtime, *, mean, std, precision: str, batch_size: int, num_classes: int):
        lo, hi = (len(split) * rt.rank) // rt.world, (len(split) * (rt.rank + 1)) // rt.world
        self.rt, self.device = rt, rt.device
        self.images = place(split.images.select(slice(lo, hi)), rt.device, what="validation set")
        self.labels = split.labels[lo:hi].to(rt.device)
        self.mean, self.std = mean, std
        self.mean_t, self.std_t = torch.tensor(mean, device=rt.device), torch.tensor(std, device=rt.device)
        self.precision, self.batch_size = precision, batch_size
        self.features: feat_mod.FrozenFeatureCache | None = None  # set by TrainBatches.use_frozen_features
        self.freeze = 0
        self.num_classes = num_classes
        self.scores: dict[str, float] = {}  # of the last call: accuracy, macro_f1, balanced_accuracy (engine.selection)

    @torch.inference_mode()
    def __call__(self, module: nn.Module) -> tuple[float, float]:
        was_training = module.training
        module.eval()
        try:
            forward, inputs = self._forward(module)
            stats = torch.zeros(3, device=self.device)
            k = self.num_classes
            cm = torch.zeros(k * k, device=self.device, dtype=torch.long)  # true x predicted, flattened
            for start in range(0, len(self.labels), self.batch_size):
                y = self.labels[start : start + self.batch_size]
                with rt_mod.autocast(self.device, self.precision):
                    logits = forward(inputs(start)).float()
                stats[0] += F.cross_entropy(logits, y, reduction="sum")
                stats[1] += (logits.argmax(1) == y).sum()
                stats[2] += len(y)
                cm += torch.bincount(y * k + logits.argmax(1), minlength=k * k)
        finally:
            module.train(was_training)
        rt_mod.all_reduce_sum(self.rt, stats)
        rt_mod.all_reduce_sum(self.rt, cm)
        self.scores = selection.scores(cm.view(k, k).double().cpu())
        loss, correct, n = stats.tolist()
        return loss / max(n, 1.0), correct / max(n, 1.0)

    def _forward(self, module: nn.Module):
        """The callable and the input of each batch: the rest of the model over cached frozen-stage output,
        or the whole model over the images. The fold (``models.fold``) pays on a CPU, where its copy and
        check cost little next to inference; a GPU runs the unfolded model rather than copy it every epoch."""
        b = self.batch_size
        if self.features is not None:
            feats = self.features.all()
            return feat_mod.split_forward(module, self.freeze)[1], lambda s: feats[s : s + b]
        if self.device.type == "cpu":
            module = inference_model(module, self.images, mean=self.mean, std=self.std, device=self.device)
            module.eval()
        return module, lambda s: to_float(to_device(self.images[s : s + b], self.device), self.mean_t, self.std_t)


__all__ = ["TrainBatches", "Validator", "fits_on_device", "place", "to_device", "DEVICE_SHARE"]
