"""Flags and helpers shared by every `vhr-edge` command (caption, serve, watch, eval, trace,
compare, calibrate): the model / VHR / generation flag groups, the default model, the profile
precedence, the VHR method tag, and the one-line usage errors. It sits below the command
modules, which only import downward: `cli` -> commands -> `flags` -> session, profile, ...
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from . import DEFAULT_PROMPT
from .errors import ConfigError, ModelError
from .profile import add_profile_args

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, exit 2, naming the (sub)command's own help."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"vhr-edge: error: {message} (see {self.prog} --help)\n")


def default_model_paths() -> tuple[str | None, str | None]:
    """$VHR_EDGE_MODEL / $VHR_EDGE_MMPROJ, else the bundled testbed: the wheel's package data or
    the checkout's models/ (vhr_edge.bundled)."""
    from .bundled import default_model

    model, mmproj = os.environ.get("VHR_EDGE_MODEL"), os.environ.get("VHR_EDGE_MMPROJ")
    if model:
        return model, mmproj
    found = default_model()
    return (str(found) if found else None), mmproj


def find_mmproj(model: str) -> str | None:
    """The single *mmproj*.gguf beside the model, if there is exactly one."""
    found = sorted(Path(model).resolve().parent.glob("*mmproj*.gguf"))
    return str(found[0]) if len(found) == 1 else None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", help="text model GGUF (default: $VHR_EDGE_MODEL or the bundled testbed)")
    g.add_argument("--mmproj", help="vision projector GGUF (default: $VHR_EDGE_MMPROJ or the one *mmproj*.gguf beside -m)")
    g.add_argument("-t", "--threads", type=int, default=0, help="CPU threads for decoding (default: all)")
    g.add_argument("-tb", "--threads-batch", dest="threads_batch", type=int, default=0,
                   help="CPU threads for the prefill and the image encoder (default: as -t)")
    g.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0,
                   help="layers to offload to the GPU (-1 = all; needs a GPU build of llama-cpp-python)")
    g.add_argument("-c", "--ctx-size", dest="ctx_size", type=int, default=2048, help="context size (default 2048)")
    g.add_argument("-fa", "--flash-attn", dest="flash_attn", choices=["on", "off", "auto"], default="auto")
    g.add_argument("--no-mmap", dest="use_mmap", action="store_false",
                   help="load the weights into memory instead of mapping the GGUF (as llama.cpp's --no-mmap)")
    g.add_argument("--image-mode", dest="image_mode", choices=["pad", "crop", "native"], default="pad",
                   help="LLaVA-1.5 preprocessing: pad (as released: padded to a square with the mean colour, "
                        "default), crop (HF CLIPImageProcessor: short side resized, centre cropped) or native "
                        "(libmtmd's own); LLaVA-1.6 (anyres) mmprojs are tiled as LLaVA-1.6 in pad and crop")
    g.add_argument("--mmproj-as-is", dest="mmproj_as_is", action="store_true",
                   help="run the mmproj as llama.cpp does: no correction of its LLaVA vision graph (class token "
                        "after the patches, one vision block short; see docs/real-models.md)")
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp logs and tracebacks")
    g.add_argument("--template", default=None,
                   help="prompt template: llava-1.5, vicuna-system, or text with <image> and {prompt} "
                        "(default: the model's own, from its GGUF or profile, else llava-1.5 as released)")


def add_vhr_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("VHR")
    g.add_argument("--alpha", type=float, default=None,
                   help="reinforcement factor for the selected heads (default: the profile's, else 2)")
    g.add_argument("--layers", default=None,
                   help="VHR layer set: auto (layer 1 + last 14 of 32), all, or e.g. 1,18-31 (default: the profile's, else auto)")
    add_profile_args(g)
    g.add_argument("--no-vhr", action="store_true", help="plain decoding: the same runner with no callback (baseline)")
    g.add_argument("--random-heads", action="store_true",
                   help="control: reinforce as many heads per layer as VHR would, chosen at random")
    g.add_argument("--no-outlier-rule", action="store_true", help="skip the negative-sensitivity outlier rule")
    g.add_argument("--top-heads", dest="top_heads", type=int, default=0, metavar="K",
                   help="reinforce the K heads of largest VHD per layer instead of the top half "
                        "(a study option; 0 = the paper's median rule, default)")
    g.add_argument("--vhd-reference", dest="vhd_reference", choices=["released", "joint"], default="released",
                   help="text-only reference: its own unscaled, cached pass (released, default) or the "
                        "earlier joint batch that scales it too (for ablations)")
    g.add_argument("--no-fold", action="store_true",
                   help="scale the heads in the graph callback at every decoding step instead of folding them "
                        "into W_o (same tokens; for benchmarks)")


