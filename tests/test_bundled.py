"""The default model: $VHR_EDGE_MODEL, else the testbed a wheel carries (vhr_edge/models/), else a
checkout's models/; `vhr-edge info` with no MODEL says which."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vhr_edge import bundled
from vhr_edge.flags import default_model_paths

ROOT = Path(__file__).resolve().parent.parent


def test_checkout_models_when_no_package_data(monkeypatch, tmp_path):
    monkeypatch.delenv("VHR_EDGE_MODEL", raising=False)
    monkeypatch.setattr(bundled, "PACKAGE_MODELS", tmp_path / "none")
    assert bundled.models_dir() == (ROOT / "models", "checkout")
    assert default_model_paths() == (str(ROOT / "models" / "testbed-f16.gguf"), None)


def test_package_data_first_then_env(monkeypatch, tmp_path):
    monkeypatch.delenv("VHR_EDGE_MODEL", raising=False)
    (tmp_path / "testbed-f16.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(bundled, "PACKAGE_MODELS", tmp_path)
    assert bundled.models_dir() == (tmp_path, "wheel")
    assert default_model_paths()[0] == str(tmp_path / "testbed-f16.gguf")
    assert bundled.quantizations()[1] == tmp_path / "testbed-q8_0.gguf"
    monkeypatch.setenv("VHR_EDGE_MODEL", "/x/m.gguf")
    monkeypatch.setenv("VHR_EDGE_MMPROJ", "/x/p.gguf")
    assert default_model_paths() == ("/x/m.gguf", "/x/p.gguf")


def test_info_without_model_says_where_the_default_lives(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    r = subprocess.run([sys.executable, "-m", "vhr_edge.cli", "info"], capture_output=True, text=True,
                       timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"default model: {ROOT / 'models' / 'testbed-f16.gguf'}  (bundled testbed, in the checkout's models/)" in r.stdout
    assert "llama-cpp-python 0.3.36 (backends: " in r.stdout and "architecture  llama" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vhr_edge.cli", "info", "--json"], capture_output=True, text=True,
                       timeout=60, env=dict(env, VHR_EDGE_MODEL=str(ROOT / "models" / "testbed-q8_0.gguf")), cwd=tmp_path)
    j = json.loads(r.stdout)
    assert j["source"] == "$VHR_EDGE_MODEL" and j["model"].endswith("testbed-q8_0.gguf")
    assert j["mmproj"].endswith("testbed-mmproj-f16.gguf") and "cpu" in j["backends"]
    assert j["info"]["architecture"] == "llama"
