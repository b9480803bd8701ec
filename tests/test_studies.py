"""The issue-19 study's own pieces: the oracle probe's teacher-forced single-head log-probs
against the engine with those heads forced, and the head choices made from its scores."""

from __future__ import annotations

import numpy as np
import pytest

from vhr_edge.studies.probe import oracle_heads, random_like

from conftest import scene


def test_oracle_heads_hand_computed():
    score = np.array([[0.3, -0.2, -0.5, -0.2],
                      [0.1, 0.2, 0.0, 0.4],
                      [-0.1, -0.1, -0.3, 0.0]])
    assert oracle_heads(score, [0, 1, 2], 1) == {0: [2], 1: [], 2: [2]}  # only heads that lower it
    assert oracle_heads(score, [0, 2], 2) == {0: [1, 2], 2: [0, 2]}  # ties: lower index first
    assert oracle_heads(score, [0], 4) == {0: [1, 2, 3]}


def test_random_like_keeps_counts_and_is_seeded():
    heads = {1: [2, 5], 4: [0], 6: []}
    a, b = random_like(heads, 8, 3), random_like(heads, 8, 3)
    assert a == b and {l: len(h) for l, h in a.items()} == {1: 2, 4: 1, 6: 0}
    assert any(random_like(heads, 8, s) != a for s in range(4, 10))


def test_probe_matches_the_engine_with_the_head_forced(tiny, session):
    """The PyTorch probe's log-probability of the first caption token, with head (l, h)
    scaled by alpha at every position, equals the engine's with VHR forced to that head."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vhr_edge import DEFAULT_PROMPT
    from vhr_edge.studies.probe import Prober

    img = scene(1)
    tokens = session.caption(img, DEFAULT_PROMPT, vhr=False, n_predict=6, ignore_eos=True).tokens
    p = Prober(session, str(tiny[0]), DEFAULT_PROMPT, threads=2)
    out = p.single_head_logprobs(img, tokens, [0, 3], alpha=2.0)
    assert out["heads"].shape == (8, 4, 2) and out["argmax_agree"] == 1.0

    def engine_lp(**vhr):
        r = session.caption(img, DEFAULT_PROMPT, n_predict=1, keep_logits=True, **vhr)
        lg = r.first_logits.astype(np.float64)
        return lg[tokens[0]] - lg.max() - np.log(np.exp(lg - lg.max()).sum())

    assert out["base"][0] == pytest.approx(engine_lp(vhr=False), abs=2e-3)
    changed = 0
    for l, h in ((1, 0), (4, 3), (7, 2)):
        want = engine_lp(layers=str(l), alpha=2.0, forced_heads={l: [h]})
        assert out["heads"][l, h, 0] == pytest.approx(want, abs=2e-3)
        changed += abs(want - out["base"][0]) > 1e-2
    assert changed  # the check can tell a scaled head from none
