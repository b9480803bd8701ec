"""An independent PyTorch reference of VHR (VHR_SPEC.md) on a Hugging Face ``LlamaForCausalLM``.

It shares no code with the native engine: the text model is rebuilt in transformers from
the same GGUF, the text-only reference pass, the head scores / outlier rule / median
selection are written here from the spec in torch (as the authors' released code computes
them: squared VHD, ``torch.std`` with its ``> 1`` guard, ``torch.median``), and the heads are
scaled by forward pre-hooks on each layer's
``self_attn.o_proj`` (whose input is the per-head attention output, head ``i`` = features
``i*head_dim .. (i+1)*head_dim-1``, the tensor llama.cpp calls ``kqv_out-<l>``).

Needs the ``oracle`` extra (torch, transformers); they are imported inside the functions,
so ``import vhr_edge`` never pulls them in.

GGUF loading.  ``LlamaForCausalLM.from_pretrained(dir, gguf_file=name)`` insists on the
``accelerate`` package, which the ``oracle`` extra does not carry.  So the default loader
uses the layer underneath it, ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``:
it parses the GGUF config and converts the tensors to HF names, undoing llama.cpp's q/k rope
permutation (``LlamaTensorProcessor._reverse_permute_weights``).  ``loader="gguf"`` instead
builds config and state dict straight from ``gguf.GGUFReader`` with our own reversal of the
permutation (the inverse of ``convert_hf_to_gguf.py``'s ``permute``); the tests check that
both give identical weights.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import numpy as np

__all__ = ["load_hf_llama_from_gguf", "vhr_reference", "select_heads"]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k rope permutation (GGUF rows per head (dim/2, 2) -> HF's (2, dim/2))."""
    # convert_hf_to_gguf.py permute: w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_via_gguf_reader(path: str):
    import gguf
    import torch
    from transformers import LlamaConfig

    r = gguf.GGUFReader(path)

    def val(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        return f.contents()

    arch = val("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")
    n_head = int(val("llama.attention.head_count"))
    n_kv = int(val("llama.attention.head_count_kv", n_head))
    n_embd = int(val("llama.embedding_length"))
    tensors = {t.name: np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        [int(x) for x in reversed(t.shape)]) for t in r.tensors}
    n_vocab = tensors["token_embd.weight"].shape[0]
    cfg = LlamaConfig(
        vocab_size=n_vocab, hidden_size=n_embd, num_hidden_layers=int(val("llama.block_count")),
        intermediate_size=int(val("llama.feed_forward_length")), num_attention_heads=n_head,
        num_key_value_heads=n_kv, head_dim=n_embd // n_head,
        max_position_embeddings=int(val("llama.context_length", 2048)),
        rms_norm_eps=float(np.float32(val("llama.attention.layer_norm_rms_epsilon"))),
        rope_theta=float(val("llama.rope.freq_base", 10000.0)),
        bos_token_id=int(val("tokenizer.ggml.bos_token_id", 1)), eos_token_id=int(val("tokenizer.ggml.eos_token_id", 2)),
        tie_word_embeddings="output.weight" not in tensors,
    )
    sd = {"model.embed_tokens.weight": tensors["token_embd.weight"], "model.norm.weight": tensors["output_norm.weight"]}
    if "output.weight" in tensors:
        sd["lm_head.weight"] = tensors["output.weight"]
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            w = tensors[f"blk.{i}.{g}.weight"]
            if g == "attn_q":
                w = _unpermute(w, n_head)
            elif g == "attn_k":
                w = _unpermute(w, n_kv)
            sd[f"model.layers.{i}.{h}.weight"] = w
    return cfg, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def _load_via_transformers(path: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(path)
    c = dict(meta["config"])
    if c.pop("model_type", "llama") != "llama":
        raise ValueError(f"{path} is not a llama model")
    c.pop("_model_name_or_path", None)
    cfg = LlamaConfig(**c)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    sd = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    return cfg, {k: v.to(torch.float32) for k, v in sd.items()}


def load_hf_llama_from_gguf(path, loader: str = "transformers"):
    """A float32, eval-mode ``LlamaForCausalLM`` (eager attention) with the weights of a llama GGUF.

    ``loader``: "transformers" (transformers' GGUF conversion) or "gguf" (GGUFReader + our
    own q/k un-permutation); see the module docstring.
    """
    import torch
    from transformers import LlamaForCausalLM

    if loader not in ("transformers", "gguf"):
        raise ValueError(f"loader must be 'transformers' or 'gguf', got {loader!r}")
    cfg, sd = (_load_via_transformers if loader == "transformers" else _load_via_gguf_reader)(str(path))
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).to(torch.float32)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    return model.eval()


def select_heads(d, ta, outlier_rule: bool = True) -> list[int]:
    """VHR_SPEC 2-3 for one layer, as the released code does it in torch: D and TA squared,
    the outlier rule only when ``torch.std(D) > 1`` (unbiased std), then ``D > torch.median(D)``."""
    import torch

    d = torch.as_tensor(np.asarray(d, np.float64)).clone()
    ta = torch.as_tensor(np.asarray(ta, np.float64))
    if outlier_rule and d.std() > 1:
        out = (d > d.mean() + d.std()) & (ta > ta.mean() + ta.std())
        d[out] = 0
    return [int(i) for i in (d > d.median()).nonzero().flatten()]


