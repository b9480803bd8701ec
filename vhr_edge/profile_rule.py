"""How a calibration sweep becomes a VHR profile: the candidate settings, the bootstrap, and the
choice rule (`choose`, a pure function of the sweep table; OBJECTIVE says it in words).

`vhr-edge calibrate` (calibrate.py) runs the sweep; this module only decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import ConfigError

DEFAULT_ALPHAS = (1.5, 2.0, 3.0)
PAPER_ALPHA = 2.0
MAX_RECALL_DROP = 0.02
MAX_LEN_CHANGE = 0.10


def objective_text(max_recall_drop: float = MAX_RECALL_DROP, max_len_change: float = MAX_LEN_CHANGE) -> str:
    return (f"lowest CHAIR_S subject to object recall at most {max_recall_drop:g} below greedy and mean caption "
            f"length within {100 * max_len_change:g}% of greedy; ties go to the smaller alpha. The winner replaces "
            f"the paper rule (layer 1 + the last round(14*L/32) layers, alpha {PAPER_ALPHA:g}) only if the 95% "
            f"bootstrap interval (over images) of CHAIR_S(winner) - CHAIR_S(paper rule) lies entirely below 0, "
            f"and likewise against its random-heads control. When the paper rule itself breaks the constraints, "
            f"the winner replaces it without those tests (the least harmful setting; a warning says so).")


OBJECTIVE = objective_text()


# ---- the sweep ---------------------------------------------------------------------------


def candidate_layer_sets(n_layer: int, bands: int = 4) -> list[tuple[str, list[int]]]:
    """(name, layers) for a model depth: the paper rule, `bands` contiguous bands, the early and
    late halves, all layers; duplicates (small models) keep the first name."""
    from .layers import auto_layers

    if n_layer < 1:
        raise ConfigError(f"the model has {n_layer} layers")
    sets = [("paper", auto_layers(n_layer))]
    for i, chunk in enumerate(np.array_split(np.arange(n_layer), min(bands, n_layer))):
        sets.append((f"band{i + 1}of{min(bands, n_layer)}", [int(x) for x in chunk]))
    half = n_layer // 2
    if half >= 1:
        sets.append(("early", list(range(half))))
        sets.append(("late", list(range(half, n_layer))))
    sets.append(("all", list(range(n_layer))))
    out, seen = [], set()
    for name, layers in sets:
        if layers and tuple(layers) not in seen:
            seen.add(tuple(layers))
            out.append((name, layers))
    return out


@dataclass
class Setting:
    name: str  # "greedy", "paper", "band1of4", "early", "late", "all"
    layers: Optional[list[int]] = None  # None: greedy
    alpha: Optional[float] = None
    random: bool = False  # the random-heads control of (layers, alpha)

    @property
    def key(self) -> str:
        """The run's tag (file names in --out): greedy, vhr-a2-L1,4-7, vhr-a2-L1,4-7-random."""
        from .flags import vhr_tag
        from .layers import format_layers

        if self.layers is None:
            return "greedy"
        return vhr_tag(self.alpha, format_layers(self.layers), random=self.random)

    def control(self) -> "Setting":
        return Setting(self.name, self.layers, self.alpha, random=True)

    def vhr_config(self):
        from .session import VhrConfig

        if self.layers is None:
            return VhrConfig(enabled=False)
        return VhrConfig(enabled=True, alpha=float(self.alpha), layers=list(self.layers),
                         head_mode="random" if self.random else "vhd", random_seed=0)


def sweep_settings(n_layer: int, alphas: Sequence[float], bands: int = 4) -> list[Setting]:
    """Greedy, the paper rule (auto layers, alpha 2, always), then every layer set x alpha."""
    from .layers import auto_layers

    paper_layers = auto_layers(n_layer)
    if not paper_layers:
        raise ConfigError(f"a model with {n_layer} layer(s) has no paper-rule layer set to calibrate against")
    sets = candidate_layer_sets(n_layer, bands)
    out = [Setting("greedy"), Setting("paper", paper_layers, PAPER_ALPHA)]
    for a in alphas:
        for name, layers in sets:
            s = Setting(name, layers, float(a))
            if s.key not in {x.key for x in out}:
                out.append(s)
    return out


# ---- statistics and the decision ------------------------------------------------------------


