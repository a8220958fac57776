"""The Python API: what the CLI does, as calls that return plain data and print nothing unless asked.

    run = imgcls.train("photos/", out="runs/a", model="resnet18", epochs=5)
    run = imgcls.load("runs/a")
    run.evaluate()                      # the metrics.json content
    run.predict(["cat.jpg", pil_image, uint8_array], topk=3)
    run.explain(["cat.jpg"], method="gradcam", out="runs/a/explain")

A thin layer over ``imgcls.runs`` (train / eval / predict) and ``imgcls.explain``: the same functions the
CLI calls, so files written and numbers returned are the CLI's. Paths may be ``str`` or ``Path``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from imgcls import config as config_mod
from imgcls import progress
from imgcls.config import TrainConfig
from imgcls.errors import ImgclsError


def train(data: str | Path, *, out: str | Path | None = None, config: str | Path | None = None,
          verbose: bool = False, **options: Any) -> Run:
    """Train on ``data`` (a folder, a CSV or ``fashion-mnist``), evaluate on its test split, return the run.

    ``options`` are config keys (``model``, ``epochs``, ``img_size``, ``lr``, ``recipe``, ... as in
    ``imgcls train --help``, with underscores), checked like ``--set``: an unknown key or a wrong type is
    an :class:`~imgcls.errors.ImgclsError`. ``config`` is a YAML/JSON file of keys; ``options`` win over it.
    As on the command line, with neither ``model`` nor ``recipe`` the default recipe (fast-finetune)
    applies, and ``out`` defaults to ``runs/<data>-<model>``.
    """
    cfg = config_mod.resolve(flags={**options, "data": str(data)}, file=config, default_recipe=config_mod.DEFAULT_RECIPE)
    run_dir = Path(out) if out is not None else Path("runs") / f"{Path(cfg.data).resolve().name or 'data'}-{cfg.model}"
    from imgcls.runs import train_and_evaluate

    with progress.quiet(not verbose):
        train_and_evaluate(cfg, run_dir=run_dir)
    return Run(run_dir, device=cfg.device)


def load(run: str | Path, *, device: str = "auto") -> Run:
    """A finished run folder (``config.json`` and ``checkpoints/best.safetensors``)."""
    return Run(run, device=device)


class Run:
    """A trained run folder. ``path``, ``config`` (the :class:`TrainConfig` it was trained with),
    ``classes`` and ``summary`` (``summary.json``: test accuracy, best epoch, ...) describe it; the methods
    evaluate, predict and explain with its best checkpoint."""

    def __init__(self, path: str | Path, *, device: str = "auto"):
        self.path = Path(path)
        if not (self.path / "checkpoints" / "best.safetensors").is_file():
            raise ImgclsError(f"{self.path} is not a trained run folder (no checkpoints/best.safetensors)")
        self.config: TrainConfig = config_mod.load(self.path / "config.json")
        self.device = device
        self._loaded = None  # the model, loaded on the first in-memory prediction
        self._model = None  # its inference copy (batch norm folded when that checks out)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, model={self.config.model!r}, classes={len(self.classes)})"

    @property
    def classes(self) -> list[str]:
        return json.loads((self.path / "classes.json").read_text(encoding="utf-8"))["classes"]

    @property
    def summary(self) -> dict:
        p = self.path / "summary.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    def evaluate(self, data: str | Path | None = None, *, out: str | Path | None = None, tta: bool | None = None,
                 max_bad_fraction: float | None = None, verbose: bool = False) -> dict:
        """Metrics on the run's own test split, or on ``data`` (labels matched by class name), as
        ``imgcls eval`` computes them; files go to ``out`` (default ``<run>/eval``). Returns the
        ``metrics.json`` content: ``accuracy``, ``macro_f1``, ``ece``, ``per_class``, ``confusion_matrix``...
        More than ``max_bad_fraction`` (default: the run's) unreadable files in ``data`` raises ImgclsError."""
        from imgcls.runs import eval_command

        with progress.quiet(not verbose):
            return eval_command(self.path, data, out, tta=tta, device=self.device, max_bad_fraction=max_bad_fraction)

    def predict(self, inputs, *, topk: int = 5, verbose: bool = False) -> list[dict]:
        """Top-``topk`` labels for each input: an image file, a folder or glob (every image in it), a PIL
        image, or an ``H x W x 3`` uint8 array (a list of them, or one). In-memory images go through the
        same RGB conversion and resize as files.

        One dict per image, in input order: ``input`` (the position in ``inputs``), ``path`` (None for an
        in-memory image), ``label``, ``confidence`` and ``topk`` (``[{"label", "prob"}, ...]``); a file that
        cannot be read gives ``path``, ``input`` and ``error`` (the reason) instead of a label.
        """
        from imgcls.engine.inference import expand_paths
        from imgcls.runs import predict_command

        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        rows: list[dict] = []
        with progress.quiet(not verbose):
            # consecutive files go through ``imgcls predict`` together; in-memory images through the same model
            for is_path, group in itertools.groupby(enumerate(items), key=lambda t: isinstance(t[1], (str, Path))):
                group = list(group)
                if is_path:
                    order = {}  # image path -> (the input it came from, its place there): a folder gives many
                    for i, item in group:
                        for k, p in enumerate(expand_paths([str(item)])):
                            order.setdefault(str(p), (i, k))
                    found, skipped = predict_command(self.path, [item for _, item in group], None, topk=topk, device=self.device)
                    found += [{"path": s["path"], "error": s["reason"]} for s in skipped]
                    found.sort(key=lambda r: order[r["path"]])
                    rows += [{"input": order[r["path"]][0], **r} for r in found]
                else:
                    rows += self._predict_arrays(group, topk=topk)
        return rows

    def _predict_arrays(self, group: list[tuple[int, Any]], *, topk: int) -> list[dict]:
        import torch

        from imgcls.data.images import resize_rgb, to_rgb_array
        from imgcls.engine.evaluate import inference_model
        from imgcls.engine.inference import load_run
        from imgcls.runs import predict_images

        if self._loaded is None:
            self._loaded = load_run(self.path, device=self.device)
        size = self._loaded.img_size
        arrays = [resize_rgb(to_rgb_array(x), size, self._loaded.config.resize) for _, x in group]
        images = torch.from_numpy(np.stack(arrays))
        if self._model is None:
            lr = self._loaded
            self._model = inference_model(lr.model, images, mean=lr.mean, std=lr.std, device=lr.device)
        rows = predict_images(self._loaded, images, [None] * len(group), topk=topk, model=self._model)
        return [{"input": i, **r} for (i, _), r in zip(group, rows)]

    def explain(self, paths, *, method: str = "gradcam", out: str | Path | None = None, layer: str | None = None,
                target: str | None = None, verbose: bool = False) -> dict:
        """CAM heat maps and faithfulness scores for image files, folders or globs, as ``imgcls explain``:
        figures, grids and ``explain.json`` in ``out`` (default ``<run>/explain``). ``method``: gradcam,
        gradcam++, eigencam, layercam, scorecam or all; ``target``: a class name to explain instead of the
        prediction. Returns the ``explain.json`` document (``images``: one record per image and method)."""
        from imgcls.explain.core import explain_paths

        items = [paths] if isinstance(paths, (str, Path)) else list(paths)
        with progress.quiet(not verbose):
            return explain_paths(self.path, items, Path(out) if out is not None else self.path / "explain",
                                 method=method, layer=layer, target=target, device=self.device)


__all__ = ["train", "load", "Run"]
