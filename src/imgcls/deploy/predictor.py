"""``imgcls predict MODEL.onnx``: an exported file run by onnxruntime, fed by imgcls' own loader."""

from __future__ import annotations

from pathlib import Path

import torch

from imgcls.deploy import calibration as calib
from imgcls.deploy.export import BATCH, _one_line, read_metadata, require
from imgcls.errors import ImgclsError


class OnnxClassifier:
    """Class names, size and calibration from the file's metadata; ``classify`` runs the graph on uint8 images."""

    def __init__(self, path: Path):
        path = Path(path)
        if not path.is_file():
            raise ImgclsError(f"model file not found: {path}")
        ort = require("onnxruntime")
        meta = read_metadata(path)
        try:
            self.classes = list(meta["classes"])
            self.img_size = int(meta["img_size"])
            self.resize = str(meta.get("resize", "squash"))
            self.calibration = calib.from_json(meta["calibration"])
        except (KeyError, TypeError, ValueError) as e:
            raise ImgclsError(f"{path} has damaged imgcls metadata ({_one_line(e)})") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise ImgclsError(f"onnxruntime cannot load {path} ({_one_line(e)})") from None

    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``N x S x S x 3`` -> (calibrated probabilities ``N x C``, score ``N``)."""
        probs, scores = [], []
        for start in range(0, len(images), BATCH):
            p, s = self.session.run(["probabilities", "score"], {"images": images[start : start + BATCH].numpy()})
            probs.append(torch.from_numpy(p))
            scores.append(torch.from_numpy(s))
        return torch.cat(probs), torch.cat(scores)
