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


def test_mechanism_section_says_what_the_intervals_say():
    from vhr_edge.testbed.card import mechanism_lines

    mech = {"tvhd": [{"file": "F16", "split": "counterfactual", "auroc": 0.62, "ci": [0.54, 0.7], "n_real": 344,
                      "n_hall": 61}],
            "heldout": {"split": "counterfactual, seed 1000, 200 scenes",
                        "greedy": {"chair_s": 0.27, "chair_i": 0.15, "recall": 0.86},
                        "rows": [{"name": "vhr-a2-L1,4-7", "chair_s": 0.26, "recall": 0.86, "d_chair_s": -0.01,
                                  "ci": [-0.05, 0.03], "d_vs_random_ci": [-0.04, 0.04]},
                                 {"name": "oracle-per-image", "chair_s": 0.2, "recall": 0.85, "d_chair_s": -0.07,
                                  "ci": [-0.1, -0.04], "d_vs_random_ci": None}]}}
    text = "\n".join(mechanism_lines(mech))
    assert "| F16 | counterfactual | 344 / 61 | 0.620 [0.540, 0.700] |" in text
    assert "interval above 0.5, on: F16 counterfactual." in text
    assert "cannot show VHR's effect" in text and "Only the per-image oracle (oracle-per-image)" in text
    mech["heldout"]["rows"][0]["ci"] = [-0.08, -0.01]  # a fair setting below greedy beyond the interval
    text = "\n".join(mechanism_lines(mech))
    assert "cannot show" not in text and "Settings below greedy beyond the interval: vhr-a2-L1,4-7" in text
