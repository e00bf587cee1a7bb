"""Owns: method tables of the gRPC services we serve or call under their real wire paths.

The Sandbox API has two wire generations behind ONE path prefix
(`/containerd.services.sandbox.v1.Controller/<Method>`): "legacy" (Gen A, 10 RPCs) and
"current" (Gen B, containerd 2.x).  Their messages live in different proto packages here
(`sandbox_legacy.proto` vs `sandbox_current.proto`); these tables bind each schema's classes to
the real paths.  CRI is served from the `runtime.v1` classes under both `runtime.v1` and
`runtime.v1alpha2` (same shapes).  The Task API / Events tables are for the ttrpc module
(service string + bare method name instead of a gRPC path).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.pb import events_pb2 as events
from bench.rpc.pb import sandbox_current_pb2 as current
from bench.rpc.pb import sandbox_legacy_pb2 as legacy
from bench.rpc.pb import task_v2_pb2 as task_v2

MessageType = type[Message]
MethodTable = Mapping[str, tuple[MessageType, MessageType]]


def service_table(service: ServiceDescriptor) -> dict[str, tuple[MessageType, MessageType]]:
    """method name -> (request class, response class) of a unary service descriptor."""
    return {
        m.name: (message_factory.GetMessageClass(m.input_type),
                 message_factory.GetMessageClass(m.output_type))
        for m in service.methods
    }


def method_path(service: str, method: str) -> str:
    """The gRPC path `/<full service name>/<Method>`."""
    return f"/{service}/{method}"


# ------------------------------------------------------------------------- Sandbox API

SANDBOX_SERVICE = "containerd.services.sandbox.v1.Controller"

SANDBOX_SCHEMAS: dict[str, MethodTable] = {
    "legacy": {
        "Create": (legacy.ControllerCreateRequest, legacy.ControllerCreateResponse),
        "Start": (legacy.ControllerStartRequest, legacy.ControllerStartResponse),
        "Platform": (legacy.ControllerPlatformRequest, legacy.ControllerPlatformResponse),
        "Prepare": (legacy.PrepareRequest, legacy.PrepareResponse),
        "Purge": (legacy.PurgeRequest, legacy.PurgeResponse),
        "UpdateResources": (legacy.UpdateResourcesRequest, legacy.UpdateResourcesResponse),
        "Stop": (legacy.ControllerStopRequest, legacy.ControllerStopResponse),
        "Wait": (legacy.ControllerWaitRequest, legacy.ControllerWaitResponse),
        "Status": (legacy.ControllerStatusRequest, legacy.ControllerStatusResponse),
        "Shutdown": (legacy.ControllerShutdownRequest, legacy.ControllerShutdownResponse),
    },
    "current": service_table(current.DESCRIPTOR.services_by_name["Controller"]),
}


def _schema(schema: str) -> MethodTable:
    try:
        return SANDBOX_SCHEMAS[schema]
    except KeyError:
        raise ValueError(f"unknown Sandbox API schema {schema!r}; "
                         f"expected one of {sorted(SANDBOX_SCHEMAS)}") from None


def sandbox_path(method: str) -> str:
    return method_path(SANDBOX_SERVICE, method)


def _unary_handlers(servicer: Any, table: MethodTable) -> dict[str, grpc.RpcMethodHandler]:
    # Methods the servicer lacks are left out: grpc answers UNIMPLEMENTED for them.
    out: dict[str, grpc.RpcMethodHandler] = {}
    for name, (req, resp) in table.items():
        fn = getattr(servicer, name, None)
        if fn is not None:
            out[name] = grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString,
                response_serializer=resp.SerializeToString)
    return out


def controller_handler(servicer: Any, schema: str) -> grpc.GenericRpcHandler:
    """Serve `servicer` (async methods named like the RPCs, taking (request, context)) as the
    Sandbox Controller with the given schema ("legacy" | "current"), at the real paths."""
    return grpc.method_handlers_generic_handler(
        SANDBOX_SERVICE, _unary_handlers(servicer, _schema(schema)))


class _Stub:
    """Attributes = `channel.unary_unary(path)` callables, one per method of a table."""

    _what: str = ""
    _others: frozenset[str] = frozenset()

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel, service: str,
                 table: MethodTable) -> None:
        self.service = service
        self.methods = tuple(table)
        for name, (req, resp) in table.items():
            setattr(self, name, channel.unary_unary(
                method_path(service, name), request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString))

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup failed
        if name in self._others:
            raise AttributeError(f"{self._what} has no method {name!r} "
                                 f"(it has: {', '.join(self.methods)})")
        raise AttributeError(name)


class ControllerStub(_Stub):
    """Client of the Sandbox Controller in one schema; works with sync and aio channels."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel, schema: str) -> None:
        table = _schema(schema)
        self.schema = schema
        self._what = f"Sandbox API schema {schema!r}"
        self._others = frozenset(m for t in SANDBOX_SCHEMAS.values() for m in t) - set(table)
        super().__init__(channel, SANDBOX_SERVICE, table)


# ------------------------------------------------------------------------------ CRI

CRI_SERVICES: dict[str, str] = {
    "v1": "runtime.v1.RuntimeService",
    "v1alpha2": "runtime.v1alpha2.RuntimeService",
}
CRI_METHODS: MethodTable = service_table(cri.DESCRIPTOR.services_by_name["RuntimeService"])


def cri_service(version: str) -> str:
    try:
        return CRI_SERVICES[version]
    except KeyError:
        raise ValueError(f"unknown CRI version {version!r}; "
                         f"expected one of {sorted(CRI_SERVICES)}") from None


def cri_path(method: str, version: str = "v1") -> str:
    return method_path(cri_service(version), method)


def cri_handlers(servicer: Any,
                 versions: Iterable[str] = ("v1", "v1alpha2")) -> list[grpc.GenericRpcHandler]:
    """One generic handler per CRI version, all backed by the runtime.v1 message classes."""
    handlers = _unary_handlers(servicer, CRI_METHODS)
    return [grpc.method_handlers_generic_handler(cri_service(v), handlers) for v in versions]


class CriStub(_Stub):
    """Client of `runtime.<version>.RuntimeService` (v1 classes for either version)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel, version: str = "v1") -> None:
        self.version = version
        self._what = f"CRI {version} RuntimeService (as modelled in cri_v1.proto)"
        super().__init__(channel, cri_service(version), CRI_METHODS)


# ------------------------------------------------------------- ttrpc services (tables only)

TASK_V2_SERVICE = "containerd.task.v2.Task"
TASK_V2_METHODS: MethodTable = service_table(task_v2.DESCRIPTOR.services_by_name["Task"])
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
EVENTS_METHODS: MethodTable = service_table(events.DESCRIPTOR.services_by_name["Events"])
