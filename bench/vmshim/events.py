"""Owns: publishing task events from the shim to the engine (wire-contracts §4.1), as
containerd's shims do: `Events/Forward` over ttrpc to the address in env `TTRPC_ADDRESS`.

Events go out in order from one background task with a lazily dialled connection; a failed send
is retried a few times and then dropped with a log line — events are advisory (the engine learns
exits from Task.Wait), and a slow or absent receiver must never stall a Task call.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from bench.rpc.pb import events_pb2
from bench.rpc.ttrpc import Client, TtrpcError

log = logging.getLogger("chainbench.vmshim.events")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
_SEND_TIMEOUT_S = 5.0
_ATTEMPTS = 3
_QUEUE_MAX = 1024


class EventPublisher:
    def __init__(self, address: str | None, namespace: str) -> None:
        self.address = address or None
        self.namespace = namespace
        self._queue: asyncio.Queue[events_pb2.ForwardRequest] = asyncio.Queue(_QUEUE_MAX)
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def publish(self, topic: str, message: Any) -> None:
        """Queue `message` (a containerd.events.* message) under `topic`; never blocks."""
        if self.address is None:
            return
        env = events_pb2.Envelope(namespace=self.namespace, topic=topic,
                                  event=any_pb2.Any(type_url=message.DESCRIPTOR.full_name,
                                                    value=message.SerializeToString()))
        env.timestamp.FromNanoseconds(time.time_ns())
        try:
            self._queue.put_nowait(events_pb2.ForwardRequest(envelope=env))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("event queue full: dropping %s", topic)
            return
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            req = await self._queue.get()
            for attempt in range(_ATTEMPTS):
                try:
                    if self._client is None or self._client.closed:
                        self._client = await Client.connect(self.address or "",
                                                            timeout=_SEND_TIMEOUT_S)
                    await self._client.call(EVENTS_SERVICE, "Forward", req, empty_pb2.Empty,
                                            timeout=_SEND_TIMEOUT_S)
                    self.sent += 1
                    break
                except TtrpcError as exc:
                    if self._client is not None:
                        await self._client.close()
                        self._client = None
                    if attempt == _ATTEMPTS - 1:
                        self.dropped += 1
                        log.warning("event %s to %s dropped: %s", req.envelope.topic,
                                    self.address, exc)
                    else:
                        await asyncio.sleep(0.05 * (attempt + 1))
            self._queue.task_done()

    async def close(self, timeout: float = 1.0) -> None:
        """Give queued events `timeout` to go out (e.g. the last exits), then stop."""
        if self._task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout)
            except asyncio.TimeoutError:
                log.warning("%d events not sent at exit", self._queue.qsize())
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None
