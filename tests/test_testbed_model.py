"""The bundled testbed (models/) against its own HF checkpoint, through the PyTorch oracle.

- F16 files as shipped, and an F32 export of the same f16 checkpoint made here;
- libmtmd's image rows vs the HF tower + projector; first-step logits; the VHD matrix and
  selected heads (rel. err <= 1e-3 on F32); greedy tokens with VHR on and off for 32 tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vhr_edge import Session
from vhr_edge.testbed.scenes import make_split, render

MODELS = Path(__file__).resolve().parent.parent / "models"
HF = MODELS / "testbed-hf"
F16, MMPROJ = MODELS / "testbed-f16.gguf", MODELS / "testbed-mmproj-f16.gguf"

pytestmark = pytest.mark.skipif(not F16.is_file(), reason="the testbed model is not in models/ yet")
N_TOKENS = 32


def scene_images(n=3, seed=2024):
    return [np.asarray(render(s)) for s in make_split("counterfactual", n, seed)]


@pytest.fixture(scope="module")
def hf():
    from conftest import oracle_import

    torch = oracle_import("torch")
    oracle_import("transformers")
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(HF, dtype=torch.float32).eval()
    lm = LlamaForCausalLM(llava.config.text_config).eval()
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    return llava, lm


@pytest.fixture(scope="module")
def f32_pair(tmp_path_factory, hf):
    from vhr_edge.export import export_llava

    from vhr_edge.templates import VICUNA_SYSTEM

    return export_llava(HF, tmp_path_factory.mktemp("f32"), name="testbed", tokenizer_model=HF / "tokenizer.model",
                        text_dtype="f32", mmproj_dtype="f32", prompt_template=VICUNA_SYSTEM)


@pytest.fixture(scope="module")
def f32_session(f32_pair):
    with Session(*f32_pair, n_threads=2) as s:
        yield s


def hf_image_rows(llava, img):
    import torch

    from vhr_edge.testbed.model import image_features, image_tensor

    with torch.no_grad():
        return image_features(llava, image_tensor(img[None]))[0].numpy()


def test_the_testbed_carries_its_training_template(f32_session):
    """Trained with the vicuna system line: the export stores it in the GGUF, the shipped files
    in their profiles; either way no flag is needed, and LLaVA-1.5's stays the default."""
    from vhr_edge.templates import LLAVA_15, VICUNA_SYSTEM
    from vhr_edge.testbed.tokenizer import PREFIX, SUFFIX

    assert PREFIX + "<image>" + SUFFIX == VICUNA_SYSTEM
    assert (f32_session.prompt_template, f32_session.template_source) == (VICUNA_SYSTEM, "gguf")
    with Session(F16, MMPROJ, n_threads=2) as s:
        assert s.prompt_template == VICUNA_SYSTEM and s.template_source.startswith("profile ")
    with Session(F16, MMPROJ, n_threads=2, prompt_template="llava-1.5") as s:
        assert s.prompt_template == LLAVA_15


def test_tokenizer_matches_llama_cpp(f32_session):
    from vhr_edge.testbed.tokenizer import Tokenizer

    tok = Tokenizer(HF / "tokenizer.model")
    img = scene_images(1)[0]
    for prompt in ("Please describe this image in detail.", "Is there a knife in the image?"):
        e = f32_session._runner.embed_image(img, prompt, f32_session.prompt_template)
        pre, suf = tok.prompt_parts(prompt)
        assert list(e["prefix"]) == pre and list(e["suffix"]) == suf


@pytest.mark.parametrize("which, tol", [("f32", 2e-3), ("f16", 2e-2)])
def test_image_rows_match_hf(hf, f32_pair, which, tol):
    llava, _ = hf
    mmproj = f32_pair[1] if which == "f32" else MMPROJ
    with Session(f32_pair[0], mmproj, n_threads=2) as s:
        for img in scene_images(2):
            rows = s._runner.embed_image(img, "x", s.prompt_template)["image"]
            ref = hf_image_rows(llava, img)
            assert rows.shape == ref.shape
            err = np.abs(rows - ref).max() / np.abs(ref).max()
            assert err < tol, f"{which}: relative error {err:.2e}"


