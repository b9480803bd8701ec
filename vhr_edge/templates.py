"""Prompt templates: how the instruction and the image are wrapped for the model (VHR_SPEC 5).

A template holds "<image>" once and "{prompt}" at most once. The default is LLaVA-1.5's as
the authors' released code prompts it (no system line). A model trained with another template
carries it: in its GGUF metadata (`vhr_edge.prompt_template`) or in the VHR profile beside it
(`"prompt_template"`), so `vhr-edge caption IMG` needs no flag for it. `--template` /
`Session(prompt_template=...)` override both, by name or as the literal template.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError

LLAVA_15 = "USER: <image>\n{prompt} ASSISTANT:"
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions. "
                 "USER: <image>\n{prompt} ASSISTANT:")
NAMED = {"llava-1.5": LLAVA_15, "vicuna-system": VICUNA_SYSTEM}
GGUF_KEY = "vhr_edge.prompt_template"
PROFILE_KEY = "prompt_template"


def check_template(template: str, where: str = "the prompt template") -> str:
    if not isinstance(template, str) or template.count("<image>") != 1:
        raise ConfigError(f"{where} must contain \"<image>\" exactly once")
    if template.count("{prompt}") > 1:
        raise ConfigError(f"{where} may contain \"{{prompt}}\" at most once")
    return template


def resolve_template(spec: str) -> str:
    """A template name (llava-1.5, vicuna-system) or a literal template ('\\n' is a newline)."""
    if spec in NAMED:
        return NAMED[spec]
    if "<image>" not in spec:
        raise ConfigError(f"unknown template {spec!r}: give one of {', '.join(NAMED)} or a template with <image>")
    return check_template(spec.replace("\\n", "\n"), f"template {spec!r}")


def model_template(model_path: Union[str, os.PathLike], gguf_value: Optional[str] = None,
                   profile_value: tuple[Optional[str], Optional[Path]] = (None, None)) -> tuple[str, str]:
    """(template, where it came from) for a model: its GGUF metadata (`gguf_value`, the value
    of GGUF_KEY as the loaded model reports it), else the profile beside it (`profile_value`:
    `profile.carried_template`'s answer), else LLaVA-1.5."""
    t = gguf_value or None
    if t is not None:
        return check_template(t, f"{GGUF_KEY} of {model_path}"), "gguf"
    t, where = profile_value
    if t is not None:
        return check_template(t, f"{PROFILE_KEY} of {where}"), f"profile {where}"
    return LLAVA_15, "default (LLaVA-1.5)"
