"""Owns: the Controller interface between the engine and a sandbox backend, and call deadlines.

Shape follows iSulad's `Controller` (wire-contracts §3.1): Create / Start / Platform / Stop /
Wait (asynchronous, reporting through a callback) / Status / Shutdown, plus the container calls
that both chains route over the pod's Task API (a shim, or the sandboxer's task address).
Every backend call is bounded by `call_timeout()`: the smaller of the configured per-call
timeout and what is left of the CRI caller's deadline, so a dead or hung backend turns into a
clean UNAVAILABLE / DEADLINE_EXCEEDED instead of a hang.
"""
from __future__ import annotations

import abc
import asyncio
import contextvars
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from bench.engine.errors import EngineError
from bench.engine.sandbox import Container, Sandbox

# loop.time() by which the current CRI call must have answered (None = no client deadline).
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
# Leave this much of the client's deadline for building and sending the reply.
_REPLY_MARGIN_S = 0.05


def detached(coro: Any) -> asyncio.Task[Any]:
    """Run `coro` as a task outside the current CRI call's deadline: background watchers and
    rollbacks must not inherit a deadline that has passed (or soon will)."""
    ctx = contextvars.copy_context()
    ctx.run(DEADLINE.set, None)
    return asyncio.get_running_loop().create_task(coro, context=ctx)


def call_timeout(default: float) -> float:
    """Timeout for one backend call made on behalf of the current CRI call."""
    deadline = DEADLINE.get()
    if deadline is None:
        return default
    left = deadline - asyncio.get_running_loop().time() - _REPLY_MARGIN_S
    if left <= 0:
        raise EngineError(grpc.StatusCode.DEADLINE_EXCEEDED, "the client's deadline has passed")
    return min(default, left)


@dataclass
class StartInfo:
    """Result of a controller Start (iSulad ControllerSandboxInfo)."""

    pid: int
    created_at: int  # ns
    task_address: str = ""
    version: int = 2
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ExitInfo:
    exit_status: int
    exited_at: int  # ns; 0 = unknown


@dataclass
class ContainerRun:
    """What a backend needs to create a container of a pod."""

    container: Container
    spec: dict[str, Any]  # OCI runtime spec (root.path already set)
    rootfs: list[dict[str, Any]] = field(default_factory=list)  # extra mounts {type,source,target,options}


class StatusCallback(Protocol):
    """How a controller's Wait reports (iSulad SandboxStatusCallback)."""

    def on_ready(self) -> None: ...
    def on_pending(self) -> None: ...
    def on_exit(self, info: ExitInfo) -> None: ...


class Controller(abc.ABC):
    """A sandbox backend.  `call` arguments name the CRI call (for spans)."""

    kind: str = ""

    async def init(self) -> None:
        """Connect to long-lived backends; called once at engine start."""

    async def close(self) -> None:
        """Engine exit: drop connections and background calls; leave pods running."""

    # -- pod sandbox --------------------------------------------------------------------
    async def prepare(self, sb: Sandbox, call: str) -> None:
        """Engine-side preparation (dirs, bundles); runs inside the engine.prepare span."""

    @abc.abstractmethod
    async def create(self, sb: Sandbox, call: str) -> None: ...

    @abc.abstractmethod
    async def start(self, sb: Sandbox, call: str) -> StartInfo: ...

    @abc.abstractmethod
    async def wait(self, sb: Sandbox, cb: StatusCallback) -> None:
        """Run until the sandbox exits (cb.on_exit) or the task is cancelled; report
        reachability changes with cb.on_pending / cb.on_ready.  Started in the background."""

    @abc.abstractmethod
    async def stop(self, sb: Sandbox, timeout_s: float, call: str) -> ExitInfo | None:
        """Stop the sandbox; returns the exit when the backend knows it at once."""

    @abc.abstractmethod
    async def status(self, sb: Sandbox) -> str:
        """"SANDBOX_READY" or "SANDBOX_NOTREADY" as the backend sees it now."""

    @abc.abstractmethod
    async def shutdown(self, sb: Sandbox, call: str) -> None:
        """Delete every backend resource of the sandbox; idempotent."""

    async def recover(self, sb: Sandbox) -> bool:
        """After an engine restart: reattach to the sandbox; True if it is alive.  Raise
        EngineError(UNAVAILABLE) when the backend itself is unreachable for now: the sandbox
        then waits in PENDING instead of being declared dead."""
        return await self.status(sb) == "SANDBOX_READY"

    # -- containers of the pod ---------------------------------------------------------
    @abc.abstractmethod
    async def build_container(self, sb: Sandbox, ctr: Container, config: Any) -> ContainerRun:
        """The OCI spec (and mounts) of a new container from its CRI ContainerConfig; runs in
        the engine.prepare span.  Raise EngineError(INVALID_ARGUMENT) for bad configs."""

    @abc.abstractmethod
    async def create_container(self, sb: Sandbox, run: ContainerRun, call: str) -> int: ...

    @abc.abstractmethod
    async def start_container(self, sb: Sandbox, ctr: Container, call: str) -> int: ...

    @abc.abstractmethod
    async def kill_container(self, sb: Sandbox, ctr: Container, signal: int, call: str) -> None: ...

    @abc.abstractmethod
    async def wait_container(self, sb: Sandbox, ctr: Container) -> ExitInfo:
        """Block until the container's init process exits (no timeout)."""

    @abc.abstractmethod
    async def delete_container(self, sb: Sandbox, ctr: Container, call: str) -> None:
        """Remove the container from the backend; idempotent, works when the backend is dead
        where the chain allows it."""

    @abc.abstractmethod
    async def container_state(self, sb: Sandbox, ctr: Container) -> tuple[int, int, ExitInfo | None]:
        """(ContainerState, pid, exit) as the backend reports now (used by recovery)."""
