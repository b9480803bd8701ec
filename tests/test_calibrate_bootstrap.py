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


def test_seeded_and_checked():
    """The seed decides the resamples (the same seed: the same interval; the decision too)."""
    a = [1, 0, 1, 1, 0, 0, 1, 0] * 5
    b = [1, 1, 0, 1, 1, 0, 1, 1] * 5
    assert paired_diff(a, b, 300, seed=4) == paired_diff(a, b, 300, seed=4)
    assert len({tuple(paired_diff(a, b, 300, seed=s)["ci"]) for s in range(6)}) > 1
    assert bootstrap_ci(a, 300, seed=5) == bootstrap_ci(a, 300, seed=5)
    rows = [row("paper", 20), row("cand", 14, alpha=1.5, layers=(0, 1))]
    ctrl = {"cand": row("cand-random", 20, alpha=1.5, layers=(0, 1))}
    one = choose(rows, row("greedy", 22), "paper", controls=ctrl, n_boot=300, seed=9).to_json()
    two = choose(rows, row("greedy", 22), "paper", controls=ctrl, n_boot=300, seed=9).to_json()
    assert one == two
    with pytest.raises(ValueError, match="paired rows must cover the same images"):
        paired_diff([1, 0], [1, 0, 1])


def test_decision_fields():
    """Ranking by CHAIR_S before alpha, and what the decision records besides `chosen`."""
    paper = row("paper", 20)
    low_alpha = row("low-alpha", 18, alpha=1.5, layers=(0, 1))  # smaller alpha, more hallucination
    best = row("best", 12, alpha=3.0, layers=(2, 3, 4))
    greedy = row("greedy", 22)
    d = choose([paper, low_alpha, best], greedy, "paper", n_boot=500)
    assert d.candidate == "best" and d.chosen == "best" and d.control_needed == "best"
    assert not d.kept_paper and d.paper_feasible is True and d.warnings == []
    assert d.reason == "best beats the paper rule; its random-heads control has not been run yet"
    d = choose([paper, low_alpha, best], greedy, "paper", controls={"best": row("best-random", 21, alpha=3.0)},
               n_boot=500)
    assert d.chosen == "best" and d.chosen_vs_control["control"] == "best-random"
    assert d.candidate_vs_control["beyond_uncertainty"] and d.candidate_vs_control["estimate"] == pytest.approx(-9 / N)
    bad_paper = {**row("paper", 20), "recall": 0.5}
    d = choose([bad_paper, low_alpha], greedy, "paper", controls={"low-alpha": row("la-random", 18, alpha=1.5)},
               n_boot=500)
    assert d.paper_feasible is False and d.chosen == "low-alpha"
    assert d.warnings[0] == "the paper rule breaks the constraints: recall 0.500 is 0.300 below greedy's 0.800"
    assert d.warnings[1] == ("low-alpha does not beat its random-heads control beyond the bootstrap uncertainty "
                             "on this calibration set")
    assert d.reason.endswith("the least harmful setting, not a proven one")


def test_violation_messages():
    from vhr_edge.profile_rule import violations

    greedy = row("greedy", 22)
    v = violations({**row("x", 10), "recall": 0.7, "mean_len": 60.0}, greedy)
    assert v == ["recall 0.700 is 0.100 below greedy's 0.800",
                 "mean length 60.0 vs greedy's 50.0 (more than 10% off)"]
