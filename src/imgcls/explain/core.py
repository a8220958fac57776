"""Explaining a trained run: CAM maps, predictions and faithfulness per image, and the files for them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from imgcls import progress
from imgcls.data.augment import to_float
from imgcls.data.images import resize_rgb
from imgcls.engine.inference import LoadedRun, expand_paths, load_images, load_run
from imgcls.errors import ImgclsError
from imgcls.explain import render
from imgcls.explain.cam import METHODS, TargetLayer, check_method, compute_cams, resolve_layer, _unchanged
from imgcls.explain.faithfulness import METRIC, deletion_insertion
from imgcls.io import write_json
from imgcls.report import plots

STEPS = 10  # deletion / insertion steps
GRID_MAX = 48  # overlays kept in memory for each method's grid
CHUNK = 256  # images decoded at a time: memory stays bounded for any folder
ARRAY_KEYS = ("heatmap", "overlay")  # record keys that hold arrays (not written to JSON)


def methods_from(method: str) -> list[str]:
    """``all`` or one method name -> the list of methods to run."""
    return list(METHODS) if method == "all" else [check_method(method)]


def class_index(run: LoadedRun, name: str | None) -> int | None:
    if name is None:
        return None
    if name not in run.classes:
        raise ImgclsError(f"unknown class {name!r}; the run knows {', '.join(run.classes)}")
    return run.classes.index(name)


def explain_images(
    run: LoadedRun,
    images: torch.Tensor,
    *,
    method: str,
    layer: TargetLayer,
    target: int | None = None,
    batch_size: int = 16,
) -> list[dict]:
    """One record per image of ``images`` (``N x S x S x 3`` uint8 at the run's size): prediction,
    probability, target class (``target`` or the prediction), its probability, deletion/insertion AUC
    and ``heatmap`` (``S x S`` float32 in [0, 1]). The model comes back unchanged."""
    model, device = run.model, run.device
    mean = torch.tensor(run.mean, device=device)
    std = torch.tensor(run.std, device=device)
    records: list[dict] = []
    with _unchanged(model, freeze=False):
        model.eval()
        for start in range(0, len(images), batch_size):
            # fp32 throughout: pytorch-grad-cam reads activations as NumPy arrays, which have no bf16
            x = to_float(images[start : start + batch_size].to(device), mean, std).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                probs = model(x).float().softmax(1)
            conf, pred = probs.max(1)
            tgt = pred.tolist() if target is None else [target] * len(x)
            t_prob = probs.gather(1, torch.tensor(tgt, device=device)[:, None]).squeeze(1)
            heat = compute_cams(model, x, tgt, method=method, layer=layer, batch_size=batch_size)
            dele, ins = deletion_insertion(model, x, heat, tgt, steps=STEPS, batch_size=batch_size)
            for i in range(len(x)):
                records.append({
                    "prediction": run.classes[int(pred[i])],
                    "probability": float(conf[i]),
                    "target": run.classes[tgt[i]],
                    "target_probability": float(t_prob[i]),
                    "method": method,
                    "layer": layer.name,
                    "deletion_auc": float(dele[i]),
                    "insertion_auc": float(ins[i]),
                    "heatmap": heat[i],
                })
    return records


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ARRAY_KEYS}


def _as_uint8_batch(images, size: int, resize: str = "squash") -> torch.Tensor:
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ImgclsError(f"images must be N x H x W x 3 uint8, got {arr.dtype} {list(arr.shape)}")
    if arr.shape[1:3] != (size, size):
        arr = np.stack([resize_rgb(a, size, resize) for a in arr]) if len(arr) else arr.reshape(0, size, size, 3)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _true_name(label, run: LoadedRun) -> str | None:
    if label is None:
        return None
    if isinstance(label, (int, np.integer)):
        return run.classes[int(label)]
    return str(label)


def _true_from_folder(path: Path, run: LoadedRun) -> str | None:
    """A parent folder named like a class gives the true label."""
    name = path.parent.name
    return name if name in run.classes or name in run.excluded_classes else None


def _header(run: LoadedRun, methods: list[str], layer: TargetLayer, target: int | None) -> dict:
    return {
        "run": str(run.run_dir),
        "model": run.config.model,
        "img_size": run.img_size,
        "methods": methods,
        "layer": layer.name,
        "target_class": None if target is None else run.classes[target],
        "faithfulness_metric": METRIC.format(steps=STEPS),
    }


# -- the pipeline: chunks of images -> explained records -> files ------------------------------------

Chunk = tuple[torch.Tensor, list[dict]]  # N x S x S x 3 uint8 at the run's size, and per image {index, path, true}


def explained(
    run: LoadedRun,
    chunks: Iterable[Chunk],
    *,
    methods: list[str],
    layer: TargetLayer,
    target: int | None,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[np.ndarray, dict]]:
    """``(image, record)`` per image and method, chunk by chunk: the chunk's info (``index``, ``path``,
    ``true``), then :func:`explain_images`' fields, and ``overlay``. Only one chunk is held at a time."""
    for images, infos in chunks:
        for m in methods:
            for i0 in range(0, len(images), batch_size):
                part = images[i0 : i0 + batch_size]
                for j, rec in enumerate(explain_images(run, part, method=m, layer=layer, target=target, batch_size=batch_size)):
                    img = part[j].numpy()
                    rec = {**infos[i0 + j], **rec}
                    rec["overlay"] = render.overlay(img, rec["heatmap"])
                    yield img, rec
                if on_batch is not None:
                    on_batch(len(part))


