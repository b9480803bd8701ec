"""T-VHD (VHR_SPEC 6) per generated token, for one image or over an evaluation set.

One image: `trace_image` (the `vhr-edge trace IMG` command). An evaluation set: `run_trace`
traces every image of a data source (eval/data.py) and appends one JSON line per caption
through the same resumable store as `vhr-edge eval` (run.JsonlStore), then writes a summary:

    DIR/ids.json                 the images (shared with eval runs in the same folder)
    DIR/trace-TAG.run.json       the settings (a restart with other settings is refused)
    DIR/trace-TAG.jsonl          {"image_id", "caption", "gt_objects", "k", "tokens": [{"i",
                                 "piece", "t_vhd", "object", "hallucinated"}], "mentions":
                                 [{"category", "hallucinated", "token", "t_vhd", "layers"}], "mentioned",
                                 "hallucinated_objects", "stop_reason", "timings"} per caption
    DIR/trace-TAG.summary.json   AUROC, its interval, group means, CHAIR of the traced captions
    DIR/trace-TAG.png            the two distributions of first-token T-VHD

A mention's T-VHD is that of its FIRST token (the step that chose it); "layers" splits it by
layer (each layer's top-k sum). Mentions are CHAIR's
(chair.find_mentions: the source's vocabulary, negated mentions left out); each mention
counts, so an object named twice gives two points. AUROC = P(T-VHD(real) > T-VHD(hallucinated))
+ 1/2 P(equal): above 0.5 when hallucinated objects have the LOWER T-VHD, as the paper reports.
Its 95% interval resamples captions (stats.auroc_bootstrap).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import chair, stats
from .chair import COCO, find_mentions, testbed_vocabulary
from .data import DataSource, Item, write_ids
from .run import JsonlStore, _progress, _write_json, check_settings

DIRECTION = ("AUROC = P(T-VHD(real mention) > T-VHD(hallucinated mention)) + 1/2 P(equal), first token of "
             "each mention; > 0.5 means hallucinated objects have lower T-VHD (the paper's claim)")


def _starts(pieces: list[str]) -> list[int]:
    out, n = [], 0
    for p in pieces:
        out.append(n)
        n += len(p)
    return out


def token_rows(pieces: list[str], t_vhd: list[float], objects: Optional[set[str]], vocab) -> list[dict]:
    """One row per token: piece, T-VHD, and the object mention (if any) it belongs to."""
    starts = _starts(pieces)
    rows = [{"i": i, "piece": p, "t_vhd": round(float(v), 6), "object": None, "hallucinated": None}
            for i, (p, v) in enumerate(zip(pieces, t_vhd))]
    for m in find_mentions("".join(pieces), vocab):
        if m.negated:
            continue
        for i, s in enumerate(starts):
            e = s + len(pieces[i])
            if s < m.end and e > m.start and pieces[i].strip():
                rows[i]["object"] = m.category
                rows[i]["hallucinated"] = None if objects is None else m.category not in objects
    return rows


def mention_rows(pieces: list[str], t_vhd: list[float], objects: set[str], vocab,
                 per_layer: Optional[np.ndarray] = None) -> list[dict]:
    """Every non-negated object mention: its category, whether it is hallucinated (not in
    `objects`), its first token and that token's T-VHD (and, given per_layer [n_tokens,
    n_layer], each layer's top-k sum at that token: "layers")."""
    starts = _starts(pieces)
    out = []
    for m in find_mentions("".join(pieces), vocab):
        if m.negated:
            continue
        first = next((i for i, s in enumerate(starts) if s < m.end and s + len(pieces[i]) > m.start
                      and pieces[i].strip()), None)
        if first is None or first >= len(t_vhd):
            continue
        out.append({"category": m.category, "hallucinated": m.category not in objects, "token": first,
                    "t_vhd": round(float(t_vhd[first]), 6)})
        if per_layer is not None:
            out[-1]["layers"] = [round(float(x), 5) for x in per_layer[first]]
    return out


