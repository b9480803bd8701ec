"""`"stream": true` for vhr-edge serve: OpenAI's chat.completion.chunk events over text/event-stream.

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", "content": ""}}], ...}
    data: {... "choices": [{"delta": {"content": "A red"}, "finish_reason": null}]}
    ...
    data: {... "choices": [{"delta": {}, "finish_reason": "stop"}], "vhr": {...}, "timings": {...}}
    data: {... "choices": [], "usage": {...}}        (with stream_options.include_usage)
    data: [DONE]

The reply waits for the caption's first token (or its end) before it sends the 200: an error
found until then (a bad image, a prompt longer than the context) keeps its HTTP status. An
error after that ends the stream with `data: {"error": {...}}`. The body is sent chunked, so
the connection stays open for the next request. While it waits for tokens the handler watches
the socket: a client that went away sets job.cancel, and the engine stops at the next token.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import time

from .serve_protocol import HttpError, Job, completion_id, finish_reason, usage

POLL_S = 0.02  # how often a waiting handler looks at its client's socket
FIRST_TOKEN_TIMEOUT_S = 600.0


class ClientGone(Exception):
    pass


def client_gone(sock: socket.socket) -> bool:
    """True when the peer closed its end (readable and EOF) or the socket is broken."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def next_event(handler, job: Job, timeout: float | None = None):
    """The next piece (str) or None at the end, watching for a client that went away."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return job.events.get(timeout=POLL_S)
        except queue.Empty:
            pass
        if client_gone(handler.connection):
            raise ClientGone
        if deadline is not None and time.monotonic() > deadline:
            raise HttpError(504, "caption timed out", "timeout")


def stream_reply(handler, job: Job) -> None:
    """Answer one streaming request whose job is in the service's queue."""
    try:
        first = next_event(handler, job, FIRST_TOKEN_TIMEOUT_S)
    except ClientGone:
        job.cancel.set()
        handler.close_connection = True
        return
    except HttpError:
        job.cancel.set()
        raise
    if first is None and job.error is not None:
        raise job.error  # found before anything was sent: a plain HTTP error

    cid, created = completion_id(), int(time.time())

    def chunk(delta: dict | None, finish=None, **extra) -> dict:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": handler.model_name,
               "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": finish}]}
        if job.include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    def send(payload) -> None:
        data = b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"
        try:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise ClientGone from None

    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    try:
        send(chunk({"role": "assistant", "content": ""}))
        piece = first
        while piece is not None:
            if piece:
                send(chunk({"content": piece}))
            piece = next_event(handler, job)
        if job.error is not None:
            e = job.error
            send({"error": {"message": e.message, "type": "server_error" if e.status >= 500 else "invalid_request_error",
                            "code": e.code}})
        else:
            r = job.result
            out = r.to_json(include_matrices=False)
            send(chunk({}, finish_reason(r), vhr=out["vhr"], timings=out["timings"]))
            if job.include_usage:
                send(chunk(None, usage=usage(r)))
        send(b"[DONE]")
        handler.wfile.write(b"0\r\n\r\n")
    except (ClientGone, OSError):
        job.cancel.set()
        handler.close_connection = True
