"""Per-model VHR profiles: a calibrated layer set and alpha stored beside the GGUF (VHR_SPEC 3).

A profile is a JSON file, written by `vhr-edge calibrate`:

    {"format": 1, "model": "llava-v1.5-7b-Q4_K_M.gguf", "layers": [1, 18, ...], "alpha": 2.0,
     "objective": "lowest CHAIR_S subject to ...",
     "calibration": {"source": {...}, "seed": 2000, "n": 100, "ids_sha256": "..."},
     "metrics": {...}, "vhr_edge_version": "0.1.0"}

`profile_for_model(model)` is where a profile is looked for automatically:
`<model stem>.vhr-profile.json` in the model's folder.

Precedence (`resolve`), per field: an explicit flag (--layers / --alpha) > `--profile FILE`
> the profile beside the GGUF > VHR_SPEC's defaults ("auto" layers, alpha 2).
`--no-profile` skips the profile beside the GGUF.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError, read_json_file
from .layers import format_layers
from .templates import PROFILE_KEY, check_template

FORMAT = 1
SUFFIX = ".vhr-profile.json"
DEFAULT_ALPHA = 2.0
DEFAULT_LAYERS = "auto"
REQUIRED = ("format", "model", "layers", "alpha", "objective", "calibration", "metrics", "vhr_edge_version")
CALIBRATION_REQUIRED = ("source", "seed", "n", "ids_sha256")

PathLike = Union[str, os.PathLike]


@dataclass
class Profile:
    model: str
    layers: list[int]
    alpha: float
    objective: str
    calibration: dict
    metrics: dict = field(default_factory=dict)
    vhr_edge_version: str = ""
    # The template the model was trained with, when it is not LLaVA-1.5's (templates.py); the
    # session uses it for the model beside the profile.
    prompt_template: Optional[str] = None
    path: Optional[Path] = None  # where it was read from (not stored)

    def to_json(self) -> dict:
        d = {"format": FORMAT, "model": self.model, "layers": list(self.layers), "alpha": self.alpha,
             "objective": self.objective, "calibration": self.calibration, "metrics": self.metrics,
             "vhr_edge_version": self.vhr_edge_version}
        if self.prompt_template is not None:
            d["prompt_template"] = self.prompt_template
        return d


def profile_for_model(model_path: PathLike) -> Path:
    """`<model stem>.vhr-profile.json` beside the GGUF (auto-discovery)."""
    p = Path(model_path)
    return p.with_name(p.stem + SUFFIX)


def carried_template(model_path: Union[str, os.PathLike]) -> tuple[Optional[str], Optional[Path]]:
    """The prompt template a profile beside the model carries, and that profile's path (or None, None)."""
    p = profile_for_model(model_path)
    if not p.is_file():
        return None, None
    try:
        value = json.loads(p.read_text()).get(PROFILE_KEY)
    except (OSError, ValueError, AttributeError):
        return None, None  # a broken profile is reported where profiles are read
    return (value, p) if isinstance(value, str) else (None, None)


def ids_sha256(ids) -> str:
    """Hash of an ordered id list, as stored in profiles: sha256 of its compact JSON."""
    return hashlib.sha256(json.dumps(list(ids), separators=(",", ":")).encode()).hexdigest()


def _model_depth(model_path: PathLike) -> int:
    from .model_info import read_info

    n = read_info(model_path).get("n_layer")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"cannot tell the layer count of {model_path}")
    return n


