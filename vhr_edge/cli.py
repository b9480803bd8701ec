"""The `vhr-edge` command line (flags follow llama-mtmd-cli where they overlap).

    vhr-edge caption IMG [IMG ...] [-m MODEL] [--mmproj MMPROJ] [-p PROMPT] [-n N]
                     [--alpha 2] [--layers 1,18-31|auto|all] [--no-vhr] [--json] ...
    vhr-edge info [MODEL] [--json]    (no MODEL: where the default model lives, and llama.cpp's backends)
    vhr-edge serve [-m MODEL] [--mmproj MMPROJ] [--host 127.0.0.1] [--port 8080] [--api-key KEY]
    vhr-edge watch DIR|- [-m MODEL] [--hz 2] [--max-frames N]
    vhr-edge calibrate [-m MODEL] [--alphas 1.5,2,3] [-n 100] [--out DIR]   (writes a VHR profile)

--alpha/--layers override a VHR profile (--profile FILE, or <model stem>.vhr-profile.json
beside the model unless --no-profile), which overrides the defaults (alpha 2, layers auto).

Errors are one line on stderr and a non-zero exit: 1 bad input / run failure,
2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from pathlib import Path

from . import __version__
from .errors import ConfigError, ImageError, VhrEdgeError
from .flags import (EXIT_ERROR, EXIT_INTERRUPTED, Parser, add_gen_args, add_model_args, add_vhr_args, configs,
                    on_stop_signals, open_session, resolve_vhr)
from .profile import add_profile_args

def build_parser() -> Parser:
    parser = Parser(prog="vhr-edge", description="VHR hallucination reduction for LLaVA-style GGUF models on llama.cpp")
    parser.add_argument("--version", action="version", version=f"vhr-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    cap = sub.add_parser("caption", help="caption images (VHR on by default)")
    cap.add_argument("images", nargs="+", metavar="IMG", help="image files (any format Pillow reads)")
    add_model_args(cap)
    add_vhr_args(cap)
    add_gen_args(cap)
    cap.add_argument("--json", action="store_true", help="one JSON object per image on stdout (JSON lines)")
    cap.add_argument("--stream", action="store_true",
                     help="print the caption as it is generated, token by token (ignored with --json)")
    cap.set_defaults(func=cmd_caption)

    srv = sub.add_parser("serve", help="OpenAI-style HTTP captioner (POST /v1/chat/completions, GET /health)")
    add_model_args(srv)
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
    add_model_args(wat)
    add_vhr_args(wat)
    add_gen_args(wat)
    wat.add_argument("--hz", type=float, default=0.0, help="at most this many captions per second (0: as fast as possible)")
    wat.add_argument("--max-frames", type=int, default=0, help="stop after N captions (0: run until stopped)")
    wat.set_defaults(func=cmd_watch)

    info = sub.add_parser("info", help="print a GGUF's architecture, shapes and tensor types "
                                       "(no MODEL: where the default model lives, then its summary)")
    info.add_argument("model", metavar="MODEL", nargs="?")
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

    if args.model:
        info = read_info(args.model)
        print(json.dumps(info) if args.json else format_info(info))
        return 0
    where = default_model_info()
    info = read_info(where["model"]) if where["model"] else None
    if args.json:
        print(json.dumps({**where, "info": info}))
        return 0
    print(f"vhr-edge {__version__}, llama-cpp-python {where['llama_cpp_python']} "
          f"(backends: {', '.join(where['backends']) or '?'}) at {where['llama_cpp_lib']}")
    if not where["model"]:
        print("default model: none (pass -m MODEL.gguf --mmproj MMPROJ.gguf, or set VHR_EDGE_MODEL)")
        return 0
    print(f"default model: {where['model']}  ({where['source']})")
    print(f"mmproj:        {where['mmproj'] or 'none found beside it'}")
    print(format_info(info))
    return 0


def default_model_info() -> dict:
    """Where the default model and the llama.cpp libraries are (vhr-edge info with no MODEL)."""
    import importlib.metadata
    import importlib.util

    from .bundled import models_dir
    from .flags import default_model_paths, find_mmproj

    model, mmproj = default_model_paths()
    if os.environ.get("VHR_EDGE_MODEL"):
        source = "$VHR_EDGE_MODEL"
    else:
        found = models_dir()
        source = {"wheel": "bundled testbed, installed with the package",
                  "checkout": "bundled testbed, in the checkout's models/"}.get(found[1] if found else "", "")
    spec = importlib.util.find_spec("llama_cpp")
    lib = Path(spec.origin).parent / "lib" if spec and spec.origin else None
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    backends = sorted({p.name.split(".")[0][len("libggml-"):] for p in lib.glob("libggml-*")} - {"base"}) if lib else []
    return {"model": model, "mmproj": mmproj or (find_mmproj(model) if model else None), "source": source,
            "llama_cpp_python": version, "llama_cpp_lib": str(lib) if lib else None, "backends": backends}


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
