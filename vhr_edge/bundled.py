"""Where the bundled testbed lives: a wheel carries it as package data (vhr_edge/models/), a
checkout (editable install, `make`) has it in the repository's models/. The default model of
every command (flags.default_model_paths) and `vhr-edge info` with no MODEL come from here.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_MODELS = Path(__file__).resolve().parent / "models"   # pip install (wheel)
CHECKOUT_MODELS = Path(__file__).resolve().parent.parent / "models"  # a clone of the repository
DEFAULT_NAMES = ("testbed-f16.gguf", "testbed.gguf")
QUANT_NAMES = ("testbed-f16.gguf", "testbed-q8_0.gguf", "testbed-q4_k_m.gguf")


def models_dir() -> tuple[Path, str] | None:
    """(folder, "wheel" | "checkout") of the first one that holds the testbed, else None."""
    for d, where in ((PACKAGE_MODELS, "wheel"), (CHECKOUT_MODELS, "checkout")):
        if any((d / n).is_file() for n in DEFAULT_NAMES):
            return d, where
    return None


def default_model() -> Path | None:
    """The bundled testbed's text GGUF (its mmproj is the one *mmproj*.gguf beside it)."""
    found = models_dir()
    if found is None:
        return None
    return next(found[0] / n for n in DEFAULT_NAMES if (found[0] / n).is_file())


def quantizations() -> list[Path]:
    """The testbed's F16, Q8_0 and Q4_K_M text GGUFs (paths in the bundled folder, present or not)."""
    found = models_dir()
    d = found[0] if found else CHECKOUT_MODELS
    return [d / n for n in QUANT_NAMES]
