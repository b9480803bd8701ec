"""Streaming: time to the first words against the whole reply, and what the callback costs
(issue 17; printed, not asserted).

    python bench/stream_latency.py [-m MODEL.gguf --mmproj MMPROJ] [--runs 3] [--tokens 96] [-t 2]

Default model: the bundled testbed (models/testbed-f16.gguf). For each run, interleaved:
  1. the Python API: caption() with and without on_token (decode tokens/s ratio; goal ~1.0)
  2. vhr-edge serve through the official `openai` client: time to the first content chunk and
     to the last one, streamed, against the same request not streamed
The last line is one JSON object {"first_chunk_ms", "stream_total_ms", "whole_ms",
"first_over_whole", "callback_decode_ratio"} (medians).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=str(ROOT / "models" / "testbed-f16.gguf"))
    ap.add_argument("--mmproj", default=str(ROOT / "models" / "testbed-mmproj-f16.gguf"))
    ap.add_argument("--image", default=str(ROOT / "examples" / "fork_without_knife.png"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()

    import openai
    from PIL import Image

    from vhr_edge import Session
    from vhr_edge.serve import make_server

    s = Session(a.model, a.mmproj, n_threads=a.threads)
    buf = io.BytesIO()
    Image.open(a.image).convert("RGB").save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    srv, service = make_server(s, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    s.caption(a.image, n_predict=8)  # warm-up
    rows = []
    for _ in range(a.runs):
        plain = s.caption(a.image, n_predict=a.tokens, ignore_eos=True)
        cb = s.caption(a.image, n_predict=a.tokens, ignore_eos=True, on_token=lambda t, p: True)
        t0 = time.perf_counter()
        whole = client.chat.completions.create(model="x", messages=msgs, max_tokens=a.tokens)
        whole_ms = (time.perf_counter() - t0) * 1000
        t0, first = time.perf_counter(), None
        text = []
        for ch in client.chat.completions.create(model="x", messages=msgs, max_tokens=a.tokens, stream=True):
            piece = ch.choices[0].delta.content if ch.choices else None
            if piece and first is None:
                first = (time.perf_counter() - t0) * 1000
            text.append(piece or "")
        total = (time.perf_counter() - t0) * 1000
        same = "".join(text) == whole.choices[0].message.content
        rows.append(dict(first=first, total=total, whole=whole_ms, same=same,
                         ratio=cb.timings.tokens_per_s / plain.timings.tokens_per_s,
                         n=whole.usage.completion_tokens))
        print(f"first chunk {first:7.0f} ms | streamed {total:7.0f} ms | not streamed {whole_ms:7.0f} ms | "
              f"{rows[-1]['n']} tokens | same text {same} | decode with/without on_token {rows[-1]['ratio']:.3f}")
    srv.shutdown()
    service.stop()
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    print(json.dumps({"first_chunk_ms": round(med("first"), 1), "stream_total_ms": round(med("total"), 1),
                      "whole_ms": round(med("whole"), 1), "first_over_whole": round(med("first") / med("whole"), 3),
                      "callback_decode_ratio": round(med("ratio"), 3)}))


if __name__ == "__main__":
    main()
