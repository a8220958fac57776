"""The one image loader used by train, eval, predict and explain.

Pillow's ``convert('RGB')`` gets several real-world cases wrong, so the normalisation is explicit:
EXIF orientation is applied, 16-bit images are scaled (not clipped to white), alpha is composited on a
fixed background, CMYK/palette/grayscale become RGB. Files are read as bytes first, so any file name
works, and the full decode happens here, so a truncated file fails now and not hours into training.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.errors import ImgclsError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
# Image formats people keep in photo folders that this build of Pillow does not read: listed as skipped
# (with this reason) by predict and explain instead of vanishing without a row.
UNSUPPORTED_EXTENSIONS = frozenset({".heic", ".heif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2"})
BACKGROUND = (255, 255, 255)  # alpha is composited on white, the way viewers show transparent images
RESIZE_MODES = ("squash", "crop", "pad")
# pad fills with the ImageNet mean colour: after normalisation it is 0, the value the network's own zero
# padding shows at every border, so the added margin carries no content (reflection would invent mirrored
# objects at the edges), and an exported graph pads with a constant.
PAD_FILL = (124, 116, 104)
DRAFT_GAP = 2  # decode JPEGs at >= 2x the target size (as Image.thumbnail's reducing_gap): close to a full decode


class BadImage(Exception):
    """A file that cannot be used as an image; ``reason`` is short and human-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_unsupported_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in UNSUPPORTED_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.nan_to_num(a).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        bg = Image.new("RGB", img.size, BACKGROUND)
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    if mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | Path, *, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """Decode a file fully into an ``H x W x 3`` uint8 array; returns it with the original mode.

    Raises :class:`BadImage` with a reason for empty, non-image, truncated, or oversized files.
    ``max_pixels`` defaults to Pillow's decompression-bomb limit, checked from the header before decoding.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    return decode_rgb(data, max_pixels=max_pixels)


def decode_rgb(data: bytes, *, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    arr, mode, _size = _decode(data, max_pixels=max_pixels, draft=0)
    return arr, mode


def decode_square(data: bytes, size: int, *, resize: str = "squash", max_pixels: int | None = None) -> tuple[np.ndarray, str, tuple[int, int]]:
    """``size x size x 3`` uint8 pixels of an encoded image, its original mode and its (width, height).

    A large JPEG is decoded at a reduced scale (libjpeg's DCT scaling, Pillow's ``draft``) that is still at
    least ``DRAFT_GAP`` times the target on each side, then resized like any other image: a 4000 x 3000 photo
    headed for 160 px decodes at 1/8 scale, several times faster, with nearly the same pixels.
    """
    arr, mode, orig = _decode(data, max_pixels=max_pixels, draft=size * DRAFT_GAP)
    return resize_rgb(arr, size, resize), mode, orig


def _decode(data: bytes, *, max_pixels: int | None, draft: int) -> tuple[np.ndarray, str, tuple[int, int]]:
    if not data:
        raise BadImage("empty file (0 bytes)")
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if limit and w * h > limit:
                raise BadImage(f"too large: {w}x{h} pixels exceeds the limit of {limit} (decompression bomb guard)")
            mode = img.mode
            if draft and img.format == "JPEG":
                img.draft(None, (draft, draft))  # keeps the mode; no-op unless it can shrink by 2, 4 or 8
            img.load()  # the full decode: truncated data fails here
            try:
                turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # by 90 degrees: report the size as shown
                img = ImageOps.exif_transpose(img)
                w, h = (h, w) if turned else (w, h)
            except Exception:  # malformed EXIF: keep the pixels as stored rather than lose the image
                pass
            rgb = _to_rgb(img)
            arr = np.asarray(rgb, dtype=np.uint8)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too large (decompression bomb guard): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"cannot decode: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImage(f"unexpected decoded shape {arr.shape}")
    return arr, mode, (w, h)


def to_rgb_array(image) -> np.ndarray:
    """An in-memory image as the loader would give it: a PIL image (EXIF orientation applied, converted
    like a file) or an ``H x W x 3`` uint8 array (as is) -> ``H x W x 3`` uint8."""
    if isinstance(image, Image.Image):
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # malformed EXIF: the pixels as stored, as for files
            pass
        return np.asarray(_to_rgb(image), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise ImgclsError(f"an in-memory image must be a PIL image or an H x W x 3 uint8 array, got {arr.dtype} {list(arr.shape)}")
    return arr


def resize_rgb(arr: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """``H x W x 3`` uint8 to ``size x size x 3``, antialiased (bilinear). ``mode``:
    squash stretches the whole image (nothing is cut away, shapes change); crop keeps the centre square
    (shapes kept, the sides of a 4:3 photo lost); pad fits the whole image and fills the margin with
    ``PAD_FILL`` (shapes kept, nothing lost, fewer pixels for the content)."""
    h, w = arr.shape[:2]
    if h == w or mode == "squash":
        if h == size and w == size:
            return arr
        return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))
    img = Image.fromarray(arr)
    if mode == "crop":
        s = min(h, w)
        left, top = (w - s) / 2, (h - s) / 2
        box = (left, top, left + s, top + s)
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
    if mode == "pad":
        scale = size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), PAD_FILL)
        canvas.paste(img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None), ((size - nw) // 2, (size - nh) // 2))
        return np.asarray(canvas)
    raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
