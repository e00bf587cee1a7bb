"""Owns: the typed async client for `containerd.task.v2.Task` over our ttrpc.

One `TaskClient` = one ttrpc connection to a shim, a sandboxer's task address or a VM agent.
Methods take keyword arguments, build the request message, and return the response message
(`google.protobuf.Empty` for the methods that answer nothing).  Every call carries the
`containerd-namespace-ttrpc` metadata and a deadline (`timeout=` per call, else the client
default; `wait` blocks until the process exits and therefore has no default deadline).

    client = await TaskClient.connect("unix:///run/containerd/s/…", namespace="k8s.io")
    await client.create(id="p1", bundle="/run/…/p1")
    await client.start(id="p1")
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from google.protobuf import any_pb2, empty_pb2

from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Client, Code, TtrpcError

SERVICE = "containerd.task.v2.Task"
NS_METADATA_KEY = "containerd-namespace-ttrpc"
DEFAULT_NAMESPACE = "chainbench"
DEFAULT_TIMEOUT = 30.0
_UNSET: Any = object()

__all__ = ["SERVICE", "TaskClient", "TtrpcError", "Code", "pb", "pack_any", "process_spec_any"]


class _ClassOrInstance:
    """Descriptor: one name, a classmethod when read from the class and a method when read
    from an instance, so `TaskClient.connect(addr)` dials like other clients of the testbed
    while `client.connect(id=...)` stays the Task API's own Connect."""

    def __init__(self, on_class: Any, on_instance: Any) -> None:
        self.on_class = on_class
        self.on_instance = on_instance

    def __get__(self, obj: Any, owner: type) -> Any:
        if obj is None:
            return self.on_class.__get__(None, owner)
        return self.on_instance.__get__(obj, owner)