class ExplainWriter:
    """Writes what ``imgcls explain`` leaves in a folder: a three-panel figure per image and method,
    ``<method>_grid.png`` (the first ``GRID_MAX`` overlays) and ``explain.json``."""

    def __init__(self, out_dir: Path, doc: dict):
        self.out_dir = Path(out_dir)
        self.doc = doc  # the header; images, grids and summary are added
        self.records: list[dict] = []
        self.grids: dict[str, tuple[list[np.ndarray], list[str]]] = {m: ([], []) for m in doc["methods"]}

    def add(self, image: np.ndarray, rec: dict) -> None:
        """Draw ``rec``'s figure (its path is stored in ``rec["figure"]``) and keep its JSON fields."""
        path = rec.get("path")
        name = f"{rec['index']:05d}" + (f"_{Path(path).stem}" if path else "")
        rec["figure"] = str(self.out_dir / rec["method"] / f"{name}.png")
        title = render.title_for(rec)
        render.three_panels(image, rec["heatmap"], rec["overlay"], title=f"{Path(path).name}\n{title}" if path else title, path=Path(rec["figure"]))
        overlays, titles = self.grids[rec["method"]]
        if len(overlays) < GRID_MAX:
            overlays.append(rec["overlay"])
            titles.append(title.replace(" | ", "\n"))
        self.records.append(_public(rec))

    def finish(self, *, n_images: int, skipped: list[dict]) -> dict:
        """Write the grids and ``explain.json``; returns the document."""
        doc = dict(self.doc)
        doc["grids"] = {
            m: str(plots.image_grid(ov, titles, self.out_dir / f"{m}_grid.png", suptitle=f"{m} overlays"))
            for m, (ov, titles) in self.grids.items() if ov
        }
        doc["n_images"] = n_images
        doc["images"] = self.records
        doc["skipped"] = skipped
        doc["summary"] = {
            m: {
                "mean_deletion_auc": float(np.mean([r["deletion_auc"] for r in self.records if r["method"] == m])),
                "mean_insertion_auc": float(np.mean([r["insertion_auc"] for r in self.records if r["method"] == m])),
            }
            for m in doc["methods"] if n_images
        }
        write_json(self.out_dir / "explain.json", doc)
        return doc


