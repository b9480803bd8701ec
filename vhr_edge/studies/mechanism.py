"""Issue 19: does VHR's mechanism exist in the testbed, and what could head reinforcement achieve?

    python -m vhr_edge.studies.mechanism STAGE [--out results/mechanism] [--docs docs] [-t 1]

STAGE: trace, search, probe, oracle, heldout, ceiling, report, card, or all (in that order).
The stages and what they run: mechanism_runs.py; the tables and plots: mechanism_report.py;
the write-up: docs/mechanism.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import mechanism_report as R
from . import mechanism_runs as M

STAGES = ("trace", "search", "probe", "oracle", "heldout", "ceiling", "report", "card")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vhr_edge.studies.mechanism", description=M.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES + ("all",))
    p.add_argument("--out", type=Path, default=M.ROOT / "results" / "mechanism")
    p.add_argument("--docs", type=Path, default=M.ROOT / "docs")
    p.add_argument("-t", "--threads", type=int, default=1)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("VHR_EDGE_MODEL", None)
    run = {"trace": lambda: M.stage_trace(a.out, a.threads), "search": lambda: M.stage_search(a.out, a.threads),
           "probe": lambda: M.stage_probe(a.out, a.threads), "oracle": lambda: M.stage_oracle(a.out, a.threads),
           "heldout": lambda: M.stage_heldout(a.out, a.threads), "ceiling": lambda: M.stage_ceiling(a.out, a.threads),
           "report": lambda: R.report(a.out, a.docs, a.threads), "card": lambda: R.update_card(a.out, M.ROOT / "models")}
    for stage in STAGES if a.stage == "all" else (a.stage,):
        run[stage]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
