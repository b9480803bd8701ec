"""CHAIR object matching and scores on hand-written captions with known counts.

Rules under test (vhr_edge.eval.chair docstring): synonyms and plurals map to the class,
multi-word names win over their parts (longest match first), whole words only, the negation
rule ("no cat" is not a mention), and CHAIR_I over distinct objects per caption.
"""

from __future__ import annotations

import numpy as np
import pytest

from vhr_edge.eval import chair
from vhr_edge.eval.chair import COCO, caption_objects, chair_scores, find_mentions, plural


def objs(text, vocab=COCO):
    return caption_objects(text, vocab)[0]


# --- vocabulary ------------------------------------------------------------------------------

def test_coverage_80_classes_with_synonyms():
    cov = chair.coverage()
    assert cov["classes"] == 80 and len(set(chair.COCO_CLASSES)) == 80
    assert cov["synonyms"] >= 400 and cov["surface_forms"] > 1000
    for cls in chair.COCO_CLASSES:  # every class name matches itself, and its plural
        assert objs(f"There is a {cls} here.") == [cls], cls
        if cls not in ("skis", "scissors", "broccoli", "sheep"):
            assert objs(f"Some {plural(cls)} here.") == [cls], plural(cls)


@pytest.mark.parametrize("word,pl", [
    ("dog", "dogs"), ("bus", "buses"), ("bench", "benches"), ("knife", "knives"), ("man", "men"),
    ("woman", "women"), ("policeman", "policemen"), ("child", "children"), ("person", "people"),
    ("mouse", "mice"), ("goose", "geese"), ("puppy", "puppies"), ("guy", "guys"), ("sheep", "sheep"),
    ("scissors", "scissors"), ("box", "boxes"), ("toothbrush", "toothbrushes"), ("calf", "calves"),
    ("traffic light", "traffic lights"), ("wine glass", "wine glasses"), ("giraffe", "giraffes"),
    ("human", "humans"), ("ox", "oxen"),
])
def test_plural(word, pl):
    assert plural(word) == pl


@pytest.mark.parametrize("text,expected", [
    # synonyms and plurals
    ("Two men and a woman stand with three children.", ["person"]),
    ("A couple of puppies play with a kitten.", ["dog", "cat"]),
    ("Knives, forks and spoons on a wooden desk.", ["knife", "fork", "spoon", "dining table"]),
    ("A sofa, a fridge and a television.", ["couch", "refrigerator", "tv"]),
    ("A flock of geese and some sheep near the cattle.", ["bird", "sheep", "cow"]),
    ("A computer mouse and two mice.", ["mouse"]),
    ("Skiers carry their skis; one ski is broken.", ["person", "skis"]),
    # multi-word names, longest match first
    ("A man eats a hot dog next to a dog.", ["person", "hot dog", "dog"]),
    ("A hot-dog stand sells hotdogs.", ["hot dog"]),
    ("A teddy bear and a bear.", ["teddy bear", "bear"]),
    ("Traffic lights above a fire hydrant and a stop sign.", ["traffic light", "fire hydrant", "stop sign"]),
    ("She holds her cell phone by the parking meter.", ["cell phone", "parking meter"]),
    ("A wine glass, a tennis racket and a baseball bat.", ["wine glass", "tennis racket", "baseball bat"]),
    ("A baby elephant walks behind an adult giraffe.", ["elephant", "giraffe"]),
    ("A toilet seat in a small bathroom.", ["toilet"]),
    ("The train tracks lead to a bus stop on the ski slope.", []),
    ("A man wearing a bow tie.", ["person", "tie"]),
    # whole words, case-insensitive
    ("A CAT on a Couch, a DOG'S bowl.", ["cat", "couch", "dog", "bowl"]),
    ("A catalog on a carpet, scattered cartoons.", []),
    # "orange": the fruit, or a colour word
    ("An orange cat sleeps next to an orange.", ["cat", "orange"]),
    ("An orange and white cat on an orange-colored couch.", ["cat", "couch"]),
    ("A bowl of oranges and an orange on the table.", ["bowl", "orange", "dining table"]),
    ("He drinks orange juice.", []),
])
def test_coco_mentions(text, expected):
    assert objs(text) == expected


# --- negation --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,mentioned,negated", [
    ("There is no cat in the image.", [], ["cat"]),
    ("A dog without a leash.", ["dog"], []),
    ("A dog without a ball.", ["dog"], ["sports ball"]),
    ("There is no knife on the table.", ["dining table"], ["knife"]),
    ("There isn't a dog here.", [], ["dog"]),
    ("There isn\u2019t any dog.", [], ["dog"]),
    ("There doesn't seem to be any dog.", [], ["dog"]),
    ("The image does not show any people.", [], ["person"]),
    ("No sign of a cat.", [], ["cat"]),
    ("There are no cats or dogs.", [], ["cat", "dog"]),
    ("Neither a cat nor a dog is visible.", [], ["cat", "dog"]),
    ("No red car.", [], ["car"]),
    # the scope ends: comma, 'but', prepositions, 'and', a second content word
    ("There is no dog, but a cat sits on the couch.", ["cat", "couch"], ["dog"]),
    ("No people in the car.", ["car"], ["person"]),
    ("A man without a hat holding a dog.", ["person", "dog"], []),
    ("A table without forks and a knife.", ["dining table", "knife"], ["fork"]),
    ("No, there is a dog.", ["dog"], []),
    ("The dog is not far from a cat.", ["dog", "cat"], []),
    # a category both negated and mentioned counts as mentioned
    ("There is no cat. Wait, a cat sits on the bench.", ["cat", "bench"], []),
])
def test_negation_rule(text, mentioned, negated):
    m, n = caption_objects(text)
    assert m == mentioned
    assert n == negated


