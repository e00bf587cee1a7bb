"""Owns: the engine's error type and how backend failures map onto gRPC status codes.

Every failure that leaves the engine as a CRI error goes through `EngineError`, so the status
code is chosen once, here: bad input → INVALID_ARGUMENT, unknown objects → NOT_FOUND, a backend
(shim, sandboxer, task address) that is gone → UNAVAILABLE, a backend that does not answer in
time → DEADLINE_EXCEEDED.
"""
from __future__ import annotations

import asyncio
import errno

import grpc

from bench.rpc.ttrpc.errors import TtrpcError


class EngineError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def not_found(what: str) -> EngineError:
    return EngineError(grpc.StatusCode.NOT_FOUND, what)


def invalid(what: str) -> EngineError:
    return EngineError(grpc.StatusCode.INVALID_ARGUMENT, what)


def precondition(what: str) -> EngineError:
    return EngineError(grpc.StatusCode.FAILED_PRECONDITION, what)


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.EPIPE,
                       errno.ENOTCONN}


def code_of(number: int) -> grpc.StatusCode:
    return _BY_VALUE.get(int(number), grpc.StatusCode.UNKNOWN)


def from_backend(exc: BaseException, doing: str) -> EngineError:
    """Wrap a failure of a backend call (`doing` names it, e.g. "shim Task.Create")."""
    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, TtrpcError):
        return EngineError(code_of(int(exc.code)), f"{doing}: {exc.message or exc.code_name}")
    if isinstance(exc, grpc.aio.AioRpcError):
        return EngineError(exc.code(), f"{doing}: {exc.details()}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return EngineError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{doing}: no answer in time")
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return EngineError(grpc.StatusCode.UNAVAILABLE, f"{doing}: {exc.strerror or exc}")
    if isinstance(exc, ConnectionError):
        return EngineError(grpc.StatusCode.UNAVAILABLE, f"{doing}: {exc}")
    return EngineError(grpc.StatusCode.INTERNAL, f"{doing}: {type(exc).__name__}: {exc}")
