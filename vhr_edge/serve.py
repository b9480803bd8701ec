"""`vhr-edge serve`: an OpenAI-style HTTP captioner around one loaded Session.

    POST /v1/chat/completions   {"messages": [{"role": "user", "content": [
                                    {"type": "text", "text": "Please describe this image in detail."},
                                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
                                 "max_tokens": 128, "temperature": 0, "seed": 0,
                                 "vhr": {"enabled": true, "alpha": 2, "layers": "auto"}}
    GET  /health                 {"status": "ok", ...}
    GET  /v1/models

A request without "vhr" fields gets the server's defaults: --alpha/--layers, else the model's
VHR profile (--profile FILE or the one beside the GGUF), else alpha 2 and layers auto.
One engine thread captions requests in arrival order; at most `max_queue` wait behind it,
the next one gets 429. Bodies above `max_body` bytes and images above `max_pixels` get 413.
Errors use OpenAI's shape: {"error": {"message", "type", "code"}}.

"stream": true answers text/event-stream in OpenAI's chat.completion.chunk format (serve_stream.py; the wire format in serve_protocol.py):
the assistant role, content deltas as tokens are made, a last chunk with finish_reason and the
"vhr" and "timings" blocks, the usage chunk with stream_options.include_usage, `data: [DONE]`.
Errors found before the first token keep their HTTP status; a client that disconnects stops
its caption at the next token (/health counts them in "cancelled").
"""

from __future__ import annotations

import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from .errors import ConfigError, ImageError, VhrEdgeError
from .images import load_image
from .serve_protocol import (  # noqa: F401 (re-exported)
    MAX_BODY,
    MAX_PIXELS,
    HttpError,
    Job,
    completion_body,
    parse_request,
)
from .serve_stream import stream_reply
from .session import Session, VhrConfig


