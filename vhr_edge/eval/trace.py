"""`vhr-edge trace IMG`: T-VHD per generated token (VHR_SPEC 6), with hallucinated words marked.

    vhr-edge trace IMG [-m MODEL --mmproj M] [--objects fork,plate] [--caption TEXT] [-k 8]
                       [--no-vhr | --alpha A] [--out DIR] [--json]

T-VHD(t) = sum over layers of the top-k VHD of their heads at the position that chose token t,
against the text-only continuation (the prompt without the image + the tokens so far). It
needs that continuation decoded alongside, so it is an analysis mode (about 2x the decode).
`--caption` traces a given text (teacher forcing) instead of the model's own caption.
Writes DIR/trace.json, DIR/vhd_step0.png (layers x heads, selected heads marked) and
DIR/t_vhd.png (T-VHD over tokens; object words green when present, red when hallucinated).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from .chair import COCO, find_mentions, testbed_vocabulary


def token_rows(pieces: list[str], t_vhd: list[float], objects: Optional[set[str]], vocab) -> list[dict]:
    """One row per token: piece, T-VHD, and the object mention (if any) it belongs to."""
    text, starts = "", []
    for p in pieces:
        starts.append(len(text))
        text += p
    rows = [{"i": i, "piece": p, "t_vhd": round(float(v), 6), "object": None, "hallucinated": None}
            for i, (p, v) in enumerate(zip(pieces, t_vhd))]
    for m in find_mentions(text, vocab):
        if m.negated:
            continue
        for i, s in enumerate(starts):
            e = s + len(pieces[i])
            if s < m.end and e > m.start and pieces[i].strip():
                rows[i]["object"] = m.category
                rows[i]["hallucinated"] = None if objects is None else m.category not in objects
    return rows


def trace_image(session, image, *, prompt: str, vhr, gen, k: int = 8, caption: Optional[str] = None,
                objects: Optional[set[str]] = None) -> dict:
    forced = session._runner.tokenize(" " + caption.strip()) if caption else None
    if forced:
        gen = replace(gen, n_predict=max(gen.n_predict, len(forced)))
    r = session.caption(image, prompt, vhr=vhr, gen=gen, trace=True, forced_tokens=forced)
    engine = session._engine
    t_vhd = [engine.t_vhd(step.tolist(), k) for step in r.trace]
    vocab = testbed_vocabulary() if objects and objects <= set(testbed_vocabulary().categories) else COCO
    pieces = session._runner.pieces(r.tokens)
    return {
        "image": r.image, "text": r.text, "k": k, "objects": sorted(objects) if objects is not None else None,
        "vhr": r.to_json(include_matrices=False)["vhr"],
        "tokens": token_rows(pieces, t_vhd, objects, vocab),
        "vhd_step0": np.round(r.trace[0].astype(np.float64), 6).tolist() if len(r.trace) else [],
        "timings": r.to_json(include_matrices=False)["timings"],
    }


def plot(tr: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    vhd = np.array(tr["vhd_step0"])
    if vhd.size:
        fig, ax = plt.subplots(figsize=(max(4, vhd.shape[1] * 0.35 + 2), max(3, vhd.shape[0] * 0.3 + 1)))
        im = ax.imshow(vhd, aspect="auto", cmap="viridis")
        for layer, heads in tr["vhr"]["selected_heads"].items():
            ax.scatter(heads, [int(layer)] * len(heads), marker="o", s=18, facecolors="none", edgecolors="red")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("VHD at the first step (red: reinforced heads)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out_dir / "vhd_step0.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    rows = tr["tokens"]
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.18), 3.2))
        ax.plot([r["t_vhd"] for r in rows], color="0.4", lw=1)
        for r in rows:
            if r["object"]:
                color = "red" if r["hallucinated"] else ("green" if r["hallucinated"] is False else "blue")
                ax.scatter([r["i"]], [r["t_vhd"]], color=color, zorder=3)
                ax.annotate(r["piece"].strip(), (r["i"], r["t_vhd"]), fontsize=7, xytext=(0, 5),
                            textcoords="offset points", ha="center", color=color)
        ax.set_xlabel("generated token")
        ax.set_ylabel(f"T-VHD (top-{tr['k']})")
        ax.set_title("T-VHD per token (red: hallucinated object, green: present object)")
        fig.tight_layout()
        paths.append(out_dir / "t_vhd.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def register(sub) -> None:
    from .. import flags

    tp = sub.add_parser("trace", help="T-VHD per generated token, VHD heat map, hallucinated words marked")
    tp.add_argument("image", metavar="IMG")
    flags.add_model_args(tp)
    flags.add_vhr_args(tp)
    flags.add_gen_args(tp)
    tp.add_argument("-k", type=int, default=8, help="top-k heads per layer summed into T-VHD (default 8)")
    tp.add_argument("--objects", help="comma-separated ground-truth objects; mentions of others are hallucinated")
    tp.add_argument("--caption", help="trace this text (teacher forcing) instead of the model's caption")
    tp.add_argument("--out", type=Path, help="folder for trace.json and the PNG plots")
    tp.add_argument("--json", action="store_true", help="print the trace JSON on stdout")
    tp.set_defaults(func=cmd_trace)


def cmd_trace(args) -> int:
    from .. import flags
    from ..errors import ConfigError

    if args.k < 1:
        raise ConfigError(f"-k must be at least 1, got {args.k}")
    vhr, gen = flags.configs(args)
    session = flags.open_session(args)
    objects = {o.strip().lower() for o in args.objects.split(",") if o.strip()} if args.objects else None
    tr = trace_image(session, args.image, prompt=args.prompt, vhr=vhr, gen=gen, k=args.k, caption=args.caption,
                     objects=objects)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trace.json").write_text(json.dumps(tr))
        plot(tr, args.out)
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
