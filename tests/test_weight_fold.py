"""The W_o fold (weight_fold.h) on a real ggml tensor, byte for byte, against numpy.

The engine scales W_o where it lies in host memory (chunk_bytes 0 here) and moves it through
ggml_backend_tensor_get/set in chunks of whole rows when a GPU holds it. Here the tensor sits in
a ggml CPU buffer and the chunked path is forced with chunks of a few rows, so chunk edges (and a
last, shorter chunk) are crossed: the code a GPU runs, minus the device copy. The expected bytes
come from numpy and gguf-py's own Q8_0 / Q4_0 code, not from the engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from vhr_edge.engine import load

E = load()
NE0, NE1, N_HEAD = 128, 37, 4  # head_dim 32: one Q8_0 / Q4_0 block per head and row
HEADS = [1, 3]
ALPHA = 2.0


def head_cols(heads, head_dim=NE0 // N_HEAD):
    return np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def rows_f16(seed=0):
    return np.random.default_rng(seed).normal(0, 1, (NE1, NE0)).astype(np.float16)


CHUNKS = pytest.mark.parametrize("chunk_rows", [0, 1, 5, NE1], ids=["in-place", "1-row", "5-rows", "whole"])


@CHUNKS
def test_f16_fold_scales_exactly_the_heads_columns_and_undoes_bit_for_bit(chunk_rows):
    w = rows_f16()
    data = w.view(np.uint8).copy()
    chunk = chunk_rows * NE0 * 2
    assert E.scale_weight_bytes(data, "f16", NE0, HEADS, N_HEAD, ALPHA, chunk_bytes=chunk)
    got = data.view(np.float16)
    want = w.copy()
    want[:, head_cols(HEADS)] *= np.float16(ALPHA)
    np.testing.assert_array_equal(got, want)
    assert E.scale_weight_bytes(data, "f16", NE0, HEADS, N_HEAD, ALPHA, inverse=True, chunk_bytes=chunk)
    np.testing.assert_array_equal(data.view(np.uint8), w.view(np.uint8))


@CHUNKS
def test_f32_fold(chunk_rows):
    w = np.random.default_rng(1).normal(0, 1, (NE1, NE0)).astype(np.float32)
    data = w.view(np.uint8).copy()
    assert E.scale_weight_bytes(data, "f32", NE0, [0], N_HEAD, 4.0, chunk_bytes=chunk_rows * NE0 * 4)
    want = w.copy()
    want[:, head_cols([0])] *= 4
    np.testing.assert_array_equal(data.view(np.float32), want)


@pytest.mark.parametrize("chunk_rows", [0, 4], ids=["in-place", "4-rows"])
@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0], ids=["q8_0", "q4_0"])
def test_block_fold_equals_scaling_the_dequantized_columns(qtype, chunk_rows):
    w = rows_f16(2).astype(np.float32)
    q = quants.quantize(w, qtype)  # [NE1, bytes per row]
    data = q.copy()
    name = qtype.name.lower()
    assert E.scale_weight_bytes(data, name, NE0, HEADS, N_HEAD, ALPHA, chunk_bytes=chunk_rows * q.shape[1])
    before = quants.dequantize(q, qtype)
    after = quants.dequantize(data, qtype)
    want = before.copy()
    want[:, head_cols(HEADS)] *= ALPHA
    np.testing.assert_array_equal(after, want)
    # only the fp16 block scales moved: the quantized values are untouched
    changed = np.nonzero((data != q).any(axis=0))[0]
    block = 34 if qtype == GGMLQuantizationType.Q8_0 else 18
    assert set(changed % block) <= {0, 1}
    assert E.scale_weight_bytes(data, name, NE0, HEADS, N_HEAD, ALPHA, inverse=True, chunk_bytes=chunk_rows * q.shape[1])
    np.testing.assert_array_equal(data, q)


@pytest.mark.parametrize("chunk_rows", [0, 2], ids=["in-place", "2-rows"])
def test_overflow_in_the_last_row_changes_nothing(chunk_rows):
    """Scaling up is checked over every row (every chunk) before any is written back."""
    w = rows_f16(3)
    w[NE1 - 1, head_cols([3])[5]] = np.float16(40000.0)  # x2 > 65504
    data = w.view(np.uint8).copy()
    assert not E.scale_weight_bytes(data, "f16", NE0, HEADS, N_HEAD, ALPHA, chunk_bytes=chunk_rows * NE0 * 2)
    np.testing.assert_array_equal(data.view(np.uint8), w.view(np.uint8))
    # the same value in a head that is not folded is no obstacle
    assert E.scale_weight_bytes(data, "f16", NE0, [0, 1], N_HEAD, ALPHA, chunk_bytes=chunk_rows * NE0 * 2)


def test_bad_input_is_an_error_not_a_crash():
    with pytest.raises(ValueError, match="wrong number of bytes"):
        E.scale_weight_bytes(np.zeros((NE1, 10), np.uint8), "f16", NE0, HEADS, N_HEAD, ALPHA)
    with pytest.raises(E.EngineError, match="bad type"):
        E.scale_weight_bytes(np.zeros((NE1, 256), np.uint8), "nope", NE0, HEADS, N_HEAD, ALPHA)
