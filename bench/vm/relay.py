"""Owns: relaying Task API calls from a host ttrpc server to a microVM's guest agent.

The shim chain's per-pod shim serves `containerd.task.v2.Task` to the engine and forwards each
call, payload bytes untouched, to the agent.  The agent port takes one host connection at a
time, so the relay multiplexes every call over a single ttrpc client (ttrpc allows many calls
in flight on one connection) and redials for the next call when that connection dropped.

    relay = AgentRelay(vm)
    server.register(TASK_SERVICE, relay.methods(exclude={"Shutdown"}))  # keep some for yourself
    ...
    await relay.close()
"""
from __future__ import annotations

import asyncio
from typing import Iterable

from bench.rpc.ttrpc import CallContext, Client, Method
from bench.vm.qemu import TASK_SERVICE, MicroVM

TASK_METHODS = ("State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint",
                "Kill", "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect",
                "Shutdown")


class AgentRelay:
    def __init__(self, vm: MicroVM, *, service: str = TASK_SERVICE) -> None:
        self.vm = vm
        self.service = service
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
        c = await self.client()
        return await c.call_raw(self.service, method, payload, timeout=ctx.time_remaining(),
                                metadata=ctx.metadata or None)

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
