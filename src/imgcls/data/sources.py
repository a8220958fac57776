"""Find the images and labels of a data set, whatever its layout, without reading pixels.

Layouts:
- a split root: ``train/`` and ``test/`` (optional ``val/``), each a folder of class folders;
- a folder of class folders only (train/val/test are carved from it, stratified and seeded);
- a CSV of ``path,label`` with an optional ``split`` column (paths relative to the CSV);
- the built-in name ``fashion-mnist`` (Debian's package files).

A *pool* is what is stored together on disk (a split folder, a CSV split, the whole class folder);
``prepare._assign`` later turns pools into train/val/test row indices, so changing a fraction never
re-decodes anything.
"""

from __future__ import annotations

import csv
import gzip
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.data.images import is_image_name
from imgcls.errors import ImgclsError

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
FASHION_MNIST_DIR = Path(os.environ.get("IMGCLS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)


@dataclass
class Pool:
    """Files (or, for built-in sets, arrays) stored together, with their label names."""

    name: str  # "train", "val", "test" or "all"
    paths: list[str]  # absolute paths; for array pools, synthetic ids like "fashion-mnist/train/12"
    labels: list[str]
    arrays: np.ndarray | None = None  # N x H x W x 3 uint8 for built-in sets

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Discovery:
    kind: str  # "split-root" | "class-folders" | "csv" | "fashion-mnist"
    root: str
    pools: dict[str, Pool]
    ignored_by_extension: dict[str, int] = field(default_factory=dict)
    empty_class_folders: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: links out of the root, run folders


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


OUTSIDE = "a symlink to outside the data root"


def is_run_folder(p: Path) -> bool:
    """A folder imgcls wrote a run into (config.json + checkpoints/): never data, wherever it lies."""
    return (p / "config.json").is_file() and (p / "checkpoints").is_dir()


def inside(p: Path, root: Path) -> bool:
    """The one symlink policy of every source: what a path finally points at must lie inside ``root``
    (already resolved). Links within the data set are fine; a link out of it is skipped and reported."""
    return p.resolve().is_relative_to(root)


def _scan_class_folders(folder: Path, ignored: Counter, empty: list[str], root: Path, skipped: list[dict]) -> tuple[list[str], list[str]]:
    """``folder/<class>/**/<image>`` -> (paths, labels); hidden entries skipped, other extensions counted."""
    paths: list[str] = []
    labels: list[str] = []
    for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p)):
        if is_run_folder(cls_dir):
            skipped.append({"path": str(cls_dir.absolute()), "reason": "an imgcls run folder, not a class"})
            continue
        if not inside(cls_dir, root):
            skipped.append({"path": str(cls_dir.absolute()), "reason": OUTSIDE})
            continue
        n = 0
        runs_inside = 0
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=False):
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                if is_run_folder(Path(dirpath, d)):
                    skipped.append({"path": str(Path(dirpath, d).absolute()), "reason": "an imgcls run folder, not data"})
                    runs_inside += 1
                    continue
                keep.append(d)
            dirnames[:] = keep
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                if is_image_name(fn):
                    full = Path(dirpath, fn)
                    if full.is_symlink() and not inside(full, root):
                        skipped.append({"path": str(full.absolute()), "reason": OUTSIDE})
                        continue
                    paths.append(str(full.absolute()))
                    labels.append(cls_dir.name)
                    n += 1
                else:
                    ignored[Path(fn).suffix.lower() or "(none)"] += 1
        if n == 0 and not runs_inside:  # a folder holding only runs (the default runs/) is not a class
            empty.append(str(cls_dir))
    return paths, labels


def _loose_files(folder: Path, ignored: Counter) -> None:
    for p in folder.iterdir():
        if p.is_file() and _visible(p):
            ignored[p.suffix.lower() or "(none)"] += 1


def discover(data: str) -> Discovery:
    """Describe ``data`` as pools of (path, label); raises ImgclsError for anything unusable."""
    if data.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _fashion_mnist()
    root = Path(data).expanduser()
    if not root.exists():
        raise ImgclsError(f"data not found: {data}")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return _from_csv(root)
        raise ImgclsError(f"data must be a folder, a .csv file or 'fashion-mnist'; got the file {data}")
    ignored: Counter = Counter()
    empty: list[str] = []
    skipped: list[dict] = []
    real_root = root.resolve()
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and _visible(p)}
    split_dirs = {SPLIT_NAMES[k]: v for k, v in subdirs.items() if k in SPLIT_NAMES}
    pools: dict[str, Pool] = {}
    if "train" in split_dirs:
        for split, folder in sorted(split_dirs.items()):
            if not inside(folder, real_root):
                skipped.append({"path": str(folder.absolute()), "reason": OUTSIDE})
                continue
            paths, labels = _scan_class_folders(folder, ignored, empty, real_root, skipped)
            _loose_files(folder, ignored)
            pools[split] = Pool(split, paths, labels)
        kind = "split-root"
    elif "test" in split_dirs and len(subdirs) == len(split_dirs):
        # an evaluation-only root (test/ without train/)
        paths, labels = _scan_class_folders(split_dirs["test"], ignored, empty, real_root, skipped)
        pools["test"] = Pool("test", paths, labels)
        kind = "split-root"
    else:
        paths, labels = _scan_class_folders(root, ignored, empty, real_root, skipped)
        _loose_files(root, ignored)
        pools["all"] = Pool("all", paths, labels)
        kind = "class-folders"
    if empty:
        raise ImgclsError(f"empty class folder(s), holding no image files: {', '.join(empty)}")
    if not any(len(p) for p in pools.values()):
        raise ImgclsError(
            f"no images found in {data}: expected class subfolders of images, or train/ and test/ split folders"
        )
    return Discovery(kind, str(root.absolute()), pools, dict(ignored), empty, skipped)


