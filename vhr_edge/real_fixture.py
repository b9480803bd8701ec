"""Real-format LLaVA fixtures: random-weight LLaVA-1.5 / LLaVA-1.6 models written in the ORIGINAL
LLaVA repository layout and converted to GGUF by the legacy scripts of the llama.cpp that
llama-cpp-python 0.3.36 vendors, following its docs/multimodal/llava.md -- the way the published
GGUF pairs (second-state/Llava-v1.5-7B-GGUF, mys/ggml_llava-v1.5-7b, cmp-nct/llava-1.6-gguf ...)
were made.

    python -m vhr_edge.real_fixture            # both, into $VHR_EDGE_CACHE or ~/.cache/vhr-edge
    python -m vhr_edge.real_fixture --which 1.5

LLaVA-1.5 recipe: llava_surgery.py (projector out of the last checkpoint shard),
convert_image_encoder_to_gguf.py on the CLIP repository (-m clip --llava-projector ...),
convert_legacy_llama.py on the LLaVA repository (--skip-unknown); then Q8_0 with llama.cpp's
quantize API. LLaVA-1.6: llava_surgery_v2.py -C (vision tower -> llava.clip, projector and
image_newline -> llava.projector), a vit/ directory (llava.clip as pytorch_model.bin + a CLIP
vision config with the anyres keys, the role of cmp-nct's config_vit.json, which could not be
read here), convert_image_encoder_to_gguf.py --clip-model-is-vision, convert_legacy_llama.py.

The scripts run from the llama-cpp-python sdist, never from a copy in this repository: from
$VHR_EDGE_LLAMA_CPP (a llama.cpp source tree), else the sdist unpacked in the cache, else
``pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36`` into the cache.
The HF model the files were made from is saved beside them (``hf/``) as the oracle: the same
fp16-rounded weights in ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``.
A finished build is cached (``done.json``); a new FIXTURE_VERSION or spec builds afresh.

Shapes: CLIP with a class token, 336 px, patch 14 (576 patches), ``vision_feature_layer=-2``,
4 blocks of width 64; LLaVA-1.5's projector Linear-GELU-Linear; an 8-layer Llama decoder of
width 128 with the testbed's 1024-piece SentencePiece tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["RealSpec", "Fixture", "build", "cache_root", "llama_cpp_tree", "PINPOINTS"]

FIXTURE_VERSION = 1
LLAMA_CPP_PYTHON = "0.3.36"
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-1.6's
REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "testbed-hf" / "tokenizer.model"  # 1024 SentencePiece pieces, <s>=1 </s>=2
_SCRIPTS = ("tools/mtmd/legacy-models/", "tools/mtmd/requirements.txt", "examples/convert_legacy_llama.py", "gguf-py/",
            "requirements/")
# what the pinned transformers needs beside it (the rest -- torch, numpy, safetensors, sentencepiece,
# regex ... -- comes from the oracle extra)
_CONVERTER_DEPS = ("tokenizers>=0.22,<=0.23.0", "huggingface_hub>=0.34,<1.0")


@dataclass(frozen=True)
class RealSpec:
    which: str = "1.5"  # "1.5" or "1.6"
    vocab_size: int = 1024
    n_embd: int = 128
    n_head: int = 4
    n_ff: int = 256
    n_layer: int = 8
    n_ctx: int = 4096
    vision_embd: int = 64
    vision_ff: int = 128  # != vision_embd (clip.cpp's ffn swap test)
    vision_heads: int = 2
    vision_layers: int = 4  # HF blocks; the legacy converter keeps vision_layers - 1
    image_size: int = 336
    patch_size: int = 14
    seed: int = 0


@dataclass
class Fixture:
    """Paths of one built fixture."""

    root: Path
    spec: RealSpec
    hf_dir: Path  # the HF oracle (save_pretrained)
    text_f16: Path  # convert_legacy_llama.py output
    text_q8_0: Path
    mmproj: Path  # convert_image_encoder_to_gguf.py output
    logs: dict = field(default_factory=dict)


def cache_root() -> Path:
    return Path(os.environ.get("VHR_EDGE_CACHE", Path.home() / ".cache" / "vhr-edge"))


def _log(msg: str) -> None:
    print(f"vhr-edge fixture: {msg}", file=sys.stderr, flush=True)


# ---- the llama.cpp scripts, from the sdist

def llama_cpp_tree(cache: Path | None = None) -> Path:
    """The vendored llama.cpp (vendor/llama.cpp) of the llama-cpp-python sdist, holding the legacy
    LLaVA scripts; downloaded and unpacked into the cache if it is not there yet."""
    env = os.environ.get("VHR_EDGE_LLAMA_CPP")
    if env:
        root = Path(env)
        if not (root / "tools/mtmd/legacy-models/llava_surgery.py").is_file():
            raise FileNotFoundError(f"$VHR_EDGE_LLAMA_CPP={root} holds no tools/mtmd/legacy-models/llava_surgery.py")
        return root
    base = (cache or cache_root()) / "llama-cpp-python-sdist"
    root = base / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if all((root / part.rstrip("/")).exists() for part in _SCRIPTS):
        return root
    base.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(base.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not tarballs:
        _log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (its legacy LLaVA scripts) into {base}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(base), "-q"], check=True)
        tarballs = sorted(base.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
        if not tarballs:
            raise FileNotFoundError(f"pip download left no llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz in {base}")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(tarballs[0]) as tf:  # only the converters and their gguf-py
        members = [m for m in tf.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(_SCRIPTS) and (m.isfile() or m.isdir())]
        tf.extractall(base, members=members, filter="data")
    return root


def converter_packages(tree: Path, cache: Path | None = None) -> Path:
    """The transformers the recipe pins (tools/mtmd/requirements.txt -> requirements-convert_legacy_llama.txt:
    transformers==4.57.6), installed once into the cache with pip --target and put first on the
    scripts' PYTHONPATH: with transformers 5, CLIPVisionModel has no .vision_model and the 1.6
    recipe's convert_image_encoder_to_gguf.py --clip-model-is-vision fails."""
    req = (tree / "requirements" / "requirements-convert_legacy_llama.txt").read_text()
    pin = re.search(r"^transformers==([0-9.]+)", req, re.M)
    if not pin:
        raise RuntimeError(f"no transformers pin in {tree / 'requirements'}")
    d = (cache or cache_root()) / "converter-packages" / f"transformers-{pin.group(1)}"
    if (d / "transformers").is_dir():
        return d
    _log(f"installing the recipe's transformers=={pin.group(1)} for the converters into {d}")
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                    f"transformers=={pin.group(1)}", *_CONVERTER_DEPS], check=True)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return d


