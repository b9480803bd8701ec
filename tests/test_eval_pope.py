"""POPE: yes/no parsing of free answers, metrics on hand-made answers, and split construction."""

from __future__ import annotations

from collections import Counter

import pytest

from vhr_edge.eval import pope
from vhr_edge.eval.pope import build_split, object_stats, parse_yes_no, pope_metrics


@pytest.mark.parametrize("answer,expected", [
    ("Yes.", "yes"), ("yes", "yes"), ("YES, there is.", "yes"), ("Yes, there is a dog.", "yes"),
    ("Yeah", "yes"), ("Correct, a dog is there.", "yes"),
    ("No.", "no"), ("no", "no"), ("No, there isn't.", "no"), ("Nope", "no"), ("Not really.", "no"),
    ("There is no dog in the image.", "no"), ("I don't see a dog.", "no"),
    ("I don\u2019t think so.", "no"), ("There isn't one.", "no"), ("The image does not contain a dog.", "no"),
    ("None.", "no"), ("I cannot see any dog.", "no"),
    # no yes/no word and no negation: yes (POPE's convention)
    ("There is a dog.", "yes"), ("A dog is sitting on the bench.", "yes"),
    # only the first sentence counts
    ("There is a cat. There is no dog.", "yes"), ("No. But there is a cat.", "no"),
    ("Yes, but it is not very big.", "yes"),
    # nothing to read
    ("", None), ("   ", None), ("...", None), ("\ufffd\u0017", None), (None, None),
])
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) == expected


def test_metrics_hand_made():
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["yes", "no", "yes", "yes", "no", None]  # tp 2, fn 1, fp 1, tn 2 (None counts as no)
    m = pope_metrics(labels, preds)
    assert m == {"n": 6, "accuracy": 0.6667, "precision": 0.6667, "recall": 0.6667, "f1": 0.6667,
                 "yes_ratio": 0.5, "unparsed": 1}
    m = pope_metrics(["yes", "no", "no", "no"], ["yes", "yes", "yes", "no"])  # tp 1, fp 2, tn 1
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.5, 0.3333, 1.0, 0.5, 0.75)
    m = pope_metrics(["yes", "no"], ["no", "no"])  # never yes: precision and F1 are 0, not an error
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["yes_ratio"] == 0.0 and m["accuracy"] == 0.5
    assert pope.average([m, pope_metrics(["yes"], ["yes"])])["accuracy"] == 0.75
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


def test_question_text_matches_testbed_wording():
    from vhr_edge.testbed import captions, world

    for c in world.NAMES:
        assert pope.question_for(c) == captions.question_text(c)
    assert pope.question_for("apple") == "Is there an apple in the image?"
    assert pope.question_for("dog") == "Is there a dog in the image?"


# A small world: "car" is the most frequent object; "fork" always comes with "knife".
CATS = ["car", "person", "fork", "knife", "dog", "cat", "boat", "kite"]
ITEMS = [
    (1, ["car", "person"]), (2, ["car", "person", "dog"]), (3, ["car", "fork", "knife"]),
    (4, ["fork", "knife", "person"]), (5, ["car", "boat"]), (6, ["fork"]), (7, ["cat", "dog", "person", "car"]),
    (8, []),  # no objects: no questions
]


def test_split_properties():
    for split in pope.POPE_SPLITS:
        qs = build_split(ITEMS, split, CATS, seed=0, n_pos=3)
        gt = dict(ITEMS)
        for image_id, present in ITEMS:
            mine = [q for q in qs if q.image_id == image_id]
            pos = [q.object for q in mine if q.label == "yes"]
            neg = [q.object for q in mine if q.label == "no"]
            k = min(3, len(present), len(CATS) - len(present))
            assert len(pos) == len(neg) == k, (split, image_id)
            assert set(pos) <= set(gt[image_id]) and not set(neg) & set(gt[image_id])
            assert len(set(pos)) == len(pos) and len(set(neg)) == len(neg)
            assert all(q.question == pope.question_for(q.object) for q in mine)
    # the positives do not depend on the split
    pos = {s: [(q.image_id, q.object) for q in build_split(ITEMS, s, CATS, seed=0) if q.label == "yes"]
           for s in pope.POPE_SPLITS}
    assert pos["random"] == pos["popular"] == pos["adversarial"]


def test_split_determinism_and_seed():
    a = build_split(ITEMS, "random", CATS, seed=5)
    assert a == build_split(ITEMS, "random", CATS, seed=5)
    # an image's questions depend on its id and the seed, not on the list around it
    assert sorted(a, key=repr) == sorted(build_split(ITEMS[::-1], "random", CATS, seed=5), key=repr)
    assert [q for q in a if q.image_id == 3] == [q for q in build_split(ITEMS[2:3], "random", CATS, seed=5)]
    draws = {tuple(q.object for q in build_split(ITEMS, "random", CATS, seed=s) if q.label == "no") for s in range(6)}
    assert len(draws) > 1  # the seed matters for random negatives


def test_popular_and_adversarial_negatives():
    freq, cooc = object_stats(g for _, g in ITEMS)
    assert freq["car"] == 5 and freq["person"] == 4 and freq["fork"] == 3 and cooc["fork"]["knife"] == 2
    pop = build_split(ITEMS, "popular", CATS, n_pos=2)
    # image 6 has only "fork": 1 positive, 1 negative = the most frequent absent object, "car"
    assert [(q.object, q.label) for q in pop if q.image_id == 6] == [("fork", "yes"), ("car", "no")]
    # image 5 (car, boat): the two most frequent absent ones are person (4) and fork (3)
    assert sorted(q.object for q in pop if q.image_id == 5 and q.label == "no") == ["fork", "person"]
    adv = build_split(ITEMS, "adversarial", CATS, n_pos=2)
    # image 6 (fork): knife co-occurs with fork twice -> the adversarial negative
    assert [q.object for q in adv if q.image_id == 6 and q.label == "no"] == ["knife"]
    # image 5 (car, boat): co-occurrence with car: person 3, dog 2, fork 1, knife 1, cat 1
    assert [q.object for q in adv if q.image_id == 5 and q.label == "no"] == ["person", "dog"]
    # pool statistics may come from elsewhere (a larger annotation file)
    stats = (Counter({"kite": 100}), {})
    assert {q.object for q in build_split(ITEMS, "popular", CATS, n_pos=1, stats=stats) if q.label == "no"} >= {"kite"}
    with pytest.raises(ValueError, match="unknown POPE split"):
        build_split(ITEMS, "hard", CATS)


def test_testbed_adversarial_asks_for_missing_partners():
    """On the counterfactual split a missing habitual partner is the top adversarial negative."""
    from vhr_edge.eval.data import TestbedSource
    from vhr_edge.eval.run import pope_questions

    src = TestbedSource("counterfactual", n=40, seed=3)
    qs = pope_questions(src, ["adversarial"], seed=0, n_pos=1)["adversarial"]
    scenes = {s.id: s for s in src.scenes}
    negs = [q for q in qs if q.label == "no"]
    hits = sum(q.object in scenes[q.image_id].missing_partners for q in negs)
    assert len(negs) == 40 and hits == len(negs)
