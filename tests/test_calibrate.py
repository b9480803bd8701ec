"""`vhr-edge calibrate`: the selection rule on hand-made sweep tables, disjoint calibration and
evaluation ids, the candidate layer sets, and a tiny end-to-end run on a fixture model."""

from __future__ import annotations

import json
import os
import subprocess
from argparse import Namespace

import pytest

from vhr_edge import fixtures
from vhr_edge.calibrate import calibration_source, check_disjoint
from vhr_edge.profile_rule import (bootstrap_ci, candidate_layer_sets, choose, paired_diff, sweep_settings,
                                   violations)
from vhr_edge.errors import ConfigError
from vhr_edge.eval import DEFAULT_N, DEFAULT_SEED
from vhr_edge.eval.data import CocoSource, TestbedSource, write_ids
from vhr_edge.profile import load_profile, profile_for_model

from conftest import EXE, SPEC

N = 40  # images in the hand-made tables


def hall(ones) -> list[int]:
    """Per-image indicators: 1 for the images listed (an int k: the first k images)."""
    idx = range(ones) if isinstance(ones, int) else ones
    h = [0] * N
    for i in idx:
        h[i] = 1
    return h


def row(key, alpha, ones, recall=0.80, mean_len=50.0, layers=(1, 4, 5, 6, 7)):
    h = hall(ones)
    return {"key": key, "alpha": alpha, "layers": list(layers), "chair_s": sum(h) / N, "chair_i": 0.1,
            "recall": recall, "mean_len": mean_len, "hall": h, "n": N}


GREEDY = row("greedy", None, 30, recall=0.80, mean_len=50.0, layers=())
PAPER = "vhr-a2-L1,4-7"


def table():
    """paper 20/40; the rows below it hallucinate on subsets of the paper rule's images."""
    return [
        row(PAPER, 2.0, 20),
        row("low-recall", 2.0, 4, recall=0.77, layers=(0, 1)),  # best CHAIR_S, recall drop 0.03
        row("long", 3.0, 5, mean_len=56.0, layers=(2, 3)),  # 12% longer
        row("a3", 3.0, 8, recall=0.79, mean_len=45.5, layers=(4, 5)),
        row("a1.5", 1.5, 8, recall=0.78, mean_len=54.9, layers=(6, 7)),  # same CHAIR_S, smaller alpha
        row("worse", 1.5, 25, layers=(0, 1, 2, 3)),
    ]


def test_objective_constraints_and_tie_goes_to_smaller_alpha():
    rows = table()
    d = choose(rows, GREEDY, PAPER, n_boot=500)
    assert d.violations["low-recall"] and "recall" in d.violations["low-recall"][0]
    assert d.violations["long"] and "length" in d.violations["long"][0]
    assert d.violations["a1.5"] == [] and d.violations["a3"] == []  # 0.02 drop and 9.8% are allowed
    assert d.candidate == "a1.5"  # ties on CHAIR_S -> the smaller alpha
    assert d.diff_vs_paper["beyond_uncertainty"] and d.diff_vs_paper["ci"][1] < 0
    assert d.control_needed == "a1.5" and not d.kept_paper  # beats the paper rule; control still to run

    ctrl_bad = {**row("a1.5-random", 1.5, 19), "layers": [6, 7]}  # random heads nearly as bad as the paper
    d = choose(rows, GREEDY, PAPER, controls={"a1.5": ctrl_bad}, n_boot=500)
    assert d.chosen == "a1.5" and d.control_needed is None and d.chosen_vs_control["beyond_uncertainty"]
    assert "beats its random-heads control" in d.reason

    ctrl_same = {**row("a1.5-random", 1.5, 8), "layers": [6, 7]}  # random heads do as well: only a perturbation
    d = choose(rows, GREEDY, PAPER, controls={"a1.5": ctrl_same}, n_boot=500)
    assert d.chosen == PAPER and d.kept_paper and "random-heads control" in d.reason


def test_keep_the_paper_rule_when_not_beyond_uncertainty():
    rows = [row(PAPER, 2.0, 20), row("slightly-better", 1.5, 18, layers=(0, 1))]  # 2 images of 40
    d = choose(rows, GREEDY, PAPER, n_boot=1000)
    assert d.candidate == "slightly-better" and d.chosen == PAPER and d.kept_paper
    lo, hi = d.diff_vs_paper["ci"]
    assert lo < 0 <= hi and "not beyond the uncertainty" in d.reason
    assert d.control_needed is None  # nothing to adopt: no control run needed for the candidate


