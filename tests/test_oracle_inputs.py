"""The fixture oracle with inputs of its own: prompt tokens from the transformers tokenizer (read
from the GGUF) and image rows from a transformers CLIP vision tower built from the mmproj's
weights, instead of the engine's `embed_image`. So a wrong prompt split, a missing BOS, image rows
in the wrong place or a wrong feature layer in the engine cannot hide behind an oracle that
reads them from the engine.

The engine corrects the pinned llama.cpp's CLS-tower graph by default (docs/real-models.md), so
its rows must be HF's own; with mmproj_as_is they must be those of llama.cpp's graph (the class
token appended after the patches while positions are numbered CLS-first, ggml-org/llama.cpp
#25814), which the tower below computes too. The projector's GELU is the tanh form ggml uses.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SPEC, hf_image_and_text_forward, oracle_import, scene

torch = oracle_import("torch")
oracle_import("transformers")

from vhr_edge import DEFAULT_PROMPT, fixtures  # noqa: E402
from vhr_edge.layers import auto_layers  # noqa: E402
from vhr_edge.oracle import load_hf_llama_from_gguf, vhr_reference  # noqa: E402
from vhr_edge.templates import LLAVA_15, VICUNA_SYSTEM  # noqa: E402

LAYERS = auto_layers(SPEC.n_layer)
N_PREDICT = 24
ROWS_RTOL = 2e-3  # measured ~4e-4 (F16 patch kernel, ggml's GELU and softmax)


@pytest.fixture(scope="module")
def hf(tiny):
    return load_hf_llama_from_gguf(tiny[0])


@pytest.fixture(scope="module")
def hf_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny[0].parent), gguf_file=tiny[0].name)


def own_prompt_tokens(tok, template: str, prompt: str) -> tuple[list[int], list[int]]:
    """(prefix, suffix) around <image>: BOS + the text before it, the text after it."""
    before, after = template.split("<image>")
    prefix = [tok.bos_token_id] + tok(before.replace("{prompt}", prompt), add_special_tokens=False).input_ids
    suffix = tok(after.replace("{prompt}", prompt), add_special_tokens=False).input_ids
    return prefix, suffix


@pytest.fixture(scope="module")
def tower():
    """A transformers CLIPVisionModel with the fixture mmproj's weights, and its projector."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    t = fixtures.mmproj_tensors(SPEC)
    cfg = CLIPVisionConfig(hidden_size=SPEC.vision_embd, intermediate_size=SPEC.vision_ff,
                           num_hidden_layers=SPEC.vision_layers, num_attention_heads=SPEC.vision_heads,
                           image_size=SPEC.image_size, patch_size=SPEC.patch_size, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5)
    cfg._attn_implementation = "eager"
    model = CLIPVisionModel(cfg).float().eval()

    def f(name):
        return torch.from_numpy(np.asarray(t[name], np.float32).copy())

    sd = {"embeddings.patch_embedding.weight": f("v.patch_embd.weight"),
          "embeddings.class_embedding": f("v.class_embd"),
          "embeddings.position_embedding.weight": f("v.position_embd.weight"),
          "pre_layrnorm.weight": f("v.pre_ln.weight"), "pre_layrnorm.bias": f("v.pre_ln.bias")}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2", "ln1": "layer_norm1",
             "ln2": "layer_norm2"}
    for i in range(SPEC.vision_layers):
        for g, h in names.items():
            for wb in ("weight", "bias"):
                sd[f"encoder.layers.{i}.{h}.{wb}"] = f(f"v.blk.{i}.{g}.{wb}")
    vm = getattr(model, "vision_model", model)
    missing, unexpected = vm.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"post_layernorm.weight", "post_layernorm.bias"}  # LLaVA skips it

    def project(x):
        h = torch.nn.functional.linear(x, f("mm.0.weight"), f("mm.0.bias"))
        return torch.nn.functional.linear(torch.nn.functional.gelu(h, approximate="tanh"), f("mm.2.weight"),
                                          f("mm.2.bias"))

    return vm, project


