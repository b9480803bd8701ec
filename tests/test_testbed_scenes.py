"""The testbed world (vhr_edge.testbed): determinism, habits per split, captions, questions,
COCO export and pictograms. numpy + Pillow only; a few seconds."""

from __future__ import annotations

import collections
import io
import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image

from vhr_edge.testbed import captions, coco, draw, scenes, world

N_STATS = 500


@pytest.fixture(scope="module")
def splits():
    return {sp: scenes.make_split(sp, N_STATS, seed=0) for sp in scenes.SPLIT_CODES}


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def habit_stats(sc: list[scenes.Scene]) -> dict:
    home = total = have = both = 0
    per_pair = collections.defaultdict(lambda: [0, 0])
    for s in sc:
        cats = set(s.categories)
        for c in cats:
            total += 1
            home += world.BY_NAME[c].home == s.context
            if c in world.PARTNER:
                have += 1
                both += world.PARTNER[c] in cats
                per_pair[c][0] += 1
                per_pair[c][1] += world.PARTNER[c] in cats
    return {"home": home / total, "cooc": both / have,
            "per_pair": {c: b / a for c, (a, b) in per_pair.items()}}


# --- the vocabulary ---------------------------------------------------------------------------

def test_world_vocabulary():
    assert len(world.CATEGORIES) >= 12 and len(set(world.NAMES)) == len(world.NAMES)
    assert len(world.CONTEXTS) >= 4 and len(world.COLOURS) >= 8
    for ctx in world.CONTEXT_NAMES:
        assert world.HOME_OBJECTS[ctx], ctx
    for a, b in world.PAIRS:
        assert world.PARTNER[a] == b and world.PARTNER[b] == a
        assert world.ORDER[a] + 1 == world.ORDER[b]  # habitual order: partner right after
    assert set(draw.PICTOGRAMS) == set(world.NAMES)
    # context and background wording mention no object and no colour
    for c in world.CONTEXTS:
        text = f"{c.noun} {c.adjective} {c.background}"
        assert world.find_mentions(text) == [], c
        assert not set(text.split()) & set(world.COLOUR_NAMES), c


def test_find_mentions():
    text = "Two Traffic  lights, knives, a Lighthouse, a puppy and a light house; light, forklift, fork."
    assert world.find_mentions(text) == [
        "traffic light", "knife", "lighthouse", "dog", "lighthouse", "fork"]
    assert world.find_mentions("a stop light near the hydrants and a mug") == [
        "traffic light", "fire hydrant", "cup"]
    assert world.article("orange") == "an" and world.article("red") == "a"


# --- determinism ------------------------------------------------------------------------------

def test_determinism_scenes_and_pixels():
    a, b = scenes.make_split("train", 12, seed=7), scenes.make_split("train", 12, seed=7)
    assert a == b
    assert [png_bytes(scenes.render(s)) for s in a[:4]] == [png_bytes(scenes.render(s)) for s in b[:4]]
    assert scenes.make_split("train", 5, seed=7) == a[:5]  # a prefix does not depend on n
    c = scenes.make_split("train", 12, seed=8)
    assert [s.to_dict() | {"id": ""} for s in a] != [s.to_dict() | {"id": ""} for s in c]
    assert png_bytes(scenes.render(a[0])) != png_bytes(scenes.render(c[0]))
    # train and indist are different streams of the same law
    d = scenes.make_split("indist", 12, seed=7)
    assert [s.objects for s in a] != [s.objects for s in d]


def test_ids_unique_and_prefixed(splits):
    for sp, sc in splits.items():
        ids = [s.id for s in sc]
        assert len(set(ids)) == len(ids)
        assert all(i.startswith(sp + "-") for i in ids) and all(s.split == sp for s in sc)
    with pytest.raises(ValueError):
        scenes.make_split("nope", 1)


def test_scene_invariants(splits):
    S = scenes.BASE_SIZE
    for sp, sc in splits.items():
        for s in sc:
            assert s.context in world.CONTEXT_NAMES
            assert 1 <= len(s.objects) <= 4
            cats = [o.category for o in s.objects]
            assert len(set(cats)) == len(cats)
            assert len({o.position for o in s.objects}) == len(cats)  # distinct coarse positions
            for o in s.objects:
                x, y, w, h = o.bbox
                assert 0 <= x and 0 <= y and x + w <= S and y + h <= S, (s.id, o)
                assert 14 <= max(w, h) <= 26 and min(w, h) >= 6, (s.id, o)
                assert o.colour in world.COLOURS and o.position == scenes.position_of(o.bbox)
            for o1, o2 in itertools.combinations(s.objects, 2):
                assert scenes._overlap(o1.bbox, o2.bbox) <= scenes.MAX_OVERLAP + 1e-9
            assert scenes.Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# --- habits per split -------------------------------------------------------------------------

