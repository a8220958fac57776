"""Exclusive locks on folders (a run folder, a decode-cache entry being written).

``fcntl.flock`` on a lock file that holds the owner's pid and host name. The kernel drops the lock when its
process dies, so a lock file left by a crash is stale by construction: whoever opens it next gets the lock
and takes the file over. The pid and host only name the owner in the error message; the host because
nodes can share a cache folder, where a pid alone would send the user to the wrong machine's `ps`.
(The filelock package does the same on POSIX but not the owner, nor the unlink-and-recheck below.)
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from imgcls.errors import ImgclsError

LOCK_NAME = ".imgcls.lock"


def _owner(path: Path) -> str:
    try:
        fields = path.read_text().split()
    except OSError:
        return "another process"
    if not fields or not fields[0].isdigit():
        return "another process"
    return f"pid {fields[0]}" + (f" on {fields[1]}" if len(fields) > 1 else "")


def _acquire(path: Path, *, wait: bool) -> int | None:
    """An fd holding an exclusive flock on ``path`` (the file now names this process), or None if busy."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        # the holder before us may have unlinked the file while we waited: then our lock guards nothing
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    try:
        os.unlink(path)  # while still locked, so nobody locks a file that is about to vanish
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def exclusive(folder: Path, *, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; a second holder gets a one-line error naming the first."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(path, wait=False)
    if fd is None:
        raise ImgclsError(f"{what} {folder} is in use by {_owner(path)}; wait for it to finish or choose another folder")
    try:
        yield
    finally:
        _release(path, fd)
        if created:  # a run refused before it wrote anything leaves no empty folder behind
            try:
                folder.rmdir()
            except OSError:
                pass


@contextmanager
def waiting(path: Path, *, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock file ``path``, waiting for the current holder (cache writers queue up on one entry);
    ``on_wait`` is told the holder's name when this has to wait (a wait can last a whole decode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, wait=False)
    if fd is None:
        if on_wait is not None:
            on_wait(_owner(path))
        fd = _acquire(path, wait=True)
    assert fd is not None  # a blocking flock returns only once held
    try:
        yield
    finally:
        _release(path, fd)


__all__ = ["exclusive", "waiting", "LOCK_NAME"]
