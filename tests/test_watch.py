"""The robot side: the latest-frame captioner, `vhr-edge watch`, sensor_msgs conversion."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from vhr_edge.errors import ImageError
from vhr_edge.robot import LatestFrameCaptioner, LatestSlot, image_msg_to_array
from vhr_edge.session import GenerationConfig, VhrConfig
from vhr_edge.watch import dir_frames, parse_stdin_line, stdin_frames, watch

from conftest import scene

GEN = GenerationConfig(n_predict=3)


def test_latest_slot_keeps_only_the_newest():
    slot: LatestSlot[int] = LatestSlot()
    for i in range(5):
        slot.put(i)
    assert slot.take(0) == (4, 4, True)
    assert slot.take(0.01) == (None, 0, False)
    slot.put(0)  # falsy items are items too
    assert slot.take(0) == (0, 0, True)


def test_frame_captioner_drops_stale_frames_and_survives_bad_ones(session):
    results, errors = [], []
    gate = threading.Event()

    def on_caption(r, info):
        gate.wait(10)  # hold the worker so that frames pile up
        results.append((r, info))

    cap = LatestFrameCaptioner(session, on_caption, gen=GEN, on_error=lambda e, info: errors.append((e, info)))
    frames = [scene(i) for i in range(6)]
    cap.submit(frames[0])
    time.sleep(0.3)  # frame 0 is being captioned (held at the gate)
    for f in frames[1:5]:
        cap.submit(f)
    cap.submit(np.zeros((4, 4, 2), np.uint8))  # a bad frame, newest: replaces 1..4
    gate.set()
    time.sleep(0.5)
    cap.submit(frames[5])
    cap.close()
    seqs = [info.seq for _, info in results]
    assert seqs == [1, 7]  # first frame, then the one submitted after the bad frame
    assert len(errors) == 1 and isinstance(errors[0][0], ImageError) and errors[0][1].dropped == 4
    assert cap.dropped == 4 and cap.captioned == 2
    assert results[1][0].text == session.caption(frames[5], gen=GEN).text
    assert all(info.latency_ms > 0 for _, info in results)


def write_png(path, seed, mtime):
    Image.fromarray(scene(seed)).save(path)
    os.utime(path, (mtime, mtime))


def test_dir_frames_yields_newest_and_counts_dropped(tmp_path):
    t = time.time() - 100
    for i in range(3):
        write_png(tmp_path / f"f{i}.png", i, t + i)
    (tmp_path / "notes.txt").write_text("x")
    stop = threading.Event()
    frames = dir_frames(tmp_path, stop, poll_s=0.01)
    assert next(frames) == (str(tmp_path / "f2.png"), 2)
    write_png(tmp_path / "f3.png", 3, t + 10)
    write_png(tmp_path / "f4.png", 4, t + 11)
    assert next(frames) == (str(tmp_path / "f4.png"), 1)
    stop.set()


def test_stdin_lines():
    assert parse_stdin_line('{"path": "a.png"}') == "a.png"
    assert parse_stdin_line("b.png\n") == "b.png"
    assert parse_stdin_line("   ") is None and parse_stdin_line("{broken") is None and parse_stdin_line('{"p": 1}') is None
    paths = [f"{i}.png" for i in range(50)]
    got = list(stdin_frames(io.StringIO("\n".join(paths) + "\n"), threading.Event()))
    assert got[-1][0] == "49.png"
    assert len(got) + sum(d for _, d in got) == 50  # every line is captioned or counted as dropped


def test_watch_writes_one_json_line_per_frame(session, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(scene(1)).save(good)
    out = io.StringIO()
    frames = iter([(str(good), 0), (str(tmp_path / "missing.png"), 2), (str(good), 0)])
    n = watch(session, frames, out, prompt="Describe.", vhr=VhrConfig(), gen=GEN, hz=20)
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert n == 3 and len(lines) == 3
    assert lines[0]["text"] == lines[2]["text"] and lines[0]["latency_ms"] > 0 and "selected_heads" in lines[0]["vhr"]
    assert "not found" in lines[1]["error"] and lines[1]["dropped"] == 2
    t0, t2 = (time.mktime(time.strptime(l["ts"][:19], "%Y-%m-%dT%H:%M:%S")) for l in (lines[0], lines[2]))
    assert t2 >= t0


def test_watch_rate_limit(session, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(scene(1)).save(good)
    start = time.monotonic()
    watch(session, iter([(str(good), 0)] * 3), io.StringIO(), prompt="x", vhr=VhrConfig(), gen=GEN, hz=5)
    assert time.monotonic() - start >= 0.4  # 3 frames at 5 Hz: two waits of 0.2 s


def test_cli_watch_stdin_and_sigterm(tiny, tmp_path):
    text, mmproj = tiny
    img = tmp_path / "a.png"
    Image.fromarray(scene(2)).save(img)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    p = subprocess.Popen([sys.executable, "-m", "vhr_edge.cli", "watch", "-", "-m", str(text), "--mmproj", str(mmproj),
                          "-n", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        p.stdin.write(json.dumps({"path": str(img)}) + "\n")
        p.stdin.flush()
        first = json.loads(p.stdout.readline())
        assert first["image"] == str(img) and "text" in first
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        rest = p.stdout.read()
        for line in rest.splitlines():  # anything written after is whole JSON
            json.loads(line)
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_cli_watch_bad_source(tiny, tmp_path):
    text, mmproj = tiny
    r = subprocess.run([sys.executable, "-m", "vhr_edge.cli", "watch", str(tmp_path / "nope"), "-m", str(text),
                        "--mmproj", str(mmproj)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("vhr-edge: error: watch needs a folder")


def test_image_msg_conversion():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = rgb.reshape(2, 9)  # step 12 > width*3
    np.testing.assert_array_equal(image_msg_to_array("rgb8", 2, 3, 12, padded.tobytes()), rgb)
    np.testing.assert_array_equal(image_msg_to_array("bgr8", 2, 3, 9, rgb[:, :, ::-1].tobytes()), rgb)
    mono = np.array([[0, 255]], np.uint8)
    assert image_msg_to_array("mono8", 1, 2, 2, mono.tobytes())[0, 1].tolist() == [255] * 3
    m16 = np.array([[0x1234, 0xFF00]], "<u2")
    assert image_msg_to_array("mono16", 1, 2, 4, m16.tobytes())[0].tolist() == [[0x12] * 3, [0xFF] * 3]
    assert image_msg_to_array("mono16", 1, 2, 4, m16.astype(">u2").tobytes(), True)[0, 0].tolist() == [0x12] * 3
    with pytest.raises(ImageError, match="encoding"):
        image_msg_to_array("yuv422", 1, 1, 2, b"00")
    with pytest.raises(ImageError, match="inconsistent"):
        image_msg_to_array("rgb8", 2, 3, 9, b"short")
