"""Owns: the receiver of the task events shims publish (ttrpc Events/Forward, wire §4.1).

Service `containerd.services.events.ttrpc.v1.Events`, method `Forward`.

A shim dials the unix socket named by its TTRPC_ADDRESS env and forwards one Envelope per
event (topic `/tasks/exit` …, `event` = Any of `containerd.events.TaskExit` …).
`EventReceiver` serves that socket, decodes the payload and hands each event to an asyncio
queue and to callbacks; the engine learns about container exits this way.  Note: a TaskExit's
`id` is the exec id (equal to `container_id` for the init process).
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"


@dataclass
class TaskEvent:
    """One event a shim published: topic (/tasks/exit …), namespace, the decoded message
    (containerd.events.TaskExit …, or None for an unknown type) and its type URL."""

    topic: str
    namespace: str
    timestamp_ns: int
    type_url: str
    message: Any
    peer_pid: int | None = None


def _decode_event(any_msg: Any) -> Any:
    from bench.rpc.pb import task_events_pb2

    name = any_msg.type_url.rsplit("/", 1)[-1]
    short = name.rsplit(".", 1)[-1]
    cls = getattr(task_events_pb2, short, None)
    if cls is None or cls.DESCRIPTOR.full_name != name:
        return None
    return cls.FromString(any_msg.value)


class EventReceiver:
    """ttrpc server for `Events/Forward` on a unix socket: the shim's TTRPC_ADDRESS.

    Events go to `queue` (an asyncio.Queue of TaskEvent) and to every callback given to
    `subscribe`.  Use `wait_for(topic, pred)` in tests to await e.g. a TaskExit."""

    def __init__(self, *, queue_size: int | None = 0) -> None:
        """queue_size: 0 = unbounded queue, n = bounded (drops when full), None = no queue
        (events only reach callbacks and `history`)."""
        from bench.rpc.ttrpc import Server

        self.queue: asyncio.Queue[TaskEvent] | None = (
            asyncio.Queue(queue_size) if queue_size is not None else None)
        self._callbacks: list[Callable[[TaskEvent], Any]] = []
        self._server = Server()
        self._history: list[TaskEvent] = []
        self._keep = 1024
        self._changed = asyncio.Event()
        from bench.rpc.pb import events_pb2
        from google.protobuf import empty_pb2

        self._empty = empty_pb2.Empty
        self._server.register(EVENTS_SERVICE,
                              {"Forward": (events_pb2.ForwardRequest, empty_pb2.Empty,
                                           self._forward)})
        self.address = ""

    async def start(self, path: str | os.PathLike[str]) -> "EventReceiver":
        p = os.fspath(path)
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        await self._server.start(p)
        self.address = p
        return self

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> "EventReceiver":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def subscribe(self, callback: Callable[[TaskEvent], Any]) -> None:
        """callback(event) for each event; a coroutine function's result is awaited."""
        self._callbacks.append(callback)

    async def _forward(self, req: Any, ctx: Any) -> Any:
        env = req.envelope
        ev = TaskEvent(topic=env.topic, namespace=env.namespace,
                       timestamp_ns=env.timestamp.seconds * 1_000_000_000 + env.timestamp.nanos,
                       type_url=env.event.type_url, message=_decode_event(env.event),
                       peer_pid=getattr(ctx, "peer_pid", None))
        self._history.append(ev)
        del self._history[:-self._keep]
        self._changed.set()
        self._changed = asyncio.Event()
        if self.queue is not None:
            try:
                self.queue.put_nowait(ev)
            except asyncio.QueueFull:
                log.warning("event queue full: dropping %s", ev.topic)
        for cb in list(self._callbacks):
            try:
                r = cb(ev)
                if asyncio.iscoroutine(r):
                    await r
            except Exception as exc:
                log.warning("event callback failed on %s: %s", ev.topic, exc)
        return self._empty()

    @property
    def history(self) -> list[TaskEvent]:
        return list(self._history)

    async def wait_for(self, topic: str, pred: Callable[[TaskEvent], bool] = lambda e: True,
                       timeout: float = 10.0) -> TaskEvent:
        """First event (already received or future) with `topic` matching `pred`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for ev in self._history:  # bounded by _keep: rescanning is cheap
                if ev.topic == topic and pred(ev):
                    return ev
            changed = self._changed
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise asyncio.TimeoutError(f"no {topic} event within {timeout}s")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(f"no {topic} event within {timeout}s") from None

