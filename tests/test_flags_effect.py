"""Flags and settings that must change what happens, each checked for its effect (not only that
it parses): serve --host and --allow-local-files, -fa, --no-mmap, $VHR_EDGE_MODEL / $VHR_EDGE_MMPROJ.
(--no-outlier-rule and --random-heads: test_selection_engine.py.)"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess

import pytest
from PIL import Image

from conftest import EXE, clean_env, scene


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("flags") / "scene.png"
    Image.fromarray(scene(4)).save(path)
    return path


def post(host, port, url, max_tokens=6):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Please describe this image in detail."},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": max_tokens}
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_serve_host_and_allow_local_files(tiny, png):
    """--host 127.0.0.2 binds there (and not on 127.0.0.1); --allow-local-files lets a request
    name a file on this machine, captioned like the same picture sent as a data URI."""
    text, mmproj = tiny
    p = subprocess.Popen(EXE + ["serve", "-m", str(text), "--mmproj", str(mmproj), "--host", "127.0.0.2",
                                "--port", "0", "-t", "2", "--allow-local-files"],
                         stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        line = p.stderr.readline()
        m = re.search(r"http://(127\.0\.0\.2):(\d+)", line)
        assert m, line
        port = int(m.group(2))
        with socket.create_connection(("127.0.0.2", port), timeout=10):
            pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        data_uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        s1, by_uri = post("127.0.0.2", port, data_uri)
        s2, by_path = post("127.0.0.2", port, str(png))
        s3, by_file_url = post("127.0.0.2", port, f"file://{png}")
        assert (s1, s2, s3) == (200, 200, 200), (by_uri, by_path, by_file_url)
        content = by_uri["choices"][0]["message"]["content"]
        assert content and by_path["choices"][0]["message"]["content"] == content
        assert by_file_url["choices"][0]["message"]["content"] == content
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def fa_line(tiny, png, fa: str) -> str:
    r = subprocess.run(EXE + ["caption", str(png), "-m", str(tiny[0]), "--mmproj", str(tiny[1]), "-n", "2", "-t", "2",
                              "-v", "-fa", fa], capture_output=True, text=True, timeout=120, env=clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    lines = re.findall(r"flash_attn\s+=\s+(\w+)", r.stderr)
    assert lines, r.stderr[-2000:]
    return lines[-1]


def test_flash_attn_flag_reaches_llama_cpp(tiny, png):
    """-fa on / off is what llama.cpp creates the context with (its own log line, -v)."""
    assert fa_line(tiny, png, "on") == "enabled"
    assert fa_line(tiny, png, "off") == "disabled"


def test_flash_attn_changes_the_arithmetic(tiny):
    """... and it is not a no-op on CPU: the flash-attention kernel rounds differently."""
    import numpy as np

    from vhr_edge import Session

    out = {}
    for fa in (True, False):
        with Session(*tiny, n_threads=2, flash_attn=fa) as s:
            out[fa] = s.caption(scene(1), vhr=False, n_predict=2, keep_logits=True).first_logits
    diff = float(np.abs(out[True] - out[False]).max())
    span = float(out[False].max() - out[False].min())
    assert 0 < diff < 1e-3 * span


def test_no_mmap_reaches_llama_cpp_and_the_fold_still_applies(tiny, png):
    """--no-mmap loads the weights into a plain CPU buffer (llama.cpp's own log line, -v); the
    caption and VHR's W_o fold are the same as with the mapped GGUF."""
    out = {}
    for flag in ([], ["--no-mmap"]):
        r = subprocess.run(EXE + ["caption", str(png), "-m", str(tiny[0]), "--mmproj", str(tiny[1]), "-n", "8",
                                  "-t", "2", "-v", "--json", "--no-profile", "--alpha", "2"] + flag,
                           capture_output=True, text=True, timeout=120, env=clean_env())
        assert r.returncode == 0, r.stderr[-2000:]
        buffers = re.findall(r"(\S+) model buffer size", r.stderr)
        out[bool(flag)] = buffers, json.loads(r.stdout.strip().splitlines()[-1])
    assert "CPU_Mapped" in out[False][0] and "CPU_Mapped" not in out[True][0] and "CPU" in out[True][0]
    mapped, loaded = out[False][1], out[True][1]
    assert loaded["text"] == mapped["text"] and loaded["vhr"]["selected_heads"] == mapped["vhr"]["selected_heads"]
    assert loaded["vhr"]["decode_scaling"] == mapped["vhr"]["decode_scaling"] == "weights"


def test_model_from_the_environment(tiny, png, tmp_path):
    """$VHR_EDGE_MODEL / $VHR_EDGE_MMPROJ stand in for -m / --mmproj (here the text model sits
    alone in its folder, so the mmproj can only come from the variable)."""
    text, mmproj = tiny
    alone = tmp_path / "alone" / "model.gguf"
    alone.parent.mkdir()
    shutil.copy(text, alone)
    args = [str(png), "-n", "4", "-t", "2", "--json", "--no-profile"]
    explicit = subprocess.run(EXE + ["caption", *args, "-m", str(text), "--mmproj", str(mmproj)],
                              capture_output=True, text=True, timeout=120, env=clean_env())
    from_env = subprocess.run(EXE + ["caption", *args], capture_output=True, text=True, timeout=120,
                              env=clean_env(VHR_EDGE_MODEL=str(alone), VHR_EDGE_MMPROJ=str(mmproj)))
    assert explicit.returncode == 0 and from_env.returncode == 0, explicit.stderr + from_env.stderr
    a, b = json.loads(explicit.stdout), json.loads(from_env.stdout)
    assert b["text"] == a["text"] and b["vhr"]["vhd"] == a["vhr"]["vhd"] and b["n_tokens"] == a["n_tokens"]
    # an -m flag beats the variable
    flag_wins = subprocess.run(EXE + ["caption", *args, "-m", str(text), "--mmproj", str(mmproj)], capture_output=True,
                               text=True, timeout=120, env=clean_env(VHR_EDGE_MODEL=str(tmp_path / "none.gguf")))
    assert flag_wins.returncode == 0 and json.loads(flag_wins.stdout)["text"] == a["text"]
    missing = subprocess.run(EXE + ["caption", *args], capture_output=True, text=True, timeout=120,
                             env=clean_env(VHR_EDGE_MODEL=str(tmp_path / "none.gguf")))
    assert missing.returncode == 1 and missing.stderr.strip() == f"vhr-edge: error: model not found: {tmp_path / 'none.gguf'}"
