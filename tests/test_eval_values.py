"""`eval` and `compare` report the right numbers, not only the right keys.

- Hand-made captions and answers (no model) with CHAIR / POPE values worked out by hand.
- The real commands on the tiny model: every caption in the JSONL equals an independent
  captioning of the same picture (`vhr-edge caption` for the greedy run, in-process Session for
  VHR), the greedy run records VHR off everywhere (run.json, summary), and the summary values are
  recomputed here from the per-image lines; compare's table likewise, from its children's files.
"""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from vhr_edge import DEFAULT_PROMPT, Session
from vhr_edge.eval import chair, pope
from vhr_edge.eval.data import TestbedSource
from vhr_edge.eval.run import run_chair, run_pope

from conftest import cli, lines


# --- hand-worked values ------------------------------------------------------------------------

def test_chair_summary_by_hand(tmp_path):
    """Four testbed scenes, four written captions; the numbers below are counted by hand."""
    src = TestbedSource("counterfactual", n=4, seed=11)
    gts = [it.gt for it in src.items]
    present = [g[0] for g in gts]
    absent = [next(c for c in ("lighthouse", "umbrella", "boat", "bird") if c not in g) for g in gts]
    captions = {
        src.items[0].key: f"A {present[0]} and a {absent[0]}.",  # 1 right, 1 hallucinated
        src.items[1].key: f"There is no {absent[1]}, only a {present[1]} and another {present[1]}.",  # negated; dup
        src.items[2].key: "Nothing to see here.",  # no object
        src.items[3].key: f"A {absent[3]} next to a {absent[3]}.",  # 1 hallucinated (once)
    }
    summary = run_chair(src, tmp_path, lambda it: (captions[it.key], {"total_ms": 1.0}), tag="hand", progress=False)
    n_gt = sum(len(g) for g in gts)
    # hallucinating captions: #0 and #3 -> 2/4; objects: {p0, a0}, {p1}, {}, {a3} -> 2 of 4 hallucinated;
    # recall: p0 and p1 found of all ground-truth objects
    assert summary["n"] == 4
    assert summary["chair_s"] == 0.5
    assert summary["chair_i"] == 0.5
    assert summary["recall"] == round(2 / n_gt, 4)
    words = [len(c.split()) for c in captions.values()]
    assert summary["mean_len"] == round(sum(words) / 4, 2)
    recs = {r["image_id"]: r for r in lines(tmp_path / "chair-hand.jsonl")}
    assert recs[src.ids[1]]["mentioned"] == [present[1]] and recs[src.ids[1]]["negated"] == [absent[1]]
    assert recs[src.ids[3]]["hallucinated"] == [absent[3]] and recs[src.ids[2]]["mentioned"] == []


def test_pope_metrics_by_hand(tmp_path):
    """Yes for every present object, an empty (unparsed) answer for every absent one: perfect
    precision and recall, half the answers unparsed, and an unparsed answer is a 'no'."""
    src = TestbedSource("counterfactual", n=4, seed=12)

    def answer(item, question):
        obj = question[len("Is there a "):-len(" in the image?")].removeprefix("n ")
        return ("Yes, there is." if obj in item.gt else ""), {"total_ms": 1.0}

    res = run_pope(src, tmp_path, answer, splits=("random", "adversarial"), tag="hand", progress=False)
    for split in ("random", "adversarial"):
        m = res[split]
        assert m["n"] > 0 and m["n"] % 2 == 0
        assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (1.0, 1.0, 1.0, 1.0, 0.5)
        assert m["unparsed"] == m["n"] // 2

    def always_yes(item, question):
        return "Yes.", {"total_ms": 1.0}

    res = run_pope(src, tmp_path / "yes", always_yes, splits=("random",), tag="yes", progress=False)
    m = res["random"]  # half the questions are about absent objects
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.5, 0.5, 1.0, 0.6667, 1.0)


# --- the commands on the tiny model ------------------------------------------------------------

