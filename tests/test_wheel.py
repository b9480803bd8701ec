"""Installed like any package (issue 20): `python -m build` (build isolation: the extension is
compiled against the llama-cpp-python of a throwaway build environment) gives an sdist and a
wheel built from it; the wheel goes into a FRESH venv (llama-cpp-python from pip's cache, no
torch, no checkout on sys.path) and works from a folder outside the repository: the bundled
testbed is the default model, `compare` has its plotting, and the process maps one libllama,
the venv's own.

The built wheel is cached under build/wheel-test/<hash of its inputs>/, so a suite with no
change to the package's sources reuses it; the venv is made fresh every run (about a minute).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vhr_edge import fixtures

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux venv layout and ELF checks")


def input_hash() -> str:
    """What the wheel is made of: the build files and sources by content, the models by name and size."""
    h = hashlib.sha256()
    files = [ROOT / "CMakeLists.txt", ROOT / "pyproject.toml", ROOT / "README.md"]
    files += sorted((ROOT / "native").glob("*")) + sorted((ROOT / "vhr_edge").rglob("*.py"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    for f in sorted((ROOT / "models").glob("*")):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def dist() -> Path:
    """The folder holding vhr_edge-*.tar.gz and the vhr_edge-*.whl built from it (cached)."""
    cache = ROOT / "build" / "wheel-test"
    out = cache / input_hash()
    if not list(out.glob("vhr_edge-*.whl")):
        shutil.rmtree(cache, ignore_errors=True)  # keep one build only
        tmp = cache / "tmp"
        r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp), str(ROOT)],
                           capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "llama-cpp-python 0.3.36 at" in r.stdout and "build environment: RUNPATH is relative only" in r.stdout
        tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel (and its dependencies) installed; returns its bin/."""
    d = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(d)], check=True, timeout=300)
    wheel = next(dist.glob("vhr_edge-*.whl"))
    r = subprocess.run([str(d / "bin" / "python"), "-m", "pip", "install", "-q", "--find-links", str(dist), str(wheel)],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "bin"


def outside_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VHR_EDGE_", "PYTHON"))}
    return env


def run(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=outside_env(), capture_output=True, text=True, timeout=timeout)


def test_sdist_and_wheel_contents(dist):
    import tarfile
    import zipfile

    sdist = next(dist.glob("vhr_edge-*.tar.gz"))
    names = tarfile.open(sdist).getnames()
    assert any(n.endswith("/native/runner.cpp") for n in names)
    assert any(n.endswith("/models/testbed-f16.gguf") for n in names)
    assert not any("/models/testbed-hf/" in n for n in names)
    whl = zipfile.ZipFile(next(dist.glob("vhr_edge-*.whl"))).namelist()
    for f in ("testbed-f16.gguf", "testbed-mmproj-f16.gguf", "testbed-q8_0.gguf", "testbed-q4_k_m.gguf",
              "testbed-f16.vhr-profile.json", "README.md"):
        assert f"vhr_edge/models/{f}" in whl, f
    assert not any("testbed-hf" in n for n in whl)
    assert any(re.match(r"vhr_edge/_engine\..*\.so$", n) for n in whl)


def test_installed_extension_runs_against_the_venvs_llama_cpp(venv, tmp_path):
    py = str(venv / "python")
    code = textwrap.dedent("""
        import os, glob, llama_cpp, vhr_edge, vhr_edge.engine
        e = vhr_edge.engine.load()
        llama_cpp.llama_backend_init()
        assert e.auto_layers(32)[0] == 1
        maps = {os.path.realpath(l.split()[5]) for l in open('/proc/self/maps')
                if len(l.split()) >= 6 and ('libllama' in l or 'libggml' in l or 'libmtmd' in l)}
        print(repr(sorted(maps)))
        print(os.path.dirname(llama_cpp.__file__))
        print(glob.glob(os.path.join(os.path.dirname(vhr_edge.__file__), '_engine*.so'))[0])
    """)
    r = run([py, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    maps, pkg, engine = eval(r.stdout.splitlines()[0]), r.stdout.splitlines()[1], r.stdout.splitlines()[2]
    assert pkg.startswith(str(venv.parent)) and "build-env" not in pkg
    libllama = [m for m in maps if os.path.basename(m).startswith("libllama")]
    assert len(libllama) == 1 and libllama[0].startswith(os.path.realpath(pkg)), maps
    assert all(m.startswith(os.path.realpath(pkg)) for m in maps), maps
    runpath = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]",
                         subprocess.run(["readelf", "-d", engine], capture_output=True, text=True).stdout)
    assert runpath == ["$ORIGIN/../llama_cpp/lib"], runpath  # no path of the build environment


def test_caption_with_no_flags_uses_the_packaged_testbed(venv, tmp_path):
    image = str(ROOT / "examples" / "fork_without_knife.png")
    info = run([str(venv / "vhr-edge"), "info"], cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    site = str(venv.parent)
    assert re.search(rf"default model: {re.escape(site)}\S*/vhr_edge/models/testbed-f16.gguf", info.stdout), info.stdout
    assert "installed with the package" in info.stdout
    r = run([str(venv / "vhr-edge"), "caption", image, "-n", "8"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "VHR alpha" in r.stderr and r.stdout.strip()
    # the same tokens as the checkout's own install on the same file
    ref = subprocess.run([sys.executable, "-m", "vhr_edge.cli", "caption", image, "-n", "8"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr
    assert r.stdout == ref.stdout


def test_compare_runs_with_core_dependencies(venv, tmp_path):
    text, mmproj = fixtures.write_tiny_llava(tmp_path / "m", fixtures.TinySpec(n_layer=4, n_embd=64, n_head=4, n_ff=128))
    q8 = fixtures.quantize(text, tmp_path / "m" / "tiny-Q8_0.gguf", "Q8_0")
    out = tmp_path / "cmp"
    r = run([str(venv / "vhr-edge"), "compare", "-m", str(text), "-m", str(q8), "--mmproj", str(mmproj),
             "-n", "2", "--pope-n", "2", "--max-tokens", "6", "-t", "2", "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(x["model"], x["method"]) for x in rows] == [
        ("tiny-text.gguf", "greedy"), ("tiny-text.gguf", "vhr-a2"), ("tiny-Q8_0.gguf", "greedy"), ("tiny-Q8_0.gguf", "vhr-a2")]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no torch came with it: plotting is a core dependency, the oracle extra is not needed
    assert run([str(venv / "python"), "-c", "import torch"], cwd=tmp_path).returncode != 0
