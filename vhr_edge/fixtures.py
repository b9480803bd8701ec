"""Tiny random-weight LLaVA-1.5-style GGUF model pairs for tests and demos.

``write_tiny_llava`` produces two files that llama.cpp / libmtmd load like a
real LLaVA-1.5 checkpoint:

* a text model: GGUF architecture ``llama`` with an SPM ("llama") tokenizer
  that has byte-fallback tokens, so any text tokenizes;
* a vision projector (mmproj): GGUF architecture ``clip``, projector type
  ``mlp`` (CLIP ViT tower + Linear-GELU-Linear), the layout written by
  llama.cpp's ``convert_image_encoder_to_gguf.py``.

All weights are deterministic functions of ``TinySpec.seed``.  Every tensor of
the text model is drawn, in a fixed order, from a single ``numpy`` generator,
so options that only post-process the draws (``attn_output_scale``, ``dtype``)
or touch the other file (``proj_dim``) never change any other weight.

Axis-order note: ggml lists dimensions fastest-first (``ne0`` = row length),
numpy lists them slowest-first.  A linear layer ``y = W x`` with ``in``
inputs and ``out`` outputs is a ggml tensor with ``ne = [in, out]`` and is
handed to ``GGUFWriter`` as a numpy array of shape ``(out, in)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["TinySpec", "llava_7b_shaped", "write_text_model", "write_mmproj", "write_tiny_llava", "quantize"]

VOCAB_SIZE = 512
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPIECE = "\u2581"  # "▁", SentencePiece's word-boundary marker
WORDS = (
    "USER ASSISTANT A a the The this is are in on of and to with image picture photo "
    "chat describe Please detail what What there it see can you color red man dog cat"
).split()
# token types (gguf.TokenType / llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _UNUSED, _BYTE = 1, 2, 3, 5, 6

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QUANT_FTYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}  # llama_ftype values


@dataclass
class TinySpec:
    """Shape and seed of a tiny LLaVA pair (defaults: ~0.3 MB text model)."""

    n_layer: int = 4
    n_embd: int = 64  # text model width
    n_head: int = 4
    n_head_kv: int | None = None  # None = n_head; fewer = GQA
    n_ff: int = 128
    ctx: int = 2048
    vision_embd: int = 32
    vision_layers: int = 2  # true block count of the CLIP tower
    vision_heads: int = 2
    vision_ff: int = 64
    image_size: int = 64
    patch_size: int = 8  # -> (64/8)^2 = 64 image tokens
    proj_dim: int | None = None  # mmproj output width; None = n_embd (differ -> mismatched pair)
    seed: int = 0
    dtype: str = "f32"  # "f32" or "f16" for the 2-D weight matrices of the text model
    projector_type: str = "mlp"  # written as clip.projector_type (others: non-LLaVA test cases)
    vocab_size: int = VOCAB_SIZE  # the real vocabulary is padded with unused tokens up to this

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_head_kv is None else self.n_head_kv

    @property
    def out_dim(self) -> int:
        return self.n_embd if self.proj_dim is None else self.proj_dim

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def llava_7b_shaped(n_layer: int = 8, seed: int = 0) -> TinySpec:
    """LLaVA-1.5-7B's decoder widths (n_embd 4096, 32 heads, n_ff 11008, vocab 32000) with
    `n_layer` of its 32 layers, and a 336 px / patch 14 mmproj that yields its 576 image
    tokens (a narrow random tower: the bench measures the decoder, not CLIP)."""
    return TinySpec(n_layer=n_layer, n_embd=4096, n_head=32, n_ff=11008, ctx=4096, vision_embd=64,
                    vision_layers=2, vision_heads=2, vision_ff=128, image_size=336, patch_size=14,
                    seed=seed, dtype="f16", vocab_size=32000)


def build_vocab(vocab_size: int = VOCAB_SIZE) -> tuple[list[str], list[float], list[int]]:
    """SPM vocab: specials, 256 byte-fallback tokens, ASCII chars, "▁word" prefix chains.

    llama.cpp's SPM tokenizer only merges adjacent symbols whose concatenation is
    itself a token, so every prefix of each "▁word" is included; anything else
    falls back to single characters or ``<0xXX>`` byte tokens.
    """
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    pieces = [SPIECE] + [chr(c) for c in range(33, 127)]
    for word in WORDS:
        full = SPIECE + word
        pieces += [full[:i] for i in range(2, len(full) + 1)]
    pieces = list(dict.fromkeys(pieces))  # dedupe, keep order
    if len(tokens) + len(pieces) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the fixture vocabulary ({len(tokens) + len(pieces)})")
    tokens += pieces
    types += [_NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    n_pad = vocab_size - len(tokens)
    tokens += [f"<unused{i}>" for i in range(n_pad)]
    types += [_UNUSED] * n_pad
    scores += [-1e4] * n_pad
    return tokens, scores, types


def _linear(rng: np.random.Generator, out: int, inp: int, gain: float = 1.0) -> np.ndarray:
    """Weight of shape (out, in) == ggml ne [in, out], std gain/sqrt(in)."""
    return rng.standard_normal((out, inp), dtype=np.float32) * np.float32(gain / np.sqrt(inp))


def _norm(rng: np.random.Generator, n: int) -> np.ndarray:
    return 1.0 + 0.02 * rng.standard_normal(n, dtype=np.float32)


def _bias(rng: np.random.Generator, n: int) -> np.ndarray:
    return 0.02 * rng.standard_normal(n, dtype=np.float32)


def text_tensor_shapes(spec: TinySpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every text-model tensor, in file order."""
    if spec.n_embd % spec.n_head or spec.n_head % spec.kv_heads:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    e, kv, ff = spec.n_embd, spec.kv_heads * spec.head_dim, spec.n_ff
    out = [("token_embd.weight", (spec.vocab_size, e))]
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (e,)), (p + "attn_q.weight", (e, e)), (p + "attn_k.weight", (kv, e)),
                (p + "attn_v.weight", (kv, e)), (p + "attn_output.weight", (e, e)), (p + "ffn_norm.weight", (e,)),
                (p + "ffn_gate.weight", (ff, e)), (p + "ffn_up.weight", (ff, e)), (p + "ffn_down.weight", (e, ff))]
    return out + [("output_norm.weight", (e,)), ("output.weight", (spec.vocab_size, e))]


