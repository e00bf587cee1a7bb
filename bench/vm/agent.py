"""Owns: the guest agent: `containerd.task.v2.Task` over ttrpc for processes inside a microVM.

In the guest it runs as PID 1 (started by the initramfs /init) and serves the virtio-serial port
`/dev/vport0p1`; on the host (tests) it serves a unix socket path (`--listen`) or an inherited
connected socket (`--fd`).  Processes run directly with the guest's busybox userland: no runc,
no namespaces — the VM is the sandbox.

Process spec, first match wins (all JSON, OCI runtime-spec shapes):
  * Create `options` Any whose type_url ends in `runtime-spec/1/Spec` (a whole spec) or
    `runtime-spec/1/Process` (just the process);
  * `<bundle>/config.json` when that path exists in the guest;
  * otherwise the pod's pause process (sleeps until killed).
Runc shim options (`containerd.runc.v1.Options`) are ignored, other option types refused.
`rootfs` mounts and host stdio FIFO paths are ignored (stdio is /dev/null unless the path
exists in the guest): the guest sees none of the host's files.
Exec takes its `spec` Any as an OCI Process.  Create only records the process; Start spawns it
(so Create answers pid 0, like a task whose init has not been exec'd yet).

Keep imports lean: every module imported here is packed into the guest image and costs boot time.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import empty_pb2, timestamp_pb2

from bench.rpc.pb import containerd_task_types_pb2 as tt
from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Code, Server, TtrpcError
from bench.vm.agent_port import wire_bytes, wire_fields, wire_uint

SERVICE = "containerd.task.v2.Task"
VERSION = "chainbench-agent/1"
GUEST_PORT = "/dev/vport0p1"
PAUSE_ARGS = ["sleep", "2147483647"]
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Options a runc-minded caller may send along; they mean nothing in the guest.
_IGNORED_OPTIONS = frozenset({"containerd.runc.v1.Options", "containerd.runhcs.v1.Options"})
_DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def _check_id(kind: str, value: str, *, allow_empty: bool = False) -> None:
    if allow_empty and value == "":
        return
    if not _ID_RE.match(value):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid {kind} {value!r}")


@dataclass
class ProcSpec:
    args: list[str]
    env: list[str] = field(default_factory=lambda: list(_DEFAULT_ENV))
    cwd: str = "/"

    @classmethod
    def from_oci_process(cls, proc: Any) -> "ProcSpec":
        if not isinstance(proc, dict):
            raise TtrpcError(Code.INVALID_ARGUMENT, "OCI process must be a JSON object")
        args = proc.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise TtrpcError(Code.INVALID_ARGUMENT, "OCI process.args must be a non-empty list "
                                                    "of strings")
        env = proc.get("env") or list(_DEFAULT_ENV)
        if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
            raise TtrpcError(Code.INVALID_ARGUMENT, "OCI process.env must be KEY=VALUE strings")
        cwd = proc.get("cwd") or "/"
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise TtrpcError(Code.INVALID_ARGUMENT, "OCI process.cwd must be absolute")
        return cls(list(args), list(env), cwd)


def _json_any(type_url: str, value: bytes, what: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"{what} {type_url}: not JSON: {exc}") from None


def spec_for_create(req: pb.CreateTaskRequest) -> ProcSpec:
    if req.HasField("options") and req.options.type_url:
        url = req.options.type_url
        if url.endswith("runtime-spec/1/Spec"):
            spec = _json_any(url, req.options.value, "Create options")
            return ProcSpec.from_oci_process((spec or {}).get("process"))
        if url.endswith("runtime-spec/1/Process"):
            return ProcSpec.from_oci_process(_json_any(url, req.options.value, "Create options"))
        if url not in _IGNORED_OPTIONS:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"unsupported Create options type {url!r}")
    if req.bundle:
        if not req.bundle.startswith("/"):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"bundle {req.bundle!r} must be absolute")
        cfg = os.path.join(req.bundle, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg, "rb") as fh:
                    spec = json.load(fh)
            except (OSError, ValueError) as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"{cfg}: {exc}") from None
            return ProcSpec.from_oci_process(spec.get("process"))
    return ProcSpec(list(PAUSE_ARGS))


def _now() -> timestamp_pb2.Timestamp:
    ns = time.time_ns()
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


@dataclass
class Proc:
    container: str
    exec_id: str
    spec: ProcSpec
    stdout: str = ""
    stderr: str = ""
    pid: int = 0
    status: int = tt.CREATED
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Container:
    id: str
    bundle: str
    init: Proc
    execs: dict[str, Proc] = field(default_factory=dict)

    def procs(self) -> list[Proc]:
        return [self.init, *self.execs.values()]


def _resolve(argv0: str, env: list[str]) -> str:
    if "/" in argv0:
        return argv0
    path = next((e[5:] for e in env if e.startswith("PATH=")), _DEFAULT_ENV[0][5:])
    for d in path.split(":"):
        cand = os.path.join(d or ".", argv0)
        if os.access(cand, os.X_OK):
            return cand
    raise TtrpcError(Code.INVALID_ARGUMENT, f"executable {argv0!r} not found in PATH")


def _stdio_target(path: str) -> str:
    # Host FIFO paths mean nothing inside the guest; only an existing guest path is honoured.
    return path if path and path.startswith("/") and os.path.exists(path) else "/dev/null"


class TaskService:
    """The Task API state machine over guest processes."""

    def __init__(self, on_shutdown: Any = None) -> None:
        self.containers: dict[str, Container] = {}
        self.by_pid: dict[int, Proc] = {}
        self.on_shutdown = on_shutdown
        self.pid = os.getpid()
        # The readiness probe's answer (Connect without an id), ready-made for the inline path.
        self._connect_reply = wire_uint(1, self.pid) + wire_bytes(3, VERSION.encode())

    # -- process plumbing -------------------------------------------------------------------
    def reap(self) -> None:
        """SIGCHLD: collect every exited child (as PID 1 this also reaps orphans)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.pop(pid, None)
            if proc is None:
                continue
            proc.status = tt.STOPPED
            proc.exit_status = os.waitstatus_to_exitcode(status)
            if proc.exit_status < 0:  # killed by a signal: report 128+N as shells and runc do
                proc.exit_status = 128 - proc.exit_status
            proc.exited_at = _now()
            proc.exited.set()

    def _spawn(self, proc: Proc) -> int:
        spec = proc.spec
        exe = _resolve(spec.args[0], spec.env)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, _stdio_target(proc.stdout), os.O_WRONLY | os.O_APPEND, 0),
            (os.POSIX_SPAWN_OPEN, 2, _stdio_target(proc.stderr), os.O_WRONLY | os.O_APPEND, 0),
        ]
        cwd = os.getcwd()
        try:
            # posix_spawn has no chdir action before glibc 2.29's _np variant in Python; the
            # agent is single-threaded around this call, so a brief chdir is safe.
            if spec.cwd != cwd:
                os.chdir(spec.cwd)
            pid = os.posix_spawn(exe, spec.args, {k: v for k, _, v in
                                                  (e.partition("=") for e in spec.env)},
                                 file_actions=actions, setsid=True,
                                 setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGCHLD,
                                            signal.SIGIO, signal.SIGPIPE))
        except OSError as exc:
            raise TtrpcError(Code.FAILED_PRECONDITION,
                             f"cannot start {spec.args[0]!r}: {exc.strerror}") from None
        finally:
            if os.getcwd() != cwd:
                os.chdir(cwd)
        return pid

    # -- lookup -----------------------------------------------------------------------------
    def _container(self, cid: str) -> Container:
        _check_id("container id", cid)
        c = self.containers.get(cid)
        if c is None:
            raise TtrpcError(Code.NOT_FOUND, f"container {cid!r} not found")
        return c

    def _proc(self, cid: str, exec_id: str) -> Proc:
        c = self._container(cid)
        if not exec_id:
            return c.init
        _check_id("exec id", exec_id)
        p = c.execs.get(exec_id)
        if p is None:
            raise TtrpcError(Code.NOT_FOUND, f"exec {exec_id!r} of {cid!r} not found")
        return p

    # -- Task API ---------------------------------------------------------------------------
    async def create(self, req: pb.CreateTaskRequest, ctx: Any) -> pb.CreateTaskResponse:
        _check_id("container id", req.id)
        if req.id in self.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {req.id!r} already exists")
        if req.terminal:
            raise TtrpcError(Code.UNIMPLEMENTED, "terminal processes are not supported")
        if req.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "restore from checkpoint is not supported")
        spec = spec_for_create(req)
        self.containers[req.id] = Container(req.id, req.bundle,
                                            Proc(req.id, "", spec, req.stdout, req.stderr))
        return pb.CreateTaskResponse(pid=0)

    async def start(self, req: pb.StartRequest, ctx: Any) -> pb.StartResponse:
        proc = self._proc(req.id, req.exec_id)
        if proc.status != tt.CREATED:
            raise TtrpcError(Code.FAILED_PRECONDITION,
                             f"{req.id}/{req.exec_id or 'init'} is not in created state")
        if req.exec_id and self.containers[req.id].init.status != tt.RUNNING:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {req.id!r} is not running")
        pid = self._spawn(proc)
        proc.pid, proc.status = pid, tt.RUNNING
        self.by_pid[pid] = proc
        # A child that exited before we recorded its pid was skipped by reap(): look again.
        self.reap()
        return pb.StartResponse(pid=pid)

    async def state(self, req: pb.StateRequest, ctx: Any) -> pb.StateResponse:
        p = self._proc(req.id, req.exec_id)
        c = self.containers[req.id]
        resp = pb.StateResponse(id=req.id, bundle=c.bundle, pid=p.pid, status=p.status,
                                stdout=p.stdout, stderr=p.stderr, exit_status=p.exit_status,
                                exec_id=req.exec_id)
        if p.exited_at is not None:
            resp.exited_at.CopyFrom(p.exited_at)
        return resp

    async def pids(self, req: pb.PidsRequest, ctx: Any) -> pb.PidsResponse:
        c = self._container(req.id)
        return pb.PidsResponse(processes=[tt.ProcessInfo(pid=p.pid) for p in c.procs()
                                          if p.status == tt.RUNNING])

    async def kill(self, req: pb.KillRequest, ctx: Any) -> empty_pb2.Empty:
        c = self._container(req.id)
        sig = req.signal or signal.SIGTERM
        if sig >= signal.NSIG:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid signal {sig}")
        targets = [p for p in c.procs() if p.status == tt.RUNNING] if req.all else \
            [self._proc(req.id, req.exec_id)]
        if not req.all and targets[0].status != tt.RUNNING:
            raise TtrpcError(Code.NOT_FOUND, f"{req.id}/{req.exec_id or 'init'}: "
                                              "process is not running")
        for p in targets:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass  # exited between our check and the signal; reap() will record it
        return empty_pb2.Empty()

    async def wait(self, req: pb.WaitRequest, ctx: Any) -> pb.WaitResponse:
        p = self._proc(req.id, req.exec_id)
        await p.exited.wait()
        return pb.WaitResponse(exit_status=p.exit_status, exited_at=p.exited_at)

    async def delete(self, req: pb.DeleteRequest, ctx: Any) -> pb.DeleteResponse:
        p = self._proc(req.id, req.exec_id)
        if p.status == tt.RUNNING:
            raise TtrpcError(Code.FAILED_PRECONDITION,
                             f"{req.id}/{req.exec_id or 'init'} is still running")
        c = self.containers[req.id]
        if req.exec_id:
            del c.execs[req.exec_id]
        else:
            if any(e.status == tt.RUNNING for e in c.execs.values()):
                raise TtrpcError(Code.FAILED_PRECONDITION,
                                 f"container {req.id!r} still has running execs")
            del self.containers[req.id]
        resp = pb.DeleteResponse(pid=p.pid, exit_status=p.exit_status)
        resp.exited_at.CopyFrom(p.exited_at or _now())
        return resp

    async def exec(self, req: pb.ExecProcessRequest, ctx: Any) -> empty_pb2.Empty:
        c = self._container(req.id)
        _check_id("exec id", req.exec_id)
        if req.exec_id in c.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"exec {req.exec_id!r} already exists")
        if req.terminal:
            raise TtrpcError(Code.UNIMPLEMENTED, "terminal processes are not supported")
        if not req.HasField("spec") or not req.spec.value:
            raise TtrpcError(Code.INVALID_ARGUMENT, "Exec needs an OCI process spec")
        spec = ProcSpec.from_oci_process(_json_any(req.spec.type_url, req.spec.value,
                                                   "Exec spec"))
        c.execs[req.exec_id] = Proc(req.id, req.exec_id, spec, req.stdout, req.stderr)
        return empty_pb2.Empty()

    async def close_io(self, req: pb.CloseIORequest, ctx: Any) -> empty_pb2.Empty:
        self._proc(req.id, req.exec_id)  # stdin is always /dev/null here: nothing to close
        return empty_pb2.Empty()

    async def connect(self, req: pb.ConnectRequest, ctx: Any) -> pb.ConnectResponse:
        if req.id:
            _check_id("container id", req.id)
        return pb.ConnectResponse(shim_pid=self.pid, task_pid=self._task_pid(req.id),
                                  version=VERSION)

    def _task_pid(self, cid: str) -> int:
        c = self.containers.get(cid) if cid else None
        return c.init.pid if c else 0

    def connect_wire(self, payload: bytes) -> bytes | None:
        """Connect from and to wire bytes, for the port's inline path (bench.vm.agent_port);
        None for anything but a plain, valid request (the regular path answers those)."""
        if not payload:
            return self._connect_reply
        try:
            fields = wire_fields(payload)
        except (ValueError, IndexError):
            return None
        raw = fields.pop(1, b"")  # ConnectRequest.id
        if fields or not isinstance(raw, bytes):
            return None
        try:
            cid = raw.decode()
        except UnicodeDecodeError:
            return None
        if cid and not _ID_RE.match(cid):
            return None
        task_pid = self._task_pid(cid)
        if not task_pid:
            return self._connect_reply
        # ConnectResponse: shim_pid=1, task_pid=2, version=3
        return wire_uint(1, self.pid) + wire_uint(2, task_pid) + wire_bytes(3, VERSION.encode())

    async def shutdown(self, req: pb.ShutdownRequest, ctx: Any) -> empty_pb2.Empty:
        # Like the runc shim: a no-op while containers remain (unless `now`).
        if (req.now or not self.containers) and self.on_shutdown is not None:
            asyncio.get_running_loop().call_later(0.05, self.on_shutdown)
        return empty_pb2.Empty()

    def register(self, server: Server) -> None:
        server.register(SERVICE, {
            "Create": (pb.CreateTaskRequest, pb.CreateTaskResponse, self.create),
            "Start": (pb.StartRequest, pb.StartResponse, self.start),
            "State": (pb.StateRequest, pb.StateResponse, self.state),
            "Pids": (pb.PidsRequest, pb.PidsResponse, self.pids),
            "Kill": (pb.KillRequest, empty_pb2.Empty, self.kill),
            "Wait": (pb.WaitRequest, pb.WaitResponse, self.wait),
            "Delete": (pb.DeleteRequest, pb.DeleteResponse, self.delete),
            "Exec": (pb.ExecProcessRequest, empty_pb2.Empty, self.exec),
            "CloseIO": (pb.CloseIORequest, empty_pb2.Empty, self.close_io),
            "Connect": (pb.ConnectRequest, pb.ConnectResponse, self.connect),
            "Shutdown": (pb.ShutdownRequest, empty_pb2.Empty, self.shutdown),
        })


