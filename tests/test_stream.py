"""Streaming from the engine: on_token pieces, Session.stream, cancelling, vhr-edge caption --stream."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vhr_edge import Session
from vhr_edge.errors import ImageError

from conftest import scene

N = 24


def byte_tokens(text: str) -> list[int]:
    """The fixture vocabulary's byte-fallback tokens <0x00>..<0xFF> are ids 3..258."""
    return [3 + b for b in text.encode()]


@pytest.mark.parametrize("vhr", [True, False], ids=["vhr", "plain"])
def test_pieces_join_to_the_caption_text(session, image_a, vhr):
    ref = session.caption(image_a, vhr=vhr, n_predict=N, ignore_eos=True)
    calls = []
    r = session.caption(image_a, vhr=vhr, n_predict=N, ignore_eos=True, on_token=lambda t, p: calls.append((t, p)))
    assert r.tokens == ref.tokens and r.text == ref.text and r.stop_reason == "length"
    assert [t for t, _ in calls if t >= 0] == r.tokens  # one call per token, in order
    assert "".join(p for _, p in calls) == r.text
    assert sum(1 for _, p in calls if p) > 3  # the text really came in pieces
    with session.stream(image_a, vhr=vhr, n_predict=N, ignore_eos=True) as st:
        pieces = list(st)
    assert "".join(pieces) == ref.text and all(pieces)
    assert st.result.tokens == ref.tokens and st.result.stop_reason == "length"


def test_pieces_are_utf8_safe(session, image_a):
    A, b = session._runner.tokenize("A"), session._runner.tokenize("b")  # [" A"], [" ", "b"]
    assert session._runner.pieces(A + b) == [" A", " ", "b"]
    forced = A + byte_tokens("€") + b + byte_tokens("é")
    calls = []
    r = session.caption(image_a, forced_tokens=forced, on_token=lambda t, p: calls.append((t, p)))
    assert r.text == "A€ bé"
    # the euro sign's first two bytes are held back and come with its third; so is a space
    # until a word follows it (the caption is trimmed: trailing whitespace never comes)
    assert calls == list(zip(forced, ["A", "", "", "€", "", " b", "", "é"]))
    calls.clear()
    r = session.caption(image_a, forced_tokens=A + b + b[:1], on_token=lambda t, p: calls.append((t, p)))
    assert r.text == "A b" and [p for _, p in calls] == ["A", "", " b", ""]
    # an incomplete character at the very end comes in the last call (token -1), as the text has it
    calls.clear()
    r = session.caption(image_a, forced_tokens=A + byte_tokens("€")[:2], on_token=lambda t, p: calls.append((t, p)))
    assert calls == [(A[0], "A"), (byte_tokens("€")[0], ""), (byte_tokens("€")[1], ""), (-1, "\ufffd")]
    assert r.text == "A\ufffd"


@pytest.mark.parametrize("vhr", [True, False], ids=["vhr-folded", "plain"])
def test_cancel_from_the_callback_leaves_the_session_exact(tiny, session, image_a, image_b, vhr):
    before = session.caption(image_b, vhr=False, n_predict=N, ignore_eos=True, keep_logits=True)
    full = session.caption(image_a, vhr=vhr, n_predict=N, ignore_eos=True)
    seen = []

    def stop_after_5(token, piece):
        seen.append(token)
        return len(seen) < 5

    r = session.caption(image_a, vhr=vhr, n_predict=N, ignore_eos=True, on_token=stop_after_5)
    assert r.stop_reason == "cancelled" and r.tokens == full.tokens[:5] and seen[:5] == r.tokens
    assert seen[5:] in ([], [-1])  # -1: the held-back rest of an incomplete character
    assert r.vhr.decode_scaling == ("weights" if vhr else "")  # the cancelled decode ran folded
    # W_o unfolded bit for bit: a plain caption reads every W_o in its prefill
    after = session.caption(image_b, vhr=False, n_predict=N, ignore_eos=True, keep_logits=True)
    assert after.tokens == before.tokens
    np.testing.assert_array_equal(after.first_logits, before.first_logits)
    again = session.caption(image_a, vhr=vhr, n_predict=N, ignore_eos=True)
    with Session(*tiny, n_threads=2) as fresh:
        ref = fresh.caption(image_a, vhr=vhr, n_predict=N, ignore_eos=True)
    assert again.tokens == full.tokens == ref.tokens


