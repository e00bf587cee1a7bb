"""Owns: tests of ttrpc failure handling: oversize, malformed frames, peers, ids, shutdown."""
from __future__ import annotations

import asyncio
import logging
import os

import pytest
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from bench.rpc.pb import ttrpc_pb2
from bench.rpc.ttrpc import (HEADER, HEADER_SIZE, MAX_PAYLOAD, TYPE_REQUEST, TYPE_RESPONSE,
                             CallContext, Client, Code, Server, TtrpcError, encode_frame)

SVC = "test.Echo"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _echo(req, ctx: CallContext):
    return req


async def _start(path: str, **kw) -> Server:
    server = Server(**kw)

    async def huge(req: StringValue, ctx: CallContext) -> BytesValue:
        return BytesValue(value=b"\0" * (MAX_PAYLOAD + 1))

    async def slow(req: StringValue, ctx: CallContext) -> StringValue:
        await asyncio.sleep(3600)
        return req  # pragma: no cover

    server.register(SVC, {"Echo": (StringValue, _echo), "Huge": (StringValue, huge),
                          "Slow": (StringValue, slow)})
    await server.start(path)
    return server


class Raw:
    """A hand-driven ttrpc peer: writes arbitrary frames, reads Response frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> "Raw":
        return cls(*await asyncio.open_unix_connection(path, limit=1 << 24))

    def request(self, sid: int, method: str = "Echo", payload: bytes = b"",
                timeout_nano: int = 0, flags: int = 0) -> None:
        body = ttrpc_pb2.Request(service=SVC, method=method, payload=payload,
                                 timeout_nano=timeout_nano).SerializeToString()
        self.writer.write(HEADER.pack(len(body), sid, TYPE_REQUEST, flags) + body)

    async def response(self) -> tuple[int, ttrpc_pb2.Response]:
        hdr = await self.reader.readexactly(HEADER_SIZE)
        length, sid, mtype, flags = HEADER.unpack(hdr)
        assert (mtype, flags) == (TYPE_RESPONSE, 0)
        return sid, ttrpc_pb2.Response.FromString(await self.reader.readexactly(length))

    async def closed_by_peer(self) -> bool:
        return await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def test_oversize_request_frame_answers_resource_exhausted_and_keeps_connection(tmp_path):
    """We discard the whole oversize payload, answer on its stream id, and keep serving."""
    async def main():
        path = str(tmp_path / "s.sock")
        server = await _start(path)
        raw = await Raw.open(path)
        big = MAX_PAYLOAD + 1
        raw.writer.write(HEADER.pack(big, 1, TYPE_REQUEST, 0))
        for i in range(0, big, 1 << 20):
            raw.writer.write(b"\0" * min(1 << 20, big - i))
            await raw.writer.drain()
        sid, resp = await raw.response()
        assert sid == 1 and resp.status.code == Code.RESOURCE_EXHAUSTED
        raw.request(3, payload=StringValue(value="after").SerializeToString())
        sid, resp = await raw.response()
        assert sid == 3 and resp.status.code == 0
        assert StringValue.FromString(resp.payload).value == "after"
        await raw.close()
        await server.close()
    run(main())


def test_client_refuses_to_send_oversize_and_stays_usable(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        server = await _start(path)
        async with await Client.connect(path) as c:
            with pytest.raises(TtrpcError) as ei:
                await c.call(SVC, "Echo", BytesValue(value=b"\0" * MAX_PAYLOAD), StringValue)
            assert ei.value.code == Code.RESOURCE_EXHAUSTED and "limit" in ei.value.message
            # an oversize *response* from a handler becomes RESOURCE_EXHAUSTED too
            with pytest.raises(TtrpcError) as ei:
                await c.call(SVC, "Huge", StringValue(), BytesValue)
            assert ei.value.code == Code.RESOURCE_EXHAUSTED
            assert (await c.call(SVC, "Echo", StringValue(value="ok"), StringValue)).value == "ok"
        await server.close()
    run(main())


def test_client_treats_oversize_incoming_as_error_for_that_call(tmp_path):
    async def main():
        path = str(tmp_path / "fake.sock")

        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # A misbehaving server: stream 1 gets a 4 MiB + 1 response, others an empty OK.
            while True:
                try:
                    length, sid, _, _ = HEADER.unpack(await reader.readexactly(HEADER_SIZE))
                    await reader.readexactly(length)
                except asyncio.IncompleteReadError:
                    break
                if sid == 1:
                    writer.write(HEADER.pack(MAX_PAYLOAD + 1, 1, TYPE_RESPONSE, 0)
                                 + b"\0" * (MAX_PAYLOAD + 1))
                else:
                    writer.write(encode_frame(sid, TYPE_RESPONSE, b""))
                await writer.drain()
            writer.close()

        srv = await asyncio.start_unix_server(fake, path)
        async with await Client.connect(path) as c:
            with pytest.raises(TtrpcError) as ei:
                await c.call(SVC, "Echo", StringValue(), StringValue)
            assert ei.value.code == Code.RESOURCE_EXHAUSTED
            assert (await c.call(SVC, "Echo", StringValue(), StringValue)).value == ""
        srv.close()
        await srv.wait_closed()
    run(main())


def test_malformed_header_closes_only_that_connection(tmp_path, caplog):
    async def main():
        path = str(tmp_path / "s.sock")
        server = await _start(path)
        good = await Client.connect(path)
        assert (await good.call(SVC, "Echo", StringValue(value="1"), StringValue)).value == "1"
        bad = await Raw.open(path)
        with caplog.at_level(logging.ERROR, logger="bench.rpc.ttrpc"):
            bad.writer.write(HEADER.pack(4, 1, 0x09, 0) + b"junk")
            assert await bad.closed_by_peer()
        assert "unknown message type 0x09" in caplog.text
        garbage = await Raw.open(path)
        garbage.writer.write(b"\xff" * 16)
        assert await garbage.closed_by_peer()
        # the other connection and the listener are unaffected
        assert (await good.call(SVC, "Echo", StringValue(value="2"), StringValue)).value == "2"
        async with await Client.connect(path) as fresh:
            assert (await fresh.call(SVC, "Echo", StringValue(value="3"), StringValue)).value == "3"
        await bad.close()
        await garbage.close()
        await good.close()
        await server.close()
    run(main())


def test_stream_id_rules(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        server = await _start(path)
        raw = await Raw.open(path)
        ok = StringValue(value="v").SerializeToString()
        expectations = [
            (2, Code.INVALID_ARGUMENT, "must be odd"),      # even id, answered on that id
            (0, Code.INVALID_ARGUMENT, "must be odd"),
            (5, 0, ""),
            (3, Code.INVALID_ARGUMENT, "must increase"),   # reuse/decrease (ttrpc >= 1.2 rule)
            (7, 0, ""),
        ]
        for sid, code, text in expectations:
            raw.request(sid, payload=ok)
            got_sid, resp = await raw.response()
            assert got_sid == sid and resp.status.code == code and text in resp.status.message
        # undecodable envelope -> INVALID_ARGUMENT; streaming flags -> UNIMPLEMENTED
        raw.writer.write(HEADER.pack(3, 9, TYPE_REQUEST, 0) + b"\xff\xff\xff")
        sid, resp = await raw.response()
        assert (sid, resp.status.code) == (9, Code.INVALID_ARGUMENT)
        raw.request(11, payload=ok, flags=0x02)
        sid, resp = await raw.response()
        assert (sid, resp.status.code) == (11, Code.UNIMPLEMENTED)
        await raw.close()
        await server.close()
    run(main())


def test_server_applies_timeout_nano(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        server = await _start(path)
        raw = await Raw.open(path)
        raw.request(1, method="Slow", timeout_nano=20_000_000)
        sid, resp = await raw.response()
        assert (sid, resp.status.code) == (1, Code.DEADLINE_EXCEEDED)
        await raw.close()
        await server.close()
    run(main())


def test_client_enforces_deadline_locally_against_silent_server(tmp_path):
    async def main():
        path = str(tmp_path / "mute.sock")

        async def mute(reader, writer):
            await reader.read()  # read everything, never answer
            writer.close()

        srv = await asyncio.start_unix_server(mute, path)
        async with await Client.connect(path) as c:
            with pytest.raises(TtrpcError) as ei:
                await c.call(SVC, "Echo", StringValue(), StringValue, timeout=0.05)
            assert ei.value.code == Code.DEADLINE_EXCEEDED
        srv.close()
        await srv.wait_closed()
    run(main())


def test_peer_uid_mismatch_is_rejected(tmp_path, caplog):
    async def main():
        path = str(tmp_path / "s.sock")
        server = await _start(path, allowed_uid=os.geteuid() + 4242)
        c = await Client.connect(path)  # the kernel accepts; the server drops us at once
        with caplog.at_level(logging.WARNING, logger="bench.rpc.ttrpc"):
            with pytest.raises(TtrpcError) as ei:
                await c.call(SVC, "Echo", StringValue(), StringValue, timeout=10)
            await c.wait_closed()
        assert ei.value.code == Code.UNAVAILABLE
        assert "rejected peer" in caplog.text and server.connections == 0
        await c.close()
        await server.close()
        # and the default (our own euid) admits us
        server = await _start(path)
        async with await Client.connect(path) as c2:
            assert (await c2.call(SVC, "Echo", StringValue(value="me"), StringValue)).value == "me"
        await server.close()
    run(main())


def test_connection_loss_fails_pending_calls_unavailable(tmp_path):
    async def main():
        path = str(tmp_path / "drop.sock")
        got_request = asyncio.Event()

        async def drop(reader, writer):
            await reader.readexactly(HEADER_SIZE)
            got_request.set()
            writer.transport.abort()

        srv = await asyncio.start_unix_server(drop, path)
        c = await Client.connect(path)
        calls = [asyncio.create_task(c.call(SVC, "Echo", StringValue(), StringValue))
                 for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert got_request.is_set()
        assert all(isinstance(r, TtrpcError) and r.code == Code.UNAVAILABLE for r in results)
        with pytest.raises(TtrpcError) as ei:  # later calls fail fast, same code
            await c.call(SVC, "Echo", StringValue(), StringValue)
        assert ei.value.code == Code.UNAVAILABLE
        await c.close()
        srv.close()
        await srv.wait_closed()
    run(main())


def test_server_close_removes_socket_cancels_handlers_leaves_no_tasks(tmp_path):
    async def main():
        path = str(tmp_path / "s.sock")
        server = Server()
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def hang(req, ctx):
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        server.register(SVC, {"Hang": (StringValue, hang)})
        await server.start(path)
        assert os.path.exists(path)
        c = await Client.connect(path)
        pending = asyncio.create_task(c.call(SVC, "Hang", StringValue(), StringValue))
        await started.wait()
        await server.close()
        assert cancelled.is_set()
        assert not os.path.exists(path)
        with pytest.raises(TtrpcError) as ei:
            await pending
        assert ei.value.code == Code.UNAVAILABLE
        await c.close()
        await server.wait_closed()  # returns at once after close
        assert asyncio.all_tasks() == {asyncio.current_task()}
        with pytest.raises(TtrpcError):
            await Client.connect(path)
    asyncio.run(main())  # no wait_for wrapper: it would be a task of its own (pytest-timeout guards)
