"""Small statistics for the evaluation tools: AUROC by ranks, and bootstrap intervals that
resample whole captions (images), plain or paired.

No scipy / scikit-learn is a dependency of vhr-edge, so the AUROC is the Mann-Whitney rank
formula (tests check it against hand-computed cases, ties included):

    AUROC = P(score(positive) > score(negative)) + 1/2 P(equal)
          = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg),  R_pos = sum of the positives' midranks

Bootstrap intervals are 95% percentile intervals over `n_boot` resamples of the captions
(`numpy.random.default_rng(seed)`), so values from one caption move together.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LEVEL = 0.95


def midranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks of x, ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    s = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Area under the ROC curve of a score that should be HIGHER for `pos` than for `neg`
    (ties count one half). NaN when either group is empty."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    r = midranks(np.concatenate([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    return float((r[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _percentile_ci(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    a = (1.0 - LEVEL) / 2.0
    return [float(np.percentile(values, 100 * a)), float(np.percentile(values, 100 * (1 - a)))]


def boot_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n]: how often each of n captions is drawn in each resample."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n), dtype=np.float64)
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    return counts


def auroc_resamples(groups: Sequence[tuple[Sequence[float], Sequence[float]]], counts: np.ndarray) -> np.ndarray:
    """The AUROC of each resample: counts [n_boot, n_captions] weighs caption i's scores
    (stats.boot_counts). NaN where a resample has no positive or no negative."""
    pos = [np.asarray(p, np.float64) for p, _ in groups]
    neg = [np.asarray(q, np.float64) for _, q in groups]
    all_pos, all_neg = np.concatenate(pos + [np.zeros(0)]), np.concatenate(neg + [np.zeros(0)])
    # pairwise wins of every positive over every negative; a resample weighs caption i by its count
    cmp = (all_pos[:, None] > all_neg[None, :]) + 0.5 * (all_pos[:, None] == all_neg[None, :])
    wp = counts[:, np.repeat(np.arange(len(groups)), [len(p) for p in pos])]
    wn = counts[:, np.repeat(np.arange(len(groups)), [len(q) for q in neg])]
    num = ((wp @ cmp) * wn).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auroc_bootstrap(groups: Sequence[tuple[Sequence[float], Sequence[float]]], n_boot: int = 1000,
                    seed: int = 0) -> dict:
    """AUROC over captions, each giving (positive scores, negative scores), with a bootstrap 95%
    interval that resamples captions. Resamples left with an empty group are skipped (counted
    in "n_boot_skipped")."""
    all_pos = [v for p, _ in groups for v in p]
    all_neg = [v for _, q in groups for v in q]
    est = auroc(all_pos, all_neg)
    out = {"auroc": est, "ci": [float("nan"), float("nan")], "n_pos": len(all_pos), "n_neg": len(all_neg),
           "n_boot": int(n_boot), "n_boot_skipped": 0, "seed": int(seed)}
    if not np.isfinite(est) or n_boot < 1:
        return out
    vals = auroc_resamples(groups, boot_counts(len(groups), n_boot, seed))
    out["n_boot_skipped"] = int(np.isnan(vals).sum())
    out["ci"] = _percentile_ci(vals)
    return out


def mean_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean of per-caption values and its bootstrap 95% interval."""
    v = np.asarray(values, np.float64)
    if not len(v):
        return {"estimate": float("nan"), "ci": [float("nan"), float("nan")]}
    means = (boot_counts(len(v), n_boot, seed) @ v) / len(v)
    return {"estimate": float(v.mean()), "ci": _percentile_ci(means)}


# ---- CHAIR metrics with intervals ------------------------------------------------------------
# Per caption: h = 1 if any hallucinated object, n_hall, n_ment (distinct objects mentioned),
# n_hit (ground-truth objects mentioned), n_gt. CHAIR_S = mean h; CHAIR_I = sum n_hall / sum
# n_ment; recall = sum n_hit / sum n_gt. A resample draws captions (images) with replacement.

def chair_rows(per_caption: Sequence[dict]) -> np.ndarray:
    """[n, 5] = (h, n_hall, n_ment, n_hit, n_gt) from chair.score_caption dicts."""
    return np.array([[bool(p["hallucinated"]), len(p["hallucinated"]), len(p["mentioned"]), len(p["hit"]), p["n_gt"]]
                     for p in per_caption], dtype=np.float64).reshape(-1, 5)


def _chair_metrics(sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sums [..., 5] (weighted column sums), n [...] -> [..., 3] (CHAIR_S, CHAIR_I, recall)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([sums[..., 0] / n, np.where(sums[..., 2] > 0, sums[..., 1] / sums[..., 2], 0.0),
                         np.where(sums[..., 4] > 0, sums[..., 3] / sums[..., 4], 0.0)], axis=-1)


METRICS = ("chair_s", "chair_i", "recall")


def chair_ci(rows: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """{metric: {"estimate", "ci"}} for CHAIR_S, CHAIR_I and recall, resampling captions."""
    counts = boot_counts(len(rows), n_boot, seed)
    est = _chair_metrics(rows.sum(axis=0), np.float64(len(rows)))
    boot = _chair_metrics(counts @ rows, counts.sum(axis=1))
    return {m: {"estimate": float(est[i]), "ci": _percentile_ci(boot[:, i])} for i, m in enumerate(METRICS)}


def chair_paired_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """metric(a) - metric(b) over the SAME images (rows in the same order), paired bootstrap:
    one resample of images serves both. b may be [n_runs, n, 5] (e.g. random-heads seeds):
    its metric is then the mean over runs within each resample."""
    b3 = b if b.ndim == 3 else b[None]
    if a.shape != b3.shape[1:]:
        raise ValueError("paired rows must cover the same images")
    counts = boot_counts(len(a), n_boot, seed)
    n = counts.sum(axis=1)
    ma = _chair_metrics(counts @ a, n)
    mb = np.mean([_chair_metrics(counts @ bb, n) for bb in b3], axis=0)
    ea = _chair_metrics(a.sum(axis=0), np.float64(len(a)))
    eb = np.mean([_chair_metrics(bb.sum(axis=0), np.float64(len(a))) for bb in b3], axis=0)
    out = {}
    for i, m in enumerate(METRICS):
        ci = _percentile_ci(ma[:, i] - mb[:, i])
        out[m] = {"estimate": float(ea[i] - eb[i]), "ci": ci, "below_zero": ci[1] < 0, "above_zero": ci[0] > 0}
    return out
