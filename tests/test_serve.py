"""`vhr-edge serve`: OpenAI-style requests, the bad-request table, load, auth, shutdown."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from vhr_edge.serve import make_server

from conftest import scene


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def chat(url: str, text: str = "Describe.", **extra) -> dict:
    body = {"model": "x", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 4}
    body.update(extra)
    return body


def running(session, **kw):
    srv, service = make_server(session, "127.0.0.1", 0, **kw)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    service.stop()
    srv.server_close()


@pytest.fixture(scope="module")
def server(session):
    yield from running(session, max_queue=3, max_body=2 * 1024 * 1024)


@pytest.fixture(scope="module")
def keyed_server(session):
    yield from running(session, api_key="s3cret")


def request(srv, method="POST", path="/v1/chat/completions", body=None, headers=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(payload)
    except json.JSONDecodeError:
        return resp.status, payload


def test_caption_request(server):
    status, j = request(server, body=chat(data_uri(png(scene(1))), max_tokens=6, vhr={"alpha": 3, "layers": "1,5"}))
    assert status == 200, j
    assert j["object"] == "chat.completion" and j["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(j["choices"][0]["message"]["content"], str)
    assert j["usage"]["completion_tokens"] <= 6
    assert j["vhr"] == {"enabled": True, "alpha": 3.0, "layers": [1, 5], "selected_heads": j["vhr"]["selected_heads"],
                        "decode_scaling": "callback", "reference": "released",
                        "reference_cached": j["vhr"]["reference_cached"]}  # alpha 3 cannot be folded into W_o exactly
    assert set(j["vhr"]["selected_heads"]) == {"1", "5"}
    assert j["timings"]["n_image_tokens"] == 64
    status, j = request(server, body=chat(data_uri(png(scene(1))), vhr={"enabled": False}))
    assert status == 200 and j["vhr"]["enabled"] is False and j["vhr"]["selected_heads"] == {}
    status, j = request(server, method="GET", path="/health")
    assert status == 200 and j["status"] == "ok"
    status, j = request(server, method="GET", path="/v1/models")
    assert status == 200 and j["data"][0]["object"] == "model"


def test_same_answer_as_the_library(server, session):
    a = scene(2)
    status, j = request(server, body=chat(data_uri(png(a)), text="Please describe this image in detail.", max_tokens=8))
    r = session.caption(a, n_predict=8)
    assert status == 200 and j["choices"][0]["message"]["content"] == r.text


BIG = png(np.zeros((4500, 4000, 3), np.uint8))  # 18 M pixels, a small file: over the pixel limit
GOOD = data_uri(png(scene(1)))

BAD_REQUESTS = [
    ("malformed JSON", dict(raw=b'{"messages": [}'), 400, "malformed JSON"),
    ("body not an object", dict(body=[1, 2]), 400, "JSON object"),
    ("missing messages", dict(body={"max_tokens": 3}), 400, "messages"),
    ("no user message", dict(body={"messages": [{"role": "system", "content": "hi"}]}), 400, "role 'user'"),
    ("no image", dict(body={"messages": [{"role": "user", "content": "hello"}]}), 400, "exactly one image"),
    ("two images", dict(body={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": GOOD}}, {"type": "image_url", "image_url": {"url": GOOD}}]}]}),
     400, "exactly one image"),
    ("unknown part type", dict(body={"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400, "unsupported"),
    ("bad base64", dict(body=chat("data:image/png;base64,@@@not-base64@@@")), 400, "not valid base64"),
    ("empty data URI", dict(body=chat("data:image/png;base64,")), 400, "empty"),
    ("text media type", dict(body=chat(data_uri(b"hello", "text/plain"))), 400, "image/\\*"),
    ("non-image bytes", dict(body=chat(data_uri(b"GIF89a but not really" * 5))), 400, "not an image|cannot decode"),
    ("truncated image", dict(body=chat(data_uri(png(scene(1))[:70]))), 400, "truncated|cannot decode"),
    ("too many pixels", dict(body=chat(data_uri(BIG))), 413, "too large"),
    ("body too large", dict(raw=b"{" + b" " * (3 * 1024 * 1024) + b"}"), 413, "exceeds the limit"),
    ("wrong content type", dict(body=chat(GOOD), headers={"Content-Type": "text/plain"}), 415, "application/json"),
    ("remote URL", dict(body=chat("https://example.com/cat.jpg")), 400, "remote image URLs"),
    ("local path without flag", dict(body=chat("/etc/hostname")), 400, "allow-local-files"),
    ("bad max_tokens", dict(body=chat(GOOD, max_tokens=-1)), 400, "max_tokens"),
    ("max_tokens not a number", dict(body=chat(GOOD, max_tokens="many")), 400, "max_tokens"),
    ("alpha zero", dict(body=chat(GOOD, vhr={"alpha": 0})), 400, "alpha"),
    ("layer outside model", dict(body=chat(GOOD, vhr={"layers": [1, 99]})), 400, "outside the model"),
    ("bad layer syntax", dict(body=chat(GOOD, vhr={"layers": "1,x"})), 400, "bad layer list"),
    ("unknown vhr field", dict(body=chat(GOOD, vhr={"beta": 1})), 400, "unknown vhr field"),
    ("vhr not an object", dict(body=chat(GOOD, vhr=3)), 400, "'vhr' must be an object"),
    ("unknown route", dict(path="/v1/completions", body=chat(GOOD)), 404, "no route"),
    ("wrong method", dict(method="PUT", body=chat(GOOD)), 405, "not allowed"),
]


@pytest.mark.parametrize("name, kw, status, fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests(server, name, kw, status, fragment):
    got, j = request(server, **kw)
    assert got == status, (name, got, j)
    assert isinstance(j, dict) and re.search(fragment, j["error"]["message"]), (name, j)
    assert j["error"]["type"] in ("invalid_request_error", "authentication_error", "rate_limit_error")
    assert request(server, method="GET", path="/health")[0] == 200  # still up


def test_missing_content_length_is_411(server):
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        head = s.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 411")


def test_api_key(keyed_server):
    body = chat(GOOD)
    assert request(keyed_server, body=body)[0] == 401
    assert request(keyed_server, body=body, headers={"Authorization": "Bearer nope"})[0] == 401
    assert request(keyed_server, method="GET", path="/v1/models")[0] == 401
    assert request(keyed_server, method="GET", path="/health")[0] == 200  # health stays open for probes
    status, j = request(keyed_server, body=body, headers={"Authorization": "Bearer s3cret"})
    assert status == 200, j


def test_concurrent_clients_get_200_or_429(server):
    body = chat(GOOD, max_tokens=2)
    statuses: list[int] = []
    lock = threading.Lock()

    def client():
        for _ in range(25):
            s, _ = request(server, body=body)
            with lock:
                statuses.append(s)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 200
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) >= 25  # the engine kept serving under load
    print(f"200: {statuses.count(200)}, 429: {statuses.count(429)}")
    assert request(server, method="GET", path="/health")[0] == 200


def test_cli_serve_stops_cleanly_on_sigterm(tiny):
    text, mmproj = tiny
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    p = subprocess.Popen([sys.executable, "-m", "vhr_edge.cli", "serve", "-m", str(text), "--mmproj", str(mmproj),
                          "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert "stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
