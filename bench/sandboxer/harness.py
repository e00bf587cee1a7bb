"""Owns: running a sandboxer as a child process for tests and measurements (start, kill -9,
restart, and a teardown that leaves nothing behind).

Teardown is layered so a failing test still cleans up: SIGTERM the running sandboxer, then
start one more with `--cleanup-on-exit` on the same dir and SIGTERM it (it recovers and tears
down every sandbox it finds), then unmount/remove whatever is left under the dir.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import REGISTRY, find_processes, mounts_below, remove_tree, stop_popen

START_TIMEOUT_S = 300.0  # the vm backend may make its template snapshot first


@dataclass
class SandboxerProcess:
    schema: str
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sbx", dir="/tmp")))
    trace_dir: str = ""
    proc: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()  # more flags, e.g. ("--backend", "vm")

    @property
    def sock(self) -> str:
        return str(self.base / "ctl.sock")

    @property
    def dir(self) -> Path:
        return self.base / "d"

    @property
    def target(self) -> str:
        return f"unix://{self.sock}"

    def argv(self, cleanup: bool = False) -> list[str]:
        a = [sys.executable, "-m", "bench.sandboxer.server", "--listen", self.sock,
             "--dir", str(self.dir), "--schema", self.schema, "--log-level", "WARNING"]
        if self.trace_dir:
            a += ["--trace-dir", self.trace_dir]
        if cleanup:
            a.append("--cleanup-on-exit")
        return a + list(self.extra)

    def start(self, cleanup: bool = False) -> "SandboxerProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(self.argv(cleanup), cwd=root, env=env)
        REGISTRY.register(self.proc.pid, "sandboxer", self.schema)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxer exited with {self.proc.returncode} at start")
            if time.monotonic() > deadline:
                raise TimeoutError("sandboxer did not create its socket")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        p, self.proc = self.proc, None
        return None if p is None else stop_popen(p, sig, timeout)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def teardown(self) -> None:
        """Leave nothing: sandboxes, mounts, processes, sockets, the temp dir."""
        self.stop()
        if self.dir.exists() and any(self.dir.iterdir()):
            try:
                self.start(cleanup=True)
                self.stop()
            except Exception:
                self.stop(signal.SIGKILL)
        for p in find_processes(under=str(self.base)):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if mounts_below(self.base) or self.base.exists():
            remove_tree(self.base)

    def leftovers(self) -> dict[str, list[str]]:
        """What is still there under our dir (empty lists = clean)."""
        files = []
        if self.dir.exists():
            files = [str(p) for p in self.dir.rglob("*")]
        return {
            "mounts": mounts_below(self.base),
            "files": files,
            "processes": [f"{p.pid} {' '.join(p.cmdline)}"
                          for p in find_processes(under=str(self.base))],
        }
