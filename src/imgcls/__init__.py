"""imgcls: train, evaluate, explain and study image classifiers.

    import imgcls
    run = imgcls.train("photos/", out="runs/a", model="resnet18", epochs=5)
    run = imgcls.load("runs/a")

``train``, ``load`` and ``Run`` come from :mod:`imgcls.api` on first use: ``import imgcls`` loads no torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Run", "__version__", "load", "train"]


def __getattr__(name: str):
    if name in ("train", "load", "Run"):
        from imgcls import api

        return getattr(api, name)
    raise AttributeError(f"module 'imgcls' has no attribute {name!r}")