def _server_protocol(server: Server) -> Any:
    # ttrpc's Server has no public "serve this one transport" hook yet; its per-connection
    # protocol is what a listener would create for each accepted socket.
    from bench.rpc.ttrpc.server import _ServerConnection
    return lambda: _ServerConnection(server)


def _power_off() -> None:
    # PID 1 must not just exit (kernel panic); a forced reboot ends QEMU run with -no-reboot.
    os.sync()
    os.execv("/bin/busybox", ["reboot", "-f"])


async def run(args: AgentArgs) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    in_guest = args.port is not None
    service = TaskService(on_shutdown=stop.set)
    server = Server(check_peer=not in_guest and args.fd is None)
    service.register(server)
    loop.add_signal_handler(signal.SIGCHLD, service.reap)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.port is not None:
        from bench.vm.agent_port import serve_port
        await serve_port(server, args.port, stop, inline_service=SERVICE,
                         inline={"Connect": service.connect_wire})
    elif args.fd is not None:
        sock = socket.socket(fileno=args.fd)
        await loop.connect_accepted_socket(_server_protocol(server), sock)
        await stop.wait()
    else:
        await server.start(args.listen)
        print(f"agent listening on {args.listen}", file=sys.stderr, flush=True)
        await stop.wait()
    await server.close()
    for c in service.containers.values():
        for p in c.procs():
            if p.status == tt.RUNNING:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return 0


