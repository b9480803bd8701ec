"""Shared fixtures: tiny LLaVA pairs written with the gguf package (vhr_edge.fixtures).

VHR_EDGE_TEST_NGL=-1 (bench/gpu_check.sh sets it on a GPU machine) makes every Session the
tests open offload that many layers (and the vision projector) to the GPU, unless the test
passes n_gpu_layers itself.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vhr_edge import fixtures
from vhr_edge import session as _session

TEST_NGL = int(os.environ.get("VHR_EDGE_TEST_NGL", "0"))
if TEST_NGL and not getattr(_session.Session.__init__, "_test_ngl", False):
    _plain_init = _session.Session.__init__

    @functools.wraps(_plain_init)
    def _init_with_ngl(self, *args, **kwargs):
        kwargs.setdefault("n_gpu_layers", TEST_NGL)
        _plain_init(self, *args, **kwargs)

    _init_with_ngl._test_ngl = True
    _session.Session.__init__ = _init_with_ngl

# `make test` sets this: the tests against the PyTorch/transformers oracle (the `oracle` extra)
# must run there, so a torch that stops importing fails the suite instead of skipping it.
REQUIRE_ORACLE_ENV = "VHR_EDGE_REQUIRE_ORACLE"


def oracle_import(name: str):
    """pytest.importorskip for a module of the `oracle` extra (torch, transformers, ...):
    a user without the extra skips those tests; with $VHR_EDGE_REQUIRE_ORACLE=1 (`make test`)
    a module that does not import is a failure."""
    if os.environ.get(REQUIRE_ORACLE_ENV, "") not in ("", "0"):
        try:
            return importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken install raising something else
            pytest.fail(f"{name} does not import ({type(e).__name__}: {e}) but {REQUIRE_ORACLE_ENV}=1 requires the "
                        "oracle tests: install the oracle extra (make setup), or unset it to skip them", pytrace=False)
    return pytest.importorskip(name)


def kill_after_lines(args: list, path, n_lines: int = 3, env=None, timeout: float = 120.0) -> int:
    """Start `args`, SIGKILL it once `path` holds n_lines finished lines, and return how many
    lines were on disk then (the run was killed mid-way; a resumable command is then restarted)."""
    import signal
    import subprocess
    import time

    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n_lines:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the run ended before it could be killed (rc {p.returncode})"
    return path.read_bytes().count(b"\n")


def spec_select(d, ta, outlier_rule: bool = True) -> list[int]:
    """VHR_SPEC 2-3 for one layer, written from the spec's text in numpy (neither vhr_core's C++
    nor the oracle's torch): D squared as given, the outlier rule with the unbiased std (ddof=1)
    only when std(D) > 1, then the heads strictly above the median."""
    d = np.asarray(d, np.float64).copy()
    ta = np.asarray(ta, np.float64)
    if outlier_rule and d.std(ddof=1) > 1:
        d[(d > d.mean() + d.std(ddof=1)) & (ta > ta.mean() + ta.std(ddof=1))] = 0.0
    return [int(i) for i in np.flatnonzero(d > np.median(d))]


# 8 layers so that "auto" is the spec's proportional set {1, 4..7}.
SPEC = fixtures.TinySpec(n_layer=8, n_embd=64, n_head=4, n_ff=128, seed=0)
GQA_SPEC = fixtures.TinySpec(n_layer=8, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(text.gguf, mmproj.gguf) of the F32 tiny model."""
    return fixtures.write_tiny_llava(tmp_path_factory.mktemp("tiny"), SPEC, name="tiny")


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory):
    return fixtures.write_tiny_llava(tmp_path_factory.mktemp("gqa"), GQA_SPEC, name="gqa")


@pytest.fixture(scope="session")
def session(tiny):
    from vhr_edge import Session

    s = Session(*tiny, n_threads=2)
    yield s
    s.close()


def scene(seed: int, size: int = 64) -> np.ndarray:
    """A deterministic test picture: a few coloured blocks on noise."""
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, size - size // 4, 2)
        img[y : y + size // 4, x : x + size // 4] = rng.integers(0, 256, 3)
    return img


@pytest.fixture
def image_a():
    return scene(1)


@pytest.fixture
def image_b():
    return scene(2)


def stderr_lines(stderr: str) -> list[str]:
    """stderr's lines without the one-line notice a session gives with its first image when it
    corrects llama.cpp's LLaVA vision graph (the tiny fixture's CLIP tower has a class token, so
    the class-token correction applies to it; vhr_edge/mmproj.py)."""
    return [l for l in stderr.strip().splitlines() if "correcting llama.cpp's LLaVA vision graph" not in l]


# ---- the CLI as a user runs it: a child process, without this machine's vhr-edge / Ray settings

EXE = [sys.executable, "-m", "vhr_edge.cli"]


def clean_env(**extra) -> dict:
    """os.environ without $VHR_EDGE_* and $RAY_* (a developer's own model or cluster), plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VHR_EDGE_", "RAY_"))}
    env.update(extra)
    return env


def cli(*args, timeout: float = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`vhr-edge ARGS` in a clean environment; output captured as text."""
    return subprocess.run(EXE + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(**(extra_env or {})))


def lines(path) -> list:
    """The JSON objects of a JSONL file."""
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def hf_image_and_text_forward(model, prefix, rows, tail, layers, o_proj_hook):
    """One uncached transformers forward of the image prompt [prefix, image rows, tail] and its
    text-only counterpart [prefix, tail] as a right-padded batch of two. o_proj_hook(layer, a,
    last0, last1) sees the o_proj input a ([2, positions, n_embd]) of each layer in `layers` and
    the two sequences' last positions; what it returns (if not None) replaces a. Returns the
    image sequence's logits at its last position."""
    import torch

    emb = model.get_input_embeddings()
    with torch.no_grad():
        pre = emb(torch.as_tensor(list(prefix), dtype=torch.long))
        txt = emb(torch.as_tensor(list(tail), dtype=torch.long))
        seq0 = torch.cat([pre, torch.as_tensor(np.asarray(rows, np.float32)), txt])
        seq1 = torch.cat([pre, txt])
        L0, L1 = seq0.shape[0], seq1.shape[0]
        x = torch.zeros(2, L0, seq0.shape[1])
        x[0], x[1, :L1] = seq0, seq1
        mask = torch.zeros(2, L0, dtype=torch.long)
        mask[0], mask[1, :L1] = 1, 1

        def pre_hook_for(layer):
            def pre_hook(mod, args):
                a = o_proj_hook(layer, args[0], L0 - 1, L1 - 1)
                return None if a is None else (a,) + args[1:]
            return pre_hook

        hs = [model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(pre_hook_for(l)) for l in layers]
        try:
            out = model(inputs_embeds=x, attention_mask=mask, position_ids=torch.arange(L0).repeat(2, 1),
                        use_cache=False)
        finally:
            for h in hs:
                h.remove()
    return out.logits[0, L0 - 1].float().numpy()
