"""Owns: the load driver's CRI client (runtime.v1 over gRPC on a unix socket) and its call spans.

Every call has a deadline and is timed with `perf_counter_ns`; each one becomes a `client.call`
span (component "client") so all chains — including containerd, which emits no spans of its own —
get the end-to-end view of every CRI call.  Requests follow what kubelet sends for a
host-network pod (network NODE, pid CONTAINER, ipc POD), trimmed to what the runtimes read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc

from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.pb import cri_v1_pb2_grpc as cri_grpc
from sim.vocabulary import (CALL_CREATE_CONTAINER, CALL_REMOVE_CONTAINER, CALL_REMOVE_POD,
                            CALL_RUN_POD, CALL_START_CONTAINER, CALL_STOP_CONTAINER,
                            CALL_STOP_POD)

CLIENT_STEP = "client.call"
CLIENT_COMPONENT = "client"


class CriError(RuntimeError):
    """A CRI call failed; carries the gRPC status code name and the call."""

    def __init__(self, call: str, code: str, details: str) -> None:
        super().__init__(f"{call}: {code}: {details}")
        self.call, self.code, self.details = call, code, details


@dataclass
class Deadlines:
    """Per-call deadlines in seconds (a pod start may queue behind many others)."""

    run_pod: float = 120.0
    create: float = 60.0
    start: float = 60.0
    stop: float = 60.0
    remove: float = 60.0
    misc: float = 10.0


def pod_config(name: str, uid: str, namespace: str = "chainbench",
               cgroup_parent: str = "") -> cri.PodSandboxConfig:
    """A host-network pod: no CNI, no hostname (no UTS namespace, DESIGN §7)."""
    ns = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
        labels={"io.chainbench.pod": name},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=ns)),
    )


def container_config(name: str, image: str, command: list[str]) -> cri.ContainerConfig:
    ns = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=0),
        image=cri.ImageSpec(image=image),
        command=list(command[:1]),
        args=list(command[1:]),
        labels={"io.chainbench.container": name},
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(namespace_options=ns)),
    )


@dataclass
class CriClient:
    """`await CriClient(endpoint).run_pod_sandbox(...)`; spans accumulate in `.spans`."""

    endpoint: str  # unix:///path or a bare path
    deadlines: Deadlines = field(default_factory=Deadlines)
    spans: list[dict[str, Any]] = field(default_factory=list)
    _channel: grpc.aio.Channel | None = None
    _stub: cri_grpc.RuntimeServiceStub | None = None

    def _rt(self) -> cri_grpc.RuntimeServiceStub:
        if self._stub is None:
            target = self.endpoint
            if target.startswith("unix://"):
                target = "unix:" + target[len("unix://"):]
            elif not target.startswith("unix:"):
                target = "unix:" + target
            # A large pod ramp opens many concurrent streams on one connection: fine for HTTP/2.
            self._channel = grpc.aio.insecure_channel(target, options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.enable_retries", 0),
            ])
            self._stub = cri_grpc.RuntimeServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def _call(self, call: str, pod: str, fn: Callable[..., Awaitable[Any]], req: Any,
                    timeout: float) -> Any:
        start = time.perf_counter_ns()
        ok = False
        try:
            resp = await fn(req, timeout=timeout)
            ok = True
            return resp
        except grpc.aio.AioRpcError as exc:
            raise CriError(call, exc.code().name, exc.details() or "") from None
        finally:
            if pod:
                self.spans.append({"pod": pod, "call": call, "step": CLIENT_STEP,
                                   "component": CLIENT_COMPONENT, "start_ns": start,
                                   "end_ns": time.perf_counter_ns(), "ok": ok})

    # -- calls -----------------------------------------------------------------------------------
    async def version(self, timeout: float | None = None) -> cri.VersionResponse:
        return await self._call("Version", "", self._rt().Version,
                                cri.VersionRequest(version="v1"), timeout or self.deadlines.misc)

    async def run_pod_sandbox(self, config: cri.PodSandboxConfig, handler: str = "",
                              pod: str = "") -> str:
        resp = await self._call(CALL_RUN_POD, pod, self._rt().RunPodSandbox,
                                cri.RunPodSandboxRequest(config=config, runtime_handler=handler),
                                self.deadlines.run_pod)
        if not resp.pod_sandbox_id:
            raise CriError(CALL_RUN_POD, "INTERNAL", "empty pod_sandbox_id in reply")
        return str(resp.pod_sandbox_id)

    async def create_container(self, pod_id: str, config: cri.ContainerConfig,
                               sandbox_config: cri.PodSandboxConfig, pod: str = "") -> str:
        resp = await self._call(CALL_CREATE_CONTAINER, pod, self._rt().CreateContainer,
                                cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                                           sandbox_config=sandbox_config),
                                self.deadlines.create)
        if not resp.container_id:
            raise CriError(CALL_CREATE_CONTAINER, "INTERNAL", "empty container_id in reply")
        return str(resp.container_id)

    async def start_container(self, container_id: str, pod: str = "") -> None:
        await self._call(CALL_START_CONTAINER, pod, self._rt().StartContainer,
                         cri.StartContainerRequest(container_id=container_id),
                         self.deadlines.start)

    async def stop_container(self, container_id: str, timeout_s: int = 0, pod: str = "") -> None:
        await self._call(CALL_STOP_CONTAINER, pod, self._rt().StopContainer,
                         cri.StopContainerRequest(container_id=container_id, timeout=timeout_s),
                         self.deadlines.stop + timeout_s)

    async def remove_container(self, container_id: str, pod: str = "") -> None:
        await self._call(CALL_REMOVE_CONTAINER, pod, self._rt().RemoveContainer,
                         cri.RemoveContainerRequest(container_id=container_id),
                         self.deadlines.remove)

    async def stop_pod_sandbox(self, pod_id: str, pod: str = "") -> None:
        await self._call(CALL_STOP_POD, pod, self._rt().StopPodSandbox,
                         cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), self.deadlines.stop)

    async def remove_pod_sandbox(self, pod_id: str, pod: str = "") -> None:
        await self._call(CALL_REMOVE_POD, pod, self._rt().RemovePodSandbox,
                         cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                         self.deadlines.remove)

    async def list_pod_sandbox_ids(self) -> list[str]:
        resp = await self._call("ListPodSandbox", "", self._rt().ListPodSandbox,
                                cri.ListPodSandboxRequest(), self.deadlines.misc)
        return [str(p.id) for p in resp.items]

    async def list_container_ids(self) -> list[tuple[str, str]]:
        """(container id, pod sandbox id) of every container the runtime knows."""
        resp = await self._call("ListContainers", "", self._rt().ListContainers,
                                cri.ListContainersRequest(), self.deadlines.misc)
        return [(str(c.id), str(c.pod_sandbox_id)) for c in resp.containers]

    async def remove_everything(self) -> list[str]:
        """Stop and remove every container and pod the runtime lists; returns what was found
        (empty after a complete teardown).  Errors are reported, not raised: this is the last
        CRI step before the process sweep."""
        notes: list[str] = []
        try:
            for cid, _ in await self.list_container_ids():
                notes.append(f"container {cid[:12]} left after teardown")
                for call in (lambda: self.stop_container(cid, 0),
                             lambda: self.remove_container(cid)):
                    try:
                        await call()
                    except CriError as exc:
                        notes.append(f"sweep container {cid[:12]}: {exc}")
            for pid in await self.list_pod_sandbox_ids():
                notes.append(f"pod {pid[:12]} left after teardown")
                for call in (lambda: self.stop_pod_sandbox(pid),
                             lambda: self.remove_pod_sandbox(pid)):
                    try:
                        await call()
                    except CriError as exc:
                        notes.append(f"sweep pod {pid[:12]}: {exc}")
        except CriError as exc:  # a dead daemon: the process sweep handles what it left
            notes.append(f"CRI sweep failed: {exc}")
        return notes
