"""`vhr-edge watch DIR|-`: caption the newest frame as it appears; stale frames are dropped.

DIR: image files written into a folder (by a camera, ffmpeg ...); each tick captions the
newest file not yet seen and counts the newer-than-last but older-than-newest ones as dropped.
`-`: JSON lines on stdin, each {"path": "..."} or a plain path; a reader thread keeps only
the latest line, so a burst costs one caption.

Output: one JSON line per caption {"ts", "image", "text", "latency_ms", "dropped", "vhr",
"timings"} (or {"ts", "image", "error"}), each written whole and flushed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

from .errors import ImageError
from .robot import LatestSlot
from .session import CaptionResult, GenerationConfig, Session, VhrConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_stdin_line(line: str) -> Optional[str]:
    line = line.strip()
    if not line:
        return None
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return None
        p = obj.get("path") if isinstance(obj, dict) else None
        return p if isinstance(p, str) and p else None
    return line


def stdin_frames(stream: TextIO, stop: threading.Event) -> Iterator[tuple[str, int]]:
    slot: LatestSlot[str] = LatestSlot()

    def reader():
        for line in stream:
            path = parse_stdin_line(line)
            if path is not None:  # blank or unreadable lines are skipped
                slot.put(path)
        slot.close()

    threading.Thread(target=reader, daemon=True, name="vhr-edge-stdin").start()
    while not stop.is_set():
        item, dropped, got = slot.take(timeout=0.2)
        if got:
            yield item, dropped
        elif slot.closed:
            return


def dir_frames(folder: Path, stop: threading.Event, poll_s: float = 0.05) -> Iterator[tuple[str, int]]:
    """Newest image file in `folder` each time one newer than the last appears."""
    last_mtime, last_name = -1.0, ""
    while not stop.is_set():
        newer = []
        try:
            entries = list(os.scandir(folder))
        except OSError:
            entries = []
        for e in entries:
            if not e.is_file() or Path(e.name).suffix.lower() not in IMAGE_SUFFIXES or e.name.startswith("."):
                continue
            try:
                st = e.stat()
            except OSError:  # removed meanwhile
                continue
            if (st.st_mtime, e.name) > (last_mtime, last_name):
                newer.append((st.st_mtime, e.name))
        if newer:
            newer.sort()
            last_mtime, last_name = newer[-1]
            yield str(folder / last_name), len(newer) - 1
        else:
            stop.wait(poll_s)


def watch(session: Session, frames: Iterator[tuple[str, int]], out: TextIO, *, prompt: str, vhr: VhrConfig,
          gen: GenerationConfig, hz: float = 0.0, max_frames: int = 0, stop: Optional[threading.Event] = None,
          on_result: Optional[Callable[[CaptionResult], None]] = None) -> int:
    """Caption frames until they end, `max_frames` are done or `stop` is set. Returns the count."""
    stop = stop or threading.Event()
    min_interval = 1.0 / hz if hz > 0 else 0.0
    done, last_start = 0, 0.0
    for path, dropped in frames:
        if stop.is_set():
            break
        wait = last_start + min_interval - time.monotonic()
        if wait > 0 and stop.wait(wait):
            break
        last_start = time.monotonic()
        try:
            r = session.caption(path, prompt, vhr=vhr, gen=gen)
            rec = {"ts": now_iso(), "image": path, "text": r.text,
                   "latency_ms": round((time.monotonic() - last_start) * 1000.0, 2), "dropped": dropped}
            j = r.to_json(include_matrices=False)
            rec.update(vhr=j["vhr"], timings=j["timings"])
            if on_result:
                on_result(r)
        except ImageError as e:
            rec = {"ts": now_iso(), "image": path, "error": str(e), "dropped": dropped}
        out.write(json.dumps(rec) + "\n")  # one write per line: never half a record
        out.flush()
        done += 1
        if max_frames and done >= max_frames:
            break
    return done


def frames_for(source: str, stop: threading.Event) -> Iterator[tuple[str, int]]:
    if source == "-":
        return stdin_frames(sys.stdin, stop)
    folder = Path(source)
    if not folder.is_dir():
        from .errors import ConfigError

        raise ConfigError(f"watch needs a folder or '-', got {source}")
    return dir_frames(folder, stop)
