"""Tests for vhr_edge.fixtures: GGUF structure, determinism, and loading in llama.cpp."""
from __future__ import annotations

import ctypes
from dataclasses import replace

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from vhr_edge import fixtures  # noqa: E402
from vhr_edge.fixtures import (  # noqa: E402
    VOCAB_SIZE,
    TinySpec,
    quantize,
    write_mmproj,
    write_text_model,
    write_tiny_llava,
)

PROMPT = b"USER: Please describe this image in detail. ASSISTANT:"


def _field(reader, key):
    return reader.fields[key].contents()


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def _shapes(path) -> dict[str, tuple[int, ...]]:
    """ggml shapes (ne0 first) as stored in the file."""
    return {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(path).tensors}


# ---------------------------------------------------------------- structure (gguf only)

def test_text_model_metadata_and_shapes(tmp_path):
    spec = TinySpec()
    path = write_text_model(tmp_path / "t.gguf", spec)
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == 4
    assert _field(r, "llama.attention.head_count") == 4
    assert _field(r, "llama.attention.head_count_kv") == 4
    assert _field(r, "llama.embedding_length") == 64
    assert _field(r, "llama.rope.dimension_count") == 16
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.bos_token_id") == 1
    assert len(_field(r, "tokenizer.ggml.tokens")) == VOCAB_SIZE
    sh = _shapes(path)
    assert sh["token_embd.weight"] == (64, VOCAB_SIZE)
    assert sh["output.weight"] == (64, VOCAB_SIZE)
    assert sh["blk.3.attn_output.weight"] == (64, 64)
    assert sh["blk.0.ffn_gate.weight"] == (64, 128)
    assert sh["blk.0.ffn_down.weight"] == (128, 64)
    assert len(sh) == 3 + 9 * spec.n_layer
    assert {t.tensor_type.name for t in r.tensors} == {"F32"}


def test_gqa_shapes(tmp_path):
    path = write_text_model(tmp_path / "gqa.gguf", TinySpec(n_head=4, n_head_kv=2))
    assert _field(gguf.GGUFReader(path), "llama.attention.head_count_kv") == 2
    sh = _shapes(path)
    assert sh["blk.0.attn_q.weight"] == (64, 64)
    assert sh["blk.0.attn_k.weight"] == (64, 32)  # ne0 = n_embd in, ne1 = 2 heads * 16
    assert sh["blk.0.attn_v.weight"] == (64, 32)


def test_attn_output_scale_touches_only_target_slices(tmp_path):
    spec = TinySpec(seed=3)
    base = _tensors(write_text_model(tmp_path / "base.gguf", spec))
    scaled = _tensors(write_text_model(tmp_path / "s.gguf", spec, attn_output_scale={2: ([1, 3], 0.25)}))
    assert base.keys() == scaled.keys()
    changed = [k for k in base if not np.array_equal(base[k], scaled[k])]
    assert changed == ["blk.2.attn_output.weight"]
    b, s = base["blk.2.attn_output.weight"], scaled["blk.2.attn_output.weight"]
    hd = spec.head_dim
    for h in range(spec.n_head):
        cols = slice(h * hd, (h + 1) * hd)
        factor = 0.25 if h in (1, 3) else 1.0
        np.testing.assert_allclose(s[:, cols], b[:, cols] * factor, rtol=1e-6)
        if factor != 1.0:
            assert not np.allclose(s[:, cols], b[:, cols])


def test_weights_independent_of_dtype_and_proj_dim(tmp_path):
    a = _tensors(write_text_model(tmp_path / "a.gguf", TinySpec(seed=7)))
    b = _tensors(write_text_model(tmp_path / "b.gguf", TinySpec(seed=7, dtype="f16", proj_dim=48)))
    c = _tensors(write_text_model(tmp_path / "c.gguf", TinySpec(seed=8)))
    for k in a:
        np.testing.assert_array_equal(a[k].astype(np.float16), b[k].astype(np.float16))
    assert b["blk.0.attn_q.weight"].dtype == np.float16
    assert b["blk.0.attn_norm.weight"].dtype == np.float32
    assert not np.array_equal(a["blk.0.attn_q.weight"], c["blk.0.attn_q.weight"])
    m1 = _tensors(write_mmproj(tmp_path / "m1.gguf", TinySpec(seed=7)))
    m2 = _tensors(write_mmproj(tmp_path / "m2.gguf", TinySpec(seed=7, proj_dim=48)))
    assert [k for k in m1 if not np.array_equal(m1[k], m2[k])] == ["mm.0.weight", "mm.0.bias",
                                                                  "mm.2.weight", "mm.2.bias"]
    np.testing.assert_array_equal(m1["mm.0.weight"][:48], m2["mm.0.weight"])  # same stream prefix
    assert np.isfinite(a["output.weight"]).all() and a["output.weight"].std() > 0.1


