"""Checkpoints: one safetensors file of tensors plus JSON metadata; atomic writes; no pickle on load.

The metadata (config, class map, loop position, non-tensor optimizer/scheduler state, RNG states) is
JSON stored in the safetensors header, with a digest of every tensor's bytes so that a damaged or
tampered file is refused with a clear message rather than loaded half-right.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from imgcls.errors import ImgclsError
from imgcls.io import atomic_write_bytes

FORMAT = "imgcls-checkpoint-1"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and JSON-able ``meta`` atomically to ``path``."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = {"format": FORMAT, "digest": _digest(flat), "meta": json.dumps(meta)}
    atomic_write_bytes(Path(path), st_save(flat, metadata=header))


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint; refuses anything that is not an intact imgcls safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise ImgclsError(f"checkpoint not found: {p}")
    data = p.read_bytes()
    if data[:2] in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        raise ImgclsError(f"refused {p}: it is a pickle/zip file, and imgcls loads only safetensors checkpoints")
    try:
        tensors = st_load(data)
        from safetensors import safe_open  # header metadata is only exposed through safe_open

        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise ImgclsError(f"checkpoint {p} is damaged or not a safetensors file: {str(e)[:200]}") from None
    if header.get("format") != FORMAT:
        raise ImgclsError(f"{p} is not an imgcls checkpoint (no {FORMAT} header)")
    if _digest(tensors) != header.get("digest"):
        raise ImgclsError(f"checkpoint {p} failed its integrity check: the file was modified or damaged")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError):
        raise ImgclsError(f"checkpoint {p} has damaged metadata") from None
    return tensors, meta


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def split_state(prefix: str, state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Nested state (dicts/lists of tensors and plain values) -> (tensors by path, JSON skeleton).

    Tensors are replaced in the skeleton by ``{"__tensor__": path}``; :func:`join_state` reverses it.
    Used for optimizer, scheduler and scaler states, whose layout differs by class.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
        if isinstance(obj, (list, tuple)):
            return {"__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")

    return tensors, walk(state, prefix)


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            items = [join_state(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton.get("tuple") else items
    return skeleton
