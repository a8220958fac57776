"""The one table of model families: how a timm CNN splits into stem, stages and tail.

Freezing (``--freeze N``: the stem and the first N-1 stages), the frozen-feature cache (the frozen part run
once per image, the rest trained on its output) and the default Grad-CAM layer all read it, so a family
is either supported by all three or by none, and an unsupported one is a clear error, never a slow path.

Each entry names the modules of timm's ``forward_features`` in forward order: the stem, the stages (each
child of a container such as ``blocks``, or named attributes such as ``layer1``), and the tail between the
last stage and ``forward_head``. ``forward_features(x)`` equals running them in order (tested for every
family). Stages follow the modules timm's ``feature_info`` points at (``layer1``..``layer4``, ``s1``..``s4``,
``stages.i``) except in EfficientNet/MobileNetV3, whose every block (``blocks.i``) is a stage, a finer
grain than ``feature_info``'s reductions, which skip some blocks. timm's ``forward_intermediates`` stops at
the same points but cannot run the *rest* of the network from a cached intermediate, which is what the
feature cache needs; hence the table. Batch-norm folding (``models.fold``) needs no entry: it folds any
adjacent conv/norm pair and checks the result on a probe batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from timm.models import convnext, efficientnet, mobilenetv3, regnet, resnet
from torch import nn

from imgcls.errors import ImgclsError


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[type[nn.Module], ...]  # timm model classes of the family
    stem: tuple[str, ...]  # attribute names, forward order
    stages: str | tuple[str, ...]  # a container whose children are the stages, or the stage attributes
    tail: tuple[str, ...] = ()  # between the last stage and forward_head (timm's conv_head/bn2, final_conv...)

    def stage_modules(self, model: nn.Module) -> list[nn.Module]:
        if isinstance(self.stages, str):
            return list(getattr(model, self.stages))
        return [getattr(model, s) for s in self.stages]

    def stage_names(self, model: nn.Module) -> list[str]:
        if isinstance(self.stages, str):
            return [f"{self.stages}.{name}" for name, _ in getattr(model, self.stages).named_children()]
        return list(self.stages)


FAMILIES: tuple[Family, ...] = (
    Family("resnet", (resnet.ResNet,), stem=("conv1", "bn1", "act1", "maxpool"), stages=("layer1", "layer2", "layer3", "layer4")),
    Family("efficientnet", (efficientnet.EfficientNet,), stem=("conv_stem", "bn1"), stages="blocks", tail=("conv_head", "bn2")),
    # MobileNetV3's conv_head comes after global pooling, inside forward_head
    Family("mobilenetv3", (mobilenetv3.MobileNetV3,), stem=("conv_stem", "bn1"), stages="blocks"),
    Family("convnext", (convnext.ConvNeXt,), stem=("stem",), stages="stages", tail=("norm_pre",)),
    Family("regnet", (regnet.RegNet,), stem=("stem",), stages=("s1", "s2", "s3", "s4"), tail=("final_conv",)),
)


def family_of(model: nn.Module) -> Family | None:
    """The table's entry for ``model``, or None."""
    return next((f for f in FAMILIES if isinstance(model, f.classes)), None)


def _require(model: nn.Module, what: str) -> Family:
    fam = family_of(model)
    if fam is None:
        known = ", ".join(f.name for f in FAMILIES)
        raise ImgclsError(f"{what} is not supported for {type(model).__name__} (supported families: {known}); use freeze=0")
    return fam


def stages(model: nn.Module) -> list[nn.Module]:
    """The stem (stage 0, one module list) and the stages, in forward order."""
    fam = _require(model, "freezing stages")
    return [nn.ModuleList([getattr(model, s) for s in fam.stem]), *fam.stage_modules(model)]


def _check_count(model: nn.Module, n: int) -> Family:
    fam = _require(model, "freezing stages")
    total = 1 + len(fam.stage_modules(model))
    if n > total:
        raise ImgclsError(f"freeze={n} but {type(model).__name__} has {total} stages (stem included); use at most {total}")
    return fam


def split(model: nn.Module, n_frozen: int) -> tuple[Callable, Callable]:
    """``(frozen, rest)`` with ``rest(frozen(x)) == model(x)``: the stem and the first ``n_frozen - 1``
    stages, then the other stages, the tail and ``forward_head``. ``n_frozen`` must be at least 1."""
    fam = _check_count(model, n_frozen)
    stem = [getattr(model, s) for s in fam.stem]
    mods = fam.stage_modules(model)
    head_in = [getattr(model, s) for s in fam.tail]
    first, later = stem + mods[: n_frozen - 1], mods[n_frozen - 1 :] + head_in

    def frozen(x):
        for m in first:
            x = m(x)
        return x

    def rest(x):
        for m in later:
            x = m(x)
        return model.forward_head(x)

    return frozen, rest


def cam_layer(model: nn.Module) -> str | None:
    """Name of the module whose output is ``forward_features``' map (where CAM methods look), for a
    family in the table; None otherwise. An identity tail (ConvNeXt's ``norm_pre``) is skipped for the
    module it passes through."""
    fam = family_of(model)
    if fam is None:
        return None
    names = fam.stage_names(model) + list(fam.tail)
    while len(names) > 1 and isinstance(model.get_submodule(names[-1]), nn.Identity):
        names.pop()
    return names[-1]


__all__ = ["FAMILIES", "Family", "family_of", "stages", "split", "cam_layer"]