def test_paper_best_none_feasible_and_paper_infeasible():
    d = choose([row(PAPER, 2.0, 10), row("x", 3.0, 12, layers=(0,))], GREEDY, PAPER)
    assert d.chosen == PAPER and d.candidate == PAPER and "best setting" in d.reason
    d = choose([row(PAPER, 2.0, 10, recall=0.5), row("x", 3.0, 12, mean_len=80, layers=(0,))], GREEDY, PAPER)
    assert d.chosen == PAPER and d.candidate is None and "no setting meets" in d.reason
    assert any("breaks the constraints" in w for w in d.warnings)
    # the paper rule breaks the recall constraint: a feasible row need not beat its CHAIR_S, only its control
    rows = [row(PAPER, 2.0, 10, recall=0.5), row("x", 3.0, 12, layers=(0,))]
    d = choose(rows, GREEDY, PAPER, controls={"x": row("x-random", 3.0, 30)})
    assert d.chosen == "x" and not d.kept_paper and "which the paper rule breaks" in d.reason
    # ... and when it does not beat its control either, it is still chosen over the rule that breaks them
    d = choose(rows, GREEDY, PAPER, controls={"x": row("x-random", 3.0, 12)})
    assert d.chosen == "x" and not d.kept_paper and "least harmful" in d.reason
    assert any("does not beat its random-heads control" in w for w in d.warnings)


def test_bootstrap_is_deterministic_and_paired():
    h = hall(20)
    assert bootstrap_ci(h, 200, seed=3) == bootstrap_ci(h, 200, seed=3)
    lo, hi = bootstrap_ci(h, 2000)
    assert lo < 0.5 < hi and 0.3 < lo and hi < 0.7
    d = paired_diff(hall(10), hall(20), 1000)  # the first 10 of the same 20 images: paired, always <= 0
    assert d["estimate"] == -0.25 and d["ci"][1] < 0 and d["beyond_uncertainty"]
    assert violations(row("r", 2.0, 1, recall=0.78, mean_len=45.0), GREEDY) == []  # both limits exactly


def test_candidate_layer_sets():
    sets = dict(candidate_layer_sets(32))
    assert sets["paper"] == [1] + list(range(18, 32))
    assert sets["band1of4"] == list(range(8)) and sets["band4of4"] == list(range(24, 32))
    assert sets["early"] == list(range(16)) and sets["late"] == list(range(16, 32)) and sets["all"] == list(range(32))
    assert dict(candidate_layer_sets(8))["paper"] == [1, 4, 5, 6, 7]
    layer_sets = [tuple(x) for _, x in candidate_layer_sets(2)]
    assert len(layer_sets) == len(set(layer_sets))  # duplicates dropped on small models
    keys = [s.key for s in sweep_settings(8, [1.5, 2.0])]
    assert keys[:2] == ["greedy", "vhr-a2-L1,4-7"] and len(keys) == len(set(keys)) == 2 + 2 * 8 - 1


# --- calibration vs evaluation ids ----------------------------------------------------------------


def cal_args(**kw):
    base = dict(n=20, seed=2000, size=64, split=None, images=None, annotations=None, captions=None, exclude_ids=None)
    return Namespace(**{**base, **kw})


def test_testbed_calibration_ids_disjoint_from_evaluation():
    src, _ = calibration_source(cal_args())
    assert src.describe()["split"] == "counterfactual" and src.describe()["seed"] == 2000
    ev = TestbedSource("counterfactual", n=DEFAULT_N, seed=DEFAULT_SEED)
    assert len(src.ids) == 20 and not set(src.ids) & set(ev.ids)
    check_disjoint(src.ids, ev.ids)
    with pytest.raises(ConfigError, match="--seed 1000 draws the evaluation scenes"):
        calibration_source(cal_args(seed=DEFAULT_SEED))
    with pytest.raises(ConfigError, match="overlap the evaluation images \\(2 shared ids"):
        check_disjoint(["a", "b", 3], ["b", "3", "c"])
    with pytest.raises(ConfigError, match="unknown --split"):
        calibration_source(cal_args(split="nope"))
    assert calibration_source(cal_args(split="indist"))[0].describe()["split"] == "indist"


