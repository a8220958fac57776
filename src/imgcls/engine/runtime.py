"""Where and how a run computes: device, precision/layout per model, seeding, torch.distributed.

Launched under ``torchrun``, the same entry point runs one process per device: ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK`` come from the environment, the process group uses NCCL on GPUs and gloo on CPUs, and only
rank 0 writes files. torch.distributed has no authentication, and ``--master-addr`` does not limit who can
connect: rank 0's rendezvous store listens on every interface, and gloo and NCCL open more ports. Run it only
where no one else can reach those ports (README, "Several devices").
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from imgcls.errors import ImgclsError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    slow_group: Any = field(default=None, compare=False, repr=False)  # see setup()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process instead of handing it back to the OS.

    By default every block over 128 KiB-32 MiB is its own mmap, unmapped when freed, so each training step
    maps its activations and augmented batch afresh and the kernel zero-fills every page on first touch:
    3.5 M page faults and 6 s of system time in 25 s of ResNet-18@150 training on the 2-core machine.
    With mmap off for the heap (``M_MMAP_MAX`` 0) and no trimming, that loop ran 1.17x faster and a full
    Lite0 fine-tune in fp32 1.34x (bench/allocator.py); the process keeps its peak size (+0.1-0.5 GB there).
    glibc on Linux only (what jemalloc or tcmalloc via ``LD_PRELOAD`` would also fix); once per process;
    ``IMGCLS_MALLOC=default`` leaves malloc alone. Returns whether the settings are in effect."""
    if os.environ.get("IMGCLS_MALLOC", "") == "default" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def setup(device: str = "auto", *, distributed: bool = True) -> Runtime:
    """The device for this process; joins torchrun's process group unless ``distributed=False``
    (evaluation and prediction run on rank 0 alone, after training has left the group)."""
    keep_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ImgclsError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
        if dev.type == "cuda" and dev.index is not None and world > 1:
            raise ImgclsError(
                f"--device {device} under torchrun would put all {world} processes on one GPU; "
                "use --device cuda (each process takes cuda:LOCAL_RANK)"
            )
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ImgclsError("device cuda requested but no CUDA GPU is available")
            if dev.index is None:
                dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    slow_group = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        # Waits that include decoding a data set (rank 0 builds the decode cache while the others wait) can
        # last far longer than NCCL's 10-minute collective timeout: they go through a CPU (gloo) group
        # whose timeout covers them, and the training collectives keep the default, which catches hangs.
        slow_group = dist.new_group(backend="gloo", timeout=SLOW_TIMEOUT)
        global _joined
        _joined = True
    return Runtime(device=dev, rank=rank, world=world, local_rank=local_rank, slow_group=slow_group)


# How long ranks wait for one another around data preparation (decoding ImageNet-size sets on one rank).
SLOW_TIMEOUT = timedelta(hours=12)


def agree(rt: Runtime, error: str | None) -> None:
    """Every rank raises what failed on any rank, or none does; also a ``slow`` barrier. A rank that left
    alone (its node's copy of DATA missing, a run folder that node cannot see) would leave the others
    waiting on it, or failing with a bare connection error: each rank's message is gathered instead, and
    every rank raises the first one (one on another rank names it and its host)."""
    if not rt.distributed:
        if error is not None:
            raise ImgclsError(error)
        return
    found: list[Any] = [None] * rt.world
    dist.all_gather_object(found, None if error is None else (platform.node(), error), group=rt.slow_group)
    for rank, item in enumerate(found):
        if item is not None:
            host, message = item
            raise ImgclsError(message if rank == rt.rank else f"on rank {rank} ({host}): {message}")


_joined = False  # whether this process has joined torchrun's process group (setup)


