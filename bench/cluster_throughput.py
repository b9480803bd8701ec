"""Throughput of `vhr-edge eval chair` on a local Ray cluster against one local process.

    python bench/cluster_throughput.py [-n 40] [--rounds 2] [--max-tokens 512]

Starts a throwaway Ray head on 127.0.0.1 with this machine's CPUs (tests/raycluster.py), then
runs the same greedy CHAIR evaluation (bundled testbed model, counterfactual split) as
  local       one process, -t = all CPUs (the reference of the ratios)
  local -t 1  one process, one thread
  ray 1xN     --ray, one actor with -t = all CPUs
  ray Nx1     --ray, one actor per CPU with -t 1
alternating the order each round, each run into a fresh folder (wall time includes start-up,
connecting and loading the model). Prints images/s, the ratio to the local run of the same
round, and whether the captions match the local run's (--one-thread: only `local -t 1`, the
reference then, and `ray Nx1`). One machine: expect about the same
throughput; this measures the plumbing, not a speed-up.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from raycluster import LocalCluster  # noqa: E402


def run(args: list[str]) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VHR_EDGE_", "RAY_"))}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "vhr_edge.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"failed: vhr-edge {' '.join(args)}\n{r.stderr[-2000:]}")
    return wall, json.loads(r.stdout.strip().splitlines()[-1])


def captions(path: Path) -> dict:
    return {json.loads(x)["image_id"]: json.loads(x)["caption"] for x in path.read_text().splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--one-thread", action="store_true",
                    help="only 'local -t 1' (the reference) and one actor per CPU with -t 1")
    a = ap.parse_args()
    cpus = os.cpu_count() or 2
    base = ["eval", "chair", "--testbed", "counterfactual", "--seed", "1000", "-n", str(a.n), "--no-vhr",
            "--max-tokens", str(a.max_tokens), "--json", "--no-progress"]
    t0 = time.perf_counter()
    cluster = LocalCluster(num_cpus=cpus)
    print(f"local Ray cluster up in {time.perf_counter() - t0:.1f} s ({cpus} CPUs)", flush=True)
    configs = {"local": ["-t", str(cpus)],
               "local -t 1": ["-t", "1"],
               f"ray 1x{cpus}": ["-t", str(cpus), "--ray", cluster.address, "--workers", "1"],
               f"ray {cpus}x1": ["-t", "1", "--ray", cluster.address, "--workers", str(cpus)]}
    if a.one_thread:
        configs = {k: configs[k] for k in ("local -t 1", f"ray {cpus}x1")}
    ref = next(iter(configs))
    walls: dict[str, list[float]] = {k: [] for k in configs}
    ratios: dict[str, list[float]] = {k: [] for k in configs}
    same: dict[str, bool] = {k: True for k in configs}
    summaries = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(a.rounds):
                order = list(configs) if rnd % 2 == 0 else list(reversed(configs))
                got = {}
                for name in order:
                    out = Path(tmp) / f"{rnd}-{name.replace(' ', '_')}"
                    wall, summary = run(base + configs[name] + ["--out", str(out)])
                    got[name] = (wall, captions(out / "chair-greedy.jsonl"))
                    summaries[name] = summary
                    print(f"round {rnd + 1} {name:>10}: {wall:6.1f} s  {a.n / wall:.3f} img/s", flush=True)
                for name, (wall, caps) in got.items():
                    walls[name].append(wall)
                    ratios[name].append(got[ref][0] / wall)
                    same[name] &= caps == got[ref][1]
    finally:
        cluster.stop()
    print(f"\n| run | wall s (median of {a.rounds}) | img/s | throughput vs {ref} (same round) | captions == {ref} |")
    print("|---|---|---|---|---|")
    for name in configs:
        w = statistics.median(walls[name])
        print(f"| {name} | {w:.1f} | {a.n / w:.3f} | {statistics.median(ratios[name]):.2f}x | "
              f"{'yes' if same[name] else 'NO'} |")
    print(f"\nsummaries equal: {all(s == summaries[ref] for s in summaries.values())}")


if __name__ == "__main__":
    main()
