"""`vhr-edge serve` with "stream": true, through the official `openai` client and a raw socket."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai
import pytest

from vhr_edge.errors import VhrEdgeError

from conftest import scene
from test_serve import chat, data_uri, png, request, running

LONG = 256  # tokens: the tiny model never stops early, so this is a long caption


@pytest.fixture(scope="module")
def server(session):
    yield from running(session, max_queue=1)


@pytest.fixture(scope="module")
def keyed_server(session):
    yield from running(session, api_key="s3cret")


def client(srv, key="none") -> openai.OpenAI:
    host, port = srv.server_address[:2]
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=key, max_retries=0, timeout=120)


def messages(a, text="Please describe this image in detail."):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_uri(png(a))}}]}]


def health(srv) -> dict:
    status, j = request(srv, method="GET", path="/health")
    assert status == 200
    return j


def wait_idle(srv, served_before: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(srv)
        if h["served"] > served_before and not h["busy"] and h["queued"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"server still busy: {h}")


def test_streamed_equals_non_streamed(server, session):
    c = client(server)
    a = scene(2)
    whole = c.chat.completions.create(model="x", messages=messages(a), max_tokens=LONG, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == LONG
    assert text == session.caption(a, n_predict=LONG).text

    t0 = time.perf_counter()
    chunks, arrived = [], []
    for ch in c.chat.completions.create(model="x", messages=messages(a), max_tokens=LONG, temperature=0,
                                        stream=True):
        arrived.append(time.perf_counter() - t0)
        chunks.append(ch)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length" and not last.choices[0].delta.content
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
    content = [ch.choices[0].delta.content or "" for ch in chunks]
    assert "".join(content) == text
    n_content = sum(1 for piece in content if piece)
    assert n_content > 20  # many chunks came before the last one
    # the VHR block rides on the final chunk, as the whole reply carries it
    extra = last.model_extra
    assert extra["vhr"]["layers"] == [1, 4, 5, 6, 7] and set(extra["vhr"]["selected_heads"]) == {"1", "4", "5", "6", "7"}
    assert extra["timings"]["n_decoded"] == LONG - 1
    first_content = next(t for t, piece in zip(arrived, content) if piece)
    print(f"first content chunk after {first_content * 1000:.0f} ms, whole reply {arrived[-1] * 1000:.0f} ms")
    assert first_content < 0.5 * arrived[-1]  # the first words came well before the last


def test_usage_chunk(server):
    c = client(server)
    a = scene(1)
    whole = c.chat.completions.create(model="x", messages=messages(a), max_tokens=12)
    chunks = list(c.chat.completions.create(model="x", messages=messages(a), max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    u, w = chunks[-1].usage, whole.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (w.prompt_tokens, 12, w.prompt_tokens + 12)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks[:-1])
    no_usage = list(c.chat.completions.create(model="x", messages=messages(a), max_tokens=12, stream=True))
    assert no_usage[-1].choices and all(ch.usage is None for ch in no_usage)


def test_errors_before_streaming_keep_their_status(server, keyed_server, session):
    for stream in (False, True):
        with pytest.raises(openai.AuthenticationError):
            r = client(keyed_server, "wrong").chat.completions.create(model="x", messages=messages(scene(1)),
                                                                       max_tokens=2, stream=stream)
            list(r) if stream else None
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": data_uri(b"GIF89a but not really" * 5)}}]}]
        with pytest.raises(openai.BadRequestError) as e:
            client(server).chat.completions.create(model="x", messages=bad, max_tokens=2, stream=stream)
        assert e.value.status_code == 400
        msg = e.value.body["message"]
        assert "\n" not in msg and ("not an image" in msg or "cannot decode" in msg), msg
        with pytest.raises(openai.BadRequestError, match="stream"):
            client(server).chat.completions.create(model="x", messages=messages(scene(1)), max_tokens=2,
                                                   stream=stream, extra_body={"stream_options": 3})
    r = client(keyed_server, "s3cret").chat.completions.create(model="x", messages=messages(scene(1)), max_tokens=3,
                                                                stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)


def test_full_queue_is_a_rate_limit_error(server, session):
    # hold the engine: the worker takes request A and waits on the session; B fills the queue (1)
    served = health(server)["served"]
    results = []
    with session._lock:
        threads = []
        for _ in range(2):
            t = threading.Thread(target=lambda: results.append(request(server, body=chat(data_uri(png(scene(1)))))))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                h = health(server)
                if h["busy"] and h["queued"] == len(threads) - 1:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError(h)
        with pytest.raises(openai.RateLimitError) as e:
            client(server).chat.completions.create(model="x", messages=messages(scene(1)), max_tokens=2, stream=True)
        assert e.value.response.headers["Retry-After"] == "1"
        assert e.value.body["code"] == "queue_full"
    for t in threads:
        t.join(60)
    assert [s for s, _ in results] == [200, 200]
    assert health(server)["served"] == served + 2


def read_until_content(sock: socket.socket) -> bytes:
    buf = b""
    while b'"content": "' not in buf.split(b'"role"', 1)[-1] or not buf.endswith(b"\r\n"):
        data = sock.recv(4096)
        assert data, buf
        buf += data
    return buf


def test_client_that_disconnects_cancels_its_caption(server):
    h0 = health(server)
    body = json.dumps(chat(data_uri(png(scene(1))), max_tokens=1500, stream=True)).encode()
    sock = socket.create_connection(server.server_address[:2], timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head = read_until_content(sock)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head and b"chunked" in head.lower()
    # a second request queues behind the stream while it runs
    nxt = []
    t = threading.Thread(target=lambda: nxt.append(request(server, body=chat(data_uri(png(scene(2))), max_tokens=5))))
    t.start()
    sock.close()
    t.join(120)
    assert nxt and nxt[0][0] == 200 and nxt[0][1]["usage"]["completion_tokens"] == 5
    h = wait_idle(server, h0["served"] + 1)
    assert h["cancelled"] == h0["cancelled"] + 1  # the engine stopped the stream's caption early
    assert h["served"] == h0["served"] + 2 and h["status"] == "ok"
    assert h["last"] == {"stop_reason": "length", "completion_tokens": 5}


def test_keep_alive_after_a_stream(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    for stream in (True, False, True):
        conn.request("POST", "/v1/chat/completions", body=json.dumps(chat(data_uri(png(scene(1))), stream=stream)),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read().decode()
        assert resp.status == 200
        if stream:
            events = [line[6:] for line in payload.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        else:
            assert json.loads(payload)["object"] == "chat.completion"
    conn.close()


def test_a_client_that_resets_its_keep_alive_connection_prints_nothing(server, capfd):
    """A keep-alive client that hangs up with a reset while the server waits for its next request
    is normal traffic: no traceback on the server's stderr."""
    import struct

    capfd.readouterr()
    for _ in range(3):
        sock = socket.create_connection(server.server_address[:2], timeout=60)
        body = json.dumps(chat(data_uri(png(scene(1))), max_tokens=2)).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"chat.completion" not in got:
            got += sock.recv(65536)
        time.sleep(0.1)  # the handler is back in readline, waiting for the next request
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        sock.close()
    time.sleep(0.5)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err
    assert health(server)["status"] == "ok"


class FailsMidway:
    """A stand-in session whose caption fails after its first token."""

    model_path = "fake.gguf"

    def caption(self, rgb, prompt, vhr=None, gen=None, on_token=None):
        on_token(5, "Hello")
        on_token(6, " there")
        raise VhrEdgeError("the engine failed")


def test_an_error_after_streaming_started_ends_the_stream(tmp_path):
    srv_gen = running(FailsMidway())
    srv = next(srv_gen)
    try:
        got = []
        with pytest.raises(openai.APIError, match="the engine failed"):
            for ch in client(srv).chat.completions.create(model="x", messages=messages(scene(1)), stream=True):
                got.append(ch.choices[0].delta.content)
        assert got == ["", "Hello", " there"]
        assert health(srv)["status"] == "ok"
    finally:
        next(srv_gen, None)
