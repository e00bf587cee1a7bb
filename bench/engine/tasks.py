"""Owns: the containers of a pod as driven over its Task API (shared by both controllers).

Both chains end in a `containerd.task.v2.Task` endpoint per pod — the shim, or the task address
a sandboxer returned — so Create/Start/Kill/Wait/Delete/State of containers live here once.
A subclass says how to reach the endpoint (`_address`) and adds what its chain needs around
Task.Create / Task.Delete (the sandboxer hears about containers first).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from bench.engine.config import EngineConfig
from bench.engine.controller import ContainerRun, Controller, ExitInfo, call_timeout
from bench.engine.errors import EngineError, from_backend
from bench.engine.sandbox import Container, ContainerState, Sandbox
from bench.rpc.pb import containerd_task_types_pb2 as task_types
from bench.rpc.task_client import TaskClient
from bench.rpc.ttrpc import Code, TtrpcError
from bench.tracing import Tracer

log = logging.getLogger("chainbench.engine.tasks")


def ts_ns(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos) if ts is not None else 0


class TaskApiController(Controller):
    def __init__(self, cfg: EngineConfig, tracer: Tracer) -> None:
        self.cfg = cfg
        self.tracer = tracer
        self._clients: dict[str, TaskClient] = {}
        self._dialing: dict[str, asyncio.Future[TaskClient]] = {}
        self._closing = False

    # -- the endpoint ------------------------------------------------------------------
    def _address(self, sb: Sandbox) -> str:
        return sb.status.task_address

    async def _dial(self, sb: Sandbox, address: str, call: str | None = None) -> TaskClient:
        """Connect (or reuse) the pod's Task API connection; `call` records task.connect."""
        client = self._clients.get(sb.id)
        if client is not None and not client.closed:
            return client
        if not address:
            raise EngineError(grpc.StatusCode.UNAVAILABLE,
                              f"sandbox {sb.id[:12]} has no task address")
        timeout = call_timeout(min(5.0, self.cfg.call_timeout_s))
        try:
            if call is not None:
                with self.tracer.span(sb.id, call, "task.connect"):
                    client = await TaskClient.dial(address, namespace=self.cfg.namespace,
                                                   timeout=self.cfg.call_timeout_s,
                                                   connect_timeout=timeout)
            else:
                client = await TaskClient.dial(address, namespace=self.cfg.namespace,
                                               timeout=self.cfg.call_timeout_s,
                                               connect_timeout=timeout)
        except Exception as exc:
            raise from_backend(exc, f"connecting to the Task API at {address}") from None
        old = self._clients.get(sb.id)
        self._clients[sb.id] = client
        if old is not None and old is not client:
            await old.close()
        return client

    async def client(self, sb: Sandbox) -> TaskClient:
        return await self._dial(sb, self._address(sb))

    async def drop_client(self, sb: Sandbox) -> None:
        client = self._clients.pop(sb.id, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        self._closing = True
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    async def _task(self, sb: Sandbox, call: str | None, step: str | None, what: str,
                    method: str, **kwargs: Any) -> Any:
        """One Task API call with the deadline of the current CRI call."""
        client = await self.client(sb)
        fn = getattr(client, method)
        kwargs.setdefault("timeout", call_timeout(self.cfg.call_timeout_s))
        try:
            if call is not None and step is not None:
                async with self.tracer.aspan(sb.id, call, step):
                    return await fn(**kwargs)
            return await fn(**kwargs)
        except Exception as exc:
            raise from_backend(exc, what) from None

    # -- hooks for the chains ------------------------------------------------------------
    async def _announce(self, sb: Sandbox, run: ContainerRun, call: str) -> str:
        """Before Task.Create; returns the bundle path to pass to Task.Create."""
        return run.container.bundle

    async def _retract(self, sb: Sandbox, ctr: Container, call: str) -> None:
        """After Task.Delete (the sandboxer forgets the container)."""

    def _create_options(self, run: ContainerRun) -> Any | None:
        """The `options` of Task.Create (None: none; the endpoint reads the bundle)."""
        return None

    # -- containers ----------------------------------------------------------------------
    async def create_container(self, sb: Sandbox, run: ContainerRun, call: str) -> int:
        ctr = run.container
        bundle = await self._announce(sb, run, call)
        resp = await self._task(sb, call, "task.create", f"Task.Create of {ctr.id[:12]}",
                                "create", id=ctr.id, bundle=bundle,
                                options=self._create_options(run))
        return int(resp.pid)

    async def start_container(self, sb: Sandbox, ctr: Container, call: str) -> int:
        resp = await self._task(sb, call, "task.start", f"Task.Start of {ctr.id[:12]}",
                                "start", id=ctr.id)
        return int(resp.pid)

    async def kill_container(self, sb: Sandbox, ctr: Container, signal: int, call: str) -> None:
        await self._task(sb, call, "task.kill", f"Task.Kill of {ctr.id[:12]}", "kill",
                         id=ctr.id, signal=int(signal))

    async def wait_container(self, sb: Sandbox, ctr: Container) -> ExitInfo:
        client = await self.client(sb)
        try:
            resp = await client.wait(id=ctr.id, timeout=None)
        except Exception as exc:
            raise from_backend(exc, f"Task.Wait of {ctr.id[:12]}") from None
        return ExitInfo(int(resp.exit_status), ts_ns(resp.exited_at))

    async def delete_container(self, sb: Sandbox, ctr: Container, call: str) -> None:
        try:
            await self._task(sb, call, "task.delete", f"Task.Delete of {ctr.id[:12]}", "delete",
                             id=ctr.id)
        except EngineError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
        await self._retract(sb, ctr, call)

    async def container_state(self, sb: Sandbox, ctr: Container) -> tuple[int, int, ExitInfo | None]:
        resp = await self._task(sb, None, None, f"Task.State of {ctr.id[:12]}", "state",
                                id=ctr.id)
        st = resp.status
        if st == task_types.RUNNING or st == task_types.PAUSED or st == task_types.PAUSING:
            return ContainerState.RUNNING, int(resp.pid), None
        if st == task_types.CREATED:
            return ContainerState.CREATED, int(resp.pid), None
        if st == task_types.STOPPED:
            return ContainerState.EXITED, int(resp.pid), ExitInfo(int(resp.exit_status),
                                                                   ts_ns(resp.exited_at))
        return ContainerState.UNKNOWN, int(resp.pid), None


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, EngineError):
        return exc.code == grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, TtrpcError):
        return exc.code == Code.UNAVAILABLE
    return isinstance(exc, (ConnectionError, FileNotFoundError))
