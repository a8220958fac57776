"""Decode each pool once into a uint8 ``N x S x S x 3`` array on disk, read a batch at a time by later runs.

This is also the verification scan: every file is fully decoded here, and the ones that fail are
recorded with a reason instead of crashing a worker hours into training. Entries live outside the data
set (``$IMGCLS_CACHE`` or ``~/.cache/imgcls``) and are keyed by the files' content and the image size.
A quick index keyed by (path, size, mtime) avoids re-reading unchanged files. Nothing in the data set
is ever written.

Several processes may fill one cache at once: temp names are unique, renames atomic, and writers of one
entry take turns on a lock. Each entry records its file sizes and digests when written and is checked
against them when opened; a damaged entry is reported and rebuilt.

Memory stays bounded by a chunk, not the pool: decoded rows go to the entry's file ``CHUNK_BYTES`` at a
time, and readers get :class:`~imgcls.data.rows.ImageRows` over the file (positional reads, no map).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls import locks, progress
from imgcls.data.images import BadImage, decode_square, resize_rgb
from imgcls.data.rows import ImageRows
from imgcls.data.sources import Pool
from imgcls.errors import ImgclsError
from imgcls.io import write_text

CACHE_VERSION = "2"  # 2: entries carry check.json (sizes and digests)
CHUNK_BYTES = 32 * 2**20  # decoded rows held before they are written: 680 images at 128 px


def cache_root() -> Path:
    return Path(os.environ.get("IMGCLS_CACHE") or Path.home() / ".cache" / "imgcls")


@dataclass
class DecodedPool:
    """A pool's usable images; ``rows[i]`` is item i's row in ``images``, or -1 when it was skipped."""

    name: str
    images: np.ndarray  # M x S x S x 3 uint8 (memory-mapped: for whole-pool scans such as the audit's)
    paths: list[str]  # M, usable items only
    labels: list[str]  # M
    hashes: list[str]  # M, content hash of each file
    skipped: list[dict]  # {"path", "reason"}
    modes: dict[str, int]
    sizes: dict[str, int]  # "WxH" -> count (top entries)
    rows: ImageRows | None = None  # the same M images, read a batch at a time without mapping them

    def select(self, rows: np.ndarray) -> ImageRows:
        """Images ``rows`` (of the M usable ones) as ImageRows over the entry's file: nothing is read yet."""
        assert self.rows is not None
        return self.rows.select(np.asarray(rows, dtype=np.int64))


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


class Damaged(Exception):
    """A cache entry that exists but does not match what was recorded when it was written."""


SAMPLE_ROWS = 256  # image rows in an entry's digest: spread over the whole file, ~17 MB at 150 px


def _digest_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _images_digest(rows: ImageRows) -> str:
    """Shape plus up to ``SAMPLE_ROWS`` rows spread evenly (first and last included). Hashing every row
    would cost ~6 s per run for a 1 GB entry on a 2-core laptop (blake2b ran at 150 MB/s there); the
    recorded sizes catch truncation, this digest damage to the array's header and to the sampled rows.
    The rows are read, not touched through the memory map: the kernel maps whole large folios around each
    touched page, so 256 touches spread over a 2 GB entry left 500 MB of it in the process."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(int(d) for d in rows.shape)).encode())  # as numpy prints a shape, e.g. "(2000, 128, 128, 3)"
    n = len(rows)
    sample = np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).astype(np.int64)) if n else np.zeros(0, np.int64)
    for part in np.array_split(sample, max(1, len(sample) // 32)):  # 32 rows a read: a few MB at most
        h.update(rows.take(part).numpy().tobytes())
    return h.hexdigest()


def _npy_rows(path: Path) -> tuple[np.ndarray, ImageRows]:
    """The ``.npy`` as a memory map (nothing touched) and as ImageRows read through the file."""
    images = np.load(path, mmap_mode="r")
    if images.dtype != np.uint8 or images.ndim != 4 or not images.flags.c_contiguous:
        raise Damaged(f"{path.name} holds {images.dtype} {list(images.shape)}, not N x S x S x 3 uint8 rows")
    return images, ImageRows.of_file(path, offset=images.offset, shape=images.shape)


def _open_entry(entry: Path, pool: Pool) -> DecodedPool | None:
    """The entry as a DecodedPool; None when there is none; :class:`Damaged` when it fails its checks."""
    if not entry.exists():
        return None
    try:
        check = json.loads((entry / "check.json").read_text())
        meta_bytes = (entry / "meta.json").read_bytes()
        images_size = (entry / "images.npy").stat().st_size
        if len(meta_bytes) != check["meta_bytes"] or images_size != check["images_bytes"]:
            raise Damaged(f"file sizes differ from those written (images.npy {images_size:,} of {check['images_bytes']:,} bytes)")
        if _digest_bytes(meta_bytes) != check["meta_digest"]:
            raise Damaged("meta.json does not match its digest")
        meta = json.loads(meta_bytes)
        images, image_rows = _npy_rows(entry / "images.npy")
        if _images_digest(image_rows) != check["images_digest"]:
            raise Damaged("images.npy does not match its digest")
        rows = meta["rows"]
        if len(rows) != len(pool) or images.shape[0] != sum(r >= 0 for r in rows):
            raise Damaged("its rows do not match the pool")
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
            rows=image_rows,
        )
    except Damaged:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, ImgclsError) as e:
        raise Damaged(f"{type(e).__name__}: {str(e)[:120]}") from None


def _checked_entry(entry: Path, pool: Pool, warned: set[Path]) -> DecodedPool | None:
    """:func:`_open_entry`, with a damaged entry reported (once) and treated as absent."""
    try:
        return _open_entry(entry, pool)
    except Damaged as e:
        if entry not in warned:
            warned.add(entry)
            progress.say(f"warning: decode cache entry {entry} is damaged ({e}); rebuilding it")
        return None


@contextmanager
def _scratch(parent: Path) -> Iterator[Path]:
    """A unique temp folder beside the entries, removed on the way out unless it was renamed into an entry."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape})
    return buf.getvalue()


