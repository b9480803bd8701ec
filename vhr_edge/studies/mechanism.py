"""Issue 19: does VHR's mechanism exist in the testbed, and what could head reinforcement achieve?

    python -m vhr_edge.studies.mechanism STAGE [--out results/mechanism] [--docs docs] [-t 1]

Stages (each resumable: every caption is one line of a JSONL run, see eval/run.py; a killed
stage started again continues; `all` runs them in order):

  trace    `vhr-edge trace` batch mode (plain greedy captions, --no-vhr) on the bundled F16,
           Q8_0 and Q4_K_M files, in-distribution and counterfactual, 200 scenes, seed 1000
  search   calibration split (counterfactual scenes, seed 2000, 100 scenes), F16: greedy and a
           grid of layer sets x heads per layer (top 1 / 2 / the median rule = 4 of 8) x alpha
  probe    the teacher-forced oracle probe (studies/probe.py) on the calibration greedy captions
  oracle   the probe's head sets on the calibration split
  heldout  the best settings on the held-out split (seed 1000, 200 scenes) against greedy and
           random heads with the same counts (several seeds); plus the per-image oracle ceiling
  report   tables (markdown) and plots: OUT/tables.md, DOCS/mechanism_*.png

Everything runs with one thread (-t 1): on a shared 2-core machine ggml's thread pool loses
more to waiting than it gains.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"F16": "testbed-f16.gguf", "Q8_0": "testbed-q8_0.gguf", "Q4_K_M": "testbed-q4_k_m.gguf"}
SPLITS = ("indist", "counterfactual")
EVAL_SEED, EVAL_N = 1000, 200
CAL_SEED, CAL_N = 2000, 100
MAX_TOKENS = 128  # captions are 20-40 words (about 45 tokens); caps broken generations
PAPER_LAYERS = "1,4-7"  # the paper rule on 8 layers (VHR_SPEC 3)
ALL_LAYERS = "0-7"
ALPHAS = (1.25, 1.5, 2.0, 3.0)
RANDOM_SEEDS = (1, 2, 3, 4, 5)


def exe() -> str:
    return str(Path(sys.executable).with_name("vhr-edge"))


# ---- stage 1: T-VHD at scale -------------------------------------------------------------------

def trace_command(model: str, split: str, out: Path, threads: int) -> list[str]:
    return [exe(), "trace", "--testbed", split, "-n", str(EVAL_N), "--seed", str(EVAL_SEED), "--no-vhr",
            "-m", str(ROOT / "models" / MODELS[model]), "-t", str(threads), "-tb", str(threads),
            "--out", str(out / f"trace-{model}-{split}"), "--no-progress", "--json"]


def stage_trace(out: Path, threads: int) -> dict:
    res = {}
    for model in MODELS:
        for split in SPLITS:
            cmd = trace_command(model, split, out, threads)
            print("$ " + " ".join(cmd), flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"trace failed: {r.stderr.strip()}")
            res[f"{model}/{split}"] = json.loads(r.stdout.strip().splitlines()[-1])
            s = res[f"{model}/{split}"]
            print(f"  {model} {split}: AUROC {s['auroc']} {s['auroc_ci']}  real {s['n_real']} "
                  f"hall {s['n_hallucinated']}", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vhr_edge.studies.mechanism", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["trace", "search", "probe", "oracle", "heldout", "report", "all"])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "mechanism")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    p.add_argument("-t", "--threads", type=int, default=1)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("VHR_EDGE_MODEL", None)
    if a.stage in ("trace", "all"):
        stage_trace(a.out, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
