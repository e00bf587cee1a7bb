"""Owns: QEMU microVMs: command line, cold boot, template snapshot + restore, readiness, teardown.

The recipe is DESIGN §7's: `-M microvm` booting the uncompressed vmlinux (PVH) with our
initramfs; the guest agent serves the Task API on a virtio-serial port whose host end is a unix
socket (`MicroVM.socket_path`, address `MicroVM.address`).  A VM is *ready* when the agent has
answered a Task `Connect` over that socket.

Snapshots (made by bench.vm.snapshot): a template VM boots once, its agent is left idle with no
host connected, and QMP `migrate` (no `stop` first) writes its state to a file; each clone runs
the same machine and devices with `-incoming defer` (no -kernel/-initrd: RAM comes from the
snapshot), then QMP `migrate-incoming "exec:cat SNAP"`.  With a RAM-file snapshot the template's
RAM is a shared file mapping and the stream holds device state only (x-ignore-shared); clones map
that file privately.  `prespawn()` does the process start ahead of time (a pool), `restore()` the
rest.  Only device state and RAM travel in the stream, not chardev backends, so
every clone gets its own agent socket, QMP socket and serial log.  The template is snapshotted
while disconnected so that a clone's first host connection is a connection the guest sees open
(virtio-serial tells it after load), never a continuation of the template's.

The agent port carries one host connection at a time (QEMU accepts the next client when the
previous one closes); readiness closes its connection before returning.

Timing spans (bench.tracing): `vm.boot` / `vm.restore` = spawn (for a prespawned VM: the
restore call) until QEMU reports the VM running (cold: VMM start and kernel load; restore:
loading the snapshot), `agent.ready` = from there
until `Connect` is answered (cold: the guest's whole boot; restore: resume + one round trip).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, NoReturn

from bench.processes import REGISTRY, ProcessRegistry, process_start_ticks
from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Client, Code, TtrpcError
from bench.tracing import Tracer
from bench.vm.machine import (  # re-exported: the driver's public names live here too
    Snapshot, VMConfig, VMError, _no_thp, _thp_disabled_here, disable_thp_here, host_tsc_khz)
from bench.vm.qmp import QMP, QMPError

TASK_SERVICE = "containerd.task.v2.Task"
_SUN_PATH_MAX = 107
_ANSWER_S = 4.0  # first Connect answer after a restore: ~0.1 s quiet, ~1 s on a loaded host
__all__ = ["TASK_SERVICE", "MicroVM", "ReadyTimes", "Snapshot", "VMConfig", "VMError",
           "disable_thp_here", "host_tsc_khz"]


def _alive(pid: int) -> bool:
    """Alive and not a zombie (an adopted QEMU is not our child, so we cannot wait for it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


@dataclass
class ReadyTimes:
    vmm_s: float = 0.0  # spawn -> QEMU reports running (vm.boot / vm.restore)
    agent_s: float = 0.0  # -> agent answered Connect (agent.ready)

    @property
    def total_s(self) -> float:
        return self.vmm_s + self.agent_s


class MicroVM:
    """One QEMU microVM and its guest agent.

    vm = MicroVM("pod1", Path("/run/chainbench/vm/pod1"), VMConfig.default())
    await vm.boot()            # or: await vm.restore(snapshot)
    client = await vm.dial()   # a ttrpc Client to the agent (one connection at a time)
    ...
    await vm.stop()            # always; also safe after a failed boot

    A sandboxer that restarts persists `vm.record()` and later calls `MicroVM.recover(rec)`.
    """

    def __init__(self, vm_id: str, workdir: str | os.PathLike[str], config: VMConfig, *,
                 registry: ProcessRegistry | None = None, tracer: Tracer | None = None,
                 pod: str = "", call: str = "") -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", vm_id):
            raise ValueError(f"invalid vm id {vm_id!r}")
        self.id = vm_id
        self.workdir = Path(workdir).resolve()
        self.config = config
        self.registry = registry or REGISTRY
        self.tracer = tracer
        self.pod, self.call = pod or vm_id, call
        self.socket_path = str(self.workdir / "agent.sock")
        self.qmp_path = str(self.workdir / "qmp.sock")
        self.serial_log = str(self.workdir / "serial.log")
        self.stderr_log = str(self.workdir / "qemu.err")
        if len(self.socket_path) > _SUN_PATH_MAX:
            raise ValueError(f"workdir {self.workdir} too long for a unix socket path")
        self.proc: asyncio.subprocess.Process | None = None
        self._adopted: int | None = None  # pid of a QEMU found again by recover()
        self.qmp: QMP | None = None
        self._deferred: Snapshot | None = None  # prespawned, waiting to load this snapshot
        self.restored_from: Snapshot | None = None  # the snapshot it runs from, once restored
        # boot(): guest RAM is this file, shared (a template whose RAM its clones will map)
        self.ram_file: str | None = None
        self.nice = 0  # > 0: QEMU starts at this lower CPU priority (pool upkeep), see renice()
        self.times = ReadyTimes()
        self.failed = False

    @property
    def address(self) -> str:
        """The Task API address to hand out (Sandbox API current schema form)."""
        return f"ttrpc+unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else self._adopted

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self._adopted is not None and _alive(self._adopted)

    def record(self) -> dict[str, Any]:
        """What a sandboxer persists to find this VM again after its own restart."""
        pid = self.pid
        return {"id": self.id, "workdir": str(self.workdir), "pid": pid,
                "start_ticks": process_start_ticks(pid) if pid else None,
                "config": asdict(self.config)}

    @classmethod
    async def recover(cls, record: dict[str, Any], *, registry: ProcessRegistry | None = None,
                      tracer: Tracer | None = None) -> "MicroVM":
        """Re-attach to a VM that outlived its owner, from `record()`; VMError when it is gone
        (or its pid now belongs to another process)."""
        vm = cls(record["id"], record["workdir"], VMConfig(**record["config"]),
                 registry=registry, tracer=tracer)
        pid = int(record["pid"])
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        if not _alive(pid) or process_start_ticks(pid) != record.get("start_ticks") or \
                not any(vm.socket_path.encode() in arg for arg in cmdline):
            raise VMError(f"vm {vm.id}: qemu pid {pid} is gone")
        vm._adopted = pid
        vm.registry.register(pid, "vmm", vm.id, group=True)
        # QMP serves one client: if the old owner still holds it, do without (stop() signals).
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            vm.qmp = await QMP.connect(vm.qmp_path, timeout=2)
        return vm

    @property
    def accel(self) -> str:
        return self.config.accel

    # -- lifecycle --------------------------------------------------------------------------
    async def boot(self, *, timeout: float = 120.0) -> ReadyTimes:
        """Cold boot and wait until the agent answers."""
        return await self._launch(None, "vm.boot", timeout)

    def _check_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.config != self.config:
            raise VMError("a clone must use the snapshot's config")
        if not snapshot.files_present():
            raise VMError(f"snapshot {snapshot.path} (or its RAM file) missing")

    async def prespawn(self, snapshot: Snapshot, *, timeout: float = 30.0) -> None:
        """Start QEMU ready to load `snapshot` (`-incoming defer`, QMP negotiated, migration
        capabilities set) without loading it; `restore(snapshot)` then only loads and resumes.
        A pool of these keeps process start and device set-up off a sandbox's critical path.
        Until restored the VMM holds no guest RAM pages (PSS ~ QEMU's own, a few MB)."""
        self._check_snapshot(snapshot)
        try:
            async with asyncio.timeout(timeout):
                await self._spawn_deferred(snapshot)
        except BaseException as exc:
            await self._fail(exc, "prespawn")

    def claim(self, vm_id: str, *, tracer: Tracer | None = None, pod: str = "",
              call: str = "") -> None:
        """Hand a prespawned VM to its sandbox: its id and the spans it records from now on."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", vm_id):
            raise ValueError(f"invalid vm id {vm_id!r}")
        self.id, self.tracer, self.pod, self.call = vm_id, tracer, pod or vm_id, call

    def renice(self, value: int = 0) -> None:
        """Set the CPU priority of every QEMU thread (Linux keeps one per thread)."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(tid), value)
        self.nice = value

    @property
    def prespawned(self) -> bool:
        return self._deferred is not None and self.running()

    @property
    def prespawned_for(self) -> Snapshot | None:
        """The snapshot a prespawned VM waits to load."""
        return self._deferred if self.prespawned else None

    async def restore(self, snapshot: Snapshot, *, timeout: float = 60.0) -> ReadyTimes:
        """Start from a template snapshot (this VM must use `snapshot.config`); after
        `prespawn(snapshot)` only the load and resume remain.

        QEMU always starts with `-incoming defer`: a snapshot with a RAM file needs the
        x-ignore-shared capability set over QMP before the load (QEMU 7.2 has no command-line
        switch for it), and the same path serves both kinds."""
        self._check_snapshot(snapshot)
        if self.proc is not None and self._deferred != snapshot:
            raise VMError(f"vm {self.id} already started")
        t0 = t1 = time.perf_counter_ns()
        try:
            async with asyncio.timeout(timeout):
                if self.proc is None:
                    await self._spawn_deferred(snapshot)
                assert self.qmp is not None
                qmp = self.qmp

                async def load() -> None:
                    uri = f"exec:cat {shlex.quote(str(snapshot.path))}"
                    await self._race(qmp.execute("migrate-incoming", {"uri": uri}))
                    self._deferred = None

                t1 = await self._running_then_agent(load)
                self.restored_from = snapshot
            t2 = max(time.perf_counter_ns(), t1)
        except BaseException as exc:
            await self._fail(exc, "vm.restore")
        return self._done("vm.restore", t0, t1, t2)

    async def _running_then_agent(self, before: Callable[[], Awaitable[None]] | None) -> int:
        """Run `before` (the snapshot load), wait until the guest runs, then for the agent's
        first Connect answer; returns when the guest started running (perf_counter ns).

        Connect is dialled and sent first: QEMU holds the bytes until the guest's port is
        open, so the agent's answer is not delayed by our QMP round trips and polling."""
        agent = asyncio.ensure_future(self._agent_connect())
        try:
            if before is not None:
                await before()
            await self._until_running()
            t1 = time.perf_counter_ns()
            await agent
            return t1
        finally:
            if not agent.done():
                agent.cancel()
                with contextlib.suppress(BaseException):
                    await agent

    async def check_ready(self, *, timeout: float = 30.0) -> ReadyTimes:
        """For a VM restored ahead of time (a warm pool): one `Connect` round trip, recorded as
        `agent.ready` after a zero-length `vm.restore` (the restore itself was not on this
        sandbox's critical path; the span says so by its length)."""
        t0 = time.perf_counter_ns()
        try:
            async with asyncio.timeout(timeout):
                await self._agent_connect()
        except BaseException as exc:
            await self._fail(exc, "agent.ready")
        return self._done("vm.restore", t0, t0, time.perf_counter_ns())

    async def _spawn(self, incoming: str | None, ram_file: str | None = None,
                     ram_shared: bool = False) -> None:
        if self.proc is not None:
            raise VMError(f"vm {self.id} already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in (self.socket_path, self.qmp_path, self.serial_log):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        argv = self.config.argv(socket_path=self.socket_path, qmp_path=self.qmp_path,
                                serial_log=self.serial_log, incoming=incoming,
                                ram_file=ram_file, ram_shared=ram_shared)
        if self.nice:
            argv = ["nice", "-n", str(self.nice), *argv]  # execs QEMU: same pid
        with open(self.stderr_log, "wb") as err:
            self.proc = await self.registry.spawn(
                *argv, role="vmm", label=self.id, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
                preexec_fn=None if self.config.huge_pages or _thp_disabled_here() else _no_thp)

    async def _spawn_deferred(self, snapshot: Snapshot) -> None:
        await self._spawn("defer", str(snapshot.ram) if snapshot.ram else None)
        self.qmp = await self._race(QMP.connect(self.qmp_path))
        if snapshot.ram is not None:
            # Both ends must agree: the stream then carries device state only, and the
            # clone's (private) mapping of the RAM file is the guest's memory as saved.
            await self._race(self.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}]}))
        self._deferred = snapshot

    async def _fail(self, exc: BaseException, step: str) -> NoReturn:
        self.failed = True
        await self.stop()
        if isinstance(exc, (TimeoutError, QMPError, TtrpcError, OSError, VMError)):
            raise VMError(f"vm {self.id}: {step} failed: {exc!r}; {self.diagnostics()}") \
                from exc
        raise exc

    def _done(self, step: str, t0: int, t1: int, t2: int) -> ReadyTimes:
        self.times = ReadyTimes((t1 - t0) / 1e9, (t2 - t1) / 1e9)
        if self.tracer is not None:
            self.tracer.record(self.pod, self.call, step, t0, t1, component="vmm")
            self.tracer.record(self.pod, self.call, "agent.ready", t1, t2)
        return self.times

    async def _launch(self, incoming: str | None, step: str, timeout: float) -> ReadyTimes:
        t0 = t1 = time.perf_counter_ns()
        try:
            await self._spawn(incoming, self.ram_file, ram_shared=True)
            async with asyncio.timeout(timeout):
                t1 = await self._running_then_agent(None)
            t2 = max(time.perf_counter_ns(), t1)
        except BaseException as exc:
            await self._fail(exc, step)
        return self._done(step, t0, t1, t2)

    async def _watch_exit(self) -> None:
        assert self.proc is not None
        rc = await self.proc.wait()
        raise VMError(f"qemu exited with status {rc}")

    async def _race(self, coro: Any) -> Any:
        """Run `coro` but fail fast if QEMU dies meanwhile."""
        work = asyncio.ensure_future(coro)
        died = asyncio.ensure_future(self._watch_exit())
        try:
            done, _ = await asyncio.wait({work, died}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            died.result()
        finally:
            for t in (work, died):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        await t

    async def _until_running(self) -> None:
        """Until QEMU reports the guest running: its RESUME event, with a status query now and
        then in case the event came before we listened (a cold boot starts running at once)."""
        if self.qmp is None:
            self.qmp = await self._race(QMP.connect(self.qmp_path))
        while True:
            st = await self._race(self.qmp.execute("query-status"))
            if st.get("status") == "running":
                return
            if st.get("status") not in ("inmigrate", "prelaunch", "paused", "restore-vm"):
                raise VMError(f"vm status {st.get('status')!r}")
            if await self._race(self.qmp.wait_event("RESUME", 0.05)) is not None:
                return

    async def _agent_connect(self) -> pb.ConnectResponse:
        """One answered `Connect`.  A request still unanswered after `_ANSWER_S` (doubling)
        is sent again on a fresh connection.  A backstop: the agent used to drop a request
        whose bytes arrived before virtio-serial's "host connected" event (bench.vm.agent_port
        now treats host presence as a hint only); should an answer ever go missing again,
        readiness costs seconds instead of the whole timeout.  A resend is harmless: a new
        client's stream 1 makes the agent drop the previous client's calls."""
        wait = _ANSWER_S
        while True:
            client = await self._race(self.dial())
            try:
                return await self._race(client.call(TASK_SERVICE, "Connect",
                                                    pb.ConnectRequest(), pb.ConnectResponse,
                                                    timeout=wait))
            except TtrpcError as exc:
                if exc.code != Code.DEADLINE_EXCEEDED:
                    raise
                wait *= 2
            finally:
                await client.close()

    async def dial(self, *, timeout: float = 10.0) -> Client:
        """A ttrpc client on the agent socket (retries while QEMU creates it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await Client.connect(self.socket_path, timeout=timeout)
            except TtrpcError as exc:
                if exc.code != Code.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.002)

    def serial_output(self) -> str:
        try:
            return Path(self.serial_log).read_text(errors="replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        err = ""
        with contextlib.suppress(OSError):
            err = Path(self.stderr_log).read_text(errors="replace")[-1500:]
        return f"qemu stderr: {err.strip()!r}; serial log tail: {self.serial_output()[-1500:]!r}"

    async def wait_serial(self, text: str, count: int = 1, *, timeout: float = 30.0) -> None:
        """Wait until the guest console has printed `text` at least `count` times."""
        deadline = time.monotonic() + timeout
        while self.serial_output().count(text) < count:
            if time.monotonic() > deadline:
                raise VMError(f"vm {self.id}: {text!r} x{count} not on the console; "
                              f"{self.diagnostics()}")
            if not self.running():
                raise VMError(f"vm {self.id}: qemu is gone; {self.diagnostics()}")
            await asyncio.sleep(0.01)

    def memory(self) -> Any:
        """PSS/RSS/USS of the QEMU process (bench.probes.MemSample) or None."""
        from bench.probes import read_memory
        pid = self.pid
        return read_memory(pid) if pid and self.running() else None

    async def stop(self, *, grace: float = 3.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove sockets; idempotent.
        The serial log and QEMU's stderr are kept when the VM failed."""
        pid, alive = self.pid, self.running()
        proc, self.proc = self.proc, None
        adopted, self._adopted = self._adopted, None
        qmp, self.qmp = self.qmp, None

        async def gone(wait: float) -> bool:
            if proc is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), wait)
                return proc.returncode is not None
            deadline = time.monotonic() + wait  # not our child: watch /proc
            while adopted is not None and _alive(adopted) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return adopted is None or not _alive(adopted)

        if pid is not None and alive:
            if qmp is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(qmp.execute("quit"), 1.0)
            for sig, wait in ((None, grace / 2), (signal.SIGTERM, grace / 2),
                              (signal.SIGKILL, 5.0)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, sig)  # QEMU leads its own group (with any `cat`)
                if await gone(wait):
                    break
        if qmp is not None:
            await qmp.close()
        if pid is not None:
            self.registry.unregister(pid)
        keep = {self.serial_log, self.stderr_log} if self.failed else set()
        for p in (self.socket_path, self.qmp_path, self.serial_log, self.stderr_log):
            if p not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)

    async def __aenter__(self) -> "MicroVM":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
