"""Owns: the ttrpc frame format (10-byte header + payload) and the incremental frame reader.

Wire format (shared/wire-contracts.md §5.1), all big-endian:
    u32 payload length (<= 4 MiB) | u32 stream id | u8 type | u8 flags | payload

`FrameReader` turns arbitrary chunks from `data_received` into whole frames. It is written for
the hot path: one preallocated `struct.Struct`, no per-frame objects besides the payload bytes,
and a fast path that parses straight out of the incoming chunk when nothing is buffered.
"""
from __future__ import annotations

import asyncio
import struct
from typing import Callable

from bench.rpc.ttrpc.errors import Code, TtrpcError

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_PAYLOAD = 4 << 20  # 4 MiB, as in containerd/ttrpc

TYPE_REQUEST = 0x01
TYPE_RESPONSE = 0x02
TYPE_DATA = 0x03
_KNOWN_TYPES = (TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA)

# Request flags (ttrpc >= 1.2 streaming); unary requests carry 0.
FLAG_REMOTE_CLOSED = 0x01
FLAG_REMOTE_OPEN = 0x02
# Data flag: the frame carries no payload.
FLAG_NO_DATA = 0x04

# The length's top byte is reserved and always 0 in a valid stream (4 MiB < 2**24). A length
# that sets it is not an "oversize message" we could skip, it is garbage: treat as malformed
# instead of discarding up to 4 GiB.
_GARBAGE_LENGTH = 1 << 24

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


class FrameError(Exception):
    """The byte stream is not ttrpc; the connection must be closed."""


def oversize_error(what: str, size: int) -> TtrpcError:
    return TtrpcError(Code.RESOURCE_EXHAUSTED,
                      f"{what} of {size} bytes exceeds the ttrpc limit of {MAX_PAYLOAD} bytes")


def encode_frame(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    """One frame as bytes; raises TtrpcError(RESOURCE_EXHAUSTED) if payload > 4 MiB."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise oversize_error("message", n)
    # One concatenated buffer -> one send() syscall; cheaper than two writes for small frames.
    return _pack(n, stream_id, mtype, flags) + payload


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int]:
    """(length, stream_id, type, flags) of the header at `offset`."""
    return _unpack_from(data, offset)


FrameCallback = Callable[[int, int, int, bytes], None]  # (stream_id, type, flags, payload)
OversizeCallback = Callable[[int, int, int], None]  # (stream_id, type, length)


class FrameReader:
    """Incremental frame parser.

    `feed(chunk)` calls `on_frame(stream_id, type, flags, payload)` for every complete frame and
    `on_oversize(stream_id, type, length)` once an over-limit frame's payload has been fully
    discarded (so the stream stays in sync and the connection remains usable). Raises
    FrameError for bytes that cannot be ttrpc (unknown type, reserved length byte set).
    """

    __slots__ = ("_buf", "_skip", "_skip_frame", "on_frame", "on_oversize")

    def __init__(self, on_frame: FrameCallback, on_oversize: OversizeCallback) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversize payload still to discard
        self._skip_frame: tuple[int, int, int] | None = None
        self.on_frame = on_frame
        self.on_oversize = on_oversize

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if self._skip:
                return
            sid, mtype, length = self._skip_frame  # type: ignore[misc]
            self._skip_frame = None
            self.on_oversize(sid, mtype, length)
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        end = len(src)
        pos = 0
        on_frame = self.on_frame
        while end - pos >= HEADER_SIZE:
            length, sid, mtype, flags = _unpack_from(src, pos)
            if mtype not in _KNOWN_TYPES:
                raise FrameError(f"malformed ttrpc frame: unknown message type 0x{mtype:02x} "
                                 f"(stream {sid}, length {length})")
            if length > MAX_PAYLOAD:
                if length >= _GARBAGE_LENGTH:
                    raise FrameError(f"malformed ttrpc frame: length 0x{length:08x} sets the "
                                     "reserved high byte")
                pos += HEADER_SIZE
                avail = end - pos
                if avail < length:
                    # Discard what we have and the rest as it arrives.
                    self._skip = length - avail
                    self._skip_frame = (sid, mtype, length)
                    pos = end
                    break
                pos += length
                self.on_oversize(sid, mtype, length)
                continue
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            payload = src[pos + HEADER_SIZE:stop]
            pos = stop
            # Callbacks may feed back into us only via later data_received calls, so src
            # stays valid for the rest of this loop.
            on_frame(sid, mtype, flags, payload if type(payload) is bytes else bytes(payload))
        if src is buf:
            del buf[:pos]
        elif pos < end:
            buf += src[pos:]


class FlowControlledProtocol(asyncio.Protocol):
    """Write-side back-pressure shared by client and server connections: the transport pauses
    us when its buffer is full and writers then wait in `wait_writable` until it resumes (or the
    connection goes away, which must wake them too)."""

    def __init__(self) -> None:
        self.paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait_writable(self, closed: bool) -> None:
        if self.paused and not closed:
            w = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(w)
            await w
