#!/usr/bin/env bash
# Regenerate every testbed number in docs/results.md and the model card, in the order they
# depend on each other (each step is resumable: a killed run, started again, continues):
#   1. calibrate the three bundled files (seed 2000 scenes) -> models/*.vhr-profile.json, docs/calibration/
#   2. held-out CHAIR (counterfactual, seed 1000, 200 scenes, 96 tokens): greedy, the profile, its
#      random-heads control; on F16 also the joint variant (the VHD-reference ablation) -> eval report
#   3. vhr-edge compare (100 scenes + POPE) -> docs/compare.png
#   4. the model card's held-out metrics (release --skip-export) and the card itself
#   5. the two T-VHD traces of the fork example
# About 40 minutes on an idle 2-core machine. Usage: bash bench/testbed_results.sh [STEP ...]
set -euo pipefail
cd "$(dirname "$0")/.."
V=".venv/bin/vhr-edge"
T=(-t "${VHR_EDGE_THREADS:-1}")   # one thread: on a busy machine a spinning thread pool costs far more than it gives
PY=.venv/bin/python
STEMS="testbed-f16 testbed-q8_0 testbed-q4_k_m"
steps=${*:-"1 2 3 4 5"}
mkdir -p results/calibrate results/heldout

for step in $steps; do
  case $step in
  1)
    for s in $STEMS; do
      $V calibrate "${T[@]}" -m models/$s.gguf -n 100 --max-tokens 96 --out results/calibrate/$s --no-progress --json \
        | tail -1 > results/calibrate/$s.decision.json
      cp results/calibrate/$s/sweep.md docs/calibration/$s-sweep.md
    done ;;
  2)
    for s in $STEMS; do
      o=results/heldout/$s
      common=("${T[@]}" -m models/$s.gguf --testbed counterfactual --seed 1000 -n 200 --max-tokens 96 --out $o --no-progress --json)
      $V eval chair "${common[@]}" --no-vhr
      $V eval chair "${common[@]}"                    # the profile beside the model (else the paper rule)
      $V eval chair "${common[@]}" --random-heads     # its control: as many heads, chosen at random
      if [ "$s" = testbed-f16 ]; then
        $V eval chair "${common[@]}" --vhd-reference joint   # the earlier variant: both prompts scaled
      fi
      $V eval report $o --md $o/report.md
    done ;;
  3)
    $V compare "${T[@]}" --out results/compare
    cp results/compare/compare.png docs/compare.png ;;
  4)
    $PY -m vhr_edge.testbed.release "${T[@]}" --models models -n 200 --skip-export
    $PY -m vhr_edge.testbed.card ;;
  5)
    $V trace "${T[@]}" examples/fork_without_knife.png --objects fork --out docs/trace_fork
    $V trace "${T[@]}" examples/fork_without_knife.png --objects fork --out docs/trace_fork_knife \
      --caption "This is a picture of a kitchen counter. There is a fork in red on the left and a knife in blue on the right." ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
