"""A throwaway local Ray cluster for the tests: `ray start --head --block` on 127.0.0.1 with
its own temp dir and free ports, stopped by killing exactly the processes it started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class LocalCluster:
    def __init__(self, num_cpus: int = 2, timeout: float = 180.0):
        self.dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths must fit
        port = free_port()
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
               "--num-cpus", str(num_cpus), "--temp-dir", self.dir, "--include-dashboard", "false",
               "--dashboard-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--disable-usage-stats", "--object-store-memory", str(100 << 20)]
        self.log = Path(self.dir) / "start.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VHR_EDGE_"))}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)
        self.address = f"127.0.0.1:{port}"
        deadline = time.time() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                text = self.log.read_text()
                self.stop()
                raise RuntimeError(f"ray start failed:\n{text[-3000:]}")
            time.sleep(0.2)

    def descendants(self) -> list[int]:
        kids, out, todo = _children(), [], [self.proc.pid]
        while todo:
            p = todo.pop()
            for c in kids.get(p, []):
                out.append(c)
                todo.append(c)
        return out

    def actors(self, name: str = "CaptionWorker") -> list[int]:
        """Pids of the cluster's actor processes of class `name` (Ray titles them ray::NAME...)."""
        return [p for p in self.descendants() if cmdline(p).startswith(f"ray::{name}")]

    def stop(self) -> None:
        pids = self.descendants()  # before the kill: orphaned workers are no longer found under it
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in pids:  # workers run in process groups of their own
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
