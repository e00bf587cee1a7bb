"""Owns: tests of ttrpc framing, status codes and address parsing (no sockets)."""
from __future__ import annotations

import grpc
import pytest

from bench.rpc.pb import ttrpc_pb2
from bench.rpc.ttrpc import (HEADER_SIZE, MAX_PAYLOAD, TYPE_REQUEST, TYPE_RESPONSE, Code,
                             FrameError, FrameReader, TtrpcError, decode_header, encode_frame,
                             socket_name)

# wire-contracts §5.2 worked example: Connect(ConnectRequest{id:"c1"}) on stream 1.
EXAMPLE = bytes.fromhex("00000028 00000001 01 00".replace(" ", "")) + (
    b"\x0a\x17containerd.task.v2.Task" b"\x12\x07Connect" b"\x1a\x04\x0a\x02c1")


def _collect():
    frames, oversize = [], []
    reader = FrameReader(lambda *f: frames.append(f), lambda *o: oversize.append(o))
    return reader, frames, oversize


def test_worked_example_encodes_exactly():
    # ConnectRequest{id:"c1"} is field 1 string: 0a 02 "c1" — built by hand, no Task proto needed.
    req = ttrpc_pb2.Request(service="containerd.task.v2.Task", method="Connect",
                            payload=b"\x0a\x02c1")
    body = req.SerializeToString()
    assert len(body) == 40
    assert encode_frame(1, TYPE_REQUEST, body) == EXAMPLE
    assert EXAMPLE[:HEADER_SIZE] == bytes([0, 0, 0, 0x28, 0, 0, 0, 1, 1, 0])


def test_worked_example_decodes():
    assert decode_header(EXAMPLE) == (40, 1, TYPE_REQUEST, 0)
    reader, frames, _ = _collect()
    reader.feed(EXAMPLE)
    ((sid, mtype, flags, payload),) = frames
    assert (sid, mtype, flags) == (1, TYPE_REQUEST, 0)
    req = ttrpc_pb2.Request.FromString(payload)
    assert (req.service, req.method, req.payload) == ("containerd.task.v2.Task", "Connect",
                                                      b"\x0a\x02c1")
    assert req.timeout_nano == 0 and not req.metadata


def test_reader_handles_byte_by_byte_and_coalesced_chunks():
    stream = b"".join(encode_frame(sid, TYPE_RESPONSE, b"p" * sid) for sid in (1, 3, 5, 7))
    stream += encode_frame(9, TYPE_RESPONSE, b"")  # empty payload is a valid frame
    reader, frames, _ = _collect()
    for i in range(len(stream)):
        reader.feed(stream[i:i + 1])
    assert [(f[0], f[3]) for f in frames] == [(1, b"p"), (3, b"ppp"), (5, b"p" * 5),
                                              (7, b"p" * 7), (9, b"")]
    assert reader.buffered == 0
    reader2, frames2, _ = _collect()
    reader2.feed(stream[:13])
    reader2.feed(stream[13:])
    assert frames2 == frames
    assert all(type(f[3]) is bytes for f in frames2)


def test_encode_refuses_oversize():
    assert len(encode_frame(1, TYPE_REQUEST, b"\0" * MAX_PAYLOAD)) == MAX_PAYLOAD + HEADER_SIZE
    with pytest.raises(TtrpcError) as ei:
        encode_frame(1, TYPE_REQUEST, b"\0" * (MAX_PAYLOAD + 1))
    assert ei.value.code == Code.RESOURCE_EXHAUSTED


def test_oversize_frame_is_skipped_across_chunks_and_stream_resyncs():
    big = MAX_PAYLOAD + 100
    data = (encode_frame(1, TYPE_RESPONSE, b"a")
            + decode_bytes_header(big, 3, TYPE_REQUEST) + b"\0" * big
            + encode_frame(5, TYPE_RESPONSE, b"b"))
    reader, frames, oversize = _collect()
    step = 1 << 16
    for i in range(0, len(data), step):
        reader.feed(data[i:i + step])
    assert [(f[0], f[3]) for f in frames] == [(1, b"a"), (5, b"b")]
    assert oversize == [(3, TYPE_REQUEST, big)]


def decode_bytes_header(length: int, sid: int, mtype: int, flags: int = 0) -> bytes:
    from bench.rpc.ttrpc import HEADER
    return HEADER.pack(length, sid, mtype, flags)


@pytest.mark.parametrize("bad", [
    decode_bytes_header(1, 1, 0x09),  # unknown type
    decode_bytes_header(0, 1, 0x00),
    b"\xff" * 10,  # garbage: reserved length byte set
])
def test_malformed_header_raises(bad):
    reader, _, _ = _collect()
    with pytest.raises(FrameError, match="malformed"):
        reader.feed(bad + b"\0")


def test_codes_match_grpc_status_codes():
    for sc in grpc.StatusCode:
        assert Code[sc.name] == sc.value[0]
    assert len(Code) == len(grpc.StatusCode)
    assert Code.NOT_FOUND == 5 and Code.RESOURCE_EXHAUSTED == 8 and Code.UNIMPLEMENTED == 12


def test_error_status_round_trip():
    err = TtrpcError(Code.NOT_FOUND, "container x")
    assert str(err) == "NOT_FOUND: container x"
    back = TtrpcError.from_status(ttrpc_pb2.Status.FromString(err.to_status().SerializeToString()))
    assert (back.code, back.message) == (Code.NOT_FOUND, "container x")
    assert TtrpcError(99, "future").code == 99  # unknown codes survive as ints


@pytest.mark.parametrize("addr,name", [
    ("/run/x.sock", "/run/x.sock"),
    ("unix:///run/x.sock", "/run/x.sock"),
    ("ttrpc+unix:///run/x.sock", "/run/x.sock"),
    ("@shim-abc", "\0shim-abc"),
    ("unix://@shim-abc", "\0shim-abc"),
    ("\0raw", "\0raw"),
    ("rel/x.sock", "rel/x.sock"),
])
def test_socket_name(addr, name):
    assert socket_name(addr) == name


@pytest.mark.parametrize("addr", ["", "unix://", "vsock://3:1024"])
def test_socket_name_rejects(addr):
    with pytest.raises(ValueError):
        socket_name(addr)
