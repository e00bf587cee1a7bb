"""Owns: QEMU microVMs: command line, cold boot, template snapshot + restore, readiness, teardown.

The recipe is DESIGN §7's: `-M microvm` booting the uncompressed vmlinux (PVH) with our
initramfs; the guest agent serves the Task API on a virtio-serial port whose host end is a unix
socket (`MicroVM.socket_path`, address `MicroVM.address`).  A VM is *ready* when the agent has
answered a Task `Connect` over that socket.

Snapshots (made by bench.vm.snapshot): a template VM boots once, its agent is left idle with no
host connected, and QMP `migrate` (no `stop` first) writes its state to a file; each clone runs
the same machine and devices plus `-incoming "exec:cat SNAP"` (no -kernel/-initrd: RAM comes
from the stream).  Only device state and RAM travel in the stream, not chardev backends, so
every clone gets its own agent socket, QMP socket and serial log.  The template is snapshotted
while disconnected so that a clone's first host connection is a connection the guest sees open
(virtio-serial tells it after load), never a continuation of the template's.

The agent port carries one host connection at a time (QEMU accepts the next client when the
previous one closes); readiness closes its connection before returning.

Timing spans (bench.tracing): `vm.boot` / `vm.restore` = spawn until QEMU reports the VM running
(cold: VMM start and kernel load; restore: loading the snapshot), `agent.ready` = from there
until `Connect` is answered (cold: the guest's whole boot; restore: resume + one round trip).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.doctor import accel_mode
from bench.processes import REGISTRY, ProcessRegistry, process_start_ticks
from bench.rpc.pb import task_v2_pb2 as pb
from bench.rpc.ttrpc import Client, Code, TtrpcError
from bench.tracing import Tracer
from bench.vm.qmp import QMP, QMPError

TASK_SERVICE = "containerd.task.v2.Task"
_SUN_PATH_MAX = 107
_PR_SET_THP_DISABLE = 41
_PR_GET_THP_DISABLE = 42


def _no_thp() -> None:
    """preexec_fn: no transparent huge pages for the VMM (inherited across exec)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)


def disable_thp_here() -> None:
    """Turn THP off for this process, so the VMMs it spawns inherit that without a preexec_fn.

    A preexec_fn runs Python in the forked child; in a process with other threads (a gRPC
    server: the sandboxer) that child can crash before exec (seen: QEMU "exited" with -11)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)


def _thp_disabled_here() -> bool:
    import ctypes
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1


class VMError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    """Alive and not a zombie (an adopted QEMU is not our child, so we cannot wait for it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def host_tsc_khz() -> int:
    """The host TSC rate; without it as `tsc_early_khz` a TCG guest often hangs calibrating.

    It is part of VMConfig, so it must be stable (a snapshot matches only an equal config):
    dmesg's boot-time figure, remembered per host boot in the cache (dmesg costs ~10 ms and may
    have rotated out); /proc/cpuinfo's current "cpu MHz" only as a last resort."""
    cache = Path(os.environ.get("CHAINBENCH_CACHE", "/var/cache/chainbench")) / "tsc_khz.json"
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = json.loads(cache.read_text())
        if boot_id and known["boot_id"] == boot_id:
            return int(known["khz"])
    khz = 0
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"tsc: Detected ([0-9.]+) MHz", out)
        if m:
            khz = int(float(m.group(1)) * 1000)
    if not khz:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    khz = int(float(line.split(":")[1]) * 1000)
                    break
    if not khz:
        raise VMError("cannot determine the host TSC frequency")
    if boot_id:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"boot_id": boot_id, "khz": khz}))
            tmp.rename(cache)
    return khz


