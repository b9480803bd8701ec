"""The `vhr-edge` command line (flags follow llama-mtmd-cli where they overlap).

    vhr-edge caption IMG [IMG ...] [-m MODEL] [--mmproj MMPROJ] [-p PROMPT] [-n N]
                     [--alpha 2] [--layers 1,18-31|auto|all] [--no-vhr] [--json] ...
    vhr-edge info MODEL [--json]
    vhr-edge serve [-m MODEL] [--mmproj MMPROJ] [--host 127.0.0.1] [--port 8080] [--api-key KEY]
    vhr-edge watch DIR|- [-m MODEL] [--hz 2] [--max-frames N]
    vhr-edge calibrate [-m MODEL] [--alphas 1.5,2,3] [-n 100] [--out DIR]   (writes a VHR profile)

--alpha/--layers override a VHR profile (--profile FILE, or <model stem>.vhr-profile.json
beside the model unless --no-profile), which overrides the defaults (alpha 2, layers auto).

Errors are one line on stderr and a non-zero exit: 1 bad input / run failure,
2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from . import DEFAULT_PROMPT, __version__
from .errors import ConfigError, ImageError, ModelError, VhrEdgeError
from .profile import add_profile_args

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other error here
        self.exit(EXIT_USAGE, f"vhr-edge: error: {message} (see vhr-edge {self.prog.split()[-1]} --help)\n")


def default_model_paths() -> tuple[str | None, str | None]:
    """$VHR_EDGE_MODEL / $VHR_EDGE_MMPROJ, else the bundled testbed in the checkout's models/."""
    model, mmproj = os.environ.get("VHR_EDGE_MODEL"), os.environ.get("VHR_EDGE_MMPROJ")
    if model:
        return model, mmproj
    models_dir = Path(__file__).resolve().parent.parent / "models"
    for name in ("testbed-f16.gguf", "testbed.gguf"):
        if (models_dir / name).is_file():
            return str(models_dir / name), mmproj
    return None, mmproj


def find_mmproj(model: str) -> str | None:
    """The single *mmproj*.gguf beside the model, if there is exactly one."""
    found = sorted(Path(model).resolve().parent.glob("*mmproj*.gguf"))
    return str(found[0]) if len(found) == 1 else None


def _add_model_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp logs and tracebacks")
    g.add_argument("--template", default=None,
                   help="prompt template: llava-1.5, vicuna-system, or text with <image> and {prompt} "
                        "(default: the model's own, from its GGUF or profile, else llava-1.5 as released)")


def _add_vhr_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--vhd-reference", dest="vhd_reference", choices=["released", "joint"], default="released",
                   help="text-only reference: its own unscaled, cached pass (released, default) or the "
                        "earlier joint batch that scales it too (for ablations)")
    g.add_argument("--no-fold", action="store_true",
                   help="scale the heads in the graph callback at every decoding step instead of folding them "
                        "into W_o (same tokens; for benchmarks)")


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help=f"instruction (default: {DEFAULT_PROMPT!r})")
    g.add_argument("-n", "--n-predict", dest="n_predict", type=int, default=512, help="max new tokens (default 512)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    g.add_argument("--top-k", dest="top_k", type=int, default=40)
    g.add_argument("--top-p", dest="top_p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (and random-heads seed)")
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly -n tokens (benchmarks)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vhr-edge", description="VHR hallucination reduction for LLaVA-style GGUF models on llama.cpp")
    parser.add_argument("--version", action="version", version=f"vhr-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cap = sub.add_parser("caption", help="caption images (VHR on by default)")
    cap.add_argument("images", nargs="+", metavar="IMG", help="image files (any format Pillow reads)")
    _add_model_args(cap)
    _add_vhr_args(cap)
    _add_gen_args(cap)
    cap.add_argument("--json", action="store_true", help="one JSON object per image on stdout (JSON lines)")
    cap.add_argument("--stream", action="store_true",
                     help="print the caption as it is generated, token by token (ignored with --json)")
    cap.set_defaults(func=cmd_caption)

    srv = sub.add_parser("serve", help="OpenAI-style HTTP captioner (POST /v1/chat/completions, GET /health)")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--api-key", default=os.environ.get("VHR_EDGE_API_KEY"),
                     help="require 'Authorization: Bearer KEY' (default: $VHR_EDGE_API_KEY, none)")
    srv.add_argument("--max-queue", type=int, default=8, help="requests waiting behind the engine before 429")
    srv.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (413 above)")
    srv.add_argument("--allow-local-files", action="store_true",
                     help="accept image_url values that are paths on this machine")
    g = srv.add_argument_group("VHR defaults (a request's \"vhr\" field overrides them)")
    g.add_argument("--alpha", type=float, default=None, help="default alpha (the profile's, else 2)")
    g.add_argument("--layers", default=None, help="default layer set (the profile's, else auto)")
    add_profile_args(g)
    srv.set_defaults(func=cmd_serve)

    wat = sub.add_parser("watch", help="caption the newest frame of a folder (or of paths on stdin) as it appears")
    wat.add_argument("source", metavar="DIR|-", help="folder to watch, or - for JSON lines {\"path\": ...} on stdin")
    _add_model_args(wat)
    _add_vhr_args(wat)
    _add_gen_args(wat)
    wat.add_argument("--hz", type=float, default=0.0, help="at most this many captions per second (0: as fast as possible)")
    wat.add_argument("--max-frames", type=int, default=0, help="stop after N captions (0: run until stopped)")
    wat.set_defaults(func=cmd_watch)

    info = sub.add_parser("info", help="print a GGUF's architecture, shapes and tensor types")
    info.add_argument("model", metavar="MODEL")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    from .eval.cli import register as register_eval
    from .eval.compare import register as register_compare
    from .eval.trace import register as register_trace
    from .calibrate import register as register_calibrate

    register_eval(sub)
    register_trace(sub)
    register_compare(sub)
    register_calibrate(sub)
    return parser


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


def open_session(args):
    from .engine import load
    from .session import Session

    load()  # a broken or mismatched llama.cpp install is the first thing to report

    if args.ctx_size < 64:
        raise ConfigError(f"-c/--ctx-size must be at least 64, got {args.ctx_size}")
    model, mmproj = resolve_models(args)
    fa = {"on": True, "off": False, "auto": None}[args.flash_attn]
    return Session(model, mmproj, n_threads=args.threads, n_threads_batch=args.threads_batch,
                   n_gpu_layers=args.n_gpu_layers,
                   n_ctx=args.ctx_size, flash_attn=fa, verbose=args.verbose,
                   prompt_template=getattr(args, "template", None))


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
    from .session import GenerationConfig, VhrConfig

    load()  # a broken or mismatched llama.cpp install is the first thing to report

    if args.alpha is not None and not (args.alpha > 0):
        raise ConfigError(f"--alpha must be > 0, got {args.alpha}")
    if args.n_predict < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n_predict}")
    resolve_vhr(args)
    vhr = VhrConfig(enabled=not args.no_vhr, alpha=args.alpha, layers=args.layers,
                    outlier_rule=not args.no_outlier_rule,
                    head_mode="random" if args.random_heads else "vhd", random_seed=args.seed,
                    fold_weights=not args.no_fold, reference=getattr(args, "vhd_reference", "released"))
    gen = GenerationConfig(n_predict=args.n_predict, temp=args.temp, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, ignore_eos=args.ignore_eos)
    return vhr, gen


