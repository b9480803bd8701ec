"""The model card is rendered from testbed_metrics.json: targets judged from the numbers, and
the history ends at the release that made the shipped files."""

import copy
import json
import re
from pathlib import Path

import pytest

from vhr_edge.testbed.card import TARGETS, history, release_name, render_card

METRICS = Path(__file__).resolve().parent.parent / "models" / "testbed_metrics.json"


@pytest.fixture(scope="module")
def metrics():
    if not METRICS.exists():
        pytest.skip("models/testbed_metrics.json is not in this checkout")
    return json.loads(METRICS.read_text())


def test_targets_follow_the_numbers(metrics):
    m = copy.deepcopy(metrics)
    m["F16"]["counterfactual"]["recall"] = 0.81
    m["F16"]["indist"]["colour_acc"] = 0.5
    card = render_card(m)
    assert "- counterfactual recall >= 0.8: 0.810 met" in card
    assert "- indist colour_acc >= 0.8: 0.500 NOT met" in card
    assert "Status: misses indist colour_acc." in card
    for (split, key), (op, val) in TARGETS.items():
        m["F16"][split][key] = val
    assert "Status: all four targets met." in render_card(m)


def test_history_ends_at_this_release(metrics):
    plan = metrics["train"]["plan"]
    name = release_name(plan)
    card = render_card(metrics)
    lines = history(name)
    assert lines[-1] in card and f"- {name} (this one):" in card
    assert sum("(this one)" in line for line in card.splitlines()) == 1
    later = {"v1": "- v2", "v2": "- v3", "v3": "- v4"}[name]
    assert later not in "\n".join(lines)
    v2 = {**{k: v for k, v in plan.items() if k != "unbiased_share"}, "qa_share_late": 0.6}
    assert release_name(v2) == "v2" and release_name({**v2, "unbiased_share": 0.0}) == "v2"
    assert release_name({k: v for k, v in v2.items() if k != "qa_share_late"}) == "v1"
    assert release_name({**v2, "unbiased_share": 0.05}) == "v3"


def test_card_lists_every_shipped_file(metrics):
    card = render_card(metrics)
    for name, size in metrics["files"].items():
        if not name.startswith("."):
            assert re.search(rf"\| `{re.escape(name)}` \| {size:,} \|", card)