def own_image_rows(tower, img) -> tuple[np.ndarray, np.ndarray]:
    """(rows of HF's graph, rows of llama.cpp's CLS-last graph): CLIP hidden_states[-2] without
    the class token, through the MLP projector."""
    vm, project = tower
    x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - torch.tensor(fixtures.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(fixtures.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hf = project(vm(pixel_values=x, output_hidden_states=True).hidden_states[-2][0, 1:]).numpy()
        e = vm.embeddings
        patches = e.patch_embedding(x).flatten(2).transpose(1, 2)
        h = vm.pre_layrnorm(torch.cat([patches, e.class_embedding.view(1, 1, -1)], 1) + e.position_embedding.weight[None])
        for layer in vm.encoder.layers[:-1]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        cls_last = project(h[0, 1:]).numpy()
    return hf, cls_last


def rel(a, ref) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("template", [LLAVA_15, VICUNA_SYSTEM], ids=["llava-1.5", "vicuna-system"])
def test_prompt_tokens_from_the_hf_tokenizer(session, hf_tokenizer, template):
    for prompt in (DEFAULT_PROMPT, "Is there a dog in the image?"):
        e = session._runner.embed_image(scene(1), prompt, template)
        assert (list(e["prefix"]), list(e["suffix"])) == own_prompt_tokens(hf_tokenizer, template, prompt)


def test_image_rows_from_a_hf_vision_tower(tiny, session, tower):
    from vhr_edge import Session

    as_is = Session(*tiny, mmproj_as_is=True)
    for seed in (1, 2, 5):
        rows = session._runner.embed_image(scene(seed), DEFAULT_PROMPT, session.prompt_template)["image"]
        raw = as_is._runner.embed_image(scene(seed), DEFAULT_PROMPT, session.prompt_template)["image"]
        hf, cls_last = own_image_rows(tower, scene(seed))
        assert rows.shape == hf.shape == (SPEC.n_image_tokens, SPEC.n_embd)
        print(f"scene {seed}: corrected rows vs HF {rel(rows, hf):.2e}; as-is rows vs the CLS-last graph "
              f"{rel(raw, cls_last):.2e}, vs HF {rel(raw, hf):.2e}")
        assert rel(rows, hf) <= ROWS_RTOL and rel(raw, cls_last) <= ROWS_RTOL
        assert rel(raw, hf) > 10 * ROWS_RTOL  # the two graphs differ here: the check can fail


@pytest.mark.parametrize("seed, vhr", [(1, True), (2, True), (1, False)])
def test_engine_matches_the_oracle_on_its_own_inputs(session, hf, hf_tokenizer, tower, seed, vhr):
    img = scene(seed)
    prefix, suffix = own_prompt_tokens(hf_tokenizer, session.prompt_template, DEFAULT_PROMPT)
    rows = own_image_rows(tower, img)[0]  # HF's graph: the engine corrects llama.cpp's
    o = vhr_reference(hf, prefix, rows, suffix, layers=LAYERS, vhr=vhr, n_predict=N_PREDICT)
    r = session.caption(img, DEFAULT_PROMPT, vhr=vhr, layers=LAYERS, n_predict=N_PREDICT, keep_logits=True)
    span = float(o["first_logits"].max() - o["first_logits"].min())
    diff = float(np.abs(r.first_logits - o["first_logits"]).max())
    print(f"scene {seed} vhr={vhr}: first logits differ by {diff / span:.2e} of their range")
    assert diff <= 1e-3 * span  # measured <= 2e-4
    assert r.tokens == o["tokens"]
    if vhr:
        assert r.vhr.selected_heads == o["selected_heads"]
        for l in LAYERS:
            assert rel(r.vhr.vhd[l], o["vhd"][l]) <= 5e-3


def joint_reference(model, prefix, rows, suffix, layers, alpha=2.0):
    """The "joint" variant (both prompts in one batch, both reinforced) in transformers: the
    image prompt and the text-only prompt as a padded batch of two; at each VHR layer the heads
    are scored between the two last positions, selected by the spec's rule and scaled in every
    position of BOTH sequences. Returns (first logits, sqrt(D) per layer, heads per layer)."""
    n_head = model.config.num_attention_heads
    vhd, heads = {}, {}

    def reinforce(layer, a, last0, last1):
        hd = a.shape[-1] // n_head
        diff = (a[0, last0] - a[1, last1]).reshape(n_head, hd).double()
        ref = a[1, last1].reshape(n_head, hd).double()
        d = (diff ** 2).sum(-1).numpy().astype(np.float32)
        ta = (ref ** 2).sum(-1).numpy().astype(np.float32)
        dd, tt = d.astype(np.float64), ta.astype(np.float64)
        if dd.std(ddof=1) > 1:
            dd[(dd > dd.mean() + dd.std(ddof=1)) & (tt > tt.mean() + tt.std(ddof=1))] = 0.0
        heads[layer] = [int(i) for i in np.flatnonzero(dd > np.median(dd))]
        vhd[layer] = np.sqrt(d)
        scale = torch.ones(n_head)
        scale[heads[layer]] = alpha
        return a * scale.repeat_interleave(hd)

    first = hf_image_and_text_forward(model, prefix, rows, suffix, layers, reinforce)
    return first, vhd, heads


@pytest.mark.parametrize("seed", [1, 2])
def test_joint_variant_matches_a_batched_reference(session, hf, hf_tokenizer, tower, seed):
    """The engine's joint variant shares the prefix rows between its two sequences; the
    reference runs them as two separate sequences."""
    img = scene(seed)
    prefix, suffix = own_prompt_tokens(hf_tokenizer, session.prompt_template, DEFAULT_PROMPT)
    rows = own_image_rows(tower, img)[0]
    first, vhd, heads = joint_reference(hf, prefix, rows, suffix, LAYERS)
    r = session.caption(img, DEFAULT_PROMPT, reference="joint", layers=LAYERS, n_predict=1, keep_logits=True)
    assert r.vhr.reference == "joint" and r.vhr.selected_heads == heads
    for l in LAYERS:
        assert rel(r.vhr.vhd[l], vhd[l]) <= 2e-3, l
    span = float(first.max() - first.min())
    assert np.abs(r.first_logits - first).max() <= 1e-3 * span
    released = session.caption(img, DEFAULT_PROMPT, layers=LAYERS, n_predict=1, keep_logits=True)
    assert np.abs(released.first_logits - first).max() > 1e-2 * span  # the variants differ: the check can fail
