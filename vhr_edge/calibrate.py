"""`vhr-edge calibrate`: pick a model's VHR layer set and alpha on held-out calibration images.

    vhr-edge calibrate [-m MODEL --mmproj M] [--split calibration] [-n 100] [--seed 2000]
                       [--alphas 1.5,2,3] [--bands 4] [--max-tokens 512] [--bootstrap 1000]
                       [--out DIR] [--profile-out FILE] [--json]
    vhr-edge calibrate --images DIR --annotations FILE --exclude-ids EVAL_OUT/ids.json ...

The sweep (greedy decoding throughout): greedy; the paper rule ("auto" layers, alpha 2); for
every alpha, the layer sets of `profile_rule.candidate_layer_sets` (contiguous bands, early half, late half,
the paper rule, all layers). Each setting is one resumable CHAIR run (`eval.run.run_chair`:
DIR/chair-TAG.jsonl, one shared DIR/ids.json); a killed calibration started again continues.

Data: a CALIBRATION split that never overlaps evaluation ids. Testbed: counterfactual scenes
(`--split calibration`, or any testbed split) drawn with --seed (2000; the evaluation seed
1000 is refused), checked to share no id with the evaluation draw of the same split. COCO
format: ids drawn from the annotations file after removing every id of --exclude-ids (an
evaluation run's ids.json), checked again after the draw.

Selection (`profile_rule.choose`, a pure function of the sweep table): see OBJECTIVE. Then the random-heads
control (same layers, alpha and head counts per layer; heads chosen at random) is run for the
chosen setting and shown next to it; a setting other than the paper rule is adopted only if it
also beats its control beyond the bootstrap uncertainty. Writes the profile (beside the model,
or --profile-out) and DIR/sweep.md + DIR/sweep.json.

--ray ADDRESS captions on the Ray actors of an existing cluster (one model loaded per actor,
kept for every setting); this process writes the same files (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import ConfigError, VhrEdgeError
from .templates import LLAVA_15
from .profile_rule import (DEFAULT_ALPHAS, MAX_LEN_CHANGE, MAX_RECALL_DROP, OBJECTIVE, Decision, Setting,
                           choose, objective_text, sweep_settings)

CAL_SPLIT = "calibration"  # counterfactual scenes at the calibration seed
CAL_SEED = 2000
CAL_N = 100


# ---- data ----------------------------------------------------------------------------------


def read_ids_file(path) -> list:
    """Ids from an ids.json written by `vhr-edge eval` ({"ids": [...]}) or a plain JSON list."""
    from .eval.data import DataError, _read_json

    d = _read_json(Path(path), "ids file")
    ids = d.get("ids") if isinstance(d, dict) else d
    if not isinstance(ids, list):
        raise DataError(f"ids file {path} holds neither a list of ids nor an ids.json of vhr-edge eval")
    return ids


def check_disjoint(cal_ids, eval_ids, what: str = "evaluation") -> None:
    """Refuse a calibration set that shares an image id with an evaluation set."""
    shared = sorted({str(i) for i in cal_ids} & {str(i) for i in eval_ids})
    if shared:
        raise ConfigError(f"the calibration images overlap the {what} images ({len(shared)} shared ids, "
                          f"first: {shared[0]}); use another --seed or --exclude-ids")


def calibration_source(args):
    """The calibration data source from the flags, checked disjoint from the evaluation ids."""
    from .eval import DEFAULT_N, DEFAULT_SEED
    from .eval.data import CocoSource, TestbedSource
    from .testbed import SPLITS

    if args.n < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n}")
    excluded: list = []
    for f in args.exclude_ids or []:
        excluded += read_ids_file(f)
    if args.images is not None or args.annotations is not None:
        if args.split is not None:
            raise ConfigError("--split is for testbed scenes; COCO-format data takes --images/--annotations")
        if args.images is None or args.annotations is None:
            raise ConfigError("COCO-format data needs both --images DIR and --annotations FILE")
        if not args.exclude_ids:
            raise ConfigError("COCO-format calibration needs --exclude-ids FILE (the evaluation run's ids.json), "
                              "so that calibration and evaluation images are disjoint")
        src = CocoSource(args.images, args.annotations, n=args.n, seed=args.seed, captions=args.captions,
                         exclude=excluded)
    else:
        if args.captions:
            raise ConfigError("--captions goes with --images/--annotations")
        split = args.split or CAL_SPLIT
        if split != CAL_SPLIT and split not in SPLITS:
            raise ConfigError(f"unknown --split {split!r}; one of {CAL_SPLIT}, {', '.join(SPLITS)}")
        scenes = "counterfactual" if split == CAL_SPLIT else split
        if args.seed == DEFAULT_SEED:
            raise ConfigError(f"--seed {DEFAULT_SEED} draws the evaluation scenes; calibrate on another seed "
                              f"(default {CAL_SEED})")
        src = TestbedSource(scenes, n=args.n, seed=args.seed, size=args.size)
        eval_ids = TestbedSource(scenes, n=max(DEFAULT_N, args.n), seed=DEFAULT_SEED, size=args.size).ids
        check_disjoint(src.ids, eval_ids, f"evaluation (testbed {scenes}, seed {DEFAULT_SEED})")
    if excluded:
        check_disjoint(src.ids, excluded, "--exclude-ids")
    return src, excluded


# ---- running ------------------------------------------------------------------------------


def _done_keys(path: Path) -> set:
    """Ids already in a run's JSONL (complete lines only), for the progress bar."""
    done = set()
    if path.exists():
        for line in path.read_bytes().split(b"\n")[:-1]:
            try:
                rec = json.loads(line)
                if "error" not in rec:  # a failed row (eval.run.Failed) is tried again
                    done.add(str(rec["image_id"]))
            except (ValueError, KeyError, TypeError):
                pass
    return done


