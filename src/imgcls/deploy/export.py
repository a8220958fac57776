"""``imgcls export``: a run's best checkpoint as one self-contained ONNX or TorchScript file, proven against the run.

What the exported graph computes, and why its input is what it is:

- input ``images``: uint8, ``N x S x S x 3`` RGB at the run's size S, N dynamic. Resizing stays *outside* the
  graph, done by Pillow exactly as imgcls' own loader does (``data.images.decode_square``: a JPEG drafted to
  at least 2S, then bilinear with ``reducing_gap=None`` in the run's resize mode, squash by default). An in-graph resize (ONNX ``Resize``, ``F.interpolate``) does not reproduce Pillow's
  antialiased filter bit for bit, and training saw Pillow-resized images, so a graph that resized would agree
  with the run less than one fed the same pixels imgcls feeds it.
- inside: uint8 -> float, ImageNet-style normalisation (the run's mean/std, ``data.augment.to_float``), the
  model with its batch norms folded (``models.fold``), the flip average when the run uses TTA, division by the
  calibration temperature, softmax.
- outputs ``probabilities`` (``N x C``, calibrated) and ``score`` (``N``, the rejection score: an image is
  "unknown" when its score is under the metadata's ``threshold``).

ONNX uses torch's ``torch.export``-based exporter (``dynamo=True``): the TorchScript-based one also exported these
models but warns that it is deprecated and will be removed. Class names, size, threshold and the whole imgcls
config travel in the file (ONNX ``metadata_props``; TorchScript ``_extra_files['imgcls.json']``).

Export proves itself: the file is run (onnxruntime / ``torch.jit.load``) beside the PyTorch run on the run's own
test split; under 99.5 % top-1 agreement nothing is written and the error names the images that differ.
Otherwise ``FILE.parity.json`` is written, then the file is renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from imgcls import __version__, progress
from imgcls import config as config_mod
from imgcls.data.augment import to_float
from imgcls.deploy import calibration as calib
from imgcls.engine.evaluate import inference_model, predict_logits
from imgcls.engine.inference import LoadedRun, load_run
from imgcls.errors import ImgclsError
from imgcls.io import write_json

FORMAT = "imgcls-export-1"
MIN_AGREEMENT = 0.995
DEFAULT_OPSET = 18  # the torch.export-based exporter's own opset; lower ones go through a lossy version converter
BATCH = 64
INPUT_NOTE = ("uint8 N x S x S x 3 RGB, S = img_size, made square as imgcls' loader does (data/images.py "
              "decode_square with the file's resize mode; squash: JPEG draft to >= 2S, then Pillow "
              "Image.resize((S, S), Image.Resampling.BILINEAR, reducing_gap=None))")


def require(module: str):
    """Import an optional deploy dependency, or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImgclsError(f"{module} is not installed: pip install -e '.[deploy]'") from None


class Deployable(nn.Module):
    """uint8 ``N x S x S x 3`` RGB -> (calibrated probabilities ``N x C``, rejection score ``N``)."""

    def __init__(self, model: nn.Module, *, mean, std, temperature: float, tta: bool, score: str):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.temperature = float(temperature)
        self.tta = tta
        self.score = score

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(images, self.mean, self.std)  # the same arithmetic as imgcls' predict path
        logits = self.model(x)
        if self.tta:  # as engine.evaluate.predict_logits: log of the mean of the two views' probabilities
            logits = (logits.softmax(1) + self.model(x.flip(3)).softmax(1)).mul(0.5).log()
        z = logits / self.temperature
        probs = z.softmax(1)
        if self.score == "energy":
            score = torch.logsumexp(z, 1) * self.temperature
        else:
            score = probs.max(1).values
        return probs, score


