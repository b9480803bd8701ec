"""Interop with the ecosystem's most used binding: `vhr-edge caption --no-vhr` against
llama-cpp-python's Llava15ChatHandler on the bundled testbed and examples, with the identical
rendered prompt (the handler's template overridden to render the testbed's vicuna-system
prompt), greedy (temperature 0) and no repeat penalty.

Measured (docs/real-models.md): first-step logits within 3.8e-3 (2.1e-4 of the logit range)
and the same tokens to the end of every caption, in every configuration tried: llama-cpp-python
with flash attention off (its default) or on, n_batch = n_ubatch 512 or 16 (the image decoded
in 4 batches); vhr-edge with -fa auto/off and 1, 2 or 4 threads. The smallest top-2 logit gap
along the three captions is 0.041, ten times that noise. The testbed needs no mmproj correction
(SigLIP tower, no class token, feature layer in the file), so both load the file as it is.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from vhr_edge import DEFAULT_PROMPT

REPO = Path(__file__).resolve().parent.parent
TEXT, MMPROJ = REPO / "models" / "testbed-f16.gguf", REPO / "models" / "testbed-mmproj-f16.gguf"
EXAMPLES = sorted((REPO / "examples").glob("*_without_*.png"))
N = 96
LOGIT_RTOL = 1e-3  # of the logit range; measured <= 2.1e-4

pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason="the bundled testbed is not in models/")


def _handler_class(template: str):
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    system, rest = template.split("<image>")
    assert rest == "\n{prompt} ASSISTANT:"

    class SamePrompt(Llava15ChatHandler):
        """Renders exactly vhr-edge's template around the image and the text."""

        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = (
            "{% for m in messages %}{% if m.role == 'user' %}" + system +
            "{% for c in m.content %}{% if c.type == 'image_url' %}{{ c.image_url.url }}{% endif %}{% endfor %}"
            "{{ '\\n' }}{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}"
            " ASSISTANT:{% endif %}{% endfor %}")

    return SamePrompt


def _llama_cpp_python(img: Path, text=TEXT, mmproj=MMPROJ, template=None, **kw):
    """(generated tokens, logits of every step, prompt ids) from Llama.create_chat_completion."""
    from llama_cpp import Llama, LogitsProcessorList

    from vhr_edge.templates import VICUNA_SYSTEM

    handler = _handler_class(template or VICUNA_SYSTEM)(clip_model_path=str(mmproj), verbose=False)
    llm = Llama(model_path=str(text), chat_handler=handler, n_ctx=2048, n_threads=2, verbose=False, **kw)
    steps, ids = [], []

    def capture(input_ids, scores):
        steps.append(np.array(scores, np.float32))
        ids.append(list(input_ids))
        return scores

    url = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                       {"type": "text", "text": DEFAULT_PROMPT}]}
    llm.create_chat_completion(messages=[msg], temperature=0.0, repeat_penalty=1.0, max_tokens=N,
                               logits_processor=LogitsProcessorList([capture]))
    n0 = len(ids[0])
    tokens = ids[-1][n0:] + [int(np.argmax(steps[-1]))]
    if tokens[-1] == llm.token_eos():
        tokens.pop()
    return tokens, steps, ids[0]


@pytest.fixture(scope="module")
def ours():
    from vhr_edge import Session
    from vhr_edge.images import load_image

    out = {}
    with Session(TEXT, MMPROJ, n_threads=2, notice=None) as s:
        assert not s.mmproj_plan.needs_correction
        for img in EXAMPLES:
            r = s.caption(img, DEFAULT_PROMPT, vhr=False, n_predict=N, keep_logits=True)
            e = s._runner.embed_image(load_image(img), DEFAULT_PROMPT, s.prompt_template)
            out[img.name] = (r, e)
    return out


@pytest.mark.parametrize("config", [{}, {"n_batch": 16, "n_ubatch": 16}], ids=["defaults", "batch16"])
@pytest.mark.parametrize("img", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_no_vhr_caption_matches_llava15_chat_handler(img, config, ours):
    r, e = ours[img.name]
    tokens, steps, prompt_ids = _llama_cpp_python(img, **config)
    p, n_img = len(e["prefix"]), e["image"].shape[0]
    assert prompt_ids[:p] == list(e["prefix"]) and prompt_ids[p + n_img:] == list(e["suffix"])  # the same prompt
    first = steps[0]
    diff = float(np.abs(r.first_logits - first).max())
    span = float(first.max() - first.min())
    gaps = [float(np.diff(np.sort(s)[-2:])[0]) for s in steps]
    print(f"\n{img.stem} {config}: first logits max diff {diff:.2e} ({diff / span:.1e} of the range); "
          f"{len(tokens)} tokens; smallest top-2 gap {min(gaps):.3f}")
    assert diff <= LOGIT_RTOL * span
    assert r.tokens == tokens
    assert r.stop_reason == "eos" and len(tokens) < N  # whole captions compared, not cut ones


def test_llama_cpp_python_gets_llama_cpps_rows_of_a_converter_made_pair(tmp_path):
    """On the converter-made LLaVA-1.5 fixture, llama-cpp-python runs llama.cpp's vision graph as
    it is: `--mmproj-as-is --image-mode native` reproduces it, vhr-edge's default does not."""
    pytest.importorskip("torch")
    from PIL import Image

    from realfx import build, picture
    from vhr_edge import Session
    from vhr_edge.templates import LLAVA_15

    fx = build("1.5")
    img = tmp_path / "square.png"
    Image.fromarray(picture(336, 336, seed=3)).save(img)
    _, steps, _ = _llama_cpp_python(img, fx.text_f16, fx.mmproj, LLAVA_15)
    ref = steps[0]
    span = float(ref.max() - ref.min())
    diffs = {}
    for name, kw in (("as-is", {"mmproj_as_is": True, "image_mode": "native"}), ("corrected", {})):
        with Session(fx.text_f16, fx.mmproj, n_threads=2, notice=None, **kw) as s:
            r = s.caption(img, DEFAULT_PROMPT, vhr=False, n_predict=1, keep_logits=True)
        diffs[name] = float(np.abs(r.first_logits - ref).max()) / span
    print(f"\nfirst logits vs llama-cpp-python, of the range: {diffs}")
    assert diffs["as-is"] <= LOGIT_RTOL and diffs["corrected"] > 10 * LOGIT_RTOL
