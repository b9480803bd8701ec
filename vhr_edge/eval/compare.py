"""`vhr-edge compare`: does quantization change hallucination, and does VHR still help?

    vhr-edge compare [-m A.gguf -m B.gguf ...] [--mmproj M] [--testbed counterfactual] [-n 100]
                     [--pope-n 50] [--alpha 2] [--layers L] [--profile P ...|--no-profile] [--out results/compare]

For every model, greedy and VHR on the SAME image ids (the testbed split by default): CHAIR_S,
CHAIR_I, recall, POPE F1 (mean of random / popular / adversarial), mean caption length,
seconds per caption, decode tokens/s, peak RSS of the process, file size. Each run is a
`vhr-edge eval` child process (so its peak RSS is its own) and resumable like eval.
VHR uses each model's profile (--profile, one per model, or <model stem>.vhr-profile.json
beside it) unless --alpha/--layers/--no-profile say otherwise; the method name then carries
the profile's layers ("vhr-a3-L0-3"). Default models: the bundled testbed F16, Q8_0 and Q4_K_M. Writes DIR/compare.md,
DIR/compare.csv and DIR/compare.png; prints the markdown table.

With --ray ADDRESS the runs happen in this process instead, on Ray actors (one pool per model,
loaded once for greedy, VHR, CHAIR and POPE): the same files in the same folders, so a run
may be resumed either way; peak RSS is then the largest of the actors' own, s/caption the
wall time of the distributed run over the captions.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError, VhrEdgeError

COLUMNS = ["model", "method", "chair_s", "chair_i", "recall", "pope_f1", "mean_len", "s_per_caption",
           "tokens_per_s", "peak_rss_mb", "file_mb"]


def default_models() -> list[Path]:
    from ..bundled import quantizations

    return quantizations()


def run_child(args: list[str]) -> tuple[dict, float, float]:
    """(last-line JSON, wall seconds, peak RSS MB) of `vhr-edge <args>` in a child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "vhr_edge.cli", *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)  # reaps the child and gives ITS peak RSS
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().strip()
    if p.returncode:
        raise VhrEdgeError(stderr.splitlines()[-1] if stderr else f"child failed: vhr-edge {' '.join(args)}")
    return json.loads(stdout.strip().splitlines()[-1]), wall, usage.ru_maxrss / 1024.0


def mean_tokens_per_s(jsonl: Path) -> float:
    vals = []
    with open(jsonl) as f:
        for line in f:
            t = json.loads(line).get("timings") or {}
            if t.get("tokens_per_s"):
                vals.append(t["tokens_per_s"])
    return sum(vals) / len(vals) if vals else 0.0


def _on_ray(pool, model: Path, method: str, vhr_on: bool, res, d: Path, *, split: str, n: int, pope_n: int,
            seed: int, max_tokens: int):
    """What the two `vhr-edge eval` children of a (model, method) give, run on a cluster pool:
    (chair summary, wall seconds, pope result or None). The same settings as the children."""
    from .. import DEFAULT_PROMPT
    from ..flags import run_settings
    from ..session import GenerationConfig, VhrConfig
    from . import POPE_MAX_TOKENS, pope
    from .data import TestbedSource
    from .run import run_chair, run_pope

    vhr = VhrConfig(alpha=res.alpha, layers=res.layers_spec) if vhr_on else VhrConfig(enabled=False)
    gen = GenerationConfig(n_predict=max_tokens)
    t0 = time.perf_counter()
    chair = run_chair(TestbedSource(split, n=n, seed=seed), d, pool.captioner(DEFAULT_PROMPT, vhr, gen), tag=method,
                      settings=run_settings(pool, vhr, gen, prompt=DEFAULT_PROMPT), progress=False)
    wall = time.perf_counter() - t0
    result = None
    if pope_n > 0:
        gen = GenerationConfig(n_predict=POPE_MAX_TOKENS)
        result = run_pope(TestbedSource(split, n=pope_n, seed=seed), d / "pope", pool.answerer(vhr, gen), pope.POPE_SPLITS,
                          seed=seed, n_pos=pope.N_POS, tag=method, settings=run_settings(pool, vhr, gen, suffix=""),
                          progress=False)
    for r, what in ((chair, "CHAIR"), (result or {}, "POPE")):
        if r.get("n_failed"):
            raise VhrEdgeError(f"{model.name} {method}: {r['n_failed']} {what} units failed on every try (see the "
                               f"summary in {d}); run the same command again to retry them")
    return chair, wall, result


