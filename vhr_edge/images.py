"""Reading images for the engine: anything Pillow opens, plus PIL images and numpy arrays.

Output is always an HxWx3 uint8 C-contiguous RGB array: EXIF orientation applied,
alpha composited on white, CMYK / palette / grayscale converted, 16-bit and float scaled.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

# Larger than any camera frame we expect; a decompression bomb is refused before decoding.
MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 200 * 1024 * 1024

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


def describe(src: ImageSource) -> str:
    """A short name for messages and JSON output."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL {src.mode} {src.width}x{src.height}>"
    if isinstance(src, np.ndarray):
        return f"<array {'x'.join(map(str, src.shape))} {src.dtype}>"
    return f"<{type(src).__name__}>"


def load_image(src: ImageSource, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return src as an HxWx3 uint8 RGB array, or raise ImageError saying what is wrong."""
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels)
    if isinstance(src, Image.Image):
        return _from_pil(src, describe(src), max_pixels)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ImageError(f"image not found: {path}")
        if not path.is_file():
            raise ImageError(f"not a file: {path}")
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"empty file: {path}")
        if size > MAX_FILE_BYTES:
            raise ImageError(f"image file too large ({size} bytes > {MAX_FILE_BYTES}): {path}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
        return _from_bytes(data, str(path), max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(src), describe(bytes(src)), max_pixels)
    raise ImageError(f"unsupported image source {describe(src)}")


def _from_bytes(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    if not data:
        raise ImageError(f"empty image data: {name}")
    try:
        with warnings.catch_warnings():  # our own pixel limit below decides, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"not an image file (or a format Pillow cannot read): {name}") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image too large (decompression bomb?): {name}") from None
    except OSError as e:
        raise ImageError(f"cannot decode {name}: {e}") from None
    return _from_pil(im, name, max_pixels)


def _from_pil(im: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h}): {name}")
    if w * h > max_pixels:
        raise ImageError(f"image too large ({w}x{h} = {w * h} pixels > {max_pixels}; decompression bomb?): {name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except Image.DecompressionBombError:
        raise ImageError(f"image too large (decompression bomb?): {name}") from None
    except (OSError, ValueError, SyntaxError) as e:
        msg = str(e) or type(e).__name__
        raise ImageError(f"cannot decode {name} ({msg}); truncated or corrupt?") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return _from_array((a / top * 255.0 + 0.5).clip(0, 255).astype(np.uint8), MAX_PIXELS)
    if im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        scale = 255.0 if a.max() <= 1.0 else 1.0
        return _from_array((a * scale + 0.5).clip(0, 255).astype(np.uint8), MAX_PIXELS)
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def _from_array(a: np.ndarray, max_pixels: int) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    h, w = a.shape[:2]
    if h == 0 or w == 0:
        raise ImageError(f"image array has no pixels (shape {a.shape})")
    if h * w > max_pixels:
        raise ImageError(f"image array too large ({w}x{h} pixels > {max_pixels})")
    if a.dtype == np.uint16:
        a = (a.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError("image array has NaN or infinite values")
        a = (a.astype(np.float64).clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ImageError(f"unsupported image array dtype {a.dtype} (use uint8, uint16 or float in [0, 1])")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 4:
        rgb, alpha = a[:, :, :3].astype(np.float64), a[:, :, 3:4].astype(np.float64) / 255.0
        a = (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a, dtype=np.uint8)
