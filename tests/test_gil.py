"""The engine releases the GIL while it captions: another Python thread makes progress meanwhile.

Deterministic, not timed: the switch interval is raised so far that the interpreter never takes
the GIL from a running thread by itself; a waiting thread then runs only when the holder lets
the GIL go. The worker sleeps a little in every round (releasing the GIL), so it cannot starve
the main thread. If the native caption kept the GIL, the worker could not complete a single
round between the two reads of its counter around the call; with the GIL released it completes
many (the caption takes hundreds of its rounds).
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from conftest import scene


def rounds_during(call) -> tuple[int, object]:
    counter = [0]
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.0002)

    old = sys.getswitchinterval()
    t = threading.Thread(target=worker, daemon=True)
    sys.setswitchinterval(30.0)
    try:
        t.start()
        while counter[0] < 3:  # the worker runs
            time.sleep(0.001)
        before = counter[0]
        out = call()
        after = counter[0]
    finally:
        stop.set()
        sys.setswitchinterval(old)
        t.join(10)
    return after - before, out


def test_caption_releases_the_gil(session):
    rgb = np.ascontiguousarray(scene(1))
    runner = session._runner
    n, r = rounds_during(lambda: runner.caption(rgb, "Please describe this image in detail.", session.prompt_template,
                                                n_predict=200, ignore_eos=True))
    assert len(r["tokens"]) == 200
    print(f"worker rounds during the caption: {n}")
    assert n >= 10, f"the worker completed {n} rounds while the engine captioned 200 tokens"


def test_streamed_caption_releases_the_gil_between_tokens(session):
    rgb = np.ascontiguousarray(scene(2))
    runner = session._runner
    pieces = []
    n, r = rounds_during(lambda: runner.caption(rgb, "Please describe this image in detail.", session.prompt_template,
                                                n_predict=200, ignore_eos=True,
                                                on_token=lambda tok, piece: pieces.append(piece)))
    assert "".join(pieces) == r["text"]
    assert n >= 10, f"the worker completed {n} rounds while the engine streamed 200 tokens"
