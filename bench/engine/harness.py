"""Owns: running an engine as a child process for tests and measurements (config file, start,
SIGTERM/SIGKILL, restart, and a teardown that leaves no pod behind).

    eng = EngineProcess(base=tmp_path, runtimes={"shim": {"controller": "shim"}})
    eng.start()            # returns once the CRI socket answers Version
    ...                    # talk CRI to eng.target
    eng.teardown()         # SIGTERM, then `engine --teardown` on the same state, then rm

Teardown is layered so a failing test still cleans up: stop the running engine, run one more
with `--teardown` (it recovers every pod from the state dir and stops/removes it), then remove
the directory (unmounting anything left below it).
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.processes import REGISTRY, find_processes, mounts_below, remove_tree, stop_popen
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.schemas import CriStub

START_TIMEOUT_S = 60.0


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(top: dict[str, Any], runtimes: dict[str, dict[str, Any]]) -> str:
    """The engine TOML for `top`-level keys and `[runtimes.NAME]` tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in runtimes.items():
        lines.append(f"\n[runtimes.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@dataclass
class EngineProcess:
    base: Path
    runtimes: dict[str, dict[str, Any]]
    default_runtime: str = ""
    trace_dir: str = ""
    namespace: str = field(default_factory=lambda: "cbt" + secrets.token_hex(4))
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _channels: list[grpc.Channel] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.base = Path(self.base)
        self.base.mkdir(parents=True, exist_ok=True)

    @property
    def sock(self) -> str:
        return str(self.base / "engine.sock")

    @property
    def target(self) -> str:
        return f"unix:{self.sock}"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def config_path(self) -> Path:
        return self.base / "engine.toml"

    @property
    def log_path(self) -> Path:
        return self.base / "engine.log"

    def write_config(self) -> Path:
        top: dict[str, Any] = {"listen": self.sock, "state_dir": str(self.state_dir),
                               "namespace": self.namespace}
        if self.trace_dir:
            top["trace_dir"] = self.trace_dir
        if self.default_runtime:
            top["default_runtime"] = self.default_runtime
        top.update(self.extra)
        self.config_path.write_text(render_config(top, self.runtimes))
        return self.config_path

    def argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "bench.engine.server", "--config", str(self.config_path),
                *extra]

    def _env(self) -> dict[str, str]:
        root = str(Path(__file__).resolve().parents[2])
        return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(self) -> "EngineProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.write_config()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=self._env())
        finally:
            log.close()
        REGISTRY.register(self.proc.pid, "engine", self.namespace)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode} at start:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not answer Version:\n" + self.log_tail())
            time.sleep(0.05)
        return self

    def client(self, version: str = "v1") -> "CriStub":
        """A blocking CRI stub on a fresh channel (closed with the engine's teardown)."""
        ch = grpc.insecure_channel(self.target)
        self._channels.append(ch)
        return CriStub(ch, version)

    def _answers(self) -> bool:
        if not os.path.exists(self.sock):
            return False
        with grpc.insecure_channel(self.target) as ch:
            try:
                CriStub(ch, "v1").Version(cri.VersionRequest(version="v1"), timeout=2)
                return True
            except grpc.RpcError:
                return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        p, self.proc = self.proc, None
        return None if p is None else stop_popen(p, sig, timeout)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def run_teardown(self, timeout: float = 120.0) -> int:
        """`engine --teardown`: recover and remove every pod of the state dir."""
        self.write_config()
        r = subprocess.run(self.argv("--teardown"), stdin=subprocess.DEVNULL,
                           capture_output=True, env=self._env(), timeout=timeout)
        if r.returncode != 0:
            with open(self.log_path, "ab") as fh:
                fh.write(r.stderr)
        return r.returncode

    def teardown(self) -> None:
        """Leave nothing: pods, shims, mounts, sockets, the state dir."""
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        self.stop()
        if self.state_dir.exists() and any((self.state_dir / "sandboxes").glob("*")):
            try:
                self.run_teardown()
            except subprocess.SubprocessError:
                pass
        for p in find_processes(under=str(self.state_dir)):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.state_dir.exists() or mounts_below(self.state_dir):
            remove_tree(self.state_dir)
        for s in (self.sock,):
            try:
                os.unlink(s)
            except FileNotFoundError:
                pass
