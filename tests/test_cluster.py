"""`--ray ADDRESS`: eval, compare and calibrate on a Ray cluster. One local cluster (2 CPUs, on
127.0.0.1, its own temp dir and ports) is started for the module and stopped at the end.

Checked against local runs of the same commands: the same captions by image id and the same
summary; a SIGKILLed actor (its units go to another actor), a SIGKILLed driver (the same command
resumes), compare over two model files, shipped models and images, units that fail every time,
and the one-line error when Ray is not installed."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raycluster import LocalCluster
from vhr_edge import fixtures

from conftest import EXE, clean_env, cli, lines

N = 24


def captions(path) -> dict:
    recs = lines(path)
    ids = [r["image_id"] for r in recs]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["image_id"]: r["caption"] for r in recs}


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(num_cpus=2)
    yield c
    c.stop()


def chair_args(tiny, out, *more):
    text, mmproj = tiny
    return ["eval", "chair", "--testbed", "counterfactual", "--seed", "7", "-n", str(N), "--no-vhr", "-m", text,
            "--mmproj", mmproj, "-t", "1", "--max-tokens", "32", "--out", out, "--json", *more]


@pytest.fixture(scope="module")
def local_run(tiny, tmp_path_factory):
    """The reference: the same evaluation in one local process."""
    out = tmp_path_factory.mktemp("local")
    r = cli(*chair_args(tiny, out))
    assert r.returncode == 0, r.stderr
    return out, last_json(r)


def test_eval_chair_over_ray_equals_local(cluster, tiny, local_run, tmp_path):
    local, summary = local_run
    r = cli(*chair_args(tiny, tmp_path, "--ray", cluster.address, "--workers", "2"))
    assert r.returncode == 0, r.stderr
    assert last_json(r) == summary
    assert captions(tmp_path / "chair-greedy.jsonl") == captions(local / "chair-greedy.jsonl")
    assert len(captions(local / "chair-greedy.jsonl")) == N
    for name in ("ids.json", "chair-greedy.run.json"):  # so either kind of run can resume the other
        assert (tmp_path / name).read_text() == (local / name).read_text()
    saved = json.loads((tmp_path / "chair-greedy.summary.json").read_text())
    ref = json.loads((local / "chair-greedy.summary.json").read_text())
    assert {k: v for k, v in saved.items() if k != "timing"} == {k: v for k, v in ref.items() if k != "timing"}
    # the progress bar is the driver's, as in a local run
    assert "chair greedy: 100%" in r.stderr and f"{N}/{N}" in r.stderr
    # nothing left to do: the same summary again, nothing appended
    r = cli(*chair_args(tiny, tmp_path, "--ray", cluster.address))
    assert r.returncode == 0 and last_json(r) == summary
    assert len(lines(tmp_path / "chair-greedy.jsonl")) == N


def test_eval_pope_vhr_over_ray_equals_local(cluster, tiny, tmp_path):
    text, mmproj = tiny
    args = ["eval", "pope", "--testbed", "counterfactual", "--seed", "5", "-n", "3", "-m", text, "--mmproj", mmproj,
            "-t", "1", "--json"]
    a = cli(*args, "--out", tmp_path / "local")
    b = cli(*args, "--out", tmp_path / "ray", "--ray", cluster.address)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert last_json(a) == last_json(b) and set(last_json(a)) >= {"random", "popular", "adversarial"}
    key = lambda r: (r["image_id"], r["object"])  # noqa: E731
    la, lb = lines(tmp_path / "local" / "pope-vhr-a2.jsonl"), lines(tmp_path / "ray" / "pope-vhr-a2.jsonl")
    assert len({key(r) for r in lb}) == len(lb)
    assert {key(r): r["answer"] for r in la} == {key(r): r["answer"] for r in lb}


def _wait_lines(path: Path, k: int, p: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= k:
            return
        time.sleep(0.005)
    raise AssertionError(f"{path} never reached {k} lines (exit {p.poll()})")


def test_killed_actor_units_go_to_another(cluster, tiny, local_run, tmp_path):
    local, summary = local_run
    p = subprocess.Popen(EXE + [str(a) for a in chair_args(tiny, tmp_path, "--ray", cluster.address, "--workers", "2")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    path = tmp_path / "chair-greedy.jsonl"
    _wait_lines(path, 3, p)
    busy = []
    deadline = time.time() + 60
    while not busy and time.time() < deadline and p.poll() is None:
        busy = cluster.actors("CaptionWorker.caption")  # Ray's title of an actor inside caption()
    assert busy, "no actor was seen captioning"
    os.kill(busy[0], signal.SIGKILL)
    n_at_kill = path.read_bytes().count(b"\n")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert n_at_kill < N  # it was killed mid-run
    assert "a Ray worker was lost" in err
    assert json.loads(out.strip().splitlines()[-1]) == summary
    assert captions(path) == captions(local / "chair-greedy.jsonl")  # every id exactly once, the same captions


def test_killed_driver_resumes(cluster, tiny, local_run, tmp_path):
    local, summary = local_run
    args = chair_args(tiny, tmp_path, "--ray", cluster.address, "--workers", "2")
    p = subprocess.Popen(EXE + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    path = tmp_path / "chair-greedy.jsonl"
    _wait_lines(path, 3, p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    n_before = path.read_bytes().count(b"\n")
    assert p.returncode == -signal.SIGKILL and 3 <= n_before < N
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert last_json(r) == summary
    assert captions(path) == captions(local / "chair-greedy.jsonl")
    assert f"{n_before}/{N}" in r.stderr  # the bar starts where the killed run stopped


def test_compare_two_models_over_ray_equals_local(cluster, tiny, tmp_path):
    text, mmproj = tiny
    q8 = fixtures.quantize(text, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    args = ["compare", "-m", text, "-m", q8, "--mmproj", mmproj, "-n", "4", "--pope-n", "2", "--max-tokens", "12",
            "-t", "1"]
    a = cli(*args, "--out", tmp_path / "local")
    b = cli(*args, "--out", tmp_path / "ray", "--ray", cluster.address, "--workers", "2")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = (list(csv.DictReader(open(tmp_path / d / "compare.csv"))) for d in ("local", "ray"))
    same = ("model", "method", "chair_s", "chair_i", "recall", "pope_f1", "mean_len", "file_mb")
    assert [{k: x[k] for k in same} for x in ra] == [{k: x[k] for k in same} for x in rb]
    assert [(x["model"], x["method"]) for x in rb] == [
        ("tiny-text.gguf", "greedy"), ("tiny-text.gguf", "vhr-a2"), ("tiny-Q8_0.gguf", "greedy"), ("tiny-Q8_0.gguf", "vhr-a2")]
    assert all(float(x["peak_rss_mb"]) > 10 and float(x["tokens_per_s"]) > 0 for x in rb)
    for stem in ("tiny-text", "tiny-Q8_0"):
        for f in ("chair-greedy.jsonl", "chair-vhr-a2.jsonl"):
            assert captions(tmp_path / "ray" / stem / f) == captions(tmp_path / "local" / stem / f)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    from vhr_edge.testbed import coco

    d = tmp_path_factory.mktemp("coco")
    coco.write_split("counterfactual", 4, 11, d)
    return d


def test_shipped_models_and_images(cluster, tiny, coco_dir, tmp_path):
    """--ship-models: each file placed once on the node, checksum-true; --ship-images: bytes through
    the object store. Same captions as a local run on the files."""
    text, mmproj = tiny
    model_dir = tmp_path / "only-here"  # the workers are told nothing about this folder
    model_dir.mkdir()
    m, mm = shutil.copy(text, model_dir / "m.gguf"), shutil.copy(mmproj, model_dir / "m-mmproj.gguf")
    images = tmp_path / "images"
    shutil.copytree(coco_dir / "images", images)
    args = ["eval", "chair", "--images", images, "--annotations", coco_dir / "instances.json", "-n", "4", "-m", m,
            "--mmproj", mm, "-t", "1", "--max-tokens", "16", "--json"]
    a = cli(*args, "--out", tmp_path / "local")
    cache = tmp_path / "cache"
    b = cli(*args, "--out", tmp_path / "ray", "--ray", cluster.address, "--workers", "2", "--ship-models",
            "--ship-images", extra_env={"VHR_EDGE_MODEL_CACHE": str(cache)})
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert last_json(a) == last_json(b)
    assert captions(tmp_path / "ray" / "chair-vhr-a2.jsonl") == captions(tmp_path / "local" / "chair-vhr-a2.jsonl")
    placed = sorted(cache.rglob("*.gguf"), key=lambda p: p.name)
    assert [p.name for p in placed] == ["m-mmproj.gguf", "m.gguf"]  # once on this node, for two actors
    for p, src in zip(placed, (mm, m)):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == hashlib.sha256(Path(src).read_bytes()).hexdigest()
        assert p.parent.name == hashlib.sha256(Path(src).read_bytes()).hexdigest()[:16]
    assert not list(cache.rglob("*.part*"))


def test_unit_failing_every_try_is_a_failed_row(cluster, tiny, coco_dir, tmp_path):
    text, mmproj = tiny
    images = tmp_path / "images"
    shutil.copytree(coco_dir / "images", images)
    ann = json.loads((coco_dir / "instances.json").read_text())
    bad = ann["images"][0]
    (images / Path(bad["file_name"]).name).write_bytes(b"not an image at all")
    args = ["eval", "chair", "--images", images, "--annotations", coco_dir / "instances.json", "-n", "4", "-m", text,
            "--mmproj", mmproj, "-t", "1", "--max-tokens", "8", "--json", "--out", tmp_path / "out",
            "--ray", cluster.address, "--max-tries", "2"]
    for _ in range(2):  # the second start tries the failed unit again; it is written once
        r = cli(*args)
        assert r.returncode == 1
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith("vhr-edge: error: 1 units failed on every try") and "run the same command again" in err
        summary = last_json(r)
        assert summary["n"] == 3 and summary["n_failed"] == 1
        recs = lines(tmp_path / "out" / "chair-vhr-a2.jsonl")
        assert len(recs) == 4 and len({x["image_id"] for x in recs}) == 4
        failed = [x for x in recs if "error" in x]
        assert [x["image_id"] for x in failed] == [bad["id"]] and failed[0]["tries"] == 2
        assert "cannot" in failed[0]["error"] or "image" in failed[0]["error"]
    saved = json.loads((tmp_path / "out" / "chair-vhr-a2.summary.json").read_text())
    assert list(saved["failed"]) == [str(bad["id"])]


def test_calibrate_over_ray_equals_local(cluster, tiny, tmp_path):
    text, mmproj = tiny
    args = ["calibrate", "-m", text, "--mmproj", mmproj, "-n", "4", "--alphas", "2", "--bands", "2",
            "--max-tokens", "8", "--bootstrap", "20", "-t", "1", "--json", "--no-progress"]
    a = cli(*args, "--out", tmp_path / "local", "--profile-out", tmp_path / "local.json")
    b = cli(*args, "--out", tmp_path / "ray", "--profile-out", tmp_path / "ray.json", "--ray", cluster.address)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert last_json(a) == {**last_json(b), "profile": str(tmp_path / "local.json")}
    ja, jb = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("local", "ray"))
    assert ja["rows"] == jb["rows"] and ja["decision"] == jb["decision"]
    for f in (tmp_path / "local").glob("chair-*.jsonl"):
        assert captions(f) == captions(tmp_path / "ray" / f.name)


def test_missing_ray_extra_is_one_line(tiny, tmp_path):
    text, mmproj = tiny
    code = ("import sys; sys.modules['ray'] = None; from vhr_edge.cli import main; sys.exit(main(sys.argv[1:]))")
    for args in (["eval", "chair", "-n", "2", "-m", str(text), "--mmproj", str(mmproj), "--out", str(tmp_path / "o")],
                 ["compare", "-m", str(text), "--mmproj", str(mmproj), "--out", str(tmp_path / "c")]):
        r = subprocess.run([sys.executable, "-c", code, *args, "--ray", "127.0.0.1:6379"], capture_output=True,
                           text=True, timeout=120, env=clean_env())
        assert r.returncode == 1
        assert r.stderr.strip() == ("vhr-edge: error: --ray needs Ray, the optional extra 'cluster': "
                                    "pip install 'vhr-edge[cluster]'")
    assert not (tmp_path / "o").exists()


def test_cluster_flags_need_ray(tiny, tmp_path):
    r = cli("eval", "chair", "-n", "2", "--out", tmp_path, "--workers", "2")
    assert r.returncode == 1 and r.stderr.strip() == (
        "vhr-edge: error: --workers, --ship-images, --ship-models, --max-tries and --start-timeout go with "
        "--ray ADDRESS")


def test_unreachable_cluster_is_one_line(tmp_path):
    r = cli("eval", "chair", "-n", "2", "--out", tmp_path / "o", "--ray", "127.0.0.1:1", timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("vhr-edge: error: cannot connect to the Ray cluster at 127.0.0.1:1")


class OutOfOrder:
    """A stand-in for a cluster captioner: results in reverse order; ids in `fail` fail."""

    def __init__(self, fail=()):
        self.fail, self.asked = set(fail), []

    def map_unordered(self, units):
        from vhr_edge.eval.run import Failed

        for i in reversed(range(len(units))):
            it = units[i][0]
            self.asked.append(it.key)
            yield i, (Failed("boom", 3) if it.key in self.fail else (f"There is a {it.gt[0]}.", {"total_ms": 1.0}))


def test_run_chair_with_unordered_results_and_failed_rows(tmp_path):
    """eval.run with a map_unordered captioner: lines in completion order, a failed row once per
    id, left out of the scores, retried by the next start, where the success wins."""
    from vhr_edge.eval.data import TestbedSource
    from vhr_edge.eval.run import run_chair

    src = TestbedSource("counterfactual", n=5, seed=2)
    bad = src.ids[1]
    cap = OutOfOrder(fail={bad})
    s1 = run_chair(src, tmp_path, cap, tag="t", progress=False)
    assert s1["n"] == 4 and s1["n_failed"] == 1 and s1["recall"] > 0
    recs = lines(tmp_path / "chair-t.jsonl")
    assert [r["image_id"] for r in recs] == list(reversed(src.ids))
    assert recs[3] == {"image_id": bad, "error": "boom", "tries": 3}
    assert json.loads((tmp_path / "chair-t.summary.json").read_text())["failed"] == {bad: {"error": "boom", "tries": 3}}
    s2 = run_chair(src, tmp_path, cap, tag="t", progress=False)  # fails again: no second failed row
    assert cap.asked[5:] == [bad] and s2 == s1 and len(lines(tmp_path / "chair-t.jsonl")) == 5
    s3 = run_chair(src, tmp_path, OutOfOrder(), tag="t", progress=False)  # now it works
    assert s3["n"] == 5 and "n_failed" not in s3
    recs = lines(tmp_path / "chair-t.jsonl")
    assert len(recs) == 6 and recs[-1]["image_id"] == bad and "caption" in recs[-1]
    s4 = run_chair(src, tmp_path, OutOfOrder(fail=set(src.ids)), tag="t", progress=False)  # nothing left to do
    assert s4 == s3 and len(lines(tmp_path / "chair-t.jsonl")) == 6
    saved = json.loads((tmp_path / "chair-t.summary.json").read_text())
    assert "failed" not in saved and saved["n"] == 5


def test_ray_workers_open_the_session_a_local_run_opens(tiny, monkeypatch):
    """Every Session setting the flags give a local run (flags.open_session) reaches the Ray
    workers too (cluster.open_pool's session_kw), e.g. --image-mode, --mmproj-as-is, --no-mmap."""
    from vhr_edge import cli, cluster, flags, session

    text, mmproj = tiny
    argv = ["eval", "chair", "--testbed", "counterfactual", "-n", "2", "-m", str(text), "--mmproj", str(mmproj),
            "-t", "1", "-tb", "2", "-c", "512", "-fa", "off", "--image-mode", "crop", "--mmproj-as-is", "--no-mmap",
            "--template", "llava-1.5", "--ray", "127.0.0.1:1", "--out", "unused"]
    args = cli.build_parser().parse_args(argv)
    seen = {}
    monkeypatch.setattr(session, "Session", lambda model, mmproj, **kw: seen.setdefault("local", (model, mmproj, kw)))
    monkeypatch.setattr(cluster, "Pool", lambda model, mmproj, address, **kw: seen.setdefault("ray", (model, mmproj, kw)))
    flags.open_session(args)
    cluster.open_pool(args)
    model, mm, local = seen["local"]
    assert local["image_mode"] == "crop" and local["mmproj_as_is"] and local["use_mmap"] is False
    r_model, r_mm, ray_kw = seen["ray"]
    assert (r_model, r_mm) == (model, mm)
    assert ray_kw["threads"] == local.pop("n_threads") == 1
    assert ray_kw["session_kw"] == local


class FakeRay:
    """Just enough of ray for Pool.map_unordered: refs named "unit:*" finish, "start:*" never do
    (a replacement actor for which the cluster has no room); "unit:dies" is a lost actor."""

    class exceptions:
        class RayActorError(Exception):
            pass

        class RayTaskError(Exception):
            pass

    def __init__(self):
        self.timeouts = []

    def wait(self, refs, num_returns=1, timeout=None):
        self.timeouts.append(timeout)
        done = [r for r in refs if r.startswith("unit:")]
        return done[:1], [r for r in refs if r not in done[:1]]

    def get(self, ref):
        if ref == "unit:dies":
            raise self.exceptions.RayActorError()
        return {"text": ref, "timings": {}, "stop_reason": "eos"}

    def kill(self, handle):
        pass


def test_no_worker_left_to_start_stops_the_run_instead_of_waiting_forever():
    """The only actor dies and its replacement never starts (no room on the cluster): after
    --start-timeout the run stops with one line; what finished before was handed back."""
    import collections
    import types

    from vhr_edge import cluster
    from vhr_edge.errors import VhrEdgeError

    ray = FakeRay()
    pool = cluster.Pool.__new__(cluster.Pool)
    never = types.SimpleNamespace(info=types.SimpleNamespace(remote=lambda: "start:replacement"))
    pool.__dict__.update(ray=ray, _handles={0: "actor0"}, _starting={}, _idle=collections.deque([0]), _next_id=1,
                         _spares=1, lost=0, last_error="", infos={0: {}}, peak_rss_mb=0.0, max_tries=3,
                         start_timeout=0.05, _new=lambda: never)
    refs = iter(["unit:first", "unit:dies"])
    got = []
    with pytest.raises(VhrEdgeError, match=r"no Ray worker started within 0.05 s for the last 2 units .*run the same"):
        for i, out in pool.map_unordered(["a", "b", "c"], lambda handle, unit: next(refs)):
            got.append((i, out["text"]))
    assert got == [(0, "unit:first")]
    assert pool.lost == 1 and list(pool._starting) == ["start:replacement"]
    assert ray.timeouts == [None, None, 0.05]  # no timeout while a unit runs


def test_start_timeout_needs_ray_and_a_positive_value(tiny, tmp_path):
    base = ["eval", "chair", "--testbed", "counterfactual", "-n", "2", "-m", tiny[0], "--mmproj", tiny[1],
            "--out", tmp_path]
    r = cli(*base, "--start-timeout", "5")
    assert r.returncode == 1 and r.stderr.strip().endswith("--start-timeout go with --ray ADDRESS")
    r = cli(*base, "--start-timeout", "0", "--ray", "127.0.0.1:1")
    assert r.returncode == 1 and r.stderr.strip() == "vhr-edge: error: --start-timeout must be > 0 seconds, got 0"