def test_train_and_indist_are_habitual(splits):
    tr, ind = habit_stats(splits["train"]), habit_stats(splits["indist"])
    for st in (tr, ind):
        assert st["cooc"] >= 0.8 and st["home"] >= 0.75, st
        assert min(st["per_pair"].values()) >= 0.7, st["per_pair"]
    assert abs(tr["cooc"] - ind["cooc"]) < 0.05 and abs(tr["home"] - ind["home"]) < 0.05
    # every category does occur outside its home sometimes, and lonely members exist
    assert tr["home"] < 0.97 and tr["cooc"] < 0.99


def test_counterfactual_breaks_habits(splits):
    sc = splits["counterfactual"]
    assert all(s.missing_partners for s in sc)
    for s in sc:
        for m in s.missing_partners:
            assert m not in s.categories and world.PARTNER[m] in s.categories
    st = habit_stats(sc)
    assert st["cooc"] < 0.2 and st["home"] < 0.6, st
    foreign = np.mean([any(world.BY_NAME[c].home != s.context for c in s.categories) for s in sc])
    assert foreign >= 0.4
    # the lonely object itself is often out of its home (a boat on a street)
    away = np.mean([all(world.BY_NAME[world.PARTNER[m]].home != s.context for m in s.missing_partners)
                    for s in sc])
    assert 0.25 <= away <= 0.75, away
    lonely = {c for s in sc for c in s.categories if world.PARTNER.get(c) in s.missing_partners}
    assert set(lonely) == set(world.PARTNER)  # every pair member appears alone somewhere


def test_unbiased_is_uniform(splits):
    sc = splits["unbiased"]
    counts = collections.Counter(c for s in sc for c in s.categories)
    n = np.array([counts[c] for c in world.NAMES], float)
    chi2 = ((n - n.mean()) ** 2 / n.mean()).sum()
    assert chi2 < 40, dict(counts)  # 15 degrees of freedom: p < 0.001
    st = habit_stats(sc)
    assert st["cooc"] < 0.35 and st["home"] < 0.4, st
    assert collections.Counter(s.context for s in sc).most_common()[-1][1] > N_STATS / 8


# --- rendering ----------------------------------------------------------------------------------

def test_render_sizes_and_colours(splits):
    for s in splits["unbiased"][:40]:
        im = scenes.render(s)
        assert im.size == (64, 64) and im.mode == "RGB"
        a = np.asarray(im).astype(float)
        for o in s.objects:
            x, y, w, h = o.bbox
            d = np.sqrt(((a[y:y + h, x:x + w] - world.COLOURS[o.colour]) ** 2).sum(-1))
            assert (d < 60).mean() > 0.12, (s.id, o)  # the object's colour is visible in its box
    big = scenes.render(splits["train"][0], size=128)
    assert big.size == (128, 128)


def test_pictograms_differ():
    red, grey = world.COLOURS["red"], (128, 128, 128)
    ims = {c: np.asarray(draw.single(c, red, 64, grey)).astype(float) for c in world.NAMES}
    masks = {c: np.abs(im - 128).sum(-1) > 30 for c, im in ims.items()}
    for c, m in masks.items():
        assert m.mean() > 0.08, c  # something is drawn
    for a, b in itertools.combinations(world.NAMES, 2):
        assert np.abs(ims[a] - ims[b]).mean() > 4.0, (a, b)
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.9, (a, b, iou)
    # the drawings themselves differ, not only the box shapes: all in one square box
    sq = {c: np.asarray(draw.compose(grey, [(c, red, (16, 16, 32, 32), False)], 64,
                                     np.random.default_rng(0), noise=0)).astype(float)
          for c in world.NAMES}
    for a, b in itertools.combinations(world.NAMES, 2):
        assert np.abs(sq[a] - sq[b]).mean() > 4.0, (a, b)
    # colour changes pixels, not the silhouette
    blue = np.asarray(draw.single("fork", world.COLOURS["blue"], 64, grey)).astype(float)
    assert (np.abs(blue - 128).sum(-1) > 30).tolist() == masks["fork"].tolist()
    assert np.abs(blue - ims["fork"]).mean() > 4.0


# --- captions and questions ---------------------------------------------------------------------

COLOUR_RE = re.compile(r"\b(" + "|".join(world.COLOUR_NAMES) + r")\b")


def test_detailed_captions(splits):
    lengths = []
    for sp in ("train", "counterfactual", "unbiased"):
        for s in splits[sp][:150]:
            text = captions.detailed_caption(s, captions.rng_for(s))
            assert text == captions.detailed_caption(s, captions.rng_for(s))
            mentions = world.find_mentions(text)
            assert sorted(mentions) == sorted(s.categories), (text, s.categories)  # each once, none extra
            assert mentions == list(s.categories), text  # habitual order
            assert sorted(COLOUR_RE.findall(text.lower())) == sorted(o.colour for o in s.objects), text
            for o in s.objects:
                assert f"{o.category} in {o.colour}" in text  # noun first, then its colour
            parsed = captions.parse_caption(text)
            assert parsed == [{"category": o.category, "colour": o.colour, "position": o.position}
                              for o in s.in_caption_order()], text
            lengths.append(len(text.split()))
    assert min(lengths) >= 20 and max(lengths) <= 40
    assert np.mean(lengths) > 27


