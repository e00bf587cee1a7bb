"""Owns: the public face of chainbench's ttrpc implementation (client, server, errors, framing).

ttrpc is containerd's lightweight RPC: protobuf messages in 10-byte-header frames over a unix
socket (shared/wire-contracts.md §5). Python has no ttrpc library, so this package is ours.

    from bench.rpc.ttrpc import Client, Server, TtrpcError, Code
"""
from __future__ import annotations

from bench.rpc.ttrpc.address import socket_name
from bench.rpc.ttrpc.client import Client
from bench.rpc.ttrpc.errors import Code, TtrpcError
from bench.rpc.ttrpc.framing import (FLAG_NO_DATA, FLAG_REMOTE_CLOSED, FLAG_REMOTE_OPEN, HEADER,
                                     HEADER_SIZE, MAX_PAYLOAD, TYPE_DATA, TYPE_REQUEST,
                                     TYPE_RESPONSE, FrameError, FrameReader, decode_header,
                                     encode_frame)
from bench.rpc.ttrpc.server import CallContext, Method, Server

__all__ = [
    "CallContext", "Client", "Code", "FLAG_NO_DATA", "FLAG_REMOTE_CLOSED", "FLAG_REMOTE_OPEN",
    "FrameError", "FrameReader", "HEADER", "HEADER_SIZE", "MAX_PAYLOAD", "Method", "Server",
    "TYPE_DATA", "TYPE_REQUEST", "TYPE_RESPONSE", "TtrpcError", "decode_header", "encode_frame",
    "socket_name",
]