def test_find_mentions_offsets_and_flags():
    text = "A Hot Dog, no Cat."
    ms = find_mentions(text)
    assert [(m.text, m.category, m.negated) for m in ms] == [("Hot Dog", "hot dog", False), ("Cat", "cat", True)]
    assert text[ms[0].start:ms[0].end] == "Hot Dog"


# --- scores ----------------------------------------------------------------------------------

ITEMS = [
    # mentioned {person, horse, dog}, hallucinated {dog}; "man" twice counts once; 15 words
    {"caption": "A man is riding a horse next to a dog. The man wears a hat.", "gt_objects": ["person", "horse"]},
    # cat negated; mentioned {couch, dog}; nothing hallucinated; 10 words
    {"caption": "There is no cat on the couch, only a dog.", "gt_objects": ["dog", "couch"]},
    # mentioned {cell phone, laptop, dining table}; laptop hallucinated; 9 words
    {"caption": "Two cell phones and a laptop on a table.", "gt_objects": ["cell phone", "dining table"]},
    # mentioned {teddy bear, bed} (repeats once); person missed; 11 words
    {"caption": "A teddy bear sits on a bed with several teddy bears.", "gt_objects": ["teddy bear", "bed", "person"]},
]


def test_chair_scores_known_counts():
    res = chair_scores(ITEMS)
    per = res.per_caption
    assert per[0]["mentioned"] == ["person", "horse", "dog"] and per[0]["hallucinated"] == ["dog"]
    assert per[1]["mentioned"] == ["couch", "dog"] and per[1]["hallucinated"] == [] and per[1]["negated"] == ["cat"]
    assert per[2]["hallucinated"] == ["laptop"]
    assert per[3]["mentioned"] == ["teddy bear", "bed"] and per[3]["hallucinated"] == []
    # CHAIR_S 2/4; CHAIR_I 2 hallucinated / 10 distinct mentions; recall 8 / 9; words 45 / 4
    assert res.summary == {"n": 4, "chair_s": 0.5, "chair_i": 0.2, "recall": 0.8889, "mean_len": 11.25}


def test_chair_scores_tuples_and_empty():
    assert chair_scores([("a dog", ["dog"]), ("a cat", ["dog"])]).summary["chair_s"] == 0.5
    assert chair_scores([]).summary == {"n": 0, "chair_s": 0.0, "chair_i": 0.0, "recall": 0.0, "mean_len": 0.0}
    # no mentions at all: CHAIR_I has no denominator -> 0
    assert chair_scores([("a blank wall", ["dog"])]).summary == {
        "n": 1, "chair_s": 0.0, "chair_i": 0.0, "recall": 0.0, "mean_len": 3.0}


# --- testbed vocabulary and vocabulary choice -------------------------------------------------

def test_testbed_vocabulary_matches_world_and_negation():
    tb = chair.testbed_vocabulary()
    text = "A red fork at the top left, but no knife. A stoplight and two Fire Hydrants; no dogs or balls."
    assert caption_objects(text, tb) == (["fork", "traffic light", "fire hydrant"], ["knife", "dog", "ball"])


def test_testbed_template_captions_score_perfectly():
    from vhr_edge.testbed import captions, scenes

    ss = scenes.make_split("counterfactual", 30, 7)
    items = [(captions.detailed_caption(s, np.random.default_rng(i)), s.categories) for i, s in enumerate(ss)]
    summ = chair_scores(items, chair.testbed_vocabulary()).summary
    assert summ["chair_s"] == 0.0 and summ["chair_i"] == 0.0 and summ["recall"] == 1.0
    # the partner a habitual caption would add is a hallucination
    s = ss[0]
    partner = s.missing_partners[0]
    r = chair.score_caption(f"There is a {partner} here.", s.categories, chair.testbed_vocabulary())
    assert r["hallucinated"] == [partner]


def test_vocabulary_for():
    from vhr_edge.testbed import world

    assert chair.vocabulary_for(world.NAMES) is chair.testbed_vocabulary()
    assert chair.vocabulary_for(["fork", "knife"]) is chair.testbed_vocabulary()
    assert chair.vocabulary_for(chair.COCO_CLASSES) is COCO
    v = chair.vocabulary_for(["dog", "ball", "lamp"])  # "ball" is its own label here
    assert v.name == "coco+"
    assert caption_objects("a ball, two lamps and a puppy", v)[0] == ["ball", "lamp", "dog"]


def test_ambiguous_surface_form_is_refused():
    with pytest.raises(ValueError, match="means both"):
        chair.PhraseVocabulary("bad", {"cat": ("pet",), "dog": ("pet",)})