def test_mmproj_metadata_and_shapes(tmp_path):
    spec = TinySpec(vision_layers=3)
    path = write_mmproj(tmp_path / "mm.gguf", spec)
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "clip"
    assert _field(r, "clip.projector_type") == "mlp"
    assert _field(r, "clip.has_vision_encoder") is True
    assert _field(r, "clip.vision.block_count") == 3
    assert _field(r, "clip.vision.feature_layer") == [2]
    assert r.fields["clip.vision.feature_layer"].types[-1] == gguf.GGUFValueType.INT32
    sh = _shapes(path)
    assert sh["v.patch_embd.weight"] == (8, 8, 3, 32)
    assert sh["v.position_embd.weight"] == (32, 65)
    assert sh["v.class_embd"] == (32,)
    assert sh["v.blk.2.ffn_up.weight"] == (32, 64)
    assert sh["v.blk.2.ffn_down.weight"] == (64, 32)
    assert sh["mm.0.weight"] == (32, 64)
    assert sh["mm.2.weight"] == (64, 64)
    assert "v.blk.3.attn_q.weight" not in sh and "v.post_ln.weight" not in sh


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_text_model(tmp_path / "x.gguf", TinySpec(), attn_output_scale={4: ([0], 2.0)})
    with pytest.raises(ValueError):
        write_text_model(tmp_path / "x.gguf", TinySpec(), attn_output_scale={0: ([4], 2.0)})
    with pytest.raises(ValueError):
        write_text_model(tmp_path / "x.gguf", TinySpec(dtype="bf16"))
    with pytest.raises(ValueError, match="ftype"):
        quantize(tmp_path / "x.gguf", tmp_path / "y.gguf", "Q3_XYZ")


# ---------------------------------------------------------------- llama.cpp (llama-cpp-python)

@pytest.fixture(scope="module")
def llama():
    lc = pytest.importorskip("llama_cpp")
    lc.llama_backend_init()
    return lc


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("tiny"))


def _load(lc, path):
    params = lc.llama_model_default_params()
    params.n_gpu_layers = 0
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"failed to load {path}"
    return model


def _tokenize(lc, model, text=PROMPT):
    vocab = lc.llama_model_get_vocab(model)
    buf = (lc.llama_token * 256)()
    n = lc.llama_tokenize(vocab, text, len(text), buf, 256, True, False)
    assert n > 0
    return list(buf[:n])


def _last_logits(lc, model, tokens):
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_threads = 128, 128, 2
    ctx = lc.llama_init_from_model(model, cparams)
    assert ctx
    try:
        arr = (lc.llama_token * len(tokens))(*tokens)
        assert lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(tokens))) == 0
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(VOCAB_SIZE,)).copy()
    finally:
        lc.llama_free(ctx)


def test_text_model_loads_and_tokenizes(llama, pair):
    lc = llama
    model = _load(lc, pair[0])
    try:
        assert lc.llama_model_n_layer(model) == 4
        assert lc.llama_model_n_head(model) == 4
        assert lc.llama_model_n_embd(model) == 64
        vocab = lc.llama_model_get_vocab(model)
        assert lc.llama_vocab_n_tokens(vocab) == VOCAB_SIZE
        toks = _tokenize(lc, model)
        assert toks[0] == 1  # BOS
        pieces = []
        for t in toks[1:]:
            buf = ctypes.create_string_buffer(32)
            n = lc.llama_token_to_piece(vocab, t, buf, 32, 0, False)
            pieces.append(buf.raw[:n])
        assert b"".join(pieces).strip() == PROMPT  # lossless round trip
        assert b" USER" in pieces and b" ASSISTANT" in pieces and b" describe" in pieces
        # unseen text (incl. non-ASCII) goes through byte fallback
        assert len(_tokenize(lc, model, "zebra ü 漢".encode())) > 3
        logits = _last_logits(lc, model, toks)
        assert np.isfinite(logits).all() and logits.std() > 0.5
    finally:
        lc.llama_model_free(model)


def test_head_scale_changes_logits(llama, tmp_path):
    lc = llama
    spec = TinySpec()
    out = {}
    for tag, scale in (("base", None), ("one", {1: ([2], 1.0)}), ("zero", {1: ([2], 0.0)})):
        model = _load(lc, write_text_model(tmp_path / f"{tag}.gguf", spec, attn_output_scale=scale))
        try:
            out[tag] = _last_logits(lc, model, _tokenize(lc, model))
        finally:
            lc.llama_model_free(model)
    np.testing.assert_array_equal(out["base"], out["one"])
    assert np.abs(out["base"] - out["zero"]).max() > 1e-3


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0"])
def test_quantized_models_load(llama, pair, tmp_path, ftype):
    lc = llama
    dst = quantize(pair[0], tmp_path / f"tiny-{ftype}.gguf", ftype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(dst).tensors}
    assert types["blk.0.attn_q.weight"] == ftype
    model = _load(lc, dst)
    try:
        assert lc.llama_model_n_layer(model) == 4
        logits = _last_logits(lc, model, _tokenize(lc, model))
        assert np.isfinite(logits).all() and logits.std() > 0.5
    finally:
        lc.llama_model_free(model)