def explain_run(
    run: str | Path | LoadedRun,
    images,
    true_labels: list | None = None,
    *,
    method: str = "gradcam",
    layer: str | None = None,
    target: str | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
) -> list[dict]:
    """Explain fixed images with one method; for studies that show the same images through every arm.

    ``run``: a run folder or a :class:`LoadedRun` (loaded on the default device when a path).
    ``images``: ``N x H x W x 3`` uint8 (NumPy or torch), resized to the run's size when needed.
    ``true_labels``: class names or indices (or None entries), or None. ``target``: a class name to
    explain instead of each prediction ("why not X?"). With ``out_dir``, also writes the three-panel
    figures, ``<method>_grid.png`` and ``explain.json`` there, as ``imgcls explain`` does.

    Returns one dict per image: ``index``, ``path`` (None), ``true``, ``prediction``, ``probability``,
    ``target``, ``target_probability``, ``method``, ``layer``, ``deletion_auc``, ``insertion_auc`` (see
    ``faithfulness.METRIC``), ``heatmap`` (``S x S`` float32 in [0, 1]) and ``overlay``
    (``S x S x 3`` uint8 RGB, ready for :func:`panel`), where S is the run's image size.
    """
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    batch = _as_uint8_batch(images, loaded.img_size, loaded.config.resize)
    if true_labels is not None and len(true_labels) != len(batch):
        raise ImgclsError(f"{len(true_labels)} true labels for {len(batch)} images")
    method = check_method(method)
    tl = resolve_layer(loaded.model, loaded.img_size, layer)
    t = class_index(loaded, target)
    infos = [{"index": i, "path": None, "true": _true_name(true_labels[i], loaded) if true_labels is not None else None} for i in range(len(batch))]
    writer = ExplainWriter(Path(out_dir), _header(loaded, [method], tl, t)) if out_dir is not None else None
    records = []
    for img, rec in explained(loaded, [(batch, infos)], methods=[method], layer=tl, target=t, batch_size=batch_size):
        if writer is not None:
            writer.add(img, rec)
        records.append(rec)
    if writer is not None:
        writer.finish(n_images=len(batch), skipped=[])
    return records


def explain_paths(
    run_dir: str | Path,
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    method: str = "gradcam",
    layer: str | None = None,
    target: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
) -> dict:
    """``imgcls explain``: images, folders or globs -> figures, grids and ``explain.json`` in ``out_dir``.

    ``method`` is a name from ``METHODS`` or ``all``. Paths are decoded in chunks (bounded memory);
    unreadable files are skipped with a reason. Returns the document written to ``explain.json``.
    """
    if batch_size < 1:
        raise ImgclsError("--batch-size must be at least 1")
    methods = methods_from(method)
    run = load_run(run_dir, device=device)
    tl = resolve_layer(run.model, run.img_size, layer)
    t = class_index(run, target)
    paths = expand_paths([str(p) for p in inputs])
    if not paths:
        raise ImgclsError("no image files found in the given paths")
    skipped: list[dict] = []
    n_ok = 0  # usable images so far: numbers the figures

    def chunks(bar: progress.Task) -> Iterator[Chunk]:
        nonlocal n_ok
        for start in range(0, len(paths), CHUNK):
            images, ok, bad = load_images(paths[start : start + CHUNK], run.img_size, run.config.resize)
            skipped.extend(bad)
            bar.advance(len(bad) * len(methods))
            yield images, [{"index": n_ok + i, "path": str(p), "true": _true_from_folder(p, run)} for i, p in enumerate(ok)]
            n_ok += len(ok)

    writer = ExplainWriter(Path(out_dir), _header(run, methods, tl, t))
    with progress.task(f"explaining ({', '.join(methods)})", len(paths) * len(methods)) as bar:
        for img, rec in explained(run, chunks(bar), methods=methods, layer=tl, target=t, batch_size=batch_size, on_batch=bar.advance):
            writer.add(img, rec)  # the arrays go with the record: memory stays bounded
    return writer.finish(n_images=n_ok, skipped=skipped)
