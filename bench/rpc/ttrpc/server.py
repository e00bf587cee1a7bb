"""Owns: the asyncio ttrpc server: listeners, per-connection frame handling, handler dispatch.

Each accepted connection is an `asyncio.Protocol`; every Request frame becomes its own task, so
handlers on one connection run concurrently and answer in any order (as ttrpc allows). Peers
are checked with SO_PEERCRED the way containerd's shims do (same uid only, by default).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from bench.rpc.pb import ttrpc_pb2
from bench.rpc.ttrpc.address import display, is_abstract, socket_name
from bench.rpc.ttrpc.errors import Code, TtrpcError
from bench.rpc.ttrpc.framing import (HEADER, MAX_PAYLOAD, TYPE_REQUEST, TYPE_RESPONSE,
                                     FlowControlledProtocol, FrameError, FrameReader)

log = logging.getLogger("bench.rpc.ttrpc")

Handler = Callable[[Any, "CallContext"], Awaitable[Any]]

_pack = HEADER.pack
_parse_request = ttrpc_pb2.Request.FromString
_Response = ttrpc_pb2.Response
_Status = ttrpc_pb2.Status
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


@dataclass(frozen=True, slots=True)
class Method:
    """One registered method.

    request_cls: protobuf message class the payload is decoded into, or None to hand the
    handler the raw payload bytes (relays). The handler returns a message (anything with
    SerializeToString) or bytes. response_cls is informational (docs, introspection).
    """

    request_cls: type | None
    handler: Handler
    response_cls: type | None = None


@dataclass(slots=True)
class CallContext:
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    stream_id: int
    metadata: dict[str, list[str]]  # keys lower-cased; repeated keys -> several values
    deadline: float | None  # in asyncio loop time (loop.time()); None = no deadline
    peer_pid: int | None = None
    peer_uid: int | None = None

    def get(self, key: str, default: str | None = None) -> str | None:
        values = self.metadata.get(key.lower())
        return values[0] if values else default

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()


def _normalize(spec: Method | tuple) -> Method:
    if isinstance(spec, Method):
        return spec
    if len(spec) == 2:
        return Method(spec[0], spec[1])
    if len(spec) == 3:
        return Method(spec[0], spec[2], spec[1])
    raise TypeError("method spec must be Method, (request_cls, handler) or "
                    "(request_cls, response_cls, handler)")


def _metadata(kvs: Any) -> dict[str, list[str]]:
    md: dict[str, list[str]] = {}
    for kv in kvs:
        md.setdefault(kv.key.lower(), []).append(kv.value)
    return md


class _ServerConnection(FlowControlledProtocol):
    def __init__(self, server: "Server") -> None:
        super().__init__()
        self.server = server
        self.services = server._services
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(self._on_frame, self._on_oversize)
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_sid = 0
        self.peer_pid: int | None = None
        self.peer_uid: int | None = None
        self.closing = False

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if server._closing:
            transport.abort()
            return
        if server.check_peer:
            reason = self._peer_rejection(transport)
            if reason:
                log.warning("ttrpc %s: rejected peer: %s", server.address, reason)
                self.closing = True
                transport.abort()
                return
        server._conns.add(self)

    def _peer_rejection(self, transport: asyncio.BaseTransport) -> str | None:
        sock = transport.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except (OSError, AttributeError) as exc:
            return f"cannot read SO_PEERCRED: {exc}"
        pid, uid, gid = _UCRED.unpack(raw)
        self.peer_pid, self.peer_uid = pid, uid
        want_uid = self.server.allowed_uid
        if want_uid is None:
            want_uid = os.geteuid()
        if uid != want_uid:
            return f"pid {pid} uid {uid} != allowed uid {want_uid}"
        want_gid = self.server.allowed_gid
        if want_gid is not None and gid != want_gid:
            return f"pid {pid} gid {gid} != allowed gid {want_gid}"
        return None

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except FrameError as exc:
            # Only this connection is out of sync; the listener and other peers carry on.
            log.error("ttrpc %s: closing connection from pid %s: %s",
                      self.server.address, self.peer_pid, exc)
            self.abort()

    def eof_received(self) -> bool:
        # Client closed its side: close ours too (in-flight handlers get cancelled), as
        # ttrpc's Go server does when its read loop ends.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        # The caller is gone, so are its deadlines: cancel handlers like a Go ctx would be.
        for t in list(self.tasks):
            t.cancel()
        self.server._conns.discard(self)
        self._wake_writers()

    def abort(self) -> None:
        self.closing = True
        for t in list(self.tasks):
            t.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -- frames -------------------------------------------------------------------------
    def _on_oversize(self, sid: int, mtype: int, length: int) -> None:
        if mtype == TYPE_REQUEST:
            self._reply_error(sid, Code.RESOURCE_EXHAUSTED,
                              f"message of {length} bytes exceeds the limit of {MAX_PAYLOAD}")

    def _on_frame(self, sid: int, mtype: int, flags: int, payload: bytes) -> None:
        if mtype != TYPE_REQUEST or self.closing:
            return  # Data/Response frames from a client: ignored, as ttrpc 1.1 does
        if not sid & 1:
            self._reply_error(sid, Code.INVALID_ARGUMENT, f"stream id {sid} must be odd")
            return
        if sid <= self.last_sid:
            self._reply_error(sid, Code.INVALID_ARGUMENT,
                              f"stream id {sid} must increase (last {self.last_sid})")
            return
        self.last_sid = sid
        if flags:
            self._reply_error(sid, Code.UNIMPLEMENTED, "streaming requests are not supported")
            return
        try:
            req = _parse_request(payload)
        except Exception as exc:
            self._reply_error(sid, Code.INVALID_ARGUMENT, f"undecodable ttrpc Request: {exc}")
            return
        methods = self.services.get(req.service)
        if methods is None:
            self._reply_error(sid, Code.UNIMPLEMENTED, f"service {req.service}")
            return
        m = methods.get(req.method)
        if m is None:
            self._reply_error(sid, Code.UNIMPLEMENTED, f"method {req.method}")
            return
        if m.request_cls is None:
            msg: Any = req.payload
        else:
            try:
                msg = m.request_cls.FromString(req.payload)
            except Exception as exc:
                self._reply_error(sid, Code.INTERNAL,
                                  f"{req.service}/{req.method}: cannot decode request: {exc}")
                return
        deadline = None
        if req.timeout_nano > 0:
            deadline = self.loop.time() + req.timeout_nano / 1e9
        ctx = CallContext(req.service, req.method, sid,
                          _metadata(req.metadata) if req.metadata else {},
                          deadline, self.peer_pid, self.peer_uid)
        task = self.loop.create_task(self._run(m.handler, msg, ctx))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, handler: Handler, msg: Any, ctx: CallContext) -> None:
        sid = ctx.stream_id
        try:
            if ctx.deadline is None:
                resp = await handler(msg, ctx)
            else:
                async with asyncio.timeout_at(ctx.deadline) as cm:
                    resp = await handler(msg, ctx)
                # A TimeoutError raised by the handler itself (not our deadline) falls to the
                # generic branch below; ours is recognised by cm.expired().
            body = resp if isinstance(resp, (bytes, bytearray)) else resp.SerializeToString()
        except TtrpcError as exc:
            self._reply_status(sid, exc.to_status())
            return
        except TimeoutError as exc:
            if ctx.deadline is not None and cm.expired():
                self._reply_error(sid, Code.DEADLINE_EXCEEDED,
                                  f"{ctx.service}/{ctx.method}: deadline exceeded")
            else:
                self._reply_handler_error(ctx, exc)
            return
        except Exception as exc:
            self._reply_handler_error(ctx, exc)
            return
        if len(body) > MAX_PAYLOAD - 16:  # room for the Response envelope's tag + length
            self._reply_error(sid, Code.RESOURCE_EXHAUSTED,
                              f"{ctx.service}/{ctx.method}: response of {len(body)} bytes "
                              f"exceeds the limit of {MAX_PAYLOAD}")
            return
        # Encode Response{payload} by hand: field 2, wire type 2 = tag 0x12 + varint length.
        # Avoids building a Response message per call on the hot path.
        if body:
            n = len(body)
            if n < 0x80:
                frame_body = b"\x12" + bytes((n,)) + body
            else:
                frame_body = _Response(payload=bytes(body)).SerializeToString()
        else:
            frame_body = b""
        self._write(sid, frame_body)
        if self.paused:
            await self._drain()

    def _reply_handler_error(self, ctx: CallContext, exc: BaseException) -> None:
        log.warning("ttrpc %s/%s (stream %d) handler failed: %r",
                    ctx.service, ctx.method, ctx.stream_id, exc, exc_info=exc)
        text = str(exc) or type(exc).__name__
        self._reply_error(ctx.stream_id, Code.UNKNOWN, text)

    def _reply_error(self, sid: int, code: int, message: str) -> None:
        self._reply_status(sid, _Status(code=int(code), message=message))

    def _reply_status(self, sid: int, status: ttrpc_pb2.Status) -> None:
        self._write(sid, _Response(status=status).SerializeToString())

    def _write(self, sid: int, body: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(_pack(len(body), sid, TYPE_RESPONSE, 0) + body)

    async def _drain(self) -> None:
        await self.wait_writable(self.closing)


class Server:
    """A ttrpc server.

    server = Server()
    server.register("containerd.task.v2.Task", {"Connect": (ConnectRequest, on_connect)})
    await server.start("unix:///run/x.sock")   # or serve_unix(...) to run until closed
    ...
    await server.close()

    allowed_uid: peers must have this SO_PEERCRED uid (default: our euid, like containerd's
    shims); allowed_gid likewise when not None; check_peer=False disables the check.
    """

    def __init__(self, *, check_peer: bool = True, allowed_uid: int | None = None,
                 allowed_gid: int | None = None) -> None:
        self.check_peer = check_peer
        self.allowed_uid = allowed_uid
        self.allowed_gid = allowed_gid
        self._services: dict[str, dict[str, Method]] = {}
        self._conns: set[_ServerConnection] = set()
        self._listener: asyncio.AbstractServer | None = None
        self._path: str | None = None  # filesystem socket we bound and must remove
        self._closing = False
        self._closed: asyncio.Event | None = None
        self.address = "(not listening)"

    def register(self, service: str, methods: Mapping[str, Method | tuple]) -> None:
        table = self._services.setdefault(service, {})
        for name, spec in methods.items():
            if name in table:
                raise ValueError(f"{service}/{name} already registered")
            table[name] = _normalize(spec)

    @property
    def services(self) -> dict[str, list[str]]:
        return {s: sorted(m) for s, m in self._services.items()}

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self, address: str) -> None:
        """Bind `address` (path, unix://path, ttrpc+unix://path or @abstract) and listen."""
        name = socket_name(address)
        loop = asyncio.get_running_loop()
        # asyncio removes a stale socket file at `name` before binding.
        self._listener = await loop.create_unix_server(lambda: _ServerConnection(self), name)
        self._path = None if is_abstract(name) else name
        self.address = display(name)
        self._closed = asyncio.Event()

    async def start_socket(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening AF_UNIX socket (e.g. inherited by fd)."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_unix_server(lambda: _ServerConnection(self), sock=sock)
        name = sock.getsockname()
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        self.address = display(name) if name else f"fd {sock.fileno()}"
        self._closed = asyncio.Event()

    async def start_fd(self, fd: int) -> None:
        """Serve on a listening socket given by file descriptor (family/type auto-detected)."""
        await self.start_socket(socket.socket(fileno=fd))

    async def serve_unix(self, address: str) -> None:
        """start(address), then run until close() is called."""
        await self.start(address)
        await self.wait_closed()

    async def serve_socket(self, sock: socket.socket) -> None:
        await self.start_socket(sock)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await self._closed.wait()

    async def close(self) -> None:
        """Stop listening, drop every connection, cancel handlers, remove the socket file."""
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        tasks: list[asyncio.Task[None]] = []
        for conn in list(self._conns):
            tasks.extend(conn.tasks)
            conn.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        # Let the transports' connection_lost callbacks (scheduled by abort) run.
        await asyncio.sleep(0)
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None
        if self._closed is not None:
            self._closed.set()

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
