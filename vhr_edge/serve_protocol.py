"""The OpenAI chat-completions wire format of `vhr-edge serve`: a request parsed into a Job
(one image, the prompt, VHR and generation settings), the reply bodies, and the HTTP errors in
OpenAI's shape. No sockets here: serve.py (the server and its queue) and serve_stream.py (the
event-stream replies) both build on this module.
"""

from __future__ import annotations

import base64
import binascii
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import DEFAULT_PROMPT
from .session import GenerationConfig, VhrConfig

MAX_BODY = 20 * 1024 * 1024
MAX_PIXELS = 16_000_000
MAX_NEW_TOKENS = 2048


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Job:
    image: Any
    prompt: str
    vhr: VhrConfig
    gen: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Optional[HttpError] = None
    # streaming: the engine puts each token's text piece here (possibly ""), then None at the end
    events: "queue.Queue[Optional[str]]" = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)  # the client went away

    def on_token(self, token: int, piece: str) -> bool:
        if token >= 0 or piece:
            self.events.put(piece)
        return not self.cancel.is_set()

    def finish(self) -> None:
        self.done.set()
        self.events.put(None)


def decode_image_url(url: Any, allow_local_files: bool) -> Any:
    if not isinstance(url, str) or not url:
        raise HttpError(400, "image_url.url must be a non-empty string", "invalid_image_url")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise HttpError(400, "image data URI must be base64: data:image/...;base64,...", "invalid_image_url")
        if not header[5:].startswith("image/"):
            raise HttpError(400, f"data URI media type must be image/*, got {header[5:].split(';')[0] or 'none'}",
                            "invalid_image_url")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(400, "image data URI is not valid base64", "invalid_base64") from None
        if not data:
            raise HttpError(400, "image data URI is empty", "invalid_image")
        return data
    if url.startswith(("http://", "https://")):
        raise HttpError(400, "remote image URLs are not fetched; send a data URI", "invalid_image_url")
    if not allow_local_files:
        raise HttpError(400, "local image paths are disabled; start the server with --allow-local-files", "invalid_image_url")
    path = Path(url[7:] if url.startswith("file://") else url)
    if not path.is_file():
        raise HttpError(400, f"image not found: {path}", "invalid_image_url")
    return path


def parse_request(body: dict, allow_local_files: bool, default_vhr: Optional[VhrConfig] = None) -> Job:
    """default_vhr: the server's alpha and layers (a profile's, or the flags'); the request's
    "vhr" fields override them."""
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object", "invalid_request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list", "missing_messages")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise HttpError(400, "no message with role 'user'", "missing_messages")
    content = user[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise HttpError(400, "message content must be a string or a list of parts", "invalid_content")
    texts, images = [], []
    for p in parts:
        if not isinstance(p, dict):
            raise HttpError(400, "each content part must be an object", "invalid_content")
        if p.get("type") == "text":
            if not isinstance(p.get("text"), str):
                raise HttpError(400, "text part needs a string 'text'", "invalid_content")
            texts.append(p["text"])
        elif p.get("type") == "image_url":
            iu = p.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            images.append(decode_image_url(url, allow_local_files))
        else:
            raise HttpError(400, f"unsupported content part type {p.get('type')!r}", "invalid_content")
    if len(images) != 1:
        raise HttpError(400, f"exactly one image_url part is needed, got {len(images)}", "invalid_content")
    prompt = " ".join(t.strip() for t in texts if t.strip()) or DEFAULT_PROMPT

    def number(key, kind, default, lo=None, hi=None):
        v = body.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise HttpError(400, f"'{key}' must be a number", "invalid_parameter")
        v = kind(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise HttpError(400, f"'{key}' must be in [{lo}, {hi}]", "invalid_parameter")
        return v

    gen = GenerationConfig(
        n_predict=number("max_tokens", int, 512, 1, MAX_NEW_TOKENS),
        temp=number("temperature", float, 0.0, 0.0, 5.0),
        top_p=number("top_p", float, 0.95, 1e-6, 1.0),
        seed=number("seed", int, 0, 0, 2**32 - 1),
    )
    v = body.get("vhr", {})
    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise HttpError(400, "'vhr' must be an object {enabled, alpha, layers}", "invalid_parameter")
    unknown = set(v) - {"enabled", "alpha", "layers"}
    if unknown:
        raise HttpError(400, f"unknown vhr field(s): {', '.join(sorted(unknown))}", "invalid_parameter")
    dv = default_vhr or VhrConfig()
    alpha = v.get("alpha", dv.alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise HttpError(400, "vhr.alpha must be a number > 0", "invalid_parameter")
    layers = v.get("layers", dv.layers)
    if not isinstance(layers, (str, list)):
        raise HttpError(400, "vhr.layers must be 'auto', 'all', '1,18-31' or a list of ints", "invalid_parameter")
    vhr = VhrConfig(enabled=bool(v.get("enabled", True)), alpha=float(alpha), layers=layers)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise HttpError(400, "'stream' must be true or false", "invalid_parameter")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise HttpError(400, "'stream_options' must be an object {\"include_usage\": true|false}", "invalid_parameter")
    return Job(image=images[0], prompt=prompt, vhr=vhr, gen=gen, stream=stream,
               include_usage=bool(opts.get("include_usage", False)))


def finish_reason(r) -> str:
    return "stop" if r.stop_reason == "eos" else "length"


def usage(r) -> dict:
    return {"prompt_tokens": r.timings.n_prompt_rows, "completion_tokens": r.n_tokens,
            "total_tokens": r.timings.n_prompt_rows + r.n_tokens}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(job: Job, model_name: str) -> dict:
    r = job.result
    out = r.to_json(include_matrices=False)
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": r.text},
            "finish_reason": finish_reason(r),
        }],
        "usage": usage(r),
        "vhr": out["vhr"],
        "timings": out["timings"],
    }
