"""Text about scenes: LLaVA-like detailed captions, POPE-style questions, the LM corpus.

`detailed_caption` answers "Please describe this image in detail." the way LLaVA-1.5 does on
COCO, scaled down: an opening about the setting, every object with its colour and coarse
position in the habitual order (world.ORDER), and often a closing about the background; 20-40
words. The object words of a caption are exactly the scene's categories (canonical names
only) and its colour words exactly the objects' colours: training captions never mention
anything absent, so hallucinations can only come from what the model learns.

`questions` gives "Is there a {object} in the image?" with "Yes." / "No." balanced; negatives
prefer missing habitual partners and objects of the scene's context (POPE's adversarial and
popular settings) and are otherwise random.

All choices are drawn from the `rng` passed in: same rng state, same text.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from . import world
from .scenes import Scene, SceneObject

DETAIL_PROMPT = "Please describe this image in detail."
MIN_WORDS, MAX_WORDS = 20, 40

COUNTS = {1: "one object", 2: "two objects", 3: "three objects", 4: "four objects"}

OPENINGS = (
    "The image shows a {noun}.",
    "This is a picture of a {noun}.",
    "In this image, we can see a {adj} scene.",
    "The picture shows a {noun} with {count}.",
    "This image depicts a {adj} scene with {count} in it.",
)
# {x}: "a fork in red", {p}: "at the top left"; ^ marks a capitalised slot.
SINGLE = (
    "There is {x} {p}.",
    "{P}, there is {x}.",
    "{X} can be seen {p}.",
    "{X} is located {p}.",
    "{P}, you can see {x}.",
)
FOLLOW = ("We can also see {x} {p}.",)  # only after the first object
DOUBLE = (
    "There is {x1} {p1} and {x2} {p2}.",
    "{X1} is {p1}, and {x2} is {p2}.",
)
# 3-4 objects in one sentence; {items} = "x1 p1, x2 p2, and x3 p3".
LIST = ("It contains {items}.", "The scene contains {items}.")
COMPACT_LIST = "This {adj} scene contains {items}."
CLOSINGS = (
    "The background shows {bg}.",
    "Behind the objects, there is {bg}.",
    "The setting has {bg}.",
)
POSITION_PHRASES = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top",),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "on the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom",),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
# By object count: share of objects described in pairs, chance of a closing sentence
# (so that 1-object captions reach 20 words and 4-object ones stay within 40).
P_DOUBLE = {1: 0.0, 2: 0.3, 3: 0.4, 4: 0.75}
P_CLOSING = {1: 1.0, 2: 0.8, 3: 0.45, 4: 0.15}
P_LIST = 0.15  # 3-4 objects: all in one sentence


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def object_phrase(o: SceneObject) -> str:
    """'a fork in red', 'an umbrella in orange'.

    Noun first, colour after: a small decoder names the object from the image and then looks
    up that object's colour. With "a red fork" it had to pick the colour of an object it had
    not named yet, and mostly gave the colour of another object in the scene (testbed v0:
    colour right in 0.47 of teacher-forced slots, 76% of the misses another object's colour).
    """
    return f"{world.article(o.category)} {o.category} in {o.colour}"


def _fill(template: str, **slots: str) -> str:
    full = dict(slots)
    for k, v in slots.items():
        full[k.upper()] = _cap(v)
    return template.format(**full)


def _one_caption(scene: Scene, rng: np.random.Generator, compact: bool = False) -> str:
    """One draw of the templates; `compact` uses the shortest wording (long scenes)."""
    ctx = world.CONTEXT_BY_NAME[scene.context]
    objs = scene.in_caption_order()
    n = len(objs)

    def where(o: SceneObject) -> str:
        options = POSITION_PHRASES[o.position]
        return options[0] if compact else _choice(rng, options)

    opening = _choice(rng, (OPENINGS[0], "This is a {adj} scene.") if compact else OPENINGS)
    parts = [opening.format(noun=ctx.noun, adj=ctx.adjective, count=COUNTS[n])]
    i = 0
    if n >= 3 and (compact or rng.random() < P_LIST):
        items = [f"{object_phrase(o)} {where(o)}" for o in objs]
        items = ", ".join(items[:-1]) + ", and " + items[-1]
        if compact:  # one sentence for the setting and the objects: long scenes stay within 40 words
            parts = [COMPACT_LIST.format(adj=ctx.adjective, items=items)]
        else:
            parts.append(_choice(rng, LIST).format(items=items))
        i = n
    while i < n:
        x, p = object_phrase(objs[i]), where(objs[i])
        if i + 1 < n and (compact or rng.random() < P_DOUBLE[n]):
            x2, p2 = object_phrase(objs[i + 1]), where(objs[i + 1])
            parts.append(_fill(_choice(rng, DOUBLE), x1=x, p1=p, x2=x2, p2=p2))
            i += 2
            continue
        parts.append(_fill(_choice(rng, SINGLE + (FOLLOW if i else ())), x=x, p=p))
        i += 1
    if rng.random() < P_CLOSING[n] and not (compact and n > 2):
        parts.append(_choice(rng, CLOSINGS).format(bg=ctx.background))
    return " ".join(parts)


def detailed_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A 20-40 word description of every object (colour, position) in habitual order."""
    if not scene.objects:
        raise ValueError(f"scene {scene.id!r} has no objects")
    best = None
    for attempt in range(40):
        text = _one_caption(scene, rng, compact=attempt >= 20)
        n = len(text.split())
        if MIN_WORDS <= n <= MAX_WORDS:
            return text
        gap = MIN_WORDS - n if n < MIN_WORDS else n - MAX_WORDS
        if best is None or gap < best[0]:
            best = (gap, text)
    return best[1]


def question_text(category: str) -> str:
    return f"Is there {world.article(category)} {category} in the image?"


def questions(scene: Scene, rng: np.random.Generator, n: int = 6) -> list[tuple[str, str]]:
    """Up to n yes/no questions, half "Yes." and half "No.", shuffled.

    k = min(n // 2, objects present, categories absent) of each answer. Each negative is,
    with probability 2/3 (while any are left), an adversarial one: a missing habitual
    partner or an absent object of the scene's context (partners first, weighted 2:1).
    """
    present = list(scene.categories)
    absent = [c for c in world.NAMES if c not in present]
    k = min(n // 2, len(present), len(absent))
    pos = [present[int(i)] for i in rng.choice(len(present), k, replace=False)]
    partners = list(scene.missing_partners)
    context = [c for c in world.HOME_OBJECTS[scene.context] if c in absent and c not in partners]
    neg: list[str] = []
    while len(neg) < k:
        adv = [c for c in partners + context if c not in neg]
        if adv and rng.random() < 2 / 3:
            w = np.array([2.0 if c in partners else 1.0 for c in adv])
            cat = adv[int(rng.choice(len(adv), p=w / w.sum()))]
        else:
            cat = _choice(rng, [c for c in absent if c not in neg])
        neg.append(cat)
    qa = [(question_text(c), "Yes.") for c in pos] + [(question_text(c), "No.") for c in neg]
    order = rng.permutation(len(qa))
    return [qa[int(i)] for i in order]


def rng_for(scene: Scene, salt: int = 0) -> np.random.Generator:
    """A generator tied to the scene id (and a salt): text that does not depend on list order."""
    return np.random.default_rng([zlib.crc32(scene.id.encode()), salt])


def training_corpus(scenes: list[Scene], salt: int = 0, n_questions: int = 4) -> str:
    """Plain text for the decoder LM and the tokenizer: per scene, its caption on one line,
    then one "question answer" line per question. Deterministic in (scene ids, salt)."""
    lines = [DETAIL_PROMPT]
    for s in scenes:
        rng = rng_for(s, salt)
        lines.append(detailed_caption(s, rng))
        lines.extend(f"{q} {a}" for q, a in questions(s, rng, n_questions))
    return "\n".join(lines) + "\n"


# --- reading captions back ------------------------------------------------------------------

_POS_LOOKUP = {p: pos for pos, ps in POSITION_PHRASES.items() for p in ps}
_POS_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _POS_LOOKUP), key=len, reverse=True)) + r")\b")
_COLOUR_RE = re.compile(r"\b(" + "|".join(world.COLOUR_NAMES) + r")\s+$")
_COLOUR_AFTER_RE = re.compile(r"\s+in\s+(" + "|".join(world.COLOUR_NAMES) + r")\b")


def parse_caption(text: str) -> list[dict]:
    """Objects described in a caption: [{category, colour, position}] in order of mention.

    Lenient, for model output as well as the templates: object words are found with
    `world.find_mentions` rules; colour is "in <colour>" right after the object word (the
    testbed's wording) or a colour word right before it ("a red fork"), else None; position
    is, in a sentence with one object, that sentence's position phrase, and
    otherwise the first position phrase after the object (else None).
    """
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", text.lower()):
        objs = world.mention_spans(sentence)
        poss = [(m.start(), _POS_LOOKUP[m.group(1)]) for m in _POS_RE.finditer(sentence)]
        for k, (start, end, cat) in enumerate(objs):
            cm = _COLOUR_AFTER_RE.match(sentence, end) or _COLOUR_RE.search(sentence[:start])
            if len(objs) == 1:
                pos = poss[0][1] if poss else None
            else:
                nxt = objs[k + 1][0] if k + 1 < len(objs) else len(sentence)
                after = [p for s, p in poss if end <= s < nxt]
                pos = after[0] if after else None
            out.append({"category": cat, "colour": cm.group(1) if cm else None, "position": pos})
    return out
