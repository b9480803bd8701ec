"""Ray plumbing for `--ray ADDRESS` (`eval chair|pope`, `compare`, `calibrate`).

Work units (model file, VHR setting, image) go to Ray actors; the driver writes every result
itself (`eval.run`: the resumable JSONL, the progress bar, the summary), exactly as a local run.

- `add_args(parser)`: --ray, --workers, --ship-images, --ship-models, --max-tries.
- `open_runner(args)`: a `Pool` with --ray, else a local Session; `eval.run.captioner_for`
  and `answerer_for` take either.
- A `Pool` holds `cluster_worker.CaptionWorker` actors for one model pair. Each loads one Session once
  (-t threads; Ray reserves as many CPUs) and keeps it for every unit of every setting.
  `pool.captioner(prompt, vhr, gen)` / `pool.answerer(vhr, gen, suffix)` have
  `map_unordered(units)`: each idle actor gets a unit, `ray.wait` returns the first that
  finishes, and (index, result) is yielded at once. A unit whose actor died (killed, OOM, node
  lost) or whose caption raised goes back in the queue for the next idle actor (a different one
  when there is a choice; a dead actor is replaced by a new one); after --max-tries tries it is
  yielded as `eval.run.Failed` (the driver writes a failed row; the next start retries it).
- Images: testbed scenes are rendered by the workers from (split, seed, index, size); image
  files are read by the workers at the same absolute path (a shared file system) or, with
  --ship-images, sent once each as bytes through the object store.
- Models: the same absolute path on every node, or --ship-models: the driver puts each file in
  the object store (64 MiB chunks) with its sha256; the first actor on a node writes it to the
  node's cache ($VHR_EDGE_MODEL_CACHE on the driver, else <tmp>/vhr-edge-models) under a file
  lock, checks the sha256 and renames it into place; later actors on that node reuse it.
Ray is the optional extra `cluster` (pip install 'vhr-edge[cluster]'); this module imports it
only when --ray is given.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .cluster_worker import CHUNK, CaptionWorker, ShippedFile
from .errors import ConfigError, ImageError, ModelError, VhrEdgeError

EXTRA = "cluster"
DEFAULT_THREADS = 4  # -t per actor under --ray when -t is not given (capped at the largest node)
DEFAULT_TRIES = 3
DEFAULT_START_TIMEOUT_S = 600.0  # for a worker to start while no other one is running


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, the optional extra '{EXTRA}': pip install 'vhr-edge[{EXTRA}]'") from None
    return ray


def add_args(p) -> None:
    g = p.add_argument_group(f"cluster (Ray; pip install 'vhr-edge[{EXTRA}]')")
    g.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the work on the Ray cluster at ADDRESS (HOST:PORT, or auto: $RAY_ADDRESS or the "
                        "cluster started on this machine); default: here, in this process")
    g.add_argument("--workers", type=int, default=0,
                   help="Ray actors, each holding one loaded model with -t threads (default: as many as the "
                        "cluster's CPUs allow)")
    g.add_argument("--ship-images", action="store_true",
                   help="send image files through Ray's object store (default: workers read the same paths)")
    g.add_argument("--ship-models", action="store_true",
                   help="copy the model files to each node once, sha256 checked (default: the same path on every node)")
    g.add_argument("--max-tries", type=int, default=DEFAULT_TRIES,
                   help=f"tries per unit before it is written as a failed row ({DEFAULT_TRIES})")
    g.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S, metavar="S",
                   help="seconds to wait for a worker to start while no other is running, e.g. when a lost "
                        "node leaves no room for its replacement; then the run stops, the finished units "
                        f"saved ({DEFAULT_START_TIMEOUT_S:g})")


def check_args(args) -> None:
    """Usage checks of the cluster flags (before anything is loaded or connected)."""
    if args.ray is None:
        if (args.workers or args.ship_images or args.ship_models or args.max_tries != DEFAULT_TRIES
                or args.start_timeout != DEFAULT_START_TIMEOUT_S):
            raise ConfigError("--workers, --ship-images, --ship-models, --max-tries and --start-timeout go with "
                              "--ray ADDRESS")
        return
    if not args.ray.strip():
        raise ConfigError("--ray needs an address: HOST:PORT, or auto")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.max_tries < 1:
        raise ConfigError(f"--max-tries must be >= 1, got {args.max_tries}")
    if not args.start_timeout > 0:
        raise ConfigError(f"--start-timeout must be > 0 seconds, got {args.start_timeout:g}")
    import_ray()  # a missing extra is reported before any model is looked at


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT that nothing answers on fails now (ray.init would wait for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # auto, ray://..., or something only Ray understands
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {e.strerror or e}") from None


def connect(address: str):
    """ray, connected to the cluster at `address` (once per process)."""
    ray = import_ray()
    if not ray.is_initialized():
        _reachable(address)
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as e:  # ConnectionError, RuntimeError, ValueError ... from ray.init
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"cannot connect to the Ray cluster at {address}: {msg}") from None
    return ray


def _put_file(ray, path: str) -> ShippedFile:
    h, chunks, size = hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        while piece := f.read(CHUNK):
            h.update(piece)
            chunks.append(ray.put(piece))
            size += len(piece)
    return ShippedFile(Path(path).name, h.hexdigest(), size, chunks)


def _err_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


class Pool:
    """Actors for one model pair; see the module doc. Also has the Session attributes that runs
    record (model_path, mmproj_path, n_layer, n_head, prompt_template)."""

    def __init__(self, model: str, mmproj: str, address: str, *, threads: int = 0, workers: int = 0,
                 session_kw: Optional[dict] = None, ship_models: bool = False, ship_images: bool = False,
                 max_tries: int = DEFAULT_TRIES, cache_dir: Optional[str] = None,
                 start_timeout: float = DEFAULT_START_TIMEOUT_S):
        self.ray = ray = connect(address)
        self.model_path, self.mmproj_path = model, mmproj
        self.ship_images, self.max_tries, self.start_timeout = ship_images, max_tries, start_timeout
        cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        biggest = max(cpus, default=0)
        if biggest < 1:
            raise ConfigError(f"the Ray cluster at {address} has no CPUs")
        self.threads = threads or min(DEFAULT_THREADS, biggest)
        if self.threads > biggest:
            raise ConfigError(f"-t {self.threads}: no node of the Ray cluster has that many CPUs (largest: {biggest})")
        fits = sum(c // self.threads for c in cpus)
        self.workers = workers or fits
        if self.workers > fits:
            print(f"vhr-edge: note: {self.workers} workers x {self.threads} threads; {fits} fit on the cluster now, "
                  "the others wait for CPUs", file=sys.stderr, flush=True)
        kw = dict(session_kw or {})
        kw["n_threads"] = self.threads
        if ship_models:
            files = [_put_file(ray, model), _put_file(ray, mmproj)]
        else:
            files = [os.path.abspath(model), os.path.abspath(mmproj)]
        cache = cache_dir or os.environ.get("VHR_EDGE_MODEL_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                                      "vhr-edge-models")
        opts = dict(num_cpus=self.threads, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
        if kw.get("n_gpu_layers"):
            opts["num_gpus"] = 1
        actor = ray.remote(CaptionWorker).options(**opts)
        self._new = lambda: actor.remote(*files, kw, cache)
        self._files = files  # the object-store pieces live as long as the pool
        self._handles: dict[int, Any] = {}
        self._starting: dict[Any, int] = {}  # ready ref -> actor id
        self._idle: deque[int] = deque()
        self._next_id = 0
        self._spares = self.workers * max_tries  # replacements for actors that die
        self.infos: dict[int, dict] = {}  # actor id -> info() of every actor that started
        self.lost = 0  # actors that died
        self.last_error = ""
        self.peak_rss_mb = 0.0
        self._images: dict[str, Any] = {}
        try:
            for _ in range(self.workers):
                self._spawn()
            while not self.infos:  # the first loaded model answers the questions about it
                if not self._starting:
                    raise VhrEdgeError(f"no Ray worker could start (last error: {self.last_error})")
                ready, _ = ray.wait(list(self._starting), num_returns=1, timeout=start_timeout)
                if not ready:
                    raise VhrEdgeError(f"no Ray worker started within {start_timeout:g} s (is there a node with "
                                       f"{self.threads} free CPUs?)")
                self._started(ready[0])
        except BaseException:
            self.close()
            raise
        first = next(iter(self.infos.values()))
        self.n_layer, self.n_head = first["n_layer"], first["n_head"]
        self.prompt_template = first["prompt_template"]

    # -- actors
    def _spawn(self) -> None:
        aid = self._next_id
        self._next_id += 1
        h = self._new()
        self._handles[aid] = h
        self._starting[h.info.remote()] = aid

    def _started(self, ref) -> None:
        from . import __version__

        aid = self._starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:  # e.g. vhr-edge not installed on that node
            self.last_error = _err_line(e)
            self._lost(aid)
            return
        if info["version"] != __version__:
            self.close()
            raise ConfigError(f"a Ray worker on {info['node']} runs vhr-edge {info['version']}, this is {__version__}; "
                              "install the same version on every node")
        if info["error"]:
            self.ray.kill(self._handles.pop(aid))
            if not self.infos and not self._starting:
                raise ModelError(info["error"])
            print(f"vhr-edge: note: a Ray worker failed to start: {info['error']}", file=sys.stderr, flush=True)
            return
        self.infos[aid] = info
        self._idle.append(aid)

    def _lost(self, aid: int) -> None:
        self._handles.pop(aid, None)
        self.lost += 1
        if self._spares > 0:
            self._spares -= 1
            self._spawn()

    # -- units
    def image_arg(self, item):
        """What a worker needs to get item's image: the testbed tuple, the path, or the bytes' ref."""
        p = item.portable
        if p is None:
            raise ConfigError("these images cannot be sent to Ray workers")
        if isinstance(p, tuple) or not self.ship_images:
            return p
        if p not in self._images:
            try:
                self._images[p] = self.ray.put(Path(p).read_bytes())
            except OSError as e:
                raise ImageError(f"cannot read {p}: {e.strerror or e}") from None
        return self._images[p]

    def map_unordered(self, units: Sequence[tuple], call: Callable) -> Iterator[tuple[int, Any]]:
        """(index, worker output or Failed) per unit, as they finish; call(handle, unit) -> ObjectRef."""
        from .eval.run import Failed

        ray = self.ray
        todo = deque(range(len(units)))
        tries = [0] * len(units)
        tried_on: list[set] = [set() for _ in units]
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (actor id, unit index)
        last_error = ""
        while todo or inflight:
            while todo and self._idle:
                i = todo.popleft()
                aid = next((a for a in self._idle if a not in tried_on[i]), self._idle[0])
                self._idle.remove(aid)
                inflight[call(self._handles[aid], units[i])] = (aid, i)
            if not inflight and not self._starting:
                raise VhrEdgeError(f"no Ray worker left for the last {len(todo)} units (last error: {last_error}); "
                                   "the finished ones are saved: run the same command again to continue")
            # with nothing running, only a worker that starts can go on: not forever
            ready, _ = ray.wait(list(inflight) + list(self._starting), num_returns=1,
                                timeout=None if inflight else self.start_timeout)
            if not ready:
                raise VhrEdgeError(f"no Ray worker started within {self.start_timeout:g} s for the last {len(todo)} "
                                   f"units (last error: {last_error or 'none'}); the finished ones are saved: run "
                                   "the same command again to continue")
            ref = ready[0]
            if ref in self._starting:
                self._started(ref)
                continue
            aid, i = inflight.pop(ref)
            tried_on[i].add(aid)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self._lost(aid)
                err = f"Ray worker lost ({type(e).__name__})"
                print(f"vhr-edge: note: a Ray worker was lost ({type(e).__name__}); its unit goes to another "
                      "worker", file=sys.stderr, flush=True)
            except ray.exceptions.RayTaskError as e:
                self._idle.append(aid)
                err = _err_line(e)
            else:
                self._idle.append(aid)
                if "error" not in out:
                    self.peak_rss_mb = max(self.peak_rss_mb, out.get("rss_mb", 0.0))
                    yield i, out
                    continue
                err = out["error"]
            last_error = err
            tries[i] += 1
            if tries[i] >= self.max_tries:
                yield i, Failed(err, tries[i])
            else:
                todo.append(i)

    def captioner(self, prompt: str, vhr, gen) -> "_Work":
        def result(out):
            t = dict(out["timings"])
            t["stop_reason"] = out["stop_reason"]
            return out["text"], t

        return _Work(self, lambda h, u: h.caption.remote(self.image_arg(u[0]), prompt, vhr, gen), result)

    def answerer(self, vhr, gen, suffix: str = "") -> "_Work":
        def ask(h, u):
            q = f"{u[1]} {suffix}".strip() if suffix else u[1]
            return h.caption.remote(self.image_arg(u[0]), q, vhr, gen)

        return _Work(self, ask, lambda out: (out["text"], dict(out["timings"])))

    def close(self) -> None:
        for h in list(self._handles.values()):
            try:
                self.ray.kill(h)
            except Exception:  # already gone
                pass
        self._handles.clear()
        self._starting.clear()
        self._idle.clear()
        self._images.clear()
        self._files = []

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Work:
    """A captioner / answerer on a Pool: `map_unordered` for eval.run, or called per unit."""

    def __init__(self, pool: Pool, call: Callable, result: Callable):
        self.pool, self.call, self.result = pool, call, result

    def map_unordered(self, units: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        from .eval.run import Failed

        for i, out in self.pool.map_unordered(units, self.call):
            yield i, out if isinstance(out, Failed) else self.result(out)

    def __call__(self, *unit):
        for _, r in self.map_unordered([unit]):
            return r


def open_pool(args, model: Optional[str] = None, mmproj: Optional[str] = None) -> Pool:
    """The Pool of the model and cluster flags (model/mmproj: instead of -m/--mmproj)."""
    from .flags import find_mmproj, resolve_models, session_kwargs

    kw = session_kwargs(args)
    threads = kw.pop("n_threads")  # per actor: the Pool decides (and reserves) it
    if model is None:
        model, mmproj = resolve_models(args)
    elif mmproj is None:
        mmproj = find_mmproj(model)
        if mmproj is None:
            raise ModelError(f"no --mmproj given and no single *mmproj*.gguf beside {model}")
    return Pool(model, mmproj, args.ray, threads=threads, workers=args.workers, session_kw=kw,
                ship_models=args.ship_models, ship_images=args.ship_images, max_tries=args.max_tries,
                start_timeout=args.start_timeout)


def open_runner(args):
    """A Pool on the Ray cluster of --ray, else a Session here (flags.open_session)."""
    if getattr(args, "ray", None):
        return open_pool(args)
    from .flags import open_session

    return open_session(args)
