"""Owns: the container half of the engine's lifecycle: create/start/stop/remove of a pod's
containers, their exit watchers, and forced kills on pod stop.

Mixed into `manager.SandboxManager`, which owns the tables these methods read and write; every
method here runs under the container's sandbox lock, the same lock the pod's own lifecycle
takes, so a container never races its pod's Stop or Remove.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import grpc

from bench.engine.config import EngineConfig
from bench.engine.controller import Controller, ExitInfo, call_timeout, detached
from bench.engine.errors import EngineError, from_backend, invalid, not_found, precondition
from bench.engine.ids import InvalidInput, check_name, new_id
from bench.engine.sandbox import Container, ContainerState, Sandbox, SandboxMeta, now_ns
from bench.engine.store import Store
from bench.rpc.pb import cri_v1_pb2 as cri
from sim.vocabulary import (CALL_CREATE_CONTAINER, CALL_REMOVE_CONTAINER, CALL_START_CONTAINER,
                            CALL_STOP_CONTAINER)

log = logging.getLogger("chainbench.engine")


def _check_name(value: str, what: str) -> None:
    try:
        check_name(value, what)
    except InvalidInput as exc:
        raise invalid(str(exc)) from None


class ContainerOps:
    # Provided by SandboxManager.
    cfg: EngineConfig
    store: Store
    sandboxes: dict[str, Sandbox]
    containers: dict[str, Container]
    _ctr_names: dict[tuple[str, str, int], str]

    def controller_of(self, sb: Sandbox) -> Controller: ...
    def get_sandbox(self, ref: str) -> Sandbox: ...
    def get_container(self, ref: str) -> Container: ...
    def _span(self, pod: str, call: str, step: str) -> Any: ...

    def _container_and_pod(self, ref: str) -> tuple[Container, Sandbox]:
        ctr = self.get_container(ref)
        sb = self.sandboxes.get(ctr.sandbox_id)
        if sb is None:  # its pod was removed between the two lookups
            raise not_found(f"container {ref!r} not found")
        return ctr, sb

    async def create_container(self, pod_ref: str, config: cri.ContainerConfig) -> str:
        call = CALL_CREATE_CONTAINER
        md = config.metadata
        _check_name(md.name, "container metadata.name")
        if len(config.image.image) > 4096:
            raise invalid("image name is too long")
        sb = self.get_sandbox(pod_ref)
        async with sb.lock:
            if sb.id not in self.sandboxes:
                raise not_found(f"pod sandbox {pod_ref!r} not found")
            if not sb.ready:
                raise precondition(f"pod sandbox {sb.id} is not ready "
                                   f"(state {sb.state.name})")
            key = (sb.id, md.name, int(md.attempt))
            if key in self._ctr_names:
                raise EngineError(grpc.StatusCode.ALREADY_EXISTS,
                                  f"container {md.name!r} attempt {md.attempt} already exists "
                                  f"in pod {sb.id} as {self._ctr_names[key]}")
            ctl = self.controller_of(sb)
            cid = new_id()
            ctr = Container(id=cid, sandbox_id=sb.id, name=md.name, attempt=int(md.attempt),
                            image=config.image.image, labels=dict(config.labels),
                            annotations=dict(config.annotations), log_path=config.log_path,
                            created_at=now_ns(),
                            config_b64=SandboxMeta.encode_config(config.SerializeToString()))
            self._ctr_names[key] = cid
            try:
                with self._span(sb.id, call, "engine.prepare"):
                    ctr.bundle = str(self.store.bundle_dir(cid))
                    run = await ctl.build_container(sb, ctr, config)
                pid = await ctl.create_container(sb, run, call)
                with self._span(sb.id, call, "engine.commit"):
                    ctr.pid = pid
                    ctr.state = ContainerState.CREATED
                    self.store.save_container(ctr)
                    sb.containers[cid] = ctr
                    self.containers[cid] = ctr
            except BaseException as exc:
                self._ctr_names.pop(key, None)
                await asyncio.shield(detached(self._rollback_container(sb, ctl, ctr)))
                if isinstance(exc, (EngineError, asyncio.CancelledError)):
                    raise
                raise from_backend(exc, f"creating container in pod {sb.id[:12]}") from None
        return cid

    async def _rollback_container(self, sb: Sandbox, ctl: Controller, ctr: Container) -> None:
        try:
            await ctl.delete_container(sb, ctr, CALL_CREATE_CONTAINER)
        except Exception as exc:
            log.error("rollback of container %s failed: %s", ctr.id, exc)
        self.store.delete_container(sb.id, ctr.id)
        self.store.remove_bundle(ctr.id)

    async def start_container(self, ref: str) -> None:
        ctr, sb = self._container_and_pod(ref)
        async with sb.lock:
            if ctr.id not in self.containers:
                raise not_found(f"container {ref!r} not found")
            if ctr.state != ContainerState.CREATED:
                raise precondition(f"container {ctr.id} is {ContainerState(ctr.state).name}, "
                                   "not CREATED")
            if not sb.ready:
                raise precondition(f"pod sandbox {sb.id} is not ready (state {sb.state.name})")
            ctl = self.controller_of(sb)
            try:
                pid = await ctl.start_container(sb, ctr, CALL_START_CONTAINER)
            except Exception as exc:
                ctr.mark_exited(255, reason="StartError")
                ctr.message = str(from_backend(exc, "start"))
                self.store.save_container(ctr)
                raise from_backend(exc, f"starting container {ctr.id[:12]}") from None
            with self._span(sb.id, CALL_START_CONTAINER, "engine.commit"):
                ctr.pid = pid
                ctr.state = ContainerState.RUNNING
                ctr.started_at = now_ns()
                self.store.save_container(ctr)
                sb.spawn(detached(self._watch_container(sb, ctl, ctr)))

    async def _watch_container(self, sb: Sandbox, ctl: Controller, ctr: Container) -> None:
        try:
            info = await ctl.wait_container(sb, ctr)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The Task API went away (shim or sandboxer died): we no longer know.
            log.warning("container %s: wait failed: %s", ctr.id[:12], exc)
            if ctr.state == ContainerState.RUNNING:
                ctr.state = ContainerState.UNKNOWN
                ctr.reason = "Unknown"
                ctr.message = str(exc)
                self._save_container(ctr)
            return
        if ctr.state != ContainerState.EXITED:
            ctr.mark_exited(info.exit_status, info.exited_at or None)
            self._save_container(ctr)

    def _save_container(self, ctr: Container) -> None:
        if ctr.id in self.containers:
            try:
                self.store.save_container(ctr)
            except OSError as exc:
                log.error("cannot persist container %s: %s", ctr.id, exc)

    async def _kill_container(self, sb: Sandbox, ctl: Controller, ctr: Container,
                              grace_s: float, call: str) -> None:
        if ctr.state == ContainerState.EXITED:
            return
        if ctr.state == ContainerState.CREATED:
            # Never started: nothing to signal; runc delete --force in Remove handles it.
            ctr.mark_exited(0, reason="NeverStarted")
            self._save_container(ctr)
            return
        info: ExitInfo | None = None
        try:
            if grace_s > 0:
                await ctl.kill_container(sb, ctr, signal.SIGTERM, call)
                info = await self._wait_exit(sb, ctl, ctr, grace_s, call)
            if info is None:
                await ctl.kill_container(sb, ctr, signal.SIGKILL, call)
                info = await self._wait_exit(sb, ctl, ctr, call_timeout(self.cfg.call_timeout_s),
                                             call)
        except Exception as exc:
            err = from_backend(exc, f"stopping container {ctr.id[:12]}")
            if err.code == grpc.StatusCode.NOT_FOUND:
                info = ExitInfo(137, now_ns())  # the backend no longer has it
            elif err.code == grpc.StatusCode.UNAVAILABLE and not sb.ready:
                # The pod's backend is away (killed shim/sandboxer): nothing can be signalled
                # through it and nobody knows the container's fate; the pod's Stop (forced
                # for a dead shim) settles it, or a sandboxer that comes back answers.
                ctr.state = ContainerState.UNKNOWN
                ctr.reason, ctr.message = "BackendUnavailable", err.message
                self._save_container(ctr)
                return
            else:
                raise err from None
        if info is None:
            raise EngineError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"container {ctr.id[:12]} did not exit after SIGKILL")
        ctr.mark_exited(info.exit_status, info.exited_at or None)
        self._save_container(ctr)

    async def _wait_exit(self, sb: Sandbox, ctl: Controller, ctr: Container, timeout: float,
                         call: str) -> ExitInfo | None:
        with self._span(sb.id, call, "task.wait"):
            try:
                return await asyncio.wait_for(ctl.wait_container(sb, ctr), timeout)
            except asyncio.TimeoutError:
                return None

    async def stop_container(self, ref: str, timeout_s: int) -> None:
        ctr, sb = self._container_and_pod(ref)
        if timeout_s < 0:
            raise invalid("timeout must not be negative")
        async with sb.lock:
            if ctr.id not in self.containers:
                raise not_found(f"container {ref!r} not found")
            await self._kill_container(sb, self.controller_of(sb), ctr, float(timeout_s),
                                       CALL_STOP_CONTAINER)

    async def remove_container(self, ref: str) -> None:
        try:
            ctr, sb = self._container_and_pod(ref)
        except EngineError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return  # CRI: removing a removed container is not an error
            raise
        async with sb.lock:
            if ctr.id not in self.containers:
                return
            ctl = self.controller_of(sb)
            if ctr.state in (ContainerState.RUNNING, ContainerState.UNKNOWN):
                await self._kill_container(sb, ctl, ctr, 0.0, CALL_REMOVE_CONTAINER)
            await self._delete_container(sb, ctl, ctr, CALL_REMOVE_CONTAINER)

    async def _delete_container(self, sb: Sandbox, ctl: Controller, ctr: Container,
                                call: str) -> None:
        try:
            await ctl.delete_container(sb, ctr, call)
        except Exception as exc:
            raise from_backend(exc, f"deleting container {ctr.id[:12]}") from None
        with self._span(sb.id, call, "engine.commit"):
            self.store.delete_container(sb.id, ctr.id)
            self.store.remove_bundle(ctr.id)
            sb.containers.pop(ctr.id, None)
            self.containers.pop(ctr.id, None)
            self._ctr_names.pop((sb.id, ctr.name, ctr.attempt), None)