class _RowsWriter:
    """An ``.npy`` of at most ``n`` uint8 rows, written ``CHUNK_BYTES`` at a time as they arrive.

    The header is written first for ``n`` rows and rewritten in place at the end for the rows received; numpy
    pads a header so that the first dimension's digits do not change its length (checked below). Why by hand:
    ``np.save`` needs the whole array and ``open_memmap`` writes through a map, whose dirty pages the process
    would hold, which is the memory this avoids."""

    def __init__(self, path: Path, n: int, row_shape: tuple[int, ...]):
        self.row_shape = tuple(row_shape)
        self.header = _npy_header((n, *self.row_shape))
        self.f = path.open("wb")
        self.f.write(self.header)
        per = max(1, CHUNK_BYTES // max(1, int(np.prod(self.row_shape))))
        self.buf = np.empty((min(per, max(n, 1)), *self.row_shape), dtype=np.uint8)
        self.k = 0  # rows in buf
        self.m = 0  # rows received

    def add(self, row: np.ndarray) -> None:
        self.buf[self.k] = row
        self.k += 1
        self.m += 1
        if self.k == len(self.buf):
            self._flush()

    def _flush(self) -> None:
        if self.k:
            self.f.write(self.buf[: self.k].data)
            self.k = 0

    def close(self) -> int:
        """Write what is left and the final header; returns the number of rows."""
        try:
            self._flush()
            header = _npy_header((self.m, *self.row_shape))
            if len(header) != len(self.header):  # numpy's growth padding makes this impossible; never write a bad file
                raise RuntimeError(f"npy header length changed from {len(self.header)} to {len(header)} bytes")
            self.f.seek(0)
            self.f.write(header)
        finally:
            self.f.close()
        return self.m


def _write_entry(entry: Path, tmp: Path, meta: dict) -> None:
    """Complete ``tmp`` (a temp folder beside the entry holding images.npy) and rename it into place: readers
    never see a half entry. Callers hold the entry's lock, so no other writer is between the check and the rename."""
    if entry.exists():  # damaged (the caller checked): move it aside first, as one rename
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=entry.parent))
        os.replace(entry, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)
    meta_bytes = json.dumps(meta).encode()
    (tmp / "meta.json").write_bytes(meta_bytes)
    check = {
        "images_bytes": (tmp / "images.npy").stat().st_size,
        "meta_bytes": len(meta_bytes),
        "meta_digest": _digest_bytes(meta_bytes),
        "images_digest": _images_digest(_npy_rows(tmp / "images.npy")[1]),
    }
    (tmp / "check.json").write_text(json.dumps(check))
    os.replace(tmp, entry)


def _filled(entry: Path, pool: Pool, warned: set[Path], tmp: Path, make: Callable[[], dict]) -> DecodedPool:
    """The entry, made from ``tmp`` (``make()`` leaves images.npy there and returns the meta) unless another
    process already wrote it; writers of one entry take turns on its lock file (four processes filling one
    cache once clashed here)."""
    with locks.waiting(entry.parent / f"{entry.name}.lock"):
        hit = _checked_entry(entry, pool, warned)
        if hit is None:
            _write_entry(entry, tmp, make())
            hit = _open_entry(entry, pool)
    assert hit is not None  # just written and checked
    return hit