def on_stop_signals(callback) -> None:
    """SIGINT and SIGTERM both call `callback` (once is enough; a second SIGINT interrupts)."""
    def handler(signum, frame):
        callback()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def cmd_caption(args) -> int:
    from .layers import format_layers

    vhr, gen = configs(args)
    session = open_session(args)
    failures = 0
    streaming = args.stream and not args.json
    for image in args.images:
        try:
            if streaming:
                r = _stream_caption(session, image, args, vhr, gen, header=len(args.images) > 1)
            else:
                r = session.caption(image, args.prompt, vhr=vhr, gen=gen)
        except ImageError as e:  # a bad image fails alone; the others still get captioned
            failures += 1
            print(f"vhr-edge: error: {e}", file=sys.stderr, flush=True)
            continue
        if args.json:
            print(json.dumps(r.to_json()), flush=True)
        else:
            if len(args.images) > 1 and not streaming:
                print(f"== {image}")
            if not streaming:
                print(r.text, flush=True)
            t = r.timings
            mode = (f"VHR alpha {r.vhr.alpha:g} layers {format_layers(r.vhr.layers)}" if r.vhr.enabled else "no VHR")
            print(f"[{mode} | {r.n_tokens} tokens ({r.stop_reason}) | encode {t.image_encode_ms:.0f} ms, "
                  f"prefill {t.prefill_ms:.0f} ms, decode {t.tokens_per_s:.1f} tok/s]", file=sys.stderr, flush=True)
    return EXIT_ERROR if failures else 0


def _stream_caption(session, image, args, vhr, gen, header: bool):
    """Print the caption's pieces as they come (like llama-mtmd-cli); return the CaptionResult."""
    started = False
    with session.stream(image, args.prompt, vhr=vhr, gen=gen) as st:
        for piece in st:
            if not started and header:
                print(f"== {image}", flush=True)
            started = True
            sys.stdout.write(piece)
            sys.stdout.flush()
    if header and not started:
        print(f"== {image}")
    print(flush=True)
    return st.result


def cmd_serve(args) -> int:
    from .serve import make_server

    if not 1 <= args.max_queue <= 10_000:
        raise ConfigError(f"--max-queue must be in 1..10000, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    from .layers import parse_layers
    from .session import VhrConfig

    res = resolve_vhr(args)
    session = open_session(args)
    parse_layers(res.layers, session.n_layer)  # a bad default fails now, not on every request
    try:
        server, service = make_server(session, args.host, args.port, api_key=args.api_key,
                                      max_queue=args.max_queue, max_body=int(args.max_body_mb * 1024 * 1024),
                                      allow_local_files=args.allow_local_files, quiet=not args.verbose,
                                      default_vhr=VhrConfig(alpha=res.alpha, layers=res.layers))
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    on_stop_signals(lambda: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"vhr-edge: serving {Path(session.model_path).name} on http://{host}:{port} "
          f"(POST /v1/chat/completions, GET /health)", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        service.stop()
        server.server_close()
    print("vhr-edge: stopped", file=sys.stderr, flush=True)
    return 0


def cmd_watch(args) -> int:
    from .watch import frames_for, watch

    vhr, gen = configs(args)
    if args.hz < 0:
        raise ConfigError(f"--hz must be >= 0, got {args.hz}")
    session = open_session(args)
    stop = threading.Event()
    on_stop_signals(stop.set)
    watch(session, frames_for(args.source, stop), sys.stdout, prompt=args.prompt, vhr=vhr, gen=gen,
          hz=args.hz, max_frames=args.max_frames, stop=stop)
    return 0


def cmd_info(args) -> int:
    from .model_info import format_info, read_info

    info = read_info(args.model)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VhrEdgeError as e:
        print(f"vhr-edge: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("vhr-edge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: still one line unless -v
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"vhr-edge: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
