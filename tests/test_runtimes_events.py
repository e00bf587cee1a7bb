"""Tests of the EventReceiver with a ttrpc client playing the shim (the real shim's events are
covered in test_runtimes_shim.py)."""
from __future__ import annotations

import asyncio

import pytest
from google.protobuf import any_pb2, empty_pb2

from bench.rpc.pb import events_pb2, task_events_pb2
from bench.rpc.ttrpc import Client
from bench.runtimes.events import EVENTS_SERVICE, EventReceiver


def _forward(topic: str, msg=None, type_url: str | None = None) -> events_pb2.ForwardRequest:
    req = events_pb2.ForwardRequest()
    env = req.envelope
    env.topic, env.namespace = topic, "ns1"
    env.timestamp.seconds, env.timestamp.nanos = 12, 34
    if msg is not None:
        env.event.CopyFrom(any_pb2.Any(type_url=type_url or msg.DESCRIPTOR.full_name,
                                       value=msg.SerializeToString()))
    elif type_url:
        env.event.CopyFrom(any_pb2.Any(type_url=type_url, value=b"\x01\x02"))
    return req


def test_forward_decodes_queues_and_calls_back(tmp_path):
    sock = tmp_path / "ev.sock"

    async def main():
        got: list[str] = []

        async def acb(ev):
            got.append("async:" + ev.topic)

        async with await EventReceiver().start(sock) as rx:
            rx.subscribe(lambda ev: got.append(ev.topic))
            rx.subscribe(acb)
            rx.subscribe(lambda ev: 1 / 0)  # a broken callback does not break Forward
            async with await Client.connect(str(sock)) as c:
                exit_ev = task_events_pb2.TaskExit(container_id="c1", id="c1", pid=42,
                                                   exit_status=137)
                await c.call(EVENTS_SERVICE, "Forward", _forward("/tasks/exit", exit_ev),
                             empty_pb2.Empty)
                # the type URL form with a prefix decodes too
                await c.call(EVENTS_SERVICE, "Forward",
                             _forward("/tasks/oom", task_events_pb2.TaskOOM(container_id="c1"),
                                      "types.example/containerd.events.TaskOOM"),
                             empty_pb2.Empty)
                await c.call(EVENTS_SERVICE, "Forward",
                             _forward("/x/unknown", type_url="containerd.events.Nope"),
                             empty_pb2.Empty)
            ev = await rx.queue.get()
            assert ev.topic == "/tasks/exit" and ev.namespace == "ns1"
            assert ev.timestamp_ns == 12_000_000_034
            assert ev.message.pid == 42 and ev.message.exit_status == 137
            oom = await rx.wait_for("/tasks/oom", timeout=2)
            assert oom.message.container_id == "c1"
            unknown = await rx.wait_for("/x/unknown", timeout=2)
            assert unknown.message is None and unknown.type_url == "containerd.events.Nope"
            with pytest.raises(asyncio.TimeoutError):
                await rx.wait_for("/tasks/start", timeout=0.05)
            assert got == ["/tasks/exit", "async:/tasks/exit", "/tasks/oom", "async:/tasks/oom",
                           "/x/unknown", "async:/x/unknown"]
        assert not sock.exists()

    asyncio.run(main())


def test_wait_for_sees_later_event(tmp_path):
    sock = tmp_path / "ev.sock"

    async def main():
        async with await EventReceiver().start(sock) as rx:
            waiter = asyncio.ensure_future(rx.wait_for(
                "/tasks/exit", lambda e: e.message.container_id == "b", timeout=5))
            async with await Client.connect(str(sock)) as c:
                for cid in ("a", "b"):
                    ev = task_events_pb2.TaskExit(container_id=cid)
                    await c.call(EVENTS_SERVICE, "Forward", _forward("/tasks/exit", ev),
                                 empty_pb2.Empty)
            assert (await waiter).message.container_id == "b"

    asyncio.run(main())
