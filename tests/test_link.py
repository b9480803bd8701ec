"""How the extension links llama.cpp (issue 15): exactly libllama, libmtmd and libggml-base, with
libstdc++ FIRST in NEEDED, so that no library carrying its own copy of libstdc++ (a CUDA build's
libggml-cuda does) can capture the std:: calls of libllama or of the extension.

The crash's cause is reproduced on CPU: a stand-in `libggml-cuda.so` built with -static-libstdc++
that exports its whole libstdc++, made a dependency of libggml in a COPY of llama_cpp/lib (as in a
CUDA build, where libggml links the backends), and the glibc loader's own record of every symbol
binding (LD_DEBUG=bindings, LD_BIND_NOW=1). The extension as built binds nothing into it; a copy
of it relinked in the old order (the stand-in ahead of libstdc++, as the `llama` CMake target left
it) binds hundreds of std:: symbols of libllama and of the extension into it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and the glibc loader")

STAND_IN = "libggml-cuda.so"
STAND_IN_SRC = r"""
#include <sstream>
#include <string>
extern "C" int ggml_cuda_stand_in(int x) { std::ostringstream s; s << x; return (int) s.str().size(); }
"""


def engine_path() -> Path:
    return Path(importlib.util.find_spec("vhr_edge._engine").origin)


def llama_lib_dir() -> Path:
    return Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib"


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} not found")
    return found


def needed(path: Path) -> list[str]:
    out = subprocess.run([tool("readelf"), "-d", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def test_needed_is_libstdcxx_first_then_exactly_llama_mtmd_ggml_base():
    n = needed(engine_path())
    assert n[0].startswith("libstdc++.so"), n
    stems = {x.split(".so")[0] for x in n}
    assert {"libllama", "libmtmd", "libggml-base"} <= stems, n
    # no backend (libggml is the registry that links them; -cpu, -cuda, -metal, -vulkan, ...)
    assert not [x for x in stems if x.startswith("libggml") and x != "libggml-base"], n


def test_std_references_are_all_versioned():
    """An unversioned std:: reference is one the link resolved against a library exporting an
    unversioned libstdc++ copy; every one must carry GLIBCXX_/CXXABI_ versions."""
    out = subprocess.run([tool("nm"), "-D", "--undefined-only", "-C", str(engine_path())],
                         capture_output=True, text=True, check=True).stdout
    if "@" not in out:
        pytest.skip("this nm prints no symbol versions")
    std = [l.split(None, 1)[1] for l in out.splitlines()
           if re.match(r"\s*U\s+((vtable|typeinfo|typeinfo name|VTT) for )?std::", l)]
    assert len(std) > 20, std  # the extension does call libstdc++
    unversioned = [s for s in std if not re.search(r"@@?(GLIBCXX|CXXABI)_[0-9.]+$", s)]
    assert not unversioned, unversioned[:10]


@pytest.fixture(scope="module")
def cuda_like_site(tmp_path_factory) -> Path:
    """site/llama_cpp/lib: a copy of the real lib folder whose libggml also needs the stand-in
    libggml-cuda.so (with its own exported libstdc++); site/vhr_edge/: copies of the extension."""
    cxx = shutil.which("g++") or pytest.skip("g++ not found")
    patchelf = tool("patchelf")
    root = tmp_path_factory.mktemp("cuda-like")
    lib = root / "site" / "llama_cpp" / "lib"
    shutil.copytree(llama_lib_dir(), lib, symlinks=True)
    src = root / "stand_in.cpp"
    src.write_text(STAND_IN_SRC)
    subprocess.run([cxx, "-shared", "-fPIC", "-O1", str(src), "-o", str(lib / STAND_IN), "-static-libstdc++",
                    "-Wl,--whole-archive", "-l:libstdc++.a", "-Wl,--no-whole-archive"], check=True, timeout=120)
    exported = subprocess.run([tool("nm"), "-D", "--defined-only", str(lib / STAND_IN)],
                              capture_output=True, text=True, check=True).stdout
    assert exported.count(" _ZNSo") > 10  # it does export std::ostream & co, unversioned
    for f in lib.iterdir():  # libggml.so.0 (and any alias that is a file, not a link)
        if re.fullmatch(r"libggml\.so(\.[0-9.]+)?", f.name) and not f.is_symlink():
            subprocess.run([patchelf, "--add-needed", STAND_IN, str(f)], check=True)
    pkg = root / "site" / "vhr_edge"
    pkg.mkdir()
    shutil.copy2(engine_path(), pkg / "_engine.so")
    # the old order: the stand-in ahead of libstdc++ (patchelf --add-needed puts it first)
    shutil.copy2(engine_path(), pkg / "_engine_old_order.so")
    subprocess.run([patchelf, "--add-needed", STAND_IN, str(pkg / "_engine_old_order.so")], check=True)
    return root / "site"


def bindings(so: Path, workdir: Path) -> list[tuple[str, str, str]]:
    """(from file, to file, symbol) of every symbol binding made while dlopen()ing `so`."""
    out = workdir / f"ld-debug-{so.stem}"
    env = dict(os.environ, LD_DEBUG="bindings", LD_BIND_NOW="1", LD_DEBUG_OUTPUT=str(out))
    r = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(so)!r})"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = []
    for f in workdir.glob(out.name + ".*"):
        for line in f.read_text().splitlines():
            m = re.search(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: \w+ symbol `([^']+)'", line)
            if m:
                rows.append((Path(m[1]).name, Path(m[2]).name, m[3]))
        f.unlink()
    assert rows, "LD_DEBUG printed no bindings"
    return rows


def is_std(sym: str) -> bool:
    return bool(re.match(r"_Z(N|NK)?S[tiosda]|_ZT[VIS]N?S", sym))


def test_no_std_symbol_binds_into_an_embedded_libstdcxx(cuda_like_site, tmp_path):
    rows = bindings(cuda_like_site / "vhr_edge" / "_engine.so", tmp_path)
    assert any(a == STAND_IN for a, _, _ in rows), "the stand-in was not loaded"
    captured = [(a, s) for a, b, s in rows if b == STAND_IN and a != STAND_IN]
    assert not captured, captured[:10]
    # and libllama's / the extension's std:: calls do go to libstdc++.so.6
    for who in ("libllama.so.0", "_engine.so"):
        assert any(a == who and b.startswith("libstdc++.so") and is_std(s) for a, b, s in rows), who


def test_old_link_order_binds_std_into_the_embedded_copy(cuda_like_site, tmp_path):
    """The same check fails for the link order before the fix: proof that it can."""
    so = cuda_like_site / "vhr_edge" / "_engine_old_order.so"
    assert needed(so)[:2] == [STAND_IN, needed(engine_path())[0]]
    rows = bindings(so, tmp_path)
    for who in ("libllama.so.0", so.name):
        captured = [s for a, b, s in rows if a == who and b == STAND_IN and is_std(s)]
        assert len(captured) > 20, (who, len(captured))
