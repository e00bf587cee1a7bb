"""Owns: the shim daemon — `containerd.task.v2.Task` over ttrpc on the socket inherited as fd 3,
the relay of Task calls to the pod's guest agent, task events, and the process's life.

Calls are relayed as raw payload bytes (`Client.call_raw`): the shim decodes only what it must
act on (ids of Create/Start/Delete, Connect's answer).  Create is the one call it rewrites: the
guest cannot see host bundles, so, Kata-style, the shim sends the process to run with the call —
the agent's pause for the sandbox, the bundle's `process` for a container — unless the engine
already put a spec in `options`.

The VM itself is bench.vmshim.podvm's.  Lifecycle: Shutdown (once no task is left, or with
`now`) and SIGTERM/SIGINT stop the VM and end the daemon.  If the VM dies on its own, pending
and later Waits answer exit status 255 (the task is lost with its VM), a /tasks/exit event says
the same, then the daemon exits: the engine sees a dead shim and runs `delete`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from typing import Any, Awaitable, Callable

from google.protobuf import any_pb2, empty_pb2

from bench.rpc.pb import task_events_pb2 as ev
from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import CallContext, Client, Code, Server, TtrpcError
from bench.runtimes.oci import SpecError, validate_id
from bench.tracing import Tracer
from bench.vmshim import launch
from bench.vmshim.events import EventPublisher
from bench.vmshim.main import Flags
from bench.vmshim.podvm import PodVm
from sim.vocabulary import CALL_CREATE_CONTAINER, CALL_RUN_POD

log = logging.getLogger("chainbench.vmshim")

# bench.rpc.schemas has these too, but it imports grpc: +0.2 s on every shim start
SERVICE = "containerd.task.v2.Task"
TASK_METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["Task"].methods)
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
LOST_EXIT_STATUS = 255  # a task whose VM died: no real exit status exists
_RELAY_DEFAULT_TIMEOUT_S = 60.0
_EXIT_FLUSH_S = 0.1  # after the VM died: let the Wait answers it produced reach the engine
# Methods answered by the shim itself; every other Task method is a plain relay.
_LOCAL = {"Connect", "Create", "Start", "Delete", "Wait", "Shutdown", "Exec"}


def _pause_process() -> dict[str, Any]:
    from bench.vm.agent import PAUSE_ARGS
    return {"args": list(PAUSE_ARGS)}


def _ts(ns: int) -> Any:
    from google.protobuf import timestamp_pb2
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(ns)
    return t


class VmShim:
    """The Task service of one pod's shim."""

    def __init__(self, flags: Flags, bundle: str, sock_path: str, tracer: Tracer,
                 events: EventPublisher | None = None) -> None:
        self.id = flags.id
        self.namespace = flags.namespace
        self.address = flags.address
        self.bundle = bundle
        self.sock_path = sock_path
        self.tracer = tracer
        self.tasks: set[str] = set()  # containers created and not yet deleted
        self.task_pid = 0
        self.exit_requested = asyncio.Event()
        self.stopping = False
        self.pvm = PodVm(self.id, self.namespace, self.address, bundle, tracer,
                         on_change=self.save_state, on_death=self._vm_died)
        self.events = events or EventPublisher(None, flags.namespace)
        self._exit_watchers: set[asyncio.Task[None]] = set()

    # -- registration -------------------------------------------------------------------
    def register(self, server: Server) -> None:
        table: dict[str, tuple[None, Callable[[bytes, CallContext], Awaitable[Any]]]] = {
            "Connect": (None, self.connect),
            "Create": (None, self.create),
            "Start": (None, self.start),
            "Delete": (None, self.delete),
            "Wait": (None, self.wait),
            "Shutdown": (None, self.shutdown),
            "Exec": (None, self.exec),
        }
        for name in TASK_METHODS:
            if name not in _LOCAL:
                table[name] = (None, self._relay_fn(name))
        server.register(SERVICE, table)

    def _relay_fn(self, method: str) -> Callable[[bytes, CallContext], Awaitable[bytes]]:
        async def relay(payload: bytes, ctx: CallContext) -> bytes:
            return await self._relay(method, payload, ctx)
        relay.__name__ = f"relay_{method}"
        return relay

    # -- state file ---------------------------------------------------------------------
    def save_state(self) -> None:
        state: dict[str, Any] = {"id": self.id, "namespace": self.namespace,
                                 "pid": os.getpid(), "ticks": launch.start_ticks(os.getpid()),
                                 "socket": self.sock_path, "task_pid": self.task_pid, "vm": None}
        state["vm"] = self.pvm.state()
        launch.write_state(self.bundle, state)

    def _vm_died(self) -> None:
        async def exit_soon() -> None:
            log.warning("pod %s: the VM is gone; the shim exits", self.id)
            await asyncio.sleep(_EXIT_FLUSH_S)
            self.exit_requested.set()
        asyncio.ensure_future(exit_soon())

    # -- the relay ----------------------------------------------------------------------
    def _agent_or_raise(self) -> Client:
        if self.pvm.gone.is_set():
            raise TtrpcError(Code.UNAVAILABLE, f"the sandbox VM of {self.id} is gone")
        if self.pvm.agent is None:
            raise TtrpcError(Code.NOT_FOUND,
                             f"no task exists yet: the sandbox {self.id} is not created")
        return self.pvm.agent

    async def _relay(self, method: str, payload: bytes, ctx: CallContext) -> bytes:
        agent = self._agent_or_raise()
        # Imported here, not at the top: bench.vm.relay pulls in the QEMU driver, which the
        # shim's start-up (the shim.spawn step) need not pay for.
        from bench.vm.relay import call_timeout
        # A caller without a deadline must not wait forever on a silent agent.
        timeout = call_timeout(method, ctx, _RELAY_DEFAULT_TIMEOUT_S)
        try:
            return await agent.call_raw(SERVICE, method, payload, timeout=timeout,
                                        metadata=ctx.metadata)
        except TtrpcError as exc:
            if exc.code == Code.DEADLINE_EXCEEDED and ctx.deadline is None and timeout:
                raise TtrpcError(Code.DEADLINE_EXCEEDED,
                                 f"the agent of pod {self.id}'s VM did not answer {method} "
                                 f"within {timeout:g}s") from None
            if exc.code == Code.UNAVAILABLE and self.pvm.gone.is_set():
                raise TtrpcError(Code.UNAVAILABLE,
                                 f"the sandbox VM of {self.id} is gone") from None
            raise

    @staticmethod
    def _decode(cls: Any, payload: bytes, method: str) -> Any:
        try:
            return cls.FromString(payload)
        except Exception as exc:  # protobuf DecodeError
            # what the ttrpc server answers for an undecodable request payload
            raise TtrpcError(Code.INTERNAL, f"{SERVICE}/{method}: cannot decode request: "
                                            f"{exc}") from None

    @staticmethod
    def _check_id(value: str, what: str = "container id") -> None:
        try:
            validate_id(value, what)
        except SpecError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from None

    # -- Task methods -------------------------------------------------------------------
    async def connect(self, payload: bytes, ctx: CallContext) -> Any:
        self._decode(pb.ConnectRequest, payload, "Connect")  # reject garbage before relaying
        if self.pvm.agent is None or self.pvm.gone.is_set():
            return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self.task_pid)
        resp = self._decode(pb.ConnectResponse, await self._relay("Connect", payload, ctx),
                            "Connect")
        resp.shim_pid = os.getpid()  # the agent names itself; the engine wants the shim
        return resp

    async def create(self, payload: bytes, ctx: CallContext) -> bytes:
        req = self._decode(pb.CreateTaskRequest, payload, "Create")
        self._check_id(req.id)
        sandbox = req.id == self.id
        call = CALL_RUN_POD if sandbox else CALL_CREATE_CONTAINER
        if self.pvm.agent is None:
            if not sandbox:
                raise TtrpcError(Code.FAILED_PRECONDITION,
                                 f"create the sandbox {self.id} before container {req.id}")
            await self.pvm.ensure(call)
        body = self._guest_create(req, payload, sandbox)
        try:
            with self.tracer.span(self.id, call, "task.create"):
                out = await self._relay("Create", body, ctx)
        finally:
            self.tracer.flush()
        self.tasks.add(req.id)
        self.events.publish("/tasks/create", ev.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=req.rootfs,
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal),
            checkpoint=req.checkpoint, pid=self._decode(pb.CreateTaskResponse, out, "Create").pid))
        return out

    def _guest_create(self, req: Any, payload: bytes, sandbox: bool) -> bytes:
        if req.HasField("options") and req.options.type_url:
            return payload  # the engine chose the guest process itself
        if sandbox:
            process = _pause_process()
        else:
            if not req.bundle:
                return payload
            try:
                with open(os.path.join(req.bundle, "config.json"), "rb") as fh:
                    spec = json.load(fh)
            except FileNotFoundError:
                return payload
            except (OSError, ValueError) as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT,
                                 f"bundle {req.bundle}: cannot read config.json: {exc}") from None
            process = spec.get("process") if isinstance(spec, dict) else None
            if not isinstance(process, dict):
                raise TtrpcError(Code.INVALID_ARGUMENT,
                                 f"bundle {req.bundle}: config.json has no process")
            process = {k: process[k] for k in ("args", "env", "cwd") if k in process}
        req.options.CopyFrom(any_pb2.Any(type_url=PROCESS_TYPE_URL,
                                         value=json.dumps(process).encode()))
        return req.SerializeToString()

    async def start(self, payload: bytes, ctx: CallContext) -> bytes:
        req = self._decode(pb.StartRequest, payload, "Start")
        out = await self._relay("Start", payload, ctx)
        pid = self._decode(pb.StartResponse, out, "Start").pid
        if req.exec_id:
            self.events.publish("/tasks/exec-started", ev.TaskExecStarted(
                container_id=req.id, exec_id=req.exec_id, pid=pid))
        else:
            self.events.publish("/tasks/start", ev.TaskStart(container_id=req.id, pid=pid))
            if req.id == self.id:
                self.task_pid = pid
                self.save_state()
        if self.events.address is not None:
            watcher = asyncio.ensure_future(self._watch_exit(req.id, req.exec_id, pid))
            self._exit_watchers.add(watcher)
            watcher.add_done_callback(self._exit_watchers.discard)
        return out

    async def _watch_exit(self, cid: str, exec_id: str, pid: int) -> None:
        """The runc shim publishes /tasks/exit when a process ends; the agent only answers
        Wait, so one Wait per started process stands in for its reaper."""
        try:
            agent = self._agent_or_raise()
            raw = await agent.call_raw(SERVICE, "Wait",
                                       pb.WaitRequest(id=cid, exec_id=exec_id).SerializeToString())
            w = pb.WaitResponse.FromString(raw)
            status, exited_at = w.exit_status, w.exited_at
        except TtrpcError:
            if self.stopping:
                return
            try:  # the connection may drop a moment before we learn the VM exited
                await asyncio.wait_for(self.pvm.gone.wait(), 2.0)
            except asyncio.TimeoutError:
                return  # the task went away some other way (Delete): no exit to report
            if self.stopping:
                return
            status, exited_at = LOST_EXIT_STATUS, _ts(self.pvm.exit_ns)
        self.events.publish("/tasks/exit", ev.TaskExit(
            container_id=cid, id=exec_id or cid, pid=pid, exit_status=status,
            exited_at=exited_at))

    async def delete(self, payload: bytes, ctx: CallContext) -> bytes:
        req = self._decode(pb.DeleteRequest, payload, "Delete")
        out = await self._relay("Delete", payload, ctx)
        if not req.exec_id:
            self.tasks.discard(req.id)
            d = self._decode(pb.DeleteResponse, out, "Delete")
            self.events.publish("/tasks/delete", ev.TaskDelete(
                container_id=req.id, pid=d.pid, exit_status=d.exit_status,
                exited_at=d.exited_at, id=req.id))
        return out

    async def exec(self, payload: bytes, ctx: CallContext) -> bytes:
        req = self._decode(pb.ExecProcessRequest, payload, "Exec")
        out = await self._relay("Exec", payload, ctx)
        self.events.publish("/tasks/exec-added", ev.TaskExecAdded(container_id=req.id,
                                                                  exec_id=req.exec_id))
        return out

    async def wait(self, payload: bytes, ctx: CallContext) -> Any:
        if self.pvm.gone.is_set():
            return self._lost_exit()
        agent = self._agent_or_raise()
        relay = asyncio.ensure_future(agent.call_raw(SERVICE, "Wait", payload,
                                                     timeout=ctx.time_remaining(),
                                                     metadata=ctx.metadata))
        gone = asyncio.ensure_future(self.pvm.gone.wait())
        try:
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            if relay.done():
                try:
                    return relay.result()
                except TtrpcError as exc:
                    if exc.code != Code.UNAVAILABLE:
                        raise
                    # the connection may drop a moment before we learn the VM exited
                    try:
                        await asyncio.wait_for(asyncio.shield(gone), 2.0)
                    except asyncio.TimeoutError:
                        raise exc from None
            return self._lost_exit()
        finally:
            relay.cancel()
            gone.cancel()

    def _lost_exit(self) -> Any:
        return pb.WaitResponse(exit_status=LOST_EXIT_STATUS, exited_at=_ts(self.pvm.exit_ns))

    async def shutdown(self, payload: bytes, ctx: CallContext) -> Any:
        req = self._decode(pb.ShutdownRequest, payload, "Shutdown")
        if self.tasks and not req.now and not self.pvm.gone.is_set():
            return empty_pb2.Empty()  # like the runc shim: still holding tasks
        # after this reply is written (same loop iteration), then tear down
        asyncio.get_running_loop().call_soon(self.exit_requested.set)
        return empty_pb2.Empty()

    async def teardown(self) -> None:
        """Stop the VM; call after the server is closed (no handler still running)."""
        self.stopping = True
        for w in list(self._exit_watchers):
            w.cancel()
        await self.pvm.teardown()


