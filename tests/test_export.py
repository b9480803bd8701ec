"""vhr_edge.export: HF LLaVA checkpoints -> GGUF pairs that llama.cpp/libmtmd run like HF does.

A fresh random testbed-shaped model (SigLIP-style tower, no CLS) is exported in F32 and
compared with the HF model: tokenization (sentencepiece vs llama.cpp's SPM), image rows
(libmtmd vs the HF projector output) and first-step logits.  Quantized exports and a tiny
CLIP-tower (class token, pre-LN, quick_gelu) variant must load and encode.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import oracle_import

torch = oracle_import("torch")
oracle_import("transformers")
oracle_import("sentencepiece")
gguf = pytest.importorskip("gguf")

from vhr_edge import export  # noqa: E402
from vhr_edge.testbed.tokenizer import DETAIL_PROMPT  # noqa: E402

N_IMG = (64 // 8) ** 2
QUESTION = "Is there a fork in the image?"
SMALL = dict(image_size=64, patch_size=8, vision_width=64, vision_layers=3, vision_heads=2, vision_ff=128,
             n_embd=256, n_layer=4, n_head=4, n_ff=512, vocab_size=512, max_positions=512)
IMAGE_RTOL_F32 = 3e-3  # ggml_gelu goes through an fp16 table (GGML_GELU_FP16): ~5e-4 seen
IMAGE_RTOL_F16 = 3e-2
LOGIT_RTOL = 5e-3


def _perturb(model, seed: int) -> None:
    """Random-init norms are 1 and biases ~0; jitter every 1-D parameter so mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _image() -> np.ndarray:
    from vhr_edge.testbed.scenes import make_split, render

    return np.array(render(make_split("train", 1, 0)[0], 64).convert("RGB"))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from vhr_edge.testbed.captions import training_corpus
    from vhr_edge.testbed.scenes import make_split
    from vhr_edge.testbed.tokenizer import train_tokenizer

    lines = training_corpus(make_split("train", 200, 0)).splitlines()[:400]
    # 400 pieces < the model's 512 rows: the export pads with [PAD{i}] UNUSED tokens
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory, tok_path):
    """(HF model, hf_dir, out_dir) with the CLI-written F32/F32 pair and F16/Q8_0/Q4_K_M text models."""
    from vhr_edge.testbed.model import TestbedConfig, build_model

    model = build_model(TestbedConfig(**SMALL), seed=0).eval()
    _perturb(model, 0)
    hf_dir, out = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("gguf")
    model.save_pretrained(hf_dir)
    rc = export.main([str(hf_dir), str(out), "--name", "tb", "--tokenizer", str(tok_path),
                      "--mmproj-dtype", "f32", "--quantize", "F16,Q8_0,Q4_K_M"])
    assert rc == 0
    return model, hf_dir, out


@pytest.fixture(scope="module")
def session(testbed):
    from vhr_edge import Session

    _, _, out = testbed
    s = Session(out / "tb-F32.gguf", out / "tb-mmproj-F32.gguf", n_threads=2, n_ctx=512, prompt_template="vicuna-system")
    yield s
    s.close()


def _hf_rows(model, img) -> np.ndarray:
    from vhr_edge.testbed.model import image_features, image_tensor

    with torch.no_grad():
        return image_features(model, image_tensor(img[None]))[0].numpy()


