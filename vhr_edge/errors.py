"""User-facing errors: each one is printed by the CLI as a single line."""

import json
from pathlib import Path


class VhrEdgeError(Exception):
    """Base class: bad input or an environment problem the user can fix."""


class ImageError(VhrEdgeError):
    """An image could not be read (missing, not an image, truncated, too large...)."""


class ModelError(VhrEdgeError):
    """A model or mmproj file is missing, corrupt or not supported."""


class ConfigError(VhrEdgeError):
    """A parameter is out of range (alpha, layers, prompt length...)."""


def read_json_file(path: Path, what: str, error: type = ValueError):
    """json.load(path), or `error` with one line naming `what`, the path and the problem."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if not path.is_file():
        raise error(f"{what} is not a file: {path}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not valid JSON: not UTF-8 text") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