class Sweep:
    """Runs settings on one session and source into one folder; rows for `choose`."""

    def __init__(self, session, source, out: Path, prompt: str, gen, bar=None):
        self.session, self.source, self.out, self.prompt, self.gen, self.bar = session, source, out, prompt, gen, bar
        self.rows: dict[str, dict] = {}

    def run(self, s: Setting) -> dict:
        from .eval import chair
        from .flags import run_settings
        from .eval.run import captioner_for, run_chair

        vhr = s.vhr_config()
        keys = {it.key for it in self.source.items}
        path = self.out / f"chair-{s.key}.jsonl"
        if self.bar is not None:
            self.bar.set_description_str(s.key)
            self.bar.update(len(_done_keys(path) & keys))
        settings = run_settings(self.session, vhr, self.gen, prompt=self.prompt)
        summary = run_chair(self.source, self.out, captioner_for(self.session, self.prompt, vhr, self.gen),
                            tag=s.key, settings=settings, progress=False,
                            on_result=None if self.bar is None else lambda: self.bar.update(1))
        if summary.get("n_failed"):
            raise VhrEdgeError(f"{summary['n_failed']} captions of setting {s.key} failed on every try "
                               f"(their errors: {self.out}/chair-{s.key}.summary.json); run the same command "
                               "again to retry them")
        recs = {}
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if "error" not in rec:
                    recs.setdefault(str(rec["image_id"]), rec)
        vocab = self.source.vocab
        hall = [int(bool(chair.score_caption(recs[it.key]["caption"], it.gt, vocab)["hallucinated"]))
                for it in self.source.items]
        row = {"key": s.key, "name": s.name, "layers": s.layers, "alpha": s.alpha, "random": s.random,
               **{k: summary[k] for k in ("n", "chair_s", "chair_i", "recall", "mean_len")}, "hall": hall}
        self.rows[s.key] = row
        return row


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def sweep_markdown(rows: Sequence[dict], greedy: dict, controls: dict, d: Decision, paper_key: str,
                   objective: str = OBJECTIVE) -> str:
    from .layers import format_layers

    head = ("| setting | layers | alpha | CHAIR_S | 95% CI | CHAIR_I | recall | Δ recall | words | Δ words | "
            "constraints | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|")

    def line(r, note=""):
        layers = "-" if r["layers"] is None else format_layers(r["layers"])
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        dr = r["recall"] - greedy["recall"]
        dl = (r["mean_len"] - greedy["mean_len"]) / greedy["mean_len"] if greedy["mean_len"] else 0.0
        ok = "-" if r is greedy or r.get("random") else ("ok" if not d.violations.get(r["key"]) else "no")
        notes = [n for n in (
            "**chosen**" if r["key"] == d.chosen else "",
            "paper rule" if r["key"] == paper_key else "",
            "best meeting constraints" if r["key"] == d.candidate and r["key"] != d.chosen else "",
            note) if n]
        return (f"| {r['name'] if not r.get('random') else 'random heads'} | {layers} | {alpha} | {r['chair_s']:.3f} | "
                f"{_fmt_ci(d.ci.get(r['key'], [float('nan')] * 2))} | {r['chair_i']:.3f} | {r['recall']:.3f} | "
                f"{dr:+.3f} | {r['mean_len']:.1f} | {100 * dl:+.1f}% | {ok} | {', '.join(notes)} |")

    lines = [head, line(greedy, "baseline")]
    for r in rows:
        lines.append(line(r))
        if r["key"] in controls:
            lines.append(line(controls[r["key"]], f"control for {r['key']}"))
    out = "\n".join(lines)
    out += f"\n\nObjective: {objective}\n\nDecision: **{d.chosen}** — {d.reason}.\n"
    if d.diff_vs_paper:
        out += (f"\nCHAIR_S(candidate {d.candidate}) - CHAIR_S(paper rule): {d.diff_vs_paper['estimate']:+.3f}, "
                f"95% CI {_fmt_ci(d.diff_vs_paper['ci'])}\n")
    for label, key, diff in (("candidate", d.candidate, d.candidate_vs_control), ("chosen", d.chosen, d.chosen_vs_control)):
        if diff and not (label == "candidate" and key == d.chosen):
            out += (f"\nCHAIR_S({label} {key}) - CHAIR_S(its random heads): {diff['estimate']:+.3f}, "
                    f"95% CI {_fmt_ci(diff['ci'])}\n")
    for w in d.warnings:
        out += f"\nWarning: {w}.\n"
    return out