def iter_text_tensors(spec: TinySpec) -> Iterator[tuple[str, np.ndarray]]:
    """The text-model tensors (float32, numpy order) one at a time, drawn in file order from
    one rng, so a 7B-wide model never has to fit in memory at once."""
    rng = np.random.default_rng([spec.seed, 0])
    for name, shape in text_tensor_shapes(spec):
        if name == "token_embd.weight":
            yield name, rng.standard_normal(shape, dtype=np.float32)
        elif len(shape) == 1:
            yield name, _norm(rng, shape[0])
        else:
            # output gain 4: logits have std ~4, so next-token distributions are peaked, not flat
            yield name, _linear(rng, *shape, gain=4.0 if name == "output.weight" else 1.0)


def text_tensors(spec: TinySpec) -> dict[str, np.ndarray]:
    """All text-model tensors (float32, numpy order), drawn in a fixed order from one rng."""
    return dict(iter_text_tensors(spec))


def write_text_model(
    path,
    spec: TinySpec,
    *,
    attn_output_scale: dict[int, tuple[list[int], float]] | None = None,
    attn_v_scale: dict[int, float] | None = None,
) -> Path:
    """Write the llama-architecture text model to ``path``.

    ``attn_output_scale={layer: (heads, alpha)}`` multiplies by ``alpha`` the
    *input* features of ``blk.{layer}.attn_output.weight`` that belong to query
    heads ``heads`` (features ``h*head_dim .. (h+1)*head_dim-1``).  Because the
    output projection is linear, this equals scaling head ``h``'s attention
    output by ``alpha`` -- the oracle for head-scaling interventions.  In ggml
    that tensor has ``ne0`` = input features, ``ne1`` = outputs; the numpy array
    is ``(out, in)``, so the scaled slice is ``W[:, h*hd:(h+1)*hd]``.

    ``attn_v_scale={layer: c}`` multiplies ``blk.{layer}.attn_v.weight`` by ``c``: that layer's
    head outputs scale by ``c`` (and VHR's squared scores D, TA by ``c**2``), e.g. to build a
    layer whose std(D) falls under the outlier rule's guard.
    """
    import gguf

    if spec.dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {spec.dtype!r}")
    hd = spec.head_dim
    scale = dict(attn_output_scale or {})
    for layer, (heads, alpha) in scale.items():
        if not 0 <= layer < spec.n_layer:
            raise ValueError(f"attn_output_scale: layer {layer} out of range")
        for h in heads:
            if not 0 <= h < spec.n_head:
                raise ValueError(f"attn_output_scale: head {h} out of range")

    v_scale = dict(attn_v_scale or {})

    def stored(name: str, arr: np.ndarray) -> np.ndarray:
        if name.endswith(".attn_v.weight") and int(name.split(".")[1]) in v_scale:
            arr = arr * np.float32(v_scale[int(name.split(".")[1])])
        if name.endswith(".attn_output.weight") and int(name.split(".")[1]) in scale:
            heads, alpha = scale[int(name.split(".")[1])]
            for h in heads:
                arr[:, h * hd:(h + 1) * hd] *= np.float32(alpha)
        return arr.astype(np.float16) if spec.dtype == "f16" and arr.ndim == 2 else arr

    tokens, scores, types = build_vocab(spec.vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("vhr-edge tiny llama")
    w.add_file_type(0 if spec.dtype == "f32" else 1)
    w.add_vocab_size(spec.vocab_size)
    w.add_context_length(spec.ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    for name, shape in text_tensor_shapes(spec):  # streamed: one tensor in memory at a time
        dtype = np.dtype(np.float16 if spec.dtype == "f16" and len(shape) == 2 else np.float32)
        w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, arr in iter_text_tensors(spec):
        w.write_tensor_data(stored(name, arr))
    w.close()
    return path


def mmproj_tensors(spec: TinySpec) -> dict[str, np.ndarray]:
    """All mmproj tensors (numpy order), from a generator independent of the text model.

    Names/shapes follow clip.cpp (``TN_*`` in clip-impl.h) and the legacy LLaVA
    converter: no post-LN, no patch bias (CLIP's conv has none), CLS embedding,
    learned positions for ``n_patches + 1`` positions, ``mm.0``/``mm.2`` MLP.
    ``mm.2`` is drawn last so ``proj_dim`` cannot affect any other tensor.
    """
    ve, ff = spec.vision_embd, spec.vision_ff
    if ve % spec.vision_heads:
        raise ValueError("vision_embd must divide by vision_heads")
    if ff == ve:
        # clip.cpp swaps ffn_up/ffn_down when ffn_down's ne0 == n_embd (legacy fix-up)
        raise ValueError("vision_ff must differ from vision_embd")
    if spec.image_size % spec.patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    rng = np.random.default_rng([spec.seed, 1])
    p = spec.patch_size
    t = {
        # conv kernel: ggml ne [p, p, 3, ve]; F16 as the converter always writes it
        "v.patch_embd.weight": (rng.standard_normal((ve, 3, p, p), dtype=np.float32)
                                / np.float32(np.sqrt(3 * p * p))).astype(np.float16),
        "v.class_embd": rng.standard_normal(ve, dtype=np.float32),
        "v.position_embd.weight": 0.5 * rng.standard_normal((spec.n_image_tokens + 1, ve), dtype=np.float32),
        "v.pre_ln.weight": _norm(rng, ve),
        "v.pre_ln.bias": _bias(rng, ve),
    }
    for i in range(spec.vision_layers):
        b = f"v.blk.{i}."
        for name, out, inp in (("attn_q", ve, ve), ("attn_k", ve, ve), ("attn_v", ve, ve),
                               ("attn_out", ve, ve), ("ffn_up", ff, ve), ("ffn_down", ve, ff)):
            t[b + name + ".weight"] = _linear(rng, out, inp)
            t[b + name + ".bias"] = _bias(rng, out)
        for ln in ("ln1", "ln2"):
            t[b + ln + ".weight"] = _norm(rng, ve)
            t[b + ln + ".bias"] = _bias(rng, ve)
    t["mm.0.weight"] = _linear(rng, spec.out_dim, ve)
    t["mm.0.bias"] = _bias(rng, spec.out_dim)
    t["mm.2.weight"] = _linear(rng, spec.out_dim, spec.out_dim)
    t["mm.2.bias"] = _bias(rng, spec.out_dim)
    return t


def write_mmproj(path, spec: TinySpec) -> Path:
    """Write the CLIP/MLP vision projector to ``path``.

    Feature layer: LLaVA-1.5 takes CLIP ``hidden_states[-2]`` (output of the
    second-to-last block).  clip.cpp indexes ``clip.vision.feature_layer`` into
    ``hidden_states`` (0 = embeddings, k = output of block k-1), non-negative,
    as an INT32 array; so we write ``[vision_layers - 1]`` with the TRUE
    ``block_count``: all blocks are loaded, the last one is never run.  (The
    legacy converter instead truncates the tower and writes block_count = L-1.)
    """
    import gguf

    tensors = mmproj_tensors(spec)
    L = spec.vision_layers
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("vhr-edge tiny clip")
    w.add_description("image encoder for LLaVA")
    w.add_file_type(0)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", spec.projector_type)
    w.add_bool("clip.use_gelu", False)  # CLIP ViT-L uses quick_gelu
    w.add_uint32("clip.vision.image_size", spec.image_size)
    w.add_uint32("clip.vision.patch_size", spec.patch_size)
    w.add_uint32("clip.vision.embedding_length", spec.vision_embd)
    w.add_uint32("clip.vision.feed_forward_length", spec.vision_ff)
    w.add_uint32("clip.vision.block_count", L)
    w.add_uint32("clip.vision.attention.head_count", spec.vision_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.projection_dim", spec.out_dim)
    w.add_array("clip.vision.feature_layer", [L - 1])  # ints -> INT32 array
    w.add_array("clip.vision.image_mean", CLIP_MEAN)  # floats -> FLOAT32 array
    w.add_array("clip.vision.image_std", CLIP_STD)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    _finish(w)
    return path


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_llava(out_dir, spec: TinySpec = TinySpec(), name: str = "tiny") -> tuple[Path, Path]:
    """Write ``{name}-text.gguf`` and ``{name}-mmproj.gguf`` into ``out_dir``."""
    out_dir = Path(out_dir)
    return (write_text_model(out_dir / f"{name}-text.gguf", spec),
            write_mmproj(out_dir / f"{name}-mmproj.gguf", spec))


def quantize(src, dst, ftype: str, n_threads: int = 1) -> Path:
    """Quantize a text GGUF with llama.cpp (``llama_model_quantize`` via llama-cpp-python).

    ``ftype`` is one of ``"Q8_0"``, ``"Q4_0"``, ``"Q4_K_M"``, ``"F16"``.  With the
    tiny widths (< 256) k-quant tensors fall back to other types inside llama.cpp.
    """
    if ftype not in QUANT_FTYPES:
        raise ValueError(f"unknown ftype {ftype!r}; expected one of {sorted(QUANT_FTYPES)}")
    import ctypes

    import llama_cpp

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[ftype]
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) returned {rc}")
    return dst


def main(argv: list[str] | None = None) -> int:
    """`python -m vhr_edge.fixtures OUT_DIR`: write the tiny pair (used by `make demo`)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m vhr_edge.fixtures", description=main.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--name", default="tiny")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    text, mmproj = write_tiny_llava(a.out_dir, TinySpec(n_layer=a.layers, seed=a.seed), name=a.name)
    print(f"wrote {text} and {mmproj} (random weights: captions are gibberish)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