def metadata(run: LoadedRun, *, bn_folded: bool) -> dict[str, str]:
    """String key/value pairs stored in the exported file; ``imgcls`` holds everything, the rest are shortcuts."""
    cal = run.calibration
    full = {
        "format": FORMAT,
        "imgcls_version": __version__,
        "classes": run.classes,
        "excluded_classes": run.excluded_classes,
        "img_size": run.img_size,
        "resize": run.config.resize,
        "input": INPUT_NOTE,
        "outputs": {"probabilities": "N x C calibrated", "score": f"N, {cal.score}; unknown when under threshold"},
        "tta": bool(run.config.tta),
        "bn_folded": bn_folded,
        "calibration": asdict(cal),
        "config": config_mod.to_dict(run.config),
    }
    return {
        "imgcls": json.dumps(full),
        "classes": json.dumps(run.classes),
        "img_size": str(run.img_size),
        "resize": run.config.resize,
        "threshold": "" if cal.threshold is None else repr(cal.threshold),
        "temperature": repr(cal.temperature),
    }


def _reference_split(run: LoadedRun):
    """The run's own test split (its validation split when the data has none), as imgcls eval rebuilds it."""
    from imgcls.data import prepare

    prepared = prepare(run.config)
    if prepared.classes != run.classes:
        raise ImgclsError(f"the data at {run.config.data} now gives classes {prepared.classes}, the run knows {run.classes}")
    if prepared.test is not None and len(prepared.test):
        return prepared.test
    if len(prepared.val):
        return prepared.val
    raise ImgclsError(f"{run.config.data} has no test or validation images to check the export against")