def traced_caption(session, image, *, prompt: str, vhr, gen, k: int = 8, caption: Optional[str] = None):
    """(CaptionResult with .trace, pieces, per-token T-VHD): the caption (or `caption`, teacher
    forced) with every layer's VHD against the text-only continuation at every step."""
    forced = session._runner.tokenize(" " + caption.strip()) if caption else None
    if forced:
        gen = replace(gen, n_predict=max(gen.n_predict, len(forced)))
    r = session.caption(image, prompt, vhr=vhr, gen=gen, trace=True, forced_tokens=forced)
    t_vhd = [session._engine.t_vhd(step.tolist(), k) for step in r.trace]
    return r, session._runner.pieces(r.tokens), t_vhd


def trace_image(session, image, *, prompt: str, vhr, gen, k: int = 8, caption: Optional[str] = None,
                objects: Optional[set[str]] = None) -> dict:
    r, pieces, t_vhd = traced_caption(session, image, prompt=prompt, vhr=vhr, gen=gen, k=k, caption=caption)
    vocab = testbed_vocabulary() if objects and objects <= set(testbed_vocabulary().categories) else COCO
    return {
        "image": r.image, "text": r.text, "k": k, "objects": sorted(objects) if objects is not None else None,
        "vhr": r.to_json(include_matrices=False)["vhr"],
        "tokens": token_rows(pieces, t_vhd, objects, vocab),
        "vhd_step0": np.round(r.trace[0].astype(np.float64), 6).tolist() if len(r.trace) else [],
        "timings": r.to_json(include_matrices=False)["timings"],
    }


def layer_top_k(trace: np.ndarray, k: int) -> np.ndarray:
    """[n_tokens, n_layer]: each layer's sum of its top-k VHD at each step (T-VHD = row sums)."""
    if not len(trace):
        return np.zeros((0, 0))
    kk = min(k, trace.shape[2])
    return -np.sort(-trace.astype(np.float64), axis=2)[:, :, :kk].sum(axis=2)


# A tracer: item -> (caption text, pieces, per-token T-VHD, per-layer [n_tokens, n_layer] or None,
# extra fields for the line)
Tracer = Callable[[Item], tuple[str, list[str], list[float], Optional[np.ndarray], dict]]


def session_tracer(session, prompt: str, vhr, gen, k: int) -> Tracer:
    def trace(item: Item):
        r, pieces, t_vhd = traced_caption(session, item.load(), prompt=prompt, vhr=vhr, gen=gen, k=k)
        return (r.text, pieces, t_vhd, layer_top_k(r.trace, k),
                {"stop_reason": r.stop_reason, "timings": asdict(r.timings)})

    return trace


def trace_record(item: Item, text: str, pieces: list[str], t_vhd: list[float], k: int, vocab, extra: dict,
                 per_layer: Optional[np.ndarray] = None) -> dict:
    gt = set(item.gt)
    sc = chair.score_caption(text, gt, vocab)
    return {"image_id": item.image_id, "caption": text, "gt_objects": list(item.gt), "k": k,
            "tokens": token_rows(pieces, t_vhd, gt, vocab),
            "mentions": mention_rows(pieces, t_vhd, gt, vocab, per_layer),
            "mentioned": sc["mentioned"], "hallucinated_objects": sc["hallucinated"], **extra}


