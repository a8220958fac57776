"""Decode each pool once into a uint8 ``N x S x S x 3`` array on disk, memory-mapped by later runs.

This is also the verification scan: every file is fully decoded here, and the ones that fail are
recorded with a reason instead of crashing a worker hours into training. Entries live outside the data
set (``$IMGCLS_CACHE`` or ``~/.cache/imgcls``) and are keyed by the files' content and the image size.
A quick index keyed by (path, size, mtime) avoids re-reading unchanged files. Nothing in the data set
is ever written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls import progress
from imgcls.data.images import BadImage, decode_square, resize_rgb
from imgcls.data.sources import Pool

CACHE_VERSION = "1"


def cache_root() -> Path:
    return Path(os.environ.get("IMGCLS_CACHE") or Path.home() / ".cache" / "imgcls")


@dataclass
class DecodedPool:
    """A pool's usable images; ``rows[i]`` is item i's row in ``images``, or -1 when it was skipped."""

    name: str
    images: np.ndarray  # M x S x S x 3 uint8 (memory-mapped)
    paths: list[str]  # M, usable items only
    labels: list[str]  # M
    hashes: list[str]  # M, content hash of each file
    skipped: list[dict]  # {"path", "reason"}
    modes: dict[str, int]
    sizes: dict[str, int]  # "WxH" -> count (top entries)


def _stat_key(pool: Pool, size: int, resize: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{CACHE_VERSION}|{size}|{resize}|".encode())
    for p in pool.paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def _content_key(file_hashes: list[str], size: int, resize: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{CACHE_VERSION}|{size}|{resize}|".encode())
    for fh in file_hashes:
        h.update(fh.encode())
    return h.hexdigest()


def _decode_one(path: str, size: int, resize: str) -> tuple[np.ndarray | None, str, str, str]:
    """-> (pixels or None, mode or reason, original "WxH", content hash)"""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}", "", "unreadable"
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        arr, mode, (w, h) = decode_square(data, size, resize=resize)
    except BadImage as e:
        return None, e.reason, "", digest
    return arr, mode, f"{w}x{h}", digest


def _load_entry(entry: Path, pool: Pool) -> DecodedPool | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    rows = meta["rows"]
    if len(rows) != len(pool) or images.shape[0] != sum(r >= 0 for r in rows):
        return None
    keep = [i for i, r in enumerate(rows) if r >= 0]
    return DecodedPool(
        name=pool.name,
        images=images,
        paths=[pool.paths[i] for i in keep],
        labels=[pool.labels[i] for i in keep],
        hashes=[meta["hashes"][i] for i in keep],
        skipped=[{"path": pool.paths[i], "reason": meta["reasons"][i]} for i, r in enumerate(rows) if r < 0],
        modes=meta["modes"],
        sizes=meta["sizes"],
    )


def _write_entry(entry: Path, images: np.ndarray, meta: dict) -> None:
    """Write into a temp folder beside the entry, then rename: readers never see a half entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        np.save(tmp / "images.npy", images)
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def decode_pool(pool: Pool, *, size: int, resize: str = "squash", source_id: str = "", workers: int | None = None) -> DecodedPool:
    """Decoded, verified pixels of ``pool`` at ``size x size`` (made square by ``resize``), from the cache when possible."""
    root = cache_root()
    if pool.arrays is not None:
        return _decode_arrays(pool, size=size, resize=resize, source_id=source_id, root=root)
    index = root / "index" / (_stat_key(pool, size, resize) + ".json")
    if index.is_file():
        try:
            key = json.loads(index.read_text())["key"]
            hit = _load_entry(root / "entries" / key, pool)
            if hit is not None:
                return hit
        except (OSError, ValueError, KeyError):
            pass
    n = len(pool)
    workers = workers or min(8, os.cpu_count() or 1)
    # The buffer is sized for every item; skipped rows are compacted away at the end.
    buf = np.empty((n, size, size, 3), dtype=np.uint8)
    rows = [-1] * n
    reasons = [""] * n
    hashes = [""] * n
    modes: Counter = Counter()
    sizes: Counter = Counter()
    m = 0
    with progress.task(f"decoding {pool.name}", n) as bar, ThreadPoolExecutor(workers) as ex:
        for i, (arr, mode_or_reason, wh, digest) in enumerate(ex.map(lambda p: _decode_one(p, size, resize), pool.paths)):
            hashes[i] = digest
            if arr is None:
                reasons[i] = mode_or_reason
            else:
                buf[m] = arr
                rows[i] = m
                m += 1
                modes[mode_or_reason] += 1
                sizes[wh] += 1
            bar.advance(1)
    images = buf[:m]
    key = _content_key(hashes, size, resize)
    meta = {
        "rows": rows,
        "reasons": reasons,
        "hashes": hashes,
        "modes": dict(modes),
        "sizes": dict(sizes.most_common(20)),
        "size": size,
    }
    entry = root / "entries" / key
    if not (entry / "meta.json").is_file():
        _write_entry(entry, images, meta)
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp_index = index.with_suffix(".tmp")
    tmp_index.write_text(json.dumps({"key": key}))
    os.replace(tmp_index, index)
    hit = _load_entry(entry, pool)
    assert hit is not None  # just written
    return hit


def _decode_arrays(pool: Pool, *, size: int, resize: str, source_id: str, root: Path) -> DecodedPool:
    """Built-in sets arrive as arrays; resizing them is the only work to cache."""
    assert pool.arrays is not None
    key = hashlib.blake2b(f"{CACHE_VERSION}|{size}|{resize}|{source_id}|{pool.name}".encode(), digest_size=16).hexdigest()
    entry = root / "entries" / key
    if not (entry / "meta.json").is_file():
        hashes = [hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest() for a in pool.arrays]
        if pool.arrays.shape[1] == size:
            images = pool.arrays
        else:
            images = np.empty((len(pool), size, size, 3), dtype=np.uint8)
            with progress.task(f"resizing {pool.name}", len(pool)) as bar:
                for i, a in enumerate(pool.arrays):
                    images[i] = resize_rgb(a, size, resize)
                    bar.advance(1)
        h, w = pool.arrays.shape[1:3]
        meta = {
            "rows": list(range(len(pool))),
            "reasons": [""] * len(pool),
            "hashes": hashes,
            "modes": {"L": len(pool)},
            "sizes": {f"{w}x{h}": len(pool)},
            "size": size,
        }
        _write_entry(entry, images, meta)
    hit = _load_entry(entry, pool)
    assert hit is not None
    return hit


def peek_sizes(pool: Pool, limit: int = 200) -> Counter:
    """Image sizes from the headers of the first ``limit`` files (cheap: no decode)."""
    from PIL import Image

    sizes: Counter = Counter()
    if pool.arrays is not None:
        sizes[(pool.arrays.shape[2], pool.arrays.shape[1])] = len(pool)
        return sizes
    for p in pool.paths[:limit]:
        try:
            with Image.open(p) as im:
                sizes[im.size] += 1
        except Exception:  # a bad file is reported by the full scan, not here
            continue
    return sizes


__all__ = ["DecodedPool", "decode_pool", "cache_root", "peek_sizes"]
