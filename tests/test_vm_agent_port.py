"""The agent's virtio-serial port server: one ttrpc connection across every host connection.

Unit part (pure protocol logic, a recording transport): how the port session tells host
connections apart in-band.  QEMU part: a restored clone's agent under host patterns that used
to strand the next client — a host that hangs up mid-frame, sends garbage, abandons calls, or
is followed at once by the next host (the old agent drained the port after every disconnect
and could eat the next host's request: "Connect/Create not answered").
"""
from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest
from google.protobuf import any_pb2, empty_pb2

from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.pb import ttrpc_pb2
from bench.rpc.ttrpc import Client, Code, FrameReader, Server
from bench.vm.agent import SERVICE, TaskService
from bench.vm.agent_port import PortSession, encode_varint, opens_session, wire_fields
from bench.vm.qemu import MicroVM, Snapshot, VMConfig
from test_vm_qemu import config, snapshot  # noqa: F401  (pytest fixtures: one VM recipe)

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def request(sid: int, method: str, msg: object, service: str = SERVICE) -> bytes:
    body = ttrpc_pb2.Request(service=service, method=method,
                             payload=msg.SerializeToString()).SerializeToString()  # type: ignore[attr-defined]
    return struct.pack(">IIBB", len(body), sid, 1, 0) + body


class RecordingPort:
    """Stands in for PortTransport: `hold` = host away, replies queue instead of going out."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.queued: list[bytes] = []
        self.hold = False
        self.closed = False

    def write(self, data: bytes) -> None:
        (self.queued if self.hold else self.sent).append(bytes(data))

    def discard_queued(self) -> int:
        n = sum(map(len, self.queued))
        self.queued.clear()
        return n

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def abort(self) -> None:
        self.closed = True

    close = abort

    def replies(self) -> list[tuple[int, ttrpc_pb2.Response]]:
        out: list[tuple[int, ttrpc_pb2.Response]] = []
        reader = FrameReader(lambda sid, t, f, p: out.append((sid, ttrpc_pb2.Response.FromString(p))),
                             lambda *a: None)
        for chunk in self.sent:
            reader.feed(chunk)
        return out


class Blocker:
    """A service whose `Block` never answers (until cancelled) and `Echo` answers at once."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def block(self, req: object, ctx: object) -> empty_pb2.Empty:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return empty_pb2.Empty()

    async def echo(self, req: pb.ConnectRequest, ctx: object) -> pb.ConnectResponse:
        return pb.ConnectResponse(version=req.id)


async def session_with(service: Blocker | None = None, *, task: TaskService | None = None,
                       inline: bool = False) -> tuple[PortSession, RecordingPort]:
    server = Server(check_peer=False)
    task = task or TaskService()
    if service is None:
        task.register(server)
    else:
        server.register("t.Blocker", {"Block": (pb.ConnectRequest, service.block),
                                      "Echo": (pb.ConnectRequest, service.echo)})
    sess = PortSession(server, inline_service=SERVICE,
                       inline={"Connect": task.connect_wire} if inline else None)
    port = RecordingPort()
    sess.connection_made(port)  # type: ignore[arg-type]
    return sess, port


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_opening_frame_signature() -> None:
    first = request(1, "Connect", pb.ConnectRequest())
    assert opens_session(first)
    assert not opens_session(request(3, "Connect", pb.ConnectRequest()))
    assert not opens_session(first[:10])  # a header alone says nothing about the body
    assert not opens_session(b"\xff" * 64)
    assert not opens_session(b"")


