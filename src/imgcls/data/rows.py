"""A split's ``N x S x S x 3`` uint8 images, read a batch at a time from the decode cache's file.

Training, evaluation and prediction never need the whole split at once: each step asks for the rows of
one batch. Holding every split as one tensor made the process grow with the data set (86 GB of uint8 for an
ImageNet-sized set at 150 px), and so would a memory map: the pages of a map that a process touches count
in its resident set, so one epoch over a mapped 2 GB entry leaves the process 2 GB large. Rows here are
read with positional reads (``os.preadv``) into a fresh batch buffer instead; they pass through the
kernel's page cache, which the kernel can drop, and never become part of the process.

Why by hand: numpy's ``memmap`` and ``fromfile`` are the library tools for reading such a file, but the
first maps (see above) and the second reads one contiguous range per call through a Python file object, with
no scattered reads into a caller's buffer; ``preadv`` does that in one system call per run of rows.

:class:`ImageRows` is the one interface: file-backed for the decode cache, or wrapping a tensor (small sets
built in memory, predict's loose files, a set copied whole onto a GPU) so callers need not tell them apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from imgcls.errors import ImgclsError


class _RowFile:
    """An open cache file of fixed-size rows after a header; the descriptor is held, so a cache entry rebuilt
    (renamed over) while a run reads it does not change what the run reads."""

    def __init__(self, path: str, offset: int, rows: int, row_shape: tuple[int, ...]):
        self.path, self.offset, self.rows, self.row_shape = path, offset, rows, tuple(row_shape)
        self.row_bytes = int(np.prod(row_shape))
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def read_into(self, out: np.ndarray, file_rows: np.ndarray) -> None:
        """``out[j] = row file_rows[j]`` for every j, reading in file order; a run of rows adjacent both in the
        file and in ``out`` is one call (a sequential chunk is a single read)."""
        if not len(file_rows):
            return
        order = np.argsort(file_rows, kind="stable")
        src = file_rows[order]
        breaks = np.flatnonzero((np.diff(order) != 1) | (np.diff(src) != 1)) + 1
        flat = out.reshape(len(out), self.row_bytes)
        for s, e in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(order)].tolist()):
            first = int(order[s])
            self._pread(flat[first : first + (e - s)], int(src[s]))

    def _pread(self, dest: np.ndarray, row: int) -> None:
        view = memoryview(dest).cast("B")
        pos, want = self.offset + row * self.row_bytes, view.nbytes
        done = 0
        while done < want:
            got = _pread_into(self.fd, view[done:], pos + done)
            if got <= 0:
                raise ImgclsError(f"the decode cache file {self.path} ends early (row {row} of {self.rows}); delete it to rebuild it")
            done += got


class ImageRows:
    """``N x S x S x 3`` uint8 images: ``take(indices)`` (and ``[...]``) read rows into a tensor, ``select``
    is a view of some rows that reads nothing."""

    def __init__(self, *, tensor: torch.Tensor | None = None, file: _RowFile | None = None, index: np.ndarray | None = None):
        assert (tensor is None) != (file is None)
        self._tensor, self._file = tensor, file
        self._index = index  # row i is file row index[i]; None: the tensor's or the file's rows in order
        n = len(index) if index is not None else (len(tensor) if tensor is not None else file.rows)
        self.shape = torch.Size((n, *(tensor.shape[1:] if tensor is not None else file.row_shape)))

    @classmethod
    def of_tensor(cls, images: torch.Tensor) -> ImageRows:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"ImageRows holds N x S x S x 3 uint8, got {images.dtype} {list(images.shape)}")
        return cls(tensor=images)

    @classmethod
    def of_file(cls, path: str | os.PathLike, *, offset: int, shape: tuple[int, ...], index: np.ndarray | None = None) -> ImageRows:
        """Rows of a file holding ``shape`` (C order, uint8) after ``offset`` header bytes (an ``.npy``)."""
        return cls(file=_RowFile(os.fspath(path), offset, shape[0], shape[1:]),
                   index=None if index is None else np.asarray(index, dtype=np.int64))

    # -- what a tensor of the images would answer -------------------------------------------------------------
    def __len__(self) -> int:
        return self.shape[0]

    dtype = torch.uint8

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    @property
    def device(self) -> torch.device:
        return self._tensor.device if self._tensor is not None else torch.device("cpu")

    @property
    def in_memory(self) -> bool:
        return self._tensor is not None

    def __repr__(self) -> str:
        where = f"file {self._file.path}" if self._file is not None else f"tensor on {self.device}"
        return f"ImageRows({list(self.shape)}, {where})"

    # -- reading ----------------------------------------------------------------------------------------------
    def take(self, indices) -> torch.Tensor:
        """The rows ``indices`` (ints, an int array or tensor) in that order, as a ``K x S x S x 3`` uint8 tensor
        (on the tensor's device when in memory, else a fresh host tensor)."""
        if self._tensor is not None:
            if self._index is not None:
                idx = torch.as_tensor(self._index[_as_numpy(indices)], device=self._tensor.device)
            else:
                idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices, dtype=np.int64))
                idx = idx.to(self._tensor.device)
            return self._tensor[idx]
        idx = _as_numpy(indices)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} images")
        idx = idx % max(len(self), 1)
        file_rows = self._index[idx] if self._index is not None else idx
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        self._file.read_into(out, file_rows)
        return torch.from_numpy(out)

    def __getitem__(self, key) -> torch.Tensor:
        """``rows[i]`` (one image), ``rows[a:b]`` (a tensor of those rows), ``rows[indices]`` (:meth:`take`)."""
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            return self.take(np.asarray([int(key)]))[0]
        return self.take(key)

    def select(self, key) -> ImageRows:
        """The rows ``key`` (a slice or indices) as ImageRows, reading nothing."""
        picked = np.arange(len(self))[key] if isinstance(key, slice) else _as_numpy(key)
        if self._index is not None:
            picked = self._index[picked]
        if self._tensor is not None and isinstance(key, slice) and self._index is None:
            return ImageRows(tensor=self._tensor[key])
        return ImageRows(tensor=self._tensor, file=self._file, index=np.asarray(picked, dtype=np.int64))

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, images[start : start + rows])`` over the whole set."""
        for start in range(0, len(self), rows):
            yield start, self[start : start + rows]

    def to(self, device: torch.device | str, *, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
        """All rows as one tensor on ``device``, filled a chunk at a time (the host holds one chunk, not the set)."""
        device = torch.device(device)
        if self._tensor is not None and self._index is None:
            return self._tensor.to(device)
        out = torch.empty(tuple(self.shape), dtype=torch.uint8, device=device)
        per = max(1, chunk_bytes // max(1, int(np.prod(self.shape[1:]))))
        for start, chunk in self.chunks(per):
            out[start : start + len(chunk)].copy_(chunk)
        return out


def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    if hasattr(os, "preadv"):  # straight into the buffer
        return os.preadv(fd, [view], pos)
    data = os.pread(fd, view.nbytes, pos)  # platforms without preadv: one extra copy
    view[: len(data)] = data
    return len(data)


def _as_numpy(indices) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        return indices.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    return np.asarray(indices, dtype=np.int64).reshape(-1)


__all__ = ["ImageRows"]
