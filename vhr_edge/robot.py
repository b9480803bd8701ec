"""The robot-side loop: frames in (any rate), captions of the newest frame out.

    captioner = LatestFrameCaptioner(session, on_caption=publish)   # publish(result, frame_info)
    camera_callback = lambda frame: captioner.submit(frame)          # numpy HxWx3, never blocks
    ...
    captioner.close()

Only the newest frame matters: `submit` overwrites a frame that is still waiting, and the
overwritten ones are counted as dropped. One worker thread owns the model. The session
reuses what is image-independent across frames (model, mmproj, llama.cpp contexts); the KV
cache is cleared per frame because VHR's head selection, and so every cached layer above
the first scaled one, depends on the image.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

import numpy as np

from .errors import ImageError, VhrEdgeError
from .session import CaptionResult, GenerationConfig, Session, VhrConfig

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """A one-item mailbox: put() overwrites (counting the loss), take() empties."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Optional[T] = None
        self._full = False
        self._dropped = 0
        self.closed = False

    def put(self, item: T) -> None:
        with self._cond:
            if self._full:
                self._dropped += 1
            self._item, self._full = item, True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def take(self, timeout: Optional[float] = None) -> tuple[Optional[T], int, bool]:
        """(item, dropped since the last take, got_one). Waits up to `timeout` seconds."""
        with self._cond:
            if not self._full and not self.closed:
                self._cond.wait(timeout)
            item, dropped, got = self._item, self._dropped, self._full
            self._item, self._dropped, self._full = None, 0, False
            return item, dropped, got


@dataclass
class FrameInfo:
    seq: int  # submit() counter of this frame
    submitted: float  # time.monotonic() at submit
    dropped: int  # frames overwritten since the previous caption
    latency_ms: float = 0.0  # submit -> caption done (includes waiting for the engine)


class LatestFrameCaptioner:
    """Captions the newest submitted frame on a worker thread and calls `on_caption`."""

    def __init__(self, session: Session, on_caption: Callable[[CaptionResult, FrameInfo], None], *,
                 prompt: Optional[str] = None, vhr: Optional[VhrConfig] = None,
                 gen: Optional[GenerationConfig] = None,
                 on_error: Optional[Callable[[Exception, FrameInfo], None]] = None):
        from . import DEFAULT_PROMPT

        self.session, self.on_caption, self.on_error = session, on_caption, on_error
        self.prompt = prompt or DEFAULT_PROMPT
        self.vhr, self.gen = vhr or VhrConfig(), gen or GenerationConfig(n_predict=64)
        self._slot: LatestSlot[tuple[Any, int, float]] = LatestSlot()
        self._seq = 0
        self.captioned = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="vhr-edge-captioner", daemon=True)
        self._thread.start()

    def submit(self, frame: Any) -> None:
        """Hand over a frame (numpy array, PIL image, path or bytes). Never blocks."""
        self._seq += 1
        self._slot.put((frame, self._seq, time.monotonic()))

    def _run(self) -> None:
        while True:
            item, dropped, got = self._slot.take()
            if not got:
                if self._slot.closed:
                    return
                continue
            frame, seq, t_submit = item
            self.dropped += dropped
            info = FrameInfo(seq=seq, submitted=t_submit, dropped=dropped)
            try:
                r = self.session.caption(frame, self.prompt, vhr=self.vhr, gen=self.gen)
            except (ImageError, VhrEdgeError) as e:  # a bad frame never stops the loop
                info.latency_ms = (time.monotonic() - t_submit) * 1000.0
                if self.on_error:
                    self.on_error(e, info)
                continue
            info.latency_ms = (time.monotonic() - t_submit) * 1000.0
            self.captioned += 1
            self.on_caption(r, info)

    def close(self, timeout: float = 60.0) -> None:
        """Finish the frame in progress (and one waiting), then stop the worker."""
        self._slot.close()
        self._thread.join(timeout)


def image_msg_to_array(encoding: str, height: int, width: int, step: int, data: bytes,
                       is_bigendian: bool = False) -> np.ndarray:
    """A sensor_msgs/Image's fields -> HxWx3 uint8 RGB (rgb8, bgr8, rgba8, bgra8, mono8, mono16)."""
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 1}
    if encoding not in channels:
        raise ImageError(f"unsupported image encoding {encoding!r} (use rgb8, bgr8, rgba8, bgra8, mono8 or mono16)")
    bpp = channels[encoding] * (2 if encoding == "mono16" else 1)
    if height <= 0 or width <= 0 or step < width * bpp or len(data) < step * height:
        raise ImageError(f"image message is inconsistent: {width}x{height}, step {step}, {len(data)} bytes")
    rows = np.frombuffer(data, np.uint8, count=step * height).reshape(height, step)[:, : width * bpp]
    if encoding == "mono16":
        a = rows.copy().view(">u2" if is_bigendian else "<u2").reshape(height, width)
        return np.repeat((a >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    a = rows.reshape(height, width, channels[encoding])
    if encoding == "mono8":
        return np.repeat(a, 3, axis=2)
    if encoding.startswith("bgr"):
        a = a[:, :, [2, 1, 0]]
    return np.ascontiguousarray(a[:, :, :3])