def test_quantize_failure_raises(llama, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError):
        quantize(bogus, tmp_path / "out.gguf", "Q8_0")


def _mtmd_ctx(lc, mtmd, text_model, mmproj):
    p = mtmd.mtmd_context_params_default()
    p.use_gpu, p.n_threads, p.print_timings = False, 2, False
    return mtmd.mtmd_init_from_file(str(mmproj).encode(), text_model, p)


def _encode_image(lc, mtmd, text_path, mmproj_path) -> np.ndarray:
    """Tokenize a prompt with one 64x64 image through libmtmd, encode it, return embeddings."""
    model = _load(lc, text_path)
    ctx = _mtmd_ctx(lc, mtmd, model, mmproj_path)
    assert ctx, "mtmd_init_from_file failed"
    chunks = bitmap = None
    try:
        assert mtmd.mtmd_support_vision(ctx)
        rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        bitmap = mtmd.mtmd_bitmap_init(64, 64, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        prompt = b"USER: " + mtmd.mtmd_default_marker() + b"\nPlease describe this image. ASSISTANT:"
        text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
        chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        kinds = [mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
                 for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        assert kinds.count(mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE) == 1
        assert kinds[0] == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT and len(kinds) == 3
        chunk = mtmd.mtmd_input_chunks_get(chunks, 1)
        assert mtmd.mtmd_input_chunk_get_n_tokens(chunk) == 64
        assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
        return np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(64, 64)).copy()
    finally:
        if chunks:
            mtmd.mtmd_input_chunks_free(chunks)
        if bitmap:
            mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        lc.llama_model_free(model)


def test_mmproj_encodes_image(llama, pair):
    mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
    embd = _encode_image(llama, mtmd, *pair)
    assert np.isfinite(embd).all()
    assert embd.std() > 0.05 and np.abs(embd[0] - embd[1]).max() > 1e-3  # tokens differ
    np.testing.assert_array_equal(embd, _encode_image(llama, mtmd, *pair))  # deterministic


def test_feature_layer_skips_last_block(llama, pair, tmp_path, monkeypatch):
    """LLaVA-1.5 uses hidden_states[-2]: the last CLIP block must not affect the output."""
    mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
    base = _encode_image(llama, mtmd, *pair)
    orig = fixtures.mmproj_tensors
    out = {}
    for blk in (0, 1):
        def perturbed(spec, blk=blk):
            t = orig(spec)
            t[f"v.blk.{blk}.ffn_down.bias"] = t[f"v.blk.{blk}.ffn_down.bias"] + 1.0
            return t
        monkeypatch.setattr(fixtures, "mmproj_tensors", perturbed)
        out[blk] = _encode_image(llama, mtmd, pair[0], write_mmproj(tmp_path / f"p{blk}.gguf", TinySpec()))
    assert np.abs(out[0] - base).max() > 1e-3  # block 0 is used
    np.testing.assert_array_equal(out[1], base)  # block 1 (the last) is skipped


def test_mismatched_pair_is_rejected(llama, tmp_path):
    lc = llama
    mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
    text, mmproj = write_tiny_llava(tmp_path, replace(TinySpec(), proj_dim=48), name="bad")
    model = _load(lc, text)
    try:
        ctx = _mtmd_ctx(lc, mtmd, model, mmproj)
        assert not ctx, "mtmd accepted an mmproj whose width != n_embd"
    finally:
        lc.llama_model_free(model)


def test_streamed_writer_matches_drawn_tensors_and_bigger_vocab(tmp_path, llama):
    """The writer streams tensors one at a time: the file holds exactly `text_tensors` (also
    with a padded vocabulary, which is how the 7B-shaped bench model gets its 32000 tokens)."""
    spec = TinySpec(n_layer=2, vocab_size=1000, seed=3)
    path = write_text_model(tmp_path / "v.gguf", spec)
    drawn, stored = fixtures.text_tensors(spec), _tensors(path)
    assert list(stored) == list(drawn)  # file order = draw order
    for name, arr in drawn.items():
        np.testing.assert_array_equal(stored[name], arr)
    assert _shapes(path)["token_embd.weight"] == (64, 1000)
    model = _load(llama, path)
    try:
        assert llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model)) == 1000
    finally:
        llama.llama_model_free(model)
    with pytest.raises(ValueError, match="vocab_size 300 is too small"):
        write_text_model(tmp_path / "small.gguf", TinySpec(vocab_size=300))


def test_llava_7b_shapes_without_writing():
    spec = fixtures.llava_7b_shaped(n_layer=8)
    shapes = dict(fixtures.text_tensor_shapes(spec))
    assert shapes["token_embd.weight"] == (32000, 4096)
    assert shapes["blk.7.ffn_down.weight"] == (4096, 11008)
    assert shapes["blk.0.attn_output.weight"] == (4096, 4096)
    assert spec.head_dim == 128 and spec.n_image_tokens == 576
    assert all(n % 256 == 0 for s in shapes.values() for n in s[-1:])  # K-quants apply to every matrix