def profile_from_json(d, where: str = "profile", n_layer: Optional[int] = None) -> Profile:
    """Validate a decoded profile object; ConfigError (one line) naming the first problem."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} is not a JSON object")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"{where} lacks the field(s) {', '.join(missing)}")
    if d["format"] != FORMAT:
        raise ConfigError(f"{where} has format {d['format']!r}; this vhr-edge reads format {FORMAT}")
    if not isinstance(d["model"], str) or not d["model"]:
        raise ConfigError(f"{where}: 'model' must be the model's file name")
    layers = d["layers"]
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise ConfigError(f"{where}: 'layers' must be a non-empty list of layer indices")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{where}: 'layers' lists a layer twice")
    bad = [x for x in layers if x < 0 or (n_layer is not None and x >= n_layer)]
    if bad:
        depth = f" (it has layers 0..{n_layer - 1})" if n_layer is not None else ""
        raise ConfigError(f"{where}: layer {bad[0]} is outside the model{depth}")
    alpha = d["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"{where}: 'alpha' must be a number > 0, got {alpha!r}")
    if not isinstance(d["objective"], str):
        raise ConfigError(f"{where}: 'objective' must be text")
    cal = d["calibration"]
    if not isinstance(cal, dict):
        raise ConfigError(f"{where}: 'calibration' must be an object")
    missing = [k for k in CALIBRATION_REQUIRED if k not in cal]
    if missing:
        raise ConfigError(f"{where}: 'calibration' lacks {', '.join(missing)}")
    if not isinstance(d["metrics"], dict):
        raise ConfigError(f"{where}: 'metrics' must be an object")
    template = d.get("prompt_template")
    if template is not None:
        check_template(template, f"{where}: 'prompt_template'")
    return Profile(model=d["model"], layers=sorted(layers), alpha=float(alpha), objective=d["objective"],
                   calibration=cal, metrics=d["metrics"], vhr_edge_version=str(d["vhr_edge_version"]),
                   prompt_template=template)


def load_profile(path: PathLike, n_layer: Optional[int] = None, model_path: Optional[PathLike] = None) -> Profile:
    """Read and check a profile. Layers are checked against `n_layer`, or against the depth of
    `model_path` (read from its GGUF metadata) when given."""
    p = Path(path)
    where = f"profile {p}"
    d = read_json_file(p, "profile", ConfigError)
    if n_layer is None and model_path is not None:
        n_layer = _model_depth(model_path)
    prof = profile_from_json(d, where, n_layer)
    prof.path = p
    return prof


def save_profile(profile: Union[Profile, dict], path: PathLike) -> Path:
    """Check and write a profile atomically (a temporary file, then a rename)."""
    d = profile.to_json() if isinstance(profile, Profile) else dict(profile)
    d.setdefault("format", FORMAT)
    profile_from_json(json.loads(json.dumps(d)), "profile")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=1) + "\n")
    os.replace(tmp, p)
    return p


@dataclass
class Resolved:
    """The layer set and alpha to use, and where each came from."""

    layers: Union[str, list[int]]  # "auto"/"all"/a spec string from a flag, or a profile's list
    alpha: float
    profile: Optional[Profile] = None
    layers_from: str = "default"  # "flag", "profile" or "default"
    alpha_from: str = "default"

    @property
    def layers_spec(self) -> str:
        """The layer set as a --layers string."""
        return self.layers if isinstance(self.layers, str) else format_layers(self.layers)

    def describe(self, model_name: Optional[str] = None) -> str:
        """One line for stderr, naming the profile used (empty when none was used)."""
        if self.profile is None:
            return ""
        p = self.profile
        used = []
        if self.layers_from == "profile":
            used.append(f"layers {format_layers(p.layers)}")
        if self.alpha_from == "profile":
            used.append(f"alpha {p.alpha:g}")
        line = f"vhr-edge: profile {p.path}: " + (", ".join(used) if used else "nothing (flags override it)")
        overridden = [f for f, src in (("--layers", self.layers_from), ("--alpha", self.alpha_from)) if src == "flag"]
        if used and overridden:
            line += f" ({' and '.join(overridden)} from the command line)"
        if model_name is not None and p.model != model_name:
            line += f"; calibrated for {p.model}"
        return line


def resolve(model_path: Optional[PathLike], *, layers=None, alpha: Optional[float] = None,
            profile: Optional[PathLike] = None, no_profile: bool = False,
            n_layer: Optional[int] = None) -> Resolved:
    """THE precedence rule: explicit flag > --profile FILE > profile beside the GGUF > auto/2.

    layers/alpha: the flag values, None when not given. profile: an explicit profile file.
    no_profile: ignore a profile beside the model (an explicit `profile` is an error with it).
    n_layer: the model's depth for checking the profile's layers (read from the GGUF when None).
    """
    if profile is not None and no_profile:
        raise ConfigError("give --profile FILE or --no-profile, not both")
    prof = None
    if layers is None or alpha is None:  # a profile has something to say
        path = None
        if profile is not None:
            path = Path(profile)
        elif not no_profile and model_path is not None:
            beside = profile_for_model(model_path)
            path = beside if beside.exists() else None
        if path is not None:
            prof = load_profile(path, n_layer=n_layer, model_path=model_path if n_layer is None else None)
    elif profile is not None:  # both flags given: still report a broken explicit profile
        prof = load_profile(profile, n_layer=n_layer, model_path=model_path if n_layer is None else None)

    def pick(flag, from_profile, default):
        if flag is not None:
            return flag, "flag"
        if prof is not None:
            return from_profile, "profile"
        return default, "default"

    lay, lay_from = pick(layers, prof.layers if prof else None, DEFAULT_LAYERS)
    alp, alp_from = pick(alpha, prof.alpha if prof else None, DEFAULT_ALPHA)
    return Resolved(layers=lay, alpha=float(alp), profile=prof, layers_from=lay_from, alpha_from=alp_from)


def add_profile_args(group) -> None:
    """--profile FILE and --no-profile on an argparse group or parser."""
    group.add_argument("--profile", metavar="FILE",
                       help="VHR profile (layers, alpha) from `vhr-edge calibrate` (default: "
                            f"<model stem>{SUFFIX} beside the model, if there is one)")
    group.add_argument("--no-profile", action="store_true", help="ignore a profile beside the model")
