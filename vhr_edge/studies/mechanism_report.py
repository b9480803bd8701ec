"""Tables and plots of the issue-19 study (`python -m vhr_edge.studies.mechanism report`): OUT/tables.md,
OUT/report.json and DOCS/mechanism_{tvhd,layers,search,probe,heldout}.png, from the finished
runs only (nothing here captions except the head-selection census, a one-token prefill per
calibration image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..eval import stats
from ..eval.chair import score_caption, testbed_vocabulary
from . import mechanism_runs as M

N_BOOT = 2000


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _ci(x: dict, nd: int = 3) -> str:
    return f"{x['estimate']:.{nd}f} [{x['ci'][0]:.{nd}f}, {x['ci'][1]:.{nd}f}]"


def _groups(recs: list[dict], pick=lambda m: True, key="t_vhd", layer=None) -> list[tuple[list, list]]:
    def val(m):
        return m[key] if layer is None else m["layers"][layer]

    return [([val(m) for m in r["mentions"] if not m["hallucinated"] and pick(m)],
             [val(m) for m in r["mentions"] if m["hallucinated"] and pick(m)]) for r in recs]


def _auroc_ci(groups, counts) -> dict:
    est = stats.auroc([v for g in groups for v in g[0]], [v for g in groups for v in g[1]])
    vals = stats.auroc_resamples(groups, counts)
    vals = vals[np.isfinite(vals)]
    return {"estimate": est, "ci": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]}


# ---- 1. T-VHD ----------------------------------------------------------------------------------------

def trace_section(out: Path, docs: Path) -> tuple[str, dict]:
    runs = {}
    for model in M.MODELS:
        for split in M.SPLITS:
            d = out / f"trace-{model}-{split}"
            if (d / "trace-greedy.summary.json").exists():
                runs[(model, split)] = (json.loads((d / "trace-greedy.summary.json").read_text()),
                                        _lines(d / "trace-greedy.jsonl"))
    res = {}
    md = ["| file | split | captions | real / hallucinated mentions | AUROC [95% CI] | AUROC, mentions after the "
          "caption's first object | mean T-VHD real | mean T-VHD hallucinated | CHAIR_S |",
          "|---|---|---|---|---|---|---|---|---|"]
    for (model, split), (s, recs) in runs.items():
        counts = stats.boot_counts(len(recs), N_BOOT, 0)
        # "after the first object": each caption's first mention left out (hallucinated objects are
        # rarely named first, and T-VHD may depend on the position in the caption)
        later = _auroc_ci(_groups([{"mentions": r["mentions"][1:]} for r in recs]), counts)
        res[f"{model}/{split}"] = {"auroc": s["auroc"], "ci": s["auroc_ci"], "later": later, "n_real": s["n_real"],
                                   "n_hall": s["n_hallucinated"]}
        md.append(f"| {model} | {split} | {s['n_captions']} | {s['n_real']} / {s['n_hallucinated']} | "
                  f"{s['auroc']:.3f} [{s['auroc_ci'][0]:.3f}, {s['auroc_ci'][1]:.3f}] | {_ci(later)} | "
                  f"{s['mean_t_vhd_real']:.1f} | {s['mean_t_vhd_hallucinated']:.1f} | {s['chair']['chair_s']:.3f} |")
    # quantization: the same images, paired resamples
    md += ["", "Quantized minus F16, same images (paired caption bootstrap):", "",
           "| file | split | identical captions | AUROC difference [95% CI] |", "|---|---|---|---|"]
    for model in ("Q8_0", "Q4_K_M"):
        for split in M.SPLITS:
            if (model, split) not in runs or ("F16", split) not in runs:
                continue
            a, b = runs[(model, split)][1], runs[("F16", split)][1]
            counts = stats.boot_counts(len(a), N_BOOT, 0)
            va, vb = stats.auroc_resamples(_groups(a), counts), stats.auroc_resamples(_groups(b), counts)
            ok = np.isfinite(va) & np.isfinite(vb)
            diff = runs[(model, split)][0]["auroc"] - runs[("F16", split)][0]["auroc"]
            ci = [float(np.percentile((va - vb)[ok], 2.5)), float(np.percentile((va - vb)[ok], 97.5))]
            same = sum(x["caption"] == y["caption"] for x, y in zip(a, b))
            res[f"{model}-F16/{split}"] = {"diff": diff, "ci": ci, "same_captions": same}
            md.append(f"| {model} | {split} | {same} / {len(a)} | {diff:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] |")
    # per layer (F16)
    md += ["", "Per layer (F16; each layer's top-8 sum alone as the score):", "",
           "| split | " + " | ".join(f"L{l}" for l in range(8)) + " |", "|---|" + "---|" * 8]
    for split in M.SPLITS:
        if ("F16", split) not in runs:
            continue
        recs = runs[("F16", split)][1]
        counts = stats.boot_counts(len(recs), N_BOOT, 0)
        cells = []
        for l in range(8):
            a = _auroc_ci(_groups(recs, layer=l), counts)
            res[f"F16/{split}/L{l}"] = a
            cells.append(f"{a['estimate']:.2f} [{a['ci'][0]:.2f}, {a['ci'][1]:.2f}]")
        md.append(f"| {split} | " + " | ".join(cells) + " |")
    _plot_traces(runs, docs / "mechanism_tvhd.png")
    return "\n".join(md), res


def _plot_traces(runs: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    allv = [m["t_vhd"] for _, recs in runs.values() for r in recs for m in r["mentions"]]
    bins = np.linspace(min(allv), max(allv), 36) if allv else 30
    for j, model in enumerate(M.MODELS):
        for i, split in enumerate(M.SPLITS):
            ax = axes[i, j]
            if (model, split) not in runs:
                ax.set_visible(False)
                continue
            s, recs = runs[(model, split)]
            real = [m["t_vhd"] for r in recs for m in r["mentions"] if not m["hallucinated"]]
            hall = [m["t_vhd"] for r in recs for m in r["mentions"] if m["hallucinated"]]
            ax.hist(real, bins=bins, density=True, alpha=0.55, color="tab:green", label=f"real ({len(real)})")
            ax.hist(hall, bins=bins, density=True, alpha=0.55, color="tab:red", label=f"hallucinated ({len(hall)})")
            ax.set_title(f"{model} {split}: AUROC {s['auroc']:.3f} [{s['auroc_ci'][0]:.2f}, {s['auroc_ci'][1]:.2f}]",
                         fontsize=9)
            ax.legend(fontsize=7)
            if i == 1:
                ax.set_xlabel("T-VHD of the mention's first token (top-8, all layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- 2. calibration search, probe, held-out ----------------------------------------------------------

def search_section(out: Path, docs: Path) -> tuple[str, dict]:
    table = M.cal_table(out)
    g = table.get("greedy")
    if g is None:
        return "(no calibration runs yet)", {}
    md = [f"Greedy on the calibration split: CHAIR_S {g['chair_s']:.3f}, CHAIR_I {g['chair_i']:.3f}, "
          f"recall {g['recall']:.3f}, {g['mean_len']:.1f} words (n={g['n']}).", "",
          "CHAIR_S / CHAIR_I / recall per setting (cells: alpha); heads per layer: med = the paper's median "
          "rule (4 of 8), topK = the K heads of largest VHD:", "",
          "| layers | heads | " + " | ".join(f"alpha {a:g}" for a in M.ALPHAS) + " |", "|---|---|" + "---|" * len(M.ALPHAS)]
    for layers in (M.PAPER_LAYERS, M.ALL_LAYERS) + tuple(str(l) for l in range(8)):
        for count in (0, 2, 1):
            cells, any_ = [], False
            for a in M.ALPHAS:
                s = table.get(M.setting(layers, a, count)["name"])
                any_ |= s is not None
                cells.append("" if s is None else f"{s['chair_s']:.2f} / {s['chair_i']:.3f} / {s['recall']:.3f}")
            if any_:
                md.append(f"| {layers} | {'med' if count == 0 else f'top{count}'} | " + " | ".join(cells) + " |")
    oracle = sorted(n for n in table if n.startswith("oracle"))
    if oracle:
        md += ["", "Oracle head sets (probe at alpha 2; fixed for every image):", "",
               "| setting | heads | CHAIR_S | CHAIR_I | recall | words |", "|---|---|---|---|---|---|"]
        grid = {st["name"]: st for st in M.oracle_grid(M.pooled_scores(M.load_probe(out / "probe-cal.jsonl", 2.0)))}
        for n in oracle:
            s = table[n]
            heads = grid[n]["vhr"]["forced_heads"] if n in grid else {}
            hs = " ".join(f"{l}:{','.join(map(str, h))}" for l, h in heads.items())
            md.append(f"| {n} | {hs} | {s['chair_s']:.3f} | {s['chair_i']:.3f} | {s['recall']:.3f} | {s['mean_len']:.1f} |")
    _plot_search(table, docs / "mechanism_search.png")
    return "\n".join(md), {n: {k: s[k] for k in ("chair_s", "chair_i", "recall", "mean_len")} for n, s in table.items()}


def _plot_search(table: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    g = table["greedy"]
    for n, s in table.items():
        if n == "greedy":
            continue
        color = "tab:purple" if n.startswith("oracle") else ("tab:blue" if "L1,4-7" in n else
                                                              "tab:orange" if "L0-7" in n else "0.6")
        ax.scatter(s["recall"], s["chair_s"], s=14, color=color)
    ax.scatter(g["recall"], g["chair_s"], s=60, marker="*", color="black", label="greedy", zorder=3)
    for c, lab in (("tab:blue", "paper layers 1,4-7"), ("tab:orange", "all layers"), ("0.6", "single layer"),
                   ("tab:purple", "oracle head sets")):
        ax.scatter([], [], color=c, s=14, label=lab)
    ax.set_xlabel("recall")
    ax.set_ylabel("CHAIR_S")
    ax.set_title(f"Calibration split (counterfactual, seed {M.CAL_SEED}, {g['n']} scenes)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def census(out: Path, threads: int) -> dict:
    """How often the paper rule (alpha 2, layers 1,4-7) reinforces each head on the calibration
    images, and the mean VHD: one-token captions (the selection happens in the prefill)."""
    path = out / "census-cal.json"
    if path.exists():
        return json.loads(path.read_text())
    from ..session import GenerationConfig, VhrConfig

    runner, src = M.Runner(threads), M.cal_source()
    freq, vhd = np.zeros((8, 8)), np.zeros((8, 8))
    for it in src.items:
        r = runner.session.caption(it.load(), runner.prompt, vhr=VhrConfig(layers=M.PAPER_LAYERS, alpha=2.0),
                                   gen=GenerationConfig(n_predict=1))
        for l, hs in r.vhr.selected_heads.items():
            freq[l, hs] += 1
        vhd += r.vhr.vhd
    res = {"freq": (freq / len(src.items)).tolist(), "mean_vhd": (vhd / len(src.items)).tolist(), "n": len(src.items)}
    path.write_text(json.dumps(res))
    return res


def probe_section(out: Path, docs: Path, threads: int) -> tuple[str, dict]:
    path = out / "probe-cal.jsonl"
    if not path.exists():
        return "(no probe yet)", {}
    per = M.load_probe(path, 2.0)
    sc = M.pooled_scores(per)
    agree = [r["argmax_agree"] for r in _lines(path)]
    cen = census(out, threads)
    freq = np.array(cen["freq"])
    paper = [1, 4, 5, 6, 7]
    # how much of the probe's benefit VHR's own selection reaches, per layer: the mean change of
    # the hallucinated log-probability of the heads VHR picks (weighted by how often) vs the best
    md = [f"{sc['n_images']} calibration captions with hallucinations, {sc['n_hall']} hallucinated and "
          f"{sc['n_real']} real mentions; the teacher-forced PyTorch pass reproduces the engine's greedy token at "
          f"{100 * np.mean(agree):.1f}% of caption positions.", "",
          "Per layer: the single head whose reinforcement (alpha 2) most lowers the hallucinated objects' "
          "log-probability, its change, the change it brings to the real objects, and what the heads the "
          "paper rule picks do on average (weighted by how often it picks them):", "",
          "| layer | best head (hall) | its Δ log p hall | its Δ log p real | best head (margin) | its margin | "
          "paper rule's heads: mean Δ hall | mean Δ real |", "|---|---|---|---|---|---|---|---|"]
    res = {"hall": sc["hall"].tolist(), "real": sc["real"].tolist(), "freq": cen["freq"]}
    for l in range(8):
        h = int(np.argmin(sc["hall"][l]))
        hm = int(np.argmin(sc["margin"][l]))
        if l in paper and freq[l].sum() > 0:
            w = freq[l] / freq[l].sum()
            vh, vr = f"{(w * sc['hall'][l]).sum():+.3f}", f"{(w * sc['real'][l]).sum():+.3f}"
        else:
            vh = vr = "(not in the set)"
        md.append(f"| {l} | {h} | {sc['hall'][l, h]:+.3f} | {sc['real'][l, h]:+.3f} | {hm} | {sc['margin'][l, hm]:+.3f} "
                  f"| {vh} | {vr} |")
    # rank agreement between VHD and the probe
    mv = np.array(cen["mean_vhd"])
    rho = [float(np.corrcoef(stats.midranks(mv[l]), stats.midranks(-sc["hall"][l]))[0, 1]) for l in paper]
    md += ["", "Spearman correlation, per paper-rule layer, between a head's mean VHD and how much it lowers the "
           "hallucinated log-probability: " + ", ".join(f"L{l} {r:+.2f}" for l, r in zip(paper, rho))]
    res["spearman_vhd_vs_probe"] = dict(zip(map(str, paper), rho))
    _plot_probe(sc, freq, mv, docs / "mechanism_probe.png")
    return "\n".join(md), res


def _plot_probe(sc: dict, freq: np.ndarray, mv: np.ndarray, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    lim = float(np.abs(np.concatenate([sc["hall"].ravel(), sc["real"].ravel()])).max())
    for ax, m, t, cmap, kw in ((axes[0], sc["hall"], "Δ log p, hallucinated objects", "RdBu_r", dict(vmin=-lim, vmax=lim)),
                               (axes[1], sc["real"], "Δ log p, real objects", "RdBu_r", dict(vmin=-lim, vmax=lim)),
                               (axes[2], mv, "mean VHD (paper layers)", "viridis", {}),
                               (axes[3], freq, "paper rule: share of images reinforcing", "Greys", dict(vmin=0, vmax=1))):
        im = ax.imshow(m, cmap=cmap, aspect="auto", **kw)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.suptitle("Single-head reinforcement at alpha 2, teacher-forced on the calibration greedy captions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heldout_section(out: Path, docs: Path) -> tuple[str, dict]:
    hd = out / "heldout"
    chosen_path = out / "heldout-chosen.json"
    if not (hd / "chair-greedy.jsonl").exists() or not chosen_path.exists():
        return "(no held-out runs yet)", {}
    vocab = testbed_vocabulary()
    ids = json.loads((hd / "ids.json").read_text())["ids"]

    def rows(tag):
        p = hd / f"chair-{tag}.jsonl"
        if not p.exists():
            return None
        by = {str(r["image_id"]): r for r in _lines(p)}
        if len(by) < len(ids):
            return None
        return stats.chair_rows([score_caption(by[str(i)]["caption"], by[str(i)]["gt_objects"], vocab) for i in ids])

    def words(tag):
        return json.loads((hd / f"chair-{tag}.summary.json").read_text())["mean_len"]

    g = rows("greedy")
    gci = stats.chair_ci(g, N_BOOT)
    md = ["| method | CHAIR_S | CHAIR_I | recall | words | Δ CHAIR_S vs greedy | Δ CHAIR_I vs greedy | Δ recall vs greedy "
          "| Δ CHAIR_S vs its random heads |", "|---|---|---|---|---|---|---|---|---|",
          f"| greedy | {_ci(gci['chair_s'])} | {_ci(gci['chair_i'])} | {_ci(gci['recall'])} | {words('greedy'):.1f} "
          "| | | | |"]
    res, forest = {"greedy": gci}, []
    chosen = json.loads(chosen_path.read_text())
    if (hd / "chair-oracle-per-image.jsonl").exists():
        chosen.append({"name": "oracle-per-image", "per_image": True})
    for st in chosen:
        a = rows(st["name"])
        if a is None:
            continue
        ctl_tags = ([f"oracle-per-image-random{k}" for k in M.RANDOM_SEEDS] if st.get("per_image")
                    else [c["name"] for c in M.controls(st)])
        ctl = [rows(t) for t in ctl_tags]
        ctl = [c for c in ctl if c is not None]
        ci = stats.chair_ci(a, N_BOOT)
        dg = stats.chair_paired_diff(a, g, N_BOOT)
        label = st["name"] + (" (added after the pre-set pick, see text)" if st.get("extra") else "")
        line = (f"| {label} | {_ci(ci['chair_s'])} | {_ci(ci['chair_i'])} | {_ci(ci['recall'])} | "
                f"{words(st['name']):.1f} | {_ci(dg['chair_s'])} | {_ci(dg['chair_i'])} | {_ci(dg['recall'])} | ")
        res[st["name"]] = {"ci": ci, "vs_greedy": dg}
        forest.append((st["name"], dg["chair_s"]))
        if ctl:
            dr = stats.chair_paired_diff(a, np.stack(ctl), N_BOOT)
            line += f"{_ci(dr['chair_s'])} |"
            res[st["name"]]["vs_random"] = dr
            cs = stats.chair_ci(np.mean(np.stack(ctl), axis=0), N_BOOT)  # mean over seeds, per image
            dcg = stats.chair_paired_diff(np.stack(ctl).mean(axis=0), g, N_BOOT)
            per_seed = [f"{stats.chair_ci(c, 10)['chair_s']['estimate']:.3f}" for c in ctl]
            md.append(line)
            md.append(f"| ↳ random heads, same counts ({len(ctl)} seeds: CHAIR_S {', '.join(per_seed)}) | "
                      f"{_ci(cs['chair_s'])} | {_ci(cs['chair_i'])} | {_ci(cs['recall'])} | "
                      f"{np.mean([words(t) for t in ctl_tags[:len(ctl)]]):.1f} | {_ci(dcg['chair_s'])} | "
                      f"{_ci(dcg['chair_i'])} | {_ci(dcg['recall'])} | |")
            res[st["name"]]["random"] = {"ci": cs, "vs_greedy": dcg, "per_seed_chair_s": per_seed}
            forest.append((f"  random heads ({len(ctl)} seeds)", dcg["chair_s"]))
        else:
            md.append(line + " |")
    _plot_forest(forest, docs / "mechanism_heldout.png")
    return "\n".join(md), res


def _plot_forest(items: list, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(items) + 1.2))
    for i, (name, d) in enumerate(items):
        y = len(items) - i
        ax.errorbar(d["estimate"], y, xerr=[[d["estimate"] - d["ci"][0]], [d["ci"][1] - d["estimate"]]], fmt="o",
                    color="0.5" if name.startswith("  ") else "tab:blue", capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(items), 0, -1))
    ax.set_yticklabels([n for n, _ in items], fontsize=8)
    ax.set_xlabel("CHAIR_S minus greedy (paired bootstrap 95% CI); held-out counterfactual, 200 scenes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def card_block(res: dict) -> dict:
    """What the model card shows of this study (models/testbed_metrics.json["mechanism"])."""
    tv = [{"file": k.split("/")[0], "split": k.split("/")[1], "auroc": v["auroc"], "ci": v["ci"],
           "n_real": v["n_real"], "n_hall": v["n_hall"]}
          for k, v in res["T-VHD at scale"].items() if k.count("/") == 1 and "-F16" not in k]
    ho = res["Held-out split"]
    rows = []
    for name, v in ho.items():
        if name == "greedy":
            continue
        d = v["vs_greedy"]["chair_s"]
        rows.append({"name": name, "chair_s": v["ci"]["chair_s"]["estimate"], "recall": v["ci"]["recall"]["estimate"],
                     "d_chair_s": d["estimate"], "ci": d["ci"],
                     "d_vs_random_ci": v["vs_random"]["chair_s"]["ci"] if "vs_random" in v else None})
    g = ho.get("greedy", {})
    return {"doc": "docs/mechanism.md", "tvhd": tv, "heldout": {
        "split": f"counterfactual, seed {M.EVAL_SEED}, {M.EVAL_N} scenes",
        "greedy": {k: g[k]["estimate"] for k in ("chair_s", "chair_i", "recall")} if g else None, "rows": rows}}


def update_card(out: Path, models: Path) -> None:
    """Put the study's block into models/testbed_metrics.json and re-render the card."""
    from ..testbed import card

    res = json.loads((out / "report.json").read_text())
    path = models / "testbed_metrics.json"
    m = json.loads(path.read_text())
    m["mechanism"] = card_block(res)
    path.write_text(json.dumps(m, indent=1))
    card.main(["--models", str(models)])


def report(out: Path, docs: Path, threads: int = 1) -> None:
    parts, res = [], {}
    for title, fn in (("T-VHD at scale", lambda: trace_section(out, docs)),
                      ("Calibration search", lambda: search_section(out, docs)),
                      ("Oracle probe", lambda: probe_section(out, docs, threads)),
                      ("Held-out split", lambda: heldout_section(out, docs))):
        md, r = fn()
        parts.append(f"## {title}\n\n{md}\n")
        res[title] = r
    (out / "tables.md").write_text("\n".join(parts))
    (out / "report.json").write_text(json.dumps(res, indent=1, default=float))
    print("\n".join(parts))
