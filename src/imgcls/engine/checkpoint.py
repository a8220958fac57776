"""Checkpoints: one safetensors file of tensors plus JSON metadata; atomic writes; no pickle on load.

The metadata (config, class map, loop position, non-tensor optimizer/scheduler state, RNG states) is
JSON stored in the safetensors header, with a digest of every tensor's bytes so that a damaged or
tampered file is refused with a clear message rather than loaded half-right.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from imgcls.errors import ImgclsError
from imgcls.io import atomic_write_bytes

FORMAT = "imgcls-checkpoint-2"  # -2: the digest covers the metadata too
LEGACY_FORMATS = ("imgcls-checkpoint-1",)  # digest over the tensors only; still read, metadata still validated


def _digest(tensors: dict[str, torch.Tensor], meta_json: str | None = None) -> str:
    h = hashlib.blake2b(digest_size=16)
    if meta_json is not None:
        h.update(b"meta\0" + meta_json.encode() + b"\0")
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
    meta_json = json.dumps(meta)
    header = {"format": FORMAT, "digest": _digest(flat, meta_json), "meta": meta_json}
    atomic_write_bytes(Path(path), st_save(flat, metadata=header))


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint; refuses anything that is not an intact imgcls safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise ImgclsError(f"checkpoint not found: {p}")
    data = p.read_bytes()
    # safetensors opens with an 8-byte header length and "{"; that length's first bytes can read as a
    # pickle's magic (a 1,152-byte header starts b"\x80\x04"), so sniff for pickles only when it is not
    looks_safetensors = len(data) >= 9 and data[8:9] == b"{"
    if not looks_safetensors and data[:2] in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        raise ImgclsError(f"refused {p}: it is a pickle/zip file, and imgcls loads only safetensors checkpoints")
    try:
        tensors = st_load(data)
        from safetensors import safe_open  # header metadata is only exposed through safe_open

        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise ImgclsError(f"checkpoint {p} is damaged or not a safetensors file: {str(e)[:200]}") from None
    fmt = header.get("format")
    if fmt != FORMAT and fmt not in LEGACY_FORMATS:
        raise ImgclsError(f"{p} is not an imgcls checkpoint (no {FORMAT} header)")
    meta_json = header.get("meta")
    if not isinstance(meta_json, str):
        raise ImgclsError(f"checkpoint {p} has no metadata")
    if _digest(tensors, meta_json if fmt == FORMAT else None) != header.get("digest"):
        raise ImgclsError(f"checkpoint {p} failed its integrity check: the file was modified or damaged")
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError:
        raise ImgclsError(f"checkpoint {p} has damaged metadata") from None
    if not isinstance(meta, dict):
        raise ImgclsError(f"checkpoint {p} has damaged metadata: expected a mapping, got {type(meta).__name__}")
    return tensors, meta


def _finite_numbers(v: Any, n: int) -> bool:
    return (
        isinstance(v, list) and len(v) == n
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    )


def check_run_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate what a run checkpoint's metadata drives (labels, input size, normalisation, config) by
    type and range; every problem is a one-line error naming the key. Returns ``meta``.

    The digest makes an accidental edit fail the integrity check; this catches a file whose digest was
    recomputed after editing, or written by something else, before it flips labels or allocates 30 GB.
    """
    from imgcls import config as config_mod  # config imports nothing from here; kept local all the same

    def bad(key: str, why: str) -> ImgclsError:
        return ImgclsError(f"checkpoint {where}: metadata {key} {why}")

    if not isinstance(meta.get("config"), dict):
        raise bad("config", "is missing or not a mapping")
    try:
        config_mod.from_dict(meta["config"], where=f"checkpoint {where}: metadata config")
    except TypeError as e:  # a value of a type from_dict does not convert (a bug-free file never has one)
        raise bad("config", f"is not valid: {config_mod.short(str(e))}") from None
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise bad("classes", "must be a list of at least two class names")
    if len(set(classes)) != len(classes):
        raise bad("classes", "holds a name twice")
    excluded = meta.get("excluded_classes", [])
    if not isinstance(excluded, list) or not all(isinstance(c, str) for c in excluded):
        raise bad("excluded_classes", "must be a list of class names")
    size = meta.get("img_size")
    if not isinstance(size, int) or isinstance(size, bool) or not config_mod.IMG_SIZE_MIN <= size <= config_mod.IMG_SIZE_MAX:
        raise bad("img_size", f"must be an integer in [{config_mod.IMG_SIZE_MIN}, {config_mod.IMG_SIZE_MAX}], got {config_mod.short(size)}")
    if not _finite_numbers(meta.get("mean"), 3):
        raise bad("mean", f"must be 3 finite numbers, got {config_mod.short(meta.get('mean'))}")
    std = meta.get("std")
    if not _finite_numbers(std, 3) or min(std) <= 0:
        raise bad("std", f"must be 3 finite numbers above 0, got {config_mod.short(std)}")
    return meta


def load_run_meta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`load` for a run's checkpoint: its metadata validated by :func:`check_run_meta`."""
    tensors, meta = load(path)
    return tensors, check_run_meta(meta, str(path))


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