def summary_from_lines(recs, gts):
    """CHAIR summary recomputed from the per-image lines (mentioned / hallucinated / caption)."""
    n = len(recs)
    mentioned = sum(len(r["mentioned"]) for r in recs)
    hall = sum(len(r["hallucinated"]) for r in recs)
    hits = sum(len(set(r["mentioned"]) & set(g)) for r, g in zip(recs, gts))
    return {"n": n, "chair_s": round(sum(bool(r["hallucinated"]) for r in recs) / n, 4),
            "chair_i": round(hall / mentioned, 4) if mentioned else 0.0,
            "recall": round(hits / sum(len(g) for g in gts), 4),
            "mean_len": round(sum(len(r["caption"].split()) for r in recs) / n, 2)}


N_IMG, MAX_TOK = 4, 12


@pytest.fixture(scope="module")
def eval_runs(tiny, tmp_path_factory):
    """eval chair, greedy and VHR, on the same 4 testbed scenes, in one folder."""
    text, mmproj = tiny
    out = tmp_path_factory.mktemp("evalvals")
    common = ["eval", "chair", "--testbed", "counterfactual", "-n", N_IMG, "--seed", 7, "-m", text, "--mmproj", mmproj,
              "-t", "2", "--max-tokens", MAX_TOK, "--out", out, "--json", "--no-progress"]
    runs = {}
    for tag, flags in (("greedy", ["--no-vhr"]), ("vhr-a2", [])):
        r = cli(*common, *flags)
        assert r.returncode == 0, r.stderr
        runs[tag] = json.loads(r.stdout.strip().splitlines()[-1])
    return out, runs


def test_eval_greedy_is_caption_no_vhr(tiny, eval_runs, tmp_path):
    out, runs = eval_runs
    text, mmproj = tiny
    src = TestbedSource("counterfactual", n=N_IMG, seed=7)
    pngs = []
    for it in src.items:
        p = tmp_path / f"{it.image_id}.png"
        Image.fromarray(it.load()).save(p)
        pngs.append(p)
    r = cli("caption", *pngs, "-m", text, "--mmproj", mmproj, "-t", "2", "-n", MAX_TOK, "--no-vhr", "--json",
            "-p", DEFAULT_PROMPT)
    assert r.returncode == 0, r.stderr
    plain = [json.loads(x)["text"] for x in r.stdout.splitlines()]
    greedy = lines(out / "chair-greedy.jsonl")
    assert [g["image_id"] for g in greedy] == src.ids
    assert [g["caption"] for g in greedy] == plain
    with Session(text, mmproj, n_threads=2) as s:
        with_vhr = [s.caption(it.load(), DEFAULT_PROMPT, n_predict=MAX_TOK).text for it in src.items]
    assert [v["caption"] for v in lines(out / "chair-vhr-a2.jsonl")] == with_vhr
    assert with_vhr != plain  # VHR changes captions here, so the greedy check can fail
    # VHR off wherever the greedy run says how it was made
    assert json.loads((out / "chair-greedy.run.json").read_text())["vhr"] == {"enabled": False}
    saved = json.loads((out / "chair-greedy.summary.json").read_text())
    assert saved["settings"]["vhr"] == {"enabled": False} and saved["tag"] == "greedy"
    assert json.loads((out / "chair-vhr-a2.run.json").read_text())["vhr"]["enabled"] is True


def test_eval_summary_values_follow_the_lines(eval_runs):
    out, runs = eval_runs
    src = TestbedSource("counterfactual", n=N_IMG, seed=7)
    gts = [it.gt for it in src.items]
    for tag in ("greedy", "vhr-a2"):
        recs = lines(out / f"chair-{tag}.jsonl")
        for rec, it in zip(recs, src.items):
            assert rec["gt_objects"] == list(it.gt)
            assert rec["hallucinated"] == [c for c in rec["mentioned"] if c not in it.gt]
            assert rec["mentioned"] == chair.caption_objects(rec["caption"], src.vocab)[0]
        expected = summary_from_lines(recs, gts)
        assert runs[tag] == expected
        saved = json.loads((out / f"chair-{tag}.summary.json").read_text())
        assert {k: saved[k] for k in expected} == expected