def _run(tree: Path, script: str, args: list, log: Path, packages: Path) -> None:
    cmd = [sys.executable, str(tree / script), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(packages) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent, env=env).returncode
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{script} failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))


# ---- the HF model: random weights, rounded to fp16 so the fp16 checkpoints hold exactly them

def _hf_model(spec: RealSpec):
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)

    vision = CLIPVisionConfig(hidden_size=spec.vision_embd, intermediate_size=spec.vision_ff,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, projection_dim=32)
    text = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.n_embd, intermediate_size=spec.n_ff,
                       num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head, num_key_value_heads=spec.n_head,
                       max_position_embeddings=spec.n_ctx, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False)
    common = dict(vision_config=vision, text_config=text, image_token_index=3, projector_hidden_act="gelu",
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if spec.which == "1.5":
        model = LlavaForConditionalGeneration(LlavaConfig(**common, image_seq_length=576))
    else:
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS))
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("class_embedding", "image_newline", "embed_tokens.weight")):
                v = r
            elif p.ndim == 1:  # norms ~1, biases ~0, jittered so mix-ups show
                v = (1.0 if "norm" in name else 0.0) + 0.1 * r
            elif "position_embedding" in name:
                v = 0.5 * r
            elif p.ndim == 4:  # the patch convolution
                v = r / float(p[0].numel()) ** 0.5
            else:  # linear (out, in); lm_head peaked so greedy steps are not near-ties
                v = r * (4.0 if name.startswith("lm_head") else 1.0) / p.shape[1] ** 0.5
            p.copy_(v.half().float())
    return model.float().eval()


def _full_config(cfg) -> dict:
    d = cfg.to_dict()
    d.pop("transformers_version", None)
    return d


def _llava_config(spec: RealSpec) -> dict:
    """config.json of liuhaotian/llava-v1.5-7b (v1.6-vicuna-7b), at the fixture's sizes."""
    c = {"_name_or_path": "./checkpoints/vicuna-tiny", "architectures": ["LlavaLlamaForCausalLM"],
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "freeze_mm_mlp_adapter": False,
         "hidden_act": "silu", "hidden_size": spec.n_embd, "initializer_range": 0.02,
         "intermediate_size": spec.n_ff, "max_length": spec.n_ctx, "max_position_embeddings": spec.n_ctx,
         "mm_hidden_size": spec.vision_embd, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
         "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
         "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava",
         "num_attention_heads": spec.n_head, "num_hidden_layers": spec.n_layer, "num_key_value_heads": spec.n_head,
         "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
         "torch_dtype": "float16", "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True,
         "vocab_size": spec.vocab_size, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}
    if spec.which == "1.6":
        c.update(image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, mm_patch_merge_type="spatial_unpad",
                 image_crop_resolution=224, image_split_resolution=224, mm_vision_tower_lr=2e-06,
                 unfreeze_mm_vision_tower=True)
    return c


