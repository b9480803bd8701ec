"""`vhr-edge trace`: T-VHD per generated token (VHR_SPEC 6), with hallucinated words marked.

    vhr-edge trace IMG [-m MODEL --mmproj M] [--objects fork,plate] [--caption TEXT] [-k 8]
                       [--no-vhr | --alpha A] [-n N_PREDICT] [--out DIR] [--json]
    vhr-edge trace --testbed SPLIT | --images DIR --annotations FILE [--captions FILE]
                   [-n N_IMAGES] [--seed S] [--max-tokens 512] [-k 8] [--no-vhr | --alpha A]
                   --out DIR [--tag TAG] [--bootstrap 1000] [--json]

T-VHD(t) = sum over layers of the top-k VHD of their heads at the position that chose token t,
against the text-only continuation (the prompt without the image + the tokens so far). It
needs that continuation decoded alongside, so it is an analysis mode (about 2x the decode).

One image: `--caption` traces a given text (teacher forcing) instead of the model's own
caption. Writes DIR/trace.json, DIR/vhd_step0.png (layers x heads, selected heads marked)
and DIR/t_vhd.png (T-VHD over tokens; object words green when present, red when hallucinated).

Batch mode (--testbed or --images/--annotations; then -n is the number of images, default
500, and --seed the scene / draw seed, default 1000, as in `vhr-edge eval`): traces the
model's own caption of every image, one JSON line each in DIR/trace-TAG.jsonl (resumable:
a killed run started again continues), then DIR/trace-TAG.summary.json: the AUROC of the
first-token T-VHD separating real from hallucinated object mentions (> 0.5: hallucinated
lower, the paper's claim) with a bootstrap 95% interval over captions, the mean T-VHD of
each group, CHAIR of the traced captions; and DIR/trace-TAG.png (both distributions).
VHR is on unless --no-vhr, as in every command; the paper's diagnostic is on plain greedy
captions: use --no-vhr (tag "greedy").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .tvhd import token_rows, trace_image  # noqa: F401  (token_rows: part of this command's API)

SINGLE_ONLY = ("objects", "caption")
BATCH_ONLY = {"max_tokens": "--max-tokens", "tag": "--tag", "bootstrap": "--bootstrap",
              "no_progress": "--no-progress", "captions": "--captions"}


def register(sub) -> None:
    from .. import flags
    from .data import add_data_args

    tp = sub.add_parser("trace", help="T-VHD per generated token, for one image or an evaluation set (AUROC)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tp.add_argument("image", metavar="IMG", nargs="?", help="one image (or use the batch mode's data flags)")
    flags.add_model_args(tp)
    flags.add_vhr_args(tp)
    flags.add_gen_args(tp)
    # -n and --seed mean "images" and "scene seed" in the batch mode: their defaults depend on it
    tp.set_defaults(n_predict=None, seed=None)
    for opt, text in (("-n", "one image: max new tokens (512); batch mode: number of images (500)"),
                      ("--seed", "one image: sampling seed (0); batch mode: scene / id draw seed (1000)")):
        tp._option_string_actions[opt].help = text
    tp.add_argument("-k", type=int, default=8, help="top-k heads per layer summed into T-VHD (default 8)")
    tp.add_argument("--objects", help="one image: comma-separated ground-truth objects; mentions of others are hallucinated")
    tp.add_argument("--caption", help="one image: trace this text (teacher forcing) instead of the model's caption")
    tp.add_argument("--out", type=Path, help="folder for the results (one image: trace.json and PNGs)")
    tp.add_argument("--json", action="store_true", help="print the trace (batch mode: the summary) as JSON on stdout")
    add_data_args(tp, captions=True, counts=False)
    b = tp.add_argument_group("batch mode")
    b.add_argument("--max-tokens", type=int, default=None, help="max new tokens per caption (512)")
    b.add_argument("--tag", default=None, help="name of the run's files (default: greedy or the VHR tag)")
    b.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples over captions (1000)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    tp.set_defaults(func=cmd_trace)


def cmd_trace(args) -> int:
    from ..errors import ConfigError

    if args.k < 1:
        raise ConfigError(f"-k must be at least 1, got {args.k}")
    batch = args.testbed is not None or args.images is not None or args.annotations is not None
    if batch:
        if args.image is not None:
            raise ConfigError("give one image or the batch data flags (--testbed / --images, --annotations), not both")
        for name in SINGLE_ONLY:
            if getattr(args, name) is not None:
                raise ConfigError(f"--{name} is for one image; the batch mode traces each image's own caption "
                                  "against its ground truth")
        return _cmd_batch(args)
    if args.image is None:
        raise ConfigError("give an image, or an evaluation set: --testbed SPLIT or --images DIR --annotations FILE")
    for name, flag in BATCH_ONLY.items():
        if getattr(args, name) not in (None, False):
            raise ConfigError(f"{flag} is for the batch mode (--testbed / --images); with one image use -n")
    return _cmd_single(args)


def _cmd_single(args) -> int:
    from .. import flags

    args.n_predict = 512 if args.n_predict is None else args.n_predict
    args.seed = 0 if args.seed is None else args.seed
    vhr, gen = flags.configs(args)
    session = flags.open_session(args)
    objects = {o.strip().lower() for o in args.objects.split(",") if o.strip()} if args.objects else None
    tr = trace_image(session, args.image, prompt=args.prompt, vhr=vhr, gen=gen, k=args.k, caption=args.caption,
                     objects=objects)
    if args.out:
        from .tvhd import plot_single

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trace.json").write_text(json.dumps(tr))
        plot_single(tr, args.out)
    if args.json:
        print(json.dumps(tr))
    else:
        print(tr["text"])
        marks = [f"{r['piece'].strip()}({r['t_vhd']:.2f}{'!' if r['hallucinated'] else ''})" for r in tr["tokens"] if r["object"]]
        if marks:
            print("objects (T-VHD, ! = hallucinated): " + ", ".join(marks))
        if args.out:
            print(f"wrote {args.out / 'trace.json'}, vhd_step0.png, t_vhd.png")
    return 0


def _cmd_batch(args) -> int:
    from .. import flags
    from ..errors import ConfigError
    from . import DEFAULT_N, DEFAULT_SEED
    from .data import source_from_args
    from .tvhd import run_trace, session_tracer

    if args.out is None:
        raise ConfigError("the batch mode needs --out DIR (the resumable results folder)")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    args.bootstrap = 1000 if args.bootstrap is None else args.bootstrap
    if args.bootstrap < 10:
        raise ConfigError(f"--bootstrap must be at least 10, got {args.bootstrap}")
    n = DEFAULT_N if args.n_predict is None else args.n_predict
    data_seed = DEFAULT_SEED if args.seed is None else args.seed
    source = source_from_args(args, n, data_seed)
    args.n_predict = 512 if args.max_tokens is None else args.max_tokens
    args.seed = 0  # generation / random-heads seed, as in `vhr-edge eval`
    if args.n_predict < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.n_predict}")
    tag = flags.method_tag(args)
    vhr, gen = flags.configs(args)
    session = flags.open_session(args)
    settings = flags.run_settings(session, vhr, gen, prompt=args.prompt)
    s = run_trace(source, args.out, session_tracer(session, args.prompt, vhr, gen, args.k), k=args.k, tag=tag,
                  settings=settings, n_boot=args.bootstrap, progress=not args.no_progress)
    if args.json:
        print(json.dumps(s), flush=True)
    else:
        auc = "n/a (a group is empty)" if s["auroc"] is None else \
            f"{s['auroc']:.3f} [{s['auroc_ci'][0]:.3f}, {s['auroc_ci'][1]:.3f}]"
        print(f"T-VHD {tag} (top-{args.k}) on {s['n_captions']} images: AUROC real > hallucinated {auc}; "
              f"mentions: {s['n_real']} real (mean T-VHD {s['mean_t_vhd_real']}), {s['n_hallucinated']} hallucinated "
              f"(mean {s['mean_t_vhd_hallucinated']}); CHAIR_S {s['chair']['chair_s']:.3f} "
              f"({args.out}/trace-{tag}.*)", flush=True)
    return 0