def _metrics(r: Optional[dict], ci: dict) -> Optional[dict]:
    if r is None:
        return None
    return {"key": r["key"], "layers": r["layers"], "alpha": r["alpha"], "n": r["n"], "chair_s": r["chair_s"],
            "chair_s_ci95": ci.get(r["key"]), "chair_i": r["chair_i"], "recall": r["recall"], "mean_len": r["mean_len"]}


def parse_alphas(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--alphas must be numbers separated by commas, got {text!r}") from None
    if not vals or any(not (v > 0) or v != v or v == float("inf") for v in vals):
        raise ConfigError(f"--alphas must be numbers > 0, got {text!r}")
    return sorted(set(vals))


def register(sub) -> None:
    from . import cluster, flags
    from .testbed import SPLITS

    p = sub.add_parser("calibrate", help="sweep VHR layer sets x alphas on held-out images; write a VHR profile",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_args(p)
    g = p.add_argument_group("calibration data (never the evaluation images)")
    g.add_argument("--split", default=None, metavar="SPLIT",
                   help=f"testbed scenes: {CAL_SPLIT} (= counterfactual scenes at --seed; default) or one of "
                        f"{', '.join(SPLITS)}")
    g.add_argument("--seed", type=int, default=CAL_SEED,
                   help=f"testbed scene seed / COCO id draw seed ({CAL_SEED}; the evaluation seed 1000 is refused)")
    g.add_argument("-n", type=int, default=CAL_N, help=f"calibration images ({CAL_N})")
    g.add_argument("--size", type=int, default=64, help="testbed render size in pixels (64)")
    g.add_argument("--images", metavar="DIR", help="folder of COCO-format images")
    g.add_argument("--annotations", metavar="FILE", help="COCO instances JSON")
    g.add_argument("--captions", metavar="FILE", help="COCO captions JSON (objects of reference captions join the truth)")
    g.add_argument("--exclude-ids", action="append", metavar="FILE",
                   help="ids never used for calibration: an evaluation run's ids.json or a JSON list "
                        "(repeatable; required for COCO-format data)")
    g = p.add_argument_group("sweep and selection")
    g.add_argument("--alphas", default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
                   help="alpha values to sweep (default 1.5,2,3; the paper rule at alpha 2 is always included)")
    g.add_argument("--bands", type=int, default=4, help="number of contiguous layer bands (default 4: quarters)")
    g.add_argument("-p", "--prompt", default=None, help="instruction (default: 'Please describe this image in detail.')")
    g.add_argument("--max-tokens", type=int, default=512, help="max new tokens per caption (512)")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over images (1000)")
    g.add_argument("--bootstrap-seed", type=int, default=0, help="bootstrap seed (0)")
    g.add_argument("--max-recall-drop", type=float, default=MAX_RECALL_DROP,
                   help=f"constraint: recall at most this far below greedy ({MAX_RECALL_DROP})")
    g.add_argument("--max-len-change", type=float, default=MAX_LEN_CHANGE,
                   help=f"constraint: mean length within this fraction of greedy's ({MAX_LEN_CHANGE})")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None,
                   help="folder for the runs and the sweep table (default results/calibrate/<model stem>)")
    g.add_argument("--profile-out", type=Path, default=None,
                   help="where to write the profile (default: <model stem>.vhr-profile.json beside the model)")
    g.add_argument("--json", action="store_true", help="print the decision as one JSON object, the last stdout line")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    cluster.add_args(p)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from . import DEFAULT_PROMPT, __version__, cluster, flags
    from .eval.run import _progress, _write_json
    from .layers import auto_layers
    from .profile import Profile, ids_sha256, profile_for_model, save_profile
    from .session import GenerationConfig

    alphas = parse_alphas(args.alphas)
    if args.bands < 1:
        raise ConfigError(f"--bands must be at least 1, got {args.bands}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.bootstrap < 10:
        raise ConfigError(f"--bootstrap must be at least 10, got {args.bootstrap}")
    if not (0 <= args.max_recall_drop <= 1 and 0 <= args.max_len_change):
        raise ConfigError("--max-recall-drop must be in [0, 1] and --max-len-change >= 0")
    cluster.check_args(args)
    source, excluded = calibration_source(args)
    model, _ = flags.resolve_models(args)
    out = args.out or Path("results") / "calibrate" / Path(model).stem
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    profile_path = args.profile_out or profile_for_model(model)
    objective = objective_text(args.max_recall_drop, args.max_len_change)
    print(f"vhr-edge calibrate: objective: {objective}", file=sys.stderr, flush=True)

    session = cluster.open_runner(args)  # a Pool of Ray actors with --ray
    n_layer = session.n_layer
    prompt = args.prompt or DEFAULT_PROMPT
    gen = GenerationConfig(n_predict=args.max_tokens)
    settings = sweep_settings(n_layer, alphas, args.bands)
    paper_key = settings[1].key
    n_img = len(source.items)
    bar = _progress(n_img * (len(settings) + 1), 0, "calibrate", not args.no_progress)
    sweep = Sweep(session, source, out, prompt, gen, bar)
    kw = dict(n_boot=args.bootstrap, seed=args.bootstrap_seed, max_recall_drop=args.max_recall_drop,
              max_len_change=args.max_len_change)
    try:
        for s in settings:
            sweep.run(s)
        greedy = sweep.rows["greedy"]
        rows = [sweep.rows[s.key] for s in settings[1:]]
        by_key = {s.key: s for s in settings}
        controls: dict[str, dict] = {}
        d = choose(rows, greedy, paper_key, controls=controls, **kw)
        # the random-heads control: for the candidate (it must beat it), and for what is shipped
        for _ in range(2):
            need = d.control_needed or (d.chosen if d.chosen not in controls else None)
            if need is None:
                break
            if bar is not None and len(controls) >= 1:
                bar.total += n_img
                bar.refresh()
            controls[need] = sweep.run(by_key[need].control())
            d = choose(rows, greedy, paper_key, controls=controls, **kw)
    finally:
        if bar is not None:
            bar.close()
        session.close()

    chosen = next(r for r in rows if r["key"] == d.chosen)
    paper = next(r for r in rows if r["key"] == paper_key)
    md = sweep_markdown(rows, greedy, controls, d, paper_key, objective)
    (out / "sweep.md").write_text(md)
    strip = lambda r: {k: v for k, v in r.items() if k != "hall"}  # noqa: E731
    _write_json(out / "sweep.json", {
        "model": Path(model).name, "n_layer": n_layer, "objective": objective, "alphas": alphas,
        "paper_rule": paper_key, "greedy": strip(greedy), "rows": [strip(r) for r in rows],
        "random_controls": {k: strip(c) for k, c in controls.items()}, "decision": d.to_json(),
        "bootstrap": {"n": args.bootstrap, "seed": args.bootstrap_seed, "level": 0.95},
        "per_image_hallucination": {"ids": [it.image_id for it in source.items], "greedy": greedy["hall"],
                                    **{r["key"]: r["hall"] for r in [*rows, *controls.values()]}},
    })
    excl = {"n": len(excluded), "sha256": ids_sha256(excluded)} if excluded else None
    profile = Profile(
        model=Path(model).name, layers=list(chosen["layers"]), alpha=float(chosen["alpha"]), objective=objective,
        calibration={"source": source.describe(), "seed": args.seed, "n": n_img, "ids_sha256": ids_sha256(source.ids),
                     "excluded_ids": excl, "prompt": prompt, "max_tokens": args.max_tokens,
                     "split": args.split or (CAL_SPLIT if source.kind == "testbed" else None),
                     "decoding": "greedy", "sweep": str(out / "sweep.json")},
        metrics={"chosen": _metrics(chosen, d.ci), "greedy": _metrics(greedy, d.ci),
                 "paper_rule": _metrics(paper, d.ci), "random_heads": _metrics(controls.get(d.chosen), d.ci),
                 "diff_vs_paper_rule": d.diff_vs_paper, "diff_vs_random_heads": d.chosen_vs_control,
                 "kept_paper_rule": d.kept_paper, "paper_rule_layers": auto_layers(n_layer),
                 "reason": d.reason, "warnings": d.warnings,
                 "bootstrap": {"n": args.bootstrap, "seed": args.bootstrap_seed, "level": 0.95}},
        vhr_edge_version=__version__,
        prompt_template=None if session.prompt_template == LLAVA_15 else session.prompt_template,
    )
    save_profile(profile, profile_path)
    print(md)
    print(f"wrote {profile_path}, {out}/sweep.md, {out}/sweep.json", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"profile": str(profile_path), "layers": profile.layers, "alpha": profile.alpha,
                          **d.to_json()}), flush=True)
    return 0
