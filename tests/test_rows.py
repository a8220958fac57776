"""Bounded memory: splits are rows of the decode cache's file, read a batch at a time; decoding writes in chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_class_folders
from imgcls.config import TrainConfig
from imgcls.data import ImageRows, prepare
from imgcls.data import cache as cache_mod
from imgcls.data import rows as rows_mod
from imgcls.data.images import decode_square
from imgcls.data.sources import Pool
from imgcls.engine.train import train
from imgcls.errors import ImgclsError


def _npy(tmp_path: Path, n: int = 11, size: int = 4) -> tuple[Path, np.ndarray]:
    a = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    path = tmp_path / "rows.npy"
    np.save(path, a)
    return path, a


def _of(path: Path) -> ImageRows:
    m = np.load(path, mmap_mode="r")
    return ImageRows.of_file(path, offset=m.offset, shape=m.shape)


def test_rows_of_a_file_read_like_the_array(tmp_path):
    path, a = _npy(tmp_path)
    rows = _of(path)
    assert len(rows) == 11 and rows.shape == (11, 4, 4, 3) and rows.dtype == torch.uint8 and not rows.in_memory
    for idx in ([3, 1, 2, 10, 0], [5, 5, 4], [7], list(range(11)), [], [9, 8, 7, 6]):  # any order, repeats, runs
        assert np.array_equal(rows.take(idx).numpy(), a[idx].reshape(len(idx), 4, 4, 3)), idx
    assert np.array_equal(rows.take(torch.tensor([2, 0])).numpy(), a[[2, 0]])
    assert np.array_equal(rows[2:9:3].numpy(), a[2:9:3]) and np.array_equal(rows[-1].numpy(), a[-1])
    view = rows.select(np.array([8, 2, 5, 1]))  # a view reads nothing; a view of a view composes
    assert np.array_equal(view[1:3].numpy(), a[[2, 5]]) and np.array_equal(view.select(slice(2, None))[0].numpy(), a[5])
    assert np.array_equal(torch.cat([c for _, c in rows.chunks(4)]).numpy(), a)
    assert np.array_equal(view.to("cpu", chunk_bytes=100).numpy(), a[[8, 2, 5, 1]])  # filled 2 rows at a time
    with pytest.raises(IndexError):
        rows.take([11])


def test_rows_of_a_tensor_answer_alike(tmp_path):
    _path, a = _npy(tmp_path)
    rows = ImageRows.of_tensor(torch.from_numpy(a))
    assert rows.in_memory and len(rows) == 11
    assert np.array_equal(rows.take([3, 1, 3]).numpy(), a[[3, 1, 3]])
    assert np.array_equal(rows.select(np.array([4, 0])).take([1, 0]).numpy(), a[[0, 4]])
    assert np.array_equal(rows.select(slice(3, 6))[1:].numpy(), a[4:6])


def test_a_cache_file_cut_short_under_a_reader_is_one_clear_error(tmp_path):
    path, _a = _npy(tmp_path)
    rows = _of(path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 10)
    assert rows.take([0]).shape == (1, 4, 4, 3)
    with pytest.raises(ImgclsError, match="ends early"):
        rows.take([10])


def test_decoding_writes_rows_a_chunk_at_a_time_and_skips_bad_files(tmp_path, monkeypatch):
    write_class_folders(tmp_path / "d", ["a", "b"], 5, size=16)
    files = sorted(str(p) for p in (tmp_path / "d").rglob("*.png"))
    (tmp_path / "d" / "a" / "bad.png").write_bytes(b"not an image")
    files.insert(4, str(tmp_path / "d" / "a" / "bad.png"))  # a skipped item inside the second chunk
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 3 * 8 * 8 * 3)  # 3 rows a chunk: 9 rows in 3 writes
    dec = cache_mod.decode_pool(Pool("all", files, [Path(f).parent.name for f in files]), size=8, workers=2)
    assert len(dec.skipped) == 1 and dec.images.shape == (10, 8, 8, 3) and len(dec.rows) == 10
    good = [f for f in files if not f.endswith("bad.png")]
    want = np.stack([decode_square(Path(f).read_bytes(), 8)[0] for f in good])
    assert dec.paths == good
    assert np.array_equal(np.asarray(dec.images), want) and np.array_equal(dec.rows[:].numpy(), want)
    (entry,) = (cache_mod.cache_root() / "entries").iterdir()  # no temp folder left beside it
    assert (entry / "check.json").is_file()


def test_a_split_is_rows_of_the_cache_file_and_training_reads_them_there(tmp_path, monkeypatch):
    """What keeps memory flat: a split holds no pixels, and every batch is read from the cache file."""
    write_class_folders(tmp_path / "d", ["a", "b"], 10)
    cfg = TrainConfig(data=str(tmp_path / "d"), model="resnet18", img_size=32, epochs=1, batch_size=4, precision="fp32",
                      augment="none", ema=0, tensorboard=False, val_fraction=0.2, test_fraction=0.2)
    read = []
    real = rows_mod._RowFile.read_into

    def counting(self, out, file_rows):
        read.append(len(file_rows))
        return real(self, out, file_rows)

    monkeypatch.setattr(rows_mod._RowFile, "read_into", counting)
    monkeypatch.setattr(cache_mod, "SAMPLE_ROWS", 2)  # the entry's digest reads 2 rows when written and when opened
    data = prepare(cfg)
    assert sum(read) <= 4  # beyond its integrity sample, preparing reads no pixels: they stay in the cache file
    for split in (data.train, data.val, data.test):
        assert isinstance(split.images, ImageRows) and not split.images.in_memory
        for i in (0, len(split) - 1):
            assert np.array_equal(split.images[i].numpy(), decode_square(Path(split.paths[i]).read_bytes(), 32)[0])
    read.clear()
    result, trained = train(cfg, run_dir=tmp_path / "run")
    assert not trained.train.images.in_memory
    assert sum(read) >= len(trained.train) // 4 * 4 + len(trained.val)  # one epoch of batches, then validation


def test_the_entry_digest_read_through_the_file_is_the_one_entries_already_carry(tmp_path):
    """Entries written before the digest read its rows with positional reads must still check out."""
    import hashlib

    path, a = _npy(tmp_path, n=300)
    h = hashlib.blake2b(digest_size=16)  # the formula over the in-memory array, as the digest was first written
    h.update(str(a.shape).encode())
    for r in np.unique(np.linspace(0, len(a) - 1, cache_mod.SAMPLE_ROWS).astype(np.int64)):
        h.update(a[r].tobytes())
    assert cache_mod._images_digest(_of(path)) == h.hexdigest()
