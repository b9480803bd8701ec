"""`vhr-edge info`: what a GGUF holds, read from its metadata with the gguf package (no weights loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .errors import ModelError


def read_info(path: str | Path) -> dict:
    """Architecture, shapes and tensor types of a text GGUF or an mmproj (clip) GGUF."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model not found: {p}")
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError ...
        raise ModelError(f"cannot read {p} as GGUF ({type(e).__name__}: {e})") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v

    arch = field("general.architecture", "?")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    info: dict = {
        "file": str(p),
        "file_size": p.stat().st_size,
        "architecture": arch,
        "name": field("general.name"),
        "n_tensors": len(reader.tensors),
        "n_params": int(sum(int(t.n_elements) for t in reader.tensors)),
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
    }
    if arch == "clip":
        info.update(
            projector_type=field("clip.projector_type") or field("clip.vision.projector_type"),
            image_size=field("clip.vision.image_size"),
            patch_size=field("clip.vision.patch_size"),
            vision_layers=field("clip.vision.block_count"),
            vision_heads=field("clip.vision.attention.head_count"),
            vision_width=field("clip.vision.embedding_length"),
            projection_dim=field("clip.vision.projection_dim"),
            feature_layer=field("clip.vision.feature_layer"),
        )
        from .mmproj import plan  # what llama.cpp's LLaVA graph does with this file, and what vhr-edge corrects

        pl = plan(p)
        info.update(
            class_token=pl.has_class_token,
            anyres_pinpoints=pl.pinpoints or None,
            llama_cpp_runs_vision_layers=pl.llama_cpp_layers if pl.projector in ("mlp", "mlp_norm", "ldp", "ldpv2") else None,
            vhr_edge_corrects=pl.corrections() or ["nothing (llama.cpp's graph is right for this file)"],
        )
        return info
    n_embd = field(f"{arch}.embedding_length")
    n_head = field(f"{arch}.attention.head_count")
    head_dim = field(f"{arch}.attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
    tok = field("tokenizer.ggml.tokens")
    info.update(
        n_layer=field(f"{arch}.block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=field(f"{arch}.attention.head_count_kv", n_head),
        head_dim=head_dim,
        n_ff=field(f"{arch}.feed_forward_length"),
        n_ctx_train=field(f"{arch}.context_length"),
        n_vocab=len(tok) if tok is not None else None,
        file_type=field("general.file_type"),
    )
    return info


def format_info(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{t} x{n}" for t, n in v.items())
        elif isinstance(v, list) and v and isinstance(v[0], str):
            v = "; ".join(v)
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
