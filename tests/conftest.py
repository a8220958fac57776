"""Tiny data sets written by Pillow into temp folders; every test gets its own decode cache."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# `make test` runs one pytest-xdist worker per core; each worker's torch (and every CLI process it starts,
# which inherits the variable) then takes its share of the cores instead of all of them, so the workers'
# thread pools do not fight over the same cores. Set before any test module imports torch.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

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


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600,
            process: bool = False) -> subprocess.CompletedProcess:
    """The real CLI: ``imgcls.cli.main``, the parser and commands a user's shell reaches. By default in this
    test process, which saves the ~3 s of interpreter and torch start-up a fresh process costs on every
    call (about 50 calls in the suite); stdout/stderr are captured, an uncaught exception becomes a
    traceback in stderr and exit status 1 as it would from ``python -m imgcls``. ``process=True`` (or a
    ``cwd``) runs ``python -m imgcls`` in a fresh interpreter, for what only a new process shows: start-up,
    signals, the current directory, state a second call must not inherit; ``timeout`` applies there only."""
    if process or cwd is not None:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "imgcls", *args],
            capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
        )
    return _run_cli_here(list(args), env or {})


def _run_cli_here(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    from imgcls.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors, --help, --version
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["imgcls", *argv], code, out.getvalue(), err.getvalue())


def tree_digest(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file's size and bytes: proves a data set was not modified."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}