def test_partial_frame_of_a_departed_host_does_not_swallow_the_next_client() -> None:
    async def main() -> None:
        sess, port = await session_with()
        half = request(1, "Connect", pb.ConnectRequest(id="a" * 40))
        sess.data_received(half[: len(half) // 2])  # the first host hung up mid-frame
        sess.data_received(request(1, "Connect", pb.ConnectRequest()))  # the next host
        await settle()
        [(sid, resp)] = port.replies()
        assert sid == 1 and not resp.status.code
        assert pb.ConnectResponse.FromString(resp.payload).version.startswith("chainbench")
    asyncio.run(main())


def test_stream_one_again_cancels_the_old_hosts_calls_and_drops_its_queued_replies() -> None:
    async def main() -> None:
        svc = Blocker()
        sess, port = await session_with(svc)
        sess.data_received(request(1, "Block", pb.ConnectRequest(), "t.Blocker"))
        port.hold = True  # the first host is gone: its Echo reply cannot leave the guest
        sess.data_received(request(3, "Echo", pb.ConnectRequest(id="old"), "t.Blocker"))
        await settle()
        assert port.queued and not port.sent
        port.hold = False
        # The next host: stream 1 again, in a fresh chunk.
        sess.data_received(request(1, "Echo", pb.ConnectRequest(id="new"), "t.Blocker"))
        await settle()
        assert svc.cancelled == 1 and not port.queued
        [(sid, resp)] = port.replies()
        assert sid == 1 and pb.ConnectResponse.FromString(resp.payload).version == "new"
        # Numbering restarted: stream 3 of the new host is accepted, not "must increase".
        sess.data_received(request(3, "Echo", pb.ConnectRequest(id="n3"), "t.Blocker"))
        await settle()
        assert [s for s, _ in port.replies()] == [1, 3]
        sess.abort()
    asyncio.run(main())


def test_garbage_skips_to_the_next_client_without_closing_the_port() -> None:
    async def main() -> None:
        sess, port = await session_with()
        sess.data_received(b"\xff" * 64)
        sess.data_received(request(5, "Connect", pb.ConnectRequest()))  # still the bad host
        await settle()
        assert not port.closed and not port.sent
        sess.data_received(request(1, "Connect", pb.ConnectRequest()))
        await settle()
        [(sid, resp)] = port.replies()
        assert sid == 1 and not resp.status.code
    asyncio.run(main())


def test_connect_wire_bytes_are_what_protobuf_would_write() -> None:
    task = TaskService()
    task.containers["c1"] = type("C", (), {"init": type("P", (), {"pid": 4242})()})()  # type: ignore[assignment]
    for cid, task_pid in (("", 0), ("c1", 4242), ("other", 0)):
        raw = pb.ConnectRequest(id=cid).SerializeToString()
        want = pb.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid,
                                  version="chainbench-agent/1").SerializeToString()
        assert task.connect_wire(raw) == want
    # Anything unusual is left to the regular path (which knows the status codes).
    assert task.connect_wire(pb.ConnectRequest(id="../x").SerializeToString()) is None
    assert task.connect_wire(b"\x0a\x05ab") is None  # truncated
    assert task.connect_wire(b"\x0a\x02\xff\xfe") is None  # not UTF-8
    assert task.connect_wire(b"\x10\x01") is None  # a field ConnectRequest does not have


def test_wire_fields_reads_well_formed_messages_and_rejects_the_rest() -> None:
    msg = ttrpc_pb2.Request(service="s", method="m", payload=b"p" * 300, timeout_nano=10**12)
    f = wire_fields(msg.SerializeToString())
    assert f == {1: b"s", 2: b"m", 3: b"p" * 300, 4: 10**12}
    assert encode_varint(300) == b"\xac\x02"
    for bad in (b"\x0a", b"\x0a\x09abc", b"\x08", b"\x0b", b"\x00\x01", b"\xff" * 11):
        with pytest.raises((ValueError, IndexError)):
            wire_fields(bad)


def test_inline_connect_is_a_real_ttrpc_answer_and_other_calls_take_the_regular_path() -> None:
    async def main() -> None:
        sess, port = await session_with(inline=True)
        sess.data_received(request(1, "Connect", pb.ConnectRequest()))
        assert not sess.tasks  # answered inside the callback, no Task
        [(sid, resp)] = port.replies()
        assert sid == 1 and not resp.status.code
        assert pb.ConnectResponse.FromString(resp.payload).shim_pid == os.getpid()
        # a bad id goes the regular way and gets its status code
        sess.data_received(request(3, "Connect", pb.ConnectRequest(id="../x")))
        sess.data_received(request(5, "State", pb.StateRequest(id="nope")))
        await settle()
        got = {sid: r.status.code for sid, r in port.replies()}
        assert got == {1: 0, 3: Code.INVALID_ARGUMENT, 5: Code.NOT_FOUND}
        # stream ids are still checked on the inline path
        sess.data_received(request(3, "Connect", pb.ConnectRequest()))
        await settle()
        assert port.replies()[-1][1].status.code == Code.INVALID_ARGUMENT
    asyncio.run(main())


# -- real QEMU ------------------------------------------------------------------------------
async def full_round(vm: MicroVM, tag: str) -> None:
    """Connect, then a Create bigger than one 4 KiB guest buffer, then Delete."""
    c = await vm.dial()
    try:
        r = await c.call(SERVICE, "Connect", pb.ConnectRequest(), pb.ConnectResponse, timeout=20)
        assert r.version.startswith("chainbench-agent")
        spec = {"args": ["true"], "env": ["PAD=" + "x" * 9000]}
        opts = any_pb2.Any(type_url=PROCESS_URL, value=json.dumps(spec).encode())
        await c.call(SERVICE, "Create", pb.CreateTaskRequest(id=tag, options=opts),
                     pb.CreateTaskResponse, timeout=20)
        await c.call(SERVICE, "Delete", pb.DeleteRequest(id=tag), pb.DeleteResponse, timeout=20)
    finally:
        await c.close()


async def hang_up_after(vm: MicroVM, data: bytes) -> None:
    _, w = await asyncio.open_unix_connection(vm.socket_path)
    w.write(data)
    await w.drain()
    w.close()
    await w.wait_closed()


@pytest.mark.integration
@pytest.mark.slow
def test_restored_agent_answers_every_next_host(config: VMConfig, snapshot: Snapshot,
                                                tmp_path: Path, leak_check) -> None:
    leak_check.watch_dir(tmp_path)

    async def main() -> None:
        vm = MicroVM("hostile", tmp_path / "vm", config)
        try:
            await vm.restore(snapshot)
            for i in range(3):
                # hangs up mid-frame: the old agent glued the next host's bytes onto it
                half = request(1, "Connect", pb.ConnectRequest(id="h" * 300))
                await hang_up_after(vm, half[: len(half) // 2])
                await full_round(vm, f"half{i}")
                # not ttrpc at all
                await hang_up_after(vm, b"\xff" * 64)
                await full_round(vm, f"junk{i}")
                # a call abandoned by its host
                await hang_up_after(vm, request(1, "Connect", pb.ConnectRequest()))
                await full_round(vm, f"gone{i}")
                # the next host queues up before the previous one has hung up
                first = await vm.dial()
                await first.call(SERVICE, "Connect", pb.ConnectRequest(), pb.ConnectResponse,
                                 timeout=20)
                nxt = asyncio.ensure_future(full_round(vm, f"next{i}"))
                await asyncio.sleep(0.001)
                await first.close()
                await nxt
            # A Wait left running by a host that hung up is cancelled by the next host, and
            # its late answer never reaches that host.
            c = await vm.dial()
            sleeper = any_pb2.Any(type_url=PROCESS_URL,
                                  value=json.dumps({"args": ["sleep", "1000"]}).encode())
            await c.call(SERVICE, "Create", pb.CreateTaskRequest(id="s", options=sleeper),
                         pb.CreateTaskResponse, timeout=20)
            await c.call(SERVICE, "Start", pb.StartRequest(id="s"), pb.StartResponse, timeout=20)
            waiter = asyncio.ensure_future(c.call(SERVICE, "Wait", pb.WaitRequest(id="s"),
                                                  pb.WaitResponse))
            await asyncio.sleep(0.05)
            await c.close()
            with pytest.raises(Exception):
                await waiter
            c = await vm.dial()
            try:
                await c.call(SERVICE, "Kill", pb.KillRequest(id="s", signal=9), empty_pb2.Empty,
                             timeout=20)
                w = await c.call(SERVICE, "Wait", pb.WaitRequest(id="s"), pb.WaitResponse,
                                 timeout=20)
                assert w.exit_status == 137
                await c.call(SERVICE, "Delete", pb.DeleteRequest(id="s"), pb.DeleteResponse,
                             timeout=20)
            finally:
                await c.close()
            # Back-to-back hosts: each closes and the next dials at once.  The old agent lost
            # about one request in 400 of these; 150 here.
            for i in range(150):
                c = await vm.dial()
                try:
                    r = await c.call(SERVICE, "Connect", pb.ConnectRequest(), pb.ConnectResponse,
                                     timeout=20)
                    assert r.shim_pid == 1
                finally:
                    await c.close()
            # The agent is still a well-behaved Task server.
            c = await vm.dial()
            try:
                with pytest.raises(Exception) as err:
                    await c.call(SERVICE, "State", pb.StateRequest(id="nope"), pb.StateResponse,
                                 timeout=20)
                assert getattr(err.value, "code", None) == Code.NOT_FOUND
            finally:
                await c.close()
            assert "Traceback" not in vm.serial_output()
        finally:
            await vm.stop()
    asyncio.run(main())


def test_a_real_clients_first_frame_opens_a_session() -> None:
    # What our own ttrpc Client sends first (with a deadline and metadata, as the engine's
    # TaskClient does) carries the signature the port session looks for.
    async def main() -> None:
        import socket
        a, b = socket.socketpair()
        c = await Client.from_socket(a)
        call = asyncio.ensure_future(c.call(SERVICE, "Connect", pb.ConnectRequest(),
                                            pb.ConnectResponse, timeout=5,
                                            metadata={"containerd-namespace-ttrpc": "k8s.io"}))
        await asyncio.sleep(0.05)
        got = b.recv(4096)
        assert opens_session(got) and struct.unpack(">IIBB", got[:10])[1:] == (1, 1, 0)
        call.cancel()
        await c.close()
        b.close()
    asyncio.run(main())
