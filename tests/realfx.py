"""Shared helpers for the real-format LLaVA tests: the converter-made fixtures (vhr_edge.real_fixture,
built once into $VHR_EDGE_CACHE or ~/.cache/vhr-edge) and their HF oracles."""

from __future__ import annotations

import numpy as np
import pytest

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
ROW_MIN_COS = 0.9999  # issue 14: min row cosine with the corrections
ROW_RTOL = 2e-3  # max abs error / max abs value


def build(which: str):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vhr_edge.real_fixture import build as build_fixture

    return build_fixture(which)


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A non-trivial test picture: noise, a few coloured blocks, a gradient."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 90).astype(np.uint8)
    img[:, :, 2] += (np.linspace(0, 120, w)[None, :]).astype(np.uint8)
    for _ in range(5):
        y, x = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
        img[y:y + h // 4, x:x + w // 5] = rng.integers(0, 256, 3)
    return img


def normalize(tile: np.ndarray) -> np.ndarray:
    """A uint8 HxWx3 tile as libmtmd normalizes it, channels first (HF's pixel_values layout)."""
    return ((tile / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)


def row_stats(rows: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(mean row cosine, min row cosine, max abs error / max abs value)."""
    assert rows.shape == ref.shape, (rows.shape, ref.shape)
    cos = (rows * ref).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(ref, axis=1)
    return float(cos.mean()), float(cos.min()), float(np.abs(rows - ref).max() / np.abs(ref).max())


def hf_llava_rows(model, pixel_values: np.ndarray) -> np.ndarray:
    """HF LlavaForConditionalGeneration's projector rows for [1, 3, H, W] pixel values."""
    import torch

    with torch.no_grad():
        f = model.get_image_features(pixel_values=torch.as_tensor(pixel_values, dtype=torch.float32),
                                     vision_feature_layer=-2, vision_feature_select_strategy="default")
    f = getattr(f, "pooler_output", f)
    f = torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
    return f.reshape(-1, f.shape[-1]).numpy()


def hf_llava_next_rows(model, img: np.ndarray) -> np.ndarray:
    """HF LlavaNextForConditionalGeneration's packed image rows (base tile, unpadded tiles with
    image_newline), preprocessed by LlavaNextImageProcessor (PIL backend)."""
    import torch

    b = llava_next_processor(model)(images=img, return_tensors="pt")
    with torch.no_grad():
        f = model.model.get_image_features(pixel_values=b["pixel_values"], image_sizes=b["image_sizes"],
                                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    f = getattr(f, "pooler_output", f)
    return (f[0] if isinstance(f, (list, tuple)) else f).numpy()


def llava_next_processor(model):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_grid_pinpoints=model.config.image_grid_pinpoints)


def hf_text_model(llava):
    """A float32 LlamaForCausalLM holding the HF LLaVA's own decoder weights (not read from any GGUF)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = llava.config.text_config
    cfg._attn_implementation = "eager"
    lm = LlamaForCausalLM(cfg).float().eval()
    src = llava.state_dict()
    sd = {("model." + k[len("model.language_model."):]): v for k, v in src.items() if k.startswith("model.language_model.")}
    sd["lm_head.weight"] = src["lm_head.weight"]
    lm.load_state_dict(sd)
    with torch.no_grad():
        return lm
