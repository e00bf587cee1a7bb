"""Owns: the shim chain's controller: a pause container per pod in a real
`containerd-shim-runc-v2`, and the pod's containers in that same shim.

RunPodSandbox = write the pause bundle → shim `start` (fork/exec, read the ttrpc address) →
dial it → Task.Create + Task.Start of the pause.  Containers are Task.Create'd in the same shim
with a bundle whose spec joins the pause's namespaces.  The sandbox's Wait is a Task.Wait on
the pause; a lost shim connection counts as the sandbox exiting (the pod shows NotReady).

When a shim has died (SIGKILL), nothing can be asked of it any more: Stop and Remove fall back
to the shim binary's `delete` action per container (runc delete --force, unmount), then remove
the stale socket — what containerd does for a dead shim.  Shims are deliberately not cleaned
up when the engine exits: pods outlive the engine and are recovered by the next one.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2

from bench.engine.config import EngineConfig, RuntimeConfig
from bench.engine.controller import ContainerRun, ExitInfo, StartInfo, StatusCallback, call_timeout
from bench.engine.errors import EngineError, from_backend
from bench.engine.sandbox import Container, Sandbox, now_ns
from bench.engine.spec import build_container_spec, pod_cgroup_path
from bench.engine.store import Store
from bench.engine.tasks import TaskApiController, is_unavailable, ts_ns
from bench.processes import ProcessRegistry, process_start_ticks
from bench.rpc.pb import containerd_task_types_pb2 as task_types
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.rpc.pb import runc_options_pb2
from bench.runtimes import assets, oci
from bench.runtimes.shimv2 import (ShimConfig, ShimError, ShimHandle, delete_shim,
                                   find_shim_daemon, remove_stale_socket, socket_path_of,
                                   start_shim)
from bench.tracing import Tracer

log = logging.getLogger("chainbench.engine.shim")

_SHIM_EXIT_GRACE_S = 3.0
# runc's state (runc --root <root>/<namespace>): under the engine's state dir, so on the run's
# tmpfs (bench.statefs) — what containerd's CRI plugin does with a runtime's `Root` option.
# containerd-shim-runc-v2's default, /run/containerd/runc, is a directory of the disk on these
# machines, and runc rewrites its state.json on every create, start and delete.
RUNC_OPTIONS_TYPE_URL = "containerd.runc.v1.Options"


class _EngineRegistry(ProcessRegistry):
    """The engine's process registry.  Shims must outlive the engine (its pods are recovered
    on restart), so unlike the default registry it installs no kill-everything-at-exit hook."""

    def _ensure_atexit(self) -> None:
        return None


@dataclass
class _Pod:
    handle: ShimHandle | None  # None after an engine restart (the shim is not our child)
    address: str


def _pod_config(sb: Sandbox) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig.FromString(sb.meta.config_bytes)


def _pod_layout(config: cri.PodSandboxConfig) -> tuple[bool, bool]:
    """(host network, shared pid namespace) of a pod."""
    ns = config.linux.security_context.namespace_options
    return ns.network == cri.NODE, ns.pid == cri.POD


class ShimController(TaskApiController):
    kind = "shim"

    def __init__(self, cfg: EngineConfig, rt: RuntimeConfig, store: Store, tracer: Tracer,
                 events_address: str) -> None:
        super().__init__(cfg, tracer)
        self.rt = rt
        self.store = store
        self.registry = _EngineRegistry(f"engine-{rt.name}")
        self.shim = ShimConfig(binary=rt.shim_binary, namespace=cfg.namespace,
                               address=cfg.listen, ttrpc_address=events_address,
                               timeout=cfg.call_timeout_s, registry=self.registry)
        self.rootfs = ""
        self._pods: dict[str, _Pod] = {}
        self.runc_root = os.path.join(cfg.state_dir, "runc")
        # Task.Create's runc options (the runc root), for the pause and every container of the
        # runc shim; another shim (the vm shim) reads `options` as its own.
        self._runc_options: any_pb2.Any | None = None
        if not rt.vm and os.path.basename(rt.shim_binary).startswith("containerd-shim-runc"):
            self._runc_options = any_pb2.Any(
                type_url=RUNC_OPTIONS_TYPE_URL,
                value=runc_options_pb2.Options(root=self.runc_root).SerializeToString())

    async def init(self) -> None:
        # Built once into the cache; later engines find it there.
        self.rootfs = str(await asyncio.to_thread(assets.ensure_rootfs))

    async def close(self) -> None:
        await super().close()
        # runc's root for our namespace: gone once it is empty (never
        # forced: pods left running for the next engine keep their state there).
        try:
            os.rmdir(f"{self.runc_root}/{self.cfg.namespace}")
        except OSError:
            pass

    def _address(self, sb: Sandbox) -> str:
        return str(sb.status.backend.get("shim_address") or sb.status.task_address)

    def _create_options(self, run: ContainerRun | None = None) -> any_pb2.Any | None:
        return self._runc_options

    def _bundle(self, id_: str) -> Path:
        return self.store.bundle_dir(id_)

    # -- sandbox -------------------------------------------------------------------------
    async def prepare(self, sb: Sandbox, call: str) -> None:
        config = _pod_config(sb)
        host_net, share_pid = _pod_layout(config)
        try:
            spec = oci.pause_spec(self.rootfs, sb.id, pause_path=assets.PAUSE_IN_ROOTFS,
                                  host_network=host_net, share_pid=share_pid,
                                  cgroups_path=pod_cgroup_path(config, sb.id),
                                  hostname=None if host_net else (config.hostname or None))
        except oci.SpecError as exc:
            raise EngineError(grpc.StatusCode.INVALID_ARGUMENT, f"pod spec: {exc}") from None
        oci.write_bundle(self._bundle(sb.id), spec)  # a few KiB: cheaper than a thread hop

    async def create(self, sb: Sandbox, call: str) -> None:
        bundle = self._bundle(sb.id)
        t0 = time.perf_counter_ns()
        handle: ShimHandle | None = None
        try:
            try:
                handle = await asyncio.wait_for(start_shim(self.shim, sb.id, bundle),
                                                call_timeout(self.cfg.call_timeout_s))
                await self.tracer.stretch("shim.spawn", t0)
            finally:
                # Two adjacent spans (a pod's steps still add up): shim.launch until `start`
                # has exec'd (forked in a worker thread, bench.offloop: under load the child
                # waits for a core before it can exec), then shim.spawn until it printed its
                # address.
                mid = handle.launch_ns[1] if handle is not None else t0
                if handle is not None:
                    self.tracer.record(sb.id, call, "shim.launch", t0, mid)
                self.tracer.record(sb.id, call, "shim.spawn", mid, time.perf_counter_ns())
        except ShimError as exc:
            raise EngineError(grpc.StatusCode.INTERNAL, f"shim start: {exc.stderr}") from None
        except OSError as exc:  # the binary is missing or not executable: a config problem
            raise EngineError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"cannot run shim binary {self.shim.binary!r}: {exc}") from None
        except asyncio.TimeoutError:
            raise EngineError(grpc.StatusCode.DEADLINE_EXCEEDED, "shim start timed out") from None
        self._pods[sb.id] = _Pod(handle, handle.address)
        sb.status.backend = {"shim_address": handle.address, "shim_pid": handle.pid,
                             "shim_ticks": process_start_ticks(handle.pid) or 0}
        await self._dial(sb, handle.address, call)
        await self._task(sb, call, "task.create", "shim Task.Create of the pause", "create",
                         id=sb.id, bundle=str(bundle), options=self._create_options())

    async def start(self, sb: Sandbox, call: str) -> StartInfo:
        resp = await self._task(sb, call, "task.start", "shim Task.Start of the pause", "start",
                                id=sb.id)
        return StartInfo(pid=int(resp.pid), created_at=now_ns(),
                         task_address=self._address(sb), version=2)

    async def wait(self, sb: Sandbox, cb: StatusCallback) -> None:
        try:
            client = await self.client(sb)
            resp = await client.wait(id=sb.id, timeout=None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closing:
                return
            # The shim is gone; the pause may live on as an orphan, but the pod is unusable.
            log.warning("sandbox %s: shim lost (%s)", sb.id[:12], exc)
            cb.on_exit(ExitInfo(255, now_ns()))
            return
        cb.on_exit(ExitInfo(int(resp.exit_status), ts_ns(resp.exited_at)))

    async def stop(self, sb: Sandbox, timeout_s: float, call: str) -> ExitInfo | None:
        if sb.status.backend.get("force_deleted"):
            return ExitInfo(137, now_ns())
        try:
            # The pause only sleeps: no grace period is worth waiting for.
            await self._task(sb, call, "task.kill", "shim Task.Kill of the pause", "kill",
                             id=sb.id, signal=int(signal.SIGKILL))
            resp = await self._task(sb, call, "task.wait", "shim Task.Wait of the pause", "wait",
                                    id=sb.id)
            return ExitInfo(int(resp.exit_status), ts_ns(resp.exited_at))
        except EngineError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return ExitInfo(sb.status.exit_status or 137, now_ns())
            if not is_unavailable(exc):
                raise
        await self._force_delete(sb, call)
        return ExitInfo(137, now_ns())

    async def status(self, sb: Sandbox) -> str:
        try:
            resp = await self._task(sb, None, None, "shim Task.State", "state", id=sb.id)
        except EngineError:
            return "SANDBOX_NOTREADY"
        return "SANDBOX_READY" if resp.status == task_types.RUNNING else "SANDBOX_NOTREADY"

    async def recover(self, sb: Sandbox) -> bool:
        if not sb.status.backend.get("shim_address"):
            self._adopt_orphan(sb)
        if sb.status.backend.get("force_deleted") or not self._address(sb):
            return False
        self._pods[sb.id] = _Pod(None, self._address(sb))
        return await self.status(sb) == "SANDBOX_READY"

    def _adopt_orphan(self, sb: Sandbox) -> None:
        """The engine died between the shim's `start` and the commit that records it: the
        shim wrote its address into the bundle, and its daemon runs with cwd = bundle."""
        bundle = self._bundle(sb.id)
        try:
            address = (bundle / "address").read_text().strip()
        except OSError:
            return  # it never started
        pid = find_shim_daemon(self.shim, sb.id, bundle)
        sb.status.backend = {"shim_address": address, "shim_pid": pid or 0,
                             "shim_ticks": (process_start_ticks(pid) or 0) if pid else 0}
        log.info("sandbox %s: adopted shim %s (pid %s) from its bundle", sb.id[:12], address,
                 pid)

    def _shim_alive(self, sb: Sandbox) -> bool:
        pid = int(sb.status.backend.get("shim_pid") or 0)
        ticks = int(sb.status.backend.get("shim_ticks") or 0)
        return pid > 0 and ticks > 0 and process_start_ticks(pid) == ticks

    def _kill_shim(self, sb: Sandbox) -> None:
        if self._shim_alive(sb):
            try:
                os.kill(int(sb.status.backend["shim_pid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def _wait_shim_gone(self, sb: Sandbox, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self._shim_alive(sb):
            if loop.time() > end:
                return False
            await asyncio.sleep(0.005)
        return True

    async def _force_delete(self, sb: Sandbox, call: str) -> None:
        """The shim is unreachable: kill it if it still runs, then `delete` every container
        and the pause with the shim binary, as containerd does for a dead shim."""
        await self.drop_client(sb)
        self._kill_shim(sb)
        await self._wait_shim_gone(sb, _SHIM_EXIT_GRACE_S)
        with self.tracer.span(sb.id, call, "shim.delete"):
            for cid in [*sb.containers, sb.id]:
                try:
                    await delete_shim(self.shim, cid, self._bundle(cid))
                except ShimError as exc:
                    if "does not exist" not in exc.stderr:
                        raise EngineError(grpc.StatusCode.INTERNAL,
                                          f"shim delete of {cid[:12]}: {exc.stderr}") from None
        pod = self._pods.get(sb.id)
        if pod is not None and pod.handle is not None:
            for cid in list(pod.handle.containers):
                pod.handle.untrack_container(cid)
            await pod.handle.cleanup(grace=0)  # socket, log drain, registry entry
        remove_stale_socket(socket_path_of(self._address(sb)))
        sb.status.backend["force_deleted"] = True

    async def shutdown(self, sb: Sandbox, call: str) -> None:
        pod = self._pods.get(sb.id)
        if not sb.status.backend.get("shim_address"):
            self._adopt_orphan(sb)
        if not sb.status.backend.get("shim_address"):
            self.store.remove_bundle(sb.id)  # the shim never started
            return
        if not sb.status.backend.get("force_deleted"):
            try:
                try:
                    await self._task(sb, call, "task.delete", "shim Task.Delete of the pause",
                                     "delete", id=sb.id)
                except EngineError as exc:
                    if exc.code != grpc.StatusCode.NOT_FOUND:
                        raise
                await self._task(sb, call, "shim.shutdown", "shim Task.Shutdown", "shutdown",
                                 id=sb.id)
            except EngineError as exc:
                if not is_unavailable(exc):
                    raise
                await self._force_delete(sb, call)
        await self.drop_client(sb)
        if pod is not None and pod.handle is not None:
            pod.handle.untrack_container(sb.id)
            await pod.handle.cleanup(grace=_SHIM_EXIT_GRACE_S)
        elif not await self._wait_shim_gone(sb, _SHIM_EXIT_GRACE_S):
            self._kill_shim(sb)
            await self._wait_shim_gone(sb, _SHIM_EXIT_GRACE_S)
        remove_stale_socket(socket_path_of(self._address(sb)))
        self._pods.pop(sb.id, None)
        self.store.remove_bundle(sb.id)

    # -- containers ----------------------------------------------------------------------
    async def build_container(self, sb: Sandbox, ctr: Container, config: Any) -> ContainerRun:
        pod = _pod_config(sb)
        host_net, share_pid = _pod_layout(pod)
        # In a microVM the pause's pid is a guest pid: /proc/<pid>/ns on the host is not it.
        join = {} if self.rt.vm else oci.join_pod_namespaces(
            sb.status.pid, host_network=host_net, share_pid=share_pid)
        spec = build_container_spec(ctr.id, config, self.rootfs, join,
                                    cgroups_path=pod_cgroup_path(pod, ctr.id))
        oci.write_bundle(ctr.bundle, spec)
        return ContainerRun(container=ctr, spec=spec)

    async def create_container(self, sb: Sandbox, run: ContainerRun, call: str) -> int:
        pid = await super().create_container(sb, run, call)
        pod = self._pods.get(sb.id)
        if pod is not None and pod.handle is not None:
            pod.handle.track_container(run.container.id, run.container.bundle)
        return pid

    async def delete_container(self, sb: Sandbox, ctr: Container, call: str) -> None:
        if not sb.status.backend.get("force_deleted"):
            try:
                await super().delete_container(sb, ctr, call)
            except EngineError as exc:
                if not is_unavailable(exc):
                    raise
                with self.tracer.span(sb.id, call, "shim.delete"):
                    try:
                        await delete_shim(self.shim, ctr.id, ctr.bundle)
                    except ShimError as err:
                        raise from_backend(err, f"shim delete of {ctr.id[:12]}") from None
        pod = self._pods.get(sb.id)
        if pod is not None and pod.handle is not None:
            pod.handle.untrack_container(ctr.id)