class CaptionService:
    """The queue in front of the engine: one worker, bounded waiting room."""

    def __init__(self, session: Session, max_queue: int = 8):
        self.session = session
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.served = 0
        self.cancelled = 0  # streamed captions stopped early because their client went away
        self.busy = False
        self.last: Optional[dict] = None  # the last caption's stop_reason and completion_tokens
        self._stopping = threading.Event()
        self._replying = 0  # POST handlers still answering (a finished caption's reply may not be sent yet)
        self._replies_done = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="vhr-edge-engine", daemon=True)
        self._worker.start()

    def enqueue(self, job: Job) -> Job:
        if self._stopping.is_set():
            raise HttpError(503, "server is shutting down", "shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise HttpError(429, f"busy: {self.max_queue} requests already waiting; retry later", "queue_full") from None
        return job

    def submit(self, job: Job, timeout: float = 600.0) -> Job:
        self.enqueue(job)
        if not job.done.wait(timeout):
            raise HttpError(504, "caption timed out", "timeout")
        if job.error:
            raise job.error
        return job

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():  # a streaming client that left while it waited
                job.finish()
                continue
            self.busy = True
            try:
                rgb = load_image(job.image, max_pixels=MAX_PIXELS)
                job.result = r = self.session.caption(rgb, job.prompt, vhr=job.vhr, gen=job.gen,
                                                      on_token=job.on_token if job.stream else None)
                self.served += 1
                self.cancelled += r.stop_reason == "cancelled"
                self.last = {"stop_reason": r.stop_reason, "completion_tokens": r.n_tokens}
            except ImageError as e:
                status = 413 if "too large" in str(e) else 400
                job.error = HttpError(status, str(e), "invalid_image")
            except (ConfigError, VhrEdgeError) as e:
                job.error = HttpError(400, str(e), "invalid_request")
            except Exception as e:  # a bug must not kill the worker
                job.error = HttpError(500, f"internal error: {type(e).__name__}: {e}", "internal")
            finally:
                self.busy = False
                job.finish()

    def stop(self) -> None:
        """Finish the caption in progress, refuse the rest (503), stop the worker, and wait (30 s at
        most) until the handlers have sent the replies of what it finished."""
        self._stopping.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error = HttpError(503, "server is shutting down", "shutting_down")
                job.finish()
        self.jobs.put(None)
        self._worker.join(timeout=60)
        with self._replies_done:  # let the handlers send what the worker finished before the process exits
            self._replies_done.wait_for(lambda: self._replying == 0, timeout=30)

    def reply_started(self) -> None:
        with self._replies_done:
            self._replying += 1

    def reply_done(self) -> None:
        with self._replies_done:
            self._replying -= 1
            self._replies_done.notify_all()


# ---- HTTP ----------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "vhr-edge"
    protocol_version = "HTTP/1.1"

    # set by make_server
    service: CaptionService
    api_key: Optional[str] = None
    allow_local_files = False
    max_body = MAX_BODY
    model_name = "vhr-edge"
    quiet = True
    default_vhr: Optional[VhrConfig] = None

    def log_message(self, fmt, *args):  # access log only when asked
        if not self.quiet:
            super().log_message(fmt, *args)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: HttpError) -> None:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            e.status, "server_error" if e.status >= 500 else "invalid_request_error")
        self._send(e.status, {"error": {"message": e.message, "type": kind, "code": e.code}})

    def _authorized(self) -> bool:
        if not self.api_key:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.api_key}"

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/health":
            s = self.service
            return self._send(200, {"status": "ok", "model": self.model_name, "queued": s.jobs.qsize(),
                                    "max_queue": s.max_queue, "busy": s.busy, "served": s.served,
                                    "cancelled": s.cancelled, "last": s.last})
        if not self._authorized():
            return self._error(HttpError(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key"))
        if path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                                 "owned_by": "vhr-edge"}]})
        self._error(HttpError(404, f"no route {path}", "not_found"))

    def do_POST(self):
        self.service.reply_started()  # stop() waits for this reply to be sent
        try:
            self._post()
        finally:
            self.service.reply_done()

    def _post(self):
        try:
            body = self._read_body()  # always drain the body, so the connection stays usable
            if self.path.split("?")[0] != "/v1/chat/completions":
                raise HttpError(404, f"no route {self.path}", "not_found")
            if not self._authorized():
                raise HttpError(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key")
            ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise HttpError(415, f"Content-Type must be application/json, got {ctype or 'none'}", "unsupported_media_type")
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise HttpError(400, f"malformed JSON: {e}", "invalid_json") from None
            job = parse_request(payload, self.allow_local_files, self.default_vhr)
            if job.stream:
                return stream_reply(self, self.service.enqueue(job))
            self._send(200, completion_body(self.service.submit(job), self.model_name))
        except HttpError as e:
            self._error(e)
        except Exception as e:  # never a 500 without a body
            self._error(HttpError(500, f"internal error: {type(e).__name__}: {e}", "internal"))

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "Content-Length is required", "length_required")
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, "bad Content-Length", "invalid_request") from None
        if n < 0:
            raise HttpError(400, "bad Content-Length", "invalid_request")
        if n > self.max_body:
            remaining = n if n <= 4 * self.max_body else 0  # drain it, so the client reads our answer
            while remaining > 0:
                chunk = self.rfile.read(min(1 << 20, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
            self.close_connection = True
            raise HttpError(413, f"request body of {n} bytes exceeds the limit of {self.max_body}", "body_too_large")
        return self.rfile.read(n)

    def do_PUT(self):
        self._error(HttpError(405, "method not allowed", "method_not_allowed"))

    do_DELETE = do_PATCH = do_PUT


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (reset, broken pipe) is normal for a server: no traceback.
        Anything else is still printed, as http.server does."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)


def make_server(session: Session, host: str = "127.0.0.1", port: int = 8080, *, api_key: Optional[str] = None,
                max_queue: int = 8, max_body: int = MAX_BODY, allow_local_files: bool = False,
                model_name: Optional[str] = None, quiet: bool = True,
                default_vhr: Optional[VhrConfig] = None) -> tuple[ThreadingHTTPServer, CaptionService]:
    """default_vhr: alpha and layers for requests that do not set them (default: 2, auto)."""
    service = CaptionService(session, max_queue=max_queue)
    attrs = dict(service=service, api_key=api_key, allow_local_files=allow_local_files, max_body=max_body,
                 model_name=model_name or Path(session.model_path).name, quiet=quiet, default_vhr=default_vhr)
    handler = type("BoundHandler", (Handler,), attrs)
    server = _Server((host, port), handler)
    server.daemon_threads = True
    return server, service
