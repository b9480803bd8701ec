"""VHR's cost against plain decoding, measured side by side (issue 5's goals, printed, not asserted).

    python bench/overhead.py [--quick] [-m MODEL.gguf ... --mmproj MMPROJ] [--runs 7] [--tokens 64]
    python bench/overhead.py --7b          # LLaVA-1.5-7B decoder widths, 8 of 32 layers, Q4_0 + Q4_K_M
    python bench/overhead.py --7b -ngl -1  # the same with every layer on the GPU (CUDA build)

For each model (default: the bundled testbed F16, Q8_0, Q4_K_M; --quick: F16 only, fewer
runs): the same image and prompt, a FIXED number of generated tokens (EOS ignored), runs
interleaved after a warm-up, medians and the median of the per-run ratios to plain. Modes:
  vhr           VHR as released: the text-only reference comes from the session's cache (warm),
                the image prefill holds the rows of a plain caption; decoding folds the heads
                into W_o where that is exact, else uses the callback
  vhr_cold      the same with the reference cache emptied first: the first image of a prompt
                pays the text-only reference pass once (timings.reference_ms)
  vhr_joint     the earlier joint variant (--vhd-reference joint): the text-only prompt rides
                in the image prefill as a second sequence, for every image (the "before")
  vhr_callback  VHR (warm) with the per-step callback instead of the fold
  plain         --no-vhr
Goals (warm cache): latency VHR/plain <= 1.02, first-token cost <= 1.03, decode tokens/s >= 0.97,
peak RSS (each mode in its own child process) <= 1.05; the cold cost is reported separately.
The last line is one JSON object {"latency_ratio", "first_token_ratio", "decode_ratio",
"rss_ratio", "cold_first_token_ratio", "joint_first_token_ratio"} (first model).

--7b: random weights with LLaVA-1.5-7B's decoder shapes (n_embd 4096, 32 heads, n_ff 11008,
vocab 32000; 8 of the 32 layers, so the "auto" layer set scales to 1, 4..7) in Q4_0 and Q4_K_M,
and an mmproj that yields 576 image tokens: the text-only prefill, the callback and the
per-token scaling at real widths and token counts. Written once (~1 min, ~4 GB of RAM) into
$VHR_EDGE_CACHE or ~/.cache/vhr-edge/bench-7b, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"latency_ratio": ("<=", 1.02), "first_token_ratio": ("<=", 1.03), "decode_ratio": (">=", 0.97),
         "rss_ratio": ("<=", 1.05)}
MODES = ("vhr", "vhr_cold", "vhr_joint", "vhr_callback", "plain")


def bench_image() -> np.ndarray:
    from vhr_edge.testbed.scenes import make_split, render

    return np.asarray(render(make_split("counterfactual", 1, 4321)[0]))


def default_models(quick: bool) -> tuple[list[Path], Path]:
    models = ROOT / "models"
    names = ["testbed-f16.gguf"] + ([] if quick else ["testbed-q8_0.gguf", "testbed-q4_k_m.gguf"])
    if (models / names[0]).is_file():
        return [models / n for n in names], models / "testbed-mmproj-f16.gguf"
    from vhr_edge import fixtures  # no testbed yet: a tiny random model

    d = Path(tempfile.mkdtemp(prefix="vhr-bench-"))
    text, mmproj = fixtures.write_tiny_llava(d, fixtures.TinySpec(n_layer=8))
    return [text], mmproj


def cache_dir() -> Path:
    return Path(os.environ.get("VHR_EDGE_CACHE", Path.home() / ".cache" / "vhr-edge")) / "bench-7b"


def models_7b(threads: int, n_layer: int = 8) -> tuple[list[Path], Path]:
    """The 7B-shaped Q4_0 / Q4_K_M text models and their mmproj, written on first use."""
    from vhr_edge import fixtures

    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    spec = fixtures.llava_7b_shaped(n_layer=n_layer)
    names = {"Q4_0": d / f"llava7b-shaped-{n_layer}l-q4_0.gguf", "Q4_K_M": d / f"llava7b-shaped-{n_layer}l-q4_k_m.gguf"}
    mmproj = d / "llava7b-shaped-mmproj.gguf"
    if not mmproj.is_file():
        fixtures.write_mmproj(mmproj.with_suffix(".tmp"), spec).rename(mmproj)
    missing = {k: v for k, v in names.items() if not v.is_file()}
    if missing:
        f16 = d / f"llava7b-shaped-{n_layer}l-f16.gguf"
        t0 = time.time()
        print(f"writing the 7B-shaped model into {d} (once) ...", flush=True)
        fixtures.write_text_model(f16, spec)
        for ftype, path in missing.items():
            fixtures.quantize(f16, path.with_suffix(".tmp"), ftype, n_threads=max(1, threads or os.cpu_count() or 1))
            path.with_suffix(".tmp").rename(path)
        f16.unlink()
        print(f"  done in {time.time() - t0:.0f} s", flush=True)
    return list(names.values()), mmproj


def one(session, img, mode: str, tokens: int, warm_up: bool = False) -> dict:
    """One caption in `mode` (MODES): wall latency, decode speed, first-token cost."""
    kw = {"vhr": mode != "plain", "fold_weights": mode != "vhr_callback",
          "reference": "joint" if mode == "vhr_joint" else "released"}
    if mode == "vhr_cold":
        session.clear_reference_cache()
    t0 = time.perf_counter()
    r = session.caption(img, n_predict=tokens, ignore_eos=True, **kw)
    wall = (time.perf_counter() - t0) * 1000.0
    t = r.timings
    if mode == "vhr" and not warm_up:
        assert r.vhr.reference_cached, "the warm mode found no cached reference"
    return {"latency_ms": wall, "decode_tps": t.tokens_per_s,
            "first_ms": t.image_encode_ms + t.reference_ms + t.prefill_ms, "reference_ms": t.reference_ms,
            "rows": t.n_prompt_rows, "scaling": r.vhr.decode_scaling}


def child_peak_rss(model: Path, mmproj: Path, mode: str, tokens: int, threads: dict, captions: int = 3) -> float:
    """Peak RSS (MB) of a fresh process that loads the model and captions `captions` times in `mode`."""
    code = ("import sys, numpy as np; sys.path.insert(0, %r); from bench.overhead import bench_image; "
            "from vhr_edge import Session; s = Session(%r, %r, **%r); img = bench_image(); "
            "[s.caption(img, vhr=%r, n_predict=%d, ignore_eos=True) for _ in range(%d)]"
            % (str(ROOT), str(model), str(mmproj), threads, mode == "vhr", tokens, captions))
    p = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"child for {model.name} ({mode}) failed")
    return usage.ru_maxrss / 1024.0


def bench_model(model: Path, mmproj: Path, runs: int, tokens: int, threads: dict, rss_captions: int = 3) -> dict:
    """threads: Session's n_threads / n_threads_batch / n_gpu_layers."""
    from vhr_edge import Session

    s = Session(model, mmproj, **threads)
    img = bench_image()
    for mode in MODES:  # warm-up: contexts created, caches hot
        one(s, img, mode, tokens, warm_up=True)
    xs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(runs):  # interleaved, so drift hits every mode alike
        for mode in MODES:
            xs[mode].append(one(s, img, mode, tokens))
    s.close()
    plain = xs["plain"]
    med = lambda mode, k: statistics.median(x[k] for x in xs[mode])  # noqa: E731
    pair = lambda mode, k: statistics.median(x[k] / y[k] for x, y in zip(xs[mode], plain))  # noqa: E731
    rss_vhr = child_peak_rss(model, mmproj, "vhr", tokens, threads, rss_captions)
    rss_plain = child_peak_rss(model, mmproj, "plain", tokens, threads, rss_captions)
    out = {"model": model.name, "runs": runs, "tokens": tokens, "decode_scaling": xs["vhr"][0]["scaling"],
           "prefill_rows": {m: xs[m][0]["rows"] for m in MODES},
           "cold_reference_ms": round(med("vhr_cold", "reference_ms"), 2)}
    for mode in MODES:
        out[mode] = {k: round(med(mode, k), 2) for k in ("latency_ms", "decode_tps", "first_ms")}
    out.update({"latency_ratio": round(pair("vhr", "latency_ms"), 4), "decode_ratio": round(pair("vhr", "decode_tps"), 4),
                "first_token_ratio": round(pair("vhr", "first_ms"), 4)})
    for mode, name in (("vhr_cold", "cold"), ("vhr_joint", "joint"), ("vhr_callback", "callback")):
        for k, key in (("latency_ms", "latency"), ("first_ms", "first_token"), ("decode_tps", "decode")):
            out[f"{name}_{key}_ratio"] = round(pair(mode, k), 4)
    out["rss_mb"] = {"vhr": round(rss_vhr, 1), "plain": round(rss_plain, 1)}
    out["rss_ratio"] = round(rss_vhr / rss_plain, 4)
    return out