class _Hooks:
    """State shared by the o_proj pre-hooks: 'record' (the text-only pass), 'score' (the image
    prefill: score against R, select, scale) or 'scale' (decoding)."""

    def __init__(self, n_layer, n_head, alpha, outlier_rule):
        self.mode = None
        self.n_head, self.alpha, self.outlier_rule = n_head, alpha, outlier_rule
        self.ref: dict[int, "object"] = {}  # R[l]: [n_head, head_dim] at the text-only prompt's last position
        self.heads: dict[int, list[int]] = {}
        self.d = np.zeros((n_layer, n_head), np.float32)
        self.ta = np.zeros((n_layer, n_head), np.float32)

    def hook(self, layer):
        import torch

        def pre(module, args):
            x = args[0]
            hd = x.shape[-1] // self.n_head
            if self.mode == "record":
                self.ref[layer] = x[0, -1].reshape(self.n_head, hd).double().clone()
                return None  # the reference is never reinforced
            if self.mode == "score":
                a = x[0, -1].reshape(self.n_head, hd).double()
                r = self.ref[layer]
                self.d[layer] = ((a - r) ** 2).sum(-1).cpu().numpy()
                self.ta[layer] = (r ** 2).sum(-1).cpu().numpy()
                self.heads[layer] = select_heads(self.d[layer], self.ta[layer], self.outlier_rule)
            heads = self.heads.get(layer, [])
            if self.mode is None or not heads:
                return None
            scale = torch.ones(self.n_head, dtype=x.dtype, device=x.device)
            scale[heads] = self.alpha
            return (x * scale.repeat_interleave(hd),) + args[1:]  # every position of the image prompt

        return pre


def vhr_reference(model, prefix_ids: Sequence[int], image_rows, suffix_ids: Sequence[int], *,
                  layers: Sequence[int], alpha: float = 2.0, outlier_rule: bool = True,
                  n_predict: int = 32, vhr: bool = True, eos_id: Optional[int] = None) -> dict:
    """VHR as released (or plain greedy decoding with ``vhr=False``) of one image prompt.

    1. The text-only prompt ``prefix + suffix`` (contiguous positions) runs alone; o_proj
       pre-hooks record each VHR layer's input at its last position (R), nothing is scaled.
    2. The image prompt ``prefix + image_rows + suffix`` (token rows from the model's table,
       image rows as given) runs with a KV cache; at each VHR layer the pre-hook scores the
       last position against R (D squared, TA), selects (``select_heads``) and scales the
       selected heads at every position before o_proj, so higher layers see lower ones
       reinforced. Its logits choose the first token.
    3. Greedy decoding with the same heads scaled for every new token; stops at ``eos_id``
       (default: the config's), which is not included.

    Runs on the model's device and in its dtype (CPU float32 for the tests; bench/vs_pytorch.py
    also runs it in float16 on CUDA); scores are computed in float64 either way.

    Returns {"vhd" (sqrt(D)), "d", "ta" (n_layer x n_head float32, zero rows for unscored
    layers), "selected_heads" {layer: [heads]}, "first_logits" (float32), "tokens"}.
    """
    import torch

    cfg = model.config
    n_layer, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    eos = cfg.eos_token_id if eos_id is None else eos_id
    layers = sorted(set(int(l) for l in layers)) if vhr else []
    state = _Hooks(n_layer, n_head, float(alpha), outlier_rule)
    handles = [model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(state.hook(l)) for l in layers]
    # transformers 5 renamed past_key_values to cache (kwarg and output field)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        with torch.no_grad():
            emb = model.get_input_embeddings()
            dev = emb.weight.device
            pre = emb(torch.as_tensor(list(prefix_ids), dtype=torch.long, device=dev))
            suf = emb(torch.as_tensor(list(suffix_ids), dtype=torch.long, device=dev))
            img = torch.as_tensor(np.asarray(image_rows, np.float32), device=dev).to(pre.dtype)
            seq0 = torch.cat([pre, img, suf])
            L0 = seq0.shape[0]
            if vhr:
                state.mode = "record"
                model(inputs_embeds=torch.cat([pre, suf])[None], use_cache=False)
                state.mode = "score"
            out = model(inputs_embeds=seq0[None], use_cache=True)
            first = out.logits[0, L0 - 1].float()
            if vhr:
                state.mode = "scale"  # the heads are fixed from here on
            cache = getattr(out, key)
            tokens: list[int] = []
            tok = int(torch.argmax(first))
            p = L0
            while tok != eos:
                tokens.append(tok)
                if len(tokens) >= n_predict:
                    break
                out = model(input_ids=torch.tensor([[tok]], device=dev), use_cache=True,
                            position_ids=torch.tensor([[p]], device=dev), **{key: cache})
                cache, p = getattr(out, key), p + 1
                tok = int(torch.argmax(out.logits[0, -1]))
    finally:
        for h in handles:
            h.remove()
    return {
        "vhd": np.sqrt(state.d),
        "d": state.d,
        "ta": state.ta,
        "selected_heads": {l: list(state.heads.get(l, [])) for l in layers},
        "first_logits": first.cpu().numpy().astype(np.float32),
        "tokens": tokens,
    }
