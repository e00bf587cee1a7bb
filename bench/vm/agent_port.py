"""Owns: serving a ttrpc server on a virtio-serial port (the guest end of the host↔guest channel).

A virtio-serial port is a character device, not a socket: there is no accept(), and the guest
cannot see where one host connection ends and the next begins.  What the guest kernel gives:
  * a `host_connected` flag, set and cleared by control messages (poll: POLLHUP while clear;
    read: 0 once the flag is clear *and* no data is left; write: EAGAIN while clear);
  * data in 4 KiB buffers, each filled from one chunk QEMU read from its socket, so a new host's
    first bytes always start a read();
  * data and control messages travel on different virtqueues and the control ones are applied
    later, from a workqueue: a new host's request can be readable while the flag still says
    "no host", and a disconnect followed by a quick reconnect can go unnoticed altogether.
So a host's arrival or departure is only a hint, never a boundary in the byte stream: dropping
bytes or calls when the host "leaves" loses the next host's request (the old design drained
the port on every disconnect: about one back-to-back reconnect in 500 lost its request, and a
host that hung up mid-frame broke the next one's stream every time).

The port is therefore served as ONE transport (PortTransport) and ONE ttrpc connection
(PortSession) for the agent's life.  Telling host connections apart is done in-band: a new
client always opens with stream 1.  The transport only reads when the host is there, waits
without polling when it is not, and keeps unsent replies until a host can take them.
One ambiguity is inherent and left: the answer to a call whose host hung up before it was
answered can reach the next host if that one connects while the call runs; with both clients
numbering from 1, it may be taken for the answer to the new host's own stream 1.  Our clients
abandon calls only on timeouts; nothing hangs either way.

Waiting for the host uses SIGIO (the driver signals O_ASYNC owners on every control message
and on data), not a busy poll: under TCG an idle poll loop would burn the host CPU the other
VMs need.  While the host is away the fd is out of the event loop entirely: epoll reports
POLLHUP whatever it is asked for, which would spin a registered reader or writer.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import os
import select
import signal
import sys
from typing import Any, Callable

from bench.rpc.ttrpc.framing import TYPE_REQUEST, FrameError, FrameReader
from bench.rpc.ttrpc.server import Server, _ServerConnection

_READ_CHUNK = 64 * 1024  # one read() returns at most one 4 KiB guest buffer anyway
_READS_PER_WAKEUP = 64  # drain several buffers per event-loop wakeup
_HIGH_WATER = 1 << 20  # pause the protocol's writers above this many queued bytes
_FALLBACK_WAKE_S = 5.0  # a missed SIGIO (none seen so far) costs at most this much latency
WAITING_MARKER = "chainbench-agent: waiting for host"  # + f" after {n} sessions" on the console


def waiting_line(sessions: int) -> str:
    return f"{WAITING_MARKER} after {sessions} sessions"


def open_port(path: str, *, timeout: float = 30.0) -> int:
    """Open the port; ENXIO/ENOENT mean the device is not probed yet, so retry."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.ENOENT, errno.ENODEV) or \
                    time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def host_connected(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    for _fd, ev in p.poll(0):
        if ev & select.POLLHUP:
            return False
    return True


