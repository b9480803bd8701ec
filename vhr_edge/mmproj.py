"""Which LLaVA mmproj files llama.cpp runs wrong, and how vhr-edge corrects them (docs/real-models.md).

At the llama.cpp that llama-cpp-python 0.3.36 vendors, the LLaVA vision graph
(tools/mtmd/models/llava.cpp) has two faults for the files users have -- the GGUF pairs made
by the legacy scripts (convert_image_encoder_to_gguf.py):

* class token: the graph concatenates CLIP's class embedding AFTER the patches while the
  positions (0..N) and the rows kept for the projector (1..N) assume it comes first
  (ggml-org/llama.cpp #25814). Every mmproj with ``v.class_embd`` on this graph is affected.
  Correction: an eval callback on the vision graph moves the class token to the front before
  the position embeddings are added (native/clip_fix.h). Nothing is written.
* depth: LLaVA takes CLIP's ``hidden_states[-2]``. The converter, when the CLIP config names no
  feature layer (the LLaVA-1.5 and 1.6 recipes), stores ``n - 1`` blocks and writes no
  ``clip.vision.feature_layer``; the graph then runs one block fewer again (``n_layer - 1``):
  features from ``hidden_states[-3]`` (#25817). The stored blocks are exactly the ones needed:
  the graph runs them all when the file says ``clip.vision.feature_layer = [block_count]``,
  which clip.cpp honours. Correction: a copy of the file with that one key added, written once
  to the cache ($VHR_EDGE_CACHE or ~/.cache/vhr-edge/mmproj/), never beside the user's file.

``plan(path)`` inspects a file (header only) and says which corrections apply;
``prepare(path)`` returns the file to load (the corrected copy when needed) and the plan.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import ModelError

LLAVA_GRAPH = ("mlp", "mlp_norm", "ldp", "ldpv2")  # projectors built by models/llava.cpp
FEATURE_KEY = "clip.vision.feature_layer"


@dataclass
class MmprojPlan:
    """What an mmproj is and what vhr-edge does about it."""

    path: str
    projector: str
    block_count: int
    feature_layers: Optional[list[int]]
    has_class_token: bool
    image_size: int
    patch_size: int
    image_mean: list[float]
    image_std: list[float]
    pinpoints: list[list[int]] = field(default_factory=list)  # LLaVA-1.6 anyres resolutions (h, w)
    has_newline: bool = False  # model.image_newline (LLaVA-1.6)
    class_token_first: bool = False  # correction 1 is needed
    feature_layer: Optional[int] = None  # correction 2 is needed: the clip.vision.feature_layer to add
    as_is: bool = False  # the user asked for llama.cpp's behaviour: nothing is applied

    @property
    def needs_correction(self) -> bool:
        return self.class_token_first or self.feature_layer is not None

    @property
    def applied(self) -> bool:
        return self.needs_correction and not self.as_is

    @property
    def anyres(self) -> bool:
        return bool(self.pinpoints)

    @property
    def llama_cpp_layers(self) -> int:
        """Vision blocks llama.cpp's graph runs on this file as it is."""
        if self.feature_layers:
            return max(self.feature_layers)
        return self.block_count - 1

    def corrections(self) -> list[str]:
        out = []
        if self.class_token_first:
            out.append("class token first (llama.cpp appends it after the patches; fixed in the graph)")
        if self.feature_layer is not None:
            out.append(f"all {self.block_count} stored vision blocks, hidden_states[-2] as LLaVA (llama.cpp runs "
                       f"{self.llama_cpp_layers}; a copy with {FEATURE_KEY}=[{self.feature_layer}])")
        return out

    def describe(self) -> str:
        """The one line a session says (on stderr by default) with its first image when corrections apply."""
        name = Path(self.path).name
        if not self.needs_correction:
            return ""
        what = "; ".join(self.corrections())
        if self.as_is:
            return f"vhr-edge: {name}: run as llama.cpp does (--mmproj-as-is), without correcting: {what}"
        return f"vhr-edge: {name}: correcting llama.cpp's LLaVA vision graph: {what}; --mmproj-as-is turns this off"


def _fields(path: str):
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError ...
        raise ModelError(f"cannot read mmproj {path}: not a GGUF file, or truncated ({type(e).__name__}: {e})") from None
    return r


