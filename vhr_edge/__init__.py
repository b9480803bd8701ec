"""vhr-edge: Vision-aware Head Reinforcement (VHR) on llama.cpp, for LLaVA-style GGUF models.

The native engine is imported lazily, so `vhr_edge.images`, `vhr_edge.layers` and the
fixtures work without it; `Session` (and everything that runs a model) needs it.
"""

__version__ = "0.1.0"

DEFAULT_PROMPT = "Please describe this image in detail."

__all__ = [
    "DEFAULT_PROMPT",
    "Session",
    "CaptionResult",
    "VhrConfig",
    "GenerationConfig",
    "VhrEdgeError",
]

from .errors import VhrEdgeError  # noqa: E402


def __getattr__(name):
    if name in ("Session", "CaptionResult", "VhrConfig", "GenerationConfig", "Timings", "VhrReport"):
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module 'vhr_edge' has no attribute {name!r}")
