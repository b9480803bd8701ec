"""`vhr-edge compare` on two tiny models: table, CSV, chart, per-child peak RSS."""

from __future__ import annotations

import csv
import subprocess
import sys

from vhr_edge import fixtures


def test_compare_two_models(tmp_path, tiny):
    text, mmproj = tiny
    q8 = fixtures.quantize(text, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "vhr_edge.cli", "compare", "-m", str(text), "-m", str(q8),
                        "--mmproj", str(mmproj), "-n", "3", "--pope-n", "2", "--max-tokens", "8", "-t", "2",
                        "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(x["model"], x["method"]) for x in rows] == [
        ("tiny-text.gguf", "greedy"), ("tiny-text.gguf", "vhr-a2"), ("tiny-Q8_0.gguf", "greedy"), ("tiny-Q8_0.gguf", "vhr-a2")]
    for x in rows:
        assert 0 <= float(x["chair_s"]) <= 1 and float(x["pope_f1"]) >= 0
        assert float(x["peak_rss_mb"]) > 10 and float(x["s_per_caption"]) > 0 and float(x["tokens_per_s"]) > 0
    assert float(rows[2]["file_mb"]) < float(rows[0]["file_mb"])  # Q8_0 is smaller than F32
    assert (out / "compare.png").stat().st_size > 0
    assert "| model | method | CHAIR_S" in (out / "compare.md").read_text()
    assert "| tiny-Q8_0.gguf | vhr-a2 |" in r.stdout


def test_compare_missing_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vhr_edge.cli", "compare", "-m", str(tmp_path / "no.gguf"),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == f"vhr-edge: error: model not found: {tmp_path / 'no.gguf'}"
