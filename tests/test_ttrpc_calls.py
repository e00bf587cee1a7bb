"""Owns: tests of ttrpc client/server calls over real unix sockets (happy paths and statuses)."""
from __future__ import annotations

import asyncio
import os
import socket
import uuid

import pytest
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from bench.rpc.ttrpc import CallContext, Client, Code, Method, Server, TtrpcError

SVC = "test.Echo"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def make_server(**kw) -> Server:
    server = Server(**kw)

    async def echo(req: StringValue, ctx: CallContext) -> StringValue:
        return req

    async def meta(req: StringValue, ctx: CallContext) -> StringValue:
        ns = ctx.get("containerd-namespace-ttrpc", "")
        multi = ",".join(ctx.metadata.get("multi", []))
        return StringValue(value=f"{ns}|{multi}|{ctx.deadline is not None}")

    async def not_found(req: StringValue, ctx: CallContext) -> StringValue:
        raise TtrpcError(Code.NOT_FOUND, f"container {req.value} not found")

    async def boom(req: StringValue, ctx: CallContext) -> StringValue:
        raise RuntimeError("handler exploded")

    async def raw(req: bytes, ctx: CallContext) -> bytes:
        return req[::-1]

    server.register(SVC, {
        "Echo": (StringValue, StringValue, echo),
        "Meta": (StringValue, meta),
        "NotFound": Method(StringValue, not_found, StringValue),
        "Boom": (StringValue, boom),
        "Raw": (None, raw),
    })
    return server


def test_round_trip_all_address_forms(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        async with make_server() as server:
            await server.start(path)
            for addr in (path, f"unix://{path}", f"ttrpc+unix://{path}"):
                async with await Client.connect(addr) as c:
                    resp = await c.call(SVC, "Echo", StringValue(value="hi"), StringValue)
                    assert resp.value == "hi"
                    # an empty message is an empty payload, still valid
                    assert (await c.call(SVC, "Echo", StringValue(), StringValue)).value == ""
        assert not os.path.exists(path)
    run(main())


def test_abstract_socket():
    async def main():
        name = f"@chainbench-test-{uuid.uuid4().hex}"
        async with make_server() as server:
            await server.start(name)
            async with await Client.connect(name) as c:
                assert (await c.call(SVC, "Echo", StringValue(value="a"), StringValue)).value == "a"
    run(main())


def test_metadata_and_deadline_reach_handler(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        async with make_server() as server:
            await server.start(path)
            async with await Client.connect(path) as c:
                r = await c.call(SVC, "Meta", StringValue(), StringValue, timeout=5,
                                 metadata={"containerd-namespace-ttrpc": "k8s.io",
                                           "multi": ["a", "b"]})
                assert r.value == "k8s.io|a,b|True"
                r = await c.call(SVC, "Meta", StringValue(), StringValue,
                                 metadata=[("Containerd-Namespace-Ttrpc", "x")])
                assert r.value == "x||False"
    run(main())


def test_status_codes(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        async with make_server() as server:
            await server.start(path)
            async with await Client.connect(path) as c:
                cases = [("no.Such", "Echo", Code.UNIMPLEMENTED, "service no.Such"),
                         (SVC, "Nope", Code.UNIMPLEMENTED, "method Nope"),
                         (SVC, "NotFound", Code.NOT_FOUND, "container z not found"),
                         (SVC, "Boom", Code.UNKNOWN, "handler exploded")]
                for svc, method, code, msg in cases:
                    with pytest.raises(TtrpcError) as ei:
                        await c.call(svc, method, StringValue(value="z"), StringValue)
                    assert (ei.value.code, ei.value.message) == (code, msg)
                # errors do not poison the connection
                assert (await c.call(SVC, "Echo", StringValue(value="ok"), StringValue)).value == "ok"
                # undecodable request payload -> INTERNAL
                with pytest.raises(TtrpcError) as ei:
                    await c.call_raw(SVC, "Echo", b"\xff\xff\xff")
                assert ei.value.code == Code.INTERNAL
                # raw methods get and return bytes
                assert await c.call_raw(SVC, "Raw", b"abc") == b"cba"
    run(main())


def test_concurrent_calls_multiplex_out_of_order(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        n = 20
        gates = {str(i): asyncio.Event() for i in range(n)}
        arrived = asyncio.Semaphore(0)
        finished: list[str] = []
        server = Server()

        async def gated(req: StringValue, ctx: CallContext) -> StringValue:
            arrived.release()
            await gates[req.value].wait()
            finished.append(req.value)
            return StringValue(value=f"r{req.value}")

        server.register(SVC, {"Gated": (StringValue, gated)})
        await server.start(path)
        c = await Client.connect(path)
        calls = [asyncio.create_task(c.call(SVC, "Gated", StringValue(value=str(i)), StringValue))
                 for i in range(n)]
        for _ in range(n):  # every call is in flight on the one connection at once
            await arrived.acquire()
        assert server.connections == 1
        for i in reversed(range(n)):  # answer in reverse order of sending
            gates[str(i)].set()
            await asyncio.sleep(0)
        results = await asyncio.gather(*calls)
        assert [r.value for r in results] == [f"r{i}" for i in range(n)]
        assert finished == [str(i) for i in reversed(range(n))]
        await c.close()
        await server.close()
    run(main())


def test_client_deadline_exceeded_and_server_cancels_handler(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        cancelled = asyncio.Event()
        server = Server()

        async def hang(req: StringValue, ctx: CallContext) -> StringValue:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return req  # pragma: no cover

        server.register(SVC, {"Hang": (StringValue, hang),
                              "Echo": (StringValue, lambda r, c: _aecho(r))})
        await server.start(path)
        async with await Client.connect(path) as c:
            with pytest.raises(TtrpcError) as ei:
                await c.call(SVC, "Hang", StringValue(), StringValue, timeout=0.05)
            assert ei.value.code == Code.DEADLINE_EXCEEDED
            await asyncio.wait_for(cancelled.wait(), 10)  # server honoured timeout_nano
            assert (await c.call(SVC, "Echo", StringValue(value="x"), StringValue,
                                 timeout=10)).value == "x"
        await server.close()
    run(main())


async def _aecho(req):
    return req


def test_server_on_listening_socket_and_fd(tmp_path):
    async def main():
        for use_fd in (False, True):
            path = str(tmp_path / f"fd{use_fd}.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(16)
            server = make_server()
            if use_fd:
                await server.start_fd(sock.detach())
            else:
                await server.start_socket(sock)
            assert server.address == path
            async with await Client.connect(path) as c:
                assert (await c.call(SVC, "Echo", StringValue(value="fd"), StringValue)).value == "fd"
            await server.close()
    run(main())


def test_from_socket_with_socketpair():
    async def main():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        server = make_server()
        loop = asyncio.get_running_loop()
        from bench.rpc.ttrpc.server import _ServerConnection
        await loop.create_unix_connection(lambda: _ServerConnection(server), sock=b)
        c = await Client.from_socket(a)
        assert (await c.call(SVC, "Echo", StringValue(value="sp"), StringValue)).value == "sp"
        await c.close()
        await server.close()
    run(main())


def test_bytes_payload_large_but_legal(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        server = Server()

        async def echo(req: BytesValue, ctx):
            return req

        server.register(SVC, {"Echo": (BytesValue, echo)})
        await server.start(path)
        async with await Client.connect(path) as c:
            big = BytesValue(value=os.urandom(3 << 20))  # spans many reads and writes
            results = await asyncio.gather(*(c.call(SVC, "Echo", big, BytesValue) for _ in range(3)))
            assert all(r == big for r in results)
        await server.close()
    run(main())
