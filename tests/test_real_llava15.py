"""A LLaVA-1.5 GGUF pair made the way the published ones were (vhr_edge.real_fixture: the original
LLaVA layout through the legacy scripts of llama-cpp-python 0.3.36's llama.cpp), against HF
transformers' LlavaForConditionalGeneration holding the same weights.

Shows both faults of llama.cpp's LLaVA vision graph on these files, that vhr-edge's corrections
remove them (image rows), the preprocessing modes against HF's processors, and the whole
caption (first-step logits, VHD, selected heads, 32 greedy tokens, VHR on and off) against the
PyTorch oracle on the F16 pair and its Q8_0 quantization.
"""

from __future__ import annotations

import numpy as np
import pytest

from realfx import (ROW_MIN_COS, ROW_RTOL, build, hf_llava_rows, hf_text_model, normalize, picture,  # noqa: E402
                    row_stats)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vhr_edge import DEFAULT_PROMPT  # noqa: E402

N_PREDICT = 32
# first-step logits, max |diff| / logit range: F16 measured ~1.7e-4 (image rows 5e-4 apart, F16
# weights and KV); Q8_0 ~4.5e-3: ggml quantizes the activations to Q8_0 for its dot products too,
# while the oracle multiplies the dequantized weights in float32
LOGIT_RTOL = {"f16": 1e-3, "q8_0": 1e-2}


@pytest.fixture(scope="module")
def fx():
    return build("1.5")


@pytest.fixture(scope="module")
def hf(fx):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(fx.hf_dir).float().eval()


@pytest.fixture(scope="module")
def session(fx):
    from vhr_edge import Session

    notes = []
    with Session(fx.text_f16, fx.mmproj, n_threads=2, notice=notes.append) as s:
        s.notes = notes
        yield s


@pytest.fixture(scope="module")
def as_is(fx):
    from vhr_edge import Session

    with Session(fx.text_f16, fx.mmproj, n_threads=2, mmproj_as_is=True, notice=None) as s:
        yield s


def test_converter_made_files_carry_both_faults(fx, hf):
    """What convert_image_encoder_to_gguf.py wrote: one block dropped, no feature-layer key, the CLS."""
    import gguf

    from vhr_edge.mmproj import plan

    r = gguf.GGUFReader(str(fx.mmproj))
    names = {t.name for t in r.tensors}
    n_hf = hf.config.vision_config.num_hidden_layers
    assert r.fields["clip.vision.block_count"].contents() == n_hf - 1
    assert "clip.vision.feature_layer" not in r.fields
    assert {f"v.blk.{i}.attn_q.weight" for i in range(n_hf - 1)} <= names and f"v.blk.{n_hf - 1}.attn_q.weight" not in names
    assert "v.class_embd" in names and not any(n.startswith("v.post_ln") for n in names)
    p = plan(fx.mmproj)
    assert p.class_token_first and p.feature_layer == n_hf - 1 and p.llama_cpp_layers == n_hf - 2
    assert not plan(fx.mmproj, as_is=True).applied


def test_corrections_are_announced_and_leave_the_file_alone(fx, session, tmp_path):
    from vhr_edge.mmproj import corrected_path

    session.encode_image(picture(336, 336))  # the line comes with the first image
    assert len(session.notes) <= 2 and "correcting llama.cpp's LLaVA vision graph" in session.notes[-1]
    assert "--mmproj-as-is" in session.notes[-1]
    copy = corrected_path(session.mmproj_plan)
    assert session.mmproj_load_path == str(copy) and copy.parent != fx.mmproj.parent
    assert sorted(p.name for p in fx.mmproj.parent.iterdir() if p.suffix == ".gguf") == \
        ["mmproj-model-f16.gguf", "text-f16.gguf", "text-q8_0.gguf"]
    import gguf

    a, b = gguf.GGUFReader(str(fx.mmproj)), gguf.GGUFReader(str(copy))
    assert b.fields["clip.vision.feature_layer"].contents() == [3]
    assert set(b.fields) - set(a.fields) == {"clip.vision.feature_layer"}
    for ta, tb in zip(a.tensors, b.tensors):  # every tensor byte for byte
        assert ta.name == tb.name and np.array_equal(ta.data, tb.data)