class Boom(Exception):
    pass


def test_an_exception_in_the_callback_stops_and_propagates(session, image_a, image_b):
    before = session.caption(image_b, vhr=False, n_predict=N, ignore_eos=True, keep_logits=True)
    full = session.caption(image_a, n_predict=N, ignore_eos=True)
    seen = []

    def boom(token, piece):
        seen.append(token)
        if len(seen) == 3:
            raise Boom("stop here")

    with pytest.raises(Boom, match="stop here"):
        session.caption(image_a, n_predict=N, ignore_eos=True, on_token=boom)
    assert len(seen) == 3  # not called again after it raised (not even for the held-back rest)
    after = session.caption(image_b, vhr=False, n_predict=N, ignore_eos=True, keep_logits=True)
    np.testing.assert_array_equal(after.first_logits, before.first_logits)
    assert session.caption(image_a, n_predict=N, ignore_eos=True).tokens == full.tokens
    # a return value that is neither None nor a bool is read as Python truth; a failing one raises
    r = session.caption(image_a, n_predict=N, ignore_eos=True, on_token=lambda t, p: 0)
    assert r.stop_reason == "cancelled" and r.n_tokens == 1

    class NoTruth:
        def __bool__(self):
            raise Boom("no truth")

    with pytest.raises(Boom, match="no truth"):
        session.caption(image_a, n_predict=N, on_token=lambda t, p: NoTruth())


def test_closing_a_stream_cancels_its_caption(session, image_a):
    full = session.caption(image_a, n_predict=N, ignore_eos=True)
    n = 1000  # far more than the reader waits for
    with session.stream(image_a, n_predict=n, ignore_eos=True) as st:
        first = next(st)
    assert first and st.result.stop_reason == "cancelled" and st.result.n_tokens < n
    k = min(N, st.result.n_tokens)
    assert st.result.tokens[:k] == full.tokens[:k]
    assert list(st) == []  # closed: nothing more
    st = session.stream(image_a, n_predict=n, ignore_eos=True)
    for _ in st:
        break
    st.close()
    assert st.result.stop_reason == "cancelled"
    assert session.caption(image_a, n_predict=N, ignore_eos=True).tokens == full.tokens


def test_stream_errors_come_from_the_iteration(session, image_a, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    st = session.stream(bad, n_predict=4)
    with pytest.raises(ImageError, match="not an image"):
        next(st)
    assert st.result is None
    with pytest.raises(ImageError, match="not an image"):  # never iterated: the with block raises it
        with session.stream(bad, n_predict=4):
            pass
    st = session.stream(bad, n_predict=4)
    with pytest.raises(ImageError, match="not an image"):
        st.close()
    st.close()  # raised once, not again
    with pytest.raises(KeyError):  # the block's own exception is not replaced by the caption's
        with session.stream(bad, n_predict=4):
            raise KeyError("mine")
    with pytest.raises(TypeError, match="on_token"):
        session.stream(image_a, on_token=print)
    assert session.caption(image_a, n_predict=2).n_tokens >= 1


def test_cli_stream_prints_the_same_caption(tiny, tmp_path):
    text, mmproj = tiny
    img = tmp_path / "scene.png"
    Image.fromarray(scene(3)).save(img)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VHR_EDGE_")}
    base = [sys.executable, "-m", "vhr_edge.cli", "caption", str(img), "-m", str(text), "--mmproj", str(mmproj),
            "-n", "12", "-t", "2"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    streamed = subprocess.run(base + ["--stream"], capture_output=True, text=True, timeout=120, env=env)
    assert plain.returncode == streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout and plain.stdout.strip()
    assert "12 tokens (length)" in streamed.stderr
    two = subprocess.run(base[:5] + [str(tmp_path / "missing.png")] + base[5:] + ["--stream"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert two.returncode == 1 and "Traceback" not in two.stderr
    assert two.stdout == f"== {img}\n" + plain.stdout  # the good image still streamed
    j = subprocess.run(base + ["--stream", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert j.returncode == 0 and j.stdout.startswith("{")  # JSON mode unchanged
