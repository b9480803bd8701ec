"""The worker side of `cluster`: what runs inside each Ray actor (and nothing of the driver).

- `CaptionWorker`: one Session for one model pair, loaded once; `caption(image, prompt, vhr,
  gen)` returns {"text", "timings", "stop_reason", "rss_mb"} or {"error"} for a VhrEdgeError.
  An image is a testbed tuple ("testbed", split, seed, index, size), rendered here from the seed,
  a path on this node, or bytes (a shipped image, resolved from the object store by Ray).
- `place_file`: a shipped model file (`ShippedFile`: pieces in the object store + sha256),
  written once per node into the cache under a file lock, checked, then renamed into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .errors import ModelError, VhrEdgeError

CHUNK = 64 << 20  # bytes per object-store piece of a shipped model file

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- on the workers ---------------------------------------------------------------------


@dataclass
class ShippedFile:
    """A model file in the object store: pieces of CHUNK bytes, with the whole file's sha256."""

    name: str
    sha256: str
    size: int
    chunks: list  # ObjectRefs


def place_file(f: ShippedFile, cache_dir: str) -> tuple[str, bool]:
    """(path of f on this node, whether this call wrote it). One writer per node (flock); the
    bytes are checked against the sha256 before the file is renamed into place."""
    import ray

    d = Path(cache_dir) / f.sha256[:16]
    d.mkdir(parents=True, exist_ok=True)
    final = d / f.name
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file() and final.stat().st_size == f.size:
            return str(final), False
        tmp = d / f"{f.name}.part{os.getpid()}"
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for ref in f.chunks:
                piece = ray.get(ref)
                h.update(piece)
                out.write(piece)
                del piece
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != f.sha256:
            tmp.unlink()
            raise ModelError(f"{f.name}: sha256 of the copy on this node is {h.hexdigest()}, not {f.sha256}")
        os.replace(tmp, final)
        return str(final), True


class CaptionWorker:
    """The state of one Ray actor: one Session for one model pair (see Pool)."""

    def __init__(self, model, mmproj, session_kw: dict, cache_dir: str):
        import ray

        self.node = ray.util.get_node_ip_address()
        self.placed: list[str] = []
        self.error: Optional[str] = None
        self.session = None
        try:
            model, mmproj = self._local(model, cache_dir), self._local(mmproj, cache_dir)
            from .session import Session

            self.session = Session(model, mmproj, **session_kw)
        except VhrEdgeError as e:
            self.error = f"{e} (on node {self.node})"

    def _local(self, f, cache_dir: str) -> str:
        if isinstance(f, ShippedFile):
            path, placed = place_file(f, cache_dir)
            if placed:
                self.placed.append(f.name)
            return path
        if not os.path.isfile(f):
            raise ModelError(f"model file not found: {f}; put it at the same path on every node, or give --ship-models")
        return f

    def info(self) -> dict:
        from . import __version__

        s = self.session
        out = {"error": self.error, "node": self.node, "pid": os.getpid(), "version": __version__,
               "placed": self.placed}
        if s is not None:
            out.update(n_layer=s.n_layer, n_head=s.n_head, prompt_template=s.prompt_template,
                       model_path=s.model_path, mmproj_path=s.mmproj_path)
        return out

    def caption(self, image, prompt: str, vhr, gen) -> dict:
        try:
            if isinstance(image, tuple) and image and image[0] == "testbed":
                from .eval.data import testbed_image

                image = testbed_image(*image[1:])
            r = self.session.caption(image, prompt, vhr=vhr, gen=gen)
        except VhrEdgeError as e:
            return {"error": str(e)}
        return {"text": r.text, "timings": asdict(r.timings), "stop_reason": r.stop_reason, "rss_mb": peak_rss_mb()}