def summarize(recs: list[dict], vocab, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC of first-token T-VHD (real vs hallucinated mentions) with its caption-bootstrap
    interval, the mean T-VHD of each group, and CHAIR of the traced captions."""
    groups = [([m["t_vhd"] for m in r["mentions"] if not m["hallucinated"]],
               [m["t_vhd"] for m in r["mentions"] if m["hallucinated"]]) for r in recs]
    a = stats.auroc_bootstrap(groups, n_boot=n_boot, seed=seed)
    real = [v for g in groups for v in g[0]]
    hall = [v for g in groups for v in g[1]]
    every = [t["t_vhd"] for r in recs for t in r["tokens"]]

    def mean(v):
        return round(float(np.mean(v)), 6) if v else None

    ch = chair.chair_scores(({"caption": r["caption"], "gt_objects": r["gt_objects"]} for r in recs), vocab).summary
    return {
        "n_captions": len(recs), "k": recs[0]["k"] if recs else None,
        "n_mentions": len(real) + len(hall), "n_real": len(real), "n_hallucinated": len(hall),
        "auroc": None if not np.isfinite(a["auroc"]) else round(a["auroc"], 4),
        "auroc_ci": [None if not np.isfinite(x) else round(x, 4) for x in a["ci"]],
        "mean_t_vhd_real": mean(real), "mean_t_vhd_hallucinated": mean(hall), "mean_t_vhd_all_tokens": mean(every),
        "captions_with_hallucination": sum(bool(g[1]) for g in groups),
        "bootstrap": {"n": n_boot, "seed": seed, "unit": "caption", "level": stats.LEVEL,
                      "skipped": a["n_boot_skipped"]},
        "direction": DIRECTION,
        "chair": ch,
    }


def plot_single(tr: dict, out_dir: Path) -> list[Path]:
    """One image's trace: vhd_step0.png (layers x heads, reinforced heads marked) and t_vhd.png."""
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


def plot_distributions(recs: list[dict], summary: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = [m["t_vhd"] for r in recs for m in r["mentions"] if not m["hallucinated"]]
    hall = [m["t_vhd"] for r in recs for m in r["mentions"] if m["hallucinated"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    both = real + hall
    bins = np.linspace(min(both), max(both), 31) if both and max(both) > min(both) else 30
    if real:
        ax.hist(real, bins=bins, density=True, alpha=0.55, color="tab:green", label=f"real ({len(real)})")
    if hall:
        ax.hist(hall, bins=bins, density=True, alpha=0.55, color="tab:red", label=f"hallucinated ({len(hall)})")
    ax.set_xlabel(f"T-VHD of the mention's first token (top-{summary.get('k')})")
    ax.set_ylabel("density")
    auc, ci = summary.get("auroc"), summary.get("auroc_ci") or [None, None]
    head = f"AUROC {auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if auc is not None and None not in ci else "AUROC n/a"
    ax.set_title(f"{title}  {head}".strip(), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_trace(source: DataSource, out_dir, tracer: Tracer, *, k: int, tag: str = "greedy",
              settings: Optional[dict] = None, n_boot: int = 1000, boot_seed: int = 0, progress: bool = True,
              plot: bool = True) -> dict:
    """Trace every item not yet done (one JSON line each, resumable like eval), then write and
    return the summary over all items of the source."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_ids(out, source)
    check_settings(out / f"trace-{tag}.run.json", {"task": "trace", "data": source.describe(), "k": k,
                                                   **(settings or {})})
    with JsonlStore(out / f"trace-{tag}.jsonl", key=lambda r: str(r["image_id"])) as store:
        todo = [it for it in source.items if it.key not in store]
        bar = _progress(len(source.items), len(source.items) - len(todo), f"trace {tag}", progress)
        try:
            for it in todo:
                text, pieces, t_vhd, per_layer, extra = tracer(it)
                store.add(trace_record(it, text, pieces, t_vhd, k, source.vocab, extra, per_layer))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        recs = [store.done[it.key] for it in source.items]
    summary = summarize(recs, source.vocab, n_boot=n_boot, seed=boot_seed)
    png = None
    if plot and summary["n_mentions"]:
        try:
            import matplotlib  # noqa: F401  (the oracle extra)
        except ImportError:
            pass
        else:
            d = source.describe()
            name = f"{d.get('split', 'coco')}, {len(recs)} images, {tag}"
            png = plot_distributions(recs, summary, out / f"trace-{tag}.png", title=name).name
    _write_json(out / f"trace-{tag}.summary.json", {**summary, "tag": tag, "data": source.describe(),
                                                    "settings": settings or {}, "jsonl": f"trace-{tag}.jsonl",
                                                    "plot": png})
    return {**summary, "plot": png}
