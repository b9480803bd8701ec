"""The VHR layer set: `--layers 1,18-31`, `auto` (VHR_SPEC section 3) or `all`."""

from __future__ import annotations

from .errors import ConfigError


def auto_layers(n_layer: int) -> list[int]:
    """The paper rule as released: layer 1 plus the last 14 layers (1, 18..31 for 32 layers;
    1, 26..39 for 40); models shallower than 16 layers keep the proportion: layer 1 plus the
    last round(14 * n_layer / 32) (8 layers: 1, 4..7)."""
    n_last = 14 if n_layer >= 16 else int(14 * n_layer / 32 + 0.5)  # round half up, as the C++ core does
    layers = set(range(max(0, n_layer - n_last), n_layer))
    if n_layer > 1:
        layers.add(1)
    return sorted(layers)


def parse_layers(spec: str | list[int] | None, n_layer: int) -> list[int]:
    """Resolve a layer spec against a model depth; raise ConfigError naming the problem."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return auto_layers(n_layer)
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return list(range(n_layer))
    if isinstance(spec, str):
        layers: set[int] = set()
        for part in spec.split(","):
            part = part.strip()
            if not part:
                raise ConfigError(f"bad layer list '{spec}': empty item")
            try:
                if "-" in part[1:]:
                    lo_s, hi_s = part.split("-", 1) if not part.startswith("-") else ("-", part[1:])
                    lo, hi = int(lo_s), int(hi_s)
                    if lo > hi:
                        raise ConfigError(f"bad layer range '{part}' (start > end)")
                    layers.update(range(lo, hi + 1))
                else:
                    layers.add(int(part))
            except ValueError:
                raise ConfigError(f"bad layer list '{spec}': '{part}' is not a number or a range like 18-31") from None
        out = sorted(layers)
    else:
        out = sorted(set(int(x) for x in spec))
    if not out:
        raise ConfigError("the layer set is empty")
    bad = [x for x in out if x < 0 or x >= n_layer]
    if bad:
        raise ConfigError(f"layer {bad[0]} is outside the model (it has layers 0..{n_layer - 1})")
    return out


def format_layers(layers: list[int]) -> str:
    """[1, 4, 5, 6, 7] -> '1,4-7'."""
    out, run = [], []
    for x in sorted(layers):
        if run and x == run[-1] + 1:
            run.append(x)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = [x]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
