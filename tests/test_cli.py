"""`vhr-edge` as a user runs it: output formats, and the bad-input table.

Every bad input must give ONE line on stderr naming the problem, no traceback, and a
non-zero exit code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vhr_edge import fixtures

from conftest import EXE, SPEC, scene, stderr_lines


def run(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    return subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("cli")
    text, mmproj = tiny
    img = d / "scene.png"
    Image.fromarray(scene(3)).save(img)
    (d / "notes.jpg").write_text("not an image\n" * 20)
    (d / "empty.png").write_bytes(b"")
    (d / "trunc.png").write_bytes(img.read_bytes()[:80])
    buf = d / "bomb.png"
    Image.new("1", (12000, 9000)).save(buf)
    (d / "corrupt.gguf").write_bytes(Path(text).read_bytes()[:4096])
    (d / "zero.gguf").write_bytes(b"")
    wide = fixtures.write_mmproj(d / "wide-mmproj.gguf", replace(SPEC, proj_dim=48))
    other = fixtures.write_mmproj(d / "gemma-mmproj.gguf", replace(SPEC, projector_type="gemma3"))
    return dict(text=text, mmproj=mmproj, img=img, d=d, wide=wide, other=other)


def test_caption_text_and_json(files):
    r = run("caption", files["img"], "-m", files["text"], "--mmproj", files["mmproj"], "-n", "6", "-t", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # the caption
    assert "VHR alpha 2 layers 1,4-7" in r.stderr

    r = run("caption", files["img"], files["img"], "-m", files["text"], "--mmproj", files["mmproj"],
            "-n", "5", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    j = json.loads(lines[0])
    assert set(j) >= {"image", "text", "n_tokens", "vhr", "timings"}
    assert j["n_tokens"] == 5 and j["image"] == str(files["img"])
    assert j["vhr"]["enabled"] is True and j["vhr"]["alpha"] == 2.0 and j["vhr"]["layers"] == [1, 4, 5, 6, 7]
    assert set(j["vhr"]["selected_heads"]) == {"1", "4", "5", "6", "7"}
    assert np.array(j["vhr"]["vhd"]).shape == (8, 4) and np.array(j["vhr"]["ta"]).shape == (8, 4)
    assert {"image_encode_ms", "prefill_ms", "decode_ms", "tokens_per_s"} <= set(j["timings"])
    assert json.loads(lines[1])["text"] == j["text"]

    r = run("caption", files["img"], "-m", files["text"], "--mmproj", files["mmproj"], "-n", "4", "--json",
            "--no-vhr", "-ngl", "0", "--temp", "0.8", "--seed", "3", "-c", "512", "-p", "Is there a cat?")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["vhr"]["enabled"] is False and j["vhr"]["selected_heads"] == {}


def test_mmproj_found_beside_model(files):
    r = run("caption", files["img"], "-m", files["text"], "-n", "2")  # tiny-mmproj.gguf sits beside it
    assert r.returncode == 0, r.stderr


def test_info(files):
    r = run("info", files["text"])
    assert r.returncode == 0 and "llama" in r.stdout and "head_dim" in r.stdout
    j = json.loads(run("info", files["text"], "--json").stdout)
    assert (j["n_layer"], j["n_head"], j["n_head_kv"], j["head_dim"]) == (8, 4, 4, 16)
    assert j["tensor_types"] == {"F32": j["n_tensors"]}
    j = json.loads(run("info", files["mmproj"], "--json").stdout)
    assert j["architecture"] == "clip" and j["projector_type"] == "mlp"


def test_one_bad_image_does_not_stop_the_others(files):
    r = run("caption", files["d"] / "nope.png", files["img"], "-m", files["text"], "--mmproj", files["mmproj"],
            "-n", "3", "--json")
    assert r.returncode == 1
    assert len(r.stdout.strip().splitlines()) == 1  # the good image still got its caption
    assert stderr_lines(r.stderr) == [f"vhr-edge: error: image not found: {files['d'] / 'nope.png'}"]


BAD = [
    # (name, args builder, expected fragment of the error line)
    ("missing image", lambda f: ["caption", f["d"] / "nope.png"], "image not found"),
    ("directory as image", lambda f: ["caption", f["d"]], "not a file"),
    ("non-image", lambda f: ["caption", f["d"] / "notes.jpg"], "not an image"),
    ("zero-size image", lambda f: ["caption", f["d"] / "empty.png"], "empty file"),
    ("truncated image", lambda f: ["caption", f["d"] / "trunc.png"], "truncated|cannot decode"),
    ("image bomb", lambda f: ["caption", f["d"] / "bomb.png"], "too large"),
    ("missing model", lambda f: ["caption", f["img"], "-m", f["d"] / "no.gguf"], "model not found"),
    ("image as model", lambda f: ["caption", f["img"], "-m", f["img"], "--mmproj", f["mmproj"]], "not a GGUF"),
    ("corrupt model", lambda f: ["caption", f["img"], "-m", f["d"] / "corrupt.gguf", "--mmproj", f["mmproj"]],
     "cannot load text model"),
    ("empty model", lambda f: ["caption", f["img"], "-m", f["d"] / "zero.gguf", "--mmproj", f["mmproj"]],
     "not a GGUF"),
    ("missing mmproj", lambda f: ["caption", f["img"], "-m", f["text"], "--mmproj", f["d"] / "no.gguf"],
     "mmproj not found"),
    ("corrupt mmproj", lambda f: ["caption", f["img"], "-m", f["text"], "--mmproj", f["d"] / "corrupt.gguf"],
     "cannot read mmproj .*truncated"),
    ("mmproj width mismatch", lambda f: ["caption", f["img"], "-m", f["text"], "--mmproj", f["wide"]],
     "mismatch between text model \\(n_embd = 64\\) and mmproj \\(n_embd = 48\\)"),
    ("non-LLaVA projector", lambda f: ["caption", f["img"], "-m", f["text"], "--mmproj", f["other"]],
     "not a LLaVA-style projector"),
    ("non-LLaVA text model", lambda f: ["caption", f["img"], "-m", f["mmproj"], "--mmproj", f["mmproj"]],
     "cannot load text model"),
    ("prompt longer than context", lambda f: ["caption", f["img"], "-c", "256", "-p", "describe " * 200],
     "context holds 256"),
    ("alpha zero", lambda f: ["caption", f["img"], "--alpha", "0"], "alpha must be > 0"),
    ("alpha negative", lambda f: ["caption", f["img"], "--alpha", "-2"], "alpha must be > 0"),
    ("layer outside model", lambda f: ["caption", f["img"], "--layers", "1,8"], "layer 8 is outside the model"),
    ("bad layer syntax", lambda f: ["caption", f["img"], "--layers", "1,a-3"], "bad layer list"),
    ("zero tokens", lambda f: ["caption", f["img"], "-n", "0"], "-n must be at least 1"),
    ("tiny context", lambda f: ["caption", f["img"], "-c", "8"], "at least 64"),
    ("no mmproj beside model", lambda f: ["caption", f["img"], "-m", f["d"] / "corrupt.gguf"], "no --mmproj given"),
    ("info on non-GGUF", lambda f: ["info", f["img"]], "cannot read"),
    ("info on missing file", lambda f: ["info", f["d"] / "no.gguf"], "model not found"),
    ("unknown flag", lambda f: ["caption", f["img"], "--frobnicate"], "unrecognized arguments"),
    ("alpha not a number", lambda f: ["caption", f["img"], "--alpha", "two"], "invalid float value"),
]


@pytest.mark.parametrize("name, build, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_table(files, name, build, fragment):
    args = build(files)
    if "-m" not in args and args[0] == "caption":
        args += ["-m", files["text"], "--mmproj", files["mmproj"]]
    r = run(*args)
    assert r.returncode != 0, f"{name}: exit 0\n{r.stdout}"
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"{name}: expected one error line, got:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("vhr-edge: error: ")
    assert re.search(fragment, lines[0]), f"{name}: {lines[0]!r} lacks {fragment!r}"


def test_default_model_and_no_model(files, monkeypatch, capsys):
    from vhr_edge import cli, flags

    if flags.default_model_paths()[0]:  # the bundled testbed is the default model
        r = run("caption", files["img"], "-n", "4")
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
    monkeypatch.setattr(flags, "default_model_paths", lambda: (None, None))
    assert cli.main(["caption", str(files["img"])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vhr-edge: error: no model given") and "-m" in err and "\n" not in err
