"""Owns: exec processes inside running containers (Task.Exec, then Start/Kill/Wait/State/Delete
with an exec_id), run with `runc exec --detach`.

An exec's record is a small dict in its container's `execs` (persisted with the sandbox):
announced ones (legacy Prepare with exec_id, `processes` of the tasks document) carry only
spec + stdio; Task.Exec adds `status` and, once started, `pid`/`start_ticks`/exit fields.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from bench.processes import process_start_ticks
from bench.rpc.ttrpc import Code
from bench.sandboxer import bundle as bundles
from bench.sandboxer.manager import SbxError, valid_id
from bench.sandboxer.runcctl import RuncError
from bench.sandboxer.state import C_CREATED, C_RUNNING, C_STOPPED, Container, Sandbox

if TYPE_CHECKING:
    from bench.sandboxer.containers import Containers


class Execs:
    def __init__(self, cs: "Containers") -> None:
        self.cs = cs
        self._events: dict[tuple[str, str, str], asyncio.Event] = {}

    def _rec(self, sb: Sandbox, cid: str, eid: str) -> tuple[Container, dict[str, Any]]:
        c = self.cs.task(sb, cid)
        valid_id(eid, "exec id")
        rec = c.execs.get(eid)
        if rec is None or "status" not in rec:
            raise SbxError(Code.NOT_FOUND, f"exec process {eid} of {cid} not found")
        return c, rec

    def _event(self, sb: Sandbox, cid: str, eid: str, rec: dict[str, Any]) -> asyncio.Event:
        key = (sb.id, cid, eid)
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = asyncio.Event()
            if rec.get("status") == C_STOPPED:
                ev.set()
        return ev

    async def add(self, sb: Sandbox, cid: str, eid: str, spec: Any,
                  stdio: tuple[str, str, str], terminal: bool) -> None:
        c = self.cs.task(sb, cid)
        valid_id(eid, "exec id")
        if terminal:
            raise SbxError(Code.UNIMPLEMENTED, "terminal exec processes are not supported")
        if c.status != C_RUNNING:
            raise SbxError(Code.FAILED_PRECONDITION, f"container {cid} is {c.status}")
        old = c.execs.get(eid) or {}
        if "status" in old:
            raise SbxError(Code.ALREADY_EXISTS, f"exec process {eid} of {cid} already exists")
        spec = spec if spec is not None else old.get("spec")
        if not isinstance(spec, dict) or not spec.get("args"):
            raise SbxError(Code.INVALID_ARGUMENT, f"exec {eid}: spec must be an OCI process "
                                                  f"object with args")
        c.execs[eid] = {"spec": spec, "stdin": stdio[0] or old.get("stdin", ""),
                        "stdout": stdio[1] or old.get("stdout", ""),
                        "stderr": stdio[2] or old.get("stderr", ""), "status": C_CREATED,
                        "pid": 0, "exit_status": 0, "exited_at_ns": 0, "killed_with": 0}
        self.cs.m.save(sb)

    async def start(self, sb: Sandbox, cid: str, eid: str) -> int:
        c, rec = self._rec(sb, cid, eid)
        if rec["status"] != C_CREATED:
            raise SbxError(Code.FAILED_PRECONDITION, f"exec {eid} is {rec['status']}")
        if c.status != C_RUNNING:
            raise SbxError(Code.FAILED_PRECONDITION, f"container {cid} is {c.status}")
        base = os.path.join(c.bundle, f"exec-{eid}")
        with open(base + ".json", "w", encoding="utf-8") as fh:
            json.dump(rec["spec"], fh)
        io = Container(id=eid, stdin=rec["stdin"], stdout=rec["stdout"], stderr=rec["stderr"])
        try:
            fds = bundles.open_stdio(io)
        except OSError as exc:
            raise SbxError(Code.INVALID_ARGUMENT, f"stdio of exec {eid}: {exc}") from None
        try:
            await self.cs.runc(sb).exec_detached(cid, base + ".json", base + ".pid",
                                                 base + ".log", fds)
            with open(base + ".pid") as fh:
                pid = int(fh.read().strip())
        except (RuncError, OSError, ValueError) as exc:
            raise SbxError(Code.INTERNAL, f"runc exec {cid}/{eid}: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)
        rec.update(pid=pid, status=C_RUNNING, start_ticks=process_start_ticks(pid) or 0)
        self._watch(sb, c, eid, rec)
        self.cs.m.save(sb)
        return pid

    def _watch(self, sb: Sandbox, c: Container, eid: str, rec: dict[str, Any]) -> None:
        def on_exit(status: int | None) -> None:
            self._exited(sb, c.id, eid, rec, status)

        if not self.cs.exits.watch(sb.id, rec["pid"], on_exit):
            self._exited(sb, c.id, eid, rec, None)

    def _exited(self, sb: Sandbox, cid: str, eid: str, rec: dict[str, Any],
                status: int | None) -> None:
        if rec.get("status") == C_STOPPED:
            return
        if status is None:
            status = 128 + rec["killed_with"] if rec.get("killed_with") else 255
        rec.update(status=C_STOPPED, exit_status=status, exited_at_ns=time.time_ns())
        self._event(sb, cid, eid, rec).set()
        self.cs.m.save(sb)

    def kill(self, sb: Sandbox, cid: str, eid: str, sig: int) -> None:
        _c, rec = self._rec(sb, cid, eid)
        if rec["status"] != C_RUNNING or not self.cs.exits.signal(rec["pid"], sig or
                                                                 signal.SIGTERM):
            raise SbxError(Code.NOT_FOUND, f"exec {eid}: process already finished")
        rec["killed_with"] = sig or signal.SIGTERM

    async def wait(self, sb: Sandbox, cid: str, eid: str) -> dict[str, Any]:
        _c, rec = self._rec(sb, cid, eid)
        await self._event(sb, cid, eid, rec).wait()
        return rec

    def state(self, sb: Sandbox, cid: str, eid: str) -> dict[str, Any]:
        return self._rec(sb, cid, eid)[1]

    def delete(self, sb: Sandbox, cid: str, eid: str) -> tuple[int, int, int]:
        c, rec = self._rec(sb, cid, eid)
        if rec["status"] == C_RUNNING:
            raise SbxError(Code.FAILED_PRECONDITION, f"exec {eid} is running")
        del c.execs[eid]
        self._events.pop((sb.id, cid, eid), None)
        base = os.path.join(c.bundle, f"exec-{eid}")
        for ext in (".json", ".pid", ".log"):
            try:
                os.unlink(base + ext)
            except FileNotFoundError:
                pass
        self.cs.m.save(sb)
        return rec["pid"], rec["exit_status"], rec["exited_at_ns"]

    def reattach(self, sb: Sandbox, c: Container) -> None:
        """After a restart: watch exec processes that are still the same live process."""
        for eid, rec in c.execs.items():
            if rec.get("status") != C_RUNNING:
                continue
            if rec.get("pid") and process_start_ticks(rec["pid"]) == rec.get("start_ticks"):
                self._watch(sb, c, eid, rec)
            else:
                self._exited(sb, c.id, eid, rec, None)

    def forget(self, sb: Sandbox) -> None:
        for key in [k for k in self._events if k[0] == sb.id]:
            del self._events[key]
