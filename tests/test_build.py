"""Build and environment: one libllama/libggml in the process, version guard."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vhr_edge.engine import REQUIRED_LLAMA_CPP_PYTHON, EngineImportError, check_versions


def test_one_copy_of_llama_and_ggml_is_mapped():
    code = textwrap.dedent(
        """
        import os, llama_cpp, vhr_edge.engine
        e = vhr_edge.engine.load()
        # make both sides actually use the libraries
        llama_cpp.llama_backend_init()
        assert e.auto_layers(32)[0] == 1
        libs = {}
        for line in open('/proc/self/maps'):
            parts = line.split()
            if len(parts) >= 6 and ('libllama' in parts[5] or 'libggml' in parts[5] or 'libmtmd' in parts[5]):
                path = os.path.realpath(parts[5])
                name = os.path.basename(path).split('.so')[0]
                libs.setdefault(name, set()).add(path)
        print(repr({k: sorted(v) for k, v in libs.items()}))
        print(os.path.dirname(llama_cpp.__file__))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    libs = eval(r.stdout.splitlines()[0])
    pkg = r.stdout.splitlines()[1]
    assert {"libllama", "libggml", "libggml-base", "libmtmd"} <= set(libs)
    for name, paths in libs.items():
        assert len(paths) == 1, f"{name} mapped from {paths}"
        assert paths[0].startswith(os.path.realpath(os.path.join(pkg, "lib"))), paths


def test_extension_links_llama_cpp_lib_dir():
    from vhr_edge import _engine

    out = subprocess.run(["ldd", _engine.__file__], capture_output=True, text=True).stdout
    for lib in ("libllama.so", "libggml.so", "libmtmd.so"):
        line = next(l for l in out.splitlines() if lib in l)
        assert "llama_cpp/lib" in line and "not found" not in line, line


def test_version_guard_messages():
    check_versions(REQUIRED_LLAMA_CPP_PYTHON, REQUIRED_LLAMA_CPP_PYTHON)
    with pytest.raises(EngineImportError, match="needs llama-cpp-python==0.3.36, found 0.3.20.*--no-build-isolation"):
        check_versions("0.3.20", None)
    with pytest.raises(EngineImportError, match="found none"):
        check_versions(None, None)
    with pytest.raises(EngineImportError, match="built against llama-cpp-python 0.3.30"):
        check_versions(REQUIRED_LLAMA_CPP_PYTHON, "0.3.30")


def test_cli_reports_version_mismatch(tmp_path):
    code = textwrap.dedent(
        """
        import importlib.metadata as m, sys
        real = m.version
        m.version = lambda name: '0.3.20' if name == 'llama-cpp-python' else real(name)
        from vhr_edge.cli import main
        sys.exit(main(['caption', 'x.png', '-m', 'x.gguf']))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "llama-cpp-python==0.3.36" in r.stderr and "rebuild" in r.stderr
