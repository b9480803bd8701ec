"""A robot's frame loop: numpy frames in at camera rate, a caption of the newest frame out.

    python examples/frame_loop.py -m MODEL.gguf --mmproj MMPROJ.gguf [--fps 15] [--seconds 10]

The "camera" here is synthetic (moving coloured blocks); swap `camera()` for your driver.
The captioner never blocks the camera: while a frame is being captioned, newer frames
overwrite each other and only the newest is captioned next (the rest count as dropped).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from vhr_edge import Session
from vhr_edge.robot import LatestFrameCaptioner
from vhr_edge.session import GenerationConfig, VhrConfig


def camera(fps: float, seconds: float, size: int = 224):
    """Yield HxWx3 uint8 frames at `fps` for `seconds` (a block drifting over noise)."""
    rng = np.random.default_rng(0)
    n = int(fps * seconds)
    for i in range(n):
        frame = (rng.random((size, size, 3)) * 40).astype(np.uint8)
        x = int((i * 4) % (size - 48))
        frame[80:128, x : x + 48] = (200, 40, 40)
        yield frame
        time.sleep(1.0 / fps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--mmproj", required=True)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("-n", type=int, default=48, help="max tokens per caption")
    p.add_argument("--no-vhr", action="store_true")
    a = p.parse_args()

    session = Session(a.model, a.mmproj)

    def publish(result, info):
        print(json.dumps({"frame": info.seq, "caption": result.text, "latency_ms": round(info.latency_ms, 1),
                          "dropped": info.dropped, "heads": result.vhr.selected_heads}), flush=True)

    captioner = LatestFrameCaptioner(session, publish, vhr=VhrConfig(enabled=not a.no_vhr),
                                     gen=GenerationConfig(n_predict=a.n))
    for frame in camera(a.fps, a.seconds):
        captioner.submit(frame)
    captioner.close()
    print(f"captioned {captioner.captioned} frames, dropped {captioner.dropped} stale ones")


if __name__ == "__main__":
    main()