@dataclass
class AgentArgs:
    port: str | None = None  # virtio-serial port device (the guest: GUEST_PORT)
    listen: str | None = None  # unix socket path to serve (host testing)
    fd: int | None = None  # inherited connected stream socket (host testing)


_USAGE = "usage: bench.vm.agent [--port DEV | --listen PATH | --fd N]"


def parse_args(argv: list[str]) -> AgentArgs:
    # argparse alone costs ~0.5 s of a TCG guest's cold boot; three options do not need it.
    args = AgentArgs()
    if len(argv) not in (0, 2) or (argv and argv[0] not in ("--port", "--listen", "--fd")):
        raise SystemExit(_USAGE)
    if not argv:
        args.port = GUEST_PORT
    elif argv[0] == "--fd":
        if not argv[1].isdigit():
            raise SystemExit(_USAGE)
        args.fd = int(argv[1])
    else:
        setattr(args, argv[0][2:], argv[1])
    return args


GUEST_MANIFEST = "/usr/lib/chainbench-agent-modules"  # written by bench.vm.initramfs
_GUEST_PY_FILES = ("/usr/lib/python311.zip", "/usr/lib/python3.11/google", GUEST_MANIFEST)


def preload_and_drop_modules() -> None:
    """Guest only: import the image's whole module closure now, then delete the Python sources
    from the RAM-backed root.  The image holds nothing beyond that closure, so no later import
    can need them; every snapshot and clone is ~4 MB smaller."""
    import importlib
    try:
        with open(GUEST_MANIFEST) as fh:
            names = fh.read().split()
    except OSError:
        return
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a harvest-only module failing here is harmless
            pass
    # os.walk, not shutil: only modules of the closure exist in the guest.
    for path in _GUEST_PY_FILES:
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        try:
            (os.rmdir if os.path.isdir(path) else os.unlink)(path)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.port is not None and os.getpid() == 1:
        preload_and_drop_modules()
    rc = asyncio.run(run(args))
    if os.getpid() == 1:
        _power_off()
    return rc


if __name__ == "__main__":
    sys.exit(main())
