"""Owns: the Sandbox API Controller servicer (gRPC) for the legacy and the current schema.

One class serves both schemas: the field names it reads are common to both generations, and
the few differences (legacy `task_address` vs current `address`+`version`; legacy Prepare/
Purge/UpdateResources vs current Update/Metrics) are switched on `self.legacy`.  Methods of the
other schema are absent from the registered handler table (bench.rpc.schemas), so a peer
calling them gets UNIMPLEMENTED.
"""
from __future__ import annotations

import functools
import json
import logging
from typing import Any, Awaitable, Callable

import grpc

from bench.rpc.pb import containerd_types_pb2 as ctypes_pb
from bench.rpc.pb import cri_v1_pb2
from bench.rpc.schemas import SANDBOX_SCHEMAS
from bench.rpc.ttrpc import Code
from bench.sandboxer import bundle as bundles
from bench.sandboxer import nspin
from bench.sandboxer.manager import (TASK_API_VERSION, Manager, SbxError, created_at, timestamp,
                                     valid_id)
from sim.vocabulary import CALL_CREATE_CONTAINER, CALL_REMOVE_CONTAINER

log = logging.getLogger("bench.sandboxer")

TASKS_EXTENSION = "tasks"
TASKS_FIELD = "extensions.tasks"


def _rpc(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map our errors to gRPC status codes; never let a bug surface as a bare UNKNOWN."""
    @functools.wraps(fn)
    async def wrapper(self: "ControllerServicer", request: Any, context: Any) -> Any:
        try:
            return await fn(self, request, context)
        except SbxError as exc:
            await context.abort(grpc.StatusCode[exc.code.name], exc.message)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: {exc}")
    return wrapper


def _pod_config(options: Any) -> cri_v1_pb2.PodSandboxConfig | None:
    # Kuasar decodes options.value as binary PodSandboxConfig whatever the type_url says.
    if options is None or not options.value:
        return None
    try:
        return cri_v1_pb2.PodSandboxConfig.FromString(options.value)
    except Exception as exc:
        log.warning("options are not a PodSandboxConfig (%s); ignored", exc)
        return None


class ControllerServicer:
    def __init__(self, manager: Manager, schema: str) -> None:
        if schema not in SANDBOX_SCHEMAS:
            raise ValueError(f"unknown schema {schema!r}")
        self.m = manager
        self.schema = schema
        self.legacy = schema == "legacy"
        self._resp = {name: classes[1] for name, classes in SANDBOX_SCHEMAS[schema].items()}

    # ------------------------------------------------------------------ common RPCs
    @_rpc
    async def Create(self, request: Any, context: Any) -> Any:
        cfg = _pod_config(request.options)
        pod = hostname = ""
        pinned = nspin.DEFAULT_PLAN
        annotations: dict[str, str] = {}
        if cfg is not None:
            pod, hostname = cfg.metadata.name, cfg.hostname
            nso = cfg.linux.security_context.namespace_options
            pinned = nspin.plan(nso.ipc, nso.network, request.netns_path)
            annotations.update(cfg.annotations)
        if not self.legacy:
            annotations.update(request.annotations)  # the request's own win over the pod's
        sb = await self.m.create(request.sandbox_id, request.netns_path, pod, hostname, pinned,
                                 annotations)
        return self._resp["Create"](sandbox_id=sb.id)

    @_rpc
    async def Start(self, request: Any, context: Any) -> Any:
        sb = await self.m.start(request.sandbox_id)
        resp = self._resp["Start"](sandbox_id=sb.id, pid=self.m.pid(sb),
                                   created_at=created_at(sb))
        if self.legacy:
            resp.task_address = self.m.address(sb, legacy=True)
        else:
            resp.address = self.m.address(sb, legacy=False)
            resp.version = TASK_API_VERSION
        return resp

    @_rpc
    async def Platform(self, request: Any, context: Any) -> Any:
        # A connectivity probe for iSulad: answered for any well-formed id, known or not.
        if request.sandbox_id:
            valid_id(request.sandbox_id)
        return self._resp["Platform"](platform=ctypes_pb.Platform(os="linux",
                                                                  architecture="amd64"))

    @_rpc
    async def Stop(self, request: Any, context: Any) -> Any:
        await self.m.stop(request.sandbox_id)
        return self._resp["Stop"]()

    @_rpc
    async def Wait(self, request: Any, context: Any) -> Any:
        sb = await self.m.wait(request.sandbox_id)
        return self._resp["Wait"](exit_status=sb.exit_status,
                                  exited_at=timestamp(sb.exited_at_ns))

    @_rpc
    async def Status(self, request: Any, context: Any) -> Any:
        sb = self.m.get(request.sandbox_id)
        resp = self._resp["Status"](sandbox_id=sb.id, pid=self.m.pid(sb),
                                    state=self.m.state_name(sb), created_at=created_at(sb))
        if sb.exited_at_ns:
            resp.exited_at.CopyFrom(timestamp(sb.exited_at_ns))
        if request.verbose:
            resp.info.update({"name": sb.pod, "pinned": ",".join(sb.pinned),
                              "backend": sb.backend, "boot": sb.boot,
                              "netns_path": sb.netns_path, "dir": sb.dir,
                              "containers": ",".join(sorted(sb.containers))})
        if self.legacy:
            resp.task_address = self.m.address(sb, legacy=True)
        else:
            resp.address = self.m.address(sb, legacy=False)
            resp.version = TASK_API_VERSION if resp.address else 0
        return resp

    @_rpc
    async def Shutdown(self, request: Any, context: Any) -> Any:
        await self.m.shutdown(request.sandbox_id)
        return self._resp["Shutdown"]()

    # ------------------------------------------------------------------ legacy only
    @_rpc
    async def Prepare(self, request: Any, context: Any) -> Any:
        sb = self.m.get(request.sandbox_id)
        stdio = (request.stdin, request.stdout, request.stderr)
        with self.m.tracer.span(sb.id, CALL_CREATE_CONTAINER, "sandbox.update"):
            try:
                spec = json.loads(request.spec.value or b"null")
            except ValueError as exc:
                raise SbxError(Code.INVALID_ARGUMENT, f"spec is not JSON: {exc}") from None
            if request.exec_id:
                self.m.containers.prepare_exec(sb, request.container_id, request.exec_id, spec,
                                               stdio)
                return self._resp["Prepare"]()
            if not isinstance(spec, dict):
                raise SbxError(Code.INVALID_ARGUMENT, "spec must be an OCI runtime spec object")
            bundle = self.m.containers.prepare(sb, request.container_id, spec,
                                               bundles.mounts_from_proto(request.rootfs),
                                               stdio, request.terminal)
        return self._resp["Prepare"](bundle=bundle)

    @_rpc
    async def Purge(self, request: Any, context: Any) -> Any:
        sb = self.m.get(request.sandbox_id)
        with self.m.tracer.span(sb.id, CALL_REMOVE_CONTAINER, "sandbox.update"):
            await self.m.containers.purge(sb, request.container_id, request.exec_id)
        return self._resp["Purge"]()

    @_rpc
    async def UpdateResources(self, request: Any, context: Any) -> Any:
        # Kuasar's legacy implementation was a no-op too; the ids are still checked.
        sb = self.m.get(request.sandbox_id)
        valid_id(request.container_id, "container id")
        if request.container_id not in sb.containers:
            raise SbxError(Code.NOT_FOUND, f"container {request.container_id} not found")
        return self._resp["UpdateResources"]()

    # ------------------------------------------------------------------ current only
    @_rpc
    async def Update(self, request: Any, context: Any) -> Any:
        sid = request.sandbox_id or request.sandbox.sandbox_id
        sb = self.m.get(sid)
        if TASKS_FIELD not in request.fields:
            return self._resp["Update"]()
        ext = request.sandbox.extensions
        if TASKS_EXTENSION not in ext:
            raise SbxError(Code.INVALID_ARGUMENT,
                           f"fields has {TASKS_FIELD} but sandbox.extensions has no 'tasks'")
        try:
            doc = json.loads(ext[TASKS_EXTENSION].value or b"{}")
        except ValueError as exc:
            raise SbxError(Code.INVALID_ARGUMENT, f"tasks are not JSON: {exc}") from None
        # The engine sends the whole list on every add and remove: name the span's call by
        # whether this one adds a container.
        ids = {t.get("task_id") for t in doc.get("tasks") or [] if isinstance(t, dict)} \
            if isinstance(doc, dict) else set()
        call = CALL_CREATE_CONTAINER if ids - set(sb.containers) else CALL_REMOVE_CONTAINER
        with self.m.tracer.span(sb.id, call, "sandbox.update"):
            await self.m.containers.update_tasks(sb, doc)
        return self._resp["Update"]()

    @_rpc
    async def Metrics(self, request: Any, context: Any) -> Any:
        self.m.get(request.sandbox_id)
        return self._resp["Metrics"]()

