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
from ..profile_rule import _boot_idx

METRICS = ("chair_s", "chair_i", "recall")


def _counts(rec: dict) -> tuple[float, float, float, float, float]:
    """(has_hallucination, hallucinated mentions, mentions, ground-truth hits, ground-truth objects)."""
    gt = set(rec["gt_objects"])
    mentioned, hallucinated = rec["mentioned"], rec["hallucinated"]
    return (float(bool(hallucinated)), float(len(hallucinated)), float(len(mentioned)),
            float(sum(c in gt for c in mentioned)), float(len(gt)))


def _metrics(c: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from count rows c[..., n_images, 5] (summed over the image axis)."""
    s = c.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"chair_s": s[..., 0] / c.shape[-2],
                "chair_i": np.where(s[..., 2] > 0, s[..., 1] / np.maximum(s[..., 2], 1), 0.0),
                "recall": np.where(s[..., 4] > 0, s[..., 3] / np.maximum(s[..., 4], 1), 0.0)}


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
                _counts(rec)
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
    out: dict = {"baseline": baseline, "n_boot": n_boot, "seed": seed, "methods": {}}
    for tag, recs in runs.items():
        ids = sorted(recs)
        c = np.array([_counts(recs[i]) for i in ids])
        point = _metrics(c)
        boot = _metrics(c[_boot_idx(len(ids), n_boot, seed)])
        row = {"n": len(ids), "mean_len": round(float(np.mean([len(recs[i]["caption"].split()) for i in ids])), 2)}
        for m in METRICS:
            row[m] = {"value": round(float(point[m]), 4),
                      "ci": [round(float(np.percentile(boot[m], q)), 4) for q in (2.5, 97.5)]}
        if baseline is not None and tag != baseline:
            common = sorted(set(recs) & set(runs[baseline]))
            if common:
                a = np.array([_counts(recs[i]) for i in common])
                b = np.array([_counts(runs[baseline][i]) for i in common])
                idx = _boot_idx(len(common), n_boot, seed)  # the same resample for both: paired
                da, db = _metrics(a), _metrics(b)
                ba, bb = _metrics(a[idx]), _metrics(b[idx])
                diff = {"n": len(common)}
                for m in METRICS:
                    d = ba[m] - bb[m]
                    lo, hi = (float(np.percentile(d, q)) for q in (2.5, 97.5))
                    diff[m] = {"estimate": round(float(da[m] - db[m]), 4), "ci": [round(lo, 4), round(hi, 4)],
                               "beyond_interval": hi < 0 or lo > 0}
                row["vs_baseline"] = diff
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
