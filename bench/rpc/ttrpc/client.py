"""Owns: the asyncio ttrpc client: one connection, many multiplexed unary calls.

Design: an `asyncio.Protocol` (not StreamReader) parses frames inside `data_received` and
completes a per-call future looked up by stream id, so a round trip costs one write, one
callback and one future wake-up. Decoding of the Response envelope happens in the caller's
task, which keeps the reader callback tiny and lets a bad response fail only its own call.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Any, Iterable, Mapping, TypeVar

from bench.rpc.pb import ttrpc_pb2
from bench.rpc.ttrpc.address import display, socket_name
from bench.rpc.ttrpc.errors import Code, TtrpcError
from bench.rpc.ttrpc.framing import (HEADER, MAX_PAYLOAD, TYPE_REQUEST, TYPE_RESPONSE,
                                     FlowControlledProtocol, FrameError, FrameReader, oversize_error)

M = TypeVar("M")
Metadata = Mapping[str, "str | Iterable[str]"] | Iterable[tuple[str, str]] | None

_Request = ttrpc_pb2.Request
_KeyValue = ttrpc_pb2.KeyValue
_parse_response = ttrpc_pb2.Response.FromString
_pack = HEADER.pack
_MAX_STREAM_ID = (1 << 32) - 1


def _metadata_pairs(metadata: Metadata) -> list[ttrpc_pb2.KeyValue]:
    if not metadata:
        return []
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    out = []
    for key, value in items:
        if isinstance(value, str):
            out.append(_KeyValue(key=key, value=value))
        else:  # repeated key = multi-valued, as Go's ttrpc.MD does
            out.extend(_KeyValue(key=key, value=v) for v in value)
    return out


class _ClientConnection(FlowControlledProtocol):
    """Transport callbacks; owns the pending-call table."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.reader = FrameReader(self._on_frame, self._on_oversize)
        self.closed_error: TtrpcError | None = None
        self.lost = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except FrameError as exc:
            # The stream is out of sync: nothing after this point can be trusted.
            self.fail(TtrpcError(Code.UNAVAILABLE, f"ttrpc connection to {self.address}: {exc}"))
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        self.fail(TtrpcError(Code.UNAVAILABLE, f"ttrpc connection to {self.address} closed{why}"))
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake_writers()

    # -- frames -------------------------------------------------------------------------
    def _on_frame(self, sid: int, mtype: int, flags: int, payload: bytes) -> None:
        if mtype != TYPE_RESPONSE:
            return  # server-initiated streams/data are not supported; ignore like ttrpc 1.1
        fut = self.pending.pop(sid, None)
        if fut is not None and not fut.done():
            fut.set_result(payload)

    def _on_oversize(self, sid: int, mtype: int, length: int) -> None:
        fut = self.pending.pop(sid, None)
        if fut is not None and not fut.done():
            fut.set_exception(oversize_error("response", length))

    # -- helpers ------------------------------------------------------------------------
    def fail(self, err: TtrpcError) -> None:
        if self.closed_error is None:
            self.closed_error = err
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def drain(self) -> None:
        await self.wait_writable(self.closed_error is not None)