def _boot_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(h: Sequence[float], n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of per-image values, resampling images."""
    h = np.asarray(h, dtype=np.float64)
    means = h[_boot_idx(len(h), n_boot, seed)].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """mean(a) - mean(b) over the same images, with its paired-bootstrap 95% interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired rows must cover the same images")
    d = a - b
    lo, hi = bootstrap_ci(d, n_boot, seed)
    return {"estimate": float(d.mean()), "ci": [lo, hi], "beyond_uncertainty": hi < 0}


def violations(row: dict, greedy: dict, max_recall_drop: float = MAX_RECALL_DROP,
               max_len_change: float = MAX_LEN_CHANGE) -> list[str]:
    """Which constraints of the objective a row breaks (empty: it meets them)."""
    eps = 1e-9
    out = []
    drop = greedy["recall"] - row["recall"]
    if drop > max_recall_drop + eps:
        out.append(f"recall {row['recall']:.3f} is {drop:.3f} below greedy's {greedy['recall']:.3f}")
    g = greedy["mean_len"]
    if abs(row["mean_len"] - g) > max_len_change * g + eps:
        out.append(f"mean length {row['mean_len']:.1f} vs greedy's {g:.1f} (more than {100 * max_len_change:g}% off)")
    return out


@dataclass
class Decision:
    chosen: str  # key of the setting to ship
    candidate: Optional[str]  # the best row meeting the constraints (None: no row does)
    kept_paper: bool  # chosen is the paper rule
    reason: str
    paper_feasible: bool
    violations: dict = field(default_factory=dict)  # key -> [broken constraints]
    ci: dict = field(default_factory=dict)  # key -> [lo, hi] of CHAIR_S (every row, greedy, controls)
    diff_vs_paper: Optional[dict] = None  # candidate - paper rule (when the candidate is not the paper rule)
    candidate_vs_control: Optional[dict] = None  # candidate - its random-heads control
    chosen_vs_control: Optional[dict] = None  # chosen - its random-heads control (reported next to it)
    control_needed: Optional[str] = None  # run this key's random control, then choose again
    warnings: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def choose(rows: Sequence[dict], greedy: dict, paper_key: str, *, controls: Optional[dict] = None,
           n_boot: int = 1000, seed: int = 0, max_recall_drop: float = MAX_RECALL_DROP,
           max_len_change: float = MAX_LEN_CHANGE) -> Decision:
    """The calibration decision over a sweep table (pure: no model, no files).

    rows: one dict per VHR setting (the paper rule among them) with "key", "alpha", "layers",
    "chair_s", "recall", "mean_len" and "hall" (per-image 0/1: caption has a hallucinated
    object; the same image order in every row). greedy: the same fields for plain decoding.
    controls: key -> the random-heads row of that setting, where it was run.

    1. Rows that meet the constraints (recall drop, length) are ranked by CHAIR_S, then the
       smaller alpha, then fewer layers; the first is the candidate.
    2. The candidate replaces the paper rule only if its paired-bootstrap 95% interval of
       CHAIR_S(candidate) - CHAIR_S(paper) is entirely below 0 (waived when the paper rule
       itself breaks the constraints), and the same holds against its random-heads control.
       With that control not run yet, `control_needed` names the candidate.
    3. When the paper rule breaks the constraints, a candidate that meets them is chosen even
       if it does not beat its control (with a warning): it is the least harmful setting.
    """
    controls = controls or {}
    by_key = {r["key"]: r for r in rows}
    if paper_key not in by_key:
        raise ValueError(f"the sweep has no paper-rule row {paper_key!r}")
    paper = by_key[paper_key]
    viol = {r["key"]: violations(r, greedy, max_recall_drop, max_len_change) for r in rows}
    ci = {r["key"]: bootstrap_ci(r["hall"], n_boot, seed) for r in [greedy, *rows, *controls.values()]}
    feasible = [r for r in rows if not viol[r["key"]]]
    feasible.sort(key=lambda r: (round(r["chair_s"], 9), r["alpha"], len(r["layers"]), r["key"]))
    paper_ok = not viol[paper_key]
    d = Decision(chosen=paper_key, candidate=feasible[0]["key"] if feasible else None, kept_paper=True,
                 reason="", paper_feasible=paper_ok, violations=viol, ci=ci)
    if not paper_ok:
        d.warnings.append("the paper rule breaks the constraints: " + "; ".join(viol[paper_key]))

    def control_diff(key: str) -> Optional[dict]:
        c = controls.get(key)
        if c is None:
            return None
        return {"control": c["key"], **paired_diff(by_key[key]["hall"], c["hall"], n_boot, seed)}

    def finish(key: str, reason: str) -> Decision:
        d.chosen, d.kept_paper, d.reason = key, key == paper_key, reason
        d.chosen_vs_control = control_diff(key)
        if d.chosen_vs_control is not None and not d.chosen_vs_control["beyond_uncertainty"]:
            d.warnings.append(f"{key} does not beat its random-heads control beyond the bootstrap uncertainty "
                              "on this calibration set")
        return d

    if not feasible:
        return finish(paper_key, "no setting meets the constraints; keeping the paper rule")
    cand = feasible[0]
    if cand["key"] == paper_key:
        return finish(paper_key, "the paper rule is the best setting that meets the constraints")
    d.diff_vs_paper = paired_diff(cand["hall"], paper["hall"], n_boot, seed)
    lo, hi = d.diff_vs_paper["ci"]
    if paper_ok and not d.diff_vs_paper["beyond_uncertainty"]:
        return finish(paper_key, f"{cand['key']} has the lowest CHAIR_S ({cand['chair_s']:.3f} vs the paper rule's "
                                 f"{paper['chair_s']:.3f}) but not beyond the uncertainty (difference 95% CI "
                                 f"[{lo:+.3f}, {hi:+.3f}] reaches 0); keeping the paper rule")
    d.candidate_vs_control = control_diff(cand["key"])
    if d.candidate_vs_control is None:
        d.control_needed = cand["key"]
        return finish(cand["key"], f"{cand['key']} beats the paper rule; its random-heads control has not been run yet")
    if not d.candidate_vs_control["beyond_uncertainty"]:
        c_lo, c_hi = d.candidate_vs_control["ci"]
        if not paper_ok:  # keeping a rule that breaks the constraints would be the worst choice
            return finish(cand["key"], f"{cand['key']} meets the constraints, which the paper rule breaks; it does "
                                       f"not beat its random-heads control beyond the uncertainty (difference 95% CI "
                                       f"[{c_lo:+.3f}, {c_hi:+.3f}] reaches 0): the least harmful setting, not a "
                                       "proven one")
        return finish(paper_key, f"{cand['key']} does not beat its random-heads control beyond the uncertainty "
                                 f"(difference 95% CI [{c_lo:+.3f}, {c_hi:+.3f}] reaches 0); keeping the paper rule")
    why = (f"beats the paper rule beyond the uncertainty (difference 95% CI [{lo:+.3f}, {hi:+.3f}])" if paper_ok
           else "meets the constraints, which the paper rule breaks,")
    return finish(cand["key"], f"{cand['key']} {why} and beats its random-heads control")
