"""Atomic file writers: every JSON, CSV and text file imgcls writes goes through here.

A reader (a tool, a study resuming, a person) never sees half a file: each write goes to a temp file in
the same folder, is flushed and fsynced, renamed over the target, and the folder is fsynced. A crash or
a full disk part-way leaves the previous file intact. Standard library only: importing it costs nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back (once, at import)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a run's files get the mode any new file would (0644 under umask 022)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems do not support fsync on folders
        pass
    return path


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON with a final newline, atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence | Mapping]) -> Path:
    """A header row of ``columns``, then one line per row, atomically.

    A row is a sequence (written as is) or a mapping (its values in ``columns`` order, missing keys empty).
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r.get(c, "") for c in columns] if isinstance(r, Mapping) else r)
    return write_text(path, buf.getvalue())


__all__ = ["atomic_write_bytes", "write_text", "write_json", "write_csv"]