def test_image_rows_on_a_square_image_match_hf(fx, hf, session, as_is):
    """336x336: no preprocessing difference is possible, so the rows test the graph alone."""
    from vhr_edge import Session

    img = picture(336, 336, seed=1)
    ref = hf_llava_rows(hf, normalize(img)[None])
    mean, mn, rel = row_stats(session.encode_image(img), ref)
    print(f"\ncorrected:   mean cos {mean:.6f}  min cos {mn:.6f}  max err/max {rel:.2e}")
    assert mn >= ROW_MIN_COS and rel <= ROW_RTOL
    mean0, mn0, rel0 = row_stats(as_is.encode_image(img), ref)
    print(f"as llama.cpp: mean cos {mean0:.4f}  min cos {mn0:.4f}  max err/max {rel0:.2e}")
    assert mean0 < 0.95  # the faults are real at this llama.cpp (if it ever fixes them, this says so)
    for label, kw in (("class token only", {"mmproj": fx.mmproj, "cls": True}),
                      ("depth only", {"mmproj": session.mmproj_load_path, "cls": False})):
        runner = session._engine.Runner(str(fx.text_f16), str(kw["mmproj"]), n_threads=2,
                                        clip_class_token_first=kw["cls"])
        m1, n1, r1 = row_stats(runner.encode([img])[0], ref)
        print(f"{label:>12}: mean cos {m1:.4f}  min cos {n1:.4f}  max err/max {r1:.2e}")
        assert m1 < 0.99  # each fault alone is visible
    with Session(fx.text_f16, session.mmproj_load_path, n_threads=2, mmproj_as_is=True, notice=None) as s:
        assert s.mmproj_plan.feature_layer is None and s.mmproj_plan.class_token_first  # the copy needs only the graph fix
        assert row_stats(s.encode_image(img), ref)[1] < 0.99


