"""Owns: the containers (tasks) of every sandbox: announcing them (Prepare/Purge, Update's
`extensions.tasks`), running them with runc inside the pinned namespaces, and their exits.

Exits are watched with pidfds (`exits.py`); exec processes live in `execs.py`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

from bench.rpc.ttrpc import Code
from bench.sandboxer import bundle as bundles
from bench.sandboxer.execs import Execs
from bench.sandboxer.exits import ExitWatcher
from bench.sandboxer.manager import Manager, SbxError, valid_id
from bench.sandboxer.runcctl import Runc, RuncError
from bench.sandboxer.state import (C_CREATED, C_PREPARED, C_RUNNING, C_STOPPED, READY, STOPPED,
                                   Container, Sandbox)
from sim.vocabulary import (CALL_CREATE_CONTAINER, CALL_REMOVE_CONTAINER, CALL_START_CONTAINER,
                            CALL_STOP_CONTAINER)

log = logging.getLogger("bench.sandboxer")

STOP_WAIT_S = 10.0


def _exited_event(c: Container) -> asyncio.Event:
    if c.exited is None:
        c.exited = asyncio.Event()
        if c.status == C_STOPPED:
            c.exited.set()
    return c.exited


class Containers:
    def __init__(self, manager: Manager) -> None:
        self.m = manager
        self.exits = ExitWatcher()
        self.execs = Execs(self)

    def runc(self, sb: Sandbox) -> Runc:
        return Runc(sb.runc_root)

    def _get(self, sb: Sandbox, cid: str) -> Container:
        valid_id(cid, "container id")
        c = sb.containers.get(cid)
        if c is None:
            raise SbxError(Code.NOT_FOUND, f"container {cid} not found in sandbox {sb.id}")
        return c

    def task(self, sb: Sandbox, cid: str) -> Container:
        """The container's task (its init); NOT_FOUND when only announced or unknown."""
        c = self._get(sb, cid)
        if c.status == C_PREPARED:
            raise SbxError(Code.NOT_FOUND, f"task {cid} not created")
        return c

    # ------------------------------------------------------------------ announce (sandbox API)
    def prepare(self, sb: Sandbox, cid: str, spec: Any, rootfs: list[dict[str, Any]],
                stdio: tuple[str, str, str] = ("", "", ""), terminal: bool = False) -> str:
        """Record a container the engine will create; write its bundle; return the bundle."""
        valid_id(cid, "container id")
        if sb.state == STOPPED:
            raise SbxError(Code.FAILED_PRECONDITION, f"sandbox {sb.id} is stopped")
        old = sb.containers.get(cid)
        if old is not None and old.status != C_PREPARED:
            raise SbxError(Code.ALREADY_EXISTS, f"container {cid} already has a task")
        c = Container(id=cid, prepared=True, rootfs=rootfs, stdin=stdio[0], stdout=stdio[1],
                      stderr=stdio[2], terminal=terminal)
        try:
            bundles.write_bundle(sb, c, spec, None)
        except bundles.SpecError as exc:
            raise SbxError(Code.INVALID_ARGUMENT, f"container {cid}: {exc}") from None
        sb.containers[cid] = c
        self.m.save(sb)
        return c.bundle

    def prepare_exec(self, sb: Sandbox, cid: str, exec_id: str, process: Any,
                     stdio: tuple[str, str, str] = ("", "", "")) -> None:
        c = self._get(sb, cid)
        valid_id(exec_id, "exec id")
        if "status" in c.execs.get(exec_id, {}):
            raise SbxError(Code.ALREADY_EXISTS, f"exec process {exec_id} of {cid} exists")
        c.execs[exec_id] = {"spec": process, "stdin": stdio[0], "stdout": stdio[1],
                            "stderr": stdio[2]}
        self.m.save(sb)

    async def purge(self, sb: Sandbox, cid: str, exec_id: str = "") -> None:
        """Forget an announced container (killing and deleting its task if still there)."""
        valid_id(cid, "container id")
        c = sb.containers.get(cid)
        if c is None:
            return
        if exec_id:
            valid_id(exec_id, "exec id")
            c.execs.pop(exec_id, None)
            self.m.save(sb)
            return
        if c.status != C_PREPARED:
            await self._destroy(sb, c)
        await self._drop(sb, c)
        self.m.save(sb)

    async def update_tasks(self, sb: Sandbox, doc: Any) -> None:
        """Apply an `extensions.tasks` document: add new tasks, drop vanished ones."""
        if not isinstance(doc, dict) or not isinstance(doc.get("tasks", []), list):
            raise SbxError(Code.INVALID_ARGUMENT, "tasks document must be {\"tasks\": [...]}")
        wanted: dict[str, dict[str, Any]] = {}
        for t in doc.get("tasks") or []:
            if not isinstance(t, dict):
                raise SbxError(Code.INVALID_ARGUMENT, "each task must be an object")
            wanted[valid_id(str(t.get("task_id", "")), "task_id")] = t
        for cid in [c for c in sb.containers if c not in wanted]:
            await self.purge(sb, cid)
        for cid, t in wanted.items():
            c = sb.containers.get(cid)
            if c is not None:
                c.prepared = True  # created straight through Task.Create, now announced too
            else:
                try:
                    rootfs = bundles.mounts_from_json(t.get("rootfs"))
                except bundles.SpecError as exc:
                    raise SbxError(Code.INVALID_ARGUMENT, f"task {cid}: {exc}") from None
                self.prepare(sb, cid, t.get("spec") or {}, rootfs,
                             (str(t.get("stdin", "")), str(t.get("stdout", "")),
                              str(t.get("stderr", ""))))
                c = sb.containers[cid]
            procs = t.get("processes") or []
            if not isinstance(procs, list):
                raise SbxError(Code.INVALID_ARGUMENT, f"task {cid}: processes must be a list")
            # Exec processes already made through Task.Exec keep their runtime record.
            execs = {e: r for e, r in c.execs.items() if "status" in r}
            for p in procs:
                if isinstance(p, dict):
                    eid = valid_id(str(p.get("exec_id", "")), "exec_id")
                    execs.setdefault(eid, {"spec": p.get("spec"),
                                           "stdin": str(p.get("stdin", "")),
                                           "stdout": str(p.get("stdout", "")),
                                           "stderr": str(p.get("stderr", ""))})
            c.execs = execs
        self.m.save(sb)

    # ------------------------------------------------------------------ tasks (Task API)
    async def create(self, sb: Sandbox, cid: str, bundle_dir: str, rootfs: list[dict[str, Any]],
                     stdio: tuple[str, str, str], terminal: bool) -> Container:
        valid_id(cid, "container id")
        assert sb.lock is not None
        # Under the sandbox lock: a Stop racing with a create must not leave a container
        # running in a stopped sandbox.
        async with sb.lock:
            return await self._create_locked(sb, cid, bundle_dir, rootfs, stdio, terminal)

    async def _create_locked(self, sb: Sandbox, cid: str, bundle_dir: str,
                             rootfs: list[dict[str, Any]], stdio: tuple[str, str, str],
                             terminal: bool) -> Container:
        if sb.state != READY:
            raise SbxError(Code.FAILED_PRECONDITION, f"sandbox {sb.id} is not ready")
        if terminal:
            raise SbxError(Code.UNIMPLEMENTED, "terminal containers are not supported")
        c = sb.containers.get(cid)
        if c is not None and c.status != C_PREPARED:
            raise SbxError(Code.ALREADY_EXISTS, f"task {cid} already exists")
        new = c is None
        with self.m.tracer.span(sb.id, CALL_CREATE_CONTAINER, "task.create"):
            if c is None:
                c = self._from_bundle(sb, cid, bundle_dir, rootfs)
            elif rootfs and not c.rootfs:
                # Prepared without mounts; the Task.Create brings them: re-root the bundle.
                spec = json.loads(open(os.path.join(c.bundle, "config.json")).read())
                c.rootfs = rootfs
                bundles.write_bundle(sb, c, spec, None)
            if any(stdio):
                c.stdin, c.stdout, c.stderr = stdio
            sb.containers[cid] = c
            try:
                await self._runc_create(sb, c)
            except BaseException:
                if new:
                    await self._drop(sb, c)
                raise
            self.m.save(sb)
        return c

    def _from_bundle(self, sb: Sandbox, cid: str, bundle_dir: str,
                     rootfs: list[dict[str, Any]]) -> Container:
        if not bundle_dir or not os.path.isabs(bundle_dir):
            raise SbxError(Code.INVALID_ARGUMENT,
                           f"task {cid} was not prepared and bundle {bundle_dir!r} is not an "
                           f"absolute path")
        try:
            with open(os.path.join(bundle_dir, "config.json"), encoding="utf-8") as fh:
                spec = json.load(fh)
        except FileNotFoundError:
            raise SbxError(Code.INVALID_ARGUMENT, f"no config.json in {bundle_dir}") from None
        except ValueError as exc:
            raise SbxError(Code.INVALID_ARGUMENT, f"bad config.json in {bundle_dir}: {exc}") \
                from None
        c = Container(id=cid, rootfs=rootfs)
        try:
            bundles.write_bundle(sb, c, spec, bundle_dir)
        except bundles.SpecError as exc:
            raise SbxError(Code.INVALID_ARGUMENT, f"task {cid}: {exc}") from None
        return c

    async def _runc_create(self, sb: Sandbox, c: Container) -> None:
        pid_file = os.path.join(c.bundle, "init.pid")
        log_file = os.path.join(c.bundle, "runc.log")
        for f in (pid_file, log_file):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
        try:
            bundles.mount_rootfs(c)
        except OSError as exc:
            raise SbxError(Code.INTERNAL, f"mount rootfs of {c.id}: {exc}") from None
        try:
            fds = bundles.open_stdio(c)
        except OSError as exc:
            bundles.unmount_rootfs(c)
            raise SbxError(Code.INVALID_ARGUMENT, f"stdio of {c.id}: {exc}") from None
        try:
            await self.runc(sb).create(c.id, c.bundle, pid_file, log_file, fds)
            with open(pid_file) as fh:
                pid = int(fh.read().strip())
        except (RuncError, OSError, ValueError) as exc:
            try:  # a create that failed late may have left runc state (and a cgroup) behind
                await self.runc(sb).delete(c.id, force=True)
            except RuncError:
                pass
            bundles.unmount_rootfs(c)
            raise SbxError(Code.INTERNAL, f"runc create {c.id}: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)
        c.pid, c.status, c.exit_status, c.exited_at_ns = pid, C_CREATED, 0, 0
        c.killed_with, c.runc_gone = 0, False
        c.exited = None
        self._monitor(sb, c)

    async def start(self, sb: Sandbox, cid: str) -> Container:
        c = self.task(sb, cid)
        if c.status != C_CREATED:
            raise SbxError(Code.FAILED_PRECONDITION, f"task {cid} is {c.status}, not created")
        with self.m.tracer.span(sb.id, CALL_START_CONTAINER, "task.start"):
            try:
                await self.runc(sb).start(cid)
            except RuncError as exc:
                raise SbxError(Code.INTERNAL, f"runc start {cid}: {exc.message}") from None
            if c.status == C_CREATED:
                c.status = C_RUNNING
            self.m.save(sb)
        return c

    async def kill(self, sb: Sandbox, cid: str, sig: int, all_: bool) -> None:
        c = self.task(sb, cid)
        if c.status == C_STOPPED:
            raise SbxError(Code.NOT_FOUND, f"task {cid}: process already finished")
        with self.m.tracer.span(sb.id, CALL_STOP_CONTAINER, "task.kill"):
            c.killed_with = sig or signal.SIGTERM
            # Through `runc kill` like the runc shim and Kuasar, though a pidfd signal would
            # save a process: the chains are compared on what real runtimes do.
            try:
                await self.runc(sb).kill(cid, sig or signal.SIGTERM, all_)
            except RuncError as exc:
                if c.status == C_STOPPED or exc.not_found or "not running" in exc.message:
                    raise SbxError(Code.NOT_FOUND, f"task {cid}: process already finished") \
                        from None
                raise SbxError(Code.INTERNAL, f"runc kill {cid}: {exc.message}") from None

    async def wait(self, sb: Sandbox, cid: str) -> Container:
        c = self.task(sb, cid)
        # No span: a Wait is often issued right after Start and lasts the container's life.
        await _exited_event(c).wait()
        return c

    async def delete(self, sb: Sandbox, cid: str) -> tuple[int, int, int]:
        c = self.task(sb, cid)
        if c.status == C_RUNNING:
            raise SbxError(Code.FAILED_PRECONDITION, f"task {cid} is running")
        with self.m.tracer.span(sb.id, CALL_REMOVE_CONTAINER, "task.delete"):
            await self._destroy(sb, c)
            out = (c.pid, c.exit_status, c.exited_at_ns)
            if c.prepared:
                c.status, c.pid, c.exit_status, c.exited_at_ns = C_PREPARED, 0, 0, 0
                c.exited = None
            else:
                await self._drop(sb, c)
            self.m.save(sb)
        return out

    async def pids(self, sb: Sandbox, cid: str) -> list[int]:
        c = self.task(sb, cid)
        if c.status == C_STOPPED:
            return []
        try:
            return await self.runc(sb).ps(cid)
        except RuncError:
            return [c.pid] if c.pid else []

    async def pause(self, sb: Sandbox, cid: str, resume: bool) -> None:
        c = self.task(sb, cid)
        if c.status != C_RUNNING:
            raise SbxError(Code.FAILED_PRECONDITION, f"task {cid} is {c.status}")
        try:
            await (self.runc(sb).resume(cid) if resume else self.runc(sb).pause(cid))
        except RuncError as exc:
            raise SbxError(Code.INTERNAL, str(exc)) from None

    # ------------------------------------------------------------------ teardown
    async def _destroy(self, sb: Sandbox, c: Container) -> None:
        """Make sure the runc container is gone (killed, reaped, deleted) and unmounted.

        A live container gets `runc kill --all KILL` and is reaped first (what Kuasar's Stop
        does); only then `runc delete --force`, which on a stopped container is quick: on a
        running one runc sleeps 100 ms before its first liveness check."""
        if not c.runc_gone and c.status != C_PREPARED:
            if c.status != C_STOPPED:
                c.killed_with = c.killed_with or signal.SIGKILL
                try:
                    await self.runc(sb).kill(c.id, signal.SIGKILL, True)
                    await asyncio.wait_for(_exited_event(c).wait(), STOP_WAIT_S)
                except (RuncError, TimeoutError):
                    pass  # delete --force below has the last word
            try:
                await self.runc(sb).delete(c.id, force=True)
            except RuncError as exc:
                if not exc.not_found:
                    raise SbxError(Code.INTERNAL, f"runc delete {c.id}: {exc.message}") from None
            if c.status != C_STOPPED:
                try:
                    await asyncio.wait_for(_exited_event(c).wait(), STOP_WAIT_S)
                except TimeoutError:
                    log.error("task %s/%s did not exit after runc delete --force", sb.id, c.id)
                    self._mark_exited(sb, c, 255)
            c.runc_gone = True
        bundles.unmount_rootfs(c)

    async def kill_all(self, sb: Sandbox) -> None:
        """Sandbox Stop: every container killed, reaped and deleted (records kept)."""
        live = [c for c in sb.containers.values() if c.status != C_PREPARED]
        results = await asyncio.gather(*(self._destroy(sb, c) for c in live),
                                       return_exceptions=True)
        for c, r in zip(live, results):
            if isinstance(r, BaseException):
                log.error("stop %s/%s: %s", sb.id, c.id, r)
        for c in sb.containers.values():
            bundles.unmount_rootfs(c)

    async def _drop(self, sb: Sandbox, c: Container) -> None:
        bundles.unmount_rootfs(c)
        sb.containers.pop(c.id, None)
        # Off the loop: a directory removal can take tens of ms on a busy ext4.
        await asyncio.to_thread(shutil.rmtree, bundles.container_dir(sb, c.id), True)

    # ------------------------------------------------------------------ exits
    def _monitor(self, sb: Sandbox, c: Container) -> None:
        def on_exit(status: int | None) -> None:
            self._mark_exited(sb, c, self._guess_status(c) if status is None else status)

        if not self.exits.watch(sb.id, c.pid, on_exit):
            self._mark_exited(sb, c, self._guess_status(c))

    @staticmethod
    def _guess_status(c: Container) -> int:
        return 128 + c.killed_with if c.killed_with else 255

    def _mark_exited(self, sb: Sandbox, c: Container, status: int) -> None:
        if c.status == C_STOPPED:
            return
        c.status, c.exit_status, c.exited_at_ns = C_STOPPED, status, time.time_ns()
        _exited_event(c).set()
        self.m.save(sb)

    async def reattach(self, sb: Sandbox) -> None:
        """After a restart: learn each container's state from runc and watch live inits."""
        for c in list(sb.containers.values()):
            c.exited = None
            c.rootfs_mounted = c.rootfs_mounted and c.status != C_PREPARED
            if c.status not in (C_CREATED, C_RUNNING):
                continue
            try:
                st = await self.runc(sb).state(c.id)
            except RuncError:
                self._mark_exited(sb, c, self._guess_status(c))
                c.runc_gone = True
                continue
            if st.get("status") in ("created", "running", "paused") and st.get("pid"):
                c.pid = int(st["pid"])
                c.status = C_CREATED if st["status"] == "created" else C_RUNNING
                self._monitor(sb, c)
                self.execs.reattach(sb, c)
            else:
                self._mark_exited(sb, c, self._guess_status(c))

    def forget(self, sb: Sandbox) -> None:
        self.exits.forget(sb.id)
        self.execs.forget(sb)

    def forget_all(self) -> None:
        self.exits.forget()