def _from_csv(path: Path) -> Discovery:
    root = path.parent.resolve()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ImgclsError(f"cannot read CSV {path}: {e}") from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ImgclsError(f"CSV {path} needs a header with columns path,label (and optionally split)")
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    ignored: Counter = Counter()
    skipped: list[dict] = []
    for i, row in enumerate(rows, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise ImgclsError(f"CSV {path} line {i}: empty path or label")
        target = Path(os.path.normpath(root / rel))
        if not target.is_relative_to(root):  # written as ../ or an absolute path: the CSV itself is wrong
            raise ImgclsError(f"CSV {path} line {i}: path {rel!r} escapes the data root {root}")
        if not inside(target, root):  # a link out of the root: the same policy as folders
            skipped.append({"path": str(target), "reason": OUTSIDE})
            continue
        if not is_image_name(target):
            ignored[target.suffix.lower() or "(none)"] += 1
            continue
        split_raw = (row.get("split") or "").strip().lower()
        if split_raw and split_raw not in SPLIT_NAMES:
            raise ImgclsError(f"CSV {path} line {i}: unknown split {split_raw!r} (use train, val or test)")
        split = SPLIT_NAMES.get(split_raw, "all")
        ps, ls = by_split.setdefault(split, ([], []))
        ps.append(str(target))
        ls.append(label)
    if "all" in by_split and len(by_split) > 1:
        raise ImgclsError(f"CSV {path}: some rows have a split and some do not; give every row a split or none")
    pools = {k: Pool(k, ps, ls) for k, (ps, ls) in sorted(by_split.items())}
    if not pools:
        raise ImgclsError(f"CSV {path} lists no image files")
    if "all" not in pools and "train" not in pools and "test" not in pools:
        raise ImgclsError(f"CSV {path}: rows with split values need at least a train or a test split")
    return Discovery("csv", str(root), pools, dict(ignored), skipped=skipped)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ImgclsError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist() -> Discovery:
    d = FASHION_MNIST_DIR
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [str(d / f) for pair in files.values() for f in pair if not (d / f).is_file()]
    if missing:
        raise ImgclsError(
            f"Fashion-MNIST files not found under {d}. Install Debian's package: "
            "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist "
            "(or point IMGCLS_FASHION_MNIST_DIR at a folder holding the four IDX .gz files)"
        )
    pools = {}
    for split, (img_f, lab_f) in files.items():
        imgs = _read_idx(d / img_f)  # N x 28 x 28
        labs = _read_idx(d / lab_f)
        rgb = np.repeat(imgs[..., None], 3, axis=3)
        pools[split] = Pool(
            split,
            [f"fashion-mnist/{split}/{i}" for i in range(len(imgs))],
            [FASHION_MNIST_CLASSES[int(i)] for i in labs],
            arrays=rgb,
        )
    return Discovery("fashion-mnist", str(d), pools)


def source_files(disc: Discovery) -> list[Path]:
    """Files whose content identifies built-in array pools (for cache keys)."""
    if disc.kind == "fashion-mnist":
        return sorted(Path(disc.root).glob("*.gz"))
    return []


def stratified_split(
    labels: list[str], fractions: dict[str, float], *, seed: int
) -> dict[str, np.ndarray]:
    """Row indices per split: per class, shuffle with ``seed`` and cut off each fraction.

    ``fractions`` maps split names to their share; the remainder goes to "train". A class with at least
    two images keeps at least one in train.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {k: [] for k in ["train", *fractions]}
    labels_arr = np.asarray(labels)
    for cls in sorted(set(labels)):
        idx = np.flatnonzero(labels_arr == cls)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for split, frac in fractions.items():
            n = int(round(frac * len(idx)))
            if frac > 0 and n == 0 and len(idx) - start >= 3:
                n = 1  # tiny classes still get a validation/test image
            n = min(n, max(len(idx) - start - 1, 0))
            out[split].extend(idx[start : start + n].tolist())
            start += n
        out["train"].extend(idx[start:].tolist())
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}
