"""Owns: relaying Task API calls from a host ttrpc server to a microVM's guest agent.

The shim chain's per-pod shim serves `containerd.task.v2.Task` to the engine and forwards each
call, payload bytes untouched, to the agent.  The agent port takes one host connection at a
time, so the relay multiplexes every call over a single ttrpc client (ttrpc allows many calls
in flight on one connection) and redials for the next call when that connection dropped.
An agent that does not answer never holds a caller forever: calls that came without a deadline
get `default_timeout` (except Wait, which blocks until a process exits), and both an unreachable
and a silent agent fail with a status naming the VM and its serial log.

    relay = AgentRelay(vm)
    server.register(TASK_SERVICE, relay.methods(exclude={"Shutdown"}))  # keep some for yourself
    ...
    await relay.close()
"""
from __future__ import annotations

import asyncio
from typing import Iterable

from bench.rpc.ttrpc import CallContext, Client, Code, Method, TtrpcError
from bench.vm.qemu import TASK_SERVICE, MicroVM

TASK_METHODS = ("State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint",
                "Kill", "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect",
                "Shutdown")


# Methods that legitimately block until something happens in the guest: no default deadline.
_UNBOUNDED = frozenset({"Wait"})


def call_timeout(method: str, ctx: CallContext, default: float) -> float | None:
    """The deadline to give a relayed call: the caller's, else `default` — except for the
    methods that legitimately block until something happens in the guest."""
    timeout = ctx.time_remaining()
    if timeout is None and method not in _UNBOUNDED:
        timeout = default
    return timeout


class AgentRelay:
    def __init__(self, vm: MicroVM, *, service: str = TASK_SERVICE,
                 default_timeout: float = 60.0) -> None:
        self.vm = vm
        self.service = service
        self.default_timeout = default_timeout
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        """The shared connection to the agent, dialled on first use or after it dropped."""
        c = self._client
        if c is not None and not c.closed:
            return c
        async with self._lock:
            if self._client is None or self._client.closed:
                if self._client is not None:
                    await self._client.close()
                self._client = await self.vm.dial()
            return self._client

    async def forward(self, method: str, payload: bytes, ctx: CallContext) -> bytes:
        # No retry: a call in flight when the connection dropped may have run in the guest.
        timeout = call_timeout(method, ctx, self.default_timeout)
        try:
            c = await self.client()
        except (TtrpcError, OSError) as exc:
            raise TtrpcError(Code.UNAVAILABLE, f"cannot reach the agent of vm {self.vm.id}: "
                                               f"{exc}") from None
        try:
            return await c.call_raw(self.service, method, payload, timeout=timeout,
                                    metadata=ctx.metadata or None)
        except TtrpcError as exc:
            if exc.code == Code.DEADLINE_EXCEEDED and ctx.deadline is None and timeout:
                raise TtrpcError(Code.DEADLINE_EXCEEDED,
                                 f"the agent of vm {self.vm.id} did not answer {method} within "
                                 f"{timeout:g}s (serial log: {self.vm.serial_log})") from None
            raise

    def methods(self, *, exclude: Iterable[str] = ()) -> dict[str, Method]:
        """Raw-payload Method specs for `Server.register(TASK_SERVICE, ...)`."""
        skip = set(exclude)

        def handler(name: str):  # noqa: ANN202 - closure factory
            async def relay(payload: bytes, ctx: CallContext) -> bytes:
                return await self.forward(name, payload, ctx)
            return relay

        return {m: Method(None, handler(m)) for m in TASK_METHODS if m not in skip}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
