"""CAM methods from pytorch-grad-cam over any timm CNN: target-layer discovery and a hook-safe runner.

pytorch-grad-cam owns the methods (nothing here re-implements one); this module decides *where* to
look (the last module whose output is the spatial map ``forward_features`` returns) and makes sure the
caller's model comes back unchanged: hooks released, train/eval mode, ``requires_grad`` and ``.grad``
restored. Explanations run in fp32: the library turns activations into NumPy arrays, which have no bf16.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgcls.errors import ImgclsError
from imgcls.models import families

# name -> (pytorch_grad_cam class name, needs gradients)
METHODS: dict[str, tuple[str, bool]] = {
    "gradcam": ("GradCAM", True),
    "gradcam++": ("GradCAMPlusPlus", True),
    "eigencam": ("EigenCAM", False),
    "layercam": ("LayerCAM", True),
    "scorecam": ("ScoreCAM", False),
}

# ScoreCAM builds a ``B x C x 3 x H x W`` tensor of masked inputs per call: keep it under this size
SCORECAM_BYTES = 512 * 2**20


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ImgclsError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)} or all")
    return method


@contextlib.contextmanager
def _unchanged(model: nn.Module, *, freeze: bool) -> Iterator[None]:
    """Restore mode, ``requires_grad`` and ``.grad`` of every parameter on exit.

    With ``freeze`` the parameters stop requiring grad inside: CAM gradients then reach the target
    layer through the input (which requires grad) and backward skips every weight gradient.
    """
    was_training = model.training
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    try:
        if freeze:
            for p in params:
                p.requires_grad_(False)
        yield
    finally:
        for p, (req, grad) in zip(params, saved):
            p.requires_grad_(req)
            p.grad = grad
        model.train(was_training)


def _spatial_outputs(model: nn.Module, img_size: int) -> tuple[list[tuple[str, tuple[int, ...]]], tuple[int, ...]]:
    """Every named module's output shape in the order the modules *finished* during
    ``forward_features`` on one dummy image, and the shape ``forward_features`` returned."""
    if not hasattr(model, "forward_features"):
        raise ImgclsError(f"{type(model).__name__} has no forward_features; pass --layer NAME")
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []

    def hook(name):
        def fn(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                order.append((name, tuple(output.shape)))
        return fn

    device = next(model.parameters()).device
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook(name)))
        with _unchanged(model, freeze=False), torch.no_grad():
            model.eval()
            feats = model.forward_features(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(feats, torch.Tensor):
        raise ImgclsError(f"{type(model).__name__}.forward_features returns {type(feats).__name__}, not a feature map")
    return order, tuple(feats.shape)


@dataclass(frozen=True)
class TargetLayer:
    name: str
    module: nn.Module
    shape: tuple[int, ...]  # output shape for one image: 1 x C x h x w

    @property
    def channels(self) -> int:
        return self.shape[1]


def _no_spatial_map(model: nn.Module, shape: tuple[int, ...]) -> ImgclsError:
    return ImgclsError(
        f"{type(model).__name__} has no spatial feature map (forward_features gives shape {list(shape)}); "
        "CAM methods need a CNN, or --layer NAME of a layer with a B x C x H x W output"
    )


def resolve_layer(model: nn.Module, img_size: int, layer: str | None = None) -> TargetLayer:
    """The layer to explain: ``layer`` (a dotted module name) or, by default, the module whose output is
    the spatial map ``forward_features`` returns: the family table's (``models.families``: ``layer4`` in
    a ResNet, ``bn2`` in an EfficientNet) or, for another CNN, the last module found giving that map.
    Raises ImgclsError for unknown names and for models without a ``B x C x H x W`` map (a ViT's tokens,
    for example)."""
    order, ff_shape = _spatial_outputs(model, img_size)
    shapes = dict(order)  # a module called twice keeps its last output
    if layer is None:
        if len(ff_shape) != 4:
            raise _no_spatial_map(model, ff_shape)
        name = families.cam_layer(model) or next((n for n, s in reversed(order) if s == ff_shape), None)
        if name is None:
            raise ImgclsError(f"no module of {type(model).__name__} outputs its feature map; pass --layer NAME")
    else:
        name = layer
        if name not in shapes:
            spatial = list(dict.fromkeys(n for n, s in order if len(s) == 4))
            hint = f"; candidates: {', '.join(spatial[-6:])}" if spatial else ""
            known = name in dict(model.named_modules())
            why = "is not used by forward_features" if known else "does not exist"
            raise ImgclsError(f"layer {name!r} {why} in {type(model).__name__}{hint}")
        if len(shapes[name]) != 4:
            raise ImgclsError(f"layer {name!r} outputs shape {list(shapes[name])}, not a B x C x H x W map")
    return TargetLayer(name=name, module=dict(model.named_modules())[name], shape=shapes[name])


def _cam_class(method: str):
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, METHODS[check_method(method)][0])


@contextlib.contextmanager
def _quiet_scorecam() -> Iterator[None]:
    """ScoreCAM draws a tqdm bar per image on stderr; our own progress bar covers it."""
    from pytorch_grad_cam import score_cam

    original = score_cam.tqdm
    score_cam.tqdm = types.SimpleNamespace(tqdm=lambda it, *a, **k: it)
    try:
        yield
    finally:
        score_cam.tqdm = original


def image_batch_for(method: str, batch_size: int, *, layer: TargetLayer, img_size: int) -> int:
    """Images per CAM call: ScoreCAM's memory grows with channels x pixels, so it takes fewer."""
    if method != "scorecam":
        return batch_size
    per_image = layer.channels * 3 * img_size * img_size * 4
    return max(1, min(batch_size, SCORECAM_BYTES // per_image))


def compute_cams(
    model: nn.Module,
    x: torch.Tensor,
    targets: list[int],
    *,
    method: str,
    layer: TargetLayer,
    batch_size: int = 16,
) -> np.ndarray:
    """``N x H x W`` float32 maps in [0, 1] for normalised float input ``x`` (``N x 3 x H x W``).

    ``targets`` holds one class index per image. The model is returned exactly as it came.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = _cam_class(method)
    uses_grad = METHODS[method][1]
    per_call = image_batch_for(method, batch_size, layer=layer, img_size=x.shape[-1])
    out = []
    with _unchanged(model, freeze=True), _quiet_scorecam():
        for start in range(0, len(x), per_call):
            xb = x[start : start + per_call].detach()
            tb = [ClassifierOutputTarget(int(t)) for t in targets[start : start + per_call]]
            cam = cls(model=model, target_layers=[layer.module])
            cam.batch_size = max(batch_size, 32)  # ScoreCAM: masked copies per forward pass
            # the library's __exit__ releases the hooks but swallows IndexError: call it in a finally
            # so hooks go on every path and every error still reaches the caller
            try:
                if uses_grad:
                    out.append(cam(xb.requires_grad_(True), tb))
                else:
                    with torch.no_grad():
                        out.append(cam(xb, tb))
            finally:
                cam.__exit__(None, None, None)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0,) + tuple(x.shape[2:]), np.float32)