def _original_state(model, spec: RealSpec) -> tuple[dict, dict]:
    """(text + projector tensors, vision tower tensors) under the original LLaVA names, fp16."""
    text, vision = {}, {}
    for name, t in model.state_dict().items():
        t = t.detach().half().contiguous()
        if name.startswith("model.language_model."):
            text["model." + name[len("model.language_model."):]] = t
        elif name == "lm_head.weight":
            text[name] = t
        elif name.startswith("model.multi_modal_projector."):
            key = name.split(".")[-2:]  # linear_1.weight -> mm_projector.0.weight
            text[f"model.mm_projector.{'0' if key[0] == 'linear_1' else '2'}.{key[1]}"] = t
        elif name == "model.image_newline":
            text[name] = t
        elif name.startswith("model.vision_tower."):
            vision["vision_model." + name[len("model.vision_tower."):]] = t
    return text, vision


def _write_llava_repo(model, spec: RealSpec, d: Path, vision: dict) -> None:
    """The LLaVA checkpoint repository: config, tokenizer, fp16 shards (LLaVA-1.5: two pytorch
    .bin shards with the projector in the last; LLaVA-1.6: safetensors shards that also carry the
    fine-tuned vision tower under model.vision_tower.vision_tower.*)."""
    import torch

    text, _ = _original_state(model, spec)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(_llava_config(spec), indent=2))
    shutil.copy(TOKENIZER, d / "tokenizer.model")
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                         "add_eos_token": False, "model_max_length": spec.n_ctx}))
    first = {k: v for k, v in text.items() if k.startswith("model.layers.") and int(k.split(".")[2]) < spec.n_layer // 2}
    rest = {k: v for k, v in text.items() if k not in first}
    if spec.which == "1.6":
        rest.update({"model.vision_tower.vision_tower." + k: v for k, v in vision.items()})
    shards = [first, rest]
    ext, save = ("safetensors", None) if spec.which == "1.6" else ("bin", torch.save)
    names = [f"{'model' if ext == 'safetensors' else 'pytorch_model'}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
             for i in range(len(shards))]
    index = {"metadata": {"total_size": sum(t.numel() * 2 for s in shards for t in s.values())}, "weight_map": {}}
    for shard, fname in zip(shards, names):
        if save is None:
            from safetensors.torch import save_file
            save_file(shard, str(d / fname), metadata={"format": "pt"})
        else:
            save(shard, d / fname)
        index["weight_map"].update({k: fname for k in shard})
    idx_name = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    (d / idx_name).write_text(json.dumps(index, indent=2))


def _write_clip_repo(model, spec: RealSpec, d: Path, vision: dict) -> None:
    """openai/clip-vit-large-patch14-336's layout: a two-tower CLIPModel (a tiny random text tower)
    whose vision tower is the LLaVA one, as pytorch_model.bin, its full config.json, the
    preprocessor_config.json and a byte-level BPE tokenizer (vocab.json, merges.txt)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    from .fixtures import CLIP_MEAN, CLIP_STD

    d.mkdir(parents=True)
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (d / "special_tokens_map.json").write_text(json.dumps(special))
    (d / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                         "tokenizer_class": "CLIPTokenizer"}))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": spec.image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "resample": 3, "size": spec.image_size}))
    tcfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1)
    cfg = CLIPConfig(text_config=tcfg.to_dict(), vision_config=model.config.vision_config.to_dict(), projection_dim=32)
    clip = CLIPModel(cfg).eval()
    sd = {k: v.detach() for k, v in clip.state_dict().items() if not k.startswith("vision_model.")}
    sd.update({k: v.float() for k, v in vision.items()})
    missing = set(clip.state_dict()) - set(sd)
    assert not missing, missing
    torch.save(sd, d / "pytorch_model.bin")
    c = _full_config(cfg)
    c["architectures"] = ["CLIPModel"]
    (d / "config.json").write_text(json.dumps(c, indent=2))


def _vit_config(model, spec: RealSpec) -> dict:
    """vit/config.json of the 1.6 recipe: a CLIPVisionModel config plus LLaVA-1.6's anyres keys."""
    c = _full_config(model.config.vision_config)
    c.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model", image_grid_pinpoints=PINPOINTS,
             image_aspect_ratio="anyres", image_crop_resolution=224, image_split_resolution=224,
             mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu")
    return c


def _key(spec: RealSpec) -> str:
    blob = json.dumps({"v": FIXTURE_VERSION, "spec": asdict(spec), "sdist": LLAMA_CPP_PYTHON}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _fixture(root: Path, spec: RealSpec) -> Fixture:
    return Fixture(root=root, spec=spec, hf_dir=root / "hf", text_f16=root / "text-f16.gguf",
                   text_q8_0=root / "text-q8_0.gguf", mmproj=root / "mmproj-model-f16.gguf",
                   logs={p.stem: p for p in root.glob("*.log")})


def build(which: str = "1.5", cache: Path | None = None, spec: RealSpec | None = None) -> Fixture:
    """Build (or find in the cache) the real-format fixture for LLaVA `which` ("1.5" or "1.6")."""
    from .fixtures import quantize

    spec = spec or RealSpec(which=which)
    cache = Path(cache) if cache else cache_root()
    name = f"llava{spec.which.replace('.', '')}-fixture"
    root = cache / name / _key(spec)
    if (root / "done.json").is_file():
        return _fixture(root, spec)
    if not TOKENIZER.is_file():
        raise FileNotFoundError(f"{TOKENIZER} (the testbed tokenizer the fixture uses) is missing")
    tree = llama_cpp_tree(cache)
    packages = converter_packages(tree, cache)
    work = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _log(f"building the LLaVA-{spec.which} fixture in {root} with {tree}")
    model = _hf_model(spec)
    model.save_pretrained(work / "hf")
    _, vision = _original_state(model, spec)
    llava = work / f"llava-v{spec.which}-tiny"
    _write_llava_repo(model, spec, llava, vision)
    log = work / "convert.log"
    if spec.which == "1.5":
        clip = work / "clip-vit-tiny-patch14-336"
        _write_clip_repo(model, spec, clip, vision)
        _run(tree, "tools/mtmd/legacy-models/llava_surgery.py", ["-m", llava], log, packages)
        _run(tree, "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py",
             ["-m", clip, "--llava-projector", llava / "llava.projector", "--output-dir", llava], log, packages)
        mmproj = llava / "mmproj-model-f16.gguf"
    else:
        _run(tree, "tools/mtmd/legacy-models/llava_surgery_v2.py", ["-C", "-m", llava], log, packages)
        vit = work / "vit"
        vit.mkdir()
        shutil.copy(llava / "llava.clip", vit / "pytorch_model.bin")
        shutil.copy(llava / "llava.projector", vit / "llava.projector")
        (vit / "config.json").write_text(json.dumps(_vit_config(model, spec), indent=2))
        _run(tree, "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py",
             ["-m", vit, "--llava-projector", vit / "llava.projector", "--output-dir", vit, "--clip-model-is-vision"], log, packages)
        mmproj = vit / "mmproj-model-f16.gguf"
    # --outfile: the name the docs give (the converter would name it after the directory)
    _run(tree, "examples/convert_legacy_llama.py", [llava, "--skip-unknown", "--outfile", llava / "ggml-model-f16.gguf"], log, packages)
    fx = _fixture(work, spec)
    shutil.move(mmproj, fx.mmproj)
    shutil.move(llava / "ggml-model-f16.gguf", fx.text_f16)
    quantize(fx.text_f16, fx.text_q8_0, "Q8_0")
    for d in [llava] + [p for p in work.iterdir() if p.is_dir() and p.name not in ("hf",)]:
        shutil.rmtree(d, ignore_errors=True)  # the repositories: only the HF oracle and the GGUFs stay
    (work / "done.json").write_text(json.dumps({"spec": asdict(spec), "fixture_version": FIXTURE_VERSION,
                                                "llama_cpp": str(tree)}, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(work, root)
    return _fixture(root, spec)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vhr_edge.real_fixture", description=__doc__.split("\n\n")[0])
    p.add_argument("--which", choices=["1.5", "1.6", "all"], default="all")
    p.add_argument("--cache", type=Path, default=None, help="default: $VHR_EDGE_CACHE or ~/.cache/vhr-edge")
    a = p.parse_args(argv)
    for w in (["1.5", "1.6"] if a.which == "all" else [a.which]):
        fx = build(w, a.cache)
        print(f"LLaVA-{w}: {fx.text_f16} {fx.text_q8_0} {fx.mmproj} (HF oracle: {fx.hf_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
