"""Owns: pod sandbox lifecycle in the engine: orchestration, locking, recovery, teardown.

The manager holds the in-memory tables (sandboxes, containers, reserved names), drives the
controllers through the state machine of `sandbox.Sandbox`, persists every committed
transition through `store.Store`, and after an engine restart rebuilds the tables from disk and
asks each controller whether its sandboxes are still alive (iSulad's RestoreSandboxes).

Container calls live in the `containers.ContainerOps` mixin over the same tables.
Locking: each sandbox has one asyncio lock serialising its lifecycle and its containers'
lifecycle; the tables are only touched from the event loop, so they need no lock of their own.
Operations run as tasks shielded from the CRI call's cancellation (see `cri.py`), so a client
that gives up never leaves a half-made pod: the operation finishes or rolls back by itself.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc

from bench.engine.config import EngineConfig
from bench.engine.containers import ContainerOps
from bench.engine.controller import Controller, ExitInfo, detached
from bench.engine.errors import EngineError, from_backend, invalid, not_found, precondition
from bench.engine.ids import InvalidInput, check_id_ref, check_name, new_id
from bench.engine.sandbox import (Container, ContainerState, Sandbox, SandboxMeta, SandboxState,
                                  SandboxStatusRec, StateError, now_ns)
from bench.engine.store import Store
from bench.rpc.pb import cri_v1_pb2 as cri
from bench.tracing import Tracer
from sim.vocabulary import CALL_REMOVE_POD, CALL_RUN_POD, CALL_STOP_POD

log = logging.getLogger("chainbench.engine")

# After Stop, how long the Wait callback gets to report the exit before we record it ourselves.
_EXIT_GRACE_S = 2.0


def _wrap_invalid(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except InvalidInput as exc:
        raise invalid(str(exc)) from None


@dataclass
class _Callbacks:
    """StatusCallback bound to one sandbox; persists STOPPED like iSulad (others are not)."""

    manager: "SandboxManager"
    sb: Sandbox

    def on_ready(self) -> None:
        if self.sb.on_ready():
            log.info("sandbox %s: backend reachable again", self.sb.id[:12])
            self.sb.spawn(detached(self.manager.refresh_containers(self.sb)))

    def on_pending(self) -> None:
        if self.sb.on_pending():
            log.warning("sandbox %s: backend unreachable, state PENDING", self.sb.id[:12])

    def on_exit(self, info: ExitInfo) -> None:
        if self.sb.on_exit(info.exit_status, info.exited_at or None):
            log.info("sandbox %s exited with status %d", self.sb.id[:12], info.exit_status)
            self.manager.persist(self.sb)


class SandboxManager(ContainerOps):
    def __init__(self, cfg: EngineConfig, store: Store, controllers: dict[str, Controller],
                 tracer: Tracer) -> None:
        self.cfg = cfg
        self.store = store
        self.controllers = controllers  # runtime handler name -> controller
        self.tracer = tracer
        self.sandboxes: dict[str, Sandbox] = {}
        self.containers: dict[str, Container] = {}
        self._pod_names: dict[tuple[str, str, str, int], str] = {}
        self._ctr_names: dict[tuple[str, str, int], str] = {}
        self._inflight: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ helpers
    def controller_of(self, sb: Sandbox) -> Controller:
        try:
            return self.controllers[sb.meta.runtime_handler]
        except KeyError:
            raise precondition(f"sandbox {sb.id} uses runtime handler "
                               f"{sb.meta.runtime_handler!r}, which is no longer configured") from None

    def persist(self, sb: Sandbox) -> None:
        try:
            self.store.save_status(sb.id, sb.status)
        except OSError as exc:  # state dir trouble must not kill a Wait callback
            log.error("cannot persist sandbox %s: %s", sb.id, exc)

    def _resolve(self, table: dict[str, Any], ref: str, what: str) -> str:
        _wrap_invalid(lambda: check_id_ref(ref, what))
        if ref in table:
            return ref
        matches = [k for k in table if k.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise not_found(f"{what} {ref!r} not found")
        raise invalid(f"{what} prefix {ref!r} is ambiguous ({len(matches)} matches)")

    def get_sandbox(self, ref: str) -> Sandbox:
        return self.sandboxes[self._resolve(self.sandboxes, ref, "pod sandbox")]

    def get_container(self, ref: str) -> Container:
        return self.containers[self._resolve(self.containers, ref, "container")]

    def _span(self, pod: str, call: str, step: str) -> Any:
        return self.tracer.span(pod, call, step)

    # ------------------------------------------------------------------ sandboxes
    def validate_pod_config(self, config: cri.PodSandboxConfig) -> SandboxMeta:
        md = config.metadata
        _wrap_invalid(lambda: check_name(md.name, "pod metadata.name"))
        _wrap_invalid(lambda: check_name(md.namespace, "pod metadata.namespace"))
        _wrap_invalid(lambda: check_name(md.uid, "pod metadata.uid"))
        for k, v in list(config.labels.items()) + list(config.annotations.items()):
            if len(k) > 317 or len(v) > 64 * 1024:
                raise invalid(f"label/annotation {k[:40]!r} is too long")
        return SandboxMeta(id="", name=md.name, namespace=md.namespace, uid=md.uid,
                           attempt=int(md.attempt), runtime_handler="", controller="",
                           labels=dict(config.labels), annotations=dict(config.annotations),
                           config_b64=SandboxMeta.encode_config(config.SerializeToString()))

    def pick_runtime(self, handler: str, shim_only: bool) -> str:
        """The runtime name for a CRI handler; `shim_only` = the v1alpha2 service, which like
        iSulad's always takes the shim chain."""
        if shim_only:
            rt = self.cfg.runtimes.get(handler or self.cfg.default_runtime)
            if rt is not None and rt.controller == "shim":
                return rt.name
            for rt in self.cfg.runtimes.values():
                if rt.controller == "shim":
                    return rt.name
            raise precondition("runtime.v1alpha2 serves only the shim chain and no shim "
                               "runtime is configured")
        if len(handler) > 253:
            raise invalid("runtime_handler is too long")
        name = handler or self.cfg.default_runtime
        if name not in self.cfg.runtimes:
            raise not_found(f"no runtime for handler {handler!r} is configured "
                            f"(configured: {', '.join(sorted(self.cfg.runtimes))})")
        return name

    async def run_pod(self, config: cri.PodSandboxConfig, handler: str, *,
                      shim_only: bool = False) -> str:
        call = CALL_RUN_POD
        meta = self.validate_pod_config(config)
        runtime = self.pick_runtime(handler, shim_only)
        ctl = self.controllers[runtime]
        key = meta.name_key()
        if key in self._pod_names:
            raise EngineError(grpc.StatusCode.ALREADY_EXISTS,
                              f"pod {meta.name!r} (namespace {meta.namespace!r}, uid "
                              f"{meta.uid!r}, attempt {meta.attempt}) already exists as "
                              f"{self._pod_names[key]}")
        meta.id = new_id()
        meta.runtime_handler = runtime
        meta.controller = ctl.kind
        sid = meta.id
        self._pod_names[key] = sid
        sb = Sandbox(meta, SandboxStatusRec(updated_at=now_ns()))
        created_on_disk = False
        # Held from the start: the sandbox is listed as soon as it is on disk, and a Stop or
        # Remove that finds it there must queue behind its creation.
        async with sb.lock:
            try:
                with self._span(sid, call, "engine.prepare"):
                    self.store.create_sandbox(meta, sb.status)
                    created_on_disk = True
                    self.sandboxes[sid] = sb
                    await ctl.prepare(sb, call)
                await ctl.create(sb, call)
                info = await ctl.start(sb, call)
                with self._span(sid, call, "engine.commit"):
                    sb.on_started(info.pid, info.created_at, info.task_address, info.version)
                    self.store.save_status(sid, sb.status)
                    sb.spawn(detached(self._watch(sb, ctl)))
            except BaseException as exc:
                # Roll back in a task of its own: a cancelled caller must still clean up.
                await asyncio.shield(detached(self._rollback_pod(sb, ctl, created_on_disk)))
                if isinstance(exc, (EngineError, asyncio.CancelledError)):
                    raise
                if isinstance(exc, StateError):
                    raise precondition(str(exc)) from None
                if isinstance(exc, OSError):
                    raise EngineError(grpc.StatusCode.INTERNAL, f"engine state: {exc}") from None
                raise from_backend(exc, f"RunPodSandbox via {runtime}") from None
        return sid

    async def _rollback_pod(self, sb: Sandbox, ctl: Controller, on_disk: bool) -> None:
        try:
            await sb.cancel_tasks()
            await ctl.shutdown(sb, CALL_RUN_POD)
        except Exception as exc:  # report the original error, not the cleanup's
            log.error("rollback of sandbox %s left backend state: %s", sb.id, exc)
            # Keep the record so Remove can retry: nothing is lost silently.
            sb.on_exit(255)
            self.persist(sb)
            return
        self.sandboxes.pop(sb.id, None)
        self._pod_names.pop(sb.meta.name_key(), None)
        if on_disk:
            self.store.delete_sandbox(sb.id)

    async def _watch(self, sb: Sandbox, ctl: Controller) -> None:
        try:
            await ctl.wait(sb, _Callbacks(self, sb))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # iSulad: a Wait that cannot be registered leaves the sandbox STOPPED.
            log.warning("sandbox %s: wait failed: %s", sb.id[:12], exc)
            if sb.on_exit(255):
                self.persist(sb)

    async def stop_pod(self, ref: str) -> None:
        sb = self.get_sandbox(ref)
        async with sb.lock:
            if sb.id not in self.sandboxes:
                return  # removed while we queued for the lock
            await self._stop_locked(sb, CALL_STOP_POD)

    async def _stop_locked(self, sb: Sandbox, call: str) -> None:
        try:
            sb.check_can_stop()
        except StateError as exc:
            raise precondition(str(exc)) from None
        ctl = self.controller_of(sb)
        # CRI: StopPodSandbox forcibly terminates every container of the pod.
        for ctr in list(sb.containers.values()):
            if ctr.state in (ContainerState.RUNNING, ContainerState.CREATED, ContainerState.UNKNOWN):
                await self._kill_container(sb, ctl, ctr, 0.0, call)
        if sb.state == SandboxState.STOPPED:
            return
        try:
            exit_info = await ctl.stop(sb, self.cfg.stop_timeout_s, call)
        except Exception as exc:
            raise from_backend(exc, f"stopping sandbox {sb.id[:12]}") from None
        if exit_info is None:
            await sb.wait_state((SandboxState.STOPPED,), _EXIT_GRACE_S)
            exit_info = ExitInfo(0, now_ns())
        if sb.on_exit(exit_info.exit_status, exit_info.exited_at or None):
            self.persist(sb)
        # A stopped pod has no live containers, whatever we could not ask about before.
        for ctr in sb.containers.values():
            if ctr.state != ContainerState.EXITED:
                ctr.mark_exited(137, reason="PodStopped")
                self._save_container(ctr)

    async def remove_pod(self, ref: str) -> None:
        try:
            sb = self.get_sandbox(ref)
        except EngineError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return  # CRI: removing a removed sandbox is not an error
            raise
        async with sb.lock:
            if sb.id not in self.sandboxes:
                return
            call = CALL_REMOVE_POD
            ctl = self.controller_of(sb)
            if sb.state != SandboxState.STOPPED:
                await self._stop_locked(sb, call)
            try:
                prev = sb.begin_remove()
            except StateError as exc:
                raise precondition(str(exc)) from None
            try:
                for ctr in list(sb.containers.values()):
                    await self._delete_container(sb, ctl, ctr, call)
                await sb.cancel_tasks()
                await ctl.shutdown(sb, call)
            except Exception as exc:
                sb.revert_remove(prev)
                raise from_backend(exc, f"removing sandbox {sb.id[:12]}") from None
            with self._span(sb.id, call, "engine.commit"):
                self.store.delete_sandbox(sb.id)
                self.sandboxes.pop(sb.id, None)
                self._pod_names.pop(sb.meta.name_key(), None)

    # ------------------------------------------------------------------ recovery / exit
    async def recover(self) -> None:
        """Rebuild the tables from disk and reattach to live sandboxes (engine restart)."""
        loaded = self.store.load_all()
        for item in loaded:
            sb = Sandbox(item.meta, item.status)
            self.sandboxes[sb.id] = sb
            self._pod_names[sb.meta.name_key()] = sb.id
            for ctr in item.containers:
                sb.containers[ctr.id] = ctr
                self.containers[ctr.id] = ctr
                self._ctr_names[(sb.id, ctr.name, ctr.attempt)] = ctr.id
        if loaded:
            await asyncio.gather(*(self._recover_one(self.sandboxes[i.meta.id]) for i in loaded))
            log.info("recovered %d sandboxes (%d ready)", len(loaded),
                     sum(1 for s in self.sandboxes.values() if s.ready))

    async def _recover_one(self, sb: Sandbox) -> None:
        ctl = self.controllers.get(sb.meta.runtime_handler)
        was = sb.state
        if was == SandboxState.REMOVING:
            # Crashed mid-remove: let a new Remove finish the job.
            sb.status.state = int(SandboxState.STOPPED)
        alive = unreachable = False
        if ctl is not None and was in (SandboxState.RUNNING, SandboxState.PENDING,
                                       SandboxState.UNKNOWN):
            try:
                alive = await asyncio.wait_for(ctl.recover(sb), self.cfg.call_timeout_s)
            except Exception as exc:
                err = from_backend(exc, "recovery probe")
                # A sandboxer that is down now may come back: wait for it (PENDING) rather
                # than declare its pods dead (iSulad would say STOPPED here).
                unreachable = err.code in (grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.DEADLINE_EXCEEDED)
                log.warning("sandbox %s: recovery probe failed: %s", sb.id[:12], err)
        if alive or unreachable:
            sb.status.state = int(SandboxState.RUNNING if alive else SandboxState.PENDING)
            sb.spawn(detached(self._watch(sb, ctl)))  # type: ignore[arg-type]
        elif sb.state != SandboxState.STOPPED:
            sb.on_exit(255)
        self.persist(sb)
        for ctr in sb.containers.values():
            await self._recover_container(sb, ctl, ctr, alive)

    async def refresh_containers(self, sb: Sandbox) -> None:
        """The backend is reachable again: ask it about containers we lost track of."""
        ctl = self.controllers.get(sb.meta.runtime_handler)
        async with sb.lock:
            for ctr in list(sb.containers.values()):
                if ctr.state == ContainerState.UNKNOWN and sb.ready:
                    await self._recover_container(sb, ctl, ctr, True)

    async def _recover_container(self, sb: Sandbox, ctl: Controller | None, ctr: Container,
                                 alive: bool) -> None:
        if ctr.state == ContainerState.EXITED:
            return
        if not alive or ctl is None:
            ctr.state = ContainerState.UNKNOWN
            ctr.reason = "Unknown"
            ctr.message = "the pod's backend was gone when the engine restarted"
            self._save_container(ctr)
            return
        try:
            state, pid, info = await asyncio.wait_for(ctl.container_state(sb, ctr),
                                                      self.cfg.call_timeout_s)
        except Exception as exc:
            log.warning("container %s: state probe failed: %s", ctr.id[:12], exc)
            state, pid, info = ContainerState.UNKNOWN, ctr.pid, None
        if state == ContainerState.EXITED:
            ctr.mark_exited(info.exit_status if info else 255, info.exited_at if info else None)
        else:
            ctr.state = int(state)
            ctr.pid = pid or ctr.pid
            if state == ContainerState.RUNNING:
                sb.spawn(detached(self._watch_container(sb, ctl, ctr)))
        self._save_container(ctr)

    async def remove_all(self) -> list[str]:
        """Stop and remove every pod (the RPC-free teardown); returns errors as text."""
        errors: list[str] = []
        for sid in list(self.sandboxes):
            try:
                await self.remove_pod(sid)
            except Exception as exc:
                errors.append(f"{sid}: {exc}")
        return errors

    def track(self, task: asyncio.Task[Any]) -> None:
        """An operation started by a CRI call; `close` lets it finish before the exit."""
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def close(self) -> None:
        """Engine exit: let operations in flight finish (they are not interrupted midway, so
        no pod is left half made), then stop background waits; pods keep running."""
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=self.cfg.call_timeout_s * 2)
        await asyncio.gather(*(sb.cancel_tasks() for sb in self.sandboxes.values()))

    # ------------------------------------------------------------------ listing
    def list_sandboxes(self) -> Iterable[Sandbox]:
        return list(self.sandboxes.values())

    def list_containers(self) -> Iterable[Container]:
        return list(self.containers.values())