def verdict(key: str, value: float) -> str:
    op, goal = GOALS[key]
    ok = value <= goal if op == "<=" else value >= goal
    return f"{'PASS' if ok else 'MISS'} ({op} {goal})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="F16 only, 5 runs, 32 tokens (< 3 min)")
    ap.add_argument("--7b", dest="shaped_7b", action="store_true",
                    help="the 7B-shaped random models (Q4_0, Q4_K_M); default 5 runs, 48 tokens")
    ap.add_argument("-m", "--model", action="append", type=Path)
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--runs", type=int, help="counted runs per mode (7; --7b: 5; at least 5)")
    ap.add_argument("--tokens", type=int, help="tokens per caption (64; --7b: 48)")
    ap.add_argument("-t", "--threads", type=int, default=0, help="decode threads (default: all)")
    ap.add_argument("-tb", "--threads-batch", type=int, default=0, help="prefill / encoder threads (default: as -t)")
    ap.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0,
                    help="layers on the GPU (-1 = all; needs a GPU build of llama-cpp-python); peak RSS is host memory")
    ap.add_argument("--n-layer", type=int, default=8,
                    help="--7b: decoder layers of the written model (8; 32 is the real depth, ~13 GB to write)")
    a = ap.parse_args()
    threads = {"n_threads": a.threads, "n_threads_batch": a.threads_batch, "n_gpu_layers": a.n_gpu_layers}
    rss_captions = 3
    if a.shaped_7b:
        models, mmproj = models_7b(a.threads, a.n_layer)
        rss_captions = 1
    elif a.model:
        models, mmproj = a.model, a.mmproj
    else:
        models, mmproj = default_models(a.quick)
    # --7b: 48 tokens, so decoding is ~2 s of an ~11 s caption: enough for a stable decode ratio
    runs, tokens = (5, 32) if a.quick else (max(5, a.runs or (5 if a.shaped_7b else 7)),
                                            a.tokens or (48 if a.shaped_7b else 64))
    results = []
    print(f"{'model':<24} {'mode':<12} {'latency ms':>11} {'decode tok/s':>13} {'first-token ms':>15} {'peak RSS MB':>12}")
    for m in models:
        r = bench_model(m, mmproj, runs, tokens, threads, rss_captions)
        results.append(r)
        for mode in MODES:
            x = r[mode]
            rss = r["rss_mb"].get(mode)
            print(f"{r['model']:<24} {mode:<12} {x['latency_ms']:>11.1f} {x['decode_tps']:>13.1f} "
                  f"{x['first_ms']:>15.1f} {f'{rss:.1f}' if rss else '-':>12}")
        print(f"  decoding scales the heads by: {r['decode_scaling']}; prefill rows: {r['prefill_rows']}")
        for key in ("latency_ratio", "first_token_ratio", "decode_ratio", "rss_ratio"):
            print(f"  {key:<18} {r[key]:.4f}  {verdict(key, r[key])}   (warm reference cache)")
        print(f"  cold (first image of a prompt: +{r['cold_reference_ms']:.1f} ms reference pass): "
              f"latency {r['cold_latency_ratio']:.4f}, first token {r['cold_first_token_ratio']:.4f}")
        print(f"  before (joint variant, text rows in every prefill): latency {r['joint_latency_ratio']:.4f}, "
              f"first token {r['joint_first_token_ratio']:.4f}")
        print(f"  with the callback at every step instead of the fold: latency {r['callback_latency_ratio']:.4f}, "
              f"decode {r['callback_decode_ratio']:.4f}")
    r0 = results[0]
    print(json.dumps({k: r0[k] for k in ("latency_ratio", "first_token_ratio", "decode_ratio", "rss_ratio",
                                         "cold_first_token_ratio", "joint_first_token_ratio")}))


if __name__ == "__main__":
    main()