# -- process entry ------------------------------------------------------------------------------
def _tell_start(msg: str) -> None:
    try:
        os.write(launch.READY_FD, (msg + "\n").encode())
        os.close(launch.READY_FD)
    except OSError:
        pass  # started by hand, without a readiness pipe


async def _serve(flags: Flags) -> int:
    loop = asyncio.get_running_loop()
    bundle = os.getcwd()
    try:
        sock = socket.socket(fileno=launch.LISTEN_FD)
    except OSError as exc:
        _tell_start(f"error: no listening socket on fd {launch.LISTEN_FD}: {exc}")
        return 1
    name = sock.getsockname()
    sock_path = name.decode() if isinstance(name, bytes) else str(name)
    tracer = Tracer.from_dir(flags.trace_dir or None, "shim")
    events = EventPublisher(os.environ.get("TTRPC_ADDRESS"), flags.namespace)
    shim = VmShim(flags, bundle, sock_path, tracer, events)
    server = Server()  # peers must share our uid, as containerd's shims require
    shim.register(server)
    try:
        await server.start_socket(sock)
        shim.save_state()
    except Exception as exc:
        _tell_start(f"error: {exc}")
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shim.exit_requested.set)
    _tell_start("ok")
    log.info("shim %s serving on %s (pid %d)", flags.id, sock_path, os.getpid())
    await shim.exit_requested.wait()
    shim.stopping = shim.pvm.stopping = True  # from here a VM exit is ours, not a crash
    try:
        await server.close()  # cancels in-flight calls, e.g. a Create still booting the VM
        await shim.teardown()
    finally:
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        launch.remove_state(bundle)
        await events.close()
        tracer.flush()
    log.info("shim %s exited", flags.id)
    return 0


def run_daemon(flags: Flags) -> int:
    logging.basicConfig(level=logging.DEBUG if flags.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s vmshim[%(process)d] %(levelname)s %(message)s")
    if not flags.id or not flags.namespace:
        _tell_start("error: -id and -namespace are required")
        return 2
    return asyncio.run(_serve(flags))
