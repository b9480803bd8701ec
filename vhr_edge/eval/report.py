"""`vhr-edge eval report DIR`: every CHAIR run in one results folder side by side, with
bootstrap intervals, and each method's difference to a baseline on the same images.

    vhr-edge eval report results/cf [--baseline greedy] [--bootstrap 1000] [--seed 0] [--json] [--md FILE]

Reads DIR/chair-TAG.jsonl (written by `eval chair`, so greedy, VHR and control runs that share
DIR share their image ids). Per method: CHAIR_S, CHAIR_I and recall with 95% percentile
intervals from resampling images (CHAIR_I and recall are ratios of sums: each resample sums
the counts of its images again). Against the baseline, the differences are PAIRED: one
resample of image ids is applied to both methods, over the ids both runs finished. Rows hold
the mentions recorded in the JSONL (the matching rules of the run that wrote them); failed rows
(`{"image_id", "error", "tries"}`, a unit that failed on every try) are not captions and are left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConfigError
from . import stats

METRICS = stats.METRICS


def _rows(recs: list[dict]) -> np.ndarray:
    """stats.chair_rows of recorded lines: their mentions against their own ground truth."""
    per = []
    for rec in recs:
        gt = set(rec["gt_objects"])
        per.append({"mentioned": rec["mentioned"], "hallucinated": rec["hallucinated"],
                    "hit": [c for c in rec["mentioned"] if c in gt], "n_gt": len(gt)})
    return stats.chair_rows(per)


def read_runs(out: Path) -> dict[str, dict[str, dict]]:
    """{tag: {image_id: record}} for every chair-TAG.jsonl in the folder."""
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a results folder")
    runs = {}
    for path in sorted(out.glob("chair-*.jsonl")):
        tag = path.name[len("chair-"):-len(".jsonl")]
        recs = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "error" in rec:  # a unit that failed on every try (eval/run.py): not a caption
                    continue
                _rows([rec])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path} line {n} is not a CHAIR result line") from None
            recs[str(rec["image_id"])] = rec  # a later success of a failed id follows its failed row
        if recs:
            runs[tag] = recs
    if not runs:
        raise ConfigError(f"no CHAIR runs (chair-*.jsonl) in {out}")
    return runs


def report(runs: dict[str, dict[str, dict]], baseline: Optional[str] = "greedy", n_boot: int = 1000,
           seed: int = 0) -> dict:
    """{"baseline", "n_boot", "methods": {tag: {"n", metric: {"value", "ci"}, "vs_baseline": {...}}}}."""
    if baseline is not None and baseline not in runs:
        raise ConfigError(f"no run tagged {baseline!r} (runs: {', '.join(runs)})")
    r4 = lambda x: round(float(x), 4)  # noqa: E731
    out: dict = {"baseline": baseline, "n_boot": n_boot, "seed": seed, "methods": {}}
    for tag, recs in runs.items():
        ids = sorted(recs)
        ci = stats.chair_ci(_rows([recs[i] for i in ids]), n_boot, seed)
        row = {"n": len(ids), "mean_len": r4(np.mean([len(recs[i]["caption"].split()) for i in ids]))}
        for m in METRICS:
            row[m] = {"value": r4(ci[m]["estimate"]), "ci": [r4(x) for x in ci[m]["ci"]]}
        if baseline is not None and tag != baseline:
            common = sorted(set(recs) & set(runs[baseline]))
            if common:
                d = stats.chair_paired_diff(_rows([recs[i] for i in common]),
                                            _rows([runs[baseline][i] for i in common]), n_boot, seed)
                row["vs_baseline"] = {"n": len(common), **{
                    m: {"estimate": r4(d[m]["estimate"]), "ci": [r4(x) for x in d[m]["ci"]],
                        "beyond_interval": d[m]["below_zero"] or d[m]["above_zero"]} for m in METRICS}}
        out["methods"][tag] = row
    return out


def markdown(rep: dict) -> str:
    base = rep["baseline"]
    head = "| method | n | CHAIR_S [95% CI] | CHAIR_I [95% CI] | recall [95% CI] | words |"
    rule = "|---|---|---|---|---|---|"
    if base:
        head += f" ΔCHAIR_S vs {base} [paired 95% CI] | ΔCHAIR_I | Δrecall |"
        rule += "---|---|---|"
    lines = [head, rule]
    fmt = lambda x: f"{x['value']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"  # noqa: E731
    dfmt = lambda x: (f"{x['estimate']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"  # noqa: E731
                      + (" *" if x["beyond_interval"] else ""))
    for tag, r in rep["methods"].items():
        cells = [tag, str(r["n"]), *(fmt(r[m]) for m in METRICS), f"{r['mean_len']:.1f}"]
        if base:
            v = r.get("vs_baseline")
            cells += [dfmt(v[m]) for m in METRICS] if v else ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if base:
        lines.append("")
        lines.append(f"`*`: the paired interval excludes 0 ({rep['n_boot']} resamples of the images both runs share).")
    return "\n".join(lines) + "\n"


def register(evsub) -> None:
    rp = evsub.add_parser("report", help="all CHAIR runs of a results folder side by side, with bootstrap intervals")
    rp.add_argument("out", metavar="DIR", help="results folder of `eval chair` runs")
    rp.add_argument("--baseline", default="greedy", help="method tag the others are compared with (default greedy; "
                                                         "'none': no comparison)")
    rp.add_argument("--bootstrap", type=int, default=1000, help="resamples over images (1000)")
    rp.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    rp.add_argument("--md", type=Path, help="also write the markdown table to this file")
    rp.add_argument("--json", action="store_true", help="print the report as one JSON object")
    rp.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    if args.bootstrap < 10:
        raise ConfigError(f"--bootstrap must be at least 10, got {args.bootstrap}")
    base = None if args.baseline.lower() == "none" else args.baseline
    rep = report(read_runs(Path(args.out)), base, args.bootstrap, args.seed)
    md = markdown(rep)
    if args.md:
        args.md.write_text(md)
    if args.json:
        print(json.dumps(rep))
    else:
        sys.stdout.write(md)
    return 0
