"""Owns: the sandboxer's sandbox lifecycle (create/start/stop/wait/shutdown), persistence and
recovery, independent of the wire schema.

Container (task) operations live in `containers.py`; the gRPC adapters in `controller.py` and
the ttrpc Task adapter in `tasks.py` only translate messages and errors.

Semantics (documented choices, Kuasar-like):
* Start of a started (READY) sandbox is idempotent: the same answer again.  Start of a stopped
  one is FAILED_PRECONDITION (its namespaces are gone).
* Stop and Shutdown of an unknown sandbox succeed (Kuasar swallows NotFound); the other calls
  answer NOT_FOUND.  Stop ignores timeout_secs (forced, like Kuasar).
* The sandbox "pid" is the sandboxer's own pid while the sandbox is READY: no process lives in
  the pinned namespaces, the sandboxer is what serves the pod.
* The Task API socket lives from Start until Shutdown, so an engine can still Wait/Delete its
  containers' tasks after Stop.
* Backend `vm` (bench.sandboxer.vms): Start boots or restores a microVM and the task address is
  its guest agent's socket; the sandbox "pid" is the VMM's; Stop stops the VM; the VM's exit
  is the sandbox's exit (Wait).  Containers announced by Update/Prepare are recorded (and their
  bundle written, the host half of a shared dir) but run in the guest, driven by the engine.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from bench.processes import remove_tree
from bench.rpc.ttrpc import Code, Server
from bench.sandboxer import nspin
from bench.sandboxer.state import CREATED, READY, STOPPED, BadId, Sandbox, check_id, load_all
from bench.tracing import Tracer
from sim.vocabulary import CALL_REMOVE_POD, CALL_RUN_POD, CALL_STOP_POD

log = logging.getLogger("bench.sandboxer")

TASK_API_VERSION = 2
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL
SANDBOX_READY = "SANDBOX_READY"
SANDBOX_NOTREADY = "SANDBOX_NOTREADY"


class SbxError(Exception):
    """An error with a gRPC/ttrpc status code (same numbers in both)."""

    def __init__(self, code: Code, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")


def valid_id(value: str, what: str = "sandbox id") -> str:
    try:
        return check_id(value, what)
    except BadId as exc:
        raise SbxError(Code.INVALID_ARGUMENT, str(exc)) from None


class Manager:
    """All sandboxes of one sandboxer process."""

    def __init__(self, root: Path, tracer: Tracer | None = None, backend: str = "runc",
                 vm_boot: str = "restore", vm_memory_mb: int | None = None,
                 vm_pool: int | None = None, vm_pool_mode: str | None = None) -> None:
        from bench.sandboxer.vms import BACKENDS, BOOT_MODES, VmBackend
        if backend not in BACKENDS or vm_boot not in BOOT_MODES:
            raise ValueError(f"backend {backend!r} / vm boot {vm_boot!r} unknown")
        self.root = root
        self.tracer = tracer or Tracer(None, "sandboxer")
        self.sandboxes: dict[str, Sandbox] = {}
        self.pinner = nspin.NamespacePinner()
        self.backend = backend
        # Pool VMs live under our --dir, so whoever checks that dir for leftovers sees them.
        self.vms = VmBackend(self.tracer, boot=vm_boot, memory_mb=vm_memory_mb,
                             pool_size=vm_pool, pool_mode=vm_pool_mode,
                             pool_dir=root / ".vmpool")
        # Imported here to keep the import graph one-way (containers needs Manager types only).
        from bench.sandboxer.containers import Containers
        self.containers = Containers(self)

    # ------------------------------------------------------------------ helpers
    def get(self, sid: str) -> Sandbox:
        valid_id(sid)
        sb = self.sandboxes.get(sid)
        if sb is None:
            raise SbxError(Code.NOT_FOUND, f"sandbox {sid} not found")
        return sb

    def _attach_runtime(self, sb: Sandbox) -> Sandbox:
        sb.lock = asyncio.Lock()
        sb.ended = asyncio.Event()
        if sb.state == STOPPED:
            sb.ended.set()
        return sb

    def address(self, sb: Sandbox, legacy: bool) -> str:
        if sb.backend == "vm":
            sock = sb.agent_socket if self.vms.pid(sb.id) else ""
        else:
            sock = sb.task_socket if sb.task_server is not None else ""
        return ("unix://" if legacy else "ttrpc+unix://") + sock if sock else ""

    def pid(self, sb: Sandbox) -> int:
        if sb.backend == "vm":
            return self.vms.pid(sb.id) if sb.state == READY else 0
        return os.getpid() if sb.state == READY else 0

    def state_name(self, sb: Sandbox) -> str:
        return SANDBOX_READY if sb.state == READY else SANDBOX_NOTREADY

    def save(self, sb: Sandbox) -> None:
        if sb.id in self.sandboxes:
            sb.save()

    # ------------------------------------------------------------------ lifecycle
    async def create(self, sid: str, netns_path: str = "", pod: str = "",
                     hostname: str = "",
                     pinned: tuple[str, ...] = nspin.DEFAULT_PLAN,
                     annotations: dict[str, str] | None = None) -> Sandbox:
        from bench.sandboxer import vms
        valid_id(sid)
        ann = annotations or {}
        try:
            backend = vms.pick(ann, vms.ANNOTATION_BACKEND, self.backend, vms.BACKENDS)
            boot = vms.pick(ann, vms.ANNOTATION_BOOT, self.vms.boot, vms.BOOT_MODES) \
                if backend == "vm" else ""
        except ValueError as exc:
            raise SbxError(Code.INVALID_ARGUMENT, str(exc)) from None
        if backend == "vm":
            pinned = ()  # the VM is the sandbox: nothing to pin on the host
        if netns_path and not os.path.isabs(netns_path):
            raise SbxError(Code.INVALID_ARGUMENT, f"netns_path must be absolute: {netns_path!r}")
        if len(os.fsencode(str(self.root / sid / "task.sock"))) > UNIX_PATH_MAX:
            raise SbxError(Code.INVALID_ARGUMENT,
                           f"sandbox id {sid!r} too long: its task socket path under "
                           f"{self.root} would exceed {UNIX_PATH_MAX} bytes")
        with self.tracer.span(sid, CALL_RUN_POD, "sandbox.create"):
            if sid in self.sandboxes:
                raise SbxError(Code.ALREADY_EXISTS, f"sandbox {sid} already exists")
            path = self.root / sid
            if path.exists():
                # Left over by an interrupted Shutdown: nothing in memory refers to it.
                await asyncio.to_thread(remove_tree, path)
            path.mkdir(parents=True)
            sb = Sandbox(id=sid, dir=str(path), pod=pod, hostname=hostname,
                         netns_path=netns_path, pinned=list(pinned),
                         created_at_ns=time.time_ns(), backend=backend, boot=boot)
            self._attach_runtime(sb)
            self.sandboxes[sid] = sb
            sb.save()
            return sb

    async def start(self, sid: str) -> Sandbox:
        sb = self.get(sid)
        assert sb.lock is not None
        async with sb.lock:
            if sb.state == READY:
                return sb
            if sb.state == STOPPED:
                raise SbxError(Code.FAILED_PRECONDITION, f"sandbox {sid} is stopped")
            if sb.backend == "vm":
                with self.tracer.span(sid, CALL_RUN_POD, "sandbox.start"):
                    await self._start_vm(sb)
                return sb
            with self.tracer.span(sid, CALL_RUN_POD, "sandbox.start"):
                try:
                    await self.pinner.pin(sb.ns_dir, tuple(sb.pinned), sb.hostname)
                except OSError as exc:
                    nspin.release(sb.ns_dir)
                    raise SbxError(Code.INTERNAL, f"pin namespaces of {sid}: {exc}") from exc
                try:
                    await self._serve_tasks(sb)
                except BaseException:
                    nspin.release(sb.ns_dir)
                    raise
                sb.state = READY
                sb.save()
            return sb

    async def _start_vm(self, sb: Sandbox) -> None:
        from bench.vm.qemu import VMError
        try:
            await self.vms.start(sb.id, sb.path, sb.boot or self.vms.boot, self._vm_exited)
        except VMError as exc:
            raise SbxError(Code.UNAVAILABLE, f"start VM of {sb.id}: {exc}") from None
        sb.vm = self.vms.record(sb.id)
        sb.state = READY
        sb.save()

    async def _vm_exited(self, sid: str, status: int) -> None:
        """A VM died under a READY sandbox (not by our Stop): the sandbox has exited."""
        sb = self.sandboxes.get(sid)
        if sb is None or sb.state != READY:
            return
        log.warning("sandbox %s: VM exited with status %d", sid, status)
        assert sb.lock is not None
        async with sb.lock:
            await self._stop_locked(sb, exit_status=status)

    async def _serve_tasks(self, sb: Sandbox) -> None:
        from bench.sandboxer.tasks import task_methods
        server = Server()
        server.register("containerd.task.v2.Task", task_methods(self.containers, sb))
        await server.start(sb.task_socket)
        sb.task_server = server

    def _find(self, sid: str) -> Sandbox | None:
        """The sandbox, or None when it is unknown: Stop/Shutdown swallow NotFound, as Kuasar."""
        try:
            return self.get(sid)
        except SbxError as exc:
            if exc.code == Code.NOT_FOUND:
                return None
            raise

    async def stop(self, sid: str) -> None:
        sb = self._find(sid)
        if sb is None:
            return
        assert sb.lock is not None
        async with sb.lock:
            await self._stop_locked(sb)

    async def _stop_locked(self, sb: Sandbox, exit_status: int = 0) -> None:
        if sb.state == STOPPED:
            return
        with self.tracer.span(sb.id, CALL_STOP_POD, "sandbox.stop"):
            if sb.backend == "vm":
                # The guest's processes die with it; no host state beyond the VM itself.
                await self.vms.stop(sb.id)
                sb.vm = {}
            elif sb.state == READY:
                await self.containers.kill_all(sb)
                # umount waits for an RCU grace period: off the loop
                await asyncio.to_thread(nspin.release, sb.ns_dir)
            sb.state = STOPPED
            sb.exit_status = exit_status
            sb.exited_at_ns = time.time_ns()
            sb.save()
            assert sb.ended is not None
            sb.ended.set()

    async def wait(self, sid: str) -> Sandbox:
        sb = self.get(sid)
        assert sb.ended is not None
        await sb.ended.wait()
        return sb

    async def shutdown(self, sid: str) -> None:
        sb = self._find(sid)
        if sb is None:
            return
        assert sb.lock is not None
        async with sb.lock:
            with self.tracer.span(sid, CALL_REMOVE_POD, "sandbox.shutdown"):
                await self._stop_locked(sb)
                await self._teardown(sb)

    async def _teardown(self, sb: Sandbox) -> None:
        # Anything created after a Stop (or re-attached in a stopped sandbox) dies here too.
        await self.containers.kill_all(sb)
        if sb.task_server is not None:
            server, sb.task_server = sb.task_server, None
            await server.close()
        self.containers.forget(sb)
        self.sandboxes.pop(sb.id, None)
        await asyncio.to_thread(remove_tree, sb.path)

    # ------------------------------------------------------------------ process lifetime
    async def recover(self) -> None:
        """Reload every persisted sandbox: re-open task sockets, re-attach to containers."""
        mps = await asyncio.to_thread(nspin.mountpoints)
        for sb in await asyncio.to_thread(load_all, self.root):
            self._attach_runtime(sb)
            self.sandboxes[sb.id] = sb
            if sb.backend == "vm":
                await self._recover_vm(sb)
                continue
            if sb.state == CREATED:
                # A crash between pinning and saving READY may have left pins mounted.
                await asyncio.to_thread(nspin.release, sb.ns_dir)
            # Re-attach first: a Stop below must be able to see its containers exit.
            await self.containers.reattach(sb)
            if sb.state == READY and not all(sb.ns_file(t) in mps for t in sb.pinned):
                log.error("sandbox %s: pinned namespaces are gone; marking it stopped", sb.id)
                await self._stop_locked(sb, exit_status=255)
            if sb.state in (READY, STOPPED):
                try:
                    await self._serve_tasks(sb)
                except OSError as exc:
                    log.error("sandbox %s: cannot serve its task socket: %s", sb.id, exc)
            sb.save()
        log.info("recovered %d sandbox(es) from %s", len(self.sandboxes), self.root)

    async def _recover_vm(self, sb: Sandbox) -> None:
        if sb.state == READY:
            if not await self.vms.recover(sb.id, sb.vm, self._vm_exited):
                log.error("sandbox %s: its VM is gone; marking it stopped", sb.id)
                sb.vm = {}
                await self._stop_locked(sb, exit_status=255)
        elif sb.state == CREATED:
            # A sandboxer that died during Start may have left a QEMU nobody records: its
            # command line names this sandbox's agent socket.
            await self.vms.kill_strays(sb.agent_socket)
            sb.vm = {}
        sb.save()

    async def close(self, cleanup: bool) -> None:
        """Stop serving; with `cleanup` tear every sandbox down, else leave them for recovery."""
        for sb in list(self.sandboxes.values()):
            if cleanup:
                try:
                    await self.shutdown(sb.id)
                except Exception as exc:  # keep tearing the others down
                    log.error("shutdown of %s failed: %s", sb.id, exc)
            elif sb.task_server is not None:
                server, sb.task_server = sb.task_server, None
                await server.close()
        await self.vms.close(stop_vms=cleanup)
        self.containers.forget_all()
        self.pinner.close()
        self.tracer.flush()


def created_at(sb: Sandbox) -> Timestamp:
    return timestamp(sb.created_at_ns)


def timestamp(ns: int) -> Timestamp:
    """A protobuf Timestamp; 0 stays the unset (zero) timestamp."""
    ts = Timestamp()
    if ns:
        ts.FromNanoseconds(ns)
    return ts