def add_gen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help=f"instruction (default: {DEFAULT_PROMPT!r})")
    g.add_argument("-n", "--n-predict", dest="n_predict", type=int, default=512, help="max new tokens (default 512)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    g.add_argument("--top-k", dest="top_k", type=int, default=40)
    g.add_argument("--top-p", dest="top_p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (and random-heads seed)")
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly -n tokens (benchmarks)")


def resolve_models(args) -> tuple[str, str]:
    model, mmproj = args.model, args.mmproj
    if not model:
        model, env_mmproj = default_model_paths()
        mmproj = mmproj or env_mmproj
    if not model:
        raise ModelError("no model given: pass -m MODEL.gguf --mmproj MMPROJ.gguf (or set VHR_EDGE_MODEL / VHR_EDGE_MMPROJ)")
    if not Path(model).is_file():
        raise ModelError(f"model not found: {model}")
    if not mmproj:
        mmproj = find_mmproj(model)
    if not mmproj:
        raise ModelError(f"no --mmproj given and no single *mmproj*.gguf beside {model}")
    return model, mmproj


def session_kwargs(args) -> dict:
    """Session's keyword arguments from the model flags (add_model_args), n_threads included:
    the one mapping a local run (open_session) and the Ray workers (cluster.open_pool) share.
    A flag the command does not have (compare has only -t) takes add_model_args' default."""
    defaults = argparse.ArgumentParser(add_help=False)
    add_model_args(defaults)
    a = argparse.Namespace(**{**vars(defaults.parse_args([])), **vars(args)})
    if a.ctx_size < 64:
        raise ConfigError(f"-c/--ctx-size must be at least 64, got {a.ctx_size}")
    return dict(n_threads=a.threads, n_threads_batch=a.threads_batch, n_gpu_layers=a.n_gpu_layers,
                n_ctx=a.ctx_size, flash_attn={"on": True, "off": False, "auto": None}[a.flash_attn],
                use_mmap=a.use_mmap, verbose=a.verbose, prompt_template=a.template,
                image_mode=a.image_mode, mmproj_as_is=a.mmproj_as_is)


def open_session(args):
    from .engine import load
    from .session import Session

    load()  # a broken or mismatched llama.cpp install is the first thing to report

    kw = session_kwargs(args)
    model, mmproj = resolve_models(args)
    return Session(model, mmproj, **kw)


def resolve_vhr(args, announce: bool = True):
    """Fill args.alpha / args.layers by the profile precedence (`profile.resolve`: flag >
    --profile FILE > <model stem>.vhr-profile.json beside the GGUF > alpha 2, layers auto) and
    say on stderr (one line) which profile was used. Idempotent; returns the `Resolved`."""
    from .profile import resolve

    if getattr(args, "vhr_resolved", None) is not None:
        return args.vhr_resolved
    if args.alpha is not None and not (args.alpha > 0):
        raise ConfigError(f"--alpha must be > 0, got {args.alpha}")
    if getattr(args, "no_vhr", False):  # no heads are reinforced: a profile has nothing to say
        res = resolve(None, layers=args.layers, alpha=args.alpha, no_profile=True)
    else:
        wants = args.profile is not None or (not args.no_profile and (args.alpha is None or args.layers is None))
        model = resolve_models(args)[0] if wants else None
        res = resolve(model, layers=args.layers, alpha=args.alpha, profile=args.profile, no_profile=args.no_profile)
        line = res.describe(Path(model).name if model else None)
        if announce and line:
            print(line, file=sys.stderr, flush=True)
    args.alpha, args.layers, args.vhr_resolved = res.alpha, res.layers_spec, res
    return res


def configs(args):
    """VhrConfig and GenerationConfig from the VHR and generation flags (and the profile)."""
    from .engine import load
    from .session import GenerationConfig

    load()  # a broken or mismatched llama.cpp install is the first thing to report

    if args.alpha is not None and not (args.alpha > 0):
        raise ConfigError(f"--alpha must be > 0, got {args.alpha}")
    if args.n_predict < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n_predict}")
    vhr = vhr_config(args, random_seed=args.seed)
    gen = GenerationConfig(n_predict=args.n_predict, temp=args.temp, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, ignore_eos=args.ignore_eos)
    return vhr, gen


