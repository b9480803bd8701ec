"""`vhr-edge eval chair|pope`: hallucination numbers for one model and one method.

    vhr-edge eval chair [--testbed SPLIT | --images DIR --annotations FILE [--captions FILE]]
                        [--seed S] [-n N] [-m MODEL --mmproj M] [--no-vhr] [--alpha A] [--layers L]
                        --out DIR [--tag TAG] [--json] [--ray HOST:PORT [--workers N] [--ship-images] ...]
    vhr-edge eval pope  [--split random|popular|adversarial|all] (same data / model / method flags)
    vhr-edge eval report DIR [--baseline greedy]   (every CHAIR run in DIR, bootstrap intervals, paired deltas)

Data default: the testbed's counterfactual split, seed 1000, 500 scenes. --alpha/--layers
override a VHR profile (--profile FILE, or <model stem>.vhr-profile.json beside the model
unless --no-profile); a profile's layers show up in the tag. The method tag
(default "greedy" or "vhr-a2", "...-L1,4-7", "-random", "-nooutlier", "-joint") names the result files
in --out, so greedy and VHR runs share one folder and one ids.json. A killed run started again
with the same flags continues where it stopped. --json prints the summary object as the last
line of stdout; the progress bar goes to stderr.

--ray ADDRESS runs the captions on Ray actors of an existing cluster (docs/cluster.md); this
process still writes the same files, bar and summary, and a run may be resumed either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import cluster, flags
from ..errors import ConfigError, VhrEdgeError
from . import CHAIR_MAX_TOKENS, POPE_MAX_TOKENS, pope
from .data import add_data_args
from .report import register as register_report


def register(sub) -> None:
    """Add `eval` (with `chair` and `pope`) to the `vhr-edge` subcommands."""
    ev = sub.add_parser("eval", help="hallucination evaluation: CHAIR (captions) and POPE (yes/no questions)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evsub = ev.add_subparsers(dest="eval_command", required=True, parser_class=flags.Parser,
                              metavar="{chair,pope,report}")

    ch = evsub.add_parser("chair", help="caption images, count hallucinated objects (CHAIR_S, CHAIR_I, recall)")
    add_data_args(ch, captions=True)
    flags.add_model_args(ch)
    flags.add_vhr_args(ch)
    g = ch.add_argument_group("generation")
    g.add_argument("-p", "--prompt", default=None, help="instruction (default: 'Please describe this image in detail.')")
    g.add_argument("--max-tokens", type=int, default=CHAIR_MAX_TOKENS, help=f"max new tokens per caption ({CHAIR_MAX_TOKENS})")
    _add_out_args(ch)
    cluster.add_args(ch)
    ch.set_defaults(func=cmd_chair)

    pp = evsub.add_parser("pope", help="ask 'Is there a X in the image?', score yes/no answers (accuracy, F1, yes-ratio)")
    pp.add_argument("--split", choices=list(pope.POPE_SPLITS) + ["all"], default="all",
                    help="POPE negative sampling: random, popular, adversarial or all (default)")
    pp.add_argument("--per-image", type=int, default=pope.N_POS,
                    help=f"positive (and as many negative) questions per image ({pope.N_POS})")
    add_data_args(pp, captions=False)
    flags.add_model_args(pp)
    flags.add_vhr_args(pp)
    g = pp.add_argument_group("generation")
    g.add_argument("--suffix", default="", help="text appended to each question (e.g. 'Answer yes or no.')")
    g.add_argument("--max-tokens", type=int, default=POPE_MAX_TOKENS, help=f"max new tokens per answer ({POPE_MAX_TOKENS})")
    _add_out_args(pp)
    cluster.add_args(pp)
    pp.set_defaults(func=cmd_pope)

    register_report(evsub)


def _add_out_args(p) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="DIR", help="results folder (JSONL, ids.json, summary)")
    g.add_argument("--tag", default=None, help="name of this method's files (default from the VHR flags)")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object, the last stdout line")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def make_source(args):
    """The data source from the flags (validated before any model is loaded)."""
    from .data import source_from_args

    return source_from_args(args, args.n, args.seed)


def method_configs(args):
    from ..layers import parse_layers
    from ..session import GenerationConfig

    if args.alpha is not None and not (args.alpha > 0):
        raise ConfigError(f"--alpha must be > 0, got {args.alpha}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.layers is not None:
        parse_layers(args.layers, 10_000)  # syntax only; the model's depth is checked when captioning
    if args.tag:
        method_tag(args)  # a bad --tag is reported before the model is looked at
    vhr = flags.vhr_config(args)  # flag > --profile > profile beside the model > alpha 2, layers auto
    gen = GenerationConfig(n_predict=args.max_tokens)
    return vhr, gen


def method_tag(args) -> str:
    return flags.method_tag(args)


def _out_dir(args) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    return out


def cmd_chair(args) -> int:
    from .. import DEFAULT_PROMPT
    from .run import captioner_for, run_chair

    cluster.check_args(args)
    source = make_source(args)
    vhr, gen = method_configs(args)
    tag = method_tag(args)
    out = _out_dir(args)
    prompt = args.prompt or DEFAULT_PROMPT
    session = cluster.open_runner(args)
    try:
        settings = flags.run_settings(session, vhr, gen, prompt=prompt)
        summary = run_chair(source, out, captioner_for(session, prompt, vhr, gen), tag=tag,
                            settings=settings, progress=not args.no_progress)
    finally:
        session.close()
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"CHAIR {tag} on {_describe(source)}: CHAIR_S {100 * summary['chair_s']:.1f}  "
              f"CHAIR_I {100 * summary['chair_i']:.1f}  recall {100 * summary['recall']:.1f}  "
              f"mean length {summary['mean_len']:.1f} words  (n={summary['n']}; {out}/chair-{tag}.*)", flush=True)
    _check_failed(summary, out / f"chair-{tag}.summary.json")
    return 0


def _check_failed(summary: dict, path: Path) -> None:
    if summary.get("n_failed"):
        raise VhrEdgeError(f"{summary['n_failed']} units failed on every try and are left out of the scores "
                           f"(their errors: {path}); run the same command again to retry them")


def cmd_pope(args) -> int:
    from .run import answerer_for, run_pope

    if args.per_image < 1:
        raise ConfigError(f"--per-image must be at least 1, got {args.per_image}")
    cluster.check_args(args)
    source = make_source(args)
    vhr, gen = method_configs(args)
    tag = method_tag(args)
    out = _out_dir(args)
    splits = list(pope.POPE_SPLITS) if args.split == "all" else [args.split]
    session = cluster.open_runner(args)
    try:
        settings = flags.run_settings(session, vhr, gen, suffix=args.suffix)
        result = run_pope(source, out, answerer_for(session, vhr, gen, args.suffix), splits, seed=args.seed,
                          n_pos=args.per_image, tag=tag, settings=settings, progress=not args.no_progress)
    finally:
        session.close()
    failed = {"n_failed": result.pop("n_failed")} if "n_failed" in result else {}
    if args.json:
        print(json.dumps({**result, **failed}), flush=True)
    else:
        print(f"POPE {tag} on {_describe(source)} ({out}/pope-{tag}.*)")
        print(f"{'split':<12} {'n':>5} {'acc':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'yes':>6}")
        for name, m in result.items():
            print(f"{name:<12} {m['n']:>5} {100 * m['accuracy']:>6.1f} {100 * m['precision']:>6.1f} "
                  f"{100 * m['recall']:>6.1f} {100 * m['f1']:>6.1f} {100 * m['yes_ratio']:>6.1f}")
        sys.stdout.flush()
    _check_failed(failed, out / f"pope-{tag}.summary.json")
    return 0


def _describe(source) -> str:
    d = source.describe()
    if d["kind"] == "testbed":
        return f"testbed {d['split']} seed {d['seed']}, {d['n']} scenes"
    return f"{Path(d['annotations']).name}, {d['n']} images (seed {d['seed']})"