def test_eval_pope_answers_and_metrics(tiny, tmp_path):
    text, mmproj = tiny
    out = tmp_path / "pope"
    r = cli("eval", "pope", "--testbed", "counterfactual", "-n", 2, "--seed", 3, "-m", text, "--mmproj", mmproj,
            "-t", "2", "--split", "random", "--no-vhr", "--out", out, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    qs = json.loads((out / "pope-questions.json").read_text())["random"]
    recs = {(x["image_id"], x["object"]): x for x in lines(out / "pope-greedy.jsonl")}
    src = TestbedSource("counterfactual", n=2, seed=3)
    by_id = {it.image_id: it for it in src.items}
    with Session(text, mmproj, n_threads=2) as s:
        for q in qs:
            rec = recs[(q["image_id"], q["object"])]
            assert rec["question"] == q["question"] == pope.question_for(q["object"])
            assert rec["answer"] == s.caption(by_id[q["image_id"]].load(), q["question"], vhr=False, n_predict=16).text
            assert rec["pred"] == pope.parse_yes_no(rec["answer"])
    labels = [q["label"] for q in qs]
    preds = [recs[(q["image_id"], q["object"])]["pred"] for q in qs]
    tp = sum(lab == "yes" and p == "yes" for lab, p in zip(labels, preds))
    fp = sum(lab == "no" and p == "yes" for lab, p in zip(labels, preds))
    fn = sum(lab == "yes" and p != "yes" for lab, p in zip(labels, preds))
    n = len(labels)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec_ = tp / (tp + fn) if tp + fn else 0.0
    assert res["random"]["n"] == n and res["random"]["accuracy"] == round((n - fp - fn) / n, 4)
    assert res["random"]["yes_ratio"] == round((tp + fp) / n, 4)
    assert res["random"]["f1"] == round(2 * prec * rec_ / (prec + rec_) if prec + rec_ else 0.0, 4)


def test_compare_values_come_from_independent_runs(tiny, tmp_path):
    """compare's greedy and VHR rows against captions made here, and its pope_f1 against its
    children's answers."""
    text, mmproj = tiny
    out = tmp_path / "cmp"
    r = cli("compare", "-m", text, "--mmproj", mmproj, "-n", 3, "--pope-n", 2, "--max-tokens", 8, "-t", 2,
            "--no-profile", "--out", out)
    assert r.returncode == 0, r.stderr
    rows = {x["method"]: x for x in csv.DictReader(open(out / "compare.csv"))}
    assert list(rows) == ["greedy", "vhr-a2"]
    src = TestbedSource("counterfactual", n=3, seed=1000)
    gts = [it.gt for it in src.items]
    d = out / text.stem
    with Session(text, mmproj, n_threads=2) as s:
        made = {"greedy": [s.caption(it.load(), DEFAULT_PROMPT, vhr=False, n_predict=8).text for it in src.items],
                "vhr-a2": [s.caption(it.load(), DEFAULT_PROMPT, n_predict=8).text for it in src.items]}
    assert made["greedy"] != made["vhr-a2"]  # the two columns can be told apart
    for method, row in rows.items():
        recs = lines(d / f"chair-{method}.jsonl")
        assert [x["caption"] for x in recs] == made[method], method
        scored = chair.chair_scores(list(zip(made[method], gts)), src.vocab).summary
        for k in ("chair_s", "chair_i", "recall", "mean_len"):
            assert float(row[k]) == pytest.approx(scored[k]), (method, k)
        tps = [x["timings"]["tokens_per_s"] for x in recs]
        assert float(row["tokens_per_s"]) == pytest.approx(round(sum(tps) / len(tps), 1))
        assert float(row["file_mb"]) == pytest.approx(round(text.stat().st_size / 2**20, 2))
        qs = json.loads((d / "pope" / "pope-questions.json").read_text())
        answers = {(x["image_id"], x["object"]): x["pred"] for x in lines(d / "pope" / f"pope-{method}.jsonl")}
        f1 = [pope.pope_metrics([q["label"] for q in qs[s]], [answers[(q["image_id"], q["object"])] for q in qs[s]])["f1"]
              for s in pope.POPE_SPLITS]
        assert float(row["pope_f1"]) == pytest.approx(round(sum(f1) / 3, 4))
    assert json.loads((d / "chair-greedy.run.json").read_text())["vhr"] == {"enabled": False}
    assert json.loads((d / "pope" / "pope-greedy.run.json").read_text())["vhr"] == {"enabled": False}
