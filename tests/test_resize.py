"""Resize modes (squash, crop, pad) and the reduced-scale decode of large JPEGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgcls.config import TrainConfig
from imgcls.data import prepare
from imgcls.data.images import PAD_FILL, decode_rgb, decode_square, resize_rgb
from conftest import class_image


def _wide() -> np.ndarray:
    """40 x 80: left quarter red, right quarter blue, middle green."""
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:60] = (0, 255, 0)
    a[:, 60:] = (0, 0, 255)
    return a


def test_squash_keeps_everything_crop_keeps_the_centre_pad_fills_with_the_mean():
    a = _wide()
    sq = resize_rgb(a, 20, "squash")
    assert sq.shape == (20, 20, 3) and sq[10, 0, 0] > 200 and sq[10, -1, 2] > 200  # both sides kept
    cr = resize_rgb(a, 20, "crop")
    assert cr.shape == (20, 20, 3) and (cr[:, :, 1] > 200).all()  # the centre square is all green
    pd = resize_rgb(a, 20, "pad")
    assert pd.shape == (20, 20, 3)
    assert tuple(pd[0, 10]) == PAD_FILL and tuple(pd[-1, 10]) == PAD_FILL  # 5-px bands above and below
    assert pd[10, 0, 0] > 200 and pd[10, -1, 2] > 200 and pd[10, 10, 1] > 200  # the whole image, smaller
    with pytest.raises(ValueError, match="resize mode"):
        resize_rgb(a, 20, "stretch")


def test_square_images_are_the_same_in_every_mode():
    a = np.asarray(class_image(1, 0, 48))
    assert np.array_equal(resize_rgb(a, 24, "crop"), resize_rgb(a, 24, "squash"))
    assert np.array_equal(resize_rgb(a, 24, "pad"), resize_rgb(a, 24, "squash"))


def _photo(w: int, h: int) -> bytes:
    """A JPEG with smooth structure and detail, like a photo (no real photo in the repo)."""
    rng = np.random.default_rng(0)
    low = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(low, np.float32) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_large_jpeg_reduced_decode_stays_close_to_the_full_decode():
    data = _photo(2000, 1500)
    full, _ = decode_rgb(data)
    for mode in ("squash", "crop", "pad"):
        fast, m, size = decode_square(data, 96, resize=mode)
        assert (m, size) == ("RGB", (2000, 1500))  # the original mode and size are reported, not the draft's
        ref = resize_rgb(full, 96, mode)
        diff = np.abs(fast.astype(np.int16) - ref.astype(np.int16))
        assert diff.mean() < 2.0, (mode, diff.mean())  # of 255 levels


def test_exif_rotated_jpeg_reports_the_size_as_shown():
    img = Image.fromarray(np.zeros((30, 60, 3), np.uint8))  # stored 60 wide, 30 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: shown 30 wide, 60 high
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    _, _, size = decode_square(buf.getvalue(), 16)
    assert size == (30, 60)


def test_resize_mode_is_part_of_the_cache_key(tmp_path):
    root = tmp_path / "data"
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.asarray(class_image(c, i, 32))[:, :16].copy()).save(root / name / f"{i}.png")  # 16 x 32
    base = dict(data=str(root), img_size=16, val_fraction=0.25, test_fraction=0.25)
    squash = prepare(TrainConfig(**base)).train.images[:]  # every row, read from the cache
    crop = prepare(TrainConfig(**base, resize="crop")).train.images[:]
    pad = prepare(TrainConfig(**base, resize="pad")).train.images[:]
    assert not np.array_equal(squash.numpy(), crop.numpy())
    assert (pad[:, :, 0].numpy() == np.array(PAD_FILL, np.uint8)).all()  # left column is margin
    assert np.array_equal(prepare(TrainConfig(**base)).train.images[:].numpy(), squash.numpy())  # cache hit
