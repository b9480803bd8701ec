"""The testbed LVLM: a tiny but real HF `LlavaForConditionalGeneration`.

Vision tower: a SigLIP-style ViT (`SiglipVisionModel`: patch embedding with bias, learned
position embeddings, NO class token), features from layer -2, all patches ("full").
Projector: LLaVA-1.5's MLP (Linear -> GELU -> Linear). Decoder: `LlamaForCausalLM`.

Why no CLS token (unlike CLIP in LLaVA-1.5): llama.cpp at llama-cpp-python 0.3.36 builds the
CLIP+CLS LLaVA graph with the class token after the patches while filling positions and the
output selection for CLS-first (ggml-org/llama.cpp #25814, fix #25844 not merged). A CLS-free
tower is computed identically by HF and libmtmd, so the GGUF testbed and the PyTorch oracle
see the same image rows. The projector's GELU is the tanh form, which is what ggml_gelu computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TestbedConfig:
    # vision (SigLIP-style ViT on 64x64 scenes, 8x8 patches -> 64 image tokens)
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 5  # layer -2 (the 4th block's output) feeds the projector
    vision_heads: int = 4
    vision_ff: int = 768
    # decoder (n_embd and n_ff multiples of 256 so K-quants apply to every tensor)
    n_embd: int = 256
    n_layer: int = 8
    n_head: int = 8
    n_ff: int = 768
    vocab_size: int = 1024
    max_positions: int = 512
    image_token_id: int = 3  # "<image>" in the testbed tokenizer (HF-style inputs only)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    def to_dict(self) -> dict:
        return asdict(self)


IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


def build_model(cfg: TestbedConfig, seed: int = 0):
    """A randomly initialised LlavaForConditionalGeneration (float32)."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=cfg.vision_ff, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
    )
    text = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.n_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=cfg.image_token_id,
        projector_hidden_act="gelu_pytorch_tanh", vision_feature_layer=-2,
        vision_feature_select_strategy="full", image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    model.config.testbed = cfg.to_dict()
    return model.float()


def image_tensor(images_uint8):
    """N x H x W x 3 uint8 (numpy) -> N x 3 x H x W float, normalised like the mmproj says."""
    import numpy as np
    import torch

    a = torch.from_numpy(np.array(images_uint8, dtype=np.uint8)).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (a - mean) / std


def image_features(model, pixel_values):
    """Projected image rows (N x n_patches x n_embd): layer -2 of the tower, all patches, MLP."""
    vt = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    proj = model.model.multi_modal_projector if hasattr(model, "model") else model.multi_modal_projector
    out = vt(pixel_values, output_hidden_states=True)
    return proj(out.hidden_states[-2])


def language_model(model):
    """(decoder body, lm_head) across transformers versions."""
    if hasattr(model, "model") and hasattr(model.model, "language_model"):
        return model.model.language_model, model.lm_head
    return model.language_model.model, model.language_model.lm_head
