"""User-facing errors: each one is printed by the CLI as a single line."""


class VhrEdgeError(Exception):
    """Base class: bad input or an environment problem the user can fix."""


class ImageError(VhrEdgeError):
    """An image could not be read (missing, not an image, truncated, too large...)."""


class ModelError(VhrEdgeError):
    """A model or mmproj file is missing, corrupt or not supported."""


class ConfigError(VhrEdgeError):
    """A parameter is out of range (alpha, layers, prompt length...)."""
