"""The arithmetic core (native/vhr_core) against numpy and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import spec_select
from vhr_edge.engine import load
from vhr_edge.layers import auto_layers, format_layers, parse_layers
from vhr_edge.errors import ConfigError

E = load()


def test_score_heads_is_squared_distance_and_squared_norm():
    rng = np.random.default_rng(0)
    n_head, hd = 8, 16
    a, b = rng.normal(size=n_head * hd).astype(np.float32), rng.normal(size=n_head * hd).astype(np.float32)
    d, ta = E.score_heads(a, b, n_head)
    ref_d = (((a - b).reshape(n_head, hd).astype(np.float64)) ** 2).sum(axis=1)
    ref_ta = (b.reshape(n_head, hd).astype(np.float64) ** 2).sum(axis=1)
    np.testing.assert_allclose(d, ref_d, rtol=1e-6)
    np.testing.assert_allclose(ta, ref_ta, rtol=1e-6)
    # hand-computed: one head of dim 2, img (3, 4), txt (0, 0) -> D = 25 (not 5), TA = 0
    assert E.score_heads(np.array([3.0, 4.0], np.float32), np.zeros(2, np.float32), 1) == ([25.0], [0.0])


def test_select_hand_computed_median():
    d = [0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.4, 0.8]  # median (0.4 + 0.5) / 2 = 0.45
    ta = [1.0] * 8
    assert E.select_heads(d, ta) == [1, 3, 5, 7]


def test_select_ties_are_not_above_median():
    assert E.select_heads([1.0, 2.0, 2.0, 3.0], [0.0] * 4) == [3]  # median 2
    assert E.select_heads([2.0] * 6, [0.0] * 6) == []
    assert E.select_heads([1.0, 5.0, 3.0], [0.0] * 3) == [1]  # odd count: middle value


def test_outlier_needs_both_d_and_ta_high():
    d = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0]
    # mean 2.125, unbiased std 3.182 (> 1, so the rule applies) -> threshold 5.31; head 7 is above
    assert E.outlier_heads(d, [1.0] * 7 + [10.0]) == [7]
    assert E.outlier_heads(d, [10.0] + [1.0] * 7) == []  # TA high elsewhere: not an outlier
    # the outlier's D is zeroed before the median: it is NOT selected
    sel_rule = E.select_heads([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 10.0], [1.0] * 7 + [10.0])
    assert sel_rule == [3, 4, 5, 6]  # zeroed head 7 moves the median down to 0.75
    sel_plain = E.select_heads([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 10.0], [1.0] * 7 + [10.0], outlier_rule=False)
    assert sel_plain == [4, 5, 6, 7]


def test_outlier_rule_uses_the_unbiased_std():
    # D = 0,0,0,0,5,7: mean 2, population std 2.887 (threshold 4.89), unbiased std 3.162 (5.16).
    # TA = 0,0,0,0,10,10: both high heads pass TA's threshold (8.5 unbiased).
    d, ta = [0.0, 0.0, 0.0, 0.0, 5.0, 7.0], [0.0, 0.0, 0.0, 0.0, 10.0, 10.0]
    assert E.outlier_heads(d, ta) == [5]  # with the population std head 4 would be one too
    assert E.select_heads(d, ta) == [4]  # D -> 0,0,0,0,5,0: median 0
    assert E.select_heads(d, ta, outlier_rule=False) == [4, 5]


def test_outlier_rule_guard_is_absolute():
    # std(D) = 0.904 <= 1: the rule is skipped although head 3 is high in both D and TA
    d, ta = [0.1, 0.2, 0.3, 2.0], [0.0, 0.0, 0.0, 5.0]
    assert E.outlier_heads(d, ta) == []
    assert E.select_heads(d, ta) == [2, 3]  # median 0.25
    # the same layer 10x larger: std 9.04 > 1, head 3 is dropped
    d10 = [10 * x for x in d]
    assert E.outlier_heads(d10, ta) == [3]
    assert E.select_heads(d10, ta) == [1, 2]  # D -> 1, 2, 3, 0: median 1.5


@pytest.mark.parametrize("n_head", [5, 8, 32])
def test_select_matches_numpy_random(n_head):
    rng = np.random.default_rng(n_head)
    guarded = 0
    for _ in range(300):
        scale = 0.05 if rng.random() < 0.3 else 1.0  # some layers where std(D) <= 1
        d = (rng.gamma(2.0, 1.0, n_head) * scale).astype(np.float32)
        ta = rng.gamma(2.0, 1.0, n_head).astype(np.float32)
        if rng.random() < 0.3:  # plant an outlier
            i = rng.integers(n_head)
            d[i] *= 8
            ta[i] *= 8
        if rng.random() < 0.2:  # plant ties
            d[: n_head // 2] = d[0]
        guarded += np.std(d.astype(np.float64), ddof=1) <= 1
        for rule in (True, False):
            assert E.select_heads(d.tolist(), ta.tolist(), rule) == spec_select(d, ta, rule)
    assert guarded > 30  # the guard's branch was exercised


def test_scale_heads_only_touches_selected_slices():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(5, 4 * 8)).astype(np.float32)  # 5 tokens, 4 heads of dim 8
    ref = data.copy()
    E.scale_heads(data, [1, 3], 4, 2.5)
    ref[:, 8:16] *= 2.5
    ref[:, 24:32] *= 2.5
    np.testing.assert_array_equal(data, ref)


def test_auto_layers_rule():
    assert E.auto_layers(32) == [1] + list(range(18, 32))
    assert E.auto_layers(8) == [1, 4, 5, 6, 7]
    assert E.auto_layers(40) == [1] + list(range(26, 40))  # as released: the last 14, whatever the depth
    assert E.auto_layers(16) == list(range(1, 16))  # 1 + 2..15
    assert E.auto_layers(15) == [1] + list(range(8, 15))  # shallower: round(14 * 15 / 32) = 7 last layers
    for n in range(1, 81):
        assert E.auto_layers(n) == auto_layers(n)


def test_t_vhd_sums_top_k_per_layer():
    rows = [[1.0, 5.0, 3.0, 2.0], [0.5, 0.25, 4.0, 1.0]]
    assert E.t_vhd(rows, 2) == pytest.approx((5 + 3) + (4 + 1))
    assert E.t_vhd(rows, 10) == pytest.approx(11 + 5.75)


def test_parse_layers():
    assert parse_layers("1,18-31", 32) == [1] + list(range(18, 32))
    assert parse_layers("auto", 8) == [1, 4, 5, 6, 7]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers(" 3 , 1,1 ", 8) == [1, 3]
    assert format_layers([1, 4, 5, 6, 7, 9]) == "1,4-7,9"
    for bad in ("x", "1,", "5-2", "1-", "99", "-1"):
        with pytest.raises(ConfigError):
            parse_layers(bad, 8)


def test_top_heads_hand_computed():
    d = [0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.4, 0.8]
    ta = [1.0] * 8
    assert E.select_heads(d, ta, count=1) == [3]
    assert E.select_heads(d, ta, count=2) == [3, 7]
    assert E.select_heads(d, ta, count=3) == [3, 5, 7]
    # with 8 distinct values, the top 4 are exactly the median rule's heads
    assert E.select_heads(d, ta, count=4) == E.select_heads(d, ta) == [1, 3, 5, 7]
    assert E.select_heads(d, ta, count=8) == E.select_heads(d, ta, count=20) == list(range(8))
    # ties: the lower index first (the median rule would take only head 3 here)
    assert E.select_heads([1.0, 2.0, 2.0, 3.0], [0.0] * 4, count=2) == [1, 3]
    assert E.select_heads([2.0] * 6, [0.0] * 6, count=2) == [0, 1]
    # the outlier rule zeroes head 7's D first (as in test_outlier_needs_both_d_and_ta_high)
    d2, ta2 = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 10.0], [1.0] * 7 + [10.0]
    assert E.select_heads(d2, ta2, count=2) == [5, 6]
    assert E.select_heads(d2, ta2, outlier_rule=False, count=2) == [6, 7]
