"""Evaluation runs: data sources (testbed, COCO-format files), resuming after a kill, the
`vhr-edge eval chair|pope` commands end to end on a tiny random model, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from PIL import Image

from vhr_edge.errors import ConfigError
from vhr_edge.eval import chair
from conftest import EXE, cli, kill_after_lines, lines, stderr_lines
from vhr_edge.eval.data import CocoSource, DataError, TestbedSource, write_ids
from vhr_edge.eval.run import JsonlStore, run_chair, run_pope
from vhr_edge.testbed import coco

SUMMARY_KEYS = {"n", "chair_s", "chair_i", "recall", "mean_len"}
LINE_KEYS = {"image_id", "caption", "gt_objects", "mentioned", "hallucinated", "timings"}


def fake_caption(item):
    """A caption with one right object and one wrong one ("dog" is wrong unless present)."""
    return f"There is a {item.gt[0]} and a dog.", {"total_ms": 2.0, "tokens_per_s": 100.0}


# --- data sources -----------------------------------------------------------------------------

def test_testbed_source():
    src = TestbedSource("counterfactual", n=6, seed=4)
    assert src.ids == [f"counterfactual-4-{i:06d}" for i in range(6)]
    assert [it.gt for it in src.items] == [tuple(sorted(s.categories)) for s in src.scenes]
    img = src.items[0].load()
    assert img.shape == (64, 64, 3) and img.dtype.name == "uint8"
    assert src.vocab is chair.testbed_vocabulary()
    with pytest.raises(DataError, match="-n must be at least 1"):
        TestbedSource("counterfactual", n=0)
    with pytest.raises(DataError, match="unknown testbed split"):
        TestbedSource("nope", n=3)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    """A testbed split written as PNGs + COCO instances.json by testbed.coco."""
    d = tmp_path_factory.mktemp("coco")
    coco.write_split("counterfactual", 8, 3, d)
    return d


def test_coco_source_from_testbed_export(coco_dir):
    data = json.loads((coco_dir / "instances.json").read_text())
    scene_of = {img["id"]: coco.scenes_from_coco({"images": [img]})[0] for img in data["images"]}
    src = CocoSource(coco_dir / "images", coco_dir / "instances.json", n=5, seed=0)
    assert src.n == 5 and len(set(src.ids)) == 5 and src.vocab is chair.testbed_vocabulary()
    for it in src.items:  # ground truth = the scene's objects, read back from the annotations
        assert it.gt == tuple(sorted(scene_of[it.image_id].categories))
        assert os.path.isfile(it.load())
    # the same seed draws the same ids; a smaller n is a prefix; n above the file: all images
    assert CocoSource(coco_dir / "images", coco_dir / "instances.json", n=3, seed=0).ids == src.ids[:3]
    assert CocoSource(coco_dir / "images", coco_dir / "instances.json", n=5, seed=1).ids != src.ids
    assert sorted(CocoSource(coco_dir, coco_dir / "instances.json", n=50).ids) == list(range(1, 9))  # file_name "images/..."


def test_coco_source_coco_names_and_captions(tmp_path):
    (tmp_path / "val").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (32, 32), (90, 120, 30)).save(tmp_path / "val" / name)
    inst = {"images": [{"id": 11, "file_name": "a.jpg"}, {"id": 12, "file_name": "b.jpg"}],
            "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 34, "name": "frisbee"}],
            "annotations": [{"image_id": 11, "category_id": 18}, {"image_id": 11, "category_id": 1},
                            {"image_id": 12, "category_id": 1}]}
    caps = {"annotations": [{"image_id": 11, "caption": "A boy throws a frisbee to his puppy."},
                            {"image_id": 12, "caption": "A man with no dog stands by a bench."}]}
    (tmp_path / "inst.json").write_text(json.dumps(inst))
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    src = CocoSource(tmp_path / "val", tmp_path / "inst.json", n=2, seed=0)
    assert src.vocab is chair.COCO and {it.image_id: it.gt for it in src.items} == {11: ("dog", "person"), 12: ("person",)}
    src = CocoSource(tmp_path / "val", tmp_path / "inst.json", n=2, seed=0, captions=tmp_path / "caps.json")
    # reference-caption objects join the ground truth (frisbee; the bench; not the negated dog)
    assert {it.image_id: it.gt for it in src.items} == {11: ("dog", "frisbee", "person"), 12: ("bench", "person")}


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "annotations file not found"),
    (lambda d: (d / "inst.json").write_text("{\"images\": [1,"), "is not valid JSON"),
    (lambda d: (d / "inst.json").write_bytes(b"\x00\xff GGUF"), "is not valid JSON"),
    (lambda d: (d / "inst.json").write_text("[1, 2]"), "is not COCO instances JSON"),
    (lambda d: (d / "inst.json").write_text('{"images": [], "annotations": [], "categories": []}'), "lists no images"),
    (lambda d: (d / "inst.json").write_text('{"images": [{"id": 1}], "annotations": [], "categories": []}'),
     "an entry lacks"),
    (lambda d: (d / "inst.json").write_text('{"images": [{"id": 1, "file_name": "x.png"}], "annotations": [], '
                                            '"categories": []}'), "chosen images are not in"),
])
def test_coco_source_bad_input(tmp_path, setup, message):
    (tmp_path / "img").mkdir()
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        CocoSource(tmp_path / "img", tmp_path / "inst.json", n=3)


def test_coco_source_missing_image_dir(coco_dir, tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        CocoSource(tmp_path / "nope", coco_dir / "instances.json", n=3)


# --- resumable runs ---------------------------------------------------------------------------

def test_jsonl_store_cuts_partial_line_and_never_duplicates(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"image_id": 1, "x": 1}\n{"image_id": 2, "x": 2}\n{"image_id": 3, "x"')
    with JsonlStore(p, key=lambda r: str(r["image_id"])) as s:
        assert set(s.done) == {"1", "2"} and s.dropped_partial == len('{"image_id": 3, "x"')
        s.add({"image_id": 2, "x": 99})  # already there: not written again
        s.add({"image_id": 3, "x": 3})
    assert lines(p) == [{"image_id": 1, "x": 1}, {"image_id": 2, "x": 2}, {"image_id": 3, "x": 3}]
    p.write_text('{"image_id": 1}\nnot json\n{"image_id": 2}\n')  # a broken line inside: not ours
    with pytest.raises(DataError, match="line 2"):
        JsonlStore(p, key=lambda r: str(r["image_id"]))


def test_resume_after_simulated_kill(tmp_path):
    src = TestbedSource("counterfactual", n=12, seed=5)
    calls = []

    def dying(item):  # killed while captioning the 6th image
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(item.image_id)
        return fake_caption(item)

    with pytest.raises(KeyboardInterrupt):
        run_chair(src, tmp_path, dying, tag="t", progress=False)
    path = tmp_path / "chair-t.jsonl"
    assert [r["image_id"] for r in lines(path)] == src.ids[:5]
    assert not (tmp_path / "chair-t.summary.json").exists()
    # ... and a kill in the middle of writing a line leaves half of it
    text, timings = fake_caption(src.items[5])
    half = json.dumps({"image_id": src.ids[5], "caption": text, "gt_objects": list(src.items[5].gt)})
    with open(path, "a") as f:
        f.write(half[: len(half) // 2])

    calls.clear()

    def counting(item):
        calls.append(item.image_id)
        return fake_caption(item)

    summary = run_chair(src, tmp_path, counting, tag="t", progress=False)
    assert calls == src.ids[5:]  # only what was not finished
    recs = lines(path)  # parses: the partial line is gone
    assert [r["image_id"] for r in recs] == src.ids and len({r["image_id"] for r in recs}) == 12
    assert all(LINE_KEYS <= set(r) for r in recs)
    expected = chair.chair_scores([(fake_caption(it)[0], it.gt) for it in src.items], src.vocab).summary
    assert summary == expected and set(summary) == SUMMARY_KEYS
    saved = json.loads((tmp_path / "chair-t.summary.json").read_text())
    assert {k: saved[k] for k in SUMMARY_KEYS} == summary and saved["timing"]["mean_s_per_item"] == 0.002

    calls.clear()  # a finished run: nothing to do, nothing written
    assert run_chair(src, tmp_path, counting, tag="t", progress=False) == summary
    assert calls == [] and len(lines(path)) == 12


def test_run_refuses_other_settings_or_ids(tmp_path):
    src = TestbedSource("counterfactual", n=3, seed=5)
    run_chair(src, tmp_path, fake_caption, tag="t", settings={"alpha": 2}, progress=False)
    with pytest.raises(ConfigError, match="differing: alpha"):
        run_chair(src, tmp_path, fake_caption, tag="t", settings={"alpha": 3}, progress=False)
    run_chair(src, tmp_path, fake_caption, tag="u", settings={"alpha": 3}, progress=False)  # another tag: fine
    with pytest.raises(DataError, match="other images"):
        run_chair(TestbedSource("counterfactual", n=4, seed=5), tmp_path, fake_caption, tag="t", progress=False)
    with pytest.raises(DataError, match="other images"):
        write_ids(tmp_path, TestbedSource("indist", n=3, seed=5))


def test_run_pope_shares_answers_between_splits(tmp_path):
    src = TestbedSource("counterfactual", n=6, seed=2)
    asked = []

    def answer(item, question):  # a perfect model: yes exactly for present objects
        obj = re.fullmatch(r"Is there an? (.+) in the image\?", question).group(1)
        asked.append((item.image_id, obj))
        return ("Yes." if obj in item.gt else "No, there isn't."), {"total_ms": 1.0}

    res = run_pope(src, tmp_path, answer, tag="t", progress=False)
    assert set(res) == {"random", "popular", "adversarial", "average"}
    for m in res.values():
        assert m["accuracy"] == 1.0 and m["f1"] == 1.0 and m["yes_ratio"] == 0.5
    assert len(asked) == len(set(asked)) == len(lines(tmp_path / "pope-t.jsonl"))
    qs = json.loads((tmp_path / "pope-questions.json").read_text())
    assert len(asked) < sum(len(v) for v in qs.values())  # positives are asked once for three splits
    asked.clear()
    assert run_pope(src, tmp_path, answer, tag="t", progress=False) == res and asked == []


def test_subprocess_killed_mid_run_resumes(tiny, tmp_path):
    """SIGKILL a real `vhr-edge eval chair` as soon as it has written a few lines, then rerun."""
    text, mmproj = tiny
    out = tmp_path / "out"
    args = EXE + ["eval", "chair", "--testbed", "counterfactual", "-n", "40", "--seed", "9", "-m", str(text),
                  "--mmproj", str(mmproj), "-t", "1", "--max-tokens", "48", "--out", str(out), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    path = out / "chair-vhr-a2.jsonl"
    n_before = kill_after_lines(args, path, 3, env=env)
    assert 3 <= n_before < 40  # killed mid-run
    r = subprocess.run(args + ["--json"], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    recs = lines(path)
    ids = [x["image_id"] for x in recs]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 40


# --- the commands, end to end on the tiny random model -----------------------------------------

def test_eval_chair_testbed_end_to_end(tiny, tmp_path):
    text, mmproj = tiny
    out = tmp_path / "run"
    args = ["eval", "chair", "--testbed", "counterfactual", "-n", "10", "-m", text, "--mmproj", mmproj,
            "-t", "1", "--max-tokens", "12", "--out", out, "--json"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary) == SUMMARY_KEYS and summary["n"] == 10
    assert all(0.0 <= summary[k] <= 1.0 for k in ("chair_s", "chair_i", "recall"))
    recs = lines(out / "chair-vhr-a2.jsonl")
    assert len(recs) == 10 and all(LINE_KEYS <= set(x) for x in recs)
    assert {"prefill_ms", "decode_ms", "tokens_per_s"} <= set(recs[0]["timings"])
    ids = json.loads((out / "ids.json").read_text())
    assert ids["ids"] == [x["image_id"] for x in recs] == [f"counterfactual-1000-{i:06d}" for i in range(10)]
    assert ids["source"] == {"kind": "testbed", "split": "counterfactual", "seed": 1000, "n": 10, "size": 64}
    saved = json.loads((out / "chair-vhr-a2.summary.json").read_text())
    assert {k: saved[k] for k in SUMMARY_KEYS} == summary and saved["settings"]["vhr"]["alpha"] == 2.0
    # again: nothing left to do, same summary; the greedy baseline goes beside it on the same ids
    r = cli(*args)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]) == summary
    assert len(lines(out / "chair-vhr-a2.jsonl")) == 10
    r = cli(*args, "--no-vhr")
    assert r.returncode == 0, r.stderr
    assert [x["image_id"] for x in lines(out / "chair-greedy.jsonl")] == ids["ids"]
    r = cli(*args[:-1], "--alpha", "3")  # text summary without --json
    assert r.returncode == 0 and "CHAIR_S" in r.stdout and (out / "chair-vhr-a3.jsonl").exists()


def test_eval_chair_and_pope_on_coco_format(tiny, coco_dir, tmp_path):
    text, mmproj = tiny
    model = ["-m", text, "--mmproj", mmproj, "-t", "1"]
    r = cli("eval", "chair", "--images", coco_dir / "images", "--annotations", coco_dir / "instances.json",
            "-n", "4", *model, "--max-tokens", "8", "--out", tmp_path / "c", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 4
    recs = lines(tmp_path / "c" / "chair-vhr-a2.jsonl")
    assert [x["image_id"] for x in recs] == json.loads((tmp_path / "c" / "ids.json").read_text())["ids"]
    assert all(isinstance(x["image_id"], int) for x in recs)

    r = cli("eval", "pope", "--images", coco_dir / "images", "--annotations", coco_dir / "instances.json",
            "-n", "3", *model, "--split", "adversarial", "--no-vhr", "--out", tmp_path / "p", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) == {"adversarial"}
    assert {"n", "accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(res["adversarial"])
    assert len(lines(tmp_path / "p" / "pope-greedy.jsonl")) == res["adversarial"]["n"]


def test_eval_pope_testbed_all_splits(tiny, tmp_path):
    text, mmproj = tiny
    r = cli("eval", "pope", "-n", "3", "-m", text, "--mmproj", mmproj, "-t", "1", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) == {"random", "popular", "adversarial", "average"}
    recs = lines(tmp_path / "pope-vhr-a2.jsonl")
    assert {"image_id", "object", "question", "answer", "pred", "timings"} <= set(recs[0])


@pytest.mark.parametrize("args,message", [
    (["--images", "{d}/images", "--annotations", "{d}/missing.json"], "annotations file not found"),
    (["--images", "{d}/images", "--annotations", "{d}/bad.json"], "is not valid JSON"),
    (["--images", "{d}/nodir", "--annotations", "{d}/instances.json"], "image folder not found"),
    (["--images", "{d}/images"], "needs both --images DIR and --annotations FILE"),
    (["--testbed", "indist", "--images", "{d}/images", "--annotations", "{d}/instances.json"], "not both"),
    (["-n", "0"], "-n must be at least 1, got 0"),
    (["-n", "-2"], "-n must be at least 1, got -2"),
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--layers", "1,x"], "bad layer list"),
    (["--tag", "a/b"], "--tag may hold"),
    (["-m", "{d}/none.gguf"], "model not found"),
])
def test_eval_bad_input_one_line_exit_1(coco_dir, tmp_path, args, message):
    (coco_dir / "bad.json").write_text('{"images": [')
    args = [a.format(d=coco_dir) for a in args]
    model = [] if "-m" in args else ["-m", str(coco_dir / "none.gguf")]
    r = cli("eval", "chair", *args, *model, "--out", tmp_path / "o")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vhr-edge: error: ") and message in err[0], r.stderr
    assert r.stdout == ""


def test_eval_usage_errors_exit_2(tmp_path):
    r = cli("eval", "chair", "-n", "3")  # no --out
    assert r.returncode == 2 and "--out" in r.stderr and "vhr-edge eval chair --help" in r.stderr
    r = cli("eval", "pope", "--split", "hard", "--out", tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = cli("eval")
    assert r.returncode == 2


def test_a_bad_image_fails_alone_locally_as_on_ray(tiny, coco_dir, tmp_path):
    """A picture that cannot be read becomes one failed row (as with --ray); the other images are
    captioned, the command ends with one line and exit 1, and a restart writes no second row."""
    import shutil
    from pathlib import Path

    text, mmproj = tiny
    images = tmp_path / "images"
    shutil.copytree(coco_dir / "images", images)
    ann = json.loads((coco_dir / "instances.json").read_text())
    drawn = CocoSource(images, coco_dir / "instances.json", n=4, seed=7).ids
    bad = next(img for img in ann["images"] if img["id"] == drawn[1])
    (images / Path(bad["file_name"]).name).write_bytes(b"not an image at all")
    args = ["eval", "chair", "--images", images, "--annotations", coco_dir / "instances.json", "-n", "4", "--seed", "7",
            "-m", text, "--mmproj", mmproj, "-t", "1", "--max-tokens", "8", "--json", "--no-progress",
            "--out", tmp_path / "out"]
    for _ in range(2):
        r = cli(*args)
        assert r.returncode == 1, r.stderr
        err = stderr_lines(r.stderr)
        assert len(err) == 1 and err[0].startswith("vhr-edge: error: 1 units failed") and "Traceback" not in r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["n"] == 3 and summary["n_failed"] == 1
        recs = lines(tmp_path / "out" / "chair-vhr-a2.jsonl")
        assert len(recs) == 4 and len({x["image_id"] for x in recs}) == 4
        failed = [x for x in recs if "error" in x]
        assert [x["image_id"] for x in failed] == [bad["id"]] and failed[0]["error"].startswith("ImageError: ")