class Client:
    """A ttrpc client on one unix-socket connection.

    >>> async with await Client.connect("unix:///run/x.sock") as c:
    ...     resp = await c.call("containerd.task.v2.Task", "Connect", req, ConnectResponse)
    """

    def __init__(self, conn: _ClientConnection) -> None:
        self._conn = conn
        self._loop = asyncio.get_running_loop()
        self._next_id = 1  # client streams are odd and increasing

    @classmethod
    async def connect(cls, address: str, *, timeout: float | None = None) -> "Client":
        name = socket_name(address)
        loop = asyncio.get_running_loop()
        conn = _ClientConnection(display(name))
        try:
            await asyncio.wait_for(loop.create_unix_connection(lambda: conn, name), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise TtrpcError(Code.UNAVAILABLE,
                             f"cannot connect to ttrpc {display(name)}: {exc or 'timeout'}") from exc
        return cls(conn)

    @classmethod
    async def from_socket(cls, sock: socket.socket, *, label: str = "socket") -> "Client":
        """Wrap an already-connected AF_UNIX stream socket (e.g. one end of a socketpair)."""
        loop = asyncio.get_running_loop()
        conn = _ClientConnection(label)
        await loop.create_unix_connection(lambda: conn, sock=sock)
        return cls(conn)

    @property
    def address(self) -> str:
        return self._conn.address

    @property
    def closed(self) -> bool:
        return self._conn.closed_error is not None

    async def call(self, service: str, method: str, request: Any, response_cls: type[M], *,
                   timeout: float | None = None, metadata: Metadata = None) -> M:
        """Unary call; returns a `response_cls` message or raises TtrpcError."""
        data = await self.call_raw(service, method, request.SerializeToString(),
                                   timeout=timeout, metadata=metadata)
        try:
            return response_cls.FromString(data)  # type: ignore[attr-defined]
        except Exception as exc:  # protobuf DecodeError and friends
            raise TtrpcError(Code.INTERNAL,
                             f"{service}/{method}: cannot decode response: {exc}") from exc

    async def call_raw(self, service: str, method: str, payload: bytes, *,
                       timeout: float | None = None, metadata: Metadata = None) -> bytes:
        """Unary call with an already-serialized request; returns the response payload bytes.

        Useful for relays (a shim forwarding Task calls to an agent) that need no decoding.
        """
        conn = self._conn
        if conn.closed_error is not None:
            raise conn.closed_error
        req = _Request(service=service, method=method, payload=payload)
        if timeout is not None:
            if timeout <= 0:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: deadline already passed")
            req.timeout_nano = int(timeout * 1e9)
        if metadata:
            req.metadata.extend(_metadata_pairs(metadata))
        body = req.SerializeToString()
        n = len(body)
        if n > MAX_PAYLOAD:
            raise oversize_error(f"{service}/{method} request", n)
        sid = self._next_id
        if sid > _MAX_STREAM_ID:
            raise TtrpcError(Code.UNAVAILABLE, "ttrpc stream ids exhausted on this connection")
        self._next_id = sid + 2
        fut = self._loop.create_future()
        conn.pending[sid] = fut
        conn.transport.write(_pack(n, sid, TYPE_REQUEST, 0) + body)  # type: ignore[union-attr]
        timer = None
        if timeout is not None:
            # The server also gets timeout_nano, but a wedged or slow server must not hold us;
            # a loop timer is cheaper than wrapping the await in asyncio.wait_for.
            timer = self._loop.call_later(timeout, self._expire, sid, fut, service, method, timeout)
        try:
            if conn.paused:
                await conn.drain()
            data = await fut
        finally:
            if timer is not None:
                timer.cancel()
            conn.pending.pop(sid, None)  # no-op when answered; cleans up on cancel/timeout
        try:
            resp = _parse_response(data)
        except Exception as exc:
            raise TtrpcError(Code.INTERNAL,
                             f"{service}/{method}: undecodable ttrpc Response: {exc}") from exc
        status = resp.status
        if status.code:
            raise TtrpcError.from_status(status)
        return resp.payload

    @staticmethod
    def _expire(sid: int, fut: asyncio.Future[bytes], service: str, method: str,
                timeout: float) -> None:
        if not fut.done():
            fut.set_exception(TtrpcError(Code.DEADLINE_EXCEEDED,
                                         f"{service}/{method}: no response within {timeout:g}s"))

    async def close(self) -> None:
        conn = self._conn
        conn.fail(TtrpcError(Code.UNAVAILABLE, f"ttrpc client for {conn.address} closed"))
        if conn.transport is not None:
            conn.transport.close()
        await conn.lost

    async def wait_closed(self) -> None:
        """Return once the connection is gone (either side closed it)."""
        await self._conn.lost

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
