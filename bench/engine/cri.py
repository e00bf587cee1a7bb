"""Owns: the CRI RuntimeService servicer: request checks, translation to the manager, replies.

One servicer instance per served API version: `runtime.v1` routes runtime handlers to any
configured controller, `runtime.v1alpha2` always takes the shim chain (as iSulad does).  Each
lifecycle call runs as its own task shielded from the RPC's cancellation, under a deadline
taken from the client's (`controller.DEADLINE`), so a client that times out gets
DEADLINE_EXCEEDED while the engine finishes or rolls the operation back consistently.
Methods not defined here are answered UNIMPLEMENTED by grpc.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

import grpc

from bench.engine.controller import DEADLINE
from bench.engine.errors import EngineError
from bench.engine.manager import SandboxManager
from bench.engine.sandbox import Container, Sandbox, SandboxState
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.tracing import Tracer
from sim.vocabulary import (CALL_CREATE_CONTAINER, CALL_REMOVE_CONTAINER, CALL_REMOVE_POD,
                            CALL_RUN_POD, CALL_START_CONTAINER, CALL_STOP_CONTAINER,
                            CALL_STOP_POD)

log = logging.getLogger("chainbench.engine.cri")
T = TypeVar("T")

RUNTIME_NAME = "chainbench-engine"
RUNTIME_VERSION = "0.1.0"
MAX_ID_FIELD = 256  # refuse absurd id fields before even matching them


def _sandbox_config(sb: Sandbox) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig.FromString(sb.meta.config_bytes)


def _cri_state(sb: Sandbox) -> int:
    return cri.SANDBOX_READY if sb.state == SandboxState.RUNNING else cri.SANDBOX_NOTREADY


def _pod_metadata(sb: Sandbox) -> cri.PodSandboxMetadata:
    m = sb.meta
    return cri.PodSandboxMetadata(name=m.name, uid=m.uid, namespace=m.namespace,
                                  attempt=m.attempt)


def _labels_match(labels: dict[str, str], selector: Any) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class RuntimeServicer:
    def __init__(self, manager: SandboxManager, tracer: Tracer, api_version: str = "v1") -> None:
        self.m = manager
        self.tracer = tracer
        self.api_version = api_version
        self.shim_only = api_version == "v1alpha2"

    # ------------------------------------------------------------------ plumbing
    async def _op(self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
        remaining = context.time_remaining()
        loop = asyncio.get_running_loop()
        token = DEADLINE.set(loop.time() + remaining if remaining is not None else None)
        try:
            task = loop.create_task(fn())
        finally:
            DEADLINE.reset(token)
        # Consume a late failure so a client that gave up does not cause "never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.m.track(task)
        try:
            return await asyncio.shield(task)
        except EngineError as exc:
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("internal error")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")

    async def _check(self, context: grpc.aio.ServicerContext, value: str, what: str) -> None:
        if len(value) > MAX_ID_FIELD:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{what} is {len(value)} characters long")
        if not value:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is required")

    async def _abort(self, context: grpc.aio.ServicerContext, exc: EngineError) -> Any:
        await context.abort(exc.code, exc.message)

    def _record(self, pod: str, call: str, step: str, start: int, end: int) -> None:
        self.tracer.record(pod, call, step, start, end)

    # ------------------------------------------------------------------ version
    async def Version(self, request: cri.VersionRequest,
                      context: grpc.aio.ServicerContext) -> cri.VersionResponse:
        return cri.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME,
                                   runtime_version=RUNTIME_VERSION,
                                   runtime_api_version=self.api_version)

    # ------------------------------------------------------------------ pod sandboxes
    async def RunPodSandbox(self, request: cri.RunPodSandboxRequest,
                            context: grpc.aio.ServicerContext) -> cri.RunPodSandboxResponse:
        t0 = time.perf_counter_ns()
        if not request.HasField("config"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "config is required")
        t1 = time.perf_counter_ns()
        sid = await self._op(context, lambda: self.m.run_pod(
            request.config, request.runtime_handler, shim_only=self.shim_only))
        t2 = time.perf_counter_ns()
        resp = cri.RunPodSandboxResponse(pod_sandbox_id=sid)
        self._record(sid, CALL_RUN_POD, "cri.recv", t0, t1)
        self._record(sid, CALL_RUN_POD, "cri.reply", t2, time.perf_counter_ns())
        return resp

    async def _pod_call(self, context: grpc.aio.ServicerContext, call: str, ref: str,
                        fn: Callable[[], Awaitable[Any]]) -> None:
        t0 = time.perf_counter_ns()
        await self._check(context, ref, "pod_sandbox_id")
        try:
            pod = self.m.get_sandbox(ref).id
        except EngineError:
            pod = ""
        t1 = time.perf_counter_ns()
        await self._op(context, fn)
        if pod:
            self._record(pod, call, "cri.recv", t0, t1)

    async def StopPodSandbox(self, request: cri.StopPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> cri.StopPodSandboxResponse:
        await self._pod_call(context, CALL_STOP_POD, request.pod_sandbox_id,
                             lambda: self.m.stop_pod(request.pod_sandbox_id))
        return cri.StopPodSandboxResponse()

    async def RemovePodSandbox(self, request: cri.RemovePodSandboxRequest,
                               context: grpc.aio.ServicerContext) -> cri.RemovePodSandboxResponse:
        await self._pod_call(context, CALL_REMOVE_POD, request.pod_sandbox_id,
                             lambda: self.m.remove_pod(request.pod_sandbox_id))
        return cri.RemovePodSandboxResponse()

    async def PodSandboxStatus(self, request: cri.PodSandboxStatusRequest,
                               context: grpc.aio.ServicerContext) -> cri.PodSandboxStatusResponse:
        await self._check(context, request.pod_sandbox_id, "pod_sandbox_id")
        try:
            sb = self.m.get_sandbox(request.pod_sandbox_id)
        except EngineError as exc:
            return await self._abort(context, exc)
        config = _sandbox_config(sb)
        ns = config.linux.security_context.namespace_options
        status = cri.PodSandboxStatus(
            id=sb.id, metadata=_pod_metadata(sb), state=_cri_state(sb),
            created_at=sb.status.created_at if sb.status.created_at > 1 else 0,
            network=cri.PodSandboxNetworkStatus(ip=""),
            linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(options=ns)),
            labels=sb.meta.labels, annotations=sb.meta.annotations,
            runtime_handler=sb.meta.runtime_handler)
        info: dict[str, str] = {}
        if request.verbose:
            info = {"state": sb.state.name, "pid": str(sb.status.pid),
                    "task_address": sb.status.task_address,
                    "controller": sb.meta.controller,
                    "exit_status": str(sb.status.exit_status)}
        return cri.PodSandboxStatusResponse(status=status, info=info,
                                            timestamp=time.time_ns())

    async def ListPodSandbox(self, request: cri.ListPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> cri.ListPodSandboxResponse:
        f = request.filter
        items = []
        for sb in self.m.list_sandboxes():
            if f.id and not sb.id.startswith(f.id):
                continue
            if f.HasField("state") and _cri_state(sb) != f.state.state:
                continue
            if f.label_selector and not _labels_match(sb.meta.labels, f.label_selector):
                continue
            items.append(cri.PodSandbox(
                id=sb.id, metadata=_pod_metadata(sb), state=_cri_state(sb),
                created_at=sb.status.created_at if sb.status.created_at > 1 else 0,
                labels=sb.meta.labels, annotations=sb.meta.annotations,
                runtime_handler=sb.meta.runtime_handler))
        return cri.ListPodSandboxResponse(items=items)

    # ------------------------------------------------------------------ containers
    def _pod_of(self, container_ref: str) -> str:
        try:
            return self.m.get_container(container_ref).sandbox_id
        except EngineError:
            return ""

    async def _container_call(self, context: grpc.aio.ServicerContext, call: str, ref: str,
                              fn: Callable[[], Awaitable[Any]]) -> None:
        t0 = time.perf_counter_ns()
        await self._check(context, ref, "container_id")
        pod = self._pod_of(ref)
        t1 = time.perf_counter_ns()
        await self._op(context, fn)
        if pod:
            self._record(pod, call, "cri.recv", t0, t1)

    async def CreateContainer(self, request: cri.CreateContainerRequest,
                              context: grpc.aio.ServicerContext) -> cri.CreateContainerResponse:
        t0 = time.perf_counter_ns()
        await self._check(context, request.pod_sandbox_id, "pod_sandbox_id")
        if not request.HasField("config"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "config is required")
        t1 = time.perf_counter_ns()
        cid = await self._op(context, lambda: self.m.create_container(request.pod_sandbox_id,
                                                                       request.config))
        t2 = time.perf_counter_ns()
        resp = cri.CreateContainerResponse(container_id=cid)
        pod = self._pod_of(cid)
        if pod:
            self._record(pod, CALL_CREATE_CONTAINER, "cri.recv", t0, t1)
            self._record(pod, CALL_CREATE_CONTAINER, "cri.reply", t2, time.perf_counter_ns())
        return resp

    async def StartContainer(self, request: cri.StartContainerRequest,
                             context: grpc.aio.ServicerContext) -> cri.StartContainerResponse:
        await self._container_call(context, CALL_START_CONTAINER, request.container_id,
                                   lambda: self.m.start_container(request.container_id))
        return cri.StartContainerResponse()

    async def StopContainer(self, request: cri.StopContainerRequest,
                            context: grpc.aio.ServicerContext) -> cri.StopContainerResponse:
        await self._container_call(context, CALL_STOP_CONTAINER, request.container_id,
                                   lambda: self.m.stop_container(request.container_id,
                                                                 int(request.timeout)))
        return cri.StopContainerResponse()

    async def RemoveContainer(self, request: cri.RemoveContainerRequest,
                              context: grpc.aio.ServicerContext) -> cri.RemoveContainerResponse:
        await self._container_call(context, CALL_REMOVE_CONTAINER, request.container_id,
                                   lambda: self.m.remove_container(request.container_id))
        return cri.RemoveContainerResponse()

    def _container_status(self, ctr: Container) -> cri.ContainerStatus:
        return cri.ContainerStatus(
            id=ctr.id, metadata=cri.ContainerMetadata(name=ctr.name, attempt=ctr.attempt),
            state=int(ctr.state), created_at=ctr.created_at, started_at=ctr.started_at,
            finished_at=ctr.finished_at, exit_code=ctr.exit_code,
            image=cri.ImageSpec(image=ctr.image), image_ref=ctr.image, reason=ctr.reason,
            message=ctr.message, labels=ctr.labels, annotations=ctr.annotations,
            log_path=ctr.log_path)

    async def ContainerStatus(self, request: cri.ContainerStatusRequest,
                              context: grpc.aio.ServicerContext) -> cri.ContainerStatusResponse:
        await self._check(context, request.container_id, "container_id")
        try:
            ctr = self.m.get_container(request.container_id)
        except EngineError as exc:
            return await self._abort(context, exc)
        info = {"pid": str(ctr.pid), "sandbox_id": ctr.sandbox_id} if request.verbose else {}
        return cri.ContainerStatusResponse(status=self._container_status(ctr), info=info)

    async def ListContainers(self, request: cri.ListContainersRequest,
                             context: grpc.aio.ServicerContext) -> cri.ListContainersResponse:
        f = request.filter
        out = []
        for ctr in self.m.list_containers():
            if f.id and not ctr.id.startswith(f.id):
                continue
            if f.pod_sandbox_id and not ctr.sandbox_id.startswith(f.pod_sandbox_id):
                continue
            if f.HasField("state") and int(ctr.state) != f.state.state:
                continue
            if f.label_selector and not _labels_match(ctr.labels, f.label_selector):
                continue
            out.append(cri.Container(
                id=ctr.id, pod_sandbox_id=ctr.sandbox_id,
                metadata=cri.ContainerMetadata(name=ctr.name, attempt=ctr.attempt),
                image=cri.ImageSpec(image=ctr.image), image_ref=ctr.image,
                state=int(ctr.state), created_at=ctr.created_at, labels=ctr.labels,
                annotations=ctr.annotations))
        return cri.ListContainersResponse(containers=out)

