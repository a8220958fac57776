"""The one loader: every odd but valid image becomes the right RGB picture; every bad file a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgcls.data.images import BadImage, decode_rgb, load_rgb


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _marked(w=40, h=20) -> Image.Image:
    """Red left half, blue right half, a green square in the top-left corner: orientation is visible."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    a[:5, :5] = (0, 255, 0)
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation):
    upright = np.asarray(_marked())
    # store the pixels so that applying the EXIF orientation gives the upright picture back
    inverse = {
        1: lambda im: im,
        2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
        4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
        6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
        7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
        8: lambda im: im.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    stored = inverse(_marked())
    exif = Image.Exif()
    exif[0x0112] = orientation
    arr, _ = decode_rgb(_bytes(stored, "PNG", exif=exif))
    assert arr.shape == upright.shape
    assert np.abs(arr.astype(int) - upright.astype(int)).max() < 3


def test_malformed_exif_keeps_the_image():
    data = _bytes(_marked(), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    arr, _ = decode_rgb(data)
    assert arr.shape == (20, 40, 3)


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    arr, mode = decode_rgb(_bytes(cmyk, "JPEG", quality=100))
    assert mode == "CMYK"
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    arr, _ = decode_rgb(_bytes(rgba, "PNG"))
    assert (arr == 255).all()
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    arr, _ = decode_rgb(_bytes(half, "PNG"))
    assert 120 < arr.mean() < 135


def test_palette_with_transparency():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    p.info["transparency"] = 0
    arr, _ = decode_rgb(_bytes(p, "PNG", transparency=0))
    assert (arr == 255).all()


def test_16bit_is_scaled_not_clipped():
    a = np.full((8, 8), 32768, np.uint16)  # mid-grey in 16 bits
    arr, mode = decode_rgb(_bytes(Image.fromarray(a), "PNG"))
    assert mode.startswith("I")
    assert 120 <= arr.mean() <= 135  # convert('RGB') would have clipped this to white


def test_grayscale_to_rgb():
    arr, mode = decode_rgb(_bytes(Image.new("L", (4, 4), 77), "PNG"))
    assert mode == "L" and arr.shape == (4, 4, 3) and (arr == 77).all()


def test_truncated_jpeg_is_a_reason():
    data = _bytes(_marked(200, 200), "JPEG")
    with pytest.raises(BadImage, match="decode"):
        decode_rgb(data[: len(data) // 2])


def test_zero_byte_and_text_files():
    with pytest.raises(BadImage, match="empty"):
        decode_rgb(b"")
    with pytest.raises(BadImage, match="not an image"):
        decode_rgb(b"this is text, named .jpg")


def test_decompression_bomb_refused_from_header():
    data = _bytes(Image.new("L", (300, 300)), "PNG")
    with pytest.raises(BadImage, match="too large"):
        decode_rgb(data, max_pixels=10_000)


def test_unicode_file_names(tmp_path):
    p = tmp_path / "猫の写真 é.png"
    _marked().save(p)
    arr, _ = load_rgb(p)
    assert arr.shape == (20, 40, 3)
