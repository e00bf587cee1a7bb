"""Owns: the engine's sandbox and container records and the sandbox state machine.

The state machine follows iSulad's `Sandbox` class (wire-contracts §3.3): UNKNOWN → RUNNING on a
successful controller Start; the asynchronous Wait reports PENDING (backend unreachable),
RUNNING again (reachable) or STOPPED (exited); STOPPED and REMOVING ignore those callbacks;
REMOVING refuses Start, Stop and a second Remove.  CRI READY iff RUNNING.

Records are plain dataclasses that round-trip through JSON (`to_json`/`from_json`) so the store
can persist them and the manager can recover them after a restart.
"""
from __future__ import annotations

import asyncio
import base64
import enum
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class SandboxState(enum.IntEnum):
    UNKNOWN = 0
    RUNNING = 1
    PENDING = 2
    STOPPED = 3
    REMOVING = 4


class ContainerState(enum.IntEnum):
    # Same numbers as CRI runtime.v1.ContainerState.
    CREATED = 0
    RUNNING = 1
    EXITED = 2
    UNKNOWN = 3


class StateError(Exception):
    """A lifecycle operation is not allowed in the sandbox's current state."""


def now_ns() -> int:
    return time.time_ns()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii")) if text else b""


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    # Unknown keys are dropped so state written by a newer engine still loads.
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class SandboxMeta:
    """What a sandbox is; written once at creation (iSulad's sandbox_metadata.json)."""

    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    runtime_handler: str
    controller: str  # "shim" | "sandboxer"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    config_b64: str = ""  # binary runtime.v1.PodSandboxConfig

    @property
    def config_bytes(self) -> bytes:
        return _unb64(self.config_b64)

    @staticmethod
    def encode_config(data: bytes) -> str:
        return _b64(data)

    def name_key(self) -> tuple[str, str, str, int]:
        return (self.name, self.namespace, self.uid, self.attempt)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SandboxMeta":
        return _from_dict(cls, data)


@dataclass
class SandboxStatusRec:
    """How a sandbox is; rewritten on every persisted transition (sandbox_state.json)."""

    state: int = SandboxState.UNKNOWN
    pid: int = -1
    created_at: int = 1  # ns, like iSulad's constructor value; set by Start
    exited_at: int = 0
    updated_at: int = 0
    exit_status: int = 0
    task_address: str = ""
    version: int = 0
    # Controller-owned facts (shim address and pid, bundle path, ...).
    backend: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SandboxStatusRec":
        return _from_dict(cls, data)


@dataclass
class Container:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    image: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    state: int = ContainerState.CREATED
    pid: int = 0
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    bundle: str = ""
    config_b64: str = ""  # binary runtime.v1.ContainerConfig

    @property
    def config_bytes(self) -> bytes:
        return _unb64(self.config_b64)

    def mark_exited(self, exit_code: int, finished_at: int | None = None,
                    reason: str = "") -> None:
        if self.state == ContainerState.EXITED:
            return
        self.state = ContainerState.EXITED
        self.exit_code = int(exit_code)
        self.finished_at = finished_at or now_ns()
        self.reason = reason or ("Completed" if exit_code == 0 else "Error")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Container":
        return _from_dict(cls, data)


class Sandbox:
    """One pod sandbox: metadata, status, its containers and the lifecycle lock."""

    def __init__(self, meta: SandboxMeta, status: SandboxStatusRec | None = None) -> None:
        self.meta = meta
        self.status = status or SandboxStatusRec()
        self.containers: dict[str, Container] = {}
        # Serialises lifecycle operations (start/stop/remove, container ops) of this pod.
        self.lock = asyncio.Lock()
        # Background waiters (sandbox Wait, container Waits) to cancel on remove / engine exit.
        self.tasks: set[asyncio.Task[Any]] = set()
        # Set whenever the state changes so Stop can await the exit the Wait reports.
        self._changed = asyncio.Event()

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def state(self) -> SandboxState:
        return SandboxState(self.status.state)

    @property
    def ready(self) -> bool:
        return self.state == SandboxState.RUNNING

    def _set(self, state: SandboxState) -> None:
        self.status.state = int(state)
        self.status.updated_at = now_ns()
        self._changed.set()
        self._changed = asyncio.Event()

    # -- transitions (the callbacks return True when they changed the state) -------------
    def on_started(self, pid: int, created_at: int, task_address: str, version: int) -> None:
        if self.state == SandboxState.REMOVING:
            raise StateError(f"sandbox {self.id} is being removed; cannot start it")
        self.status.pid = pid
        self.status.created_at = created_at or now_ns()
        self.status.task_address = task_address
        self.status.version = version
        self._set(SandboxState.RUNNING)

    def on_pending(self) -> bool:
        if self.state in (SandboxState.STOPPED, SandboxState.REMOVING, SandboxState.PENDING):
            return False
        self._set(SandboxState.PENDING)
        return True

    def on_ready(self) -> bool:
        if self.state in (SandboxState.STOPPED, SandboxState.REMOVING, SandboxState.RUNNING):
            return False
        self._set(SandboxState.RUNNING)
        return True

    def on_exit(self, exit_status: int, exited_at: int | None = None) -> bool:
        if self.state in (SandboxState.STOPPED, SandboxState.REMOVING):
            return False
        self.status.exit_status = int(exit_status)
        self.status.exited_at = exited_at or now_ns()
        self.status.pid = 0
        self._set(SandboxState.STOPPED)
        return True

    def check_can_stop(self) -> None:
        if self.state == SandboxState.REMOVING:
            raise StateError(f"sandbox {self.id} is being removed")

    def begin_remove(self) -> SandboxState:
        """Enter REMOVING; returns the previous state for `revert_remove`."""
        prev = self.state
        if prev == SandboxState.REMOVING:
            raise StateError(f"sandbox {self.id} is already being removed")
        self._set(SandboxState.REMOVING)
        return prev

    def revert_remove(self, prev: SandboxState) -> None:
        if self.state == SandboxState.REMOVING:
            self._set(prev)

    async def wait_state(self, states: tuple[SandboxState, ...], timeout: float) -> bool:
        """Wait until the state is one of `states` (True) or `timeout` passes (False)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.state not in states:
            left = end - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return self.state in states
        return True

    def spawn(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Own a background task (cancelled on remove and engine exit)."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def cancel_tasks(self) -> None:
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