def _set_async(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    flags = (flags | os.O_ASYNC) if on else (flags & ~os.O_ASYNC)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


class PortTransport(asyncio.Transport):
    """The port fd as one long-lived transport, present host or not.

    Two states: *here* (fd in the event loop: reader always, writer while replies are queued)
    and *away* (fd out of the loop, O_ASYNC armed; SIGIO or a slow fallback timer calls
    `probe()`).  Data that arrives while away is still read and delivered: it is the next
    host's, come before its "connected" control message.  Writes while away are queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: asyncio.Protocol,
                 *, on_away: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._on_away = on_away
        self._out: collections.deque[bytes | memoryview] = collections.deque()
        self._out_bytes = 0
        self._head_started = False  # the head frame is partly written: it must be finished
        self._closing = False
        self._paused = False
        self._here = False
        self._writing = False
        self._timer: asyncio.TimerHandle | None = None
        self.departures = 0  # host departures seen (a quick reconnect may hide one)
        self.closed: asyncio.Future[None] = loop.create_future()
        protocol.connection_made(self)
        self._leave()  # arms SIGIO, then looks (and comes back at once when the host is there)

    # -- asyncio.Transport ----------------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"fd": self._fd}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_write_buffer_size(self) -> int:
        return self._out_bytes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._out and self._here:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if n == len(data):
                return
            self._head_started = n > 0
            data = memoryview(bytes(data))[n:]
        elif isinstance(data, (bytearray, memoryview)):
            data = bytes(data)  # the caller may reuse its buffer
        self._out.append(data)
        self._out_bytes += len(data)
        if self._here and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)
        if not self._paused and self._out_bytes > _HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def discard_queued(self) -> int:
        """Drop queued replies that have not started going out (they answer a host that is
        gone); a frame already partly written is finished, or the next host's stream would
        start mid-frame.  Returns the bytes dropped."""
        keep = self._out.popleft() if self._out and self._head_started else None
        dropped = self._out_bytes - (len(keep) if keep is not None else 0)
        self._out.clear()
        self._out_bytes = 0
        if keep is not None:
            self._out.append(keep)
            self._out_bytes = len(keep)
        else:
            self._stop_writing()
        self._maybe_resume()
        return dropped

    def close(self) -> None:
        self._shut(None)

    def abort(self) -> None:
        self._shut(None)

    # -- reading --------------------------------------------------------------------------
    def _read_ready(self) -> None:
        fd, proto = self._fd, self._protocol
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fatal(exc)
                return
            if not data:  # no data left and the host flag is clear: it went away
                if self._here:
                    self._leave()
                return
            proto.data_received(data)
            if self._closing:
                return

    # -- writing --------------------------------------------------------------------------
    def _write_ready(self) -> None:
        out = self._out
        while out:
            head = out[0]
            try:
                n = os.write(self._fd, head)  # the driver takes at most 32 KiB per call
            except BlockingIOError:
                if not host_connected(self._fd):
                    self._leave()  # queued until the next host; no spinning on POLLHUP
                return
            except OSError as exc:
                self._fatal(exc)
                return
            self._out_bytes -= n
            if n < len(head):
                out[0] = memoryview(head)[n:]
                self._head_started = True
                return
            out.popleft()
            self._head_started = False
        self._stop_writing()
        self._maybe_resume()

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _maybe_resume(self) -> None:
        if self._paused and self._out_bytes <= _HIGH_WATER // 2:
            self._paused = False
            self._protocol.resume_writing()

    # -- host presence --------------------------------------------------------------------
    def _arrive(self) -> None:
        # Answer first, register after: in a fresh clone every kernel and interpreter path runs
        # for the first time and TCG translates it before it runs (a first epoll_ctl cost
        # ~15 ms, a first fcntl pair ~5 ms), so what the host already sent is read and answered
        # before the fd goes into the event loop.
        self._here = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._out:
            self._write_ready()  # replies queued while away
        if self._here and not self._closing:
            self._read_ready()
        if not self._here or self._closing:
            return
        self._loop.add_reader(self._fd, self._read_ready)
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)
        _set_async(self._fd, False)  # in a session SIGIO would fire on every buffer

    def _leave(self) -> None:
        was_here, self._here = self._here, False
        self._loop.remove_reader(self._fd)
        self._stop_writing()
        # Arm SIGIO before looking again, so a host arriving in between still wakes us.
        _set_async(self._fd, True)
        if was_here:
            self.departures += 1
        self.probe()
        if not self._here and not self._closing and self._on_away is not None:
            self._on_away(self.departures)

    def probe(self) -> None:
        """SIGIO / fallback timer while away: deliver what is readable (it may be the next
        host's, ahead of its "connected" message) and come back once the host is there.
        read() says which: EAGAIN = host there and nothing left, 0 = still away."""
        if self._here or self._closing:
            return
        fd, proto = self._fd, self._protocol
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                self._arrive()
                return
            except OSError as exc:
                self._fatal(exc)
                return
            if not data:
                break
            proto.data_received(data)
            if self._closing:
                return
        else:  # more to read: continue after the loop's other callbacks
            self._loop.call_soon(self.probe)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(_FALLBACK_WAKE_S, self._fallback)

    def _fallback(self) -> None:
        self._timer = None
        self.probe()

    # -- end ------------------------------------------------------------------------------
    def _fatal(self, exc: Exception) -> None:
        # ENODEV: the port was unplugged; nothing else is expected on a virtio-serial port.
        print(f"chainbench-agent: port error: {exc!r}", file=sys.stderr, flush=True)
        self._shut(exc)

    def _shut(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._here = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop.remove_reader(self._fd)
        self._stop_writing()
        self._out.clear()
        self._out_bytes = 0
        self._loop.call_soon(self._protocol.connection_lost, exc)
        if not self.closed.done():
            self.closed.set_result(None)


# -- answers without protobuf ------------------------------------------------------------------
# After a restore the guest's TCG translation cache is empty: every C path run for the first time
# is translated first.  The readiness probe (Connect) is therefore answered from hand-read and
# hand-written wire bytes inside the protocol callback: no upb decoder, no Task, no message
# objects (agent.ready p50 -40 ms in an A/B under TCG).  Anything unusual takes the normal path.
InlineHandler = Callable[[bytes], "bytes | None"]  # request payload -> response payload | None


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def wire_fields(buf: bytes) -> dict[int, int | bytes]:
    """The top-level fields of an encoded protobuf message, number -> value (an int for
    varints, bytes otherwise; a repeated field keeps its last value).  ValueError/IndexError
    on bytes that are not a well-formed message."""
    out: dict[int, int | bytes] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        wt = key & 7
        if wt == 0:
            val: int | bytes
            val, pos = read_varint(buf, pos)
        elif wt == 2:
            n, pos = read_varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            val, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"wire type {wt}")
        if pos > end or key >> 3 == 0:
            raise ValueError("truncated message")
        out[key >> 3] = val
    return out


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def wire_uint(num: int, n: int) -> bytes:
    """A varint field as proto3 writes it (nothing for 0)."""
    return encode_varint(num << 3) + encode_varint(n) if n else b""


def wire_bytes(num: int, data: bytes) -> bytes:
    """A length-delimited field as proto3 writes it (nothing when empty)."""
    return encode_varint(num << 3 | 2) + encode_varint(len(data)) + data if data else b""


# A new client's first frame: length < 16 MiB (top byte 0), stream 1, Request, no flags, then
# the Request's `service` field (tag 0x0a).  It always starts a read() (see the docstring).
_OPENING = b"\0\0\0\1" + bytes((TYPE_REQUEST, 0, 0x0a))


def opens_session(chunk: bytes) -> bool:
    """Does `chunk` begin with the first frame of a new ttrpc client?"""
    return len(chunk) > 10 and chunk[0] == 0 and chunk[4:11] == _OPENING


class PortSession(_ServerConnection):
    """The agent's one ttrpc server connection on the port, across every host connection.

    A ttrpc client numbers its calls 1, 3, 5, ...: stream 1 once more means a new host.  The
    old host's calls are cancelled and its unsent replies dropped (they would answer stream ids
    the new client is about to use), numbering restarts.  A host that left mid-frame (QEMU
    drops what it had not read when its client hangs up) leaves a partial frame behind: a chunk
    that opens a new session discards it.  Bytes that are not ttrpc make the session skip
    everything up to the next new client instead of closing: the port cannot be reopened by
    the host, so closing would strand every later client.

    `inline`: methods of `inline_service` answered synchronously from wire bytes (see
    InlineHandler); a handler returning None sends the call down the regular path."""

    def __init__(self, server: Server, *, inline_service: str = "",
                 inline: dict[str, InlineHandler] | None = None) -> None:
        super().__init__(server)
        self.sessions = 0  # clients seen (stream 1 frames)
        self.resyncing = False
        self.inline_service = inline_service.encode()
        self.inline = {k.encode(): v for k, v in (inline or {}).items()}

    def _new_reader(self) -> None:
        self.reader = FrameReader(self._on_frame, self._on_oversize)

    def data_received(self, data: bytes) -> None:
        if opens_session(data):
            if self.reader.buffered or self.resyncing:
                print("chainbench-agent: dropped a partial frame of a departed host",
                      file=sys.stderr, flush=True)
            self._new_reader()  # a no-op at a frame boundary; drops a departed host's tail
            self.resyncing = False
        elif self.resyncing:
            return
        try:
            self.reader.feed(data)
        except FrameError as exc:
            print(f"chainbench-agent: {exc}; skipping to the next client", file=sys.stderr,
                  flush=True)
            self._new_reader()
            self.resyncing = True

    def _on_frame(self, sid: int, mtype: int, flags: int, payload: bytes) -> None:
        if sid == 1 and mtype == TYPE_REQUEST:
            self.sessions += 1
            if self.last_sid:
                for t in list(self.tasks):
                    t.cancel()
                if self.transport is not None:
                    self.transport.discard_queued()  # type: ignore[attr-defined]
                self.last_sid = 0
        # Only what the regular path would accept (odd, increasing, unary) is answered inline.
        if self.inline and mtype == TYPE_REQUEST and sid & 1 and sid > self.last_sid and \
                not flags and not self.closing:
            body = self._answer_inline(payload)
            if body is not None:
                self.last_sid = sid
                self._write(sid, wire_bytes(2, body))  # ttrpc Response{payload}
                return
        super()._on_frame(sid, mtype, flags, payload)

    def _answer_inline(self, payload: bytes) -> bytes | None:
        try:
            req = wire_fields(payload)  # ttrpc Request: service=1, method=2, payload=3
        except (ValueError, IndexError):
            return None
        handler = self.inline.get(req.get(2))  # type: ignore[arg-type]
        body = req.get(3, b"")
        if handler is None or req.get(1) != self.inline_service or not isinstance(body, bytes):
            return None
        return handler(body)


async def serve_port(server: Server, path: str, stop: asyncio.Event, *,
                     inline_service: str = "", inline: dict[str, InlineHandler] | None = None,
                     ) -> None:
    """Serve `server`'s services on the port at `path` until `stop` is set (or the port
    fails); `inline` as for PortSession."""
    loop = asyncio.get_running_loop()
    fd = open_port(path)
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    transport: PortTransport | None = None

    def on_sigio() -> None:
        if transport is not None:
            transport.probe()

    def on_away(departures: int) -> None:
        # The host (template snapshots) reads this to know the guest is idle.
        print(waiting_line(departures), file=sys.stderr, flush=True)

    loop.add_signal_handler(signal.SIGIO, on_sigio)
    try:
        session = PortSession(server, inline_service=inline_service, inline=inline)
        transport = PortTransport(loop, fd, session, on_away=on_away)
        stopper = loop.create_task(stop.wait())
        # The transport also ends by itself on a fatal port error.
        await asyncio.wait({stopper, transport.closed}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGIO)
        if transport is not None:
            transport.close()
            await asyncio.sleep(0)  # let connection_lost run
        os.close(fd)