class TaskClient:
    """Typed Task v2 calls on one ttrpc connection."""

    def __init__(self, client: Client, *, namespace: str = DEFAULT_NAMESPACE,
                 timeout: float | None = DEFAULT_TIMEOUT, service: str = SERVICE) -> None:
        self.client = client
        self.namespace = namespace
        self.timeout = timeout
        self.service = service
        self._md = {NS_METADATA_KEY: namespace} if namespace else None

    @classmethod
    async def dial(cls, address: str, *, namespace: str = DEFAULT_NAMESPACE,
                   timeout: float | None = DEFAULT_TIMEOUT,
                   connect_timeout: float | None = 5.0) -> "TaskClient":
        """Dial `unix:///path`, `ttrpc+unix:///path`, a bare path or `@abstract`."""
        c = await Client.connect(address, timeout=connect_timeout)
        return cls(c, namespace=namespace, timeout=timeout)

    @property
    def address(self) -> str:
        return self.client.address

    @property
    def closed(self) -> bool:
        return self.client.closed

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> "TaskClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, req: Any, resp_cls: type, timeout: Any) -> Any:
        return await self.client.call(self.service, method, req, resp_cls,
                                      timeout=self.timeout if timeout is _UNSET else timeout,
                                      metadata=self._md)

    # -- lifecycle -----------------------------------------------------------------------------
    async def create(self, *, id: str, bundle: str, rootfs: Iterable[Any] = (),
                     terminal: bool = False, stdin: str = "", stdout: str = "", stderr: str = "",
                     checkpoint: str = "", parent_checkpoint: str = "",
                     options: any_pb2.Any | None = None,
                     timeout: float | None = _UNSET) -> pb.CreateTaskResponse:
        req = pb.CreateTaskRequest(id=id, bundle=bundle, terminal=terminal, stdin=stdin,
                                   stdout=stdout, stderr=stderr, checkpoint=checkpoint,
                                   parent_checkpoint=parent_checkpoint)
        req.rootfs.extend(rootfs)
        if options is not None:
            req.options.CopyFrom(options)
        return await self._call("Create", req, pb.CreateTaskResponse, timeout)

    async def start(self, *, id: str, exec_id: str = "",
                    timeout: float | None = _UNSET) -> pb.StartResponse:
        return await self._call("Start", pb.StartRequest(id=id, exec_id=exec_id),
                                pb.StartResponse, timeout)

    async def delete(self, *, id: str, exec_id: str = "",
                     timeout: float | None = _UNSET) -> pb.DeleteResponse:
        return await self._call("Delete", pb.DeleteRequest(id=id, exec_id=exec_id),
                                pb.DeleteResponse, timeout)

    async def exec(self, *, id: str, exec_id: str, spec: any_pb2.Any | None = None,
                   terminal: bool = False, stdin: str = "", stdout: str = "", stderr: str = "",
                   timeout: float | None = _UNSET) -> empty_pb2.Empty:
        req = pb.ExecProcessRequest(id=id, exec_id=exec_id, terminal=terminal, stdin=stdin,
                                    stdout=stdout, stderr=stderr)
        if spec is not None:
            req.spec.CopyFrom(spec)
        return await self._call("Exec", req, empty_pb2.Empty, timeout)

    async def kill(self, *, id: str, signal: int = 15, exec_id: str = "", all: bool = False,
                   timeout: float | None = _UNSET) -> empty_pb2.Empty:
        req = pb.KillRequest(id=id, exec_id=exec_id, signal=int(signal), all=all)
        return await self._call("Kill", req, empty_pb2.Empty, timeout)

    async def wait(self, *, id: str, exec_id: str = "",
                   timeout: float | None = None) -> pb.WaitResponse:
        """Blocks until the process exits; no deadline unless `timeout` is given."""
        return await self._call("Wait", pb.WaitRequest(id=id, exec_id=exec_id),
                                pb.WaitResponse, timeout)

    # -- queries -------------------------------------------------------------------------------
    async def state(self, *, id: str, exec_id: str = "",
                    timeout: float | None = _UNSET) -> pb.StateResponse:
        return await self._call("State", pb.StateRequest(id=id, exec_id=exec_id),
                                pb.StateResponse, timeout)

    async def pids(self, *, id: str, timeout: float | None = _UNSET) -> pb.PidsResponse:
        return await self._call("Pids", pb.PidsRequest(id=id), pb.PidsResponse, timeout)

    async def stats(self, *, id: str, timeout: float | None = _UNSET) -> pb.StatsResponse:
        return await self._call("Stats", pb.StatsRequest(id=id), pb.StatsResponse, timeout)

    async def connect_task(self, *, id: str,
                           timeout: float | None = _UNSET) -> pb.ConnectResponse:
        """The Task `Connect` RPC (shim pid, task pid, version)."""
        return await self._call("Connect", pb.ConnectRequest(id=id), pb.ConnectResponse, timeout)

    # `TaskClient.connect(address)` dials; `client.connect(id=...)` is the Connect RPC
    connect = _ClassOrInstance(dial, connect_task)

    # -- control -------------------------------------------------------------------------------
    async def shutdown(self, *, id: str, now: bool = False,
                       timeout: float | None = _UNSET) -> empty_pb2.Empty:
        """Ask the shim to exit; a shim that exits tears the connection down, which counts as
        success (the reply may never arrive)."""
        try:
            return await self._call("Shutdown", pb.ShutdownRequest(id=id, now=now),
                                    empty_pb2.Empty, timeout)
        except TtrpcError as exc:
            if exc.code == Code.UNAVAILABLE:
                return empty_pb2.Empty()
            raise

    async def update(self, *, id: str, resources: any_pb2.Any | None = None,
                     annotations: Mapping[str, str] | None = None,
                     timeout: float | None = _UNSET) -> empty_pb2.Empty:
        req = pb.UpdateTaskRequest(id=id)
        if resources is not None:
            req.resources.CopyFrom(resources)
        for k, v in (annotations or {}).items():
            req.annotations[k] = v
        return await self._call("Update", req, empty_pb2.Empty, timeout)

    async def close_io(self, *, id: str, exec_id: str = "", stdin: bool = True,
                       timeout: float | None = _UNSET) -> empty_pb2.Empty:
        return await self._call("CloseIO", pb.CloseIORequest(id=id, exec_id=exec_id, stdin=stdin),
                                empty_pb2.Empty, timeout)

    async def resize_pty(self, *, id: str, width: int, height: int, exec_id: str = "",
                         timeout: float | None = _UNSET) -> empty_pb2.Empty:
        req = pb.ResizePtyRequest(id=id, exec_id=exec_id, width=width, height=height)
        return await self._call("ResizePty", req, empty_pb2.Empty, timeout)

    async def pause(self, *, id: str, timeout: float | None = _UNSET) -> empty_pb2.Empty:
        return await self._call("Pause", pb.PauseRequest(id=id), empty_pb2.Empty, timeout)

    async def resume(self, *, id: str, timeout: float | None = _UNSET) -> empty_pb2.Empty:
        return await self._call("Resume", pb.ResumeRequest(id=id), empty_pb2.Empty, timeout)

    async def checkpoint(self, *, id: str, path: str, options: any_pb2.Any | None = None,
                         timeout: float | None = _UNSET) -> empty_pb2.Empty:
        req = pb.CheckpointTaskRequest(id=id, path=path)
        if options is not None:
            req.options.CopyFrom(options)
        return await self._call("Checkpoint", req, empty_pb2.Empty, timeout)


PROCESS_SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def process_spec_any(process: Mapping[str, Any]) -> any_pb2.Any:
    """An OCI `process` object (dict) as the Any that `exec(spec=...)` wants: JSON under
    containerd's typeurl for specs.Process.  With stdio, give the runc shim both stdout and
    stderr FIFO paths (it opens each non-empty one; an empty stderr next to a stdout fails)."""
    import json

    return any_pb2.Any(type_url=PROCESS_SPEC_TYPE_URL,
                       value=json.dumps(dict(process), separators=(",", ":")).encode())


def pack_any(msg: Any, type_url: str | None = None) -> any_pb2.Any:
    """Wrap a message in Any with containerd's type URL convention (bare full name)."""
    a = any_pb2.Any()
    a.type_url = type_url or msg.DESCRIPTOR.full_name
    a.value = msg.SerializeToString()
    return a
