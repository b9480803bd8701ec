"""The compiled engine (vhr_edge._engine), loaded with a check of the llama.cpp it was built for.

The extension links the libllama / libggml / libmtmd that llama-cpp-python installs in
site-packages/llama_cpp/lib, so one copy of ggml is mapped when both are imported. It was
compiled against llama-cpp-python's headers of one exact version; another version installed
beside it would be ABI-incompatible, so the import refuses it with instructions.
"""

from __future__ import annotations

import importlib.metadata

from .errors import VhrEdgeError

REQUIRED_LLAMA_CPP_PYTHON = "0.3.36"

REBUILD_HINT = (
    f"pip install llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON} && "
    "pip install --no-build-isolation --force-reinstall --no-deps .   (in the vhr-edge checkout)"
)


class EngineImportError(VhrEdgeError, ImportError):
    """The native engine cannot be used with the llama-cpp-python installed."""


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(installed: str | None, built_for: str | None) -> None:
    """Raise EngineImportError unless llama-cpp-python matches what the extension was built with."""
    if installed != REQUIRED_LLAMA_CPP_PYTHON:
        raise EngineImportError(
            f"vhr-edge needs llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON}, found "
            f"{installed or 'none'}; reinstall it and rebuild vhr-edge: {REBUILD_HINT}"
        )
    if built_for is not None and built_for != installed:
        raise EngineImportError(
            f"vhr-edge's engine was built against llama-cpp-python {built_for} but {installed} "
            f"is installed; rebuild vhr-edge: {REBUILD_HINT}"
        )


def load():
    """Return the vhr_edge._engine module, or raise EngineImportError with a rebuild hint."""
    installed = _installed_version()
    check_versions(installed, None)
    try:
        from . import _engine
    except ImportError as e:
        raise EngineImportError(f"cannot load vhr-edge's native engine ({e}); rebuild it: {REBUILD_HINT}") from e
    check_versions(installed, _engine.LLAMA_CPP_PYTHON_VERSION)
    return _engine
