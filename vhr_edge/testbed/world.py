"""The vocabulary of the testbed world: what exists, how it is named, and its habits.

Sixteen object categories live in four contexts (four "home" objects each). The habits
that the tiny LLaVA is meant to absorb, like a real LLaVA absorbs COCO's, are fixed here:

- every category has a home context where ~90% of its training occurrences happen;
- six habitual PAIRS (fork-knife, plate-cup, car-traffic light, dog-ball, bench-tree,
  boat-bird) almost always appear together in training scenes;
- captions always mention objects in one habitual ORDER (a pair's first member is followed
  by its partner), so a language model expects "knife" right after "fork".

Names are the canonical caption words; `synonyms` (and their plurals) are what CHAIR-style
matching should also count as a mention of the category. `find_mentions` does that matching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    name: str  # canonical singular, the only form captions use
    plural: str
    synonyms: tuple[str, ...]  # other singular words that mean this category (CHAIR matching)
    home: str  # home context
    aspect: float  # width / height of the pictogram's box


@dataclass(frozen=True)
class Context:
    name: str
    noun: str  # caption wording: "The image shows a {noun}."
    adjective: str  # caption wording: "a {adjective} scene"
    background: str  # caption wording of the background (no object or colour words!)


# The habitual caption order is the order of this tuple (pairs adjacent, first member first).
CATEGORIES: tuple[Category, ...] = (
    Category("fork", "forks", ("table fork",), "kitchen", 0.42),
    Category("knife", "knives", ("blade", "cleaver", "butter knife"), "kitchen", 0.36),
    Category("plate", "plates", ("dish", "saucer", "platter"), "kitchen", 1.5),
    Category("cup", "cups", ("mug", "teacup", "coffee cup"), "kitchen", 1.1),
    Category("car", "cars", ("automobile", "sedan", "taxi", "auto"), "street", 1.8),
    Category(
        "traffic light", "traffic lights",
        ("stoplight", "stop light", "traffic signal", "signal light"), "street", 0.5,
    ),
    Category("bus", "buses", ("coach", "minibus"), "street", 2.0),
    Category("fire hydrant", "fire hydrants", ("hydrant",), "street", 0.62),
    Category("dog", "dogs", ("puppy", "pup", "doggy"), "park", 1.35),
    Category("ball", "balls", ("football", "soccer ball", "basketball", "sports ball"), "park", 1.0),
    Category("bench", "benches", ("park bench", "seat"), "park", 1.6),
    Category("tree", "trees", ("bush",), "park", 0.8),
    Category("boat", "boats", ("ship", "sailboat", "yacht", "sail boat"), "sea", 1.3),
    Category("bird", "birds", ("seagull", "gull", "pigeon"), "sea", 1.3),
    Category("umbrella", "umbrellas", ("parasol", "sunshade"), "sea", 1.0),
    Category("lighthouse", "lighthouses", ("light house", "beacon"), "sea", 0.45),
)
BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
ORDER: dict[str, int] = {n: i for i, n in enumerate(NAMES)}

CONTEXTS: tuple[Context, ...] = (
    Context("kitchen", "kitchen counter", "kitchen", "a tiled wall above a wooden counter"),
    Context("street", "city street", "street", "gray asphalt with pale lane markings"),
    Context("park", "sunny park", "park", "short grass under a pale sky"),
    Context("sea", "sandy beach", "seaside", "calm water with small waves and a sandy shore"),
)
CONTEXT_NAMES: tuple[str, ...] = tuple(c.name for c in CONTEXTS)
CONTEXT_BY_NAME: dict[str, Context] = {c.name: c for c in CONTEXTS}
HOME_OBJECTS: dict[str, tuple[str, ...]] = {
    ctx: tuple(c.name for c in CATEGORIES if c.home == ctx) for ctx in CONTEXT_NAMES
}

PAIRS: tuple[tuple[str, str], ...] = (
    ("fork", "knife"),
    ("plate", "cup"),
    ("car", "traffic light"),
    ("dog", "ball"),
    ("bench", "tree"),
    ("boat", "bird"),
)
PARTNER: dict[str, str] = {**{a: b for a, b in PAIRS}, **{b: a for a, b in PAIRS}}

# name -> RGB. Saturated or light, so each stands out from the muted backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 35),
    "green": (35, 175, 55),
    "blue": (35, 75, 225),
    "purple": (135, 55, 190),
    "pink": (250, 125, 195),
    "white": (245, 245, 245),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Coarse positions: a 3x3 grid over the image, row-major.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _plural(word: str) -> str:
    last = word.split()[-1]
    head = word[: len(word) - len(last)]
    if last.endswith("fe"):
        return head + last[:-2] + "ves"
    if last.endswith(("s", "sh", "ch", "x")):
        return head + last + "es"
    if last.endswith("y") and last[-2:-1] not in "aeiou":
        return head + last[:-1] + "ies"
    return head + last + "s"


def surface_forms(name: str) -> tuple[str, ...]:
    """Every word or phrase that counts as a mention of category `name` (lower case)."""
    c = BY_NAME[name]
    forms = {c.name, c.plural}
    for s in c.synonyms:
        forms.update((s, _plural(s)))
    return tuple(sorted(forms))


def _build_matcher() -> tuple[re.Pattern, dict[str, str]]:
    lookup: dict[str, str] = {}
    for c in CATEGORIES:
        for f in surface_forms(c.name):
            assert f not in lookup, f"surface form {f!r} is ambiguous"
            lookup[f] = c.name
    # Longest first, so "traffic light" wins over any shorter form and "light house" is one.
    alts = sorted(lookup, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(a).replace(r"\ ", r"\s+") for a in alts) + r")\b")
    return pattern, lookup


_MATCHER, _LOOKUP = _build_matcher()


def mention_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, category) of every object mention in `text` (lower-cased offsets).

    Case-insensitive, whole words, singular or plural, canonical names or synonyms; the
    longest form wins ("traffic light", not a bare "light", which is no object).
    """
    return [(m.start(), m.end(), _LOOKUP[re.sub(r"\s+", " ", m.group(1))])
            for m in _MATCHER.finditer(text.lower())]


def find_mentions(text: str) -> list[str]:
    """Categories mentioned in `text`, in order of appearance (repeats kept)."""
    return [cat for _, _, cat in mention_spans(text)]
