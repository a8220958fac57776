"""Explanations: CAM methods from pytorch-grad-cam, overlays, and deletion/insertion faithfulness.

Names load on first use, so ``imgcls --help`` (which imports ``imgcls.explain.cli``) stays light.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "METHODS": "cam",
    "TargetLayer": "cam",
    "compute_cams": "cam",
    "resolve_layer": "cam",
    "explain_images": "core",
    "explain_paths": "core",
    "explain_run": "core",
    "deletion_insertion": "faithfulness",
    "overlay": "render",
    "panel": "render",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"imgcls.explain.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'imgcls.explain' has no attribute {name!r}")
