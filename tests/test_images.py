"""Image loading: formats and modes in, HxWx3 uint8 out; bad input -> ImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vhr_edge.errors import ImageError
from vhr_edge.images import load_image


def png_bytes(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgb_file_roundtrip(tmp_path):
    a = (np.arange(12 * 10 * 3) % 251).astype(np.uint8).reshape(10, 12, 3)
    p = tmp_path / "a.png"
    Image.fromarray(a).save(p)
    out = load_image(p)
    assert out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(load_image(str(p)), a)
    np.testing.assert_array_equal(load_image(p.read_bytes()), a)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # white band on the left
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "r.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    out = load_image(p)
    assert out.shape == (40, 20, 3)
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the band is now on top


def test_rgba_is_composited_on_white():
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    a[:2, :, 3] = 255  # top half opaque red, bottom transparent
    out = load_image(Image.fromarray(a, "RGBA"))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])
    np.testing.assert_array_equal(load_image(a), out)  # arrays follow the same rule


def test_cmyk_grayscale_palette_16bit():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    assert tuple(load_image(cmyk)[0, 0]) == (255, 0, 0)
    gray = Image.new("L", (8, 6), 128)
    assert load_image(gray).shape == (6, 8, 3) and load_image(gray)[0, 0].tolist() == [128] * 3
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    assert load_image(pal)[0, 0].tolist() == [0, 0, 255]
    a16 = np.full((5, 5), 65535, np.uint16)
    im16 = Image.fromarray(a16)
    assert load_image(png_bytes(im16))[0, 0].tolist() == [255, 255, 255]
    assert load_image(a16)[0, 0].tolist() == [255, 255, 255]
    assert load_image(np.full((3, 3, 3), 0.5))[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda d: d / "missing.png", "not found"),
        (lambda d: d, "not a file"),
        (lambda d: _write(d / "empty.png", b""), "empty"),
        (lambda d: _write(d / "text.jpg", b"hello, I am not a picture\n" * 10), "not an image"),
        (lambda d: _write(d / "trunc.png", png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))[:60]), "truncated|cannot decode"),
        (lambda d: _write(d / "trunc.jpg", _noise_jpeg()[:700]), "truncated|cannot decode"),
        (lambda d: _write(d / "bomb.png", png_bytes(Image.new("1", (10000, 8000)))), "too large"),
    ],
)
def test_bad_files(tmp_path, make, msg):
    with pytest.raises(ImageError, match=msg):
        load_image(make(tmp_path))


@pytest.mark.parametrize(
    "arr, msg",
    [
        (np.zeros((0, 4, 3), np.uint8), "no pixels"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.zeros((4, 4, 3), np.int64), "dtype"),
        (np.full((4, 4, 3), np.nan), "NaN"),
    ],
)
def test_bad_arrays(arr, msg):
    with pytest.raises(ImageError, match=msg):
        load_image(arr)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _noise_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