def _meta(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    return {k: f for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def test_permute_is_inverted_by_oracle():
    from vhr_edge.oracle import _unpermute

    w = np.random.default_rng(0).standard_normal((2 * 8, 24)).astype(np.float32)
    p = export.permute_qk(w, 2)
    assert not np.array_equal(p, w)
    assert np.array_equal(_unpermute(p, 2), w)


def test_text_and_mmproj_metadata(testbed, tok_path, tmp_path):
    import sentencepiece as spm

    model, hf_dir, out = testbed
    fields, tensors = _meta(out / "tb-F32.gguf")
    val = lambda k: fields[k].contents()  # noqa: E731
    assert val("general.architecture") == "llama" and val("general.file_type") == 0
    assert (val("llama.embedding_length"), val("llama.block_count"), val("llama.feed_forward_length")) == (256, 4, 512)
    assert (val("llama.attention.head_count"), val("llama.attention.head_count_kv")) == (4, 4)
    assert val("llama.rope.dimension_count") == 64 and val("llama.context_length") == 512
    assert val("llama.vocab_size") == 512 and val("tokenizer.ggml.model") == "llama"
    assert val("tokenizer.ggml.add_space_prefix") is True and val("tokenizer.ggml.add_bos_token") is True
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    toks, types = val("tokenizer.ggml.tokens"), val("tokenizer.ggml.token_type")
    assert toks[:400] == [sp.id_to_piece(i) for i in range(400)] and toks[400] == "[PAD400]"
    assert types[:4] == [2, 3, 3, 4] and types[4] == 6 and set(types[400:]) == {5}  # unk, bos, eos, <image>, byte
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    hf_q = model.state_dict()["model.language_model.layers.1.self_attn.q_proj.weight"].numpy()
    gq = np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(hf_q.shape)
    assert np.array_equal(gq, export.permute_qk(hf_q, 4))

    fields, tensors = _meta(out / "tb-mmproj-F32.gguf")
    assert val("general.architecture") == "clip" and val("clip.projector_type") == "mlp"
    assert val("clip.vision.block_count") == 3 and val("clip.vision.feature_layer") == [2]
    assert fields["clip.vision.feature_layer"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert val("clip.use_gelu") is True and val("clip.vision.image_mean") == [0.5, 0.5, 0.5]
    assert "v.patch_embd.bias" in tensors and "v.blk.2.ffn_down.bias" in tensors
    assert not any(n.startswith(("v.post_ln", "v.class_embd", "v.pre_ln")) for n in tensors)

    text, mmproj = export.export_llava(hf_dir, tmp_path, name="h", tokenizer_model=tok_path, text_dtype="f16")
    _, t16 = _meta(text)
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert {t.tensor_type for n, t in t16.items() if len(t.shape) == 2} == {F16}
    assert {t.tensor_type for n, t in t16.items() if len(t.shape) == 1} == {F32}
    _, m16 = _meta(mmproj)
    assert m16["mm.0.weight"].tensor_type == F16 and m16["mm.0.bias"].tensor_type == F32


@pytest.mark.parametrize("prompt", [DETAIL_PROMPT, QUESTION])
def test_tokenization_matches_sentencepiece(session, tok_path, prompt):
    from vhr_edge.templates import VICUNA_SYSTEM
    from vhr_edge.testbed.tokenizer import Tokenizer

    e = session._runner.embed_image(_image(), prompt, VICUNA_SYSTEM)  # the testbed's template
    prefix, suffix = Tokenizer(tok_path).prompt_parts(prompt)
    assert list(e["prefix"]) == prefix
    assert list(e["suffix"]) == suffix


def test_image_rows_match_hf_f32(testbed, session):
    model = testbed[0]
    img = _image()
    rows = session._runner.embed_image(img, DETAIL_PROMPT, session.prompt_template)["image"]
    ref = _hf_rows(model, img)
    assert rows.shape == ref.shape == (N_IMG, 256)
    rel = float(np.abs(rows - ref).max() / np.abs(ref).max())
    print(f"F32 mmproj image rows: max |diff| / max |ref| = {rel:.2e}")
    assert rel <= IMAGE_RTOL_F32


def test_image_rows_match_hf_f16_mmproj(testbed, tok_path, tmp_path):
    from vhr_edge import Session

    model, hf_dir, out = testbed
    _, mmproj = export.export_llava(hf_dir, tmp_path, name="m16", tokenizer_model=tok_path, mmproj_dtype="f16")
    img = _image()
    s = Session(out / "tb-F32.gguf", mmproj, n_threads=2, n_ctx=512, prompt_template="vicuna-system")
    rows = s._runner.embed_image(img, DETAIL_PROMPT, s.prompt_template)["image"]
    ref = _hf_rows(model, img)
    rel = float(np.abs(rows - ref).max() / np.abs(ref).max())
    print(f"F16 mmproj image rows: max |diff| / max |ref| = {rel:.2e}")
    assert rel <= IMAGE_RTOL_F16


def test_first_logits_match_hf(testbed, session, tok_path):
    from vhr_edge.testbed.model import language_model
    from vhr_edge.testbed.tokenizer import Tokenizer

    model = testbed[0]
    img = _image()
    r = session.caption(img, DETAIL_PROMPT, keep_logits=True, vhr=False, n_predict=1)
    prefix, suffix = Tokenizer(tok_path).prompt_parts(DETAIL_PROMPT)
    body, head = language_model(model)
    with torch.no_grad():
        emb = body.embed_tokens
        x = torch.cat([emb(torch.tensor(prefix)), torch.from_numpy(_hf_rows(model, img)), emb(torch.tensor(suffix))])
        ref = head(body(inputs_embeds=x[None]).last_hidden_state[0, -1]).numpy()
    assert r.first_logits.shape == ref.shape == (512,)
    span = float(ref.max() - ref.min())
    diff = float(np.abs(r.first_logits - ref).max())
    print(f"first logits: max |diff| = {diff:.2e}, range {span:.3f} (rel {diff / span:.2e})")
    assert diff <= LOGIT_RTOL * span
    assert r.tokens[0] == int(ref.argmax())


@pytest.mark.parametrize("ftype,types", [("F16", {"F16"}), ("Q8_0", {"Q8_0"}), ("Q4_K_M", {"Q4_K", "Q6_K"})])
def test_quantized_exports_load_and_caption(testbed, ftype, types):
    from vhr_edge import Session

    out = testbed[2]
    path = out / f"tb-{ftype}.gguf"
    _, tensors = _meta(path)
    got = {t.tensor_type.name for n, t in tensors.items() if len(t.shape) == 2}
    assert got <= types and (ftype != "Q4_K_M" or "Q4_K" in got), got  # n_embd 256: K-quants apply everywhere
    with Session(path, out / "tb-mmproj-F32.gguf", n_threads=2, n_ctx=512, prompt_template="vicuna-system") as s:
        r = s.caption(_image(), DETAIL_PROMPT, vhr=False, n_predict=4, ignore_eos=True)
    assert len(r.tokens) == 4


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory):
    """A tiny llava-hf-shaped model: CLIP tower (CLS, pre-LN, quick_gelu), strategy "default"."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(1)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=64, patch_size=8, hidden_act="quick_gelu", projection_dim=32)
    text = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=3, projector_hidden_act="gelu",
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=N_IMG)
    model = LlavaForConditionalGeneration(cfg).float().eval()
    _perturb(model, 1)
    d = tmp_path_factory.mktemp("clip_hf")
    model.save_pretrained(d)
    return model, d


def _clip_refs(model, img):
    """(HF rows with CLS dropped, rows of the CLS-last graph of llama.cpp #25814)."""
    from vhr_edge.fixtures import CLIP_MEAN, CLIP_STD  # what the export writes without a preprocessor_config

    vt = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    proj = model.model.multi_modal_projector if hasattr(model, "model") else model.multi_modal_projector
    vm = getattr(vt, "vision_model", vt)
    pv = torch.from_numpy(img[None]).float().div(255.0).permute(0, 3, 1, 2)
    pv = (pv - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hf = proj(vt(pv, output_hidden_states=True).hidden_states[-2][:, 1:])[0].numpy()
        e = vm.embeddings
        patches = e.patch_embedding(pv).flatten(2).transpose(1, 2)
        x = torch.cat([patches, e.class_embedding.view(1, 1, -1)], 1) + e.position_embedding.weight[None]
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers[:-1]:  # feature layer -2 of 3
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        bug = proj(x[:, 1:])[0].numpy()
    return hf, bug


def test_clip_tower_variant_exports_and_encodes(clip_llava, tok_path, tmp_path):
    from vhr_edge import Session

    model, hf_dir = clip_llava
    text, mmproj = export.export_llava(hf_dir, tmp_path, name="clip", tokenizer_model=tok_path, mmproj_dtype="f32")
    fields, tensors = _meta(mmproj)
    assert fields["clip.use_gelu"].contents() is False  # quick_gelu
    assert fields["clip.vision.feature_layer"].contents() == [2]
    assert {"v.class_embd", "v.pre_ln.weight", "v.pre_ln.bias"} <= set(tensors)
    assert "v.patch_embd.bias" not in tensors and not any(n.startswith("v.post_ln") for n in tensors)
    assert tuple(tensors["v.position_embd.weight"].shape) == (64, N_IMG + 1)
    img = _image()
    with Session(text, mmproj, n_threads=2, n_ctx=512, prompt_template="vicuna-system") as s:
        rows = s._runner.embed_image(img, DETAIL_PROMPT, s.prompt_template)["image"]
        r = s.caption(img, DETAIL_PROMPT, vhr=False, n_predict=2, ignore_eos=True)
    assert rows.shape == (N_IMG, 128) and len(r.tokens) == 2  # CLS dropped: one row per patch
    hf, bug = _clip_refs(model, img)
    rel = lambda ref: float(np.abs(rows - ref).max() / np.abs(ref).max())  # noqa: E731
    print(f"CLIP tower rows vs HF: {rel(hf):.2e}; vs the CLS-last graph (llama.cpp #25814): {rel(bug):.2e}")
    # vhr-edge puts the class token first in llama.cpp's graph (vhr_edge.mmproj), so the rows are
    # HF's; they prove the exported weights, pre-LN, quick_gelu and feature layer
    assert rel(hf) <= IMAGE_RTOL_F32 < rel(bug)


def test_strategy_must_match_the_class_token(clip_llava, tok_path, tmp_path):
    _, hf_dir = clip_llava
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="class token"):
        export.export_llava(bad, tmp_path / "out", name="bad", tokenizer_model=tok_path)