@dataclass(frozen=True)
class VMConfig:
    """Everything that shapes the guest; a snapshot is only valid for the identical config."""

    kernel: str
    initrd: str
    memory_mb: int = 128
    cpus: int = 1
    accel: str = "tcg"
    tsc_khz: int = 0
    qemu: str = "qemu-system-x86_64"
    extra_append: str = ""
    # QEMU madvises guest RAM for transparent huge pages; a clone that writes a few KiB of a
    # 2 MiB region then owns all of it.  False = spawn QEMU with PR_SET_THP_DISABLE.
    huge_pages: bool = False

    @classmethod
    def default(cls, *, build: bool = True, **overrides: Any) -> "VMConfig":
        """Our tiny kernel + agent initramfs (built and cached when `build`), accel per host."""
        from bench.vm import initramfs, kernel
        kinfo = kernel.build(quiet=True) if build else kernel.find_kernel()
        iinfo = initramfs.build() if build else initramfs.find_initramfs()
        if kinfo is None or iinfo is None:
            raise VMError("guest kernel or initramfs not built: python -m bench.vm.kernel; "
                          "python -m bench.vm.initramfs")
        kw: dict[str, Any] = {"kernel": str(kinfo.path), "initrd": str(iinfo.path),
                              "accel": accel_mode(), "tsc_khz": host_tsc_khz()}
        kw.update(overrides)
        return cls(**kw)

    def append(self) -> str:
        # panic=-1 + reboot=t with -no-reboot: a dying guest ends QEMU instead of hanging.
        args = f"console=ttyS0 quiet tsc_early_khz={self.tsc_khz} tsc=reliable no_timer_check " \
               "panic=-1 reboot=t"
        return f"{args} {self.extra_append}".strip()

    def argv(self, *, socket_path: str, qmp_path: str, serial_log: str,
             incoming: str | None = None) -> list[str]:
        machine = "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on"
        argv = [self.qemu, "-M", machine, "-accel", self.accel,
                "-smp", str(self.cpus), "-m", f"{self.memory_mb}M",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{serial_log}",
                # port 0 is reserved for a console; fewer ports = fewer guest virtqueues (~2 MB)
                "-device", "virtio-serial-device,max_ports=2",
                "-chardev", f"socket,id=c0,path={socket_path},server=on,wait=off",
                "-device", "virtserialport,chardev=c0,name=agent",
                "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if self.accel == "kvm":
            argv[argv.index("-smp"):argv.index("-smp")] = ["-cpu", "host"]
        if incoming:
            # A clone needs no kernel: its RAM comes from the stream, and fw_cfg (where QEMU
            # would keep a 10 MB copy of vmlinux + initrd per process) is only read at boot.
            argv += ["-incoming", incoming]
        else:
            argv += ["-kernel", self.kernel, "-initrd", self.initrd, "-append", self.append()]
        return argv


@dataclass(frozen=True)
class Snapshot:
    """A template VM's migration stream plus the config every clone must boot with."""

    path: Path
    config: VMConfig
    size: int

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Snapshot":
        d = Path(directory)
        meta = json.loads((d / "snapshot.json").read_text())
        return cls(d / "vm.snap", VMConfig(**meta["config"]), meta["size"])


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

    async def restore(self, snapshot: Snapshot, *, timeout: float = 60.0) -> ReadyTimes:
        """Start from a template snapshot (this VM must use `snapshot.config`)."""
        if snapshot.config != self.config:
            raise VMError("a clone must use the snapshot's config")
        if not snapshot.path.is_file():
            raise VMError(f"snapshot {snapshot.path} missing")
        return await self._launch(f"exec:cat {shlex.quote(str(snapshot.path))}", "vm.restore",
                                  timeout)

    async def _launch(self, incoming: str | None, step: str, timeout: float) -> ReadyTimes:
        if self.proc is not None:
            raise VMError(f"vm {self.id} already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in (self.socket_path, self.qmp_path, self.serial_log):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        argv = self.config.argv(socket_path=self.socket_path, qmp_path=self.qmp_path,
                                serial_log=self.serial_log, incoming=incoming)
        t0 = time.perf_counter_ns()
        try:
            with open(self.stderr_log, "wb") as err:
                self.proc = await self.registry.spawn(
                    *argv, role="vmm", label=self.id, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err,
                    preexec_fn=None if self.config.huge_pages or _thp_disabled_here()
                    else _no_thp)
            async with asyncio.timeout(timeout):
                # Dial and send Connect right away: QEMU holds the bytes until the guest's
                # port is open, so the agent's answer is not delayed by our QMP polling.
                agent = asyncio.ensure_future(self._agent_connect())
                try:
                    await self._until_running()
                    t1 = time.perf_counter_ns()
                    await agent
                finally:
                    if not agent.done():
                        agent.cancel()
                        with contextlib.suppress(BaseException):
                            await agent
            t2 = max(time.perf_counter_ns(), t1)
        except BaseException as exc:
            self.failed = True
            await self.stop()
            if isinstance(exc, (TimeoutError, QMPError, TtrpcError, OSError, VMError)):
                raise VMError(f"vm {self.id}: {step} failed: {exc!r}; {self.diagnostics()}") \
                    from exc
            raise
        self.times = ReadyTimes((t1 - t0) / 1e9, (t2 - t1) / 1e9)
        if self.tracer is not None:
            self.tracer.record(self.pod, self.call, step, t0, t1, component="vmm")
            self.tracer.record(self.pod, self.call, "agent.ready", t1, t2)
        return self.times

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
        self.qmp = await self._race(QMP.connect(self.qmp_path))
        while True:
            st = await self._race(self.qmp.execute("query-status"))
            if st.get("status") == "running":
                return
            if st.get("status") not in ("inmigrate", "prelaunch", "paused", "restore-vm"):
                raise VMError(f"vm status {st.get('status')!r}")
            await asyncio.sleep(0.002)

    async def _agent_connect(self) -> pb.ConnectResponse:
        client = await self._race(self.dial())
        try:
            return await self._race(client.call(TASK_SERVICE, "Connect",
                                                pb.ConnectRequest(), pb.ConnectResponse))
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
