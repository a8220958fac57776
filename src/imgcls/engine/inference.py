"""Loading a trained run for evaluation, prediction and explanation (safetensors + JSON only)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgcls import config as config_mod
from imgcls.config import TrainConfig
from imgcls.data.images import BadImage, decode_square, is_image_name, is_unsupported_image_name
from imgcls.deploy import calibration as calib
from imgcls.engine import checkpoint as ckpt
from imgcls.engine import runtime as rt_mod
from imgcls.errors import ImgclsError
from imgcls.models import build_model


@dataclass
class LoadedRun:
    run_dir: Path
    config: TrainConfig
    model: nn.Module
    classes: list[str]
    excluded_classes: list[str]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    precision: str
    calibration: calib.Calibration = field(default_factory=lambda: calib.UNCALIBRATED)  # RUN/calibration.json


def load_run(run: str | Path, *, device: str = "auto", which: str = "best") -> LoadedRun:
    """The run's model (best checkpoint by default) in eval mode, on ``device``."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ImgclsError(f"run folder not found: {run_dir}")
    path = run_dir / "checkpoints" / f"{which}.safetensors"
    if not path.is_file() and which == "best":
        path = run_dir / "checkpoints" / "last.safetensors"
    tensors, meta = ckpt.load_run_meta(path)
    cfg = config_mod.from_dict(meta["config"], where=f"checkpoint {path}: metadata config")
    classes = list(meta["classes"])
    # weights come from the checkpoint; never re-download or re-read the pretrained source
    model = build_model(
        cfg.model, num_classes=len(classes), dropout=cfg.dropout, drop_path=cfg.drop_path, norm=cfg.norm
    )
    state = ckpt.unprefixed("model", tensors)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ImgclsError(f"{path} does not fit model {cfg.model}: {str(e).splitlines()[0]}") from None
    rt = rt_mod.setup(device, distributed=False)
    precision = rt_mod.choose_precision(cfg.precision, model, rt.device, int(meta["img_size"]))
    if int(meta["img_size"]) >= 48:  # forward only: bf16 helps depthwise models too (Lite0@150: 175 vs 114 img/s)
        precision = rt_mod.inference_precision(cfg.precision, precision, rt.device)
    model = model.to(rt.device).eval()
    if meta.get("channels_last", True):
        model = model.to(memory_format=torch.channels_last)
    return LoadedRun(
        run_dir=run_dir,
        config=cfg,
        model=model,
        classes=classes,
        excluded_classes=list(meta.get("excluded_classes", [])),
        img_size=int(meta["img_size"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        device=rt.device,
        precision=precision,
        calibration=calib.read(run_dir),
    )


def own_test_split(run: LoadedRun):
    """The run's own data prepared again: the same data, fractions and split seed give the same test rows."""
    from imgcls.data import prepare

    prepared = prepare(run.config)
    if prepared.classes != run.classes:
        raise ImgclsError(f"the data at {run.config.data} now gives classes {prepared.classes}, run {run.run_dir} knows {run.classes}")
    if prepared.test is None:
        raise ImgclsError(f"{run.config.data} has no test split; pass DATA")
    return prepared


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _listed(path: Path) -> bool:
    """Files predict and explain take: images, and image formats they report as unsupported."""
    return is_image_name(path) or is_unsupported_image_name(path)


def split_glob(pattern: str) -> tuple[Path, str]:
    """``d/sub/**/*.png`` -> (``d/sub``, ``**/*.png``): the folder a glob cannot leave, and the rest."""
    parts = Path(pattern).expanduser().parts
    n = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return Path(*parts[:n]) if n else Path("."), "/".join(parts[n:])


def input_folders(inputs: list[str]) -> list[Path]:
    """The folders that ``inputs`` read from (folders given, and the fixed part of each glob)."""
    out = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out.append(p)
        elif not p.is_file() and glob.has_magic(item):
            out.append(split_glob(item)[0])
    return out


def expand_paths(inputs: list[str]) -> list[Path]:
    """Images, folders (recursively, hidden entries skipped) and globs -> sorted unique image paths.

    A file reached twice (two inputs, or a symlink to a file already listed) is listed once, by the first
    path that reached it. Directory symlinks are not followed by folders or by ``**``, so a link loop
    cannot multiply the files or run on for ever (Python's glob.glob follows them until the path is too long).
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
            out.extend(q for q in sorted(found) if _listed(q) and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            root, rest = split_glob(item)
            hits = sorted(root.glob(rest)) if rest and root.is_dir() else []
            if not hits:
                raise ImgclsError(f"no such file, folder or glob match: {item}")
            out.extend(h for h in hits if h.is_file() and _listed(h) and not _hidden(h, root))
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def load_images(paths: list[Path], size: int, resize: str = "squash") -> tuple[torch.Tensor, list[Path], list[dict]]:
    """Decode with the one loader (the decode cache's: same draft, same ``resize``); returns ``N x S x S x 3``
    uint8, the usable paths, and skips with reasons."""
    arrays, ok, skipped = [], [], []
    for p in paths:
        if is_unsupported_image_name(p):
            skipped.append({"path": str(p), "reason": f"unsupported format {p.suffix.lower()}: convert it to JPEG or PNG"})
            continue
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            skipped.append({"path": str(p), "reason": f"unreadable: {e.strerror or e}"})
            continue
        try:
            arr, _mode, _size = decode_square(data, size, resize=resize)
        except BadImage as e:
            skipped.append({"path": str(p), "reason": e.reason})
            continue
        arrays.append(arr)
        ok.append(p)
    if not arrays:
        return torch.empty((0, size, size, 3), dtype=torch.uint8), ok, skipped
    return torch.from_numpy(np.stack(arrays)), ok, skipped