def vhr_config(args, random_seed: int = 0):
    """The VhrConfig of the VHR flags, after the profile precedence (resolve_vhr)."""
    from .session import VhrConfig

    resolve_vhr(args)
    k = getattr(args, "top_heads", 0) or 0
    if k < 0:
        raise ConfigError(f"--top-heads must be 0 (the median rule) or a number of heads per layer, got {k}")
    return VhrConfig(head_count=k, enabled=not args.no_vhr, alpha=args.alpha, layers=args.layers,
                     outlier_rule=not args.no_outlier_rule,
                     head_mode="random" if args.random_heads else "vhd", random_seed=random_seed,
                     fold_weights=not getattr(args, "no_fold", False),
                     reference=getattr(args, "vhd_reference", "released"))


def on_stop_signals(callback) -> None:
    """SIGINT and SIGTERM both call `callback` (once is enough; a second SIGINT interrupts)."""
    def handler(signum, frame):
        callback()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def vhr_tag(alpha: float, layers: str = "auto", random: bool = False, outlier_rule: bool = True,
            reference: str = "released", top_heads: int = 0) -> str:
    """"vhr-a2", "vhr-a3-L1,4-7", "...-top2", "...-random", "...-nooutlier", "...-joint": the default
    name of a VHR run."""
    tag = f"vhr-a{alpha:g}"
    if layers != "auto":
        tag += "-L" + re.sub(r"[^0-9a-z,-]", "", layers.replace(" ", ""))
    if top_heads:
        tag += f"-top{top_heads}"
    if random:
        tag += "-random"
    if not outlier_rule:
        tag += "-nooutlier"
    if reference != "released":
        tag += "-" + reference
    return tag


def method_tag(args) -> str:
    """The name of a resumable run's files: --tag, else "greedy" or the VHR tag of the flags."""
    if getattr(args, "tag", None):
        if not re.fullmatch(r"[A-Za-z0-9_.,+=@-]+", args.tag):
            raise ConfigError(f"--tag may hold letters, digits and _ . , + = @ - only, got {args.tag!r}")
        return args.tag
    if args.no_vhr:
        return "greedy"
    return vhr_tag(args.alpha, args.layers, random=args.random_heads, outlier_rule=not args.no_outlier_rule,
                   reference=args.vhd_reference, top_heads=getattr(args, "top_heads", 0) or 0)


def _file_id(path: str) -> dict:
    p = Path(path)
    return {"name": p.name, "bytes": p.stat().st_size}


def run_settings(session, vhr, gen, **extra) -> dict:
    """What a resumable run records in its .run.json (a restart with other settings is refused)."""
    v = asdict(vhr)
    if not vhr.enabled:  # the other VHR fields do nothing without VHR
        v = {"enabled": False}
    elif not v.get("head_count"):  # the median rule: recorded as before the option existed
        v.pop("head_count", None)
    out = {"model": _file_id(session.model_path), "mmproj": _file_id(session.mmproj_path),
           "vhr": v, "generation": asdict(gen), **extra}
    vision = {}  # recorded when not the default, so runs started before these flags still resume
    if getattr(session, "image_mode", "pad") != "pad":
        vision["image_mode"] = session.image_mode
    plan = getattr(session, "mmproj_plan", None)
    if plan is not None and plan.as_is and plan.needs_correction:
        vision["mmproj_as_is"] = True
    if vision:
        out["vision"] = vision
    return out
