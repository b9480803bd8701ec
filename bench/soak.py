"""Soak: many captions in one session; resident memory sampled as it goes.

    python bench/soak.py [-m MODEL --mmproj MMPROJ] [-n 1000] [--tokens 16] [--warmup 100]

Without -m it writes the tiny fixture model to a temporary folder. Alternates VHR and
--no-vhr captions over changing images (both llama.cpp contexts stay in use). Prints the RSS
curve and, last, one JSON object {"captions", "rss_warm_mb", "rss_end_mb", "growth", "pass"}:
growth = (end - warm) / warm after the warm-up, goal <= 0.05. Not a test assertion.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from vhr_edge import Session, fixtures


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model")
    p.add_argument("--mmproj")
    p.add_argument("-n", type=int, default=1000, help="captions")
    p.add_argument("--tokens", type=int, default=16, help="tokens per caption (ignore EOS)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--every", type=int, default=50, help="sample RSS every N captions")
    a = p.parse_args()

    if a.model:
        model, mmproj = a.model, a.mmproj
    else:
        tmp = tempfile.mkdtemp(prefix="vhr-soak-")
        model, mmproj = fixtures.write_tiny_llava(tmp, fixtures.TinySpec(n_layer=8))
    s = Session(model, mmproj)
    rng = np.random.default_rng(0)
    samples, warm = [], None
    t0 = time.perf_counter()
    for i in range(1, a.n + 1):
        img = rng.integers(0, 256, (int(rng.integers(32, 200)), int(rng.integers(32, 200)), 3), dtype=np.uint8)
        s.caption(img, n_predict=a.tokens, ignore_eos=True, vhr=(i % 2 == 0))
        if i == a.warmup:
            warm = rss_mb()
        if i % a.every == 0:
            samples.append((i, rss_mb()))
            print(f"{i:6d} captions  rss {samples[-1][1]:8.1f} MB  {(time.perf_counter() - t0) / i * 1000:6.1f} ms/caption",
                  flush=True)
    end = rss_mb()
    warm = warm or samples[0][1]
    growth = (end - warm) / warm
    print(f"RSS after warm-up {warm:.1f} MB, at the end {end:.1f} MB: growth {growth * 100:+.2f}% "
          f"({'PASS' if growth <= 0.05 else 'MISS'} against <= 5%)")
    print(json.dumps({"captions": a.n, "rss_warm_mb": round(warm, 1), "rss_end_mb": round(end, 1),
                      "growth": round(growth, 4), "pass": growth <= 0.05}))


if __name__ == "__main__":
    main()
