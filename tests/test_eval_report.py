"""`vhr-edge eval report`: hand-computed metrics, paired vs unpaired intervals, CLI errors."""

import json
import subprocess

import numpy as np
import pytest

from vhr_edge.errors import ConfigError
from vhr_edge.eval.report import read_runs, report
from vhr_edge.profile_rule import bootstrap_ci

from conftest import EXE


def rec(i, mentioned, gt, caption="a b c"):
    return {"image_id": i, "caption": caption, "gt_objects": gt, "mentioned": mentioned,
            "hallucinated": [m for m in mentioned if m not in gt]}


def write(d, tag, recs):
    d.mkdir(exist_ok=True)
    (d / f"chair-{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_metrics_by_hand(tmp_path):
    write(tmp_path, "greedy", [rec(1, ["fork", "knife"], ["fork"]),          # 1 hallucinated of 2; hit 1 of 1
                               rec(2, ["dog"], ["dog", "ball"]),             # 0 of 1; hit 1 of 2
                               rec(3, ["car", "light", "tree"], ["car"])])   # 2 of 3; hit 1 of 1
    r = report(read_runs(tmp_path), baseline=None, n_boot=200)["methods"]["greedy"]
    assert r["n"] == 3 and r["mean_len"] == 3.0
    assert r["chair_s"]["value"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["chair_i"]["value"] == pytest.approx(3 / 6, abs=1e-4)   # ratio of sums, not mean of ratios
    assert r["recall"]["value"] == pytest.approx(3 / 4, abs=1e-4)
    # CHAIR_S is a mean of 0/1 per image: its interval is the plain bootstrap of that mean
    assert r["chair_s"]["ci"] == pytest.approx(bootstrap_ci([1, 0, 1], 200, 0), abs=1e-4)


def test_paired_difference_is_tighter_than_unpaired(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    greedy, better = [], []
    for i in range(n):
        objs = ["fork", "knife", "cup"][: 1 + int(rng.integers(0, 3))]
        hall = i % 2 == 0  # greedy hallucinates a knife on every even image; the other method never does
        greedy.append(rec(i, objs + (["bird"] if hall else []), objs))
        better.append(rec(i, objs, objs))
    write(tmp_path, "greedy", greedy)
    write(tmp_path, "vhr-a2", better)
    rep = report(read_runs(tmp_path), "greedy", n_boot=1000)
    d = rep["methods"]["vhr-a2"]["vs_baseline"]
    assert d["n"] == n and d["chair_s"]["estimate"] == pytest.approx(-0.5)
    assert d["chair_s"]["beyond_interval"] and d["chair_s"]["ci"][1] < 0
    # paired: each resample moves both methods together, so the interval is that of -mean(even ids)
    assert d["chair_s"]["ci"] == pytest.approx([-x for x in bootstrap_ci([i % 2 == 0 for i in range(n)], 1000, 0)][::-1],
                                               abs=1e-4)
    assert d["recall"]["estimate"] == 0 and d["recall"]["ci"] == [0, 0] and not d["recall"]["beyond_interval"]
    g, v = rep["methods"]["greedy"]["chair_s"], rep["methods"]["vhr-a2"]["chair_s"]
    assert v["value"] == 0 and v["ci"] == [0, 0] and g["value"] == 0.5
    unpaired_width = g["ci"][1] - g["ci"][0]  # the baseline's own spread, which pairing removes
    assert d["chair_s"]["ci"][1] - d["chair_s"]["ci"][0] <= unpaired_width + 1e-9


def test_identical_runs_differ_by_exactly_zero(tmp_path):
    """Paired: each resample draws the same images for both runs, so two identical runs differ
    by 0 in every resample (an unpaired bootstrap would give an interval around 0)."""
    recs = [rec(i, ["fork", "knife"] if i % 3 == 0 else ["fork"], ["fork", "cup"][: 1 + i % 2]) for i in range(30)]
    write(tmp_path, "greedy", recs)
    write(tmp_path, "vhr-a2", recs)
    d = report(read_runs(tmp_path), "greedy", n_boot=500)["methods"]["vhr-a2"]["vs_baseline"]
    for m in ("chair_s", "chair_i", "recall"):
        assert d[m]["estimate"] == 0 and d[m]["ci"] == [0, 0] and not d[m]["beyond_interval"], m


def test_only_shared_ids_are_paired(tmp_path):
    write(tmp_path, "greedy", [rec(1, ["fork", "knife"], ["fork"]), rec(2, ["dog"], ["dog"])])
    write(tmp_path, "vhr-a2", [rec(1, ["fork"], ["fork"])])  # a run still in progress
    d = report(read_runs(tmp_path), "greedy", n_boot=100)["methods"]["vhr-a2"]["vs_baseline"]
    assert d["n"] == 1 and d["chair_s"]["estimate"] == -1.0


def test_failed_rows_are_not_captions(tmp_path):
    write(tmp_path, "greedy", [rec(1, ["fork", "knife"], ["fork"]), {"image_id": 2, "error": "boom", "tries": 3},
                               rec(3, ["dog"], ["dog"])])
    r = report(read_runs(tmp_path), None, n_boot=50)["methods"]["greedy"]
    assert r["n"] == 2 and r["chair_s"]["value"] == 0.5


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="no CHAIR runs"):
        read_runs(tmp_path)
    write(tmp_path, "vhr-a2", [rec(1, ["fork"], ["fork"])])
    with pytest.raises(ConfigError, match="no run tagged 'greedy'"):
        report(read_runs(tmp_path), "greedy")
    (tmp_path / "chair-broken.jsonl").write_text('{"image_id": 1}\n')
    with pytest.raises(ConfigError, match="line 1 is not a CHAIR result line"):
        read_runs(tmp_path)


def test_cli(tmp_path):
    write(tmp_path, "greedy", [rec(i, ["fork", "knife"] if i % 2 else ["fork"], ["fork"]) for i in range(20)])
    write(tmp_path, "vhr-a2", [rec(i, ["fork"], ["fork"]) for i in range(20)])
    r = subprocess.run([*EXE, "eval", "report", str(tmp_path), "--md", str(tmp_path / "r.md")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| vhr-a2 | 20 | 0.000 [0.000, 0.000]" in r.stdout and "-0.500" in r.stdout and " *" in r.stdout
    assert (tmp_path / "r.md").read_text() == r.stdout
    r = subprocess.run([*EXE, "eval", "report", str(tmp_path), "--json", "--baseline", "none"],
                       capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout.splitlines()[-1])["methods"]["greedy"]["chair_s"]["value"] == 0.5
    for argv, frag in (([str(tmp_path / "nope")], "is not a results folder"),
                       ([str(tmp_path), "--baseline", "vhr-a3"], "no run tagged 'vhr-a3'"),
                       ([str(tmp_path), "--bootstrap", "3"], "--bootstrap must be at least 10")):
        r = subprocess.run([*EXE, "eval", "report", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and frag in r.stderr, r.stderr