@pytest.mark.parametrize("hw", [(300, 500), (500, 280), (120, 90)])
def test_pad_and_crop_match_the_hf_processors(hw, hf, fx):
    """pad = LlavaImageProcessor(do_pad=True) (LLaVA-1.5's expand2square), crop = CLIPImageProcessor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from vhr_edge import Session

    img = picture(*hw, seed=2)
    size = {"shortest_edge": 336}, {"height": 336, "width": 336}
    procs = {"pad": LlavaImageProcessorPil(do_pad=True, size=size[0], crop_size=size[1]),
             "crop": CLIPImageProcessorPil(size=size[0], crop_size=size[1])}
    rows = {}
    for mode, proc in procs.items():
        ref_px = proc(images=img, return_tensors="np")["pixel_values"]
        with Session(fx.text_f16, fx.mmproj, n_threads=2, image_mode=mode, notice=None) as s:
            (tile,), _ = s.tiles(img)
            assert tile.shape == (336, 336, 3)
            assert np.abs(normalize(tile) - ref_px[0]).max() < 1e-5  # the same pixels, to float rounding
            rows[mode] = s.encode_image(img)
        mean, mn, rel = row_stats(rows[mode], hf_llava_rows(hf, ref_px))
        print(f"{mode} {hw}: min cos {mn:.6f}  max err/max {rel:.2e}")
        assert mn >= ROW_MIN_COS and rel <= ROW_RTOL
    assert row_stats(rows["pad"], rows["crop"])[0] < 0.999  # the two modes do differ on this image


def _oracle(lm, prefix, rows, suffix, layers, vhr):
    from vhr_edge.oracle import vhr_reference

    return vhr_reference(lm, prefix, rows, suffix, layers=layers, alpha=2.0, vhr=vhr, n_predict=N_PREDICT)


@pytest.fixture(scope="module")
def oracles(fx, hf):
    from vhr_edge.oracle import load_hf_llama_from_gguf

    # F16: the HF LLaVA's own decoder (independent of the converter); Q8_0: its dequantized weights
    return {"f16": hf_text_model(hf), "q8_0": load_hf_llama_from_gguf(fx.text_q8_0)}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("vhr", [False, True])
def test_caption_matches_the_oracle(fx, hf, session, oracles, quant, vhr):
    """The whole caption from the converter-made files vs HF's image rows + the PyTorch VHR oracle
    (released semantics): first-step logits, VHD, selected heads and 32 greedy tokens."""
    from vhr_edge import Session

    img = picture(336, 336, seed=3)
    rows = hf_llava_rows(hf, normalize(img)[None])  # HF's rows: the oracle sees no libmtmd output
    path = fx.text_f16 if quant == "f16" else fx.text_q8_0
    s = session if quant == "f16" else Session(path, fx.mmproj, n_threads=2, notice=None)
    try:
        r = s.caption(img, DEFAULT_PROMPT, vhr=vhr, n_predict=N_PREDICT, keep_logits=True)
        e = s._runner.embed_image(img, DEFAULT_PROMPT, s.prompt_template)
    finally:
        if s is not session:
            s.close()
    layers = r.vhr.layers if vhr else []
    o = _oracle(oracles[quant], e["prefix"], rows, e["suffix"], layers, vhr)
    span = float(o["first_logits"].max() - o["first_logits"].min())
    err = float(np.abs(r.first_logits - o["first_logits"]).max()) / span
    print(f"\n{quant} vhr={vhr}: first logits max err {err:.2e} of the range")
    assert err < LOGIT_RTOL[quant]
    assert r.tokens == o["tokens"] and len(r.tokens) == N_PREDICT
    if vhr:
        assert r.vhr.selected_heads == o["selected_heads"]
        for l in layers:
            vrel = float(np.abs(r.vhr.vhd[l] - o["vhd"][l]).max() / o["vhd"][l].max())
            assert vrel < 5e-3, f"VHD layer {l}: {vrel:.2e}"


def _cli(*args, cache):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    env["VHR_EDGE_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "vhr_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_flags_and_info(fx, tmp_path):
    import json

    from PIL import Image

    img = tmp_path / "wide.png"
    Image.fromarray(picture(200, 320, seed=9)).save(img)
    base = ["caption", img, "-m", fx.text_f16, "--mmproj", fx.mmproj, "-n", "6", "--no-vhr", "--json"]
    cache = tmp_path / "cache"
    r = _cli(*base, cache=cache)
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stderr.splitlines() if fx.mmproj.name in l]
    assert len(notes) == 2 and "writing a corrected copy" in notes[0] and "correcting llama.cpp" in notes[1]
    assert list((cache / "mmproj").glob("*.gguf"))  # the copy went to the cache
    again = _cli(*base, cache=cache)  # written once
    assert [l for l in again.stderr.splitlines() if fx.mmproj.name in l] == notes[1:]
    text = json.loads(r.stdout)["text"]
    assert json.loads(again.stdout)["text"] == text
    texts = {}
    for flags in (["--mmproj-as-is"], ["--image-mode", "crop"], ["--image-mode", "native"]):
        o = _cli(*base, *flags, cache=cache)
        assert o.returncode == 0, o.stderr
        texts[flags[-1]] = json.loads(o.stdout)["text"]
        if flags == ["--mmproj-as-is"]:
            assert "run as llama.cpp does (--mmproj-as-is), without correcting" in o.stderr
    print(f"\ndefault: {text!r}; " + "; ".join(f"{k}: {v!r}" for k, v in texts.items()))
    assert texts["--mmproj-as-is"] != text  # the flag reaches the engine (rows at cos ~0.8 of the corrected)
    bad = _cli(*base, cache="/proc/vhr-edge-cache")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("vhr-edge: error: cannot write the corrected mmproj")
    d = json.loads(_cli("info", fx.mmproj, "--json", cache=cache).stdout)
    assert d["llama_cpp_runs_vision_layers"] == 2 and d["vision_layers"] == 3 and d["class_token"] is True
    assert len(d["vhr_edge_corrects"]) == 2