def test_vhr_matches_the_pytorch_oracle(hf, f32_session):
    from vhr_edge.oracle import vhr_reference

    llava, lm = hf
    layers = f32_session.caption(scene_images(1)[0], n_predict=1).vhr.layers
    for img in scene_images(3):
        e = f32_session._runner.embed_image(img, "Please describe this image in detail.", f32_session.prompt_template)
        rows = hf_image_rows(llava, img)  # the oracle's own image rows, not libmtmd's
        for vhr in (False, True):
            ref = vhr_reference(lm, e["prefix"], rows, e["suffix"], layers=layers, alpha=2.0, vhr=vhr,
                                n_predict=N_TOKENS)
            got = f32_session.caption(img, vhr=vhr, n_predict=N_TOKENS, keep_logits=True)
            span = ref["first_logits"].max() - ref["first_logits"].min()
            assert np.abs(got.first_logits - ref["first_logits"]).max() < 5e-3 * span
            assert got.tokens == ref["tokens"][: len(got.tokens)] and len(got.tokens) == len(ref["tokens"])
            if vhr:
                assert got.vhr.selected_heads == ref["selected_heads"]
                for l in layers:
                    scale = np.abs(ref["vhd"][l]).max()
                    assert np.abs(got.vhr.vhd[l] - ref["vhd"][l]).max() <= 2e-3 * scale  # measured 1.1e-3 (F32 export, own-batch reference)
                    assert np.abs(got.vhr.ta[l] - ref["ta"][l]).max() <= 2.5e-3 * np.abs(ref["ta"][l]).max()


def test_hf_eval_captions_match_the_engine(hf, f32_session):
    # `evaluate --hf` (batched HF greedy with a KV cache, used to compare training recipes) must
    # caption like the engine does on an F32 export of the same checkpoint
    from vhr_edge.testbed.evaluate import hf_captions

    scenes = make_split("counterfactual", 3, 2024)
    texts = hf_captions(HF, scenes, max_tokens=N_TOKENS)
    for sc, text in zip(scenes, texts):
        got = f32_session.caption(np.asarray(render(sc)), vhr=False, n_predict=N_TOKENS)
        assert text == got.text.strip()


def test_shipped_models_caption_what_they_see():
    from vhr_edge.testbed.evaluate import score_caption

    scenes = make_split("indist", 6, 4242)
    for name in ("testbed-f16.gguf", "testbed-q8_0.gguf", "testbed-q4_k_m.gguf"):
        with Session(MODELS / name, MMPROJ, n_threads=2) as s:
            hits = sum(score_caption(sc, s.caption(np.asarray(render(sc)), n_predict=96, vhr=False).text).hit
                       for sc in scenes)
        assert hits >= 0.6 * sum(len(sc.objects) for sc in scenes), name


def test_folded_decode_on_the_shipped_quantizations():
    # head_dim 32: one Q8_0 block per head and row, so the fold is exact; Q4_K_M's W_o is a
    # K-quant (256-wide super-blocks) and falls back to the callback
    images = scene_images(3, seed=77)
    for name, scaling in (("testbed-f16.gguf", "weights"), ("testbed-q8_0.gguf", "weights"),
                          ("testbed-q4_k_m.gguf", "callback")):
        with Session(MODELS / name, MMPROJ, n_threads=2) as s:
            for img in images:
                a = s.caption(img, n_predict=64, ignore_eos=True)
                b = s.caption(img, n_predict=64, ignore_eos=True, fold_weights=False)
                assert a.vhr.decode_scaling == scaling, (name, a.vhr.fold_note)
                assert a.tokens == b.tokens, name
