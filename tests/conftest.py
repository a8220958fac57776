"""Tiny data sets written by Pillow into temp folders; every test gets its own decode cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "intel-scenes"

# distinct colours and stripe directions make the classes learnable in a few steps
PALETTE = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (200, 180, 40), (150, 40, 180), (40, 170, 170)]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("IMGCLS_QUIET", "1")


def class_image(cls: int, i: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(cls * 1000 + i)
    base = np.array(PALETTE[cls % len(PALETTE)], dtype=np.float32)
    img = np.ones((size, size, 3), np.float32) * base
    stripes = (np.arange(size) // 4 % 2).astype(np.float32) * 50
    img += stripes[:, None, None] if cls % 2 else stripes[None, :, None]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_class_folders(root: Path, classes: list[str], per_class: int, *, size: int = 32, offset: int = 0) -> Path:
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(c, i + offset, size).save(d / f"{name}_{i + offset}.png")
    return root


def make_split_root(root: Path, classes=("cat", "dog", "fox"), *, train: int = 16, test: int = 6, size: int = 32) -> Path:
    write_class_folders(root / "train", list(classes), train, size=size)
    write_class_folders(root / "test", list(classes), test, size=size, offset=500)
    return root


@pytest.fixture
def split_root(tmp_path) -> Path:
    return make_split_root(tmp_path / "data")


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "imgcls", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )


def tree_digest(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file's size and bytes: proves a data set was not modified."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}
