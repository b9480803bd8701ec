"""The calibration bootstrap against exact distributions, and the decision that depends on it.

Resampling images from 0/1 indicators makes the resampled mean a binomial: mean of k ones
among n = Binomial(n, k/n) / n. So the percentile interval of `bootstrap_ci` has exact
quantiles to check against, without repeating the implementation's random draws. A PAIRED
difference of two indicator rows that differ on m images (a below b) is again a binomial,
-Binomial(n, m/n) / n; an UNPAIRED one (the two rows resampled independently) is much wider.
The rows below are chosen so that the two answers differ: paired, the better row beats the
other beyond the uncertainty; unpaired, its interval reaches above 0.
"""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from vhr_edge.profile_rule import bootstrap_ci, choose, paired_diff

N = 40


def hall(k: int) -> list[int]:
    """The first k of N images hallucinate."""
    return [1] * k + [0] * (N - k)


def binom_quantile(n: int, p: float, q: float) -> int:
    """Smallest x with P(Binomial(n, p) <= x) >= q."""
    cdf = 0.0
    for x in range(n + 1):
        cdf += comb(n, x) * p ** x * (1 - p) ** (n - x)
        if cdf >= q - 1e-12:
            return x
    return n


@pytest.mark.parametrize("n, k", [(40, 6), (40, 14), (40, 20), (40, 33), (400, 200), (400, 60)])
def test_bootstrap_interval_is_the_binomial_one(n, k):
    h = [1] * k + [0] * (n - k)
    lo, hi = bootstrap_ci(h, n_boot=4000, seed=1)
    exp_lo = binom_quantile(n, k / n, 0.025) / n
    exp_hi = binom_quantile(n, k / n, 0.975) / n
    # 4000 resamples put the empirical percentiles within about half an image of the exact
    # quantiles; with 400 images the 5% / 95% quantiles are 2-3 images further in
    tol = (1.0 if n == 40 else 1.5) / n + 1e-9
    assert abs(lo - exp_lo) <= tol, (lo, exp_lo)
    assert abs(hi - exp_hi) <= tol, (hi, exp_hi)
    assert lo < k / n < hi
    if n == 400:
        assert binom_quantile(n, k / n, 0.05) - binom_quantile(n, k / n, 0.025) >= 2  # > tol: 90% != 95%


def test_constant_rows_have_a_point_interval():
    assert bootstrap_ci([1] * N, 200) == [1.0, 1.0]
    assert bootstrap_ci([0] * N, 200) == [0.0, 0.0]
    d = paired_diff([1] * N, [1] * N, 200)
    assert d == {"estimate": 0.0, "ci": [0.0, 0.0], "beyond_uncertainty": False}


def test_paired_difference_is_the_binomial_of_the_discordant_images():
    a, b = hall(14), hall(20)  # a hallucinates on a subset of b's images: 6 discordant of 40
    d = paired_diff(a, b, n_boot=4000, seed=2)
    assert d["estimate"] == pytest.approx(-6 / N)
    exp_lo = -binom_quantile(N, 6 / N, 0.975) / N  # -11/40
    exp_hi = -binom_quantile(N, 6 / N, 0.025) / N  # -2/40
    assert abs(d["ci"][0] - exp_lo) <= 1 / N + 1e-9 and abs(d["ci"][1] - exp_hi) <= 1 / N + 1e-9, d
    assert d["ci"][1] < 0 and d["beyond_uncertainty"]


def test_paired_and_unpaired_answers_differ_here():
    """The same two rows resampled independently (unpaired) would NOT be beyond the
    uncertainty: the decision needs the pairing."""
    a, b = np.asarray(hall(14), float), np.asarray(hall(20), float)
    rng = np.random.default_rng(0)
    unpaired = a[rng.integers(0, N, (4000, N))].mean(1) - b[rng.integers(0, N, (4000, N))].mean(1)
    assert np.percentile(unpaired, 97.5) > 0  # the reference: unpaired reaches above 0
    d = paired_diff(a, b, n_boot=4000)
    assert d["ci"][1] < 0 and d["beyond_uncertainty"]
    # order matters: the images are matched by position, not pooled
    shuffled = list(reversed(hall(14)))  # the same count of ones on other images
    d2 = paired_diff(shuffled, hall(20), n_boot=4000)
    assert d2["estimate"] == pytest.approx(-6 / N) and not d2["beyond_uncertainty"]


def row(key, k, alpha=2.0, layers=(1, 4, 5, 6, 7)):
    h = hall(k)
    return {"key": key, "alpha": alpha, "layers": list(layers), "chair_s": sum(h) / N, "chair_i": 0.1,
            "recall": 0.8, "mean_len": 50.0, "hall": h, "n": N}


def test_a_strictly_better_candidate_replaces_the_paper_rule():
    """6 fewer hallucinating images of 40, all among the paper rule's: adopted (paired), which
    an unpaired bootstrap would refuse (see above)."""
    paper = row("paper", 20)
    cand = row("cand", 14, alpha=1.5, layers=(0, 1))
    control = {**row("cand-random", 20, alpha=1.5, layers=(0, 1))}
    greedy = row("greedy", 22)
    d = choose([paper, cand], greedy, "paper", controls={"cand": control}, n_boot=2000)
    assert d.candidate == "cand" and d.diff_vs_paper["beyond_uncertainty"]
    assert d.candidate_vs_control["beyond_uncertainty"]
    assert d.chosen == "cand" and not d.kept_paper, d.reason
    # the CHAIR_S intervals reported per row are the binomial ones
    lo, hi = d.ci["paper"]
    assert abs(lo - binom_quantile(N, 0.5, 0.025) / N) <= 1 / N + 1e-9
    assert abs(hi - binom_quantile(N, 0.5, 0.975) / N) <= 1 / N + 1e-9