def test_coco_calibration_excludes_the_evaluation_ids(tmp_path):
    from vhr_edge.testbed import coco

    d = tmp_path / "coco"
    coco.write_split("counterfactual", 12, 3, d)
    ev = CocoSource(d / "images", d / "instances.json", n=6, seed=DEFAULT_SEED)
    write_ids(tmp_path / "eval", ev)
    ids_json = tmp_path / "eval" / "ids.json"
    args = cal_args(n=20, images=d / "images", annotations=d / "instances.json", exclude_ids=[str(ids_json)])
    src, excluded = calibration_source(args)
    assert len(src.ids) == 6 and not {str(i) for i in src.ids} & {str(i) for i in ev.ids}
    assert sorted(map(str, src.ids + ev.ids)) == sorted(str(i) for i in CocoSource(d / "images", d / "instances.json", n=99).ids)
    assert src.describe()["n_excluded"] == 6 and len(excluded) == 6
    with pytest.raises(ConfigError, match="needs --exclude-ids"):
        calibration_source(cal_args(images=d / "images", annotations=d / "instances.json"))


# --- end to end -----------------------------------------------------------------------------------


def test_calibrate_end_to_end(tmp_path):
    text, mmproj = fixtures.write_tiny_llava(tmp_path, SPEC, name="cal")
    out = tmp_path / "sweep"
    args = ["calibrate", "-m", text, "--mmproj", mmproj, "-n", "3", "--alphas", "2,3", "--bands", "2",
            "--max-tokens", "4", "--bootstrap", "200", "-t", "2", "--out", out, "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    r = subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "objective: lowest CHAIR_S subject to object recall at most 0.02 below greedy" in r.stderr
    decision = json.loads(r.stdout.strip().splitlines()[-1])
    prof_path = profile_for_model(text)
    prof = load_profile(prof_path, model_path=text)
    assert prof.model == "cal-text.gguf" and (prof.layers, prof.alpha) == (decision["layers"], decision["alpha"])
    assert prof.calibration["n"] == 3 and prof.calibration["source"]["seed"] == 2000
    assert len(prof.calibration["ids_sha256"]) == 64 and prof.objective.startswith("lowest CHAIR_S")
    assert set(prof.metrics) >= {"chosen", "greedy", "paper_rule", "random_heads", "diff_vs_random_heads"}
    assert prof.metrics["random_heads"] is not None  # the control of the shipped setting was run
    ids = json.loads((out / "ids.json").read_text())["ids"]
    assert ids == [f"counterfactual-2000-{i:06d}" for i in range(3)]
    sweep = json.loads((out / "sweep.json").read_text())
    # (paper rule, 2 bands, all) x 2 alphas, the paper rule at alpha 2 once: 8 rows besides greedy
    assert len(sweep["rows"]) == 8 and sweep["paper_rule"] == "vhr-a2-L1,4-7"
    assert sweep["random_controls"] and all(k.endswith("-random") for k in
                                             (c["key"] for c in sweep["random_controls"].values()))
    md = (out / "sweep.md").read_text()
    assert "| setting | layers | alpha | CHAIR_S | 95% CI" in md and "**chosen**" in md and "random heads" in md
    assert md.splitlines()[0] in r.stdout
    n_lines = {p.name: len(p.read_text().splitlines()) for p in out.glob("chair-*.jsonl")}
    assert set(n_lines.values()) == {3}

    # again: everything is on disk, nothing is captioned twice, the same decision
    r2 = subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout.strip().splitlines()[-1])["chosen"] == decision["chosen"]
    assert {p.name: len(p.read_text().splitlines()) for p in out.glob("chair-*.jsonl")} == n_lines
    # and caption picks the profile up
    r3 = subprocess.run(EXE + ["caption", str(tmp_path / "none.png"), "-m", str(text)], capture_output=True,
                        text=True, timeout=120, env=env)
    assert f"vhr-edge: profile {prof_path}" in r3.stderr


def test_calibrate_refuses_the_evaluation_seed(tmp_path):
    r = subprocess.run(EXE + ["calibrate", "--seed", "1000", "-m", str(tmp_path / "x.gguf"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("vhr-edge: error: --seed 1000 draws the evaluation")
