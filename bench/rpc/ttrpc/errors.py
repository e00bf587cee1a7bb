"""Owns: ttrpc status errors: the gRPC status code table and `TtrpcError`.

ttrpc reuses gRPC's status codes (google.rpc.Code) and carries them in `Response.status`.
We keep our own table instead of importing `grpc.StatusCode` so that ttrpc-only processes (a
shim, an in-guest agent) do not pay for importing grpc; a test checks the numbers match grpc.
"""
from __future__ import annotations

import enum
from typing import Iterable

from bench.rpc.pb import ttrpc_pb2


class Code(enum.IntEnum):
    """gRPC status codes, same numbers as `grpc.StatusCode` / google.rpc.Code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def _as_code(code: int) -> Code | int:
    # Peers may send codes we do not know; keep the raw int rather than failing the call.
    try:
        return Code(code)
    except ValueError:
        return int(code)


class TtrpcError(Exception):
    """A call ended with a non-OK status.

    Raised by `Client.call` for non-OK responses and local failures (deadline, lost
    connection, oversize message); raised by server handlers to answer with that status.
    """

    def __init__(self, code: int, message: str = "", details: Iterable[object] = ()) -> None:
        self.code = _as_code(code)
        self.message = message
        # google.protobuf.Any messages, passed through untouched.
        self.details = list(details)
        super().__init__(code, message)

    @property
    def code_name(self) -> str:
        return self.code.name if isinstance(self.code, Code) else str(self.code)

    def __str__(self) -> str:
        return f"{self.code_name}: {self.message}" if self.message else self.code_name

    def __repr__(self) -> str:
        return f"TtrpcError({self.code_name}, {self.message!r})"

    def to_status(self) -> ttrpc_pb2.Status:
        st = ttrpc_pb2.Status(code=int(self.code), message=self.message)
        if self.details:
            st.details.extend(self.details)
        return st

    @classmethod
    def from_status(cls, status: ttrpc_pb2.Status) -> "TtrpcError":
        return cls(status.code, status.message, status.details)
