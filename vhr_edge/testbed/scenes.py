"""Scenes: what is in each picture, the four split samplers, and rendering.

A `Scene` is pure ground truth (context, objects with colour, box and coarse position, a
render seed); pixels come from `render`. Everything is deterministic: scene `i` of split `s`
with seed `seed` is drawn from its own generator `default_rng([code(s), seed, i])`, so a
split's first k scenes do not depend on how many are made and "train" and "indist" with
the same seed are different streams.

Splits (1-4 objects, at most one of each category, positions on distinct cells of a 3x3 grid):

- unbiased:       categories uniform over all 16, context uniform, no habits (vision pretraining)
- train, indist:  habit-laden. A context is drawn, each object comes from its home objects with
                  P_HOME and from anywhere else otherwise; a pair member brings its partner with
                  P_PAIR. "indist" is held out: same law, another stream.
- counterfactual: habits broken. A "lonely" pair member without its partner, in its home context
                  or (half the time) another one, plus 0-2 objects drawn uniformly; partners of
                  the lonely member never appear. `missing_partners` is never empty.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from . import draw, world

SPLIT_CODES = {"unbiased": 1, "train": 2, "indist": 3, "counterfactual": 4}
BASE_SIZE = 64  # boxes are stored in pixels of a 64x64 render
P_HOME = 0.9  # train: an object comes from the scene's context
P_PAIR = 0.8  # train: a pair member brings its partner (measured co-occurrence ~0.92)
P_MISMATCH = 0.5  # counterfactual: the lonely object is put in a foreign context
N_WEIGHTS = (0.12, 0.33, 0.33, 0.22)  # P(1..4 objects)
MAX_OVERLAP = 0.22  # at most this share of the smaller box may be covered by another box
JITTER = 5.0  # px (at 64) around the cell centre


@dataclass(frozen=True)
class SceneObject:
    category: str
    colour: str
    bbox: tuple[int, int, int, int]  # x, y, w, h in pixels of a Scene.size render
    position: str  # one of world.POSITIONS, from the box centre
    flip: bool = False  # pictogram mirrored left-right


@dataclass(frozen=True)
class Scene:
    id: str
    split: str
    context: str
    objects: tuple[SceneObject, ...]  # in drawing order (back to front)
    seed: int  # background and noise of the render
    size: int = BASE_SIZE  # the render size the boxes refer to

    @property
    def categories(self) -> tuple[str, ...]:
        """Present categories in the habitual caption order."""
        return tuple(sorted((o.category for o in self.objects), key=world.ORDER.__getitem__))

    @property
    def missing_partners(self) -> tuple[str, ...]:
        """Habitual partners of present objects that are absent (habitual order)."""
        have = set(self.categories)
        miss = {world.PARTNER[c] for c in have if c in world.PARTNER} - have
        return tuple(sorted(miss, key=world.ORDER.__getitem__))

    def in_caption_order(self) -> list[SceneObject]:
        return sorted(self.objects, key=lambda o: world.ORDER[o.category])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        d["missing_partners"] = list(self.missing_partners)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = tuple(SceneObject(o["category"], o["colour"], tuple(o["bbox"]), o["position"],
                                 bool(o.get("flip", False))) for o in d["objects"])
        return cls(d["id"], d["split"], d["context"], objs, int(d["seed"]), int(d.get("size", BASE_SIZE)))


# --- which objects ---------------------------------------------------------------------------

def _n_objects(rng: np.random.Generator) -> int:
    return int(rng.choice(4, p=N_WEIGHTS)) + 1


def _pick(rng: np.random.Generator, pool) -> str:
    return str(pool[int(rng.integers(len(pool)))])


def _habitual(rng: np.random.Generator, context: str) -> list[str]:
    """train / indist: home objects with P_HOME, partners with P_PAIR."""
    target, cats = _n_objects(rng), []
    home = world.HOME_OBJECTS[context]
    foreign = [c for c in world.NAMES if c not in home]
    for _ in range(100):
        if len(cats) >= target:
            break
        cat = _pick(rng, home if rng.random() < P_HOME else foreign)
        if cat in cats:
            continue
        partner = world.PARTNER.get(cat)
        if partner is not None and partner not in cats and rng.random() < P_PAIR:
            if len(cats) + 2 > 4:
                continue  # no room for the pair: draw another object
            cats += [cat, partner]
        else:
            cats.append(cat)
    return cats


def _counterfactual(rng: np.random.Generator) -> tuple[str, list[str]]:
    paired = [c for c in world.NAMES if c in world.PARTNER]
    lonely = _pick(rng, paired)
    home = world.BY_NAME[lonely].home
    context = home
    if rng.random() < P_MISMATCH:
        context = _pick(rng, [c for c in world.CONTEXT_NAMES if c != home])
    others = [c for c in world.NAMES if c not in (lonely, world.PARTNER[lonely])]
    extra = rng.choice(len(others), int(rng.choice(3, p=(0.3, 0.4, 0.3))), replace=False)
    return context, [lonely] + [others[int(i)] for i in extra]


# --- where ----------------------------------------------------------------------------------

def _size(rng: np.random.Generator, cat: str) -> tuple[int, int]:
    a = world.BY_NAME[cat].aspect
    elongated = a <= 0.55 or a >= 1.75
    s = rng.uniform(19, 25) if elongated else rng.uniform(16, 23)
    w, h = (s, s / a) if a >= 1 else (s * a, s)
    return max(4, int(round(w))), max(4, int(round(h)))


def position_of(bbox, size: int = BASE_SIZE) -> str:
    x, y, w, h = bbox
    col = min(2, max(0, int((x + w / 2) * 3 // size)))
    row = min(2, max(0, int((y + h / 2) * 3 // size)))
    return world.POSITIONS[row * 3 + col]


def _overlap(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def _place(rng: np.random.Generator, cats: list[str]) -> list[tuple[int, int, int, int]]:
    """Boxes on distinct 3x3 cells, jittered; boxes overlap at most MAX_OVERLAP (a little).

    An object that finds no jitter with little enough overlap is shrunk by 10% and tried
    again (at zero jitter, boxes of <= 21 px on distinct cells never overlap).
    """
    S, cell = BASE_SIZE, BASE_SIZE / 3
    cells = rng.choice(9, len(cats), replace=False)
    sizes = [_size(rng, c) for c in cats]
    boxes: list[tuple[int, int, int, int]] = []
    for ci, (w, h) in zip(cells, sizes):
        cx, cy = (ci % 3 + 0.5) * cell, (ci // 3 + 0.5) * cell
        while True:
            best = None
            for _ in range(20):
                x = int(round(np.clip(cx - w / 2 + rng.uniform(-JITTER, JITTER), 1, S - 1 - w)))
                y = int(round(np.clip(cy - h / 2 + rng.uniform(-JITTER, JITTER), 1, S - 1 - h)))
                worst = max((_overlap((x, y, w, h), b) for b in boxes), default=0.0)
                if best is None or worst < best[0]:
                    best = (worst, (x, y, w, h))
                if worst <= MAX_OVERLAP:
                    break
            if best[0] <= MAX_OVERLAP:
                break
            w, h = max(4, int(w * 0.9)), max(4, int(h * 0.9))
        boxes.append(best[1])
    return boxes


# --- scenes ----------------------------------------------------------------------------------

def sample_scene(rng: np.random.Generator, split: str, id: str = "") -> Scene:
    """One scene of `split` drawn from `rng`."""
    if split == "unbiased":
        context = _pick(rng, world.CONTEXT_NAMES)
        cats = [world.NAMES[int(i)] for i in rng.choice(len(world.NAMES), _n_objects(rng), replace=False)]
    elif split in ("train", "indist"):
        context = _pick(rng, world.CONTEXT_NAMES)
        cats = _habitual(rng, context)
    elif split == "counterfactual":
        context, cats = _counterfactual(rng)
    else:
        raise ValueError(f"unknown split {split!r}; one of {sorted(SPLIT_CODES)}")
    boxes = _place(rng, cats)
    colours = [_pick(rng, world.COLOUR_NAMES) for _ in cats]
    flips = rng.random(len(cats)) < 0.5
    objs = [SceneObject(c, col, b, position_of(b), bool(f))
            for c, col, b, f in zip(cats, colours, boxes, flips)]
    objs.sort(key=lambda o: (o.bbox[1] + o.bbox[3], o.bbox[0]))  # lower objects are nearer: drawn last
    return Scene(id, split, context, tuple(objs), int(rng.integers(2**31)))


def scene_rng(split: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_CODES[split], seed, index])


def make_split(split: str, n: int, seed: int = 0) -> list[Scene]:
    """n scenes of `split`, ids "{split}-{seed}-{index:06d}"; deterministic in (split, seed)."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; one of {sorted(SPLIT_CODES)}")
    return [sample_scene(scene_rng(split, seed, i), split, f"{split}-{seed}-{i:06d}") for i in range(n)]


def render(scene: Scene, size: int = 64, noise: float = 5.0) -> Image.Image:
    """The scene as an RGB image of size x size (boxes scale with size / scene.size)."""
    k = size / scene.size
    items = [(o.category, world.COLOURS[o.colour], tuple(v * k for v in o.bbox), o.flip)
             for o in scene.objects]
    return draw.compose(scene.context, items, size, np.random.default_rng(scene.seed), noise=noise)


def grid(scenes: list[Scene], size: int = 128, cols: int = 4) -> Image.Image:
    """A contact sheet of renders (for looking at the world)."""
    rows = (len(scenes) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for i, s in enumerate(scenes):
        sheet.paste(render(s, size), ((i % cols) * size, (i // cols) * size))
    return sheet
