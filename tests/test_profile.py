"""VHR profiles: round trip, the precedence rule (flag > --profile > beside the GGUF > auto),
auto-discovery and --no-profile, bad profiles as one-line errors; caption / eval / serve /
compare picking a profile up."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest
from PIL import Image

from vhr_edge import fixtures
from vhr_edge.errors import ConfigError
from vhr_edge.profile import (Profile, load_profile, profile_for_model, profile_from_json, resolve,
                              save_profile)

from conftest import EXE, SPEC, cli, scene, stderr_lines


def make_profile(model="m.gguf", layers=(0, 1, 2, 3), alpha=3.0, **kw) -> Profile:
    return Profile(model=model, layers=list(layers), alpha=alpha, objective="lowest CHAIR_S ...",
                   calibration={"source": {"kind": "testbed", "split": "counterfactual", "seed": 2000, "n": 3},
                                "seed": 2000, "n": 3, "ids_sha256": "0" * 64},
                   metrics={"chosen": {"chair_s": 0.5}}, vhr_edge_version="0.1.0", **kw)


def test_round_trip(tmp_path):
    p = save_profile(make_profile(), tmp_path / "a" / "m.vhr-profile.json")
    assert json.loads(p.read_text())["format"] == 1
    back = load_profile(p, n_layer=8)
    assert back.to_json() == make_profile().to_json() and back.path == p
    assert profile_for_model(tmp_path / "dir" / "llava-7b-Q4_K_M.gguf") == tmp_path / "dir" / "llava-7b-Q4_K_M.vhr-profile.json"


def test_precedence_resolver(tmp_path):
    model = tmp_path / "m.gguf"  # never read: n_layer is given
    beside = profile_for_model(model)
    other = save_profile(make_profile(layers=[6, 7], alpha=1.5), tmp_path / "other.json")

    r = resolve(model, n_layer=8)  # nothing anywhere: the spec's auto rule, alpha 2
    assert (r.layers, r.alpha, r.profile, r.layers_from, r.alpha_from) == ("auto", 2.0, None, "default", "default")
    assert r.describe() == ""

    save_profile(make_profile(), beside)
    r = resolve(model, n_layer=8)  # the profile beside the GGUF
    assert (r.layers, r.alpha, r.layers_from, r.alpha_from) == ([0, 1, 2, 3], 3.0, "profile", "profile")
    assert r.layers_spec == "0-3" and r.describe().startswith(f"vhr-edge: profile {beside}: layers 0-3, alpha 3")
    r = resolve(model, profile=other, n_layer=8)  # --profile FILE beats the one beside
    assert (r.layers, r.alpha) == ([6, 7], 1.5)
    r = resolve(model, layers="1,5", n_layer=8)  # a flag beats the profile, field by field
    assert (r.layers, r.alpha, r.layers_from, r.alpha_from) == ("1,5", 3.0, "flag", "profile")
    assert "--layers from the command line" in r.describe()
    r = resolve(model, alpha=2.5, profile=other, n_layer=8)
    assert (r.layers, r.alpha) == ([6, 7], 2.5)
    r = resolve(model, layers="auto", alpha=2.0, n_layer=8)  # both flags: the profile has nothing to say
    assert (r.layers, r.alpha, r.profile) == ("auto", 2.0, None)
    r = resolve(model, no_profile=True, n_layer=8)  # --no-profile ignores the one beside
    assert (r.layers, r.alpha, r.profile) == ("auto", 2.0, None)
    with pytest.raises(ConfigError, match="not both"):
        resolve(model, profile=other, no_profile=True, n_layer=8)
    with pytest.raises(ConfigError, match="outside the model"):
        resolve(model, n_layer=3)  # the profile beside names layers 0..3


BAD = [
    ("not JSON", "{", "is not valid JSON"),
    ("not an object", "[1, 2]", "is not a JSON object"),
    ("missing fields", '{"format": 1, "layers": [1], "alpha": 2}', "lacks the field(s) model, objective"),
    ("other format", "FMT", "has format 2"),
    ("layers out of range", "L9", "layer 9 is outside the model (it has layers 0..7)"),
    ("layers not a list", "Lstr", "'layers' must be a non-empty list"),
    ("empty layers", "Lempty", "'layers' must be a non-empty list"),
    ("alpha zero", "A0", "'alpha' must be a number > 0"),
    ("calibration incomplete", "CAL", "'calibration' lacks ids_sha256"),
]


@pytest.mark.parametrize("name, text, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_profiles(tmp_path, name, text, fragment):
    d = make_profile().to_json()
    edits = {"FMT": {"format": 2}, "L9": {"layers": [1, 9]}, "Lstr": {"layers": "1,4-7"}, "Lempty": {"layers": []},
             "A0": {"alpha": 0}, "CAL": {"calibration": {"source": {}, "seed": 1, "n": 3}}}
    if text in edits:
        text = json.dumps({**d, **edits[text]})
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_profile(p, n_layer=8)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and str(p) in msg
    with pytest.raises(ConfigError, match="profile not found"):
        load_profile(tmp_path / "none.json")
    with pytest.raises(ConfigError):  # save_profile refuses what load_profile would refuse
        save_profile({**d, "alpha": -1}, tmp_path / "x.json")


# --- the commands on a fixture model --------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A fixture model of its own (profiles get written beside it), and a picture."""
    d = tmp_path_factory.mktemp("prof")
    text, mmproj = fixtures.write_tiny_llava(d, SPEC, name="p")
    img = d / "scene.png"
    Image.fromarray(scene(5)).save(img)
    return dict(text=text, mmproj=mmproj, img=img, d=d, beside=profile_for_model(text))


