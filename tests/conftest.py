"""Shared fixtures: tiny LLaVA pairs written with the gguf package (vhr_edge.fixtures)."""

from __future__ import annotations

import numpy as np
import pytest

from vhr_edge import fixtures

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
