"""LLaVA image preprocessing as the models were trained, done here with Pillow (docs/real-models.md).

libmtmd is then handed tiles of exactly the mmproj's image size, which it uses as they are
(clip.cpp copies a same-size image) and only normalizes with the mmproj's mean and std.

LLaVA-1.5 (one tile), ``--image-mode``:
* ``pad`` (default): LLaVA-1.5 as released (``image_aspect_ratio: pad``): ``expand2square`` with
  the mean colour, then CLIP's resize and centre crop (a no-op crop on a square). HF:
  ``LlavaImageProcessor(do_pad=True)``.
* ``crop``: HF's ``CLIPImageProcessor``: the short side resized to the image size (bicubic),
  then the centre cropped. This is what llava-hf checkpoints' processors do by default.
* ``native``: the image as it is, libmtmd's own preprocessing (a bicubic resize that keeps the
  aspect ratio, then padding with the mean colour; for an anyres mmproj its tiles and overview
  without LLaVA-1.6's unpadding and newline rows). For comparisons with llama.cpp.

LLaVA-1.6 (an mmproj with ``clip.vision.image_grid_pinpoints``; pad and crop alike): anyres as
the original LLaVA-1.6 and HF ``LlavaNextImageProcessor`` / ``LlavaNextForConditionalGeneration``
do it: the best pinpoint resolution, a bicubic resize keeping the aspect ratio, black padding
centred, 336-px tiles row by row, plus the whole image squashed to 336x336 as the base tile; the
rows are then packed as LLaVA-1.6 packs them (``pack_anyres``): the base tile's rows, then the
tiles' feature map with the padding removed and ``image_newline`` after each row.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

IMAGE_MODES = ("pad", "crop", "native")


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    if img.shape[1] == width and img.shape[0] == height:
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC), dtype=np.uint8)


def expand2square(img: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """LLaVA's expand2square: centre the image on a square of `fill` colour (offset (max - short) // 2)."""
    h, w = img.shape[:2]
    if h == w:
        return img
    n = max(h, w)
    out = np.empty((n, n, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    top, left = (n - h) // 2, (n - w) // 2
    out[top:top + h, left:left + w] = img
    return out


def resize_and_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """CLIPImageProcessor: the short side to `size` (the long one int(size * long / short)),
    bicubic, then the central size x size (offsets (dim - size) // 2)."""
    h, w = img.shape[:2]
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    img = _resize(img, nw, nh)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(img[top:top + size, left:left + size])


def mean_colour(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """LLaVA-1.5's pad colour: tuple(int(x * 255) for x in image_mean)."""
    return tuple(int(x * 255) for x in image_mean[:3])  # type: ignore[return-value]


def llava15_tile(img: np.ndarray, mode: str, size: int, image_mean: Sequence[float]) -> np.ndarray:
    """The one size x size tile of a LLaVA-1.5 image (mode "pad" or "crop")."""
    if mode == "pad":
        img = expand2square(img, mean_colour(image_mean))
    elif mode != "crop":
        raise ValueError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    return resize_and_center_crop(img, size)


# ---- LLaVA-1.6 anyres

def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """HF / LLaVA-1.6: the (height, width) that keeps the most of the image, then wastes the least."""
    best, best_eff, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    assert best is not None
    return best


def anyres_tiles(img: np.ndarray, size: int, pinpoints: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], tuple[int, int]]:
    """([base tile, tile (0,0), tile (0,1), ...], (rows, cols)): LLaVA-1.6's tiles of one image."""
    h, w = img.shape[:2]
    th, tw = select_best_resolution(h, w, pinpoints)
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.ceil(h * sw), th)
    else:
        nw, nh = min(math.ceil(w * sh), tw), th
    canvas = np.zeros((th, tw, 3), np.uint8)  # black, pasted at the centre (remainder right/bottom)
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[top:top + nh, left:left + nw] = _resize(img, nw, nh)
    rows, cols = th // size, tw // size
    tiles = [_resize(img, size, size)]
    tiles += [np.ascontiguousarray(canvas[r * size:(r + 1) * size, c * size:(c + 1) * size])
              for r in range(rows) for c in range(cols)]
    return tiles, (rows, cols)


def unpad(feat: np.ndarray, height: int, width: int) -> np.ndarray:
    """HF unpad_image on a [H, W, D] feature map: drop the rows/columns that were padding."""
    ch, cw = feat.shape[:2]
    if width / height > cw / ch:
        new_h = int(round(height * (cw / width), 7))
        pad = (ch - new_h) // 2
        return feat[pad:ch - pad]
    new_w = int(round(width * (ch / height), 7))
    pad = (cw - new_w) // 2
    return feat[:, pad:cw - pad]


def pack_anyres(rows: np.ndarray, grid: tuple[int, int], image_hw: tuple[int, int], n_side: int,
                newline: np.ndarray | None) -> np.ndarray:
    """LLaVA-1.6's image rows from the tiles' rows ([1 + rows*cols] tiles of n_side^2 rows each, in
    anyres_tiles' order): the base tile, then the unpadded feature map row by row, each row
    followed by `newline` (omitted when None)."""
    nr, nc = grid
    per = n_side * n_side
    d = rows.shape[1]
    if rows.shape[0] != (1 + nr * nc) * per:
        raise ValueError(f"expected {(1 + nr * nc) * per} tile rows, got {rows.shape[0]}")
    base, tiles = rows[:per], rows[per:]
    fmap = tiles.reshape(nr, nc, n_side, n_side, d).transpose(0, 2, 1, 3, 4).reshape(nr * n_side, nc * n_side, d)
    fmap = unpad(fmap, *image_hw)
    if newline is not None:
        nl = np.broadcast_to(np.asarray(newline, np.float32), (fmap.shape[0], 1, d))
        fmap = np.concatenate([fmap, nl], axis=1)
    return np.ascontiguousarray(np.concatenate([base, fmap.reshape(-1, d)]), dtype=np.float32)


class Tiler:
    """How one picture becomes the tiles libmtmd encodes, and their rows the image rows the LLM
    receives, for one mmproj (its image size, patch size, mean, pinpoints, image_newline) and mode."""

    def __init__(self, mode: str, image_size: int, patch_size: int, image_mean: Sequence[float],
                 pinpoints: Sequence[Sequence[int]] = (), newline: np.ndarray | None = None):
        if mode not in IMAGE_MODES:
            raise ValueError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
        self.mode, self.size, self.patch = mode, image_size, patch_size
        self.mean, self.pinpoints, self.newline = list(image_mean), [list(p) for p in pinpoints], newline

    def tiles(self, rgb: np.ndarray) -> tuple[list[np.ndarray], tuple[int, int] | None]:
        """(uint8 tiles, anyres grid (rows, cols) or None): one LLaVA-1.5 tile, LLaVA-1.6's base tile
        and grid tiles, or (native) the picture itself for libmtmd's own preprocessing."""
        if self.mode == "native" or not self.size:
            return [rgb], None
        if self.pinpoints:
            return anyres_tiles(rgb, self.size, self.pinpoints)
        return [llava15_tile(rgb, self.mode, self.size, self.mean)], None

    def rows(self, tile_rows: np.ndarray, grid: tuple[int, int] | None, image_hw: tuple[int, int]) -> np.ndarray:
        """The image rows from the tiles' rows (LLaVA-1.6: packed; otherwise as they are)."""
        if grid is None:
            return tile_rows
        return pack_anyres(tile_rows, grid, image_hw, self.size // self.patch, self.newline)