def _in_order(ex: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``ex.map(fn, items)`` with at most ``ahead`` results waiting: ``map`` submits every item at once, so
    decoded images would pile up whenever the consumer fell behind (Python 3.14's ``buffersize`` does this)."""
    it = iter(items)
    pending: deque = deque(ex.submit(fn, x) for _, x in zip(range(ahead), it))
    while pending:
        result = pending.popleft().result()
        for x in it:
            pending.append(ex.submit(fn, x))
            break
        yield result


def _write_index(index: Path, key: str) -> None:
    write_text(index, json.dumps({"key": key}))  # a unique temp name per writer, then a rename


def decode_pool(pool: Pool, *, size: int, resize: str = "squash", source_id: str = "", workers: int | None = None) -> DecodedPool:
    """Decoded, verified pixels of ``pool`` at ``size x size`` (made square by ``resize``), from the cache when possible."""
    root = cache_root()
    warned: set[Path] = set()
    if pool.arrays is not None:
        return _decode_arrays(pool, size=size, resize=resize, source_id=source_id, root=root, warned=warned)
    index = root / "index" / (_stat_key(pool, size, resize) + ".json")
    hit = _indexed(index, root, pool, warned)
    if hit is not None:
        return hit
    # Decoding is the long part: processes that need these files in this cache (the first rank of each node
    # sharing one cache folder, runs started side by side) take turns here, so one decodes and the others
    # read its entry instead of decoding the same files again. Entry locks are taken inside, never around.
    def told(owner: str) -> None:
        progress.say(f"waiting for {owner}, which is decoding the {pool.name} split into {root}")

    with locks.waiting(index.with_suffix(".lock"), on_wait=told):
        hit = _indexed(index, root, pool, warned)
        if hit is None:
            key, hit = _decode_files(pool, size=size, resize=resize, workers=workers, root=root, warned=warned)
            _write_index(index, key)
    return hit


def _indexed(index: Path, root: Path, pool: Pool, warned: set[Path]) -> DecodedPool | None:
    """The entry ``index`` points at, if it is there and sound."""
    try:
        key = json.loads(index.read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no index (or a damaged one): decode, which rewrites it
    return _checked_entry(root / "entries" / str(key), pool, warned)


def _decode_files(pool: Pool, *, size: int, resize: str, workers: int | None, root: Path, warned: set[Path]) -> tuple[str, DecodedPool]:
    """Decode every file of ``pool`` and store the entry; -> (its content key, the entry)."""
    n = len(pool)
    workers = workers or min(8, os.cpu_count() or 1)
    rows = [-1] * n
    reasons = [""] * n
    hashes = [""] * n
    modes: Counter = Counter()
    sizes: Counter = Counter()
    with _scratch(root / "entries") as tmp:
        # Rows go to the file as they come (skipped items take none), a chunk at a time: memory stays one chunk.
        out = _RowsWriter(tmp / "images.npy", n, (size, size, 3))
        try:
            with progress.task(f"decoding {pool.name}", n) as bar, ThreadPoolExecutor(workers) as ex:
                decoded = _in_order(ex, lambda p: _decode_one(p, size, resize), pool.paths, ahead=4 * workers)
                for i, (arr, mode_or_reason, wh, digest) in enumerate(decoded):
                    hashes[i] = digest
                    if arr is None:
                        reasons[i] = mode_or_reason
                    else:
                        rows[i] = out.m
                        out.add(arr)
                        modes[mode_or_reason] += 1
                        sizes[wh] += 1
                    bar.advance(1)
        finally:
            out.close()
        key = _content_key(hashes, size, resize)
        meta = {
            "rows": rows,
            "reasons": reasons,
            "hashes": hashes,
            "modes": dict(modes),
            "sizes": dict(sizes.most_common(20)),
            "size": size,
        }
        return key, _filled(root / "entries" / key, pool, warned, tmp, lambda: meta)


def _decode_arrays(pool: Pool, *, size: int, resize: str, source_id: str, root: Path, warned: set[Path]) -> DecodedPool:
    """Built-in sets arrive as arrays; resizing them is the only work to cache."""
    assert pool.arrays is not None
    key = hashlib.blake2b(f"{CACHE_VERSION}|{size}|{resize}|{source_id}|{pool.name}".encode(), digest_size=16).hexdigest()
    entry = root / "entries" / key
    hit = _checked_entry(entry, pool, warned)
    if hit is not None:
        return hit

    def make(tmp: Path) -> dict:
        hashes = [hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest() for a in pool.arrays]
        out = _RowsWriter(tmp / "images.npy", len(pool), (size, size, 3))
        try:
            with progress.task(f"resizing {pool.name}", len(pool)) as bar:
                for a in pool.arrays:
                    out.add(resize_rgb(a, size, resize))  # as it is when already size x size
                    bar.advance(1)
        finally:
            out.close()
        h, w = pool.arrays.shape[1:3]
        return {
            "rows": list(range(len(pool))),
            "reasons": [""] * len(pool),
            "hashes": hashes,
            "modes": {"L": len(pool)},
            "sizes": {f"{w}x{h}": len(pool)},
            "size": size,
        }

    with _scratch(entry.parent) as tmp:
        return _filled(entry, pool, warned, tmp, lambda: make(tmp))


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
