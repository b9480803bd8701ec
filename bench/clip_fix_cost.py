"""What vhr-edge's correction of llama.cpp's LLaVA vision graph costs (clip_fix: the class token
put first by an eval callback on libmtmd's vision graph), measured side by side in one run.

    python bench/clip_fix_cost.py [--mmproj MMPROJ.gguf -m TEXT.gguf] [--runs 11] [-t 2]

Default: the 7B-shaped pair of `bench/overhead.py --7b` (CLIP with a class token, 336 px, 576
image rows; written on first use). Each run encodes the same image with the correction and as
llama.cpp runs it (`mmproj_as_is`), interleaved; printed: median encode times and the median of
the per-run ratios. When the mmproj also needs the feature-layer correction (files made by
llama.cpp's legacy converter), the corrected side runs one vision block more: that is part of
what the correction costs, and the output says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # overhead.models_7b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path)
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("-t", "--threads", type=int, default=0)
    a = ap.parse_args()

    from vhr_edge import Session

    if a.mmproj is None:
        from overhead import models_7b

        models, mmproj = models_7b(a.threads, 8)
        model = models[0]
    else:
        model, mmproj = a.model, a.mmproj
        if model is None:
            ap.error("--mmproj needs -m (the text model it goes with)")
    img = np.asarray(Image.open(ROOT / "examples/fork_without_knife.png").convert("RGB").resize((336, 336)))
    sessions = {name: Session(model, mmproj, n_threads=a.threads, mmproj_as_is=as_is, notice=None)
                for name, as_is in (("corrected", False), ("as_is", True))}
    plan = sessions["corrected"].mmproj_plan
    if not plan.class_token_first:
        print(f"{mmproj.name} has no class token: nothing to correct", file=sys.stderr)
        return 1
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.encode_image(img)  # warm-up
    for _ in range(a.runs):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            rows = s.encode_image(img)
            times[name].append((time.perf_counter() - t0) * 1e3)
    ratios = [c / p for c, p in zip(times["corrected"], times["as_is"])]
    print(f"{mmproj.name}: {rows.shape[0]} image rows, {a.runs} runs"
          + (" (the corrected side also runs the vision block llama.cpp's converter dropped)"
             if plan.feature_layer is not None else ""))
    for name, ts in times.items():
        print(f"  {name:10s} encode median {statistics.median(ts):8.1f} ms")
    print(f"  corrected / as-is: {statistics.median(ratios):.4f} (median of per-run ratios)")
    for s in sessions.values():
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
