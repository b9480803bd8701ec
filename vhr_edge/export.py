"""HF ``LlavaForConditionalGeneration`` checkpoint -> llama.cpp text GGUF + libmtmd mmproj GGUF.

``export_llava(hf_dir, out_dir, name=...)`` writes ``{name}-F32.gguf`` (or F16): the decoder as
arch ``llama`` in the layout of the public LLaVA-1.5 GGUFs (convert_hf_to_gguf: q/k permuted for
ggml's rope, 1-D tensors F32, SentencePiece "llama" tokenizer, ``[PAD{i}]`` UNUSED rows past the
sp vocab, added_tokens.json / tokenizer_config.json honoured), and ``{name}-mmproj-F16.gguf``
(or F32): tower + MLP projector as arch ``clip``, projector ``mlp``, clip.cpp's tensor names.
Reads the testbed (SigLIP: patch bias, no CLS / pre-LN, strategy "full") and llava-hf LLaVA-1.5
(CLIP: CLS, pre_layrnorm, quick_gelu, strategy "default"), told apart by config and tensors, in
old or new key layouts, sharded or not.  GGUFWriter keeps the output in RAM (7B F16: ~14 GB).

mmproj choices (checked in clip.cpp / models/llava.cpp of the pinned llama.cpp):
* TRUE ``block_count``; ``feature_layer`` an INT32 array of non-negative ``hidden_states``
  indices (-2 -> L-1); the graph runs only the blocks it needs.
* no post-LN: llava.cpp would apply ``post_ln`` to the feature layer; HF does not.
* ``use_gelu`` for gelu towers (ggml_gelu is the tanh form: exact for gelu_pytorch_tanh, ~1e-3
  off for erf gelu); false for quick_gelu (clip.cpp's default).  The projector is ggml_gelu.
* fc1 -> ffn_up, fc2 -> ffn_down; intermediate == hidden is refused (clip.cpp's legacy swap test).
* clip.cpp drops row 0 iff ``v.class_embd`` exists: CLS towers need strategy "default", CLS-free
  ones "full"; both give (image_size/patch_size)^2 rows.  The pinned llama.cpp appends CLS after
  the patches but numbers positions / picks rows CLS-first (ggml-org/llama.cpp #25814); vhr-edge
  puts it first in the graph (vhr_edge.mmproj, native/clip_fix.h), so CLIP+CLS exports match HF
  in vhr-edge, and in plain llama.cpp only once that is fixed there.

llava-hf LLaVA-1.5 (untested offline; mean/std from preprocessor_config.json, its resize + crop
replaced by clip.cpp's pad + resize as for the public GGUFs)::

    python -m vhr_edge.export llava-1.5-7b-hf out --name llava15 --text-dtype f16 --quantize Q4_K_M
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["export_llava", "permute_qk", "spm_vocab", "main"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType == sp types
GELU_ACTS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast")
_TEXT_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_VISION_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
                 "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py ``permute``: per head, rows (2, d/2) -> (d/2, 2) (HF rope -> ggml rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Checkpoint:
    """Lazy safetensors reader; keys normalised to ("text"|"vision"|"proj", name)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{hf_dir}: no *.safetensors (save the model with safe_serialization)")
        self._where: dict[tuple[str, str], tuple[Path, str]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    part = self._split(key)
                    if part:
                        self._where[part] = (f, key)

    @staticmethod
    def _split(key: str):
        if key.endswith("lm_head.weight"):
            return "text", "lm_head.weight"
        for marker, part, strip in (("language_model.", "text", "model."),
                                    ("vision_tower.", "vision", "vision_model."),
                                    ("multi_modal_projector.", "proj", "")):
            i = key.find(marker)
            if i >= 0:
                rest = key[i + len(marker):]
                return part, rest[len(strip):] if strip and rest.startswith(strip) else rest
        return None

    def has(self, part: str, name: str) -> bool:
        return (part, name) in self._where

    def get(self, part: str, name: str) -> np.ndarray:
        from safetensors import safe_open

        f, key = self._where[(part, name)]
        with safe_open(str(f), framework="pt") as st:
            return st.get_tensor(key).float().numpy()


def _fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: enough wire format for piece types."""
    def varint(i):
        x = s = 0
        while buf[i] & 0x80:
            x, s, i = x | (buf[i] & 0x7F) << s, s + 7, i + 1
        return x | buf[i] << s, i + 1
    i = 0
    while i < len(buf):
        key, i = varint(i)
        if key & 7 == 0:
            v, i = varint(i)
        else:  # length-delimited, fixed64, fixed32
            n, i = varint(i) if key & 7 == 2 else ({1: 8, 5: 4}[key & 7], i)
            v, i = buf[i:i + n], i + n
        yield key >> 3, v


def spm_vocab(tokenizer_model, n_vocab: int, added: dict[str, int] | None = None,
              special: set[str] = frozenset()) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) of ``n_vocab`` entries, like convert_hf_to_gguf's SPM path, but with
    piece types from the model proto so user-defined pieces (the testbed's ``<image>``) are
    USER_DEFINED.  ``added`` (text -> id): CONTROL if in ``special``, else USER_DEFINED."""
    import sentencepiece as spm

    data = Path(tokenizer_model).read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)
    n_sp = sp.get_piece_size()
    if n_sp > n_vocab:
        raise ValueError(f"tokenizer has {n_sp} pieces but the model only {n_vocab} embedding rows")
    types_pb = [dict(_fields(p)).get(3, NORMAL) for f, p in _fields(data) if f == 1]
    if len(types_pb) != n_sp:
        raise ValueError(f"{tokenizer_model}: read {len(types_pb)} piece types for {n_sp} pieces")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [UNUSED] * n_vocab
    for i in range(n_sp):
        t = types_pb[i]
        want = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else t)
        if t != want:
            raise ValueError(f"piece {i} {sp.id_to_piece(i)!r}: proto type {t} but sentencepiece says {want}")
        tokens[i], scores[i], types[i] = sp.id_to_piece(i), sp.get_score(i), t
    for text, tid in (added or {}).items():
        if n_sp <= tid < n_vocab:
            tokens[tid], scores[tid] = text, -1000.0
            types[tid] = CONTROL if text in special else USER_DEFINED
    return tokens, scores, types