@contextmanager
def _quiet_exporter():
    """torch.onnx prints progress lines and warnings meant for developers; imgcls shows its own."""
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, *, opset: int, meta: dict[str, str]) -> None:
    """Export ``module`` to ``path`` with a dynamic batch axis, store ``meta`` and validate with onnx.checker."""
    onnx = require("onnx")
    require("onnxscript")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=["images"], output_names=["probabilities", "score"],
                dynamic_shapes=({0: batch},), opset_version=opset, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; any of them means this model cannot be exported
        raise ImgclsError(f"the ONNX exporter cannot trace this model ({_one_line(e)})") from None
    proto = program.model_proto
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ImgclsError(f"the exported ONNX model does not validate ({_one_line(e)})") from None
    onnx.save(proto, str(path))


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, *, meta: dict[str, str]) -> None:
    """Trace ``module`` (shapes other than the batch are fixed by the input contract) and save with ``meta``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, (example,), check_inputs=[(example[:1],)])
    except Exception as e:
        raise ImgclsError(f"torch.jit cannot trace this model ({_one_line(e)})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+ deprecates TorchScript for torch.export; it still loads everywhere
        torch.jit.save(traced, str(path), _extra_files={"imgcls.json": meta["imgcls"]})


def _run_exported(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """Calibrated probabilities from the exported file itself, loaded as a deployment would load it."""
    out = []
    if fmt == "onnx":
        ort = require("onnxruntime")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for start in range(0, len(images), BATCH):
            out.append(torch.from_numpy(sess.run(["probabilities"], {"images": images[start : start + BATCH].numpy()})[0]))
    else:
        model = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            for start in range(0, len(images), BATCH):
                out.append(model(images[start : start + BATCH])[0])
    return torch.cat(out).float()


def parity(reference: torch.Tensor, exported: torch.Tensor, paths: list[str], *, split: str, fmt: str) -> dict:
    """Top-1 agreement and absolute probability differences, with the paths of every image whose top-1 differs."""
    diff = (reference - exported).abs()
    differ = (reference.argmax(1) != exported.argmax(1)).nonzero().flatten().tolist()
    return {
        "images": len(paths),
        "split": split,
        "top1_agreement": 1.0 - len(differ) / max(len(paths), 1),
        "max_abs_prob_diff": float(diff.max()) if diff.numel() else 0.0,
        "mean_abs_prob_diff": float(diff.mean()) if diff.numel() else 0.0,
        "differing": [paths[i] for i in differ],
        "reference": "imgcls predict path in PyTorch, fp32, batch norms folded, calibrated",
        "exported": "onnxruntime CPUExecutionProvider" if fmt == "onnx" else "torch.jit.load on CPU",
    }


def _check_out(out: Path, fmt: str) -> None:
    want = (".onnx",) if fmt == "onnx" else (".pt", ".pth", ".ts")
    if out.suffix.lower() not in want:
        raise ImgclsError(f"--out for --format {fmt} must end with {' or '.join(want)}, got {out.name}")
    if out.is_dir():
        raise ImgclsError(f"--out {out} is a folder; give a file name")
    if not out.parent.is_dir():
        raise ImgclsError(f"--out: folder {out.parent} does not exist")


def export_run(run_dir: Path, *, fmt: str = "onnx", out: Path | None = None, opset: int | None = None) -> tuple[Path, dict]:
    """Export the run's best checkpoint to ``out``, check it against the run, write ``out.parity.json``."""
    if fmt not in ("onnx", "torchscript"):
        raise ImgclsError(f"unknown export format {fmt!r}: use onnx or torchscript")
    out = Path(out) if out is not None else Path(run_dir) / ("model.onnx" if fmt == "onnx" else "model.pt")
    _check_out(out, fmt)
    if opset is not None and fmt != "onnx":
        raise ImgclsError("--opset applies to --format onnx only")
    opset = DEFAULT_OPSET if opset is None else opset
    if fmt == "onnx":
        onnx = require("onnx")
        require("onnxruntime")
        newest = onnx.defs.onnx_opset_version()
        if not DEFAULT_OPSET <= opset <= newest:
            raise ImgclsError(f"--opset must be between {DEFAULT_OPSET} and {newest} (torch's exporter writes opset 18 and newer)")
    run = load_run(run_dir, device="cpu")
    if not (Path(run_dir) / "checkpoints" / "best.safetensors").is_file():
        progress.say(f"{run_dir} has no best checkpoint; exporting the last one")
    if run.calibration is calib.UNCALIBRATED:
        progress.say(f"note: {run.calibration.note}")
    split = _reference_split(run)
    model = inference_model(run.model, split.images, mean=run.mean, std=run.std, device=run.device)
    bn_folded = model is not run.model
    model = model.to(memory_format=torch.contiguous_format).eval()
    cal = run.calibration
    module = Deployable(model, mean=run.mean, std=run.std, temperature=cal.temperature, tta=run.config.tta, score=cal.score).eval()
    meta = metadata(run, bn_folded=bn_folded)
    example = split.images[:2].contiguous()
    with progress.task(f"exporting to {fmt}", 1) as bar:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if fmt == "onnx":
                export_onnx(module, example, tmp, opset=opset, meta=meta)
            else:
                export_torchscript(module, example, tmp, meta=meta)
            bar.advance(1)
            raw = predict_logits(model, split.images, mean=run.mean, std=run.std, device=run.device, precision="fp32", tta=run.config.tta)
            reference = (raw / cal.temperature).softmax(1)
            result = parity(reference, _run_exported(fmt, tmp, split.images), split.paths, split=split.name, fmt=fmt)
            if result["top1_agreement"] < MIN_AGREEMENT:
                names = ", ".join(Path(p).name for p in result["differing"][:10])
                more = f" and {len(result['differing']) - 10} more" if len(result["differing"]) > 10 else ""
                raise ImgclsError(
                    f"the exported model agrees with the run on only {result['top1_agreement']:.2%} of {result['images']} "
                    f"{split.name} images (< {MIN_AGREEMENT:.1%}); nothing written. Differing: {names}{more}"
                )
            result.update(format=fmt, file=out.name, opset=opset if fmt == "onnx" else None, bn_folded=bn_folded)
            write_json(out.with_name(out.name + ".parity.json"), result)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out, result


def read_metadata(path: Path) -> dict:
    """The imgcls metadata of an exported ONNX file; a one-line error when it has none."""
    onnx = require("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ImgclsError(f"{path} is not a readable ONNX file ({_one_line(e)})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if "imgcls" not in props:
        raise ImgclsError(f"{path} has no imgcls metadata (not made by imgcls export); run it with onnxruntime directly")
    return json.loads(props["imgcls"])


__all__ = ["Deployable", "export_run", "export_onnx", "export_torchscript", "parity", "read_metadata", "require"]