def plan(path, as_is: bool = False) -> MmprojPlan:
    """Inspect an mmproj GGUF (metadata and tensor names only) and decide the corrections."""
    r = _fields(str(path))

    def val(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    names = {t.name for t in r.tensors}
    proj = val("clip.projector_type") or val("clip.vision.projector_type") or ""
    fl = val(FEATURE_KEY)
    p = MmprojPlan(
        path=str(path), projector=proj, block_count=int(val("clip.vision.block_count", 0)),
        feature_layers=[int(x) for x in fl] if fl is not None else None, has_class_token="v.class_embd" in names,
        image_size=int(val("clip.vision.image_size", 0)), patch_size=int(val("clip.vision.patch_size", 0)),
        image_mean=[float(x) for x in val("clip.vision.image_mean", [])],
        image_std=[float(x) for x in val("clip.vision.image_std", [])],
        has_newline="model.image_newline" in names, as_is=as_is,
    )
    pins = val("clip.vision.image_grid_pinpoints")
    if pins:
        # the converter flattens [[h, w], ...]; clip.cpp reads the pairs as (width, height), but the
        # LLaVA-1.6 set is symmetric, so either reading selects the same tiling
        p.pinpoints = [[int(pins[i]), int(pins[i + 1])] for i in range(0, len(pins) - 1, 2)]
    llava = proj in LLAVA_GRAPH and val("clip.has_llava_projector", True)
    if llava:
        p.class_token_first = p.has_class_token
        if p.feature_layers is None and p.block_count > 0:
            p.feature_layer = p.block_count
    return p


def cache_dir() -> Path:
    return Path(os.environ.get("VHR_EDGE_CACHE", Path.home() / ".cache" / "vhr-edge")) / "mmproj"


def corrected_path(p: MmprojPlan) -> Path:
    """Where the corrected copy of p.path lives: keyed by the file's absolute path, size and mtime."""
    src = Path(p.path).resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}|fl{p.feature_layer}".encode()).hexdigest()[:16]
    return cache_dir() / f"{src.stem}.fl{p.feature_layer}-{key}.gguf"


def write_with_feature_layer(src: str, dst: Path, feature_layer: int) -> Path:
    """Copy src to dst with clip.vision.feature_layer = [feature_layer] added (INT32 array, as the
    converter writes it); every other key and every tensor byte for byte. Atomic (tmp + rename)."""
    import gguf

    r = _fields(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(tmp), arch, endianess=r.endianess)
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name == FEATURE_KEY:
            continue
        if f.name == "general.alignment":  # the writer must pad the tensors as the key says
            w.add_custom_alignment(int(f.contents()))
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    w.add_key_value(FEATURE_KEY, [int(feature_layer)], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    for t in r.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in r.tensors:
        w.write_tensor_data(t.data, tensor_endianess=r.endianess)
    w.close()
    os.replace(tmp, dst)
    return dst


def prepare(path, as_is: bool = False, notice: Optional[Callable[[str], None]] = None) -> tuple[str, MmprojPlan]:
    """(the mmproj file to load, the plan). With a depth correction, the corrected copy is written
    to the cache the first time (notice says so first, since a 7B mmproj takes a few seconds)."""
    p = plan(path, as_is=as_is)
    load = str(path)
    if p.feature_layer is not None and not as_is:
        dst = corrected_path(p)
        if not dst.is_file():
            if notice:
                notice(f"vhr-edge: writing a corrected copy of {Path(path).name} ({FEATURE_KEY}=[{p.feature_layer}]) "
                       f"to {dst} (once; the original is not touched)")
            try:
                write_with_feature_layer(str(path), dst, p.feature_layer)
            except OSError as e:
                raise ModelError(f"cannot write the corrected mmproj to {dst}: {e.strerror or e} "
                                 "(set VHR_EDGE_CACHE, or pass --mmproj-as-is)") from None
        load = str(dst)
    return load, p


def image_newline(path) -> "Optional[object]":
    """model.image_newline of an mmproj (LLaVA-1.6) as a float32 numpy vector, or None."""
    import gguf
    import numpy as np

    for t in _fields(str(path)).tensors:
        if t.name == "model.image_newline":
            return np.array(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(-1)
    return None
