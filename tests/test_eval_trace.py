"""`vhr-edge trace`: T-VHD per token, object words marked, JSON + PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from vhr_edge.eval.trace import token_rows, trace_image
from vhr_edge.eval.chair import testbed_vocabulary
from vhr_edge.session import GenerationConfig, VhrConfig

from conftest import scene


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
