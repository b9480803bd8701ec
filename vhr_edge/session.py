"""Session: one text model + mmproj loaded once, many images captioned with (or without) VHR.

    from vhr_edge import Session
    with Session("model.gguf", "mmproj.gguf") as s:
        r = s.caption("kitchen.jpg")                 # VHR, alpha 2, layers auto
        print(r.text, r.vhr.selected_heads, r.timings.tokens_per_s)
        base = s.caption(frame_array, vhr=False)     # the same runner, no callback

        with s.stream("kitchen.jpg") as st:          # the text as it is generated
            for piece in st:
                print(piece, end="", flush=True)
        print(st.result.timings.tokens_per_s)        # then the whole CaptionResult

Each caption clears the KV cache first, so nothing leaks from one image to the next. The
text-only reference VHR scores against (VHR_SPEC 1) is computed once per prompt and layer set
and cached in the session, so a stream of images with one prompt pays for it once.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from . import DEFAULT_PROMPT
from .engine import load as load_engine
from .errors import ConfigError, ModelError, VhrEdgeError
from .images import ImageSource, describe, load_image
from .layers import parse_layers
from .mmproj import image_newline
from .mmproj import prepare as prepare_mmproj
from .preprocess import IMAGE_MODES, Tiler
from .profile import carried_template
from .stream import CaptionStream
from .templates import GGUF_KEY as TEMPLATE_GGUF_KEY
from .templates import model_template, resolve_template


@dataclass
class VhrConfig:
    """How heads are reinforced (VHR_SPEC sections 2-3)."""

    enabled: bool = True
    alpha: float = 2.0
    layers: Union[str, list[int], None] = "auto"  # "auto", "all", "1,18-31" or a list
    outlier_rule: bool = True
    head_mode: str = "vhd"  # "vhd" or "random" (the same number of random heads: a control)
    # 0: the paper rule (heads above the layer's median D); k > 0: the k heads of largest D per
    # layer (after the outlier rule; ties to the lower index). A study option, not the paper's.
    head_count: int = 0
    random_seed: int = 0
    forced_heads: Optional[dict[int, list[int]]] = None  # layer -> heads, bypassing VHD
    # Where the text-only head outputs come from: "released" (a separate unscaled pass, cached
    # per prompt; the authors' code) or "joint" (both prompts in one batch, both scaled: this
    # project's earlier variant, kept for ablations).
    reference: str = "released"
    fold_weights: bool = True  # decode with the heads folded into W_o where exact (same results, faster)


@dataclass
class GenerationConfig:
    n_predict: int = 512  # maximum new tokens
    temp: float = 0.0  # <= 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0
    ignore_eos: bool = False  # generate exactly n_predict tokens (benchmarks)


@dataclass
class Timings:
    image_encode_ms: float
    reference_ms: float  # the text-only reference pass; 0 when it came from the cache
    prefill_ms: float
    decode_ms: float
    total_ms: float
    n_prompt_rows: int
    n_image_tokens: int
    n_decoded: int
    tokens_per_s: float
    image_load_ms: float = 0.0


@dataclass
class VhrReport:
    enabled: bool
    alpha: Optional[float]
    layers: list[int]
    selected_heads: dict[int, list[int]]
    vhd: np.ndarray  # n_layer x n_head; zero rows for layers not scored
    ta: np.ndarray  # n_layer x n_head
    decode_scaling: str = ""  # "weights" (folded into W_o), "callback", or "" without VHR
    fold_note: str = ""  # with "callback": why the weights were not folded
    reference: str = ""  # "released" or "joint" ("" without VHR)
    reference_cached: bool = False  # the text-only reference came from the session's cache


@dataclass
class CaptionResult:
    image: str
    text: str
    tokens: list[int]
    stop_reason: str  # "eos", "length", "context" or "cancelled" (on_token returned False)
    vhr: VhrReport
    timings: Timings
    first_logits: Optional[np.ndarray] = field(default=None, repr=False)
    trace: Optional[np.ndarray] = field(default=None, repr=False)  # [n_tokens, n_layer, n_head] VHD per step

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def to_json(self, include_matrices: bool = True) -> dict:
        """The `vhr-edge caption --json` object."""
        v = self.vhr
        out = {
            "image": self.image,
            "text": self.text,
            "n_tokens": self.n_tokens,
            "stop_reason": self.stop_reason,
            "vhr": {
                "enabled": v.enabled,
                "alpha": v.alpha,
                "layers": v.layers,
                "selected_heads": {str(k): list(h) for k, h in v.selected_heads.items()},
                "decode_scaling": v.decode_scaling,
                "reference": v.reference,
                "reference_cached": v.reference_cached,
            },
            "timings": asdict(self.timings),
        }
        if include_matrices:
            out["vhr"]["vhd"] = np.round(v.vhd.astype(np.float64), 6).tolist()
            out["vhr"]["ta"] = np.round(v.ta.astype(np.float64), 6).tolist()
        return out


def _check_file(path: Union[str, os.PathLike, None], what: str) -> str:
    if path is None:
        raise ModelError(f"no {what} given")
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{what} not found: {p}")
    if not p.is_file():
        raise ModelError(f"{what} is not a file: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{what} {p} is not a GGUF file")
    return str(p)


def stderr_notice(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Session:
    """A loaded model pair. Thread-safe: captions run one at a time."""

    def __init__(
        self,
        model: Union[str, os.PathLike],
        mmproj: Union[str, os.PathLike],
        *,
        n_threads: int = 0,
        n_threads_batch: int = 0,
        n_gpu_layers: int = 0,
        n_ctx: int = 2048,
        flash_attn: Optional[bool] = None,
        use_mmap: bool = True,
        verbose: bool = False,
        prompt_template: Optional[str] = None,
        reference_cache_size: int = 16,
        image_mode: str = "pad",
        mmproj_as_is: bool = False,
        notice: Optional[Callable[[str], None]] = stderr_notice,
    ):
        """prompt_template: a template name (llava-1.5, vicuna-system) or text with "<image>"
        once and "{prompt}" at most once; default: the model's own (templates.model_template).
        reference_cache_size: text-only references kept (one per prompt and layer set).
        image_mode: "pad" (LLaVA-1.5 as released: padded to a square with the mean colour),
        "crop" (HF CLIPImageProcessor: short side resized, centre cropped) or "native" (libmtmd's
        own); anyres (LLaVA-1.6) mmprojs are tiled as LLaVA-1.6 in pad and crop (vhr_edge.preprocess).
        use_mmap: False loads the weights into memory instead of mapping the GGUF (llama.cpp's
        --no-mmap); VHR's W_o fold works either way.
        mmproj_as_is: run the mmproj as llama.cpp does, without vhr-edge's corrections of its
        LLaVA vision graph (vhr_edge.mmproj); notice(line) hears about corrections (None: quiet)."""
        if image_mode not in IMAGE_MODES:
            raise ConfigError(f"image mode must be one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
        self._engine = load_engine()
        self.model_path = _check_file(model, "model")
        self.mmproj_path = _check_file(mmproj, "mmproj")
        self.image_mode = image_mode
        self.mmproj_load_path, self.mmproj_plan = prepare_mmproj(self.mmproj_path, as_is=mmproj_as_is, notice=notice)
        plan = self.mmproj_plan
        newline = image_newline(self.mmproj_load_path) if plan.anyres and image_mode != "native" else None
        self._tiler = Tiler(image_mode, plan.image_size, plan.patch_size, plan.image_mean, plan.pinpoints, newline)
        fa = -1 if flash_attn is None else int(bool(flash_attn))
        self.n_gpu_layers = n_gpu_layers
        try:
            self._runner = self._engine.Runner(
                self.model_path, self.mmproj_load_path, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                n_ctx=n_ctx, flash_attn=fa, verbose=verbose, n_threads_batch=n_threads_batch,
                reference_cache_size=max(1, int(reference_cache_size)),
                clip_class_token_first=plan.class_token_first and not plan.as_is, use_mmap=bool(use_mmap),
            )
        except self._engine.EngineError as e:
            raise ModelError(str(e)) from None
        if prompt_template is not None:
            self.prompt_template, self.template_source = resolve_template(prompt_template), "given"
        else:
            self.prompt_template, self.template_source = model_template(
                self.model_path, self._runner.metadata(TEMPLATE_GGUF_KEY), carried_template(self.model_path))
        self.info = self._runner.info()
        self._lock = threading.Lock()
        # said once, after the first image went through: a bad input before that gets its error line only
        self._notice, self._pending_notice = notice, plan.describe()

    @property
    def n_layer(self) -> int:
        return self.info.n_layer

    def tiles(self, rgb: np.ndarray) -> tuple[list[np.ndarray], Optional[tuple[int, int]]]:
        """The uint8 tiles libmtmd is given for an HxWx3 picture, and the anyres grid (rows, cols)
        (None for one LLaVA-1.5 tile, or in the native mode, where libmtmd gets the picture itself)."""
        return self._tiler.tiles(rgb)

    def _image_rows(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """(the image rows the LLM receives, milliseconds to make them); call under self._lock."""
        t0 = time.perf_counter()
        tiles, grid = self._tiler.tiles(rgb)
        try:
            rows, _ = self._runner.encode(tiles)
        except self._engine.EngineError as e:
            raise VhrEdgeError(str(e)) from None
        rows = self._tiler.rows(rows, grid, rgb.shape[:2])
        return rows, (time.perf_counter() - t0) * 1000.0

    def _announce(self) -> None:
        """The corrections' notice, once, after the first image went through (call under self._lock)."""
        if self._pending_notice:
            line, self._pending_notice = self._pending_notice, ""
            if self._notice:
                self._notice(line)

    def encode_image(self, image: ImageSource) -> np.ndarray:
        """The image rows the LLM receives for `image` (float32 [n_image_tokens, n_embd]): the
        projector's output after this session's preprocessing and mmproj corrections (for LLaVA-1.6
        packed with the newline rows). For caching or inspecting embeddings, and for tests."""
        if self._runner is None:
            raise VhrEdgeError("this session is closed")
        rgb = load_image(image)
        with self._lock:
            rows = self._image_rows(rgb)[0]
            self._announce()
            return rows

    @property
    def n_head(self) -> int:
        return self.info.n_head

    def caption(
        self,
        image: ImageSource,
        prompt: str = DEFAULT_PROMPT,
        *,
        vhr: Union[VhrConfig, bool, None] = None,
        gen: Optional[GenerationConfig] = None,
        keep_logits: bool = False,
        trace: bool = False,
        forced_tokens: Optional[list[int]] = None,
        on_token: Optional[Callable[[int, str], Optional[bool]]] = None,
        **overrides,
    ) -> CaptionResult:
        """Caption one image. `overrides` set fields of VhrConfig / GenerationConfig by name
        (alpha=3, layers="1,4-7", n_predict=64, temp=0.7 ...).

        on_token(token_id, piece): called from the engine as each token is generated; `piece`
        is the text it adds to result.text (UTF-8 safe, possibly empty: an incomplete character
        or trailing whitespace waits for the next token; a last call with token_id -1 delivers
        what is still held back at the end), so the pieces joined equal result.text. Return
        False to stop: the result then has stop_reason "cancelled". An exception raised in it
        stops the caption and propagates from caption(). The engine releases the GIL while it
        works and takes it back only for the call.
        trace: also score every layer's heads against the text-only continuation at every
        step (VHR_SPEC 6) -> result.trace [n_tokens, n_layer, n_head]; about twice the decode work.
        forced_tokens: generate exactly these token ids (teacher forcing, e.g. to trace a caption).
        """
        if self._runner is None:
            raise VhrEdgeError("this session is closed")
        vcfg = vhr if isinstance(vhr, VhrConfig) else VhrConfig(enabled=vhr is not False)
        gcfg = gen or GenerationConfig()
        vkeys = {k: v for k, v in overrides.items() if k in VhrConfig.__dataclass_fields__}
        gkeys = {k: v for k, v in overrides.items() if k in GenerationConfig.__dataclass_fields__}
        unknown = set(overrides) - set(vkeys) - set(gkeys)
        if unknown:
            raise TypeError(f"unknown caption option(s): {', '.join(sorted(unknown))}")
        vcfg, gcfg = replace(vcfg, **vkeys), replace(gcfg, **gkeys)
        self._validate(vcfg, gcfg)
        layers = parse_layers(vcfg.layers, self.n_layer) if vcfg.enabled else []

        t0 = time.perf_counter()
        rgb = load_image(image)
        load_ms = (time.perf_counter() - t0) * 1000.0
        with self._lock:
            rows, encode_ms = self._image_rows(rgb)
            try:
                raw = self._runner.caption(
                    rows, prompt, self.prompt_template, image_encode_ms=encode_ms,
                    n_predict=gcfg.n_predict, temp=gcfg.temp, top_k=gcfg.top_k, top_p=gcfg.top_p,
                    seed=gcfg.seed, ignore_eos=gcfg.ignore_eos, keep_logits=keep_logits,
                    vhr=vcfg.enabled, alpha=vcfg.alpha, layers=layers, outlier_rule=vcfg.outlier_rule,
                    head_mode=vcfg.head_mode, random_seed=vcfg.random_seed, head_count=int(vcfg.head_count),
                    forced_heads={int(k): list(v) for k, v in (vcfg.forced_heads or {}).items()},
                    reference=vcfg.reference, trace=trace, forced_tokens=list(forced_tokens or []),
                    fold_weights=vcfg.fold_weights, on_token=on_token,
                )
            except self._engine.EngineError as e:
                raise VhrEdgeError(str(e)) from None
            self._announce()
        return CaptionResult(
            image=describe(image),
            text=raw["text"],
            tokens=list(raw["tokens"]),
            stop_reason=raw["stop_reason"],
            vhr=VhrReport(
                enabled=vcfg.enabled,
                alpha=vcfg.alpha if vcfg.enabled else None,
                layers=list(raw["layers"]),
                selected_heads={int(k): list(v) for k, v in raw["selected_heads"].items()},
                vhd=raw["vhd"],
                ta=raw["ta"],
                decode_scaling=raw["decode_scaling"],
                fold_note=raw["fold_note"],
                reference=raw["reference"],
                reference_cached=bool(raw["reference_cached"]),
            ),
            timings=Timings(**raw["timings"], image_load_ms=load_ms),
            first_logits=raw["first_logits"] if keep_logits else None,
            trace=raw["trace"] if trace else None,
        )

    def stream(self, image: ImageSource, prompt: str = DEFAULT_PROMPT, **kwargs) -> CaptionStream:
        """Caption one image and iterate over its text as it is generated:

            with session.stream(img, n_predict=64) as st:
                for piece in st:          # str pieces; "".join(pieces) == st.result.text
                    print(piece, end="", flush=True)
            st.result                     # the CaptionResult (stop_reason "cancelled" if closed early)

        Takes caption()'s arguments (except on_token). The caption runs on a worker thread;
        errors (a bad image, a bad option) are raised from the iteration, or from close() / the
        end of the with block when the stream was not iterated to its end. Leaving the loop
        early and closing the stream (close(), the with block, or dropping it) stops the
        caption at the next token; the session is then free for the next one."""
        if "on_token" in kwargs:
            raise TypeError("stream() delivers the tokens itself; use caption(on_token=...) for a callback")
        return CaptionStream(self, image, prompt, kwargs)

    def _validate(self, v: VhrConfig, g: GenerationConfig) -> None:
        if v.enabled and not (isinstance(v.alpha, (int, float)) and math.isfinite(v.alpha) and v.alpha > 0):
            raise ConfigError(f"alpha must be a number > 0, got {v.alpha}")
        if v.head_mode not in ("vhd", "random"):
            raise ConfigError(f"head_mode must be 'vhd' or 'random', got {v.head_mode!r}")
        if isinstance(v.head_count, bool) or not isinstance(v.head_count, int) or not 0 <= v.head_count <= self.n_head:
            raise ConfigError(f"head_count must be 0 (the median rule) or 1..{self.n_head} heads per layer, "
                              f"got {v.head_count!r}")
        if v.reference not in ("released", "joint"):
            raise ConfigError(f"the VHD reference must be 'released' or 'joint', got {v.reference!r}")
        for layer, heads in (v.forced_heads or {}).items():
            if not 0 <= int(layer) < self.n_layer:
                raise ConfigError(f"layer {layer} is outside the model (it has layers 0..{self.n_layer - 1})")
            bad = [h for h in heads if not 0 <= int(h) < self.n_head]
            if bad:
                raise ConfigError(f"head {bad[0]} is outside the model (it has heads 0..{self.n_head - 1})")
        if not isinstance(g.n_predict, int) or g.n_predict < 1:
            raise ConfigError(f"-n must be at least 1, got {g.n_predict}")
        if not math.isfinite(g.temp):
            raise ConfigError(f"temperature must be finite, got {g.temp}")
        if not 0.0 < g.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {g.top_p}")

    def clear_reference_cache(self) -> None:
        """Forget the cached text-only references (they are recomputed on the next caption)."""
        with self._lock:
            self._runner.clear_reference_cache()

    @property
    def reference_cache_entries(self) -> int:
        return self._runner.reference_cache_entries()

    def close(self) -> None:
        """Free the model and contexts now (otherwise when the session is collected)."""
        self._runner = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
