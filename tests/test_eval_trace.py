"""`vhr-edge trace`: T-VHD per token, object words marked, JSON + PNG; the batch mode over an
evaluation set (resumable JSONL, AUROC with a bootstrap interval, one-line errors)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vhr_edge.eval import stats
from vhr_edge.eval.data import TestbedSource
from vhr_edge.eval.trace import token_rows, trace_image
from vhr_edge.eval.tvhd import mention_rows, run_trace, summarize
from vhr_edge.eval.chair import testbed_vocabulary
from vhr_edge.session import GenerationConfig, VhrConfig

from conftest import EXE, kill_after_lines, scene

ENV = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}


def test_token_rows_mark_object_words():
    pieces = [" A", " red", " fo", "rk", " and", " a", " knife", "."]
    rows = token_rows(pieces, list(range(8)), {"fork"}, testbed_vocabulary())
    assert [r["object"] for r in rows] == [None, None, "fork", "fork", None, None, "knife", None]
    assert [r["hallucinated"] for r in rows if r["object"]] == [False, False, True]
    rows = token_rows([" no", " knife"], [0, 1], {"fork"}, testbed_vocabulary())
    assert rows[1]["object"] is None  # negated mentions are not objects


def test_trace_values_are_top_k_sums(session, image_a):
    tr = trace_image(session, image_a, prompt="Describe.", vhr=VhrConfig(), gen=GenerationConfig(n_predict=6), k=2)
    r = session.caption(image_a, "Describe.", trace=True, n_predict=6)
    assert [t["piece"] for t in tr["tokens"]] == session._runner.pieces(r.tokens)
    ref = [float(np.sort(step, axis=1)[:, -2:].sum()) for step in r.trace]
    np.testing.assert_allclose([t["t_vhd"] for t in tr["tokens"]], ref, rtol=1e-5)


def test_cli_trace_given_caption(tiny, tmp_path):
    text, mmproj = tiny
    img = tmp_path / "a.png"
    Image.fromarray(scene(1)).save(img)
    out = tmp_path / "tr"
    r = subprocess.run([sys.executable, "-m", "vhr_edge.cli", "trace", str(img), "-m", str(text), "--mmproj", str(mmproj),
                        "--caption", "A red fork and a knife.", "--objects", "fork", "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tr = json.loads(r.stdout)
    assert tr["text"].startswith("A red fork and a knife")
    marked = {t["object"]: t["hallucinated"] for t in tr["tokens"] if t["object"]}
    assert marked == {"fork": False, "knife": True}
    assert np.array(tr["vhd_step0"]).shape == (8, 4)
    assert (out / "trace.json").is_file() and (out / "vhd_step0.png").stat().st_size > 0
    assert (out / "t_vhd.png").stat().st_size > 0


# --- AUROC and the bootstrap ----------------------------------------------------------------------

def test_midranks_and_auroc_hand_computed_with_ties():
    np.testing.assert_array_equal(stats.midranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(stats.midranks([5, 5, 5]), [2, 2, 2])
    # pos (3, 2, 2, 5) vs neg (2, 1): pairs won 2 + (0.5 + 1) + (0.5 + 1) + 2 = 7 of 8
    assert stats.auroc([3, 2, 2, 5], [2, 1]) == 0.875
    assert stats.auroc([1, 2], [3, 4]) == 0.0 and stats.auroc([3, 4], [1, 2]) == 1.0
    assert stats.auroc([2, 2], [2, 2, 2]) == 0.5  # all tied
    # (0.4 beats 0.1 and 0.35, ties nothing) + (0.8 beats all 3) + (0.35 ties 0.35, beats 0.1) = 2 + 3 + 1.5
    assert math.isclose(stats.auroc([0.4, 0.8, 0.35], [0.1, 0.35, 0.9]), 5.5 / 9)
    assert math.isnan(stats.auroc([], [1.0])) and math.isnan(stats.auroc([1.0], []))


def test_auroc_bootstrap_resamples_captions():
    groups = [([3.0, 2.0], [2.0]), ([2.0, 5.0], [1.0]), ([4.0], []), ([], [0.5])]
    a = stats.auroc_bootstrap(groups, n_boot=1, seed=7)
    assert a["auroc"] == stats.auroc([3, 2, 2, 5, 4], [2, 1, 0.5]) and (a["n_pos"], a["n_neg"]) == (5, 3)
    # the single resample, rebuilt by hand: caption i repeated counts[i] times
    counts = stats.boot_counts(4, 1, 7)[0].astype(int)
    pos = [v for g, c in zip(groups, counts) for _ in range(c) for v in g[0]]
    neg = [v for g, c in zip(groups, counts) for _ in range(c) for v in g[1]]
    if pos and neg:
        assert a["ci"] == pytest.approx([stats.auroc(pos, neg)] * 2)
    b = stats.auroc_bootstrap(groups, n_boot=500, seed=0)
    assert b["ci"][0] <= b["auroc"] <= b["ci"][1]
    empty = stats.auroc_bootstrap([([1.0], [])], n_boot=10)  # no hallucinated mention at all
    assert math.isnan(empty["auroc"]) and all(math.isnan(x) for x in empty["ci"])
    # resamples that draw only the caption without negatives are skipped, not counted as 0 or 1
    vals = stats.auroc_resamples([([1.0], []), ([2.0], [0.0])], np.array([[2.0, 0.0], [1.0, 1.0]]))
    assert math.isnan(vals[0]) and vals[1] == 1.0


def test_chair_paired_diff_is_zero_against_itself_and_sees_a_shift():
    rows = stats.chair_rows([{"hallucinated": ["dog"] if i % 3 == 0 else [], "mentioned": ["cat", "dog"],
                              "hit": ["cat"], "n_gt": 2} for i in range(30)])
    d = stats.chair_paired_diff(rows, rows, n_boot=200)
    assert all(d[m]["estimate"] == 0 and d[m]["ci"] == [0, 0] for m in stats.METRICS)
    better = rows.copy()
    better[:, 0] = 0
    better[:, 1] = 0
    d = stats.chair_paired_diff(better, rows, n_boot=200)
    assert d["chair_s"]["estimate"] == pytest.approx(-10 / 30) and d["chair_s"]["below_zero"]
    ci = stats.chair_ci(rows, n_boot=200)
    assert ci["chair_s"]["estimate"] == pytest.approx(1 / 3) and ci["chair_i"]["estimate"] == pytest.approx(10 / 60)
    d2 = stats.chair_paired_diff(rows, np.stack([rows, better]), n_boot=50)  # mean over two runs
    assert d2["chair_s"]["estimate"] == pytest.approx(1 / 3 - 1 / 6)


# --- the batch mode ---------------------------------------------------------------------------------

def test_mention_rows_first_token_and_marks():
    pieces = [" A", " fo", "rk", " in", " red", " and", " no", " knife", ",", " a", " cup", "."]
    t = [float(i) for i in range(len(pieces))]
    rows = mention_rows(pieces, t, {"fork"}, testbed_vocabulary(), per_layer=np.arange(24.0).reshape(12, 2))
    assert [(r["category"], r["hallucinated"], r["token"], r["t_vhd"]) for r in rows] == [
        ("fork", False, 1, 1.0), ("cup", True, 10, 10.0)]  # "no knife" is negated: not a mention
    assert rows[1]["layers"] == [20.0, 21.0]


def _fake_tracer(item):
    """A caption naming the first real object (T-VHD 5) and a dog (T-VHD 1 unless present)."""
    pieces = [" A", f" {item.gt[0]}", " and", " a", " dog", "."]
    return "A " + item.gt[0] + " and a dog.", pieces, [0.0, 5.0, 0.0, 0.0, 1.0, 0.0], None, {"stop_reason": "eos"}


def test_run_trace_resumes_every_id_once(tmp_path):
    src = TestbedSource("counterfactual", n=10, seed=3)
    calls = []

    def dying(item):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(item.image_id)
        return _fake_tracer(item)

    with pytest.raises(KeyboardInterrupt):
        run_trace(src, tmp_path, dying, k=8, tag="g", progress=False, plot=False)
    path = tmp_path / "trace-g.jsonl"
    with open(path, "a") as f:
        f.write('{"image_id": "half')  # a kill in the middle of a line
    calls.clear()

    def counting(item):
        calls.append(item.image_id)
        return _fake_tracer(item)

    s = run_trace(src, tmp_path, counting, k=8, tag="g", progress=False, plot=False)
    assert calls == src.ids[4:]
    ids = [json.loads(x)["image_id"] for x in path.read_text().splitlines()]
    assert ids == src.ids
    real = [5.0] * 10 + [1.0 for it in src.items if "dog" in it.gt]  # a present dog is real
    hall = [1.0 for it in src.items if "dog" not in it.gt]
    assert (s["n_real"], s["n_hallucinated"]) == (len(real), len(hall)) and hall
    assert s["auroc"] == round(stats.auroc(real, hall), 4) and s["mean_t_vhd_hallucinated"] == 1.0
    calls.clear()
    assert run_trace(src, tmp_path, counting, k=8, tag="g", progress=False, plot=False)["auroc"] == s["auroc"]
    assert calls == []


def test_summarize_hand_computed():
    recs = [{"k": 8, "caption": "a fork", "gt_objects": ["fork"], "tokens": [{"t_vhd": 1.0}],
             "mentions": [{"t_vhd": 3.0, "hallucinated": False}, {"t_vhd": 2.0, "hallucinated": True}]},
            {"k": 8, "caption": "a cup", "gt_objects": ["fork"], "tokens": [{"t_vhd": 3.0}],
             "mentions": [{"t_vhd": 2.0, "hallucinated": False}, {"t_vhd": 4.0, "hallucinated": True}]}]
    s = summarize(recs, testbed_vocabulary(), n_boot=100)
    assert s["auroc"] == stats.auroc([3, 2], [2, 4]) == 0.375  # (1 + 0) + (0.5 + 0) of 4
    assert (s["mean_t_vhd_real"], s["mean_t_vhd_hallucinated"], s["mean_t_vhd_all_tokens"]) == (2.5, 3.0, 2.0)
    assert s["chair"]["chair_s"] == 0.5


def test_cli_batch_trace_killed_and_resumed(tiny, tmp_path):
    text, mmproj = tiny
    out = tmp_path / "tr"
    args = EXE + ["trace", "--testbed", "counterfactual", "-n", "30", "--seed", "9", "-m", str(text),
                  "--mmproj", str(mmproj), "-t", "1", "--max-tokens", "24", "--no-vhr", "--out", str(out),
                  "--no-progress", "--bootstrap", "50"]
    path = out / "trace-greedy.jsonl"
    n_before = kill_after_lines(args, path, 3, env=ENV)
    assert 3 <= n_before < 30
    r = subprocess.run(args + ["--json"], capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    ids = [x["image_id"] for x in recs]
    assert ids == TestbedSource("counterfactual", n=30, seed=9).ids  # every id once, in order
    assert all(len(x["tokens"]) >= 1 and x["k"] == 8 for x in recs)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n_captions"] == 30
    saved = json.loads((out / "trace-greedy.summary.json").read_text())
    assert saved["settings"]["vhr"] == {"enabled": False} and saved["data"]["seed"] == 9
    # another method in the same folder gets its own files; other settings under one tag are refused
    bad = subprocess.run([a for a in args if a != "--no-vhr"] + ["--tag", "greedy"], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert bad.returncode == 1 and "other settings" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["{img}", "--testbed", "indist", "--out", "{o}"], "not both"),
    ([], "give an image, or an evaluation set"),
    (["--testbed", "indist"], "needs --out DIR"),
    (["--testbed", "indist", "--out", "{o}", "--caption", "a fork"], "--caption is for one image"),
    (["--testbed", "indist", "--out", "{o}", "--objects", "fork"], "--objects is for one image"),
    (["--testbed", "indist", "--out", "{o}", "-n", "0"], "-n must be at least 1, got 0"),
    (["--testbed", "indist", "--out", "{o}", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--testbed", "indist", "--out", "{o}", "--bootstrap", "3"], "--bootstrap must be at least 10"),
    (["--testbed", "indist", "--out", "{o}", "--tag", "a/b"], "--tag may hold"),
    (["--images", "{o}", "--out", "{o}"], "needs both --images DIR and --annotations FILE"),
    (["--images", "{o}", "--annotations", "{o}/none.json", "--out", "{o}"], "annotations file not found"),
    (["{img}", "--max-tokens", "5"], "--max-tokens is for the batch mode"),
    (["{img}", "-k", "0"], "-k must be at least 1"),
])
def test_trace_bad_input_one_line(tiny, tmp_path, args, message):
    text, mmproj = tiny
    img = tmp_path / "a.png"
    Image.fromarray(scene(1)).save(img)
    (tmp_path / "o").mkdir()
    args = [a.format(img=img, o=tmp_path / "o") for a in args]
    r = subprocess.run(EXE + ["trace", *args, "-m", str(text), "--mmproj", str(mmproj)], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vhr-edge: error: ") and message in err[0], r.stderr
    assert r.stdout == ""


def test_top_heads_flag_names_the_run():
    from vhr_edge.flags import vhr_tag

    assert vhr_tag(2.0, "1,4-7", top_heads=2) == "vhr-a2-L1,4-7-top2"
    assert vhr_tag(1.5) == "vhr-a1.5"
