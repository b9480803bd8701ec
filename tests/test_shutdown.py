"""Stopping while a caption is in progress, and the 429 a full queue answers.

`serve` and `watch` on SIGTERM: "finish the caption in progress, 503 for the rest" (serve), the
caption in progress still written whole (watch), exit 0. The signal is sent while a long caption
runs: serve's /health says busy with the others queued; watch is known to be captioning because
it burns CPU time (an idle watch uses almost none). Nothing here asserts a duration.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import EXE, clean_env, scene
from test_serve import chat, data_uri, png, request, running

LONG = 2048  # tokens: the tiny model never stops early; several seconds of decoding


def post(port, body, timeout=300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
        conn.close()


def health(port) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def wait_for(cond, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_serve_sigterm_finishes_the_caption_in_progress_and_refuses_the_queue(tiny, tmp_path):
    text, mmproj = tiny
    p = subprocess.Popen(EXE + ["serve", "-m", str(text), "--mmproj", str(mmproj), "--port", "0", "-t", "1",
                                "-c", "4096", "--max-queue", "4"], stderr=subprocess.PIPE, text=True, env=clean_env())
    results: dict[str, tuple] = {}
    threads = []
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", p.stderr.readline()).group(1))
        local = tmp_path / "scene.png"
        Image.fromarray(scene(1)).save(local)
        status, j, _ = post(port, chat(str(local)))  # no --allow-local-files: a path is refused
        assert status == 400 and "allow-local-files" in j["error"]["message"]

        def client(name, body):
            try:
                results[name] = post(port, body)[:2]
            except Exception as e:  # a dropped connection is a result too
                results[name] = (type(e).__name__, str(e))

        def start(name, body):
            t = threading.Thread(target=client, args=(name, body))
            t.start()
            threads.append(t)

        start("long", chat(data_uri(png(scene(1))), max_tokens=LONG))
        wait_for(lambda: health(port)["busy"], "the long caption to start")
        start("queued1", chat(data_uri(png(scene(2))), max_tokens=5))
        start("queued2", chat(data_uri(png(scene(3))), max_tokens=5))
        h = wait_for(lambda: (lambda h: h if h["queued"] == 2 else None)(health(port)), "two queued requests")
        assert h["busy"] and h["served"] == 0  # the long caption is still in progress
        p.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(300)
        assert p.wait(timeout=120) == 0
        assert "stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    status, j = results["long"]
    assert status == 200, results["long"]
    assert j["usage"]["completion_tokens"] == LONG and j["choices"][0]["finish_reason"] == "length"
    assert len(j["choices"][0]["message"]["content"]) > 200
    for name in ("queued1", "queued2"):
        status, j = results[name]
        assert status == 503 and j["error"]["code"] == "shutting_down", results[name]


def test_429_carries_retry_after(session):
    srv_gen = running(session, max_queue=1)
    srv = next(srv_gen)
    try:
        host, port = srv.server_address[:2]
        results = []
        with session._lock:  # hold the engine: A waits on the session, B fills the queue
            threads = []
            for i in range(2):
                t = threading.Thread(target=lambda: results.append(request(srv, body=chat(data_uri(png(scene(1)))))))
                t.start()
                threads.append(t)
                wait_for(lambda: (lambda j: j["busy"] and j["queued"] == i)(request(srv, method="GET", path="/health")[1]),
                         "the queue to fill")
            conn = http.client.HTTPConnection(host, port, timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps(chat(data_uri(png(scene(2))))),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            conn.close()
            assert resp.status == 429
            assert resp.getheader("Retry-After") == "1"
            assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
        for t in threads:
            t.join(60)
        assert sorted(s for s, _ in results) == [200, 200]
    finally:
        next(srv_gen, None)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see that the caption is running")
def test_watch_sigterm_writes_the_caption_in_progress(tiny, tmp_path):
    text, mmproj = tiny
    frames = []
    for i in (1, 2):
        f = tmp_path / f"f{i}.png"
        Image.fromarray(scene(i)).save(f)
        frames.append(f)
    n = 1500
    p = subprocess.Popen(EXE + ["watch", "-", "-m", str(text), "--mmproj", str(mmproj), "-n", str(n), "--ignore-eos",
                                "-t", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=clean_env())
    try:
        p.stdin.write(json.dumps({"path": str(frames[0])}) + "\n")
        p.stdin.flush()
        first = json.loads(p.stdout.readline())  # warm: the model is loaded, the watch is idle
        assert first["image"] == str(frames[0]) and first["timings"]["n_decoded"] == n - 1
        idle = cpu_seconds(p.pid)
        p.stdin.write(json.dumps({"path": str(frames[1])}) + "\n")
        p.stdin.flush()
        # captioning 1500 tokens takes seconds of CPU; 0.3 s used means it is under way
        wait_for(lambda: cpu_seconds(p.pid) > idle + 0.3, "the second caption to start")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out  # the caption in progress, and nothing after it
    second = json.loads(lines[0])
    assert second["image"] == str(frames[1]) and second["timings"]["n_decoded"] == n - 1
    assert len(second["text"]) > 200 and "Traceback" not in err


def test_stop_waits_for_the_replies_in_flight(session, monkeypatch):
    """stop() returns only once the handlers have sent what the worker finished (otherwise a
    process that exits right after it loses those replies). Made deterministic by building the
    reply slowly: without the wait, stop() would return while the reply is still unsent."""
    import select
    import socket

    import vhr_edge.serve as serve_mod
    from vhr_edge.serve import make_server

    real = serve_mod.completion_body

    def slow(job, model_name):
        time.sleep(0.5)
        return real(job, model_name)

    monkeypatch.setattr(serve_mod, "completion_body", slow)
    srv, service = make_server(session, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        body = json.dumps(chat(data_uri(png(scene(1))), max_tokens=32)).encode()
        sock = socket.create_connection(srv.server_address[:2], timeout=60)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: service.busy or service.served, "the caption to be taken")
        srv.shutdown()
        service.stop()
        assert select.select([sock], [], [], 0)[0], "stop() returned before the reply was sent"
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"Content-Length: (\d+)", data).group(1)):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.1 200")
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 32
    finally:
        srv.server_close()