def stop_every_rank(error: str, device: str = "auto") -> None:
    """Pass on an error this rank met before it joined the process group (a --resume run folder or a
    --config file its node cannot see): join as ``train`` does and :func:`agree`, so the other ranks,
    waiting there, stop with it rather than wait for this one until the rendezvous times out. Nothing
    outside torchrun or once this process has joined; the caller raises its own error after."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _joined:
        return
    try:
        rt = setup(device)
    except ImgclsError:
        return
    try:
        agree(rt, error)
    except ImgclsError:
        pass
    finally:
        teardown(rt)


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rt: Runtime, *, slow: bool = False) -> None:
    """Wait for every rank; ``slow``: a wait that may last as long as decoding a data set (see setup)."""
    if rt.distributed:
        dist.barrier(group=rt.slow_group if slow else None)


def seed_everything(seed: int) -> None:
    """One seed drives Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def has_depthwise(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def choose_precision(
    requested: str, model: nn.Module, device: torch.device, img_size: int = 224, *, capability: tuple[int, int] | None = None
) -> str:
    """``auto``: on CUDA bf16 where the GPU computes it natively (compute capability 8.0, Ampere, and later),
    else fp16 (the trainer then scales the loss with a GradScaler); ``capability`` defaults to the device's.
    ``torch.cuda.is_bf16_supported()`` is not the test: it also says yes where bf16 is emulated (V100, T4),
    which is slower than fp16 there. On CPU bf16 where the CPU has native bf16, the model has no depthwise
    convolutions and images are at least 48 px. Measured on a 2-core AMX CPU (bench/, README "Speed"):
    ResNet-50@150 bf16 is 2.3x fp32 with channels_last and ResNet-18@56 1.65x, while EfficientNet-Lite0's
    depthwise backward is slower in bf16 (38 img/s) than fp32 (47 img/s) and ResNet-18@28 is faster in fp32
    (718 vs 647 img/s): at 28 px per-op overhead, not matmul speed, decides."""
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise ImgclsError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return requested
    if device.type == "cuda":
        major, minor = capability or torch.cuda.get_device_capability(device)
        return "bf16" if (major, minor) >= (8, 0) else "fp16"
    return "bf16" if cpu_has_bf16() and not has_depthwise(model) and img_size >= 48 else "fp32"


def inference_precision(requested: str, train_precision: str, device: torch.device) -> str:
    """Precision for forward-only work: the frozen stages' cached features (any size), a loaded run's
    evaluation and prediction at 48 px and above (``engine/inference.py``), audit's features. Under ``auto`` a
    CPU with native bf16 uses it even where training stays fp32: what keeps EfficientNet-Lite0 training in
    fp32 is the depthwise *backward*; its frozen stem + blocks 0-5 forward ran at 150 vs 95 img/s in bf16 vs
    fp32 on a 2-core AMX CPU (bench/frozen_features.py)."""
    if requested != "auto" or train_precision != "fp32" or device.type != "cpu":
        return train_precision
    return "bf16" if cpu_has_bf16() else "fp32"


def inference_batch(device: torch.device) -> int:
    """Images per forward-only batch. On a CPU small batches keep each activation map in cache: folded
    EfficientNet-Lite0 at 150 px in bf16 ran 1.4x faster at 16 images than at 128 on the 2-core machine
    (bench/frozen_features.py). A GPU wants large batches to fill it."""
    return 256 if device.type == "cuda" else 16


def choose_channels_last(requested: str) -> bool:
    """channels_last helped every CNN measured here (1.2-1.6x on this CPU, standard on GPUs)."""
    return requested != "off"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


THREADS_FILE_ENV = "IMGCLS_THREADS_FILE"


class CoreShare:
    """The CPU threads this run may use, as a study running runs side by side (``study --jobs``) hands them out.

    A run starts with its share in ``OMP_NUM_THREADS``. When another run ends and no run is left to take its
    place, the study writes the larger share to the file named by ``IMGCLS_THREADS_FILE``; :meth:`poll`, called
    at each step, reads it every ``every_s`` seconds and calls ``torch.set_num_threads``. Without it, the study's
    last run trained on one of two cores for its whole length while the other idled (15 runs, two at a time).
    No file, an unreadable one, or a run off the CPU: nothing changes."""

    def __init__(self, path: str | None, *, every_s: float = 5.0):
        self.path = path
        self.every_s = every_s
        self._next = 0.0

    @classmethod
    def from_env(cls, device: torch.device) -> CoreShare:
        return cls(os.environ.get(THREADS_FILE_ENV) or None if device.type == "cpu" else None)

    def poll(self) -> int | None:
        """The new thread count when it changed just now, else None."""
        if self.path is None:
            return None
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.every_s
        try:
            with open(self.path, encoding="utf-8") as f:
                n = int(f.read().strip())
        except (OSError, ValueError):  # not written yet, or being replaced
            return None
        if n < 1 or n == torch.get_num_threads():
            return None
        torch.set_num_threads(n)
        return n


def all_reduce_sum(rt: Runtime, t: torch.Tensor) -> torch.Tensor:
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