def caption_vhr(m, *flags):
    r = cli("caption", m["img"], "-m", m["text"], "--mmproj", m["mmproj"], "-n", "2", "-t", "2", "--json", *flags)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["vhr"]
    return v["layers"], v["alpha"], r.stderr


def test_cli_precedence_and_discovery(model):
    m = model
    m["beside"].unlink(missing_ok=True)
    assert caption_vhr(m)[:2] == ([1, 4, 5, 6, 7], 2.0)  # no profile: the defaults, as before
    save_profile(make_profile(model="p-text.gguf", layers=[0, 1, 2, 3], alpha=3.0), m["beside"])
    try:
        layers, alpha, err = caption_vhr(m)  # found beside the GGUF
        assert (layers, alpha) == ([0, 1, 2, 3], 3.0)
        assert err.splitlines()[0] == f"vhr-edge: profile {m['beside']}: layers 0-3, alpha 3"
        assert caption_vhr(m, "--layers", "1,5")[:2] == ([1, 5], 3.0)  # flag > profile
        assert caption_vhr(m, "--alpha", "1.5")[:2] == ([0, 1, 2, 3], 1.5)
        assert caption_vhr(m, "--alpha", "2", "--layers", "auto")[:2] == ([1, 4, 5, 6, 7], 2.0)
        layers, alpha, err = caption_vhr(m, "--no-profile")
        assert (layers, alpha) == ([1, 4, 5, 6, 7], 2.0) and "profile" not in err
        other = save_profile(make_profile(model="elsewhere.gguf", layers=[7], alpha=1.5), m["d"] / "other.json")
        layers, alpha, err = caption_vhr(m, "--profile", other)  # --profile FILE > beside
        assert (layers, alpha) == ([7], 1.5) and "calibrated for elsewhere.gguf" in err
        assert caption_vhr(m, "--no-vhr")[:2] == ([], None)

        # a broken profile beside the model: one line, exit 1; --no-profile gets past it
        m["beside"].write_text('{"format": 1, "layers": [1]')
        r = cli("caption", m["img"], "-m", m["text"], "--mmproj", m["mmproj"], "-n", "2")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"vhr-edge: error: profile {m['beside']} is not valid JSON")
        assert caption_vhr(m, "--no-profile")[:2] == ([1, 4, 5, 6, 7], 2.0)
        (m["d"] / "deep.json").write_text(json.dumps({**make_profile().to_json(), "layers": [0, 9]}))
        r = cli("caption", m["img"], "-m", m["text"], "--mmproj", m["mmproj"], "--profile", m["d"] / "deep.json")
        assert r.returncode == 1 and r.stderr.strip() == (
            f"vhr-edge: error: profile {m['d'] / 'deep.json'}: layer 9 is outside the model (it has layers 0..7)")
        r = cli("caption", m["img"], "-m", m["text"], "--profile", other, "--no-profile")
        assert r.returncode == 1 and "not both" in r.stderr
    finally:
        m["beside"].unlink(missing_ok=True)