def test_parse_caption_reads_both_colour_wordings():
    assert captions.parse_caption("A red fork at the top left and a knife in blue on the right.") == [
        {"category": "fork", "colour": "red", "position": "top left"},
        {"category": "knife", "colour": "blue", "position": "right"}]
    # a colour belongs to one object only: "in red" after the fork is not the knife's
    assert captions.parse_caption("There is a fork in red and a knife.") == [
        {"category": "fork", "colour": "red", "position": None},
        {"category": "knife", "colour": None, "position": None}]


def test_caption_variety_and_habitual_pairs(splits):
    sc = splits["train"][:200]
    texts = [captions.detailed_caption(s, captions.rng_for(s)) for s in sc]
    openings = collections.Counter(t.split(".")[0].split()[0] for t in texts)
    assert len(openings) >= 3
    assert len(set(texts)) == len(texts)
    # in training captions a first pair member is immediately followed by its partner most of the time
    follow = [m[i + 1] == world.PARTNER[c] if i + 1 < len(m) else False
              for m in map(world.find_mentions, texts)
              for i, c in enumerate(m) if c in dict(world.PAIRS)]
    assert np.mean(follow) > 0.75


def test_questions(splits):
    yes = no = adversarial = 0
    for s in splits["train"][:200] + splits["counterfactual"][:200]:
        qa = captions.questions(s, captions.rng_for(s, 1), 6)
        k = min(3, len(s.categories))
        assert len(qa) == 2 * k and len({q for q, _ in qa}) == len(qa)
        assert qa == captions.questions(s, captions.rng_for(s, 1), 6)
        for q, a in qa:
            m = re.fullmatch(r"Is there an? (.+) in the image\?", q)
            assert m and a in ("Yes.", "No.")
            assert (a == "Yes.") == (m.group(1) in s.categories), (q, a, s.categories)
            if a == "No.":
                no += 1
                adversarial += m.group(1) in s.missing_partners or m.group(1) in world.HOME_OBJECTS[s.context]
            else:
                yes += 1
    assert yes == no
    assert adversarial / no > 0.5  # random negatives alone would give ~0.25


def test_training_corpus(splits):
    sc = splits["train"][:20]
    text = captions.training_corpus(sc)
    assert text == captions.training_corpus(sc)
    lines = text.splitlines()
    assert sorted(captions.training_corpus(sc[::-1]).splitlines()) == sorted(lines)  # per-scene text
    assert lines[0] == captions.DETAIL_PROMPT
    assert captions.detailed_caption(sc[3], captions.rng_for(sc[3])) in lines
    assert sum(line.endswith(("Yes.", "No.")) for line in lines) >= 2 * len(sc)


# --- COCO -----------------------------------------------------------------------------------------

def test_to_coco(splits):
    sc = splits["counterfactual"][:30] + splits["train"][:30]
    for size in (64, 128):
        d = coco.to_coco(sc, size=size)
        json.dumps(d)
        cats = {c["id"]: c["name"] for c in d["categories"]}
        assert sorted(cats.values()) == sorted(world.NAMES)
        imgs = {i["id"]: i for i in d["images"]}
        assert len(imgs) == len(sc) and len({i["file_name"] for i in d["images"]}) == len(sc)
        assert len(d["annotations"]) == sum(len(s.objects) for s in sc)
        assert len({a["id"] for a in d["annotations"]}) == len(d["annotations"])
        for a in d["annotations"]:
            img = imgs[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
            assert a["area"] == pytest.approx(w * h) and a["iscrowd"] == 0
            scene = next(s for s in sc if s.id == img["scene_id"])
            obj = next(o for o in scene.objects if o.category == cats[a["category_id"]])
            assert a["colour"] == obj.colour
            assert [v * size / 64 for v in obj.bbox] == pytest.approx(a["bbox"])
        for i, s in zip(d["images"], sc):
            assert i["missing_partners"] == list(s.missing_partners) and i["context"] == s.context
    assert coco.scenes_from_coco(coco.to_coco(sc)) == sc


def test_write_split(tmp_path):
    path = coco.write_split("counterfactual", 6, 3, tmp_path)
    d = json.loads(path.read_text())
    assert len(d["images"]) == 6
    for img in d["images"]:
        with Image.open(tmp_path / img["file_name"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    first = scenes.make_split("counterfactual", 1, 3)[0]
    assert (tmp_path / "images" / f"{first.id}.png").read_bytes() == png_bytes(scenes.render(first))