def compare(models: list[Path], mmproj: Path | None, out: Path, *, split: str, n: int, pope_n: int, seed: int,
            alpha: float | None, threads: int, max_tokens: int, layers: str | None = None,
            profiles: list[Path] | None = None, no_profile: bool = False, ray_args=None) -> list[dict]:
    """alpha/layers: explicit settings (None: each model's VHR profile, else 2 / auto).
    profiles: one profile file per model (None: the profile beside each model, if any).
    ray_args: the parsed flags with --ray (cluster.open_pool): run on Ray actors, in this process."""
    from .. import cluster

    from ..profile import resolve
    from ..flags import vhr_tag

    if profiles is not None and len(profiles) != len(models):
        raise ConfigError(f"give one --profile per -m model ({len(models)} models, {len(profiles)} profiles)")
    for model in models:
        if not model.is_file():
            raise ConfigError(f"model not found: {model}")
    rows = []
    for i, model in enumerate(models):
        # resolved here, passed to the children explicitly (--no-profile), so the tag names it
        res = resolve(model, layers=layers, alpha=alpha, profile=profiles[i] if profiles else None,
                      no_profile=no_profile)
        line = res.describe(model.name)
        if line:
            print(line, file=sys.stderr, flush=True)
        vtag = vhr_tag(res.alpha, res.layers_spec)
        pool = cluster.open_pool(ray_args, str(model), str(mmproj) if mmproj else None) if ray_args else None
        try:
            for method, flags in (("greedy", ["--no-vhr"]),
                                  (vtag, ["--alpha", repr(res.alpha), "--layers", res.layers_spec, "--tag", vtag])):
                common = ["-m", str(model), "--testbed", split, "--seed", str(seed), "-t", str(threads),
                          "--no-progress", "--json", "--no-profile", *flags] + (["--mmproj", str(mmproj)] if mmproj else [])
                d = out / model.stem
                if pool is not None:
                    chair, wall, pope = _on_ray(pool, model, method, method != "greedy", res, d, split=split, n=n,
                                                pope_n=pope_n, seed=seed, max_tokens=max_tokens)
                    rss = pool.peak_rss_mb
                else:
                    chair, wall, rss = run_child(["eval", "chair", "-n", str(n), "--max-tokens", str(max_tokens),
                                                  "--out", str(d), *common])
                    pope = None
                    if pope_n > 0:
                        pope, _, rss2 = run_child(["eval", "pope", "-n", str(pope_n), "--out", str(d / "pope"), *common])
                        rss = max(rss, rss2)
                row = {"model": model.name, "method": method, "chair_s": chair["chair_s"], "chair_i": chair["chair_i"],
                       "recall": chair["recall"], "mean_len": chair["mean_len"],
                       "s_per_caption": round(wall / max(1, chair["n"]), 3),
                       "tokens_per_s": round(mean_tokens_per_s(d / f"chair-{method}.jsonl"), 1),
                       "file_mb": round(model.stat().st_size / 2**20, 2)}
                if pope is not None:
                    f1 = [m["f1"] for m in pope.values()]
                    row["pope_f1"] = round(sum(f1) / len(f1), 4)
                else:
                    row["pope_f1"] = None
                row["peak_rss_mb"] = round(rss, 1)
                rows.append(row)
                print(f"{model.name} {method}: {json.dumps(row)}", file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.close()
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | method | CHAIR_S | CHAIR_I | recall | POPE F1 | words | s/caption | tok/s | peak RSS MB | MB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, p=3: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [head] + [
        f"| {r['model']} | {r['method']} | {fmt(r['chair_s'])} | {fmt(r['chair_i'])} | {fmt(r['recall'])} | "
        f"{fmt(r['pope_f1'])} | {fmt(r['mean_len'], 1)} | {fmt(r['s_per_caption'])} | {fmt(r['tokens_per_s'], 1)} | "
        f"{fmt(r['peak_rss_mb'], 1)} | {fmt(r['file_mb'], 2)} |" for r in rows]
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    x = np.arange(len(models))
    w = 0.8 / len(methods)
    for ax, key, title in zip(axes, ("chair_s", "chair_i", "recall"), ("CHAIR_S", "CHAIR_I", "recall")):
        for j, meth in enumerate(methods):
            vals = [next((r[key] for r in rows if r["model"] == m and r["method"] == meth), 0) for m in models]
            ax.bar(x + j * w, vals, w, label=meth)
        ax.set_xticks(x + w * (len(methods) - 1) / 2, [m.replace(".gguf", "") for m in models], rotation=15)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register(sub) -> None:
    from .. import cluster

    p = sub.add_parser("compare", help="models (e.g. F16 vs Q8_0 vs Q4) x greedy/VHR: CHAIR, POPE, speed, memory")
    p.add_argument("-m", "--model", action="append", dest="models", metavar="MODEL",
                   help="text GGUF (repeat; default: the bundled testbed F16, Q8_0, Q4_K_M)")
    p.add_argument("--mmproj", help="vision projector shared by the models (default: the one beside each model)")
    p.add_argument("--testbed", default="counterfactual", choices=["indist", "counterfactual"])
    p.add_argument("-n", type=int, default=100, help="images for CHAIR (100)")
    p.add_argument("--pope-n", type=int, default=50, help="images for POPE (50; 0 = skip POPE)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=None, help="VHR alpha (default: each model's profile, else 2)")
    p.add_argument("--layers", default=None, help="VHR layer set (default: each model's profile, else auto)")
    p.add_argument("--profile", action="append", dest="profiles", metavar="FILE", type=Path,
                   help="VHR profile, one per -m in the same order (default: <model stem>.vhr-profile.json "
                        "beside each model, if there is one)")
    p.add_argument("--no-profile", action="store_true", help="ignore profiles beside the models")
    p.add_argument("--max-tokens", type=int, default=512, help="max new tokens per caption (512, the paper's)")
    p.add_argument("-t", "--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/compare"))
    cluster.add_args(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from .. import cluster

    cluster.check_args(args)
    if args.n < 1 or args.pope_n < 0:
        raise ConfigError("-n must be >= 1 and --pope-n >= 0")
    if args.alpha is not None and not args.alpha > 0:
        raise ConfigError(f"--alpha must be > 0, got {args.alpha}")
    if args.profiles and args.no_profile:
        raise ConfigError("give --profile FILE or --no-profile, not both")
    models = [Path(m) for m in args.models] if args.models else default_models()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = compare(models, Path(args.mmproj) if args.mmproj else None, args.out, split=args.testbed, n=args.n,
                   pope_n=args.pope_n, seed=args.seed, alpha=args.alpha, threads=args.threads,
                   max_tokens=args.max_tokens, layers=args.layers, profiles=args.profiles, no_profile=args.no_profile,
                   ray_args=args if args.ray else None)
    md = markdown(rows)
    (args.out / "compare.md").write_text(md + "\n")
    with open(args.out / "compare.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS)
        wr.writeheader()
        wr.writerows(rows)
    chart(rows, args.out / "compare.png")
    print(md)
    print(f"\nwrote {args.out}/compare.md, compare.csv, compare.png", file=sys.stderr)
    return 0