def test_eval_and_compare_use_the_profile(model, tmp_path):
    m = model
    save_profile(make_profile(model="p-text.gguf", layers=[0, 1, 2, 3], alpha=3.0), m["beside"])
    try:
        out = tmp_path / "ev"
        r = cli("eval", "chair", "-n", "2", "-m", m["text"], "--mmproj", m["mmproj"], "-t", "2", "--max-tokens", "4",
                "--out", out, "--json", "--no-progress")
        assert r.returncode == 0, r.stderr
        assert stderr_lines(r.stderr) == [f"vhr-edge: profile {m['beside']}: layers 0-3, alpha 3"]
        run = json.loads((out / "chair-vhr-a3-L0-3.run.json").read_text())
        assert run["vhr"]["alpha"] == 3.0 and run["vhr"]["layers"] == "0-3"
        r = cli("eval", "chair", "-n", "2", "-m", m["text"], "--mmproj", m["mmproj"], "-t", "2", "--max-tokens", "4",
                "--out", out, "--json", "--no-progress", "--no-profile")
        assert r.returncode == 0 and (out / "chair-vhr-a2.jsonl").exists()

        cmp = tmp_path / "cmp"
        r = subprocess.run(EXE + ["compare", "-m", str(m["text"]), "--mmproj", str(m["mmproj"]), "-n", "2",
                                  "--pope-n", "0", "--max-tokens", "4", "-t", "2", "--out", str(cmp)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        rows = list(csv.DictReader(open(cmp / "compare.csv")))
        assert [x["method"] for x in rows] == ["greedy", "vhr-a3-L0-3"]
        assert (cmp / "p-text" / "chair-vhr-a3-L0-3.jsonl").exists()
    finally:
        m["beside"].unlink(missing_ok=True)


def test_serve_default_vhr_and_request_override():
    from vhr_edge.serve import parse_request
    from vhr_edge.session import VhrConfig

    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    assert (parse_request(body, False).vhr.alpha, parse_request(body, False).vhr.layers) == (2.0, "auto")
    dv = VhrConfig(alpha=3.0, layers=[0, 1, 2, 3])
    job = parse_request(body, False, dv)
    assert (job.vhr.alpha, job.vhr.layers) == (3.0, [0, 1, 2, 3])
    job = parse_request({**body, "vhr": {"alpha": 1.5}}, False, dv)  # the request's field wins
    assert (job.vhr.alpha, job.vhr.layers) == (1.5, [0, 1, 2, 3])
    job = parse_request({**body, "vhr": {"layers": "auto"}}, False, dv)
    assert (job.vhr.alpha, job.vhr.layers) == (3.0, "auto")


def test_profile_from_json_accepts_int_alpha():
    d = make_profile().to_json()
    assert profile_from_json({**d, "alpha": 2}).alpha == 2.0


def test_cli_serve_default_comes_from_the_profile(model):
    import base64
    import http.client
    import io
    import re
    import signal

    m = model
    save_profile(make_profile(model="p-text.gguf", layers=[0, 1, 2, 3], alpha=3.0), m["beside"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    p = subprocess.Popen(EXE + ["serve", "-m", str(m["text"]), "--mmproj", str(m["mmproj"]), "--port", "0", "-t", "2"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stderr.readline().strip() == f"vhr-edge: profile {m['beside']}: layers 0-3, alpha 3"
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", p.stderr.readline()).group(1))
        buf = io.BytesIO()
        Image.fromarray(scene(6)).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

        def post(**extra):
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                    "max_tokens": 2, **extra}
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            out = (resp.status, json.loads(resp.read()))
            conn.close()
            return out

        status, j = post()
        assert status == 200 and (j["vhr"]["layers"], j["vhr"]["alpha"]) == ([0, 1, 2, 3], 3.0)
        status, j = post(vhr={"alpha": 1.5, "layers": "1,5"})  # the request's fields still win
        assert status == 200 and (j["vhr"]["layers"], j["vhr"]["alpha"]) == ([1, 5], 1.5)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        m["beside"].unlink(missing_ok=True)
