"""Owns: the in-process `containerd.task.v2.Task` service of one sandbox (ttrpc adapter).

One ttrpc Server per sandbox on `<dir>/<id>/task.sock`; its handlers are thin: decode, call
`Containers` (or its `execs` when the request names an exec_id), encode, map `SbxError` to
`TtrpcError`.  Methods not registered here (Checkpoint, Update, Stats, ResizePty) are answered
UNIMPLEMENTED by the ttrpc server.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Awaitable, Callable

from google.protobuf import empty_pb2

from bench.rpc.pb import containerd_task_types_pb2 as ttypes
from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import CallContext, Code, TtrpcError
from bench.sandboxer import bundle as bundles
from bench.sandboxer.containers import Containers
from bench.sandboxer.manager import SbxError, timestamp
from bench.sandboxer.state import C_CREATED, C_RUNNING, C_STOPPED, Sandbox

_STATUS = {C_CREATED: ttypes.CREATED, C_RUNNING: ttypes.RUNNING, C_STOPPED: ttypes.STOPPED}
_EMPTY = empty_pb2.Empty()


def _mapped(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except SbxError as exc:
            raise TtrpcError(int(exc.code), exc.message) from None
    return wrapper


class TaskService:
    """Task API of one sandbox; instances are tiny (two references)."""

    __slots__ = ("cs", "sb")

    def __init__(self, cs: Containers, sb: Sandbox) -> None:
        self.cs = cs
        self.sb = sb

    @_mapped
    async def Create(self, req: pb.CreateTaskRequest, ctx: CallContext) -> pb.CreateTaskResponse:
        if req.checkpoint or req.parent_checkpoint:
            raise SbxError(Code.UNIMPLEMENTED, "checkpoint restore is not supported")
        c = await self.cs.create(self.sb, req.id, req.bundle,
                                 bundles.mounts_from_proto(req.rootfs),
                                 (req.stdin, req.stdout, req.stderr), req.terminal)
        return pb.CreateTaskResponse(pid=c.pid)

    @_mapped
    async def Start(self, req: pb.StartRequest, ctx: CallContext) -> pb.StartResponse:
        if req.exec_id:
            return pb.StartResponse(pid=await self.cs.execs.start(self.sb, req.id, req.exec_id))
        c = await self.cs.start(self.sb, req.id)
        return pb.StartResponse(pid=c.pid)

    @_mapped
    async def Exec(self, req: pb.ExecProcessRequest, ctx: CallContext) -> empty_pb2.Empty:
        spec = None
        if req.spec.value:
            try:
                spec = json.loads(req.spec.value)
            except ValueError as exc:
                raise SbxError(Code.INVALID_ARGUMENT, f"exec spec is not JSON: {exc}") from None
        await self.cs.execs.add(self.sb, req.id, req.exec_id, spec,
                                (req.stdin, req.stdout, req.stderr), req.terminal)
        return _EMPTY

    @_mapped
    async def State(self, req: pb.StateRequest, ctx: CallContext) -> pb.StateResponse:
        if req.exec_id:
            c = self.cs.task(self.sb, req.id)
            r = self.cs.execs.state(self.sb, req.id, req.exec_id)
            return pb.StateResponse(
                id=c.id, bundle=c.bundle, pid=r["pid"], status=_STATUS.get(r["status"], 0),
                stdin=r["stdin"], stdout=r["stdout"], stderr=r["stderr"],
                exit_status=r["exit_status"], exited_at=timestamp(r["exited_at_ns"]),
                exec_id=req.exec_id)
        c = self.cs.task(self.sb, req.id)
        return pb.StateResponse(
            id=c.id, bundle=c.bundle, pid=c.pid, status=_STATUS.get(c.status, ttypes.UNKNOWN),
            stdin=c.stdin, stdout=c.stdout, stderr=c.stderr, terminal=c.terminal,
            exit_status=c.exit_status, exited_at=timestamp(c.exited_at_ns), exec_id=req.exec_id)

    @_mapped
    async def Pids(self, req: pb.PidsRequest, ctx: CallContext) -> pb.PidsResponse:
        pids = await self.cs.pids(self.sb, req.id)
        return pb.PidsResponse(processes=[ttypes.ProcessInfo(pid=p) for p in pids])

    @_mapped
    async def Kill(self, req: pb.KillRequest, ctx: CallContext) -> empty_pb2.Empty:
        if req.exec_id:
            self.cs.execs.kill(self.sb, req.id, req.exec_id, req.signal)
            return _EMPTY
        await self.cs.kill(self.sb, req.id, req.signal, req.all)
        return _EMPTY

    @_mapped
    async def Wait(self, req: pb.WaitRequest, ctx: CallContext) -> pb.WaitResponse:
        if req.exec_id:
            r = await self.cs.execs.wait(self.sb, req.id, req.exec_id)
            return pb.WaitResponse(exit_status=r["exit_status"],
                                   exited_at=timestamp(r["exited_at_ns"]))
        c = await self.cs.wait(self.sb, req.id)
        return pb.WaitResponse(exit_status=c.exit_status, exited_at=timestamp(c.exited_at_ns))

    @_mapped
    async def Delete(self, req: pb.DeleteRequest, ctx: CallContext) -> pb.DeleteResponse:
        if req.exec_id:
            pid, status, at = self.cs.execs.delete(self.sb, req.id, req.exec_id)
        else:
            pid, status, at = await self.cs.delete(self.sb, req.id)
        return pb.DeleteResponse(pid=pid, exit_status=status, exited_at=timestamp(at))

    @_mapped
    async def Pause(self, req: pb.PauseRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.cs.pause(self.sb, req.id, resume=False)
        return _EMPTY

    @_mapped
    async def Resume(self, req: pb.ResumeRequest, ctx: CallContext) -> empty_pb2.Empty:
        await self.cs.pause(self.sb, req.id, resume=True)
        return _EMPTY

    @_mapped
    async def CloseIO(self, req: pb.CloseIORequest, ctx: CallContext) -> empty_pb2.Empty:
        # We never hold a process's stdin open ourselves: nothing to close.
        if req.exec_id:
            self.cs.execs.state(self.sb, req.id, req.exec_id)
        else:
            self.cs.task(self.sb, req.id)
        return _EMPTY

    @_mapped
    async def Connect(self, req: pb.ConnectRequest, ctx: CallContext) -> pb.ConnectResponse:
        task_pid = 0
        if req.id:
            c = self.sb.containers.get(req.id)
            task_pid = c.pid if c is not None else 0
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid, version="2")

    @_mapped
    async def Shutdown(self, req: pb.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:
        # The sandboxer serves every pod: a task-level Shutdown never ends the process
        # (sandbox Controller.Shutdown does the pod's teardown).
        return _EMPTY


_METHODS = {
    "Create": pb.CreateTaskRequest, "Start": pb.StartRequest, "State": pb.StateRequest,
    "Pids": pb.PidsRequest, "Kill": pb.KillRequest, "Wait": pb.WaitRequest,
    "Delete": pb.DeleteRequest, "Pause": pb.PauseRequest, "Resume": pb.ResumeRequest,
    "CloseIO": pb.CloseIORequest, "Exec": pb.ExecProcessRequest, "Connect": pb.ConnectRequest, "Shutdown": pb.ShutdownRequest,
}


def task_methods(cs: Containers, sb: Sandbox) -> dict[str, tuple[Any, Any]]:
    svc = TaskService(cs, sb)
    return {name: (req, getattr(svc, name)) for name, req in _METHODS.items()}
