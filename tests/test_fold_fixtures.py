"""Decoding with the heads folded into W_o (weight_fold.h), on tiny F16 and Q8_0 fixtures whose
head_dim (32) holds whole Q8_0 blocks, so the fold applies without the testbed in models/.

The reference is independent of the engine's VHR code: the same model written with the chosen
heads' columns of attn_output already multiplied by alpha (fixtures.write_text_model's
attn_output_scale; for Q8_0 the scaled F16 file quantized the same way), run WITHOUT VHR. Scaling
an fp16 value or a Q8_0 block scale by 2 is exact, so the folded decode, the callback decode and
the scaled model must pick the same tokens. After the caption W_o must be restored bit for bit
(a plain caption afterwards has the first caption's logits exactly) and the file on disk is
never written. Both with the GGUF mapped and loaded into memory (--no-mmap), where W_o sits in a
plain ggml buffer and is folded through ggml_backend_tensor_get/set as on a GPU.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vhr_edge import Session, fixtures

from conftest import scene

SPEC32 = fixtures.TinySpec(n_layer=8, n_embd=128, n_head=4, n_ff=256, seed=3, dtype="f16")  # head_dim 32
FORCED = {1: [0, 2], 5: [1, 3], 7: [3]}
ALPHA = 2.0
N = 32


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module", params=["F16", "Q8_0"])
def pair(request, tmp_path_factory):
    """(text GGUF, the same with the FORCED heads of attn_output scaled by ALPHA, mmproj)."""
    d = tmp_path_factory.mktemp("fold32")
    text, mmproj = fixtures.write_tiny_llava(d, SPEC32, name="h32")
    scaled = fixtures.write_text_model(d / "h32-scaled.gguf", SPEC32,
                                       attn_output_scale={l: (h, ALPHA) for l, h in FORCED.items()})
    if request.param == "Q8_0":
        text = fixtures.quantize(text, d / "h32-q8.gguf", "Q8_0")
        scaled = fixtures.quantize(scaled, d / "h32-q8-scaled.gguf", "Q8_0")
    return request.param, text, scaled, mmproj


def run(s, img, **kw):
    return s.caption(img, n_predict=N, ignore_eos=True, keep_logits=True, **kw)


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "no-mmap"])
def test_fold_matches_the_scaled_model_and_is_undone(pair, use_mmap):
    """Mapped from the GGUF (remapped copy-on-write before the fold) or loaded into memory
    (--no-mmap: folded in place through ggml-backend, as on a GPU)."""
    kind, text, scaled, mmproj = pair
    img = scene(1)
    digest = sha(text)
    with Session(text, mmproj, n_threads=2, use_mmap=use_mmap) as s:
        before = run(s, img, vhr=False)
        folded = run(s, img, alpha=ALPHA, layers=sorted(FORCED), forced_heads=FORCED)
        after_fold = run(s, img, vhr=False)
        called = run(s, img, alpha=ALPHA, layers=sorted(FORCED), forced_heads=FORCED, fold_weights=False)
        after_call = run(s, img, vhr=False)
        folded_again = run(s, img, alpha=ALPHA, layers=sorted(FORCED), forced_heads=FORCED)
    with Session(scaled, mmproj, n_threads=2) as s:
        ref = run(s, img, vhr=False)

    assert (folded.vhr.decode_scaling, folded.vhr.fold_note) == ("weights", ""), (kind, folded.vhr.fold_note)
    assert called.vhr.decode_scaling == "callback"
    assert folded.vhr.selected_heads == FORCED
    # VHR moves this model, so the comparisons below can fail
    assert folded.tokens != before.tokens
    # the independent reference: the scaled weights, no VHR at all
    span = float(ref.first_logits.max() - ref.first_logits.min())
    assert np.abs(folded.first_logits - ref.first_logits).max() <= 1e-4 * span
    assert folded.tokens == ref.tokens, kind
    assert called.tokens == ref.tokens, kind
    # W_o restored exactly: the plain captions after VHR equal the one before, bit for bit
    for after in (after_fold, after_call):
        assert after.tokens == before.tokens, kind
        np.testing.assert_array_equal(after.first_logits, before.first_logits)
    assert folded_again.tokens == folded.tokens  # folding twice does not compound
    assert sha(text) == digest  # copy-on-write: the GGUF on disk is untouched


def test_fold_survives_a_cancelled_caption(pair):
    """A caption stopped by its callback still unfolds W_o (the fold is undone however it ends)."""
    kind, text, _, mmproj = pair
    img = scene(2)
    with Session(text, mmproj, n_threads=2) as s:
        before = run(s, img, vhr=False)
        stopped = run(s, img, alpha=ALPHA, layers=sorted(FORCED), forced_heads=FORCED,
                      on_token=lambda tok, piece: False)
        assert stopped.stop_reason == "cancelled" and stopped.vhr.decode_scaling == "weights"
        after = run(s, img, vhr=False)
    assert after.tokens == before.tokens, kind
    np.testing.assert_array_equal(after.first_logits, before.first_logits)
