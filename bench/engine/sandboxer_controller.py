"""Owns: the sandbox chain's controller: a client of a sandboxer's Sandbox API (gRPC, legacy or
current schema) plus the pod's Task API at the address the sandboxer returns.

RunPodSandbox = Controller.Create (options = Any holding the binary PodSandboxConfig; type_url
`runtime.v1.PodSandboxConfig` for current, empty for legacy like iSulad) → Controller.Start
(returns the task address: `address` current / `task_address` legacy) → dial that address.
Containers: the sandboxer hears about each one before Task.Create — legacy Prepare (returns the
bundle) / Purge, current Update(fields=["extensions.tasks"]) with the full `{"tasks": [...]}`
JSON document (wire-contracts §1.7) — then Task.Create/Start go straight to the task address.

Wait is a long unary call in the background, handled like iSulad (§1.6): OK → exit;
UNAVAILABLE → PENDING, probe with Platform until it answers, then RUNNING and Wait again; any
other error → exit with the gRPC code as the status.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import grpc
from google.protobuf import any_pb2, timestamp_pb2

from bench.engine.config import EngineConfig, RuntimeConfig
from bench.engine.controller import ContainerRun, ExitInfo, StartInfo, StatusCallback, call_timeout
from bench.engine.errors import EngineError, from_backend
from bench.engine.sandbox import Container, Sandbox, SandboxState, now_ns
from bench.engine.spec import build_container_spec, pod_cgroup_path
from bench.engine.store import Store
from bench.engine.tasks import TaskApiController, ts_ns
from bench.rpc.pb import containerd_types_pb2 as ctypes_pb
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.pb import sandbox_current_pb2 as current
from bench.rpc.pb import sandbox_legacy_pb2 as legacy
from bench.rpc.schemas import ControllerStub
from bench.runtimes import assets
from bench.tracing import Tracer

log = logging.getLogger("chainbench.engine.sandboxer")

CONFIG_TYPE_URL = "runtime.v1.PodSandboxConfig"
# The OCI Process alone (containerd's typeurl for specs.Process): what a guest agent runs.
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
TASKS_TYPE_URL = "github.com/containerd/containerd/Tasks"
PROBE_INTERVAL_S = 1.0  # iSulad probes every 5 s; shorter so benches see recovery sooner


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


class SandboxerController(TaskApiController):
    kind = "sandboxer"

    def __init__(self, cfg: EngineConfig, rt: RuntimeConfig, store: Store,
                 tracer: Tracer) -> None:
        super().__init__(cfg, tracer)
        self.rt = rt
        self.store = store
        self.schema = rt.schema
        self.pb = current if rt.schema == "current" else legacy
        self.channel: grpc.aio.Channel | None = None
        self.stub: Any = None
        self.rootfs = ""
        self._tasks: dict[str, dict[str, Any]] = {}  # current schema: last tasks document

    async def init(self) -> None:
        self.rootfs = str(await asyncio.to_thread(assets.ensure_rootfs))
        target = self.rt.address
        if not target.startswith("unix:"):
            target = "unix:" + target
        # grpc connects lazily and reconnects by itself after a sandboxer restart.
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])
        self.stub = ControllerStub(self.channel, self.schema)

    async def close(self) -> None:
        await super().close()
        if self.channel is not None:
            await self.channel.close()

    def _ids(self, sb: Sandbox) -> dict[str, str]:
        return {"sandboxer": self.rt.sandboxer, "sandbox_id": sb.id}

    async def _rpc(self, sb: Sandbox, call: str | None, step: str | None, method: str,
                   req: Any, timeout: float | None = -1.0) -> Any:
        fn = getattr(self.stub, method)
        t = call_timeout(self.cfg.call_timeout_s) if timeout == -1.0 else timeout
        try:
            if call is not None and step is not None:
                async with self.tracer.aspan(sb.id, call, step):
                    return await fn(req, timeout=t)
            return await fn(req, timeout=t)
        except Exception as exc:
            raise from_backend(exc, f"sandboxer {method}") from None

    # -- sandbox -------------------------------------------------------------------------
    async def create(self, sb: Sandbox, call: str) -> None:
        options = any_pb2.Any(type_url=CONFIG_TYPE_URL if self.schema == "current" else "",
                              value=sb.meta.config_bytes)
        if self.schema == "current":
            sandbox = ctypes_pb.Sandbox(
                sandbox_id=sb.id, runtime=ctypes_pb.Sandbox.Runtime(name=self.rt.name),
                labels={"name": sb.meta.name}, sandboxer=self.rt.sandboxer,
                created_at=_ts(now_ns()))
            req = current.ControllerCreateRequest(
                **self._ids(sb), options=options, netns_path="", sandbox=sandbox,
                annotations=sb.meta.annotations)
        else:
            req = legacy.ControllerCreateRequest(**self._ids(sb), options=options, netns_path="")
        await self._rpc(sb, call, "sandbox.create", "Create", req)
        sb.status.backend["created"] = True

    async def start(self, sb: Sandbox, call: str) -> StartInfo:
        resp = await self._rpc(sb, call, "sandbox.start", "Start",
                               self.pb.ControllerStartRequest(**self._ids(sb)))
        if self.schema == "current":
            address, version = resp.address, int(resp.version or 2)
        else:
            address, version = resp.task_address, 2
        if not address:
            raise EngineError(grpc.StatusCode.INTERNAL,
                              "sandboxer Start returned no task address")
        if version != 2:
            raise EngineError(grpc.StatusCode.UNIMPLEMENTED,
                              f"sandboxer wants Task API version {version}; only 2 is spoken")
        await self._dial(sb, address, call)
        return StartInfo(pid=int(resp.pid), created_at=ts_ns(resp.created_at) or now_ns(),
                         task_address=address, version=version, labels=dict(resp.labels))

    async def wait(self, sb: Sandbox, cb: StatusCallback) -> None:
        req = self.pb.ControllerWaitRequest(**self._ids(sb))
        while True:
            try:
                resp = await self.stub.Wait(req)
            except grpc.aio.AioRpcError as exc:
                if self._closing:
                    return
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    cb.on_exit(ExitInfo(int(exc.code().value[0]), now_ns()))
                    return
                cb.on_pending()
                code = await self._probe(sb)
                if code != grpc.StatusCode.OK:
                    cb.on_exit(ExitInfo(int(code.value[0]), now_ns()))
                    return
                # A restarted sandboxer serves the task address anew (maybe elsewhere).
                await self.drop_client(sb)
                try:
                    await self.status(sb)
                except EngineError as err:
                    log.warning("sandbox %s: Status after reconnect: %s", sb.id[:12], err)
                cb.on_ready()
                continue
            cb.on_exit(ExitInfo(int(resp.exit_status), ts_ns(resp.exited_at)))
            return

    async def _probe(self, sb: Sandbox) -> grpc.StatusCode:
        """Platform until the sandboxer answers; OK, or the non-UNAVAILABLE code it gave."""
        req = self.pb.ControllerPlatformRequest(**self._ids(sb))
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self.stub.Platform(req, timeout=PROBE_INTERVAL_S * 5)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    return exc.code()

    async def stop(self, sb: Sandbox, timeout_s: float, call: str) -> ExitInfo | None:
        req = self.pb.ControllerStopRequest(**self._ids(sb), timeout_secs=int(timeout_s))
        try:
            await self._rpc(sb, call, "sandbox.stop", "Stop", req)
        except EngineError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            return ExitInfo(sb.status.exit_status, now_ns())
        return None  # the Wait reports the exit

    async def status(self, sb: Sandbox) -> str:
        resp = await self._rpc(sb, None, None, "Status",
                               self.pb.ControllerStatusRequest(**self._ids(sb)))
        address = resp.address if self.schema == "current" else resp.task_address
        if address:
            sb.status.task_address = address
        return str(resp.state)

    async def recover(self, sb: Sandbox) -> bool:
        try:
            state = await self.status(sb)
        except EngineError as exc:
            if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise  # the sandboxer is down, not the sandbox: the manager waits for it
            log.warning("sandbox %s: sandboxer Status failed: %s", sb.id[:12], exc)
            return False
        return state == "SANDBOX_READY"

    async def shutdown(self, sb: Sandbox, call: str) -> None:
        req = self.pb.ControllerShutdownRequest(**self._ids(sb))
        try:
            await self._rpc(sb, call, "sandbox.shutdown", "Shutdown", req)
        except EngineError as exc:
            # A Create that failed as UNAVAILABLE never reached the sandboxer: nothing to
            # shut down there, so an unreachable sandboxer must not pin the record.
            never_created = not sb.status.backend.get("created") and \
                sb.state != SandboxState.RUNNING
            if exc.code != grpc.StatusCode.NOT_FOUND and not (
                    never_created and exc.code == grpc.StatusCode.UNAVAILABLE):
                raise
        await self.drop_client(sb)
        self._tasks.pop(sb.id, None)

    # -- containers ----------------------------------------------------------------------
    async def build_container(self, sb: Sandbox, ctr: Container, config: Any) -> ContainerRun:
        # No namespace joins here: the sandboxer points the spec at the pod's pinned ones.
        pod = cri.PodSandboxConfig.FromString(sb.meta.config_bytes)
        spec = build_container_spec(ctr.id, config, self.rootfs, {},
                                    cgroups_path=pod_cgroup_path(pod, ctr.id))
        return ContainerRun(container=ctr, spec=spec)

    def _create_options(self, run: ContainerRun) -> Any | None:
        # A microVM's agent cannot read the host bundle (Kuasar shares it over virtio-fs; we
        # have no shared dir), so the process travels in the Create call itself.
        if not self.rt.vm:
            return None
        process = run.spec.get("process") or {}
        return any_pb2.Any(type_url=PROCESS_TYPE_URL,
                           value=json.dumps(process, separators=(",", ":")).encode())

    def _doc(self, sb: Sandbox) -> dict[str, Any]:
        doc = self._tasks.get(sb.id)
        if doc is None:
            doc = self.store.load_tasks(sb.id)
            self._tasks[sb.id] = doc
        return doc

    async def _send_tasks(self, sb: Sandbox, tasks: list[dict[str, Any]], call: str) -> None:
        doc = {"tasks": tasks}
        ts = _ts(now_ns())
        sandbox = ctypes_pb.Sandbox(
            sandbox_id=sb.id, runtime=ctypes_pb.Sandbox.Runtime(name=self.rt.name),
            labels={"name": sb.meta.name}, sandboxer=self.rt.sandboxer,
            created_at=_ts(sb.status.created_at), updated_at=ts)
        sandbox.extensions["tasks"].CopyFrom(any_pb2.Any(
            type_url=TASKS_TYPE_URL, value=json.dumps(doc, separators=(",", ":")).encode()))
        req = current.ControllerUpdateRequest(sandbox_id=sb.id, sandboxer=self.rt.sandboxer,
                                              sandbox=sandbox, fields=["extensions.tasks"])
        await self._rpc(sb, call, "sandbox.update", "Update", req)
        self._tasks[sb.id] = doc
        self.store.save_tasks(sb.id, doc)

    async def _announce(self, sb: Sandbox, run: ContainerRun, call: str) -> str:
        cid = run.container.id
        if self.schema == "legacy":
            spec = any_pb2.Any(type_url="", value=json.dumps(run.spec).encode())
            req = legacy.PrepareRequest(**self._ids(sb), container_id=cid, exec_id="",
                                        spec=spec)
            resp = await self._rpc(sb, call, "sandbox.update", "Prepare", req)
            run.container.bundle = resp.bundle
            return str(resp.bundle)
        tasks = [t for t in self._doc(sb)["tasks"] if t.get("task_id") != cid]
        tasks.append({"task_id": cid, "spec": run.spec, "rootfs": run.rootfs, "stdin": "",
                      "stdout": "", "stderr": "", "processes": []})
        await self._send_tasks(sb, tasks, call)
        return ""

    async def _retract(self, sb: Sandbox, ctr: Container, call: str) -> None:
        if self.schema == "legacy":
            req = legacy.PurgeRequest(**self._ids(sb), container_id=ctr.id, exec_id="")
            try:
                await self._rpc(sb, call, "sandbox.update", "Purge", req)
            except EngineError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
            return
        doc = self._doc(sb)
        tasks = [t for t in doc["tasks"] if t.get("task_id") != ctr.id]
        if len(tasks) != len(doc["tasks"]):
            await self._send_tasks(sb, tasks, call)
