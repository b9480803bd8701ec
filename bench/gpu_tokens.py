"""CPU against GPU on the testbed: the same greedy tokens, VHR and plain?

    python bench/gpu_tokens.py [-m MODEL] [-n 96] [-ngl -1] [IMG ...]

Default: the bundled testbed F16 on the three examples/*_without_*.png, VHR (the profile beside
the model, as `vhr-edge caption` uses it) and plain, 96 new tokens. Each device runs in its own
Session (first -ngl 0, then -ngl N with N = -1: every layer and the vision projector on the GPU
of a CUDA or Metal build of llama-cpp-python). Prints, per image and mode, whether the token
lists are equal (else where they first differ), whether VHR selected the same heads, the max
|VHD| difference, and the median caption time on each device; the last line is one JSON object.
Bit-identical tokens are not guaranteed across backends (other kernels, other rounding), so a
divergence is reported with its position, not treated as a crash.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_device(model, mmproj, images, n, ngl, vhr_kwargs) -> dict:
    from vhr_edge import Session

    out = {}
    with Session(model, mmproj, n_gpu_layers=ngl) as s:
        s.caption(str(images[0]), n_predict=4)  # warm-up (contexts, kernels)
        for img in images:
            for mode in ("vhr", "plain"):
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    r = s.caption(str(img), n_predict=n, vhr=(mode == "vhr"), **(vhr_kwargs if mode == "vhr" else {}))
                    times.append(time.perf_counter() - t0)
                out[(img.name, mode)] = {"tokens": list(r.tokens), "text": r.text,
                                         "heads": {int(k): list(v) for k, v in r.vhr.selected_heads.items()},
                                         "vhd": np.asarray(r.vhr.vhd, np.float64), "s": statistics.median(times),
                                         "scaling": r.vhr.decode_scaling}
    return out


def main() -> None:
    from vhr_edge.bundled import default_model
    from vhr_edge.flags import find_mmproj
    from vhr_edge.profile import resolve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", type=Path)
    ap.add_argument("-m", "--model", type=Path, default=None, help="text GGUF (default: the bundled testbed F16)")
    ap.add_argument("--mmproj", type=Path, default=None)
    ap.add_argument("-n", type=int, default=96)
    ap.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=-1)
    a = ap.parse_args()
    model = a.model or default_model()
    if model is None:
        raise SystemExit("gpu_tokens: no model (pass -m)")
    mmproj = a.mmproj or find_mmproj(str(model))
    images = a.images or sorted((ROOT / "examples").glob("*_without_*.png"))
    prof = resolve(str(model))
    vhr_kwargs = {"alpha": prof.alpha, "layers": prof.layers_spec}

    cpu = run_device(model, mmproj, images, a.n, 0, vhr_kwargs)
    gpu = run_device(model, mmproj, images, a.n, a.n_gpu_layers, vhr_kwargs)
    rows = []
    for key in cpu:
        c, g = cpu[key], gpu[key]
        diverge = next((i for i, (x, y) in enumerate(zip(c["tokens"], g["tokens"])) if x != y),
                       None if len(c["tokens"]) == len(g["tokens"]) else min(len(c["tokens"]), len(g["tokens"])))
        rows.append({"image": key[0], "mode": key[1], "same_tokens": diverge is None, "first_difference": diverge,
                     "n_tokens": [len(c["tokens"]), len(g["tokens"])],
                     "same_heads": c["heads"] == g["heads"],
                     "max_vhd_diff": float(np.max(np.abs(c["vhd"] - g["vhd"]))) if c["vhd"].size else 0.0,
                     "cpu_s": round(c["s"], 3), "gpu_s": round(g["s"], 3),
                     "scaling": [c["scaling"], g["scaling"]]})
    print(f"model {Path(model).name}, {a.n} tokens, VHR alpha {prof.alpha:g} layers {prof.layers_spec}; "
          f"CPU -ngl 0 vs GPU -ngl {a.n_gpu_layers}")
    for r in rows:
        same = "same tokens" if r["same_tokens"] else f"DIFFER from token {r['first_difference']}"
        print(f"  {r['image']:<32} {r['mode']:<6} {same:<24} heads {'same' if r['same_heads'] else 'DIFFER'}  "
              f"max|dVHD| {r['max_vhd_diff']:.2e}  CPU {r['cpu_s'] * 1000:7.1f} ms  GPU {r['gpu_s'] * 1000:7.1f} ms "
              f"({'/'.join(x or '-' for x in r['scaling'])})")
        if not r["same_tokens"]:
            c, g = cpu[(r["image"], r["mode"])], gpu[(r["image"], r["mode"])]
            print(f"      CPU: {c['text']!r}\n      GPU: {g['text']!r}")
    print(json.dumps({"all_same_tokens": all(r["same_tokens"] for r in rows),
                      "all_same_heads": all(r["same_heads"] for r in rows), "rows": rows}))


if __name__ == "__main__":
    main()
