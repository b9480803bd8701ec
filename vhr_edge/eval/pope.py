"""POPE (Li et al., EMNLP 2023): yes/no object-existence questions built from annotations.

Question sets (`build_split`), for each image with ground-truth objects, deterministic in
(image id, seed):

- positives: k = min(n_pos, objects present, objects absent) present objects, drawn at random
  (the same k positives in all three splits);
- k negatives among the absent categories:
  - random:      drawn uniformly;
  - popular:     the k most frequent categories (images containing them in the data pool)
                 that are absent, most frequent first;
  - adversarial: the k absent categories that co-occur most often with the present ones
                 (summed over the present objects, counted per image in the data pool).
  Ties go to the more frequent category, then alphabetical order.
- question: "Is there a {object} in the image?" with "an" before a vowel (the testbed's
  `captions.question_text` wording); labels "yes" / "no".

Answer parsing (`parse_yes_no`), POPE's own convention made explicit: lower-case the answer
and keep its first sentence; a leading yes/yeah/yep/correct/true/sure means yes, a leading
no/nope/not/false/none means no; otherwise any negation word (no, not, none, nothing,
without, cannot, never, n't contractions) means no; anything else means yes ("There is a dog
next to the bench." -> yes; "I don't see one." -> no). An empty answer is None (unparsed),
which counts as a "no" prediction in the metrics and is reported as `unparsed`.

Metrics (`pope_metrics`, yes = positive class): accuracy, precision, recall, F1, yes_ratio
(share of "yes" predictions), fractions 0..1.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

POPE_SPLITS = ("random", "popular", "adversarial")
N_POS = 3  # POPE: 3 positive + 3 negative questions per image


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def question_for(category: str) -> str:
    return f"Is there {article(category)} {category} in the image?"


@dataclass(frozen=True)
class PopeQuestion:
    image_id: Any
    object: str
    label: str  # "yes" or "no"
    question: str

    def to_json(self) -> dict:
        return asdict(self)


def object_stats(gts: Iterable[Iterable[str]]) -> tuple[Counter, dict[str, Counter]]:
    """(images containing each category, co-occurrence counts cooc[a][b] over images)."""
    freq: Counter = Counter()
    cooc: dict[str, Counter] = {}
    for gt in gts:
        s = sorted(set(gt))
        freq.update(s)
        for a in s:
            c = cooc.setdefault(a, Counter())
            c.update(b for b in s if b != a)
    return freq, cooc


def _rng(seed: int, image_id: Any, salt: int):
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(image_id).encode()), salt])


def build_split(items: Sequence[tuple[Any, Iterable[str]]], split: str, categories: Sequence[str],
                seed: int = 0, n_pos: int = N_POS,
                stats: Optional[tuple[Counter, dict[str, Counter]]] = None) -> list[PopeQuestion]:
    """Questions of `split` for `items` = [(image_id, present categories)], in item order.

    `categories` is the label set negatives come from; `stats` = object_stats(...) over the data
    pool (default: over `items`)."""
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; one of {', '.join(POPE_SPLITS)}")
    items = [(i, sorted(set(g))) for i, g in items]
    freq, cooc = stats or object_stats(g for _, g in items)
    cats = sorted(set(categories))
    out: list[PopeQuestion] = []
    for image_id, present in items:
        absent = [c for c in cats if c not in present]
        k = min(n_pos, len(present), len(absent))
        if k == 0:
            continue
        rp = _rng(seed, image_id, 0)
        pos = [present[int(j)] for j in sorted(rp.choice(len(present), k, replace=False))]
        if split == "random":
            rn = _rng(seed, image_id, 1)
            neg = [absent[int(j)] for j in rn.choice(len(absent), k, replace=False)]
        elif split == "popular":
            neg = sorted(absent, key=lambda c: (-freq[c], c))[:k]
        else:
            def score(c):
                return sum(cooc.get(p, Counter())[c] for p in present)
            neg = sorted(absent, key=lambda c: (-score(c), -freq[c], c))[:k]
        out += [PopeQuestion(image_id, c, "yes", question_for(c)) for c in pos]
        out += [PopeQuestion(image_id, c, "no", question_for(c)) for c in neg]
    return out


_YES_FIRST = frozenset("yes yeah yep yup correct true sure affirmative indeed".split())
_NO_FIRST = frozenset("no nope not false none negative".split())
_NEGATIONS = frozenset(
    "no not none nothing nobody nowhere without cannot never neither nor isnt arent wasnt "
    "werent dont doesnt didnt cant couldnt".split()
)


def parse_yes_no(answer: Optional[str]) -> Optional[str]:
    """'yes', 'no', or None for an empty answer (rules in the module docstring)."""
    if answer is None:
        return None
    t = answer.strip().lower().replace("\u2019", "'")
    first = next((s for s in re.split(r"[.!?\n]+", t) if s.strip()), "")
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", first)
    if not words:
        return None
    if words[0] in _YES_FIRST:
        return "yes"
    if words[0] in _NO_FIRST:
        return "no"
    if any(w in _NEGATIONS or w.endswith("n't") for w in words):
        return "no"
    return "yes"


def pope_metrics(labels: Sequence[str], preds: Sequence[Optional[str]]) -> dict:
    """accuracy, precision, recall, f1, yes_ratio (yes = positive; None counts as no)."""
    if len(labels) != len(preds):
        raise ValueError("labels and predictions differ in length")
    tp = sum(lab == "yes" and p == "yes" for lab, p in zip(labels, preds))
    fp = sum(lab != "yes" and p == "yes" for lab, p in zip(labels, preds))
    fn = sum(lab == "yes" and p != "yes" for lab, p in zip(labels, preds))
    tn = len(labels) - tp - fp - fn
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": round((tp + tn) / n, 4) if n else 0.0,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "yes_ratio": round((tp + fp) / n, 4) if n else 0.0,
        "unparsed": sum(p is None for p in preds),
    }


def average(metrics: Sequence[dict]) -> dict:
    """Mean of each metric over splits (n summed)."""
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    out = {"n": sum(m["n"] for m in metrics)}
    out.update({k: round(sum(m[k] for m in metrics) / len(metrics), 4) for k in keys})
    out["unparsed"] = sum(m["unparsed"] for m in metrics)
    return out