def _added_tokens(*dirs: Path) -> tuple[dict[str, int], set[str]]:
    added, special = {}, set()
    for d in dirs:
        if (d / "added_tokens.json").is_file():
            added.update({k: int(v) for k, v in json.loads((d / "added_tokens.json").read_text()).items()})
        if (d / "tokenizer_config.json").is_file():
            dec = json.loads((d / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
            for tid, t in dec.items():
                added.setdefault(t["content"], int(tid))
                if t.get("special"):
                    special.add(t["content"])
    return added, special


def _cast(name: str, a: np.ndarray, dtype: str) -> np.ndarray:
    """1-D -> F32; 2-D/4-D weights -> F16 when dtype is "f16"."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.astype(np.float16) if dtype == "f16" and a.ndim >= 2 and name.endswith(".weight") else a


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _rope_theta(tc) -> float:
    rp = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
        raise NotImplementedError(f"rope scaling {rp} is not supported")
    theta = getattr(tc, "rope_theta", None) or rp.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _write_text(ck: _Checkpoint, tc, path: Path, name: str, dtype: str, vocab, prompt_template=None) -> None:
    import gguf

    if tc.model_type != "llama":
        raise ValueError(f"text model type {tc.model_type!r}: only llama decoders are supported")
    if getattr(tc, "attention_bias", False) or getattr(tc, "mlp_bias", False):
        raise ValueError("llama decoders with attention/MLP biases are not supported")
    n_embd, n_layer, n_head = tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or n_head
    head_dim = getattr(tc, "head_dim", None) or n_embd // n_head
    tokens, scores, types = vocab
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in (("name", name), ("file_type", 0 if dtype == "f32" else 1), ("vocab_size", len(tokens)),
                   ("context_length", tc.max_position_embeddings), ("embedding_length", n_embd),
                   ("block_count", n_layer), ("feed_forward_length", tc.intermediate_size),
                   ("head_count", n_head), ("head_count_kv", n_kv), ("rope_dimension_count", head_dim),
                   ("rope_freq_base", _rope_theta(tc)), ("layer_norm_rms_eps", tc.rms_norm_eps),
                   ("tokenizer_model", "llama"), ("tokenizer_pre", "default"), ("token_list", tokens),
                   ("token_scores", scores), ("token_types", types), ("add_bos_token", True),
                   ("add_eos_token", False), ("add_space_prefix", True)):
        getattr(w, f"add_{key}")(v)
    if prompt_template is not None:
        from .templates import GGUF_KEY, check_template

        w.add_string(GGUF_KEY, check_template(prompt_template))
    if head_dim * n_head != n_embd:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    unk = types.index(UNKNOWN) if UNKNOWN in types else None
    for key, tid in (("bos", tc.bos_token_id), ("eos", tc.eos_token_id), ("unk", unk), ("pad", tc.pad_token_id)):
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            getattr(w, f"add_{key}_token_id")(tid)

    def put(gname, a):
        w.add_tensor(gname, _cast(gname, a, dtype))

    put("token_embd.weight", ck.get("text", "embed_tokens.weight"))
    for i in range(n_layer):
        for hf, g in _TEXT_NAMES.items():
            a = ck.get("text", f"layers.{i}.{hf}.weight")
            if g == "attn_q":
                a = permute_qk(a, n_head)
            elif g == "attn_k":
                a = permute_qk(a, n_kv)
            put(f"blk.{i}.{g}.weight", a)
    put("output_norm.weight", ck.get("text", "norm.weight"))
    if ck.has("text", "lm_head.weight"):  # absent: tied, llama.cpp reuses token_embd
        put("output.weight", ck.get("text", "lm_head.weight"))
    _finish(w)


def _feature_layers(cfg, n_layer: int) -> list[int]:
    fl = cfg.vision_feature_layer
    out = [f if f >= 0 else n_layer + 1 + f for f in ([fl] if isinstance(fl, int) else list(fl))]
    if not all(0 <= f <= n_layer for f in out):
        raise ValueError(f"vision_feature_layer {fl} is outside a {n_layer}-layer tower")
    return out


def _image_norm(hf_dir: Path, cfg) -> tuple[list[float], list[float]]:
    from .fixtures import CLIP_MEAN, CLIP_STD
    from .testbed.model import IMAGE_MEAN, IMAGE_STD

    if (hf_dir / "preprocessor_config.json").is_file():
        p = json.loads((hf_dir / "preprocessor_config.json").read_text())
        return [float(x) for x in p["image_mean"]], [float(x) for x in p["image_std"]]
    siglip = getattr(cfg, "testbed", None) is not None or cfg.vision_config.model_type == "siglip_vision_model"
    return (list(IMAGE_MEAN), list(IMAGE_STD)) if siglip else (list(CLIP_MEAN), list(CLIP_STD))


def _write_mmproj(ck: _Checkpoint, cfg, path: Path, name: str, dtype: str, mean, std) -> None:
    import gguf

    vc = cfg.vision_config
    if vc.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"vision tower {vc.model_type!r}: only CLIP / SigLIP towers are supported")
    L, width, ff = vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size
    if ff == width:
        raise ValueError("vision intermediate_size == hidden_size trips clip.cpp's ffn up/down swap heuristic")
    if vc.image_size % vc.patch_size:
        raise ValueError("vision image_size must be a multiple of patch_size")
    has_cls = ck.has("vision", "embeddings.class_embedding")
    strategy = cfg.vision_feature_select_strategy
    if strategy != ("default" if has_cls else "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} with a tower "
                         f"{'with' if has_cls else 'without'} a class token: clip.cpp drops exactly the CLS row")
    act = vc.hidden_act
    if act not in GELU_ACTS + ("quick_gelu", "silu"):
        raise ValueError(f"vision activation {act!r} has no clip.cpp FFN op")
    if cfg.projector_hidden_act not in GELU_ACTS:
        raise ValueError(f"projector activation {cfg.projector_hidden_act!r}: clip.cpp's mlp projector is GELU")
    out_dim = ck.get("proj", "linear_2.weight").shape[0]

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name(name)
    w.add_description("image encoder for LLaVA (vhr_edge.export)")
    w.add_file_type(0 if dtype == "f32" else 1)
    w.add_string("clip.projector_type", "mlp")
    for key, v in (("has_text_encoder", False), ("has_vision_encoder", True), ("has_llava_projector", True),
                   ("use_gelu", act in GELU_ACTS)):  # use_gelu false (and no use_silu) -> gelu_quick
        w.add_bool(f"clip.{key}", v)
    if act == "silu":
        w.add_bool("clip.use_silu", True)
    for key, v in (("image_size", vc.image_size), ("patch_size", vc.patch_size), ("embedding_length", width),
                   ("feed_forward_length", ff), ("block_count", L), ("projection_dim", out_dim),
                   ("attention.head_count", vc.num_attention_heads)):
        w.add_uint32(f"clip.vision.{key}", v)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vc.layer_norm_eps)
    w.add_array("clip.vision.feature_layer", _feature_layers(cfg, L))  # python ints -> INT32 array
    w.add_array("clip.vision.image_mean", [float(x) for x in mean])
    w.add_array("clip.vision.image_std", [float(x) for x in std])

    def put(gname, part, hf):
        w.add_tensor(gname, _cast(gname, ck.get(part, hf), dtype))

    put("v.patch_embd.weight", "vision", "embeddings.patch_embedding.weight")
    if ck.has("vision", "embeddings.patch_embedding.bias"):
        put("v.patch_embd.bias", "vision", "embeddings.patch_embedding.bias")
    if has_cls:
        put("v.class_embd", "vision", "embeddings.class_embedding")
    put("v.position_embd.weight", "vision", "embeddings.position_embedding.weight")
    if ck.has("vision", "pre_layrnorm.weight"):
        put("v.pre_ln.weight", "vision", "pre_layrnorm.weight")
        put("v.pre_ln.bias", "vision", "pre_layrnorm.bias")
    for i in range(L):
        for hf, g in _VISION_NAMES.items():
            for kind in ("weight", "bias"):
                put(f"v.blk.{i}.{g}.{kind}", "vision", f"encoder.layers.{i}.{hf}.{kind}")
    # no v.post_ln: see the module docstring
    for hf, g in (("linear_1", "mm.0"), ("linear_2", "mm.2")):
        put(f"{g}.weight", "proj", f"{hf}.weight")
        if ck.has("proj", f"{hf}.bias"):
            put(f"{g}.bias", "proj", f"{hf}.bias")
        else:  # multimodal_projector_bias=False: clip.cpp adds the bias unconditionally
            w.add_tensor(f"{g}.bias", np.zeros(ck.get("proj", f"{hf}.weight").shape[0], np.float32))
    _finish(w)


def export_llava(hf_dir, out_dir, *, name: str, tokenizer_model=None, text_dtype: str = "f32",
                 mmproj_dtype: str = "f16", image_mean=None, image_std=None,
                 prompt_template: str | None = None) -> tuple[Path, Path]:
    """Write ``{name}-{F32|F16}.gguf`` and ``{name}-mmproj-{F16|F32}.gguf`` into ``out_dir``.
    ``prompt_template``: the template the model was trained with, stored in the text GGUF
    (``vhr_edge.prompt_template``) when it is not LLaVA-1.5's."""
    from transformers import AutoConfig

    for what, v in (("text_dtype", text_dtype), ("mmproj_dtype", mmproj_dtype)):
        if v not in ("f32", "f16"):
            raise ValueError(f"{what} must be 'f32' or 'f16', got {v!r}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = AutoConfig.from_pretrained(str(hf_dir))
    if cfg.model_type != "llava":
        raise ValueError(f"{hf_dir}: model_type {cfg.model_type!r}, expected 'llava'")
    tok = Path(tokenizer_model) if tokenizer_model else hf_dir / "tokenizer.model"
    if not tok.is_file():
        raise FileNotFoundError(f"no SentencePiece tokenizer.model at {tok} (pass tokenizer_model=)")
    ck = _Checkpoint(hf_dir)
    n_vocab = ck.get("text", "embed_tokens.weight").shape[0]
    added, special = _added_tokens(*dict.fromkeys([tok.parent, hf_dir]))
    vocab = spm_vocab(tok, n_vocab, added, special)
    mean, std = _image_norm(hf_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = out_dir / f"{name}-{text_dtype.upper()}.gguf"
    mmproj_path = out_dir / f"{name}-mmproj-{mmproj_dtype.upper()}.gguf"
    # the mmproj first: its checks (tower kind, CLS vs strategy) fail before the big file is written
    _write_mmproj(ck, cfg, mmproj_path, f"{name} mmproj", mmproj_dtype,
                  image_mean or mean, image_std or std)
    _write_text(ck, cfg.text_config, text_path, name, text_dtype, vocab, prompt_template)
    return text_path, mmproj_path


def main(argv: list[str] | None = None) -> int:
    """`python -m vhr_edge.export HF_DIR OUT_DIR --name NAME`: HF LLaVA -> text + mmproj GGUFs."""
    from .fixtures import QUANT_FTYPES, quantize

    p = argparse.ArgumentParser(prog="python -m vhr_edge.export", description=main.__doc__)
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--name", required=True)
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default HF_DIR/tokenizer.model)")
    p.add_argument("--text-dtype", default="f32", choices=["f32", "f16"])
    p.add_argument("--mmproj-dtype", default="f16", choices=["f32", "f16"])
    p.add_argument("--quantize", default="", help=f"comma list of {','.join(QUANT_FTYPES)}: {{name}}-{{ftype}}.gguf")
    a = p.parse_args(argv)
    ftypes = [f.strip() for f in a.quantize.split(",") if f.strip()]
    bad = [f for f in ftypes if f not in QUANT_FTYPES]
    if bad:
        p.error(f"unknown --quantize type(s) {bad}; choose from {sorted(QUANT_FTYPES)}")
    text, mmproj = export_llava(a.hf_dir, a.out_dir, name=a.name, tokenizer_model=a.tokenizer,
                                text_dtype=a.text_dtype, mmproj_dtype=a.mmproj_dtype)
    print(f"wrote {text}\nwrote {mmproj}")
    for ft in ftypes:
        dst = Path(a.out_dir) / f"{a.name}-{ft}.gguf"
        if dst != text:
            print(f"wrote {quantize(text, dst, ft)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
