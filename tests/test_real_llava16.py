"""A LLaVA-1.6 (anyres) GGUF pair made by llama.cpp's 1.6 recipe (llava_surgery_v2.py -C, a vit/
directory, convert_image_encoder_to_gguf.py --clip-model-is-vision, convert_legacy_llama.py; see
vhr_edge.real_fixture), against HF transformers' LlavaNextForConditionalGeneration.

vhr-edge tiles the image as LLaVA-1.6 (and HF) do, encodes each tile through libmtmd with the
corrections, and packs the rows as LLaVA-1.6 does (base tile first, padding removed, a newline
row after each feature row). llama.cpp's own path (--image-mode native) tiles the same way but
puts the base tile last and has neither unpadding nor newline rows: measured here per tile.
"""

from __future__ import annotations

import numpy as np
import pytest

from realfx import (ROW_MIN_COS, ROW_RTOL, build, hf_llava_next_rows, hf_text_model, llava_next_processor,  # noqa: E402
                    normalize, picture, row_stats)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vhr_edge import DEFAULT_PROMPT  # noqa: E402

SHAPES = [(300, 600), (500, 400), (336, 336), (700, 260)]  # grids 1x2, 2x2, 2x2, 3x1


@pytest.fixture(scope="module")
def fx():
    return build("1.6")


@pytest.fixture(scope="module")
def hf(fx):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(fx.hf_dir).float().eval()


def _session(fx, **kw):
    from vhr_edge import Session

    return Session(fx.text_f16, fx.mmproj, n_threads=2, n_ctx=4096, notice=None, **kw)


@pytest.fixture(scope="module")
def session(fx):
    with _session(fx) as s:
        yield s


def test_recipe_files(fx):
    from vhr_edge.mmproj import plan

    p = plan(fx.mmproj)
    assert p.anyres and p.has_newline and p.pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert p.class_token_first and p.feature_layers is None and p.feature_layer == p.block_count == 3


@pytest.mark.parametrize("hw", SHAPES)
def test_anyres_tiles_match_the_hf_processor(hw, hf, session):
    img = picture(*hw, seed=5)
    tiles, grid = session.tiles(img)
    ref = llava_next_processor(hf)(images=img, return_tensors="np")
    px = ref["pixel_values"][0]
    assert len(tiles) == 1 + grid[0] * grid[1] == px.shape[0]
    for i, t in enumerate(tiles):
        assert t.shape == (336, 336, 3)
        assert np.abs(normalize(t) - px[i]).max() < 1e-5, f"tile {i}"


@pytest.mark.parametrize("hw", SHAPES)
def test_rows_match_hf_llava_next(hw, hf, session, fx):
    img = picture(*hw, seed=6)
    ref = hf_llava_next_rows(hf, img)
    mean, mn, rel = row_stats(session.encode_image(img), ref)
    print(f"\n{hw} corrected: {ref.shape[0]} rows, min cos {mn:.6f}, max err/max {rel:.2e}")
    assert mn >= ROW_MIN_COS and rel <= ROW_RTOL
    with _session(fx, mmproj_as_is=True) as s:
        mean0, mn0, _ = row_stats(s.encode_image(img), ref)
    print(f"{hw} as llama.cpp's graph: mean cos {mean0:.4f}, min cos {mn0:.4f}")
    assert mean0 < 0.95


def _hf_tiles(hf, img):
    """HF's per-tile rows before packing: [base, tile 0, tile 1, ...] x 576 x n_embd."""
    px = llava_next_processor(hf)(images=img, return_tensors="pt")["pixel_values"][0]
    with torch.no_grad():
        hs = hf.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        return hf.model.multi_modal_projector(hs).numpy()


@pytest.mark.parametrize("hw", [(336, 672), (500, 400)])
def test_llama_cpp_native_layout(hw, hf, fx):
    """llama.cpp's own LLaVA-1.6 path: the same tiles (so, corrected, the same rows per tile), but
    the base tile last, no unpadding and no newline rows."""
    img = picture(*hw, seed=7)
    per = _hf_tiles(hf, img)
    n = per.shape[0]
    with _session(fx, image_mode="native") as s:
        rows = s.encode_image(img)
    assert rows.shape[0] == n * 576 != hf_llava_next_rows(hf, img).shape[0]
    t = rows.reshape(n, 576, -1)
    for i, j in enumerate(list(range(1, n)) + [0]):  # tiles, then the base tile
        mean, mn, rel = row_stats(t[i], per[j])
        print(f"{hw} native tile {i} vs HF tile {j}: min cos {mn:.6f}, max err/max {rel:.2e}")
        assert mn >= (ROW_MIN_COS if j else 0.999)  # the base tile: llama.cpp's own bicubic downscale


def test_caption_end_to_end_matches_the_oracle(fx, hf, session):
    """The whole caption on the 1.6 pair (VHR on): HF LlavaNext's packed rows + the PyTorch oracle."""
    from vhr_edge.oracle import vhr_reference

    img = picture(300, 600, seed=11)  # seeds 8, 9, 10 have a near-tie within 32 tokens (top-2 gap 1e-4 of the range)
    r = session.caption(img, DEFAULT_PROMPT, n_predict=32, keep_logits=True)
    e = session._runner.embed_image(picture(336, 336), DEFAULT_PROMPT, session.prompt_template)
    assert r.timings.n_image_tokens == hf_llava_next_rows(hf, img).shape[0] == 576 + 24 * (48 + 1)
    o = vhr_reference(hf_text_model(hf), e["prefix"], hf_llava_next_rows(hf, img), e["suffix"],
                      layers=r.vhr.layers, alpha=2.0, n_predict=32)
    span = float(o["first_logits"].max() - o["first_logits"].min())
    err = float(np.abs(r.first_logits - o["first_logits"]).max()) / span
    print(f"\nLLaVA-1.6 first logits max err {err:.2e} of the range; {len(r.tokens)} tokens")
    assert err < 1e-3
    assert r.vhr.selected_heads == o["selected_heads"]
    assert r.tokens == o["tokens"] and len(r.tokens) == 32
