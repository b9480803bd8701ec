# vhr-edge: `make demo` runs the main job, `make test` runs the whole test suite.
# Both set everything up first (virtualenv, llama-cpp-python, the native extension).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
NPROC  := $(shell nproc 2>/dev/null || echo 2)
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
DEMO_DIR ?= out/demo

.PHONY: setup build demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# llama.cpp itself, compiled from the llama-cpp-python sdist (~5-10 min the first time;
# pip caches the wheel, so later environments take seconds).
$(VENV)/.llama-cpp-python: | $(PY)
	CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) $(PIP) install -q "$(LLAMA_CPP_PYTHON)"
	touch $@

# The extension is compiled against the llama_cpp installed above: no build isolation.
build: $(VENV)/.llama-cpp-python
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIP) install -q --no-build-isolation -e ".[test]"

setup: build
	$(PIP) install -q --no-build-isolation -e ".[test,oracle,cluster]"

# The main job: caption the bundled counterfactual examples with the testbed model in models/
# (VHR and plain greedy side by side); without models/ it falls back to a random tiny model.
demo: build
	@mkdir -p $(DEMO_DIR)
	@if [ -f models/testbed-f16.gguf ]; then \
	  for img in examples/fork_without_knife.png examples/car_without_traffic_light.png examples/dog_without_ball.png; do \
	    echo "== $$img  (greedy, then VHR)"; \
	    $(VENV)/bin/vhr-edge caption $$img --no-vhr -n 96; \
	    $(VENV)/bin/vhr-edge caption $$img -n 96; \
	  done; \
	  $(VENV)/bin/vhr-edge caption examples/*_without_*.png -n 96 --json > $(DEMO_DIR)/captions.jsonl; \
	  echo "JSON lines (selected heads, VHD matrices, timings): $(DEMO_DIR)/captions.jsonl"; \
	else \
	  $(PY) -m vhr_edge.fixtures $(DEMO_DIR); \
	  $(VENV)/bin/vhr-edge caption examples/scene.png -m $(DEMO_DIR)/tiny-text.gguf --mmproj $(DEMO_DIR)/tiny-mmproj.gguf -n 24; \
	  $(VENV)/bin/vhr-edge caption examples/scene.png -m $(DEMO_DIR)/tiny-text.gguf --mmproj $(DEMO_DIR)/tiny-mmproj.gguf -n 24 --json > $(DEMO_DIR)/captions.jsonl; \
	  echo "JSON result (selected heads, VHD matrix, timings): $(DEMO_DIR)/captions.jsonl"; \
	fi

# VHR_EDGE_REQUIRE_ORACLE=1: the oracle tests (torch, transformers from the oracle extra) fail
# instead of skipping when those do not import, so `make test` cannot go green without them.
test: setup
	VHR_EDGE_REQUIRE_ORACLE=1 $(PY) -m pytest -q tests

clean:
	rm -rf build $(VENV) out
