"""Pictograms and backgrounds, drawn with Pillow.

Every picture is drawn SS times larger than asked and box-filtered down, so edges are
anti-aliased and thin parts (fork tines, traffic-light lamps) survive at 64x64. Each
pictogram fills its box (x, y, w, h), gets a one-pixel dark outline (at 64 px; it scales with
the render size) so that it stands out from any background, and is composited in the order
given (later objects occlude earlier ones). Backgrounds are per context (tiles and counter,
asphalt with lane marks, grass under sky, sea with waves and sand) with jittered geometry
and colours; pixel noise is added last. All randomness comes from the `rng` passed in.

Pictogram geometry is written in unit coordinates (u right, v down, both in [0, 1]) of the
object's box; `flip` mirrors it left-right.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SS = 4  # supersampling factor
OUTLINE = (25, 25, 25, 255)
DARK = (30, 30, 30, 255)
GLASS = (195, 220, 238, 255)
GREY = (75, 75, 75, 255)
TRUNK = (115, 75, 40, 255)
CLEAR = (0, 0, 0, 0)

RGB = tuple[int, int, int]


def _rgba(c: Sequence[float]) -> tuple[int, int, int, int]:
    return (int(round(c[0])), int(round(c[1])), int(round(c[2])), 255)


def shade(c: RGB, f: float = 0.6) -> tuple[int, int, int, int]:
    """The colour darkened (details drawn in the object's own colour family)."""
    return _rgba([v * f for v in c])


def tint(c: RGB, f: float = 0.5) -> tuple[int, int, int, int]:
    """The colour mixed with white."""
    return _rgba([v + (255 - v) * f for v in c])


class _Pen:
    """Draws in the unit coordinates of one box on an RGBA layer."""

    def __init__(self, d: ImageDraw.ImageDraw, x0: float, y0: float, w: float, h: float,
                 flip: bool, lw: float):
        self.d, self.x0, self.y0, self.w, self.h, self.flip, self.lw = d, x0, y0, w, h, flip, lw

    def p(self, u: float, v: float) -> tuple[float, float]:
        if self.flip:
            u = 1.0 - u
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def box(self, u0, v0, u1, v1) -> list[float]:
        (a, b), (c, e) = self.p(u0, v0), self.p(u1, v1)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    def rect(self, u0, v0, u1, v1, fill, r: float = 0.0):
        b = self.box(u0, v0, u1, v1)
        rad = r * min(b[2] - b[0], b[3] - b[1])
        if rad >= 1:
            self.d.rounded_rectangle(b, radius=rad, fill=fill)
        else:
            self.d.rectangle(b, fill=fill)

    def ellipse(self, u0, v0, u1, v1, fill):
        self.d.ellipse(self.box(u0, v0, u1, v1), fill=fill)

    def circle(self, u, v, r, fill):
        """Circle of radius r * box height."""
        x, y = self.p(u, v)
        rad = r * self.h
        self.d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    def poly(self, pts, fill):
        self.d.polygon([self.p(u, v) for u, v in pts], fill=fill)

    def line(self, pts, fill, width: float = 1.0):
        self.d.line([self.p(u, v) for u, v in pts], fill=fill, width=max(1, round(width * self.lw)))

    def arc(self, u0, v0, u1, v1, start, end, fill, width: float = 1.0):
        if self.flip:
            start, end = 180 - end, 180 - start
        self.d.arc(self.box(u0, v0, u1, v1), start, end, fill=fill, width=max(1, round(width * self.lw)))


# --- the pictograms --------------------------------------------------------------------------

def _fork(p: _Pen, c: RGB):
    p.rect(0.33, 0.5, 0.67, 1.0, _rgba(c), r=0.5)
    p.poly([(0.33, 0.55), (0.67, 0.55), (0.88, 0.4), (0.12, 0.4)], _rgba(c))
    p.rect(0.04, 0.3, 0.96, 0.43, _rgba(c), r=0.3)
    for u0 in (0.04, 0.39, 0.74):
        p.rect(u0, 0.0, u0 + 0.22, 0.33, _rgba(c))


def _knife(p: _Pen, c: RGB):
    p.poly([(0.15, 0.6), (0.15, 0.0), (0.45, 0.07), (0.75, 0.22), (0.9, 0.42), (0.9, 0.6)], _rgba(c))
    p.line([(0.3, 0.1), (0.3, 0.55)], tint(c, 0.45), 0.8)
    p.rect(0.08, 0.57, 0.95, 0.65, shade(c))
    p.rect(0.22, 0.64, 0.8, 1.0, _rgba(c), r=0.35)


def _plate(p: _Pen, c: RGB):
    p.ellipse(0.0, 0.0, 1.0, 1.0, _rgba(c))
    p.ellipse(0.17, 0.2, 0.83, 0.8, shade(c, 0.8))
    p.ellipse(0.2, 0.24, 0.8, 0.76, tint(c, 0.35))


def _cup(p: _Pen, c: RGB):
    p.ellipse(0.55, 0.22, 1.0, 0.78, _rgba(c))
    p.ellipse(0.7, 0.37, 0.88, 0.63, CLEAR)
    p.poly([(0.02, 0.08), (0.76, 0.08), (0.7, 0.92), (0.62, 1.0), (0.16, 1.0), (0.08, 0.92)], _rgba(c))
    p.ellipse(0.02, 0.0, 0.76, 0.18, shade(c, 0.45))


def _car(p: _Pen, c: RGB):
    p.poly([(0.18, 0.45), (0.32, 0.04), (0.7, 0.04), (0.86, 0.45)], _rgba(c))
    p.poly([(0.27, 0.42), (0.37, 0.14), (0.49, 0.14), (0.49, 0.42)], GLASS)
    p.poly([(0.54, 0.42), (0.54, 0.14), (0.66, 0.14), (0.77, 0.42)], GLASS)
    p.rect(0.0, 0.4, 1.0, 0.8, _rgba(c), r=0.3)
    p.rect(0.93, 0.5, 1.0, 0.6, (250, 240, 180, 255))
    for u in (0.24, 0.76):
        p.circle(u, 0.8, 0.2, DARK)
        p.circle(u, 0.8, 0.08, (150, 150, 150, 255))


def _traffic_light(p: _Pen, c: RGB):
    p.rect(0.38, 0.7, 0.62, 1.0, GREY)
    p.rect(0.06, 0.0, 0.94, 0.74, _rgba(c), r=0.22)
    for v in (0.135, 0.37, 0.605):
        p.circle(0.5, v, 0.09, DARK)


def _bus(p: _Pen, c: RGB):
    p.rect(0.0, 0.0, 1.0, 0.86, _rgba(c), r=0.12)
    for i in range(4):
        u0 = 0.06 + i * 0.225
        p.rect(u0, 0.13, u0 + 0.18, 0.45, GLASS)
    p.rect(0.0, 0.57, 1.0, 0.64, shade(c))
    for u in (0.2, 0.8):
        p.circle(u, 0.84, 0.16, DARK)
        p.circle(u, 0.84, 0.06, (150, 150, 150, 255))


def _fire_hydrant(p: _Pen, c: RGB):
    p.rect(0.44, 0.0, 0.56, 0.1, shade(c))
    p.ellipse(0.2, 0.04, 0.8, 0.34, _rgba(c))
    p.rect(0.2, 0.18, 0.8, 0.88, _rgba(c))
    p.rect(0.0, 0.38, 1.0, 0.56, _rgba(c), r=0.35)
    p.rect(0.12, 0.17, 0.88, 0.25, shade(c))
    p.circle(0.5, 0.47, 0.06, shade(c, 0.5))
    p.rect(0.08, 0.86, 0.92, 1.0, shade(c))


def _dog(p: _Pen, c: RGB):
    p.line([(0.18, 0.42), (0.04, 0.12)], _rgba(c), 2.2)
    p.rect(0.16, 0.52, 0.3, 1.0, _rgba(c), r=0.3)
    p.rect(0.6, 0.52, 0.74, 1.0, _rgba(c), r=0.3)
    p.rect(0.3, 0.55, 0.38, 0.92, shade(c, 0.75))
    p.rect(0.72, 0.55, 0.8, 0.92, shade(c, 0.75))
    p.ellipse(0.1, 0.3, 0.82, 0.72, _rgba(c))
    p.ellipse(0.62, 0.04, 0.94, 0.46, _rgba(c))
    p.ellipse(0.8, 0.2, 1.0, 0.42, _rgba(c))
    p.circle(0.97, 0.27, 0.05, DARK)
    p.poly([(0.64, 0.08), (0.76, 0.04), (0.73, 0.4), (0.64, 0.34)], shade(c))
    p.circle(0.83, 0.17, 0.04, DARK)


def _ball(p: _Pen, c: RGB):
    p.ellipse(0.0, 0.0, 1.0, 1.0, _rgba(c))
    p.line([(0.02, 0.5), (0.98, 0.5)], DARK, 0.8)
    p.line([(0.5, 0.02), (0.5, 0.98)], DARK, 0.8)
    p.arc(-0.55, 0.1, 0.3, 0.9, -62, 62, DARK, 0.8)
    p.arc(0.7, 0.1, 1.55, 0.9, 118, 242, DARK, 0.8)


def _bench(p: _Pen, c: RGB):
    for u in (0.08, 0.84):
        p.rect(u, 0.0, u + 0.08, 1.0, shade(c))
    p.rect(0.0, 0.02, 1.0, 0.2, _rgba(c), r=0.3)
    p.rect(0.0, 0.28, 1.0, 0.44, _rgba(c), r=0.3)
    p.rect(0.0, 0.55, 1.0, 0.7, _rgba(c), r=0.3)
    for u in (0.16, 0.76):
        p.rect(u, 0.68, u + 0.08, 1.0, shade(c))


def _tree(p: _Pen, c: RGB):
    p.poly([(0.42, 0.5), (0.58, 0.5), (0.62, 1.0), (0.38, 1.0)], TRUNK)
    for u, v, r in ((0.3, 0.46, 0.2), (0.7, 0.46, 0.2), (0.5, 0.27, 0.27), (0.5, 0.52, 0.2)):
        p.circle(u, v, r, _rgba(c))
    p.arc(0.3, 0.2, 0.6, 0.5, 200, 280, shade(c, 0.7), 0.8)
    p.arc(0.55, 0.35, 0.85, 0.6, 240, 330, shade(c, 0.7), 0.8)


def _boat(p: _Pen, c: RGB):
    p.line([(0.46, 0.0), (0.46, 0.64)], DARK, 1.0)
    p.poly([(0.5, 0.03), (0.5, 0.58), (0.9, 0.58)], tint(c, 0.55))
    p.poly([(0.42, 0.12), (0.42, 0.58), (0.14, 0.58)], tint(c, 0.55))
    p.poly([(0.0, 0.6), (1.0, 0.6), (0.84, 1.0), (0.14, 1.0)], _rgba(c))
    p.rect(0.06, 0.68, 0.94, 0.73, shade(c))


def _bird(p: _Pen, c: RGB):
    """A gull in flight: V-shaped wings over a small body."""
    p.poly([(0.34, 0.62), (0.1, 0.74), (0.12, 0.9), (0.38, 0.74)], shade(c, 0.8))
    p.poly([(0.34, 0.58), (0.16, 0.22), (0.0, 0.06), (0.26, 0.1), (0.5, 0.56)], _rgba(c))
    p.poly([(0.5, 0.58), (0.66, 0.2), (0.9, 0.0), (0.84, 0.2), (0.66, 0.6)], _rgba(c))
    p.ellipse(0.26, 0.5, 0.8, 0.82, _rgba(c))
    p.circle(0.8, 0.58, 0.13, _rgba(c))
    p.poly([(0.88, 0.52), (1.0, 0.6), (0.88, 0.66)], (235, 160, 40, 255))
    p.circle(0.82, 0.54, 0.035, DARK)


def _umbrella(p: _Pen, c: RGB):
    p.line([(0.5, 0.4), (0.5, 0.88)], DARK, 1.0)
    p.arc(0.5, 0.76, 0.74, 1.0, 0, 180, DARK, 1.0)
    p.d.pieslice(p.box(0.0, 0.02, 1.0, 0.94), 180, 360, fill=_rgba(c))
    for i in range(4):
        p.ellipse(0.125 * (2 * i + 1) - 0.125, 0.43, 0.125 * (2 * i + 1) + 0.125, 0.55, CLEAR)
    for u in (0.25, 0.75):
        p.line([(0.5, 0.03), (u, 0.47)], shade(c), 0.8)
    p.line([(0.5, 0.0), (0.5, 0.05)], DARK, 1.0)


def _lighthouse(p: _Pen, c: RGB):
    def edge(v):  # tower half-width at height v (tapers upward)
        return 0.22 + 0.16 * (v - 0.32) / 0.68

    p.poly([(0.2, 0.16), (0.8, 0.16), (0.5, 0.0)], shade(c))
    p.rect(0.3, 0.15, 0.7, 0.29, (240, 235, 175, 255))
    p.rect(0.16, 0.27, 0.84, 0.33, shade(c))
    def band(v0, v1, fill):
        p.poly([(0.5 - edge(v0), v0), (0.5 + edge(v0), v0), (0.5 + edge(v1), v1), (0.5 - edge(v1), v1)], fill)

    band(0.32, 1.0, _rgba(c))
    band(0.48, 0.58, shade(c, 0.7))
    band(0.7, 0.8, shade(c, 0.7))
    p.rect(0.42, 0.87, 0.58, 1.0, DARK)


PICTOGRAMS: dict[str, Callable[[_Pen, RGB], None]] = {
    "fork": _fork, "knife": _knife, "plate": _plate, "cup": _cup,
    "car": _car, "traffic light": _traffic_light, "bus": _bus, "fire hydrant": _fire_hydrant,
    "dog": _dog, "ball": _ball, "bench": _bench, "tree": _tree,
    "boat": _boat, "bird": _bird, "umbrella": _umbrella, "lighthouse": _lighthouse,
}


def pictogram(category: str, colour: RGB, w: float, h: float, flip: bool, ow: int) -> Image.Image:
    """RGBA layer of size (w, h) + a margin of `ow` on each side, with an `ow`-wide outline."""
    W, H = int(math.ceil(w)) + 2 * ow, int(math.ceil(h)) + 2 * ow
    layer = Image.new("RGBA", (W, H), CLEAR)
    PICTOGRAMS[category](_Pen(ImageDraw.Draw(layer), ow, ow, w, h, flip, ow), colour)
    alpha = layer.getchannel("A")
    grown = alpha
    for _ in range(ow):
        grown = grown.filter(ImageFilter.MaxFilter(3))
    out = Image.new("RGBA", (W, H), OUTLINE[:3] + (0,))
    out.putalpha(grown)
    return Image.alpha_composite(out, layer)


# --- backgrounds --------------------------------------------------------------------------

def _jit(rng: np.random.Generator, c: RGB, a: float = 12) -> tuple[int, int, int]:
    d = rng.uniform(-a, a, 3) + rng.uniform(-a, a)
    return tuple(int(np.clip(v + e, 0, 255)) for v, e in zip(c, d))


def _kitchen(d: ImageDraw.ImageDraw, S: int, lw: float, rng: np.random.Generator):
    wall, grout = _jit(rng, (186, 192, 182)), _jit(rng, (150, 153, 146))
    top = S * rng.uniform(0.24, 0.36)
    d.rectangle([0, 0, S, top], fill=wall)
    tile = S / rng.uniform(5.5, 8.0)
    off = rng.uniform(0, tile)
    for x in np.arange(off - tile, S, tile):
        d.line([(x, 0), (x, top)], fill=grout, width=max(1, round(lw * 0.6)))
    for y in np.arange(top - tile, -tile, -tile):
        d.line([(0, y), (S, y)], fill=grout, width=max(1, round(lw * 0.6)))
    wood = _jit(rng, (162, 122, 88))
    d.rectangle([0, top, S, S], fill=wood)
    for _ in range(int(rng.integers(5, 10))):
        y = rng.uniform(top, S)
        d.line([(0, y), (S, y + rng.uniform(-S / 20, S / 20))], fill=_jit(rng, (140, 104, 74), 6),
               width=max(1, round(lw * 0.5)))
    d.line([(0, top), (S, top)], fill=(115, 88, 64), width=max(1, round(lw * 1.2)))


def _street(d: ImageDraw.ImageDraw, S: int, lw: float, rng: np.random.Generator):
    top = S * rng.uniform(0.16, 0.26)
    walk = _jit(rng, (166, 164, 158))
    d.rectangle([0, 0, S, top], fill=walk)
    slab = S / rng.uniform(4.0, 6.5)
    for x in np.arange(rng.uniform(0, slab) - slab, S, slab):
        d.line([(x, 0), (x, top)], fill=(135, 133, 128), width=max(1, round(lw * 0.6)))
    d.rectangle([0, top, S, S], fill=_jit(rng, (84, 86, 92), 8))
    d.line([(0, top), (S, top)], fill=(205, 205, 198), width=max(1, round(lw * 1.5)))
    y = S * rng.uniform(0.56, 0.72)
    dash, gap = S / rng.uniform(6, 9), S / rng.uniform(8, 12)
    for x in np.arange(rng.uniform(-dash - gap, 0), S, dash + gap):
        d.rectangle([x, y - lw * 0.8, x + dash, y + lw * 0.8], fill=(222, 220, 205))


def _park(d: ImageDraw.ImageDraw, S: int, lw: float, rng: np.random.Generator):
    top = S * rng.uniform(0.14, 0.28)
    d.rectangle([0, 0, S, top], fill=_jit(rng, (178, 206, 230), 8))
    grass = _jit(rng, (104, 140, 70), 10)
    d.rectangle([0, top, S, S], fill=grass)
    for _ in range(int(S * 0.8)):
        x, y = rng.uniform(0, S), rng.uniform(top, S)
        c = (84, 118, 56) if rng.random() < 0.5 else (126, 162, 88)
        d.line([(x, y), (x + rng.uniform(-lw, lw), y - rng.uniform(lw, 2.5 * lw))], fill=c,
               width=max(1, round(lw * 0.5)))


def _sea(d: ImageDraw.ImageDraw, S: int, lw: float, rng: np.random.Generator):
    sky, shore = S * rng.uniform(0.1, 0.22), S * rng.uniform(0.72, 0.84)
    d.rectangle([0, 0, S, sky], fill=_jit(rng, (192, 213, 232), 8))
    d.rectangle([0, sky, S, shore], fill=_jit(rng, (58, 106, 150), 10))
    for _ in range(int(rng.integers(14, 24))):
        x, y = rng.uniform(-S / 10, S), rng.uniform(sky + lw, shore - lw)
        wlen = S * rng.uniform(0.06, 0.12)
        d.arc([x, y, x + wlen, y + wlen * 0.5], 200, 340, fill=(112, 156, 194), width=max(1, round(lw * 0.6)))
    d.rectangle([0, shore, S, S], fill=_jit(rng, (212, 192, 142), 8))
    for _ in range(int(S * 0.3)):
        x, y = rng.uniform(0, S), rng.uniform(shore, S)
        d.point((x, y), fill=(180, 160, 115))


BACKGROUNDS = {"kitchen": _kitchen, "street": _street, "park": _park, "sea": _sea}


# --- composition ---------------------------------------------------------------------------

Item = tuple[str, RGB, Sequence[float], bool]  # (category, rgb, (x, y, w, h) in output px, flip)


def compose(context: str | RGB, items: Sequence[Item], size: int, rng: np.random.Generator,
            noise: float = 5.0) -> Image.Image:
    """Draw a context background (or a plain RGB colour), then the items in order, at size x size."""
    S, k = size * SS, SS
    lw = SS * size / 64.0  # one output pixel at 64 px, proportionally more at larger sizes
    img = Image.new("RGBA", (S, S), (0, 0, 0, 255))
    d = ImageDraw.Draw(img)
    if isinstance(context, str):
        BACKGROUNDS[context](d, S, lw, rng)
    else:
        d.rectangle([0, 0, S, S], fill=tuple(context))
    ow = max(1, round(lw))
    for cat, rgb, (x, y, w, h), flip in items:
        layer = pictogram(cat, rgb, w * k, h * k, flip, ow)
        dx, dy = int(round(x * k)) - ow, int(round(y * k)) - ow
        img.alpha_composite(layer, (max(dx, 0), max(dy, 0)), (max(-dx, 0), max(-dy, 0)))
    small = img.convert("RGB").reduce(SS)
    if noise > 0:
        a = np.asarray(small, dtype=np.float32)
        a = a + rng.normal(0.0, noise, a.shape) + rng.normal(0.0, noise / 2, (1, 1, 3))
        small = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    return small


def single(category: str, colour: RGB, size: int = 64, background: RGB = (128, 128, 128),
           extent: float = 0.6) -> Image.Image:
    """One pictogram centred on a plain background, its long side `extent` of the image, no noise."""
    from .world import BY_NAME

    a = BY_NAME[category].aspect
    w, h = (size * extent, size * extent / a) if a >= 1 else (size * extent * a, size * extent)
    item = (category, colour, ((size - w) / 2, (size - h) / 2, w, h), False)
    return compose(background, [item], size, np.random.default_rng(0), noise=0.0)
