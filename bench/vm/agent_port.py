"""Owns: serving a ttrpc server on a virtio-serial port (the guest end of the host↔guest channel).

A virtio-serial port is a character device, not a socket, and it has no accept(): the host side
(QEMU's chardev socket) connects and disconnects while the guest keeps the port open.  The guest
learns of it only through the port itself: with the host away, poll() reports POLLHUP and read()
returns 0; writes block (or EAGAIN) until the host is back.  Every host connection is a fresh
ttrpc session (its stream ids restart at 1), so each one gets its own server protocol instance on
a small transport over the shared fd.

Waiting for the host uses SIGIO (the driver signals O_ASYNC owners on every host open/close and
on data), not a busy poll: under TCG an idle poll loop would burn the host CPU the other VMs need.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import signal
import sys
from typing import Any, Callable

_READ_CHUNK = 256 * 1024
_HIGH_WATER = 1 << 20  # pause the protocol's writers above this many buffered bytes
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


class PortTransport(asyncio.Transport):
    """One host session on the port fd.  Closing it ends the session but keeps the fd open:
    closing the fd would tell the host the guest went away."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: asyncio.Protocol,
                 on_lost: Callable[[], None]) -> None:
        super().__init__()
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._on_lost = on_lost
        self._buf = bytearray()
        self._closing = False
        self._paused = False
        loop.add_reader(fd, self._read_ready)
        protocol.connection_made(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"fd": self._fd}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(exc)
            return
        if not data:  # the host end disconnected
            self._lose(None)
            return
        self._protocol.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buf:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._lose(exc)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._loop.add_writer(self._fd, self._write_ready)
        self._buf += data
        if not self._paused and len(self._buf) > _HIGH_WATER:
            self._paused = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        try:
            n = os.write(self._fd, self._buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lose(exc)
            return
        del self._buf[:n]
        if not self._buf:
            self._loop.remove_writer(self._fd)
            if self._paused:
                self._paused = False
                self._protocol.resume_writing()

    def close(self) -> None:
        self._lose(None)

    def abort(self) -> None:
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._buf.clear()  # bytes for a host that is gone are worthless to the next one
        self._loop.call_soon(self._protocol.connection_lost, exc)
        self._loop.call_soon(self._on_lost)


def _drain_stale(fd: int) -> None:
    """Drop bytes a departed host left behind, so the next session starts on a frame boundary."""
    while True:
        try:
            if not os.read(fd, _READ_CHUNK):
                return
        except OSError:
            return


def _set_async(fd: int, on: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    flags = (flags | os.O_ASYNC) if on else (flags & ~os.O_ASYNC)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


async def serve_port(protocol_factory: Callable[[], asyncio.Protocol], path: str,
                     stop: asyncio.Event) -> None:
    """Serve host sessions on the port at `path` one after another until `stop` is set."""
    loop = asyncio.get_running_loop()
    fd = open_port(path)
    changed = asyncio.Event()
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    loop.add_signal_handler(signal.SIGIO, changed.set)
    stopper = loop.create_task(stop.wait())
    sessions = 0
    try:
        while not stop.is_set():
            # Arm SIGIO before looking, so a host arriving in between still wakes us.
            _set_async(fd, True)
            changed.clear()
            if not host_connected(fd):
                _drain_stale(fd)
                # The host (template snapshots) reads this to know the guest is idle.
                print(waiting_line(sessions), file=sys.stderr, flush=True)
                while not host_connected(fd) and not stop.is_set():
                    waiter = loop.create_task(changed.wait())
                    await asyncio.wait({waiter, stopper}, timeout=_FALLBACK_WAKE_S,
                                       return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    changed.clear()
                if stop.is_set():
                    break
            # In a session SIGIO would fire on every read; the fd's readiness is enough.
            _set_async(fd, False)
            lost = loop.create_future()
            PortTransport(loop, fd, protocol_factory(),
                          lambda: lost.done() or lost.set_result(None))
            await asyncio.wait({lost, stopper}, return_when=asyncio.FIRST_COMPLETED)
            sessions += 1
            if not lost.done():
                break
    finally:
        stopper.cancel()
        loop.remove_signal_handler(signal.SIGIO)
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        os.close(fd)
